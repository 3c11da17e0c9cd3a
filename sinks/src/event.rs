//! The event that crosses the sink seam, and the source position that orders it.
//!
//! Text fields are [`Text`]: UTF-8-checked slices of the replication receive buffer, so
//! building an event copies no row data.
//!
//! The payload is a [`Payload`]: a JSON document, bytes (a `bytea` column: Avro, Protobuf,
//! …, with the content type the table's mapping names), or none at all (a tombstone). A
//! tombstone
//! exists only for tables with `on_null_payload = "tombstone"`, and the configuration refuses
//! that unless every sink that takes the table's events is a Kafka sink, which writes it as
//! a record with a null value. So no other sink receives one; were one to arrive anyway, the
//! line-based sinks write JSON `null`, RabbitMQ an empty body, and EventBridge rejects it
//! (dead letter): never a drop.

use bytes::Bytes;
use std::fmt;
use std::sync::Arc;

/// A PostgreSQL write-ahead-log position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;

    /// Parses PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid LSN {s:?}: expected the form 16/B374D848"))?;
        let parse = |part: &str| {
            u32::from_str_radix(part, 16)
                .map_err(|_| format!("invalid LSN {s:?}: {part:?} is not hex"))
        };
        Ok(Lsn((u64::from(parse(hi)?) << 32) | u64::from(parse(lo)?)))
    }
}

/// Where an event sits in the source's total order: the commit LSN of its transaction, then
/// its index among the transaction's outbox events. Ordering positions is ordering commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub index: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.index)
    }
}

impl std::str::FromStr for Position {
    type Err = String;

    /// Parses the `16/B374D848#3` form [`Position`]'s `Display` writes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lsn, index) = s
            .split_once('#')
            .ok_or_else(|| format!("invalid position {s:?}: expected the form 16/B374D848#3"))?;
        Ok(Position {
            commit_lsn: lsn.parse()?,
            index: index
                .parse()
                .map_err(|_| format!("invalid position {s:?}: {index:?} is not an index"))?,
        })
    }
}

/// UTF-8 text sharing the buffer it was received in.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Text(Bytes);

impl Text {
    /// Wraps `bytes` if they are valid UTF-8.
    pub fn new(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: `Text::new` and `From<&str>`/`From<String>` are the only constructors and
        // both guarantee UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s))
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an event carries as its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A JSON document (checked by the mapper, or `jsonb`).
    Json(Text),
    /// Bytes from a `bytea` column, decoded: any content, described by `content_type` (the
    /// CloudEvents `datacontenttype`). Never validated against a JSON Schema.
    Binary {
        bytes: Bytes,
        content_type: Arc<str>,
    },
    /// No payload: the row's payload column was NULL under `on_null_payload = "tombstone"`
    /// (Debezium's `route.tombstone.on.empty.payload`), for compacted Kafka topics.
    Tombstone,
}

impl Payload {
    /// The payload's bytes: empty for a tombstone.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Json(text) => text.as_bytes(),
            Payload::Binary { bytes, .. } => bytes,
            Payload::Tombstone => &[],
        }
    }

    /// The CloudEvents `datacontenttype` of the payload.
    pub fn content_type(&self) -> &str {
        match self {
            Payload::Binary { content_type, .. } => content_type,
            Payload::Json(_) | Payload::Tombstone => "application/json",
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The JSON document, unless the event has no JSON payload.
    pub fn as_json(&self) -> Option<&Text> {
        match self {
            Payload::Json(text) => Some(text),
            Payload::Binary { .. } | Payload::Tombstone => None,
        }
    }
}

impl From<Text> for Payload {
    fn from(text: Text) -> Self {
        Payload::Json(text)
    }
}

/// One committed outbox row (or transactional logical message), ready to publish.
#[derive(Debug, Clone)]
pub struct Event {
    pub position: Position,
    /// Transaction id of the writing transaction.
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
    /// Where it came from: `schema.table`, or `message:PREFIX` for a logical message.
    pub table: Arc<str>,
    /// The CloudEvents `source` of events from that table.
    pub source: Arc<str>,
    /// The event id: stable across redeliveries, for consumer-side dedup.
    pub id: Text,
    /// The message key: what per-key ordering means (the aggregate id by default).
    pub key: Text,
    pub aggregate_type: Text,
    pub aggregate_id: Text,
    pub event_type: Text,
    /// The version of the event's own schema, when the outbox has one.
    pub schema_version: Option<i64>,
    /// The version the outbox row was stored at, when the relay upcast the payload to
    /// `schema_version` for this sink (`[sinks.NAME.upcast]`); `None` when published as
    /// stored. Sinks carry it next to `schema_version` (`originalschemaversion`).
    pub original_schema_version: Option<i64>,
    /// When the event happened (RFC 3339), when the outbox says; otherwise the commit time
    /// stands in.
    pub occurred_at: Option<Text>,
    /// W3C trace context, passed on as a message header.
    pub traceparent: Option<Text>,
    /// Message headers: the outbox's headers object and columns placed in headers.
    pub headers: Vec<(Arc<str>, Text)>,
    /// Extra envelope attributes: columns placed in the envelope.
    pub attributes: Vec<(Arc<str>, Text)>,
    pub payload: Payload,
    /// The one sink this event is for: a replayed dead letter that one sink refused goes to
    /// that sink only (`outbox-relay dlq replay`); None for every other event.
    pub only_sink: Option<Arc<str>>,
}

impl Event {
    /// The bytes of the row's values it carries (payload, headers, attributes, ids): what the
    /// relay's batch byte limit counts. A sink's envelope around them is not counted.
    pub fn size_bytes(&self) -> usize {
        let texts = [
            &self.id,
            &self.key,
            &self.aggregate_type,
            &self.aggregate_id,
            &self.event_type,
        ];
        let optional = [&self.occurred_at, &self.traceparent];
        texts.iter().map(|text| text.len()).sum::<usize>()
            + self.payload.len()
            + optional
                .iter()
                .flat_map(|text| text.as_ref())
                .map(|text| text.len())
                .sum::<usize>()
            + self
                .headers
                .iter()
                .chain(&self.attributes)
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }
}
