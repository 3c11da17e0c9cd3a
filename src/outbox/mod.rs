//! Outbox mapping: turns an insert on an outbox table, or a transactional logical message
//! with a configured prefix, into an [`Event`], or into a [`DeadLetter`] that says why it
//! cannot be one. Column positions are resolved once per table shape the source describes
//! (so ALTER TABLE mid-stream is picked up), never per row. The input is the neutral row
//! ([`crate::row`]), whether it was streamed or backfilled.
//!
//! The default table layout is Debezium's outbox router convention:
//! `id uuid, aggregatetype text, aggregateid text, type text, payload jsonb`, with the optional
//! columns `schema_version`, `headers`, `occurred_at` and `traceparent` used when present.
//!
//! Invariant: a row of an outbox table becomes exactly one event or one dead letter; the
//! mapper never drops one and never panics on its content.

mod dead_letter;
mod fields;
mod layout;
mod replay;

pub use dead_letter::{frame_columns, unframe_columns, DeadLetter, EVENT_DOCUMENT};
pub use fields::pg_timestamp_to_rfc3339;
pub use replay::{ReplayKey, REPLAY_PREFIX};

use crate::config::{
    mapping_in, parse_table_name, ChangePolicy, NullPayloadPolicy, Placement, TableMapping,
};
use crate::row::{Message, Row, Table, Value};
use dead_letter::raw_row;
use fields::{decode_bytea, parse_headers, parse_schema_version, truncate};
use layout::{Layout, PayloadKind};
use outbox_relay_sinks::routing::Template;
use outbox_relay_sinks::{Event, Payload, Position, Text};
use replay::ReplayEnvelope;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

/// Where a row sits and which transaction wrote it.
#[derive(Debug, Clone, Copy)]
pub struct RowContext {
    pub position: Position,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
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
    /// The slot this relay streams: a replay message written for another slot (the
    /// logical messages of a database reach every slot, whatever its publication) is not
    /// this relay's to publish.
    slot: Option<String>,
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
            slot: None,
        }
    }

    /// The slot this relay streams: replays written for another slot are left to it.
    pub fn for_slot(mut self, slot: &str) -> Self {
        self.slot = Some(slot.to_owned());
        self
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
            let document = match self.verified_replay(message.content) {
                Ok(document) => document,
                Err(reason) => return dead(reason),
            };
            if self
                .slot
                .as_deref()
                .is_some_and(|own| replay::addressed_elsewhere(document, own))
            {
                return Mapped::NotOutbox;
            }
            document
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
        let mut event = fields.into_event(ctx, table, source);
        event.only_sink = content
            .sink
            .filter(|_| message.prefix == REPLAY_PREFIX)
            .map(Arc::from);
        Mapped::Event(Box::new(event))
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
    /// Only honoured for replays: the one sink to deliver to (the sink that refused it).
    sink: Option<String>,
    /// Only for replays: the slot whose dead letter it is, read once the signature is
    /// checked (see [`OutboxMapper::for_slot`]); accepted here, not used.
    #[serde(rename = "slot")]
    _slot: Option<serde::de::IgnoredAny>,
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
            original_schema_version: None,
            occurred_at: self.occurred_at,
            traceparent: self.traceparent,
            headers: self.headers,
            attributes: self.attributes,
            payload: self.payload,
            only_sink: None,
        }
    }
}

/// A change referenced a relation the server never described: a protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("the replication stream referenced relation {0} before describing it")]
pub struct UnknownRelation(pub u32);

#[cfg(test)]
mod tests;
