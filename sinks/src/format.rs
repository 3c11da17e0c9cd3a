//! How an event is written: CloudEvents 1.0 (the default), Debezium-compatible, or raw.
//!
//! - `cloudevents`: structured JSON mode: `specversion, id, source, type, subject (the
//!   aggregate id), time, datacontenttype, data`, plus extension attributes `aggregatetype`,
//!   `schemaversion`, `originalschemaversion` (the stored version, when the relay upcast the
//!   payload for the sink), `traceparent`, `lsn`, `txid` and `sequence` (the position as a
//!   string that sorts in commit order, per the CloudEvents sequence extension). [`attributes`]
//!   gives the same attributes for binary mode, where they travel as message headers.
//! - `debezium`: value = the payload only; key = the aggregate id and header `id` = the
//!   event id on sinks that have keys and headers. This is what Debezium's outbox router
//!   produces, so consumers can switch over unchanged.
//! - `raw`: the payload as it is.
//!
//! The `specversion` is the envelope version; `schemaversion` is the event's own.
//!
//! A line-based output ([`write_line`]: the file and stdout sinks) holds exactly one event
//! per line, in every format. A payload that is not bytes is always JSON (the relay dead-letters a `json` or
//! `text` payload that is not), and JSON can hold a raw line break only as whitespace between
//! tokens: inside strings it must be escaped. So the line breaks (CR, LF) of a payload
//! written as it was typed (a `json` column keeps its text) are written as spaces, which
//! means the same JSON. Sinks with message framing (Kafka, RabbitMQ, EventBridge) send a
//! debezium or raw payload unchanged; their structured CloudEvents envelope is this line.
//!
//! A tombstone (no payload) reaches only Kafka sinks, which write no value at all (see
//! [`crate::Payload`]); here it is written as JSON `null`, and as an envelope without `data`.
//!
//! A binary payload (a `bytea` column) is carried by a CloudEvents envelope as `data_base64`
//! (standard base64) with the mapping's `datacontenttype`. A line cannot hold arbitrary
//! bytes, so a line-based output writes a binary `debezium` or `raw` payload as its standard
//! base64; sinks with message framing send the bytes themselves.

use crate::{Event, Lsn, Payload, Position};
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
        Format::Debezium | Format::Raw => match &event.payload {
            Payload::Json(json) => push_one_line(out, json.as_bytes()),
            Payload::Binary { bytes, .. } => push_base64(out, bytes),
            Payload::Tombstone => out.extend_from_slice(b"null"),
        },
    }
    out.push(b'\n');
}

/// Appends a JSON payload with its line breaks (whitespace between tokens: JSON strings
/// cannot hold raw ones) written as spaces, so it stays on one line and means the same.
fn push_one_line(out: &mut Vec<u8>, payload: &[u8]) {
    let is_break = |b: &u8| *b == b'\n' || *b == b'\r';
    if payload.iter().any(is_break) {
        out.extend(payload.iter().map(|b| if is_break(b) { b' ' } else { *b }));
    } else {
        out.extend_from_slice(payload);
    }
}

/// Appends `bytes` in standard base64 (with padding): ASCII, no line breaks.
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    use base64::Engine;
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .expect("the buffer was sized for the encoding");
    out.truncate(start + written);
}

/// A CloudEvents attribute value, owned: what binary mode turns into message headers.
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

/// A CloudEvents attribute value as the encoder reads it: borrowed from the event, or a
/// number formatted where it is written, so encoding an envelope without extension
/// attributes allocates nothing.
#[derive(Debug, Clone, Copy)]
enum Attribute<'a> {
    Str(&'a str),
    Integer(i64),
    /// The commit time (microseconds since the Unix epoch) as RFC 3339.
    CommitTime(i64),
    Lsn(Lsn),
    /// The position as 24 hex digits, the `sequence` extension: lexicographic order is
    /// commit order.
    Sequence(Position),
}

impl std::fmt::Display for Attribute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Attribute::Str(s) => f.write_str(s),
            Attribute::Integer(i) => write!(f, "{i}"),
            Attribute::CommitTime(micros) => {
                let time = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
                write!(f, "{}", humantime::format_rfc3339_micros(time))
            }
            Attribute::Lsn(lsn) => write!(f, "{lsn}"),
            Attribute::Sequence(position) => {
                write!(f, "{:016X}{:08X}", position.commit_lsn.0, position.index)
            }
        }
    }
}

impl Attribute<'_> {
    fn to_owned_value(self) -> AttributeValue {
        match self {
            Attribute::Str(s) => AttributeValue::String(s.to_owned()),
            Attribute::Integer(i) => AttributeValue::Integer(i),
            other => AttributeValue::String(other.to_string()),
        }
    }

    /// Appends the value as JSON. Only `Str` can hold characters JSON must escape.
    fn write_json(self, out: &mut Vec<u8>) {
        match self {
            Attribute::Str(s) => push_json_str(out, s),
            Attribute::Integer(i) => push_display(out, i),
            other => {
                out.push(b'"');
                push_display(out, other);
                out.push(b'"');
            }
        }
    }
}

/// How many fixed attributes an event can have (three of them are optional).
const FIXED_ATTRIBUTES: usize = 14;

/// Calls `visit` with every CloudEvents attribute of `event` except `data`, in a stable
/// order: the fixed ones, then the event's extra attributes and headers as extensions,
/// each under a name not taken yet.
fn visit_attributes(event: &Event, mut visit: impl FnMut(&str, Attribute<'_>)) {
    use Attribute::{Integer, Str};
    // The fixed names used so far, kept on the stack: only extension names allocate.
    let mut fixed = [""; FIXED_ATTRIBUTES];
    let mut used = 0;
    let mut fixed_attribute = |name: &'static str, value: Attribute<'_>| {
        fixed[used] = name;
        used += 1;
        visit(name, value);
    };
    fixed_attribute("specversion", Str(CLOUDEVENTS_SPEC_VERSION));
    fixed_attribute("id", Str(&event.id));
    fixed_attribute("source", Str(&event.source));
    fixed_attribute("type", Str(&event.event_type));
    fixed_attribute("subject", Str(&event.aggregate_id));
    match &event.occurred_at {
        Some(time) => fixed_attribute("time", Str(time)),
        None => fixed_attribute("time", Attribute::CommitTime(event.commit_time_micros)),
    }
    fixed_attribute("datacontenttype", Str(event.payload.content_type()));
    fixed_attribute("aggregatetype", Str(&event.aggregate_type));
    if let Some(version) = event.schema_version {
        fixed_attribute("schemaversion", Integer(version));
    }
    if let Some(version) = event.original_schema_version {
        fixed_attribute("originalschemaversion", Integer(version));
    }
    if let Some(traceparent) = &event.traceparent {
        fixed_attribute("traceparent", Str(traceparent));
    }
    fixed_attribute("lsn", Attribute::Lsn(event.position.commit_lsn));
    fixed_attribute("txid", Integer(i64::from(event.xid)));
    fixed_attribute("sequence", Attribute::Sequence(event.position));
    let mut extensions: Vec<String> = Vec::new();
    for (name, value) in event.attributes.iter().chain(&event.headers) {
        let name = extension_name(name);
        if !fixed[..used].contains(&name.as_str()) && !extensions.contains(&name) {
            visit(&name, Str(value));
            extensions.push(name);
        }
    }
}

/// The CloudEvents attributes of `event` except `data`, in a stable order: what binary
/// mode sends as headers (`ce_` / `cloudEvents_` prefixed by the sink).
pub fn attributes(event: &Event) -> Vec<(String, AttributeValue)> {
    let mut attrs = Vec::with_capacity(FIXED_ATTRIBUTES);
    visit_attributes(event, |name, value| {
        attrs.push((name.to_owned(), value.to_owned_value()))
    });
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
    out.reserve(event.payload.len() + 512);
    out.push(b'{');
    let mut first = true;
    visit_attributes(event, |name, value| {
        if !first {
            out.push(b',');
        }
        first = false;
        push_json_str(out, name);
        out.push(b':');
        value.write_json(out);
    });
    match &event.payload {
        Payload::Json(json) => {
            out.extend_from_slice(b",\"data\":");
            push_one_line(out, json.as_bytes());
        }
        Payload::Binary { bytes, .. } => {
            out.extend_from_slice(b",\"data_base64\":\"");
            push_base64(out, bytes);
            out.push(b'"');
        }
        Payload::Tombstone => {}
    }
    out.push(b'}');
}

/// Appends `s` as a JSON string. Most values (ids, names, types) need no escaping: those
/// are copied as they are.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        serde_json::to_writer(out, s).expect("writing a str to a Vec cannot fail");
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

fn push_display(out: &mut Vec<u8>, value: impl std::fmt::Display) {
    use std::io::Write;
    write!(out, "{value}").expect("writing to a Vec cannot fail");
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
            xid: 42,
            commit_time_micros: 1_700_000_000_123_456,
            id: Text::from("0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11"),
            key: Text::from("order-\"1\""),
            aggregate_id: Text::from("order-\"1\""),
            payload: Text::from(r#"{"total": 12}"#).into(),
            ..crate::test_util::sample(lsn, index)
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
    fn cloudevent_line_is_byte_exact_with_extensions_escapes_and_name_collisions() {
        let mut event = sample(0x016B_3748, 7);
        event.schema_version = Some(3);
        event.traceparent = Some(Text::from("00-aa-bb-01"));
        event.attributes = vec![("Region".into(), Text::from("eu\"1"))];
        event.headers = vec![
            ("X-Tenant".into(), Text::from("acme")),
            ("type".into(), Text::from("collides with a fixed attribute")),
            ("x_tenant".into(), Text::from("collides with an extension")),
        ];
        let mut line = Vec::new();
        write_line(Format::CloudEvents, &event, &mut line);
        let expected = concat!(
            r#"{"specversion":"1.0","id":"0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11","#,
            r#""source":"/public.outbox","type":"OrderCreated","subject":"order-\"1\"","#,
            r#""time":"2023-11-14T22:13:20.123456Z","datacontenttype":"application/json","#,
            r#""aggregatetype":"order","schemaversion":3,"traceparent":"00-aa-bb-01","#,
            r#""lsn":"0/16B3748","txid":42,"sequence":"00000000016B374800000007","#,
            r#""region":"eu\"1","xtenant":"acme","data":{"total": 12}}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(line).unwrap(), expected);
        let headers: Vec<String> = attributes(&event)
            .into_iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        assert_eq!(headers[5], "time=2023-11-14T22:13:20.123456Z");
        assert_eq!(headers[8], "schemaversion=3");
        assert_eq!(
            headers[12..],
            [
                "sequence=00000000016B374800000007",
                "region=eu\"1",
                "xtenant=acme"
            ]
        );
    }

    #[test]
    fn sequence_sorts_in_commit_order() {
        let positions = [(1, 9), (2, 0), (2, 1), (0x1_0000_0000, 0)];
        let sequences: Vec<String> = positions
            .iter()
            .map(|&(l, i)| {
                Attribute::Sequence(Position {
                    commit_lsn: Lsn(l),
                    index: i,
                })
                .to_string()
            })
            .collect();
        let mut sorted = sequences.clone();
        sorted.sort();
        assert_eq!(sequences, sorted);
    }

    #[test]
    fn a_payload_with_line_breaks_is_one_line_of_the_same_json_in_every_format() {
        let mut event = sample(1, 0);
        let payload = "{\r\n  \"a\": \"x\\ny\",\n  \"b\": [1,\n2]\n}\n";
        event.payload = Text::from(payload).into();
        for format in [Format::CloudEvents, Format::Debezium, Format::Raw] {
            let mut line = Vec::new();
            write_line(format, &event, &mut line);
            assert_eq!(
                line.iter().filter(|&&b| b == b'\n' || b == b'\r').count(),
                1,
                "{format:?}: {}",
                String::from_utf8_lossy(&line)
            );
            let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let data = if format == Format::CloudEvents {
                &parsed["data"]
            } else {
                &parsed
            };
            assert_eq!(
                *data,
                serde_json::from_str::<serde_json::Value>(payload).unwrap()
            );
        }
        let mut line = Vec::new();
        write_line(Format::CloudEvents, &event, &mut line);
        assert_eq!(
            position_of_line(&line[..line.len() - 1]),
            Some(event.position)
        );
    }

    #[test]
    fn a_binary_payload_is_data_base64_with_its_content_type_and_base64_on_a_raw_line() {
        let mut event = sample(1, 0);
        let bytes: &[u8] = &[0x00, 0xff, b'\n', 0x80, b'"', 0x0d];
        event.payload = Payload::Binary {
            bytes: bytes::Bytes::from_static(bytes),
            content_type: "application/avro".into(),
        };
        let mut line = Vec::new();
        write_line(Format::CloudEvents, &event, &mut line);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["datacontenttype"], "application/avro");
        assert_eq!(parsed["data_base64"], "AP8KgCIN");
        assert!(parsed.get("data").is_none());
        let header = attributes(&event)
            .into_iter()
            .find(|(name, _)| name == "datacontenttype");
        assert_eq!(
            header.map(|(_, value)| value.to_string()).as_deref(),
            Some("application/avro")
        );
        for format in [Format::Debezium, Format::Raw] {
            let mut line = Vec::new();
            write_line(format, &event, &mut line);
            assert_eq!(line, b"AP8KgCIN\n");
        }
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
