//! A stream entry for an event: its id (the event's position) and its fields.
//!
//! Invariant: the entry id is `<commit LSN>-<index in the transaction>`, so ids grow in
//! commit order, per stream too. Redis refuses an `XADD` whose id is not above the stream's
//! last one: a repeat after a crash is refused, not added twice.

use crate::format::{self, Format};
use crate::{Event, Lsn, Position};
use std::borrow::Cow;

/// The stream entry id of `position`.
pub fn entry_id(position: Position) -> String {
    format!("{}-{}", position.commit_lsn.0, position.index)
}

/// The position an entry id stands for, if it is one of the relay's.
pub fn position_of(id: &str) -> Option<Position> {
    let (lsn, index) = id.split_once('-')?;
    let position = Position {
        commit_lsn: Lsn(lsn.parse().ok()?),
        index: index.parse().ok()?,
    };
    (position.commit_lsn.0 > 0).then_some(position)
}

/// The fields of an event's entry, in order: `id`, `key`, `type`, `aggregatetype`,
/// `aggregateid`, `traceparent` (when set), one `header:<name>` per header, then `event`:
/// the event in `format` (the CloudEvents envelope, or the payload), written into `line`
/// (a buffer the caller reuses). The values borrow the event's text.
pub fn fields<'a>(
    event: &'a Event,
    format: Format,
    line: &'a mut Vec<u8>,
) -> Vec<(Cow<'static, str>, &'a [u8])> {
    let mut fields: Vec<(Cow<'static, str>, &'a [u8])> = vec![
        ("id".into(), event.id.as_bytes()),
        ("key".into(), event.key.as_bytes()),
        ("type".into(), event.event_type.as_bytes()),
        ("aggregatetype".into(), event.aggregate_type.as_bytes()),
        ("aggregateid".into(), event.aggregate_id.as_bytes()),
    ];
    if let Some(traceparent) = &event.traceparent {
        fields.push(("traceparent".into(), traceparent.as_bytes()));
    }
    for (name, value) in &event.headers {
        fields.push((format!("header:{name}").into(), value.as_bytes()));
    }
    line.clear();
    format::write_line(format, event, line);
    line.pop();
    fields.push(("event".into(), line.as_slice()));
    fields
}

/// The bytes of an entry as the size limit counts them: field names and values.
pub fn size(fields: &[(Cow<'static, str>, &[u8])]) -> usize {
    fields
        .iter()
        .map(|(name, value)| name.len() + value.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::sample;

    #[test]
    fn an_entry_id_is_the_position_and_back() {
        let position = sample(0x16B_3748, 7).position;
        assert_eq!(entry_id(position), "23803720-7");
        assert_eq!(position_of("23803720-7"), Some(position));
        assert_eq!(position_of("0-0"), None);
        assert_eq!(position_of("1700000000000"), None);
    }

    #[test]
    fn the_fields_name_the_event_and_carry_its_envelope_last() {
        let mut event = sample(1, 0);
        event.headers = vec![("tenant".into(), crate::Text::from("acme"))];
        let mut line = Vec::new();
        let fields = fields(&event, Format::CloudEvents, &mut line);
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(
            names,
            [
                "id",
                "key",
                "type",
                "aggregatetype",
                "aggregateid",
                "header:tenant",
                "event"
            ]
        );
        let envelope: serde_json::Value = serde_json::from_slice(fields[6].1).unwrap();
        assert_eq!(envelope["id"], &*event.id);
        assert_eq!(size(&fields[..1]), 2 + event.id.len());
    }
}
