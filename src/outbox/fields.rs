//! Column text → event fields: `bytea` hex, `schema_version`, `headers`, and PostgreSQL
//! timestamps → RFC 3339. Each parser returns the reason a value does not fit, for the
//! row's dead letter; none panics on any input.

use bytes::Bytes;
use outbox_relay_sinks::Text;
use std::sync::Arc;

/// Decodes a `bytea` value in its hex text form (`\x` then two hex digits a byte).
pub(super) fn decode_bytea(text: &str) -> Result<Bytes, String> {
    text.strip_prefix("\\x")
        .and_then(decode_hex)
        .map(Bytes::from)
        .ok_or_else(|| {
            "the bytea payload column is not in hex form (\\x…): the relay's connections set \
             bytea_output = hex; if this row was written some other way, report it"
                .to_owned()
        })
}

pub(super) fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub(super) fn parse_schema_version(text: &str) -> Result<i64, String> {
    text.parse().map_err(|_| {
        format!(
            "the schema_version column is not an integer: {:?}",
            truncate(text, 40)
        )
    })
}

pub(super) fn parse_headers(text: &str) -> Result<Vec<(Arc<str>, Text)>, String> {
    let map: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|_| "the headers column is not a JSON object".to_owned())?;
    map.into_iter()
        .map(|(name, value)| match value {
            serde_json::Value::String(s) => Ok((Arc::from(name), Text::from(s))),
            _ => Err(format!(
                "header {name:?} is not a string: headers must be an object of strings"
            )),
        })
        .collect()
}

/// Converts PostgreSQL's ISO timestamp output (`2026-11-22 22:39:38.658915+00`, or without
/// an offset for `timestamp`) to RFC 3339 (`2026-11-22T22:39:38.658915Z`). The relay's
/// connections pin `DateStyle=ISO`, so that is the form that arrives. An offset with seconds
/// (`+00:19:32`: local mean time, before time zones were standardised), which RFC 3339
/// cannot write, is converted to the same instant in UTC.
pub fn pg_timestamp_to_rfc3339(text: &str) -> Option<String> {
    let (date, time) = text.split_once(' ')?;
    let date_ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !date_ok {
        return None;
    }
    let (clock, offset) = match time.find(['+', '-']) {
        Some(at) => time.split_at(at),
        None => (time, ""),
    };
    let clock_ok = clock.len() >= 8
        && clock.bytes().enumerate().all(|(i, b)| match i {
            2 | 5 => b == b':',
            8 => b == b'.',
            _ => b.is_ascii_digit(),
        });
    if !clock_ok {
        return None;
    }
    let offset = match offset {
        "" | "+00" | "-00" | "+00:00" => "Z".to_owned(),
        o if o.len() == 3 => format!("{o}:00"),
        o if o.len() == 6 => o.to_owned(),
        o if o.len() == 9 => return in_utc(date, clock, o),
        _ => return None,
    };
    Some(format!("{date}T{clock}{offset}"))
}

/// The RFC 3339 UTC form of a local `date` (`YYYY-MM-DD`) and `clock` (`HH:MM:SS[.frac]`),
/// both checked by the caller, at an `offset` of `±HH:MM:SS`.
pub(super) fn in_utc(date: &str, clock: &str, offset: &str) -> Option<String> {
    use chrono::{Datelike, Timelike};
    let number = |s: &str| -> Option<u32> {
        s.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let sign = match offset.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let o = offset.as_bytes();
    if o[3] != b':' || o[6] != b':' {
        return None;
    }
    let offset_seconds =
        number(&offset[1..3])? * 3600 + number(&offset[4..6])? * 60 + number(&offset[7..9])?;
    let local = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(number(&date[..4])?).ok()?,
        number(&date[5..7])?,
        number(&date[8..10])?,
    )?
    .and_hms_opt(
        number(&clock[..2])?,
        number(&clock[3..5])?,
        number(&clock[6..8])?,
    )?;
    let utc = local - chrono::TimeDelta::seconds(sign * i64::from(offset_seconds));
    (0..=9999).contains(&utc.year()).then(|| {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{}Z",
            utc.year(),
            utc.month(),
            utc.day(),
            utc.hour(),
            utc.minute(),
            utc.second(),
            &clock[8..]
        )
    })
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
