//! Dead letters: what the mapper (or a sink) could not turn into an event, with the reason
//! and the row as it arrived, ready for the dead-letter store.
//!
//! Invariant: the exact bytes survive. `row_data` is jsonb-safe (lossy where it must be);
//! whenever it is lossy, `raw` holds the exact columns ([`frame_columns`]).

use super::fields::encode_hex;
use crate::row::{Table, Value};
use outbox_relay_sinks::{Event, Payload, Position};

/// A row that could not become an event, kept with its reason and its raw columns.
///
/// `reason` may quote the row's values (a timestamp that does not parse, a validation
/// error): it goes to the dead-letter store, which holds the row anyway, and never to a log.
/// Logs say `kind`, a few fixed words without values.
///
/// The dead-letter store takes any bytes: `row` is what `jsonb` can hold (see
/// [`DeadLetter::storable`]), and whenever that rendering is not exact (bytes that are not
/// UTF-8, NUL characters, which `jsonb` refuses) the exact bytes go along in `raw`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub table: String,
    pub position: Position,
    pub xid: u32,
    /// What went wrong, without values: what logs say.
    pub kind: &'static str,
    /// What went wrong, in detail, values and all: stored, never logged.
    pub reason: String,
    /// Column name → text value (or null), as received; for messages, the content. Bytes
    /// that are not UTF-8 are replaced by U+FFFD (and `raw` is set).
    pub row: serde_json::Value,
    /// The exact bytes when `row` is not exact: for a message (`row` is a string), its
    /// content; for a row (`row` is an object), its columns in the [`frame_columns`] layout.
    pub raw: Option<Vec<u8>>,
    /// The sink that refused it; `None` when the row could not be mapped at all.
    pub sink: Option<String>,
}

/// The key that marks a dead letter's `row_data` as the event document of an event refused
/// after mapping (by validation or a sink), rather than the columns of a row the mapping
/// refused: `dlq replay` publishes such a document as it is (after a fix), headers, key and
/// schema version included, whatever the table's column names.
pub const EVENT_DOCUMENT: &str = "outbox_relay_event";

impl DeadLetter {
    /// A dead letter for an event whose payload fails its JSON Schema (streamed or
    /// backfilled alike).
    pub fn invalid_payload(event: &Event, reason: String) -> Self {
        Self::from_event(event, "payload fails validation", reason, None)
    }

    /// A dead letter for an event refused after mapping (by validation or by a sink).
    pub fn from_event(
        event: &Event,
        kind: &'static str,
        reason: String,
        sink: Option<String>,
    ) -> Self {
        DeadLetter {
            table: event.table.to_string(),
            position: event.position,
            xid: event.xid,
            kind,
            reason,
            row: serde_json::json!({
                EVENT_DOCUMENT: true,
                "id": &*event.id,
                "key": &*event.key,
                "aggregatetype": &*event.aggregate_type,
                "aggregateid": &*event.aggregate_id,
                "type": &*event.event_type,
                "payload": match &event.payload {
                    Payload::Json(json) => Some(json.to_string()),
                    Payload::Binary { bytes, .. } => Some(format!("\\x{}", encode_hex(bytes))),
                    Payload::Tombstone => None,
                },
                "schema_version": event.schema_version,
                "headers": event
                    .headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), serde_json::json!(&**value)))
                    .collect::<serde_json::Map<_, _>>(),
                "occurred_at": event.occurred_at.as_deref(),
                "traceparent": event.traceparent.as_deref(),
            }),
            raw: None,
            sink,
        }
    }

    /// The `row_data` and `raw` to store: `row` with every NUL character (which `jsonb`
    /// refuses, as `\u0000`) replaced by U+FFFD, and `raw` holding the exact bytes when
    /// that changed anything.
    pub fn storable(&self) -> (serde_json::Value, Option<Vec<u8>>) {
        let mut row = self.row.clone();
        let replaced = replace_nul(&mut row);
        let raw = match (&self.raw, replaced) {
            (Some(raw), _) => Some(raw.clone()),
            (None, false) => None,
            (None, true) => Some(match &self.row {
                serde_json::Value::String(content) => content.as_bytes().to_vec(),
                serde_json::Value::Object(columns) => {
                    frame_columns(columns.iter().map(|(name, value)| {
                        let bytes = match value {
                            serde_json::Value::Null => None,
                            serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
                            other => Some(other.to_string().into_bytes()),
                        };
                        (name.as_str(), bytes)
                    }))
                }
                other => other.to_string().into_bytes(),
            }),
        };
        (row, raw)
    }
}

/// Replaces NUL in every string and key of `value` by U+FFFD; returns whether it did.
fn replace_nul(value: &mut serde_json::Value) -> bool {
    const REPLACEMENT: &str = "\u{FFFD}";
    match value {
        serde_json::Value::String(s) if s.contains('\0') => {
            *s = s.replace('\0', REPLACEMENT);
            true
        }
        serde_json::Value::Array(items) => items.iter_mut().fold(false, |r, v| replace_nul(v) | r),
        serde_json::Value::Object(map) => {
            let mut replaced = false;
            if map.keys().any(|k| k.contains('\0')) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (k.replace('\0', REPLACEMENT), v))
                    .collect();
                replaced = true;
            }
            map.values_mut().fold(replaced, |r, v| replace_nul(v) | r)
        }
        _ => false,
    }
}

/// A row's columns as exact bytes: for each column, its name, a NUL byte, then a 4-byte
/// big-endian length and that many bytes of value, or `FF FF FF FF` for NULL.
/// [`unframe_columns`] reads it back.
pub fn frame_columns<'a>(columns: impl Iterator<Item = (&'a str, Option<Vec<u8>>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in columns {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        match value {
            Some(bytes) => {
                out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                out.extend_from_slice(&bytes);
            }
            None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
    }
    out
}

/// Reads [`frame_columns`] back: (name, value) pairs; `None` if `raw` is not in that layout.
pub fn unframe_columns(mut raw: &[u8]) -> Option<Vec<(String, Option<Vec<u8>>)>> {
    let mut columns = Vec::new();
    while !raw.is_empty() {
        let end = raw.iter().position(|&b| b == 0)?;
        let name = String::from_utf8_lossy(&raw[..end]).into_owned();
        let len: [u8; 4] = raw.get(end + 1..end + 5)?.try_into().ok()?;
        raw = &raw[end + 5..];
        let len = u32::from_be_bytes(len);
        if len == u32::MAX {
            columns.push((name, None));
        } else {
            let len = len as usize;
            columns.push((name, Some(raw.get(..len)?.to_vec())));
            raw = &raw[len..];
        }
    }
    Some(columns)
}

/// The row as a JSON object of column name → text (lossy for non-UTF-8 bytes) or null, and
/// when it is lossy, the exact bytes in the [`frame_columns`] layout.
pub(super) fn raw_row(
    relation: &Table,
    values: &[Value<'_>],
) -> (serde_json::Value, Option<Vec<u8>>) {
    let mut row = serde_json::Map::new();
    let mut lossy = false;
    let names: Vec<String> = (0..values.len())
        .map(|i| {
            relation
                .columns
                .get(i)
                .map_or_else(|| format!("column{i}"), |c| c.name.clone())
        })
        .collect();
    for (name, value) in names.iter().zip(values) {
        let value = match value {
            Value::Text(bytes) | Value::Binary(bytes) => {
                lossy |= std::str::from_utf8(bytes).is_err();
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
            Value::Null | Value::UnchangedToast => serde_json::Value::Null,
        };
        row.insert(name.clone(), value);
    }
    let raw = lossy.then(|| {
        frame_columns(names.iter().zip(values).map(|(name, value)| {
            let bytes = match value {
                Value::Text(bytes) | Value::Binary(bytes) => Some(bytes.to_vec()),
                Value::Null | Value::UnchangedToast => None,
            };
            (name.as_str(), bytes)
        }))
    });
    (serde_json::Value::Object(row), raw)
}
