//! How an event is written: CloudEvents 1.0 (the default), Debezium-compatible, or raw.
//!
//! - `cloudevents`: structured JSON mode: `specversion, id, source, type, subject (the
//!   aggregate id), time, datacontenttype, data`, plus extension attributes `aggregatetype`,
//!   `schemaversion`, `traceparent`, `lsn`, `txid` and `sequence` (the position as a string
//!   that sorts in commit order, per the CloudEvents sequence extension). [`attributes`]
//!   gives the same attributes for binary mode, where they travel as message headers.
//! - `debezium`: value = the payload only; key = the aggregate id and header `id` = the
//!   event id on sinks that have keys and headers. This is what Debezium's outbox router
//!   produces, so consumers can switch over unchanged.
//! - `raw`: the payload as it is.
//!
//! The `specversion` is the envelope version; `schemaversion` is the event's own.

use crate::{Event, Lsn, Position};
use serde::Deserialize;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Format {
    #[default]
    #[serde(rename = "cloudevents")]
    CloudEvents,
    #[serde(rename = "debezium")]
    Debezium,
    #[serde(rename = "raw")]
    Raw,
}

/// CloudEvents `specversion`: the version of the envelope the relay writes.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";

/// Appends one event as one line (JSON document + newline) in `format`.
pub fn write_line(format: Format, event: &Event, out: &mut Vec<u8>) {
    match format {
        Format::CloudEvents => write_cloudevent(event, out),
        Format::Debezium | Format::Raw => out.extend_from_slice(event.payload.as_bytes()),
    }
    out.push(b'\n');
}

/// A CloudEvents attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    String(String),
    Integer(i64),
}

impl std::fmt::Display for AttributeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttributeValue::String(s) => f.write_str(s),
            AttributeValue::Integer(i) => write!(f, "{i}"),
        }
    }
}

/// The CloudEvents attributes of `event` except `data`, in a stable order: what binary
/// mode sends as headers (`ce_` / `cloudEvents_` prefixed by the sink).
pub fn attributes(event: &Event) -> Vec<(String, AttributeValue)> {
    use AttributeValue::{Integer, String as Str};
    let mut attrs = vec![
        (
            "specversion".to_owned(),
            Str(CLOUDEVENTS_SPEC_VERSION.to_owned()),
        ),
        ("id".to_owned(), Str(event.id.to_string())),
        ("source".to_owned(), Str(event.source.to_string())),
        ("type".to_owned(), Str(event.event_type.to_string())),
        ("subject".to_owned(), Str(event.aggregate_id.to_string())),
        ("time".to_owned(), Str(event_time(event))),
        (
            "datacontenttype".to_owned(),
            Str("application/json".to_owned()),
        ),
        (
            "aggregatetype".to_owned(),
            Str(event.aggregate_type.to_string()),
        ),
    ];
    if let Some(version) = event.schema_version {
        attrs.push(("schemaversion".to_owned(), Integer(version)));
    }
    if let Some(traceparent) = &event.traceparent {
        attrs.push(("traceparent".to_owned(), Str(traceparent.to_string())));
    }
    attrs.push(("lsn".to_owned(), Str(event.position.commit_lsn.to_string())));
    attrs.push(("txid".to_owned(), Integer(i64::from(event.xid))));
    attrs.push(("sequence".to_owned(), Str(sequence(event.position))));
    for (name, value) in event.attributes.iter().chain(&event.headers) {
        let name = extension_name(name);
        if !attrs.iter().any(|(existing, _)| *existing == name) {
            attrs.push((name, Str(value.to_string())));
        }
    }
    attrs
}

/// CloudEvents attribute names are lower-case letters and digits: headers and extra columns
/// are folded to that form.
fn extension_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The event's time: `occurred_at` when the outbox has it, else the commit time.
pub fn event_time(event: &Event) -> String {
    match &event.occurred_at {
        Some(time) => time.to_string(),
        None => {
            let micros = event.commit_time_micros.max(0) as u64;
            humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
        }
    }
}

/// The position as 24 hex digits: lexicographic order is commit order.
pub fn sequence(position: Position) -> String {
    format!("{:016X}{:08X}", position.commit_lsn.0, position.index)
}

fn parse_sequence(s: &str) -> Option<Position> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let lsn = u64::from_str_radix(&s[..16], 16).ok()?;
    let index = u32::from_str_radix(&s[16..], 16).ok()?;
    Some(Position {
        commit_lsn: Lsn(lsn),
        index,
    })
}

fn write_cloudevent(event: &Event, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (name, value)) in attributes(event).iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, name);
        out.push(b':');
        match value {
            AttributeValue::String(s) => push_json_str(out, s),
            AttributeValue::Integer(n) => out.extend_from_slice(n.to_string().as_bytes()),
        }
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(event.payload.as_bytes());
    out.push(b'}');
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a str to a Vec cannot fail");
}

/// Reads the source position back from a CloudEvents line; `None` for other formats.
pub fn position_of_line(line: &[u8]) -> Option<Position> {
    #[derive(Deserialize)]
    struct Sequenced<'a> {
        specversion: &'a str,
        sequence: &'a str,
    }
    let event: Sequenced = serde_json::from_slice(line).ok()?;
    (event.specversion == CLOUDEVENTS_SPEC_VERSION).then(|| parse_sequence(event.sequence))?
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Text;

    pub(crate) fn sample(lsn: u64, index: u32) -> Event {
        Event {
            position: Position {
                commit_lsn: Lsn(lsn),
                index,
            },
            xid: 42,
            commit_time_micros: 1_700_000_000_123_456,
            table: "public.outbox".into(),
            source: "/public.outbox".into(),
            id: Text::from("0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11"),
            key: Text::from("order-\"1\""),
            aggregate_type: Text::from("order"),
            aggregate_id: Text::from("order-\"1\""),
            event_type: Text::from("OrderCreated"),
            schema_version: None,
            occurred_at: None,
            traceparent: None,
            headers: Vec::new(),
            attributes: Vec::new(),
            payload: Text::from(r#"{"total": 12}"#),
        }
    }

    #[test]
    fn cloudevent_line_is_valid_json_and_round_trips_its_position() {
        let mut event = sample(0x016B_3748, 7);
        event.schema_version = Some(3);
        event.traceparent = Some(Text::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        event.headers = vec![("X-Tenant".into(), Text::from("acme"))];
        let mut line = Vec::new();
        write_line(Format::CloudEvents, &event, &mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["specversion"], "1.0");
        assert_eq!(parsed["subject"], "order-\"1\"");
        assert_eq!(parsed["data"]["total"], 12);
        assert_eq!(parsed["schemaversion"], 3);
        assert_eq!(parsed["lsn"], "0/16B3748");
        assert_eq!(parsed["txid"], 42);
        assert_eq!(parsed["sequence"], "00000000016B374800000007");
        assert_eq!(parsed["xtenant"], "acme");
        assert_eq!(parsed["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(position_of_line(&line), Some(event.position));
    }

    #[test]
    fn sequence_sorts_in_commit_order() {
        let positions = [(1, 9), (2, 0), (2, 1), (0x1_0000_0000, 0)];
        let sequences: Vec<String> = positions
            .iter()
            .map(|&(l, i)| {
                sequence(Position {
                    commit_lsn: Lsn(l),
                    index: i,
                })
            })
            .collect();
        let mut sorted = sequences.clone();
        sorted.sort();
        assert_eq!(sequences, sorted);
    }

    #[test]
    fn debezium_and_raw_lines_are_the_payload() {
        let event = sample(1, 0);
        for format in [Format::Debezium, Format::Raw] {
            let mut line = Vec::new();
            write_line(format, &event, &mut line);
            assert_eq!(line, b"{\"total\": 12}\n");
            assert_eq!(position_of_line(&line), None);
        }
    }
}
