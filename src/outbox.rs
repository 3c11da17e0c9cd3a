//! Outbox mapping: turns an insert on an outbox table, or a transactional logical message
//! with a configured prefix, into an [`Event`], or into a [`DeadLetter`] that says why it
//! cannot be one. Column positions are resolved once per Relation message (so ALTER TABLE
//! mid-stream is picked up), never per row.
//!
//! The default table layout is Debezium's outbox router convention:
//! `id uuid, aggregatetype text, aggregateid text, type text, payload jsonb`, with the optional
//! columns `schema_version`, `headers`, `occurred_at` and `traceparent` used when present.

use crate::config::{
    mapping_in, parse_table_name, ChangePolicy, NullPayloadPolicy, Placement, TableMapping,
};
use crate::row::{Message, Row, Table, Value};
use bytes::Bytes;
use outbox_relay_sinks::routing::Template;
use outbox_relay_sinks::{Event, Payload, Position, Text};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

const JSONB_OID: u32 = 3802;
const BYTEA_OID: u32 = 17;
/// The logical-message prefix `outbox-relay dlq replay` publishes fixed dead letters with;
/// always read, whatever `source.message_prefixes` says, and mapped only when its signature
/// verifies (see [`ReplayKey`]).
pub const REPLAY_PREFIX: &str = "outbox-relay-replay";

/// The key `dlq replay` signs its messages with (HMAC-SHA256), kept in the relay's schema
/// (`replay_key`, readable by the relay's role and the schema's owner only). Any role that can
/// connect may call `pg_logical_emit_message`, so a replay message is an event only when its
/// signature proves it was written by someone who can read the key: a forged one, whatever
/// table it names, is dead-lettered.
#[derive(Clone)]
pub struct ReplayKey(ring::hmac::Key);

impl ReplayKey {
    pub fn new(secret: &[u8]) -> Self {
        ReplayKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The content of a replay message: the event document and its signature.
    pub fn sign(&self, document: &serde_json::Value) -> String {
        let event = document.to_string();
        let tag = ring::hmac::sign(&self.0, event.as_bytes());
        let mac = encode_hex(tag.as_ref());
        format!("{{\"mac\":\"{mac}\",\"event\":{event}}}")
    }

    /// The signed event document inside a replay message, if the signature verifies.
    fn verify<'a>(&self, envelope: &ReplayEnvelope<'a>) -> Option<&'a [u8]> {
        let event = envelope.event.get().as_bytes();
        let mac = decode_hex(&envelope.mac)?;
        ring::hmac::verify(&self.0, event, &mac).ok()?;
        Some(event)
    }
}

/// A replay message's content.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayEnvelope<'a> {
    mac: String,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
}

/// Decodes a `bytea` value in its hex text form (`\x` then two hex digits a byte).
fn decode_bytea(text: &str) -> Result<Bytes, String> {
    text.strip_prefix("\\x")
        .and_then(decode_hex)
        .map(Bytes::from)
        .ok_or_else(|| {
            "the bytea payload column is not in hex form (\\x…): the relay's connections set \
             bytea_output = hex; if this row was written some other way, report it"
                .to_owned()
        })
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where a row sits and which transaction wrote it.
#[derive(Debug, Clone, Copy)]
pub struct RowContext {
    pub position: Position,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
}

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

impl DeadLetter {
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
                "id": &*event.id,
                "aggregatetype": &*event.aggregate_type,
                "aggregateid": &*event.aggregate_id,
                "type": &*event.event_type,
                "payload": match &event.payload {
                    Payload::Json(json) => Some(json.to_string()),
                    Payload::Binary { bytes, .. } => Some(format!("\\x{}", encode_hex(bytes))),
                    Payload::Tombstone => None,
                },
                "schema_version": event.schema_version,
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

/// What to do with a decoded change.
pub enum Mapped {
    Event(Box<Event>),
    DeadLetter(DeadLetter),
    /// A row of the table (`schema.table`) whose payload is NULL, under
    /// `on_null_payload = "skip"`: counted, not published.
    NullPayloadSkipped(Arc<str>),
    /// Not from an outbox table or prefix: nothing to publish.
    NotOutbox,
}

/// A configured outbox table: its mapping and the parsed CloudEvents source.
struct OutboxTable {
    mapping: TableMapping,
    source: Template,
    /// The mapping's content type of `bytea` payloads, shared by the table's events.
    content_type: Arc<str>,
}

/// What the mapper knows about one relation of the stream.
struct RelationInfo {
    table: Table,
    /// `schema.name`, shared by every event of the table.
    qualified: Arc<str>,
    /// `None` when the relation is not a configured outbox table.
    outbox: Option<(Arc<OutboxTable>, Result<Layout, String>)>,
    /// The CloudEvents source when it is the same for every event of the table.
    fixed_source: Option<Arc<str>>,
}

/// What the payload column holds, by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadKind {
    /// `jsonb`: JSON already.
    Jsonb,
    /// `bytea`: bytes, in the text form `\x` + hex (the relay's connections pin
    /// `bytea_output = hex`).
    Bytea,
    /// Any other type (`json`, `text`, …): text that must be JSON.
    JsonText,
}

/// Positions of the mapped columns within the relation.
struct Layout {
    id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_kind: PayloadKind,
    key: usize,
    schema_version: Option<usize>,
    headers: Option<usize>,
    occurred_at: Option<usize>,
    traceparent: Option<usize>,
    additional: Vec<(usize, Placement, Arc<str>)>,
}

impl Layout {
    fn resolve(relation: &Table, mapping: &TableMapping) -> Result<Layout, String> {
        let position = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let find = |name: &str, role: &str| {
            position(name).ok_or_else(|| {
                format!(
                    "outbox table {}.{} has no column {name:?} (the {role} column; see [outbox] in the configuration)",
                    relation.schema, relation.name
                )
            })
        };
        // Optional columns: a configured name must exist; the default name is used if present.
        let optional = |configured: &Option<String>, default: &str, role: &str| match configured {
            Some(name) => find(name, role).map(Some),
            None => Ok(position(default)),
        };
        let id = find(&mapping.id, "id")?;
        let payload = find(&mapping.payload, "payload")?;
        let aggregate_id = find(&mapping.aggregate_id, "aggregate id")?;
        let additional = mapping
            .additional
            .iter()
            .map(|extra| {
                let name: Arc<str> = extra.name.as_deref().unwrap_or(&extra.column).into();
                find(&extra.column, "additional").map(|index| (index, extra.placement, name))
            })
            .collect::<Result<_, _>>()?;
        Ok(Layout {
            id,
            aggregate_type: find(&mapping.aggregate_type, "aggregate type")?,
            aggregate_id,
            event_type: find(&mapping.event_type, "type")?,
            payload,
            payload_kind: match relation.columns[payload].type_oid {
                JSONB_OID => PayloadKind::Jsonb,
                BYTEA_OID => PayloadKind::Bytea,
                _ => PayloadKind::JsonText,
            },
            key: match &mapping.key {
                Some(name) => find(name, "key")?,
                None => aggregate_id,
            },
            schema_version: optional(&mapping.schema_version, "schema_version", "schema version")?,
            headers: optional(&mapping.headers, "headers", "headers")?,
            occurred_at: optional(&mapping.occurred_at, "occurred_at", "occurred-at")?,
            traceparent: optional(&mapping.traceparent, "traceparent", "traceparent")?,
            additional,
        })
    }
}

/// An UPDATE or DELETE on an outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowChange {
    Update,
    Delete,
}

/// Maps rows of the configured outbox tables, and logical messages with the configured
/// prefixes, to events.
pub struct OutboxMapper {
    tables: HashMap<(String, String), Arc<OutboxTable>>,
    relations: HashMap<u32, RelationInfo>,
    /// Prefix → the `message:PREFIX` name its events carry as their table.
    message_prefixes: HashMap<String, (Arc<str>, Arc<str>)>,
    /// Verifies replay messages; without it every replay message is dead-lettered.
    replay_key: Option<ReplayKey>,
}

impl OutboxMapper {
    /// `tables` as `schema.table` with their mappings (validated by the config).
    pub fn new(
        tables: &[String],
        mappings: &std::collections::BTreeMap<String, TableMapping>,
        message_prefixes: &[String],
    ) -> Self {
        let mut configured = HashMap::new();
        for table in tables {
            let Ok(names) = parse_table_name(table) else {
                continue;
            };
            let mapping = mapping_in(mappings, table);
            let source = Template::parse(&mapping.source).unwrap_or_else(|_| {
                Template::parse("/{table}").expect("the default source template is valid")
            });
            let content_type = mapping.content_type.as_str().into();
            configured.insert(
                names,
                Arc::new(OutboxTable {
                    mapping,
                    source,
                    content_type,
                }),
            );
        }
        let message_prefixes = message_prefixes
            .iter()
            .chain(std::iter::once(&REPLAY_PREFIX.to_owned()))
            .map(|p| {
                let table: Arc<str> = format!("message:{p}").into();
                let source: Arc<str> = format!("/{table}").into();
                (p.clone(), (table, source))
            })
            .collect();
        OutboxMapper {
            tables: configured,
            relations: HashMap::new(),
            message_prefixes,
            replay_key: None,
        }
    }

    /// The key replay messages must be signed with (`None`: the relay's schema has none yet).
    pub fn with_replay_key(mut self, key: Option<ReplayKey>) -> Self {
        self.replay_key = key;
        self
    }

    /// Records a table's shape (the stream sends it before the first change of a table in a
    /// session, and again whenever the table's definition changed).
    pub fn on_relation(&mut self, relation: Table) {
        let table = (relation.schema.clone(), relation.name.clone());
        self.record(relation, table);
    }

    /// Records the shape of a relation whose rows are those of the configured outbox table
    /// `table` (`schema`, `name`) under another name: a partition of it, or the table itself
    /// renamed. Its events carry the configured table's name.
    pub fn on_relation_as(&mut self, relation: Table, table: (String, String)) {
        self.record(relation, table);
    }

    /// Whether `schema.table` is a configured outbox table.
    pub fn is_configured(&self, schema: &str, table: &str) -> bool {
        self.tables
            .contains_key(&(schema.to_owned(), table.to_owned()))
    }

    fn record(&mut self, relation: Table, table: (String, String)) {
        let outbox = self.tables.get(&table).map(|configured| {
            (
                configured.clone(),
                Layout::resolve(&relation, &configured.mapping),
            )
        });
        let qualified: Arc<str> = format!("{}.{}", table.0, table.1).into();
        let fixed_source = outbox
            .as_ref()
            .and_then(|(table, _)| table.source.render_for_table(&qualified))
            .map(Arc::from);
        self.relations.insert(
            relation.id,
            RelationInfo {
                table: relation,
                qualified,
                outbox,
                fixed_source,
            },
        );
    }

    /// The `schema.table` of a relation seen in this session.
    pub fn table_name(&self, relation_id: u32) -> Option<&str> {
        self.relations.get(&relation_id).map(|r| &*r.qualified)
    }

    pub fn is_outbox(&self, relation_id: u32) -> bool {
        self.relations
            .get(&relation_id)
            .is_some_and(|r| r.outbox.is_some())
    }

    /// The policy for an UPDATE or DELETE on `relation_id`; `None` if it is not an outbox.
    pub fn change_policy(&self, relation_id: u32, change: RowChange) -> Option<ChangePolicy> {
        let (table, _) = self.relations.get(&relation_id)?.outbox.as_ref()?;
        Some(match change {
            RowChange::Update => table.mapping.on_update,
            RowChange::Delete => table.mapping.on_delete,
        })
    }

    /// The dead letter for an UPDATE or DELETE whose policy is `dead-letter`.
    pub fn change_dead_letter(
        &self,
        relation_id: u32,
        change: RowChange,
        values: &[Value<'_>],
        ctx: RowContext,
    ) -> DeadLetter {
        let info = &self.relations[&relation_id];
        let (row, raw) = raw_row(&info.table, values);
        DeadLetter {
            table: info.qualified.to_string(),
            position: ctx.position,
            xid: ctx.xid,
            kind: if change == RowChange::Update {
                "update of an outbox row"
            } else {
                "delete of an outbox row"
            },
            reason: format!(
                "{} of an outbox row is not an event (on_{} = \"dead-letter\")",
                if change == RowChange::Update {
                    "UPDATE"
                } else {
                    "DELETE"
                },
                if change == RowChange::Update {
                    "update"
                } else {
                    "delete"
                },
            ),
            row,
            raw,
            sink: None,
        }
    }

    /// Maps an inserted row; its text fields become shared slices of its frame, not copies.
    pub fn map_insert(
        &self,
        relation_id: u32,
        row: Row<'_>,
        ctx: RowContext,
    ) -> Result<Mapped, UnknownRelation> {
        let info = self
            .relations
            .get(&relation_id)
            .ok_or(UnknownRelation(relation_id))?;
        let Some((table, layout)) = &info.outbox else {
            return Ok(Mapped::NotOutbox);
        };
        let dead = |reason: String| {
            let (row, raw) = raw_row(&info.table, row.values);
            Mapped::DeadLetter(DeadLetter {
                table: info.qualified.to_string(),
                position: ctx.position,
                xid: ctx.xid,
                kind: "outbox row does not map to an event",
                reason,
                row,
                raw,
                sink: None,
            })
        };
        let layout = match layout {
            Ok(layout) => layout,
            Err(reason) => return Ok(dead(reason.clone())),
        };
        if row.values.len() != info.table.columns.len() {
            return Ok(dead(format!(
                "row has {} columns but the relation has {}",
                row.values.len(),
                info.table.columns.len()
            )));
        }
        if table.mapping.on_null_payload == NullPayloadPolicy::Skip
            && matches!(row.values[layout.payload], Value::Null)
        {
            return Ok(Mapped::NullPayloadSkipped(info.qualified.clone()));
        }
        let column = |index: usize| -> Result<Option<Text>, String> {
            let name = &info.table.columns[index].name;
            match row.values[index] {
                Value::Text(bytes) => Text::new(row.frame.slice_ref(bytes))
                    .map(Some)
                    .map_err(|e| format!("column {name:?} is not valid UTF-8: {e}")),
                Value::Null => Ok(None),
                Value::UnchangedToast => {
                    Err(format!("column {name:?} was not sent (unchanged TOAST)"))
                }
                Value::Binary(_) => Err(format!("column {name:?} arrived in binary format")),
            }
        };
        let required = |index: usize| -> Result<Text, String> {
            column(index)?
                .ok_or_else(|| format!("column {:?} is NULL", info.table.columns[index].name))
        };
        let optional = |index: Option<usize>| -> Result<Option<Text>, String> {
            index.map_or(Ok(None), column)
        };
        let event = (|| {
            let id = required(layout.id)?;
            // Any text names an event (uuid, bigserial, ULID, …), but an empty one cannot.
            if id.trim().is_empty() {
                return Err("the id column is empty: consumers could not dedup on it".to_owned());
            }
            let payload = match column(layout.payload)? {
                Some(payload) => match layout.payload_kind {
                    PayloadKind::Jsonb => Payload::Json(payload),
                    PayloadKind::JsonText => {
                        serde_json::from_str::<serde::de::IgnoredAny>(&payload)
                            .map_err(|e| format!("the payload column is not valid JSON: {e}"))?;
                        Payload::Json(payload)
                    }
                    PayloadKind::Bytea => Payload::Binary {
                        bytes: decode_bytea(&payload)?,
                        content_type: table.content_type.clone(),
                    },
                },
                None if table.mapping.on_null_payload == NullPayloadPolicy::Tombstone => {
                    Payload::Tombstone
                }
                None => required(layout.payload).map(Payload::Json)?,
            };
            let mut headers = match optional(layout.headers)? {
                Some(text) => parse_headers(&text)?,
                None => Vec::new(),
            };
            let mut attributes = Vec::new();
            for (index, placement, name) in &layout.additional {
                if let Some(value) = column(*index)? {
                    match placement {
                        Placement::Header => headers.push((name.clone(), value)),
                        Placement::Envelope => attributes.push((name.clone(), value)),
                    }
                }
            }
            let fields = EventFields {
                id,
                key: required(layout.key)?,
                aggregate_type: required(layout.aggregate_type)?,
                aggregate_id: required(layout.aggregate_id)?,
                event_type: required(layout.event_type)?,
                schema_version: optional(layout.schema_version)?
                    .map(|v| parse_schema_version(&v))
                    .transpose()?,
                occurred_at: optional(layout.occurred_at)?
                    .map(|t| {
                        pg_timestamp_to_rfc3339(&t).map(Text::from).ok_or_else(|| {
                            format!(
                                "the occurred_at column is not a timestamp: {:?}",
                                truncate(&t, 60)
                            )
                        })
                    })
                    .transpose()?,
                traceparent: optional(layout.traceparent)?,
                headers,
                attributes,
                payload,
            };
            let source = info
                .fixed_source
                .clone()
                .unwrap_or_else(|| info.qualified.clone());
            let mut event = fields.into_event(ctx, info.qualified.clone(), source);
            if info.fixed_source.is_none() {
                let mut rendered = String::new();
                table.source.render(&event, &mut rendered);
                event.source = rendered.into();
            }
            Ok(event)
        })();
        Ok(match event {
            Ok(event) => Mapped::Event(Box::new(event)),
            Err(reason) => dead(reason),
        })
    }

    /// Maps a transactional logical message: outbox events without a table.
    pub fn map_message(&self, message: Message<'_>, ctx: RowContext) -> Mapped {
        let Some((prefix_table, prefix_source)) = self.message_prefixes.get(message.prefix) else {
            return Mapped::NotOutbox;
        };
        let dead = |reason: String| {
            Mapped::DeadLetter(DeadLetter {
                table: prefix_table.to_string(),
                position: ctx.position,
                xid: ctx.xid,
                kind: "logical message does not map to an event",
                reason,
                row: serde_json::Value::String(
                    String::from_utf8_lossy(message.content).into_owned(),
                ),
                raw: std::str::from_utf8(message.content)
                    .is_err()
                    .then(|| message.content.to_vec()),
                sink: None,
            })
        };
        let document = if message.prefix == REPLAY_PREFIX {
            match self.verified_replay(message.content) {
                Ok(document) => document,
                Err(reason) => return dead(reason),
            }
        } else {
            message.content
        };
        let content: MessageContent = match serde_json::from_slice(document) {
            Ok(content) => content,
            Err(e) => {
                return dead(format!(
                    "logical message {:?} is not an outbox event document: {e}",
                    message.prefix
                ))
            }
        };
        // A replayed dead letter keeps the table it came from, for routing; the signature
        // covers it.
        let (table, source) = match content
            .table
            .as_deref()
            .filter(|_| message.prefix == REPLAY_PREFIX)
        {
            Some(original) => (
                Arc::<str>::from(original),
                Arc::<str>::from(format!("/{original}")),
            ),
            None => (prefix_table.clone(), prefix_source.clone()),
        };
        let occurred_at = match content.occurred_at {
            Some(time) => match humantime::parse_rfc3339_weak(&time) {
                Ok(_) => Some(Text::from(time)),
                Err(_) => return dead(format!("occurred_at is not an RFC 3339 time: {time:?}")),
            },
            None => None,
        };
        if content.id.trim().is_empty() {
            return dead("id is empty: consumers could not dedup on it".to_owned());
        }
        let headers = content
            .headers
            .into_iter()
            .map(|(k, v)| (Arc::<str>::from(k), Text::from(v)))
            .collect();
        let fields = EventFields {
            id: Text::from(content.id),
            key: Text::from(content.key.unwrap_or_else(|| content.aggregate_id.clone())),
            aggregate_type: Text::from(content.aggregate_type),
            aggregate_id: Text::from(content.aggregate_id),
            event_type: Text::from(content.event_type),
            schema_version: content.schema_version,
            occurred_at,
            traceparent: content.traceparent.map(Text::from),
            headers,
            attributes: Vec::new(),
            payload: Payload::Json(
                Text::new(message.frame.slice_ref(content.payload.get().as_bytes()))
                    .expect("a slice of a JSON document that parsed as UTF-8"),
            ),
        };
        Mapped::Event(Box::new(fields.into_event(ctx, table, source)))
    }
}

impl OutboxMapper {
    /// The event document of a replay message whose signature verifies, or why it is refused.
    fn verified_replay<'a>(&self, content: &'a [u8]) -> Result<&'a [u8], String> {
        const FORGED: &str = "a replay message that `outbox-relay dlq replay` did not sign: \
             any role that can connect may emit logical messages, so it is not published. If \
             it is a dead letter you meant to replay, replay it with `outbox-relay dlq replay`";
        let envelope: ReplayEnvelope = serde_json::from_slice(content).map_err(|_| FORGED)?;
        let key = self.replay_key.as_ref().ok_or_else(|| {
            "a replay message arrived, but the relay's schema has no replay key to verify it \
             with: run `outbox-relay init` (it adds the key), then replay the dead letter again"
                .to_owned()
        })?;
        key.verify(&envelope).ok_or_else(|| FORGED.to_owned())
    }
}

/// The document a logical-message outbox event carries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageContent<'a> {
    id: String,
    #[serde(rename = "aggregatetype")]
    aggregate_type: String,
    #[serde(rename = "aggregateid")]
    aggregate_id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(borrow)]
    payload: &'a serde_json::value::RawValue,
    key: Option<String>,
    schema_version: Option<i64>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    occurred_at: Option<String>,
    traceparent: Option<String>,
    /// Only honoured for replays: the table the dead letter came from.
    table: Option<String>,
}

/// The parts of an event that come from the row or message.
struct EventFields {
    id: Text,
    key: Text,
    aggregate_type: Text,
    aggregate_id: Text,
    event_type: Text,
    schema_version: Option<i64>,
    occurred_at: Option<Text>,
    traceparent: Option<Text>,
    headers: Vec<(Arc<str>, Text)>,
    attributes: Vec<(Arc<str>, Text)>,
    payload: Payload,
}

impl EventFields {
    fn into_event(self, ctx: RowContext, table: Arc<str>, source: Arc<str>) -> Event {
        Event {
            position: ctx.position,
            xid: ctx.xid,
            commit_time_micros: ctx.commit_time_micros,
            source,
            table,
            id: self.id,
            key: self.key,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            occurred_at: self.occurred_at,
            traceparent: self.traceparent,
            headers: self.headers,
            attributes: self.attributes,
            payload: self.payload,
        }
    }
}

/// A change referenced a relation the server never described: a protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("the replication stream referenced relation {0} before describing it")]
pub struct UnknownRelation(pub u32);

fn parse_schema_version(text: &str) -> Result<i64, String> {
    text.parse().map_err(|_| {
        format!(
            "the schema_version column is not an integer: {:?}",
            truncate(text, 40)
        )
    })
}

fn parse_headers(text: &str) -> Result<Vec<(Arc<str>, Text)>, String> {
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
fn in_utc(date: &str, clock: &str, offset: &str) -> Option<String> {
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

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The row as a JSON object of column name → text (lossy for non-UTF-8 bytes) or null, and
/// when it is lossy, the exact bytes in the [`frame_columns`] layout.
fn raw_row(relation: &Table, values: &[Value<'_>]) -> (serde_json::Value, Option<Vec<u8>>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdditionalColumn;
    use crate::row::Column;
    use outbox_relay_sinks::Lsn;
    use std::collections::BTreeMap;

    const TEXT: u32 = 25;
    const UUID_OID: u32 = 2950;
    const INT: u32 = 23;
    const TIMESTAMPTZ: u32 = 1184;
    const ID: &str = "6f1d6a0e-8f6b-4c1e-9a51-2f0c6b1d9e11";
    const CTX: RowContext = RowContext {
        position: Position {
            commit_lsn: Lsn(100),
            index: 3,
        },
        xid: 9,
        commit_time_micros: 0,
    };
    const DEBEZIUM: [(&str, u32); 5] = [
        ("id", UUID_OID),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", JSONB_OID),
    ];

    fn relation(name: &str, columns: &[(&str, u32)]) -> Table {
        Table {
            id: 7,
            schema: "public".into(),
            name: name.into(),
            columns: columns
                .iter()
                .map(|(name, type_oid)| Column {
                    name: (*name).into(),
                    type_oid: *type_oid,
                })
                .collect(),
        }
    }

    /// Maps one row of `public.outbox` with `mapping` and the given column values.
    fn map_with(
        mapping: Option<TableMapping>,
        columns: &[(&str, u32)],
        values: &[Option<&str>],
    ) -> Mapped {
        let mappings: BTreeMap<String, TableMapping> = mapping
            .into_iter()
            .map(|m| ("public.outbox".to_owned(), m))
            .collect();
        let mut mapper = OutboxMapper::new(&["public.outbox".into()], &mappings, &[]);
        mapper.on_relation(relation("outbox", columns));
        let data = Bytes::from(values.iter().flatten().copied().collect::<String>());
        let mut offset = 0;
        let values: Vec<Value> = values
            .iter()
            .map(|v| match v {
                Some(s) => {
                    let slice = &data[offset..offset + s.len()];
                    offset += s.len();
                    Value::Text(slice)
                }
                None => Value::Null,
            })
            .collect();
        let row = Row {
            values: &values,
            frame: &data,
        };
        mapper.map_insert(7, row, CTX).unwrap()
    }

    fn event(mapped: Mapped) -> Event {
        match mapped {
            Mapped::Event(e) => *e,
            Mapped::DeadLetter(d) => panic!("dead letter: {}", d.reason),
            Mapped::NotOutbox => panic!("not outbox"),
            Mapped::NullPayloadSkipped(_) => panic!("skipped"),
        }
    }

    #[test]
    fn a_bytea_payload_is_its_decoded_bytes_with_the_mappings_content_type() {
        let mut bytea = DEBEZIUM;
        bytea[4] = ("payload", BYTEA_OID);
        let row = |payload| {
            [
                Some(ID),
                Some("order"),
                Some("o-1"),
                Some("T"),
                Some(payload),
            ]
        };
        let e = event(map_with(None, &bytea, &row("\\x00ff0a7b")));
        assert_eq!(
            e.payload,
            Payload::Binary {
                bytes: Bytes::from_static(&[0x00, 0xff, 0x0a, 0x7b]),
                content_type: "application/octet-stream".into(),
            }
        );
        let letter = DeadLetter::from_event(&e, "refused by the sink", "refused".into(), None);
        assert_eq!(letter.row["payload"], "\\x00ff0a7b");
        let avro: TableMapping =
            serde_json::from_value(serde_json::json!({ "content_type": "application/avro" }))
                .unwrap();
        let e = event(map_with(Some(avro), &bytea, &row("\\x")));
        assert_eq!(e.payload.content_type(), "application/avro");
        assert!(e.payload.is_empty());
        for malformed in ["00ff", "\\x0", "\\xzz", "\\000"] {
            let Mapped::DeadLetter(letter) = map_with(None, &bytea, &row(malformed)) else {
                panic!("{malformed:?} is not hex bytea");
            };
            assert!(
                letter.reason.contains("not in hex form"),
                "{}",
                letter.reason
            );
        }
    }

    #[test]
    fn a_null_payload_follows_the_tables_policy() {
        let row = [Some(ID), Some("order"), Some("o-1"), Some("T"), None];
        let with = |policy: &str| {
            let mapping: TableMapping =
                serde_json::from_value(serde_json::json!({ "on_null_payload": policy })).unwrap();
            map_with(Some(mapping), &DEBEZIUM, &row)
        };
        let Mapped::DeadLetter(letter) = map_with(None, &DEBEZIUM, &row) else {
            panic!("the default is a dead letter");
        };
        assert_eq!(letter.reason, "column \"payload\" is NULL");
        assert!(matches!(with("dead-letter"), Mapped::DeadLetter(_)));
        let Mapped::NullPayloadSkipped(table) = with("skip") else {
            panic!("skip is no event and no dead letter");
        };
        assert_eq!(&*table, "public.outbox");
        let tombstone = event(with("tombstone"));
        assert_eq!(tombstone.payload, Payload::Tombstone);
        assert_eq!((&*tombstone.key, &*tombstone.id), ("o-1", ID));
        let Mapped::DeadLetter(letter) = map_with(
            Some(
                serde_json::from_value(serde_json::json!({ "on_null_payload": "tombstone" }))
                    .unwrap(),
            ),
            &DEBEZIUM,
            &[Some(ID), Some("order"), None, Some("T"), None],
        ) else {
            panic!("a tombstone still needs its key");
        };
        assert_eq!(letter.reason, "column \"aggregateid\" is NULL");
    }

    #[test]
    fn maps_the_debezium_layout_in_any_column_order() {
        let mut reordered = DEBEZIUM;
        reordered.reverse();
        let e = event(map_with(
            None,
            &reordered,
            &[
                Some("{}"),
                Some("Created"),
                Some("o-1"),
                Some("order"),
                Some(ID),
            ],
        ));
        assert_eq!(
            (
                &*e.id,
                &*e.key,
                &*e.aggregate_id,
                &*e.aggregate_type,
                &*e.event_type
            ),
            (ID, "o-1", "o-1", "order", "Created")
        );
        assert_eq!(
            (&*e.table, &*e.source, e.position, e.xid),
            ("public.outbox", "/public.outbox", CTX.position, 9)
        );
        assert_eq!(
            (e.schema_version, &e.occurred_at, &e.traceparent),
            (None, &None, &None)
        );
    }

    #[test]
    fn optional_columns_are_used_when_present() {
        let mut columns = DEBEZIUM.to_vec();
        columns.extend([
            ("schema_version", INT),
            ("headers", JSONB_OID),
            ("occurred_at", TIMESTAMPTZ),
            ("traceparent", TEXT),
        ]);
        let e = event(map_with(
            None,
            &columns,
            &[
                Some(ID),
                Some("order"),
                Some("o-1"),
                Some("Created"),
                Some("{}"),
                Some("2"),
                Some(r#"{"x-tenant": "acme"}"#),
                Some("2026-11-22 22:39:38.658915+00"),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ],
        ));
        assert_eq!(e.schema_version, Some(2));
        assert_eq!(e.headers, vec![(Arc::from("x-tenant"), Text::from("acme"))]);
        assert_eq!(
            e.occurred_at.as_deref(),
            Some("2026-11-22T22:39:38.658915Z")
        );
        assert!(e.traceparent.is_some());
    }

    #[test]
    fn a_custom_mapping_renames_columns_places_extras_and_templates_the_source() {
        let mapping = TableMapping {
            id: "event_id".into(),
            aggregate_type: "kind".into(),
            aggregate_id: "account".into(),
            event_type: "name".into(),
            payload: "body".into(),
            key: Some("tenant".into()),
            additional: vec![
                AdditionalColumn {
                    column: "tenant".into(),
                    placement: Placement::Header,
                    name: Some("x-tenant".into()),
                },
                AdditionalColumn {
                    column: "region".into(),
                    placement: Placement::Envelope,
                    name: None,
                },
            ],
            source: "/billing/{aggregatetype}".into(),
            ..TableMapping::default()
        };
        let columns = [
            ("event_id", TEXT),
            ("kind", TEXT),
            ("account", TEXT),
            ("name", TEXT),
            ("body", TEXT),
            ("tenant", TEXT),
            ("region", TEXT),
        ];
        let e = event(map_with(
            Some(mapping),
            &columns,
            &[
                Some(ID),
                Some("invoice"),
                Some("a-9"),
                Some("Billed"),
                Some("[1]"),
                Some("acme"),
                Some("eu"),
            ],
        ));
        assert_eq!(
            (&*e.key, &*e.aggregate_id, &*e.source),
            ("acme", "a-9", "/billing/invoice")
        );
        assert_eq!(e.headers, vec![(Arc::from("x-tenant"), Text::from("acme"))]);
        assert_eq!(e.attributes, vec![(Arc::from("region"), Text::from("eu"))]);
    }

    #[test]
    fn bad_rows_become_dead_letters_with_reasons() {
        type Case<'a> = (Vec<(&'a str, u32)>, Vec<Option<&'a str>>, &'a str);
        let text_outbox = vec![
            ("id", TEXT),
            ("aggregatetype", TEXT),
            ("aggregateid", TEXT),
            ("type", TEXT),
            ("payload", TEXT),
        ];
        let mut with_optional = DEBEZIUM.to_vec();
        with_optional.extend([("schema_version", TEXT), ("headers", JSONB_OID)]);
        let cases: Vec<Case> = vec![
            (
                DEBEZIUM.to_vec(),
                vec![Some(ID), Some("order"), None, Some("T"), Some("{}")],
                "\"aggregateid\" is NULL",
            ),
            (
                text_outbox.clone(),
                vec![Some(" "), Some("order"), Some("o-1"), Some("T"), Some("{}")],
                "the id column is empty",
            ),
            (
                text_outbox,
                vec![
                    Some(ID),
                    Some("order"),
                    Some("o-1"),
                    Some("T"),
                    Some("{oops"),
                ],
                "not valid JSON",
            ),
            (
                DEBEZIUM[..4].to_vec(),
                vec![Some(ID), Some("order"), Some("o-1"), Some("T")],
                "no column \"payload\"",
            ),
            (
                with_optional.clone(),
                vec![
                    Some(ID),
                    Some("o"),
                    Some("o-1"),
                    Some("T"),
                    Some("{}"),
                    Some("two"),
                    None,
                ],
                "not an integer",
            ),
            (
                with_optional,
                vec![
                    Some(ID),
                    Some("o"),
                    Some("o-1"),
                    Some("T"),
                    Some("{}"),
                    None,
                    Some(r#"{"a": 1}"#),
                ],
                "not a string",
            ),
        ];
        for (columns, values, expected) in cases {
            match map_with(None, &columns, &values) {
                Mapped::DeadLetter(d) => {
                    assert!(
                        d.reason.contains(expected),
                        "{} does not mention {expected}",
                        d.reason
                    );
                    assert_eq!(
                        (d.position, d.table.as_str()),
                        (CTX.position, "public.outbox")
                    );
                    assert!(d.row.is_object());
                }
                _ => panic!("expected a dead letter for {expected}"),
            }
        }
        let configured_but_missing = TableMapping {
            schema_version: Some("version".into()),
            ..TableMapping::default()
        };
        match map_with(
            Some(configured_but_missing),
            &DEBEZIUM,
            &[Some(ID), Some("o"), Some("k"), Some("T"), Some("{}")],
        ) {
            Mapped::DeadLetter(d) => {
                assert!(d.reason.contains("no column \"version\""), "{}", d.reason)
            }
            _ => panic!("a configured optional column must exist"),
        }
    }

    #[test]
    fn text_payloads_deeper_than_128_or_beyond_f64_are_json() {
        let text_outbox = [
            ("id", TEXT),
            ("aggregatetype", TEXT),
            ("aggregateid", TEXT),
            ("type", TEXT),
            ("payload", TEXT),
        ];
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let huge = format!("[1e400, -1{}]", "0".repeat(400));
        for payload in [deep.as_str(), huge.as_str()] {
            let e = event(map_with(
                None,
                &text_outbox,
                &[Some(ID), Some("o"), Some("k"), Some("T"), Some(payload)],
            ));
            assert_eq!(e.payload, Payload::Json(Text::from(payload)));
        }
    }

    #[test]
    fn dead_letters_keep_exact_bytes_where_jsonb_cannot() {
        let letter = |row: serde_json::Value, raw: Option<Vec<u8>>| DeadLetter {
            table: "message:outbox".into(),
            position: CTX.position,
            xid: 1,
            kind: "k",
            reason: "r".into(),
            row,
            raw,
            sink: None,
        };
        let exact = letter(serde_json::json!({"a": "b", "n": null}), None);
        assert_eq!(exact.storable(), (exact.row.clone(), None));
        let (row, raw) = letter(serde_json::json!("x\0y"), None).storable();
        assert_eq!(
            (row, raw),
            (serde_json::json!("x\u{FFFD}y"), Some(b"x\0y".to_vec()))
        );
        let (row, raw) =
            letter(serde_json::json!({"a": "x\0", "v": 2, "n": null}), None).storable();
        assert_eq!(
            row,
            serde_json::json!({"a": "x\u{FFFD}", "v": 2, "n": null})
        );
        assert_eq!(
            unframe_columns(&raw.unwrap()).unwrap(),
            [
                ("a".to_owned(), Some(b"x\0".to_vec())),
                ("n".to_owned(), None),
                ("v".to_owned(), Some(b"2".to_vec())),
            ]
        );
        // A row with bytes that are not UTF-8 (a SQL_ASCII database).
        let mut mapper = OutboxMapper::new(&["public.outbox".into()], &BTreeMap::new(), &[]);
        mapper.on_relation(relation("outbox", &DEBEZIUM));
        let data = Bytes::from([ID.as_bytes(), b"orderT{}caf\xe9"].concat());
        let values = [
            Value::Text(&data[..36]),
            Value::Text(&data[36..41]),
            Value::Text(&data[44..]),
            Value::Text(&data[41..42]),
            Value::Text(&data[42..44]),
        ];
        let row = Row {
            values: &values,
            frame: &data,
        };
        match mapper.map_insert(7, row, CTX).unwrap() {
            Mapped::DeadLetter(d) => {
                assert!(d.reason.contains("not valid UTF-8"), "{}", d.reason);
                assert_eq!(d.row["aggregateid"], "caf\u{FFFD}");
                let columns = unframe_columns(d.raw.as_deref().unwrap()).unwrap();
                assert_eq!(
                    columns[2],
                    ("aggregateid".to_owned(), Some(b"caf\xe9".to_vec()))
                );
                assert_eq!(columns[4], ("payload".to_owned(), Some(b"{}".to_vec())));
            }
            _ => panic!("expected a dead letter"),
        }
        assert_eq!(unframe_columns(b"name\0\0\0"), None);
    }

    #[test]
    fn logical_messages_with_a_configured_prefix_are_events() {
        let mapper = OutboxMapper::new(&[], &BTreeMap::new(), &["outbox".into()]);
        let content = format!(
            r#"{{"id":"{ID}","aggregatetype":"order","aggregateid":"o-1","type":"Created","payload":{{"a":[1,2]}},"schema_version":4}}"#
        );
        let data = Bytes::from(content);
        fn message<'a>(prefix: &'a str, frame: &'a Bytes) -> Message<'a> {
            Message {
                prefix,
                content: frame,
                frame,
            }
        }
        let e = event(mapper.map_message(message("outbox", &data), CTX));
        assert_eq!(
            (
                &*e.table,
                &*e.source,
                &*e.key,
                e.payload.as_json().map(|json| json.as_str()),
                e.schema_version
            ),
            (
                "message:outbox",
                "/message:outbox",
                "o-1",
                Some(r#"{"a":[1,2]}"#),
                Some(4)
            )
        );
        assert!(matches!(
            mapper.map_message(message("other", &data), CTX),
            Mapped::NotOutbox
        ));
        let bad = Bytes::from_static(br#"{"id":"x"}"#);
        match mapper.map_message(message("outbox", &bad), CTX) {
            Mapped::DeadLetter(d) => assert!(d.reason.contains("missing field"), "{}", d.reason),
            _ => panic!("expected a dead letter"),
        }
    }

    #[test]
    fn postgres_timestamps_become_rfc3339() {
        for (pg, rfc) in [
            (
                "2026-11-22 22:39:38.658915+00",
                Some("2026-11-22T22:39:38.658915Z"),
            ),
            (
                "2026-11-22 22:39:38+05:30",
                Some("2026-11-22T22:39:38+05:30"),
            ),
            (
                "2026-11-22 22:39:38.5-03",
                Some("2026-11-22T22:39:38.5-03:00"),
            ),
            ("2026-11-22 22:39:38", Some("2026-11-22T22:39:38Z")),
            ("infinity", None),
            ("22/11/2026 22:39:38", None),
            ("22/11/2026 22:39:38 CET", None),
            // Local mean time: Amsterdam in 1900 (+00:19:32), Dublin (-00:25:21).
            ("1900-01-01 00:00:00+00:19:32", Some("1899-12-31T23:40:28Z")),
            (
                "1900-03-01 00:10:00.25-00:25:21",
                Some("1900-03-01T00:35:21.25Z"),
            ),
            ("2000-02-29 23:59:59+23:59:59", Some("2000-02-29T00:00:00Z")),
            ("2000-02-29 00:00:00+00:19:3x", None),
            ("0001-01-01 00:00:00+00:19:32", Some("0000-12-31T23:40:28Z")),
            ("9999-12-31 23:59:59-00:19:32", None),
        ] {
            assert_eq!(pg_timestamp_to_rfc3339(pg).as_deref(), rfc, "{pg}");
        }
    }
}
