//! The JSON line the stdout and file sinks write for an event: the outbox columns plus the
//! event's source position, so a line is self-describing and a file can be resumed from its
//! last line.

use crate::{Event, Lsn, Position};
use serde::Deserialize;
use std::time::{Duration, UNIX_EPOCH};

/// Appends `event` as one JSON object and a newline to `out`.
pub fn write_json_line(event: &Event, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"id\":");
    push_json_str(out, &event.id);
    out.extend_from_slice(b",\"aggregatetype\":");
    push_json_str(out, &event.aggregate_type);
    out.extend_from_slice(b",\"aggregateid\":");
    push_json_str(out, &event.key);
    out.extend_from_slice(b",\"type\":");
    push_json_str(out, &event.event_type);
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(event.payload.as_bytes());
    out.extend_from_slice(b",\"table\":");
    push_json_str(out, &event.table);
    out.extend_from_slice(b",\"lsn\":\"");
    out.extend_from_slice(event.position.commit_lsn.to_string().as_bytes());
    out.extend_from_slice(b"\",\"index\":");
    out.extend_from_slice(event.position.index.to_string().as_bytes());
    out.extend_from_slice(b",\"xid\":");
    out.extend_from_slice(event.xid.to_string().as_bytes());
    out.extend_from_slice(b",\"committed_at\":\"");
    let committed = UNIX_EPOCH + Duration::from_micros(event.commit_time_micros.max(0) as u64);
    out.extend_from_slice(
        humantime::format_rfc3339_micros(committed)
            .to_string()
            .as_bytes(),
    );
    out.extend_from_slice(b"\"}\n");
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a str to a Vec cannot fail");
}

/// Reads the source position back from a line written by [`write_json_line`].
pub fn position_of_line(line: &[u8]) -> Option<Position> {
    #[derive(Deserialize)]
    struct Located<'a> {
        lsn: &'a str,
        index: u32,
    }
    let located: Located = serde_json::from_slice(line).ok()?;
    let commit_lsn: Lsn = located.lsn.parse().ok()?;
    Some(Position {
        commit_lsn,
        index: located.index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Text;

    #[test]
    fn line_round_trips_its_position_and_escapes_text() {
        let event = Event {
            position: Position {
                commit_lsn: Lsn(0x1_6B37_48),
                index: 7,
            },
            xid: 42,
            commit_time_micros: 1_700_000_000_123_456,
            table: "public.outbox".into(),
            id: Text::from("0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11"),
            key: Text::from("order-\"1\""),
            aggregate_type: Text::from("order"),
            event_type: Text::from("created"),
            payload: Text::from(r#"{"total": 12}"#),
        };
        let mut line = Vec::new();
        write_json_line(&event, &mut line);
        assert_eq!(line.last(), Some(&b'\n'));
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["aggregateid"], "order-\"1\"");
        assert_eq!(parsed["payload"]["total"], 12);
        assert_eq!(parsed["lsn"], "0/16B3748");
        assert_eq!(parsed["committed_at"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(position_of_line(&line), Some(event.position));
    }
}
