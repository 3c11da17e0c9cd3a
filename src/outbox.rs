//! Outbox mapping: turns an insert on an outbox table into an [`Event`], or into a
//! [`DeadLetter`] that says why it cannot be one. Column positions are resolved once per
//! Relation message (so ALTER TABLE mid-stream is picked up), never per row.
//!
//! The default table layout is Debezium's outbox router convention:
//! `id uuid, aggregatetype text, aggregateid text, type text, payload jsonb`.

use crate::source::pgoutput::{Relation, Tuple, Value};
use bytes::Bytes;
use outbox_relay_sinks::{Event, Position, Text};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const JSONB_OID: u32 = 3802;
const UUID_OID: u32 = 2950;
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Where a row sits and which transaction wrote it.
#[derive(Debug, Clone, Copy)]
pub struct RowContext {
    pub position: Position,
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_micros: i64,
}

/// A row that could not become an event, kept with its reason and its raw columns.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub table: String,
    pub position: Position,
    pub xid: u32,
    pub reason: String,
    /// Column name → text value (or null), as received.
    pub row: serde_json::Value,
    /// The sink that refused it; `None` when the row could not be mapped at all.
    pub sink: Option<String>,
}

/// What the mapper knows about one relation of the stream.
struct RelationInfo {
    relation: Relation,
    /// `schema.name`, shared by every event of the table.
    qualified: Arc<str>,
    /// `None` when the relation is not a configured outbox table.
    layout: Option<Result<Layout, String>>,
}

/// Positions of the outbox columns within the relation.
struct Layout {
    id: usize,
    id_is_uuid: bool,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    payload: usize,
    payload_is_jsonb: bool,
}

impl Layout {
    fn resolve(relation: &Relation) -> Result<Layout, String> {
        let find = |name: &str| {
            relation
                .columns
                .iter()
                .position(|c| c.name == name)
                .ok_or_else(|| {
                    format!(
                        "outbox table {}.{} has no column {name:?} (expected id, aggregatetype, \
                     aggregateid, type, payload)",
                        relation.namespace, relation.name
                    )
                })
        };
        let id = find("id")?;
        let payload = find("payload")?;
        Ok(Layout {
            id,
            id_is_uuid: relation.columns[id].type_oid == UUID_OID,
            aggregate_type: find("aggregatetype")?,
            aggregate_id: find("aggregateid")?,
            event_type: find("type")?,
            payload,
            payload_is_jsonb: relation.columns[payload].type_oid == JSONB_OID,
        })
    }
}

/// What to do with a decoded change.
pub enum Mapped {
    Event(Event),
    DeadLetter(DeadLetter),
    /// Not an outbox table: nothing to publish.
    NotOutbox,
}

/// Maps rows of the configured outbox tables to events.
pub struct OutboxMapper {
    outbox_tables: HashSet<(String, String)>,
    relations: HashMap<u32, RelationInfo>,
}

impl OutboxMapper {
    /// `tables` as `schema.table`, already validated by the config.
    pub fn new(tables: &[String]) -> Self {
        let outbox_tables = tables
            .iter()
            .filter_map(|t| crate::config::parse_table_name(t).ok())
            .map(|(s, t)| (s.to_owned(), t.to_owned()))
            .collect();
        OutboxMapper {
            outbox_tables,
            relations: HashMap::new(),
        }
    }

    /// Records a Relation message (sent before the first change of a table in a session and
    /// again whenever the table's definition changed).
    pub fn on_relation(&mut self, relation: Relation) {
        let is_outbox = self
            .outbox_tables
            .contains(&(relation.namespace.clone(), relation.name.clone()));
        let layout = is_outbox.then(|| Layout::resolve(&relation));
        let qualified: Arc<str> = format!("{}.{}", relation.namespace, relation.name).into();
        self.relations.insert(
            relation.id,
            RelationInfo {
                relation,
                qualified,
                layout,
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
            .is_some_and(|r| r.layout.is_some())
    }

    /// Maps an inserted row. `data` is the buffer `tuple` borrows from, so text fields are
    /// shared slices, not copies.
    pub fn map_insert(
        &self,
        relation_id: u32,
        tuple: &Tuple<'_>,
        data: &Bytes,
        ctx: RowContext,
    ) -> Result<Mapped, UnknownRelation> {
        let info = self
            .relations
            .get(&relation_id)
            .ok_or(UnknownRelation(relation_id))?;
        let Some(layout) = &info.layout else {
            return Ok(Mapped::NotOutbox);
        };
        let dead = |reason: String| {
            Mapped::DeadLetter(DeadLetter {
                table: info.qualified.to_string(),
                position: ctx.position,
                xid: ctx.xid,
                reason,
                row: raw_row(&info.relation, tuple),
                sink: None,
            })
        };
        let layout = match layout {
            Ok(layout) => layout,
            Err(reason) => return Ok(dead(reason.clone())),
        };
        if tuple.columns.len() != info.relation.columns.len() {
            return Ok(dead(format!(
                "row has {} columns but the relation has {}",
                tuple.columns.len(),
                info.relation.columns.len()
            )));
        }
        let text = |index: usize| -> Result<Text, String> {
            let name = &info.relation.columns[index].name;
            match tuple.columns[index] {
                Value::Text(bytes) => Text::new(data.slice_ref(bytes))
                    .map_err(|e| format!("column {name:?} is not valid UTF-8: {e}")),
                Value::Null => Err(format!("column {name:?} is NULL")),
                Value::UnchangedToast => {
                    Err(format!("column {name:?} was not sent (unchanged TOAST)"))
                }
                Value::Binary(_) => Err(format!("column {name:?} arrived in binary format")),
            }
        };
        let event = (|| {
            let id = text(layout.id)?;
            if !layout.id_is_uuid && !is_uuid(&id) {
                return Err(format!(
                    "column \"id\" is not a UUID: {:?}",
                    truncate(&id, 80)
                ));
            }
            let payload = text(layout.payload)?;
            if !layout.payload_is_jsonb {
                serde_json::from_str::<serde::de::IgnoredAny>(&payload)
                    .map_err(|e| format!("column \"payload\" is not valid JSON: {e}"))?;
            }
            Ok(Event {
                position: ctx.position,
                xid: ctx.xid,
                commit_time_micros: ctx.commit_time_micros,
                table: info.qualified.clone(),
                id,
                key: text(layout.aggregate_id)?,
                aggregate_type: text(layout.aggregate_type)?,
                event_type: text(layout.event_type)?,
                payload,
            })
        })();
        Ok(match event {
            Ok(event) => Mapped::Event(event),
            Err(reason) => dead(reason),
        })
    }
}

/// A change referenced a relation the server never described: a protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("the replication stream referenced relation {0} before describing it")]
pub struct UnknownRelation(pub u32);

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The row as a JSON object of column name → text (lossy for non-UTF-8 bytes) or null.
fn raw_row(relation: &Relation, tuple: &Tuple<'_>) -> serde_json::Value {
    let mut row = serde_json::Map::new();
    for (i, value) in tuple.columns.iter().enumerate() {
        let name = relation
            .columns
            .get(i)
            .map_or_else(|| format!("column{i}"), |c| c.name.clone());
        let value = match value {
            Value::Text(bytes) | Value::Binary(bytes) => {
                serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
            }
            Value::Null | Value::UnchangedToast => serde_json::Value::Null,
        };
        row.insert(name, value);
    }
    serde_json::Value::Object(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::RelationColumn;
    use outbox_relay_sinks::Lsn;

    fn relation(columns: &[(&str, u32)]) -> Relation {
        Relation {
            id: 7,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|(name, type_oid)| RelationColumn {
                    flags: 0,
                    name: (*name).into(),
                    type_oid: *type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    const TEXT: u32 = 25;
    const CTX: RowContext = RowContext {
        position: Position {
            commit_lsn: Lsn(100),
            index: 3,
        },
        xid: 9,
        commit_time_micros: 0,
    };

    fn map(columns: &[(&str, u32)], values: &[Option<&str>]) -> Mapped {
        let mut mapper = OutboxMapper::new(&["public.outbox".into()]);
        mapper.on_relation(relation(columns));
        let data = Bytes::from(values.iter().flatten().copied().collect::<String>());
        let mut offset = 0;
        let tuple = Tuple {
            columns: values
                .iter()
                .map(|v| match v {
                    Some(s) => {
                        let slice = &data[offset..offset + s.len()];
                        offset += s.len();
                        Value::Text(slice)
                    }
                    None => Value::Null,
                })
                .collect(),
        };
        mapper.map_insert(7, &tuple, &data, CTX).unwrap()
    }

    const DEBEZIUM: [(&str, u32); 5] = [
        ("id", UUID_OID),
        ("aggregatetype", TEXT),
        ("aggregateid", TEXT),
        ("type", TEXT),
        ("payload", JSONB_OID),
    ];
    const ID: &str = "6f1d6a0e-8f6b-4c1e-9a51-2f0c6b1d9e11";

    #[test]
    fn maps_the_debezium_layout_in_any_column_order() {
        let mut reordered = DEBEZIUM;
        reordered.reverse();
        let Mapped::Event(e) = map(
            &reordered,
            &[
                Some("{}"),
                Some("created"),
                Some("o-1"),
                Some("order"),
                Some(ID),
            ],
        ) else {
            panic!("expected an event")
        };
        assert_eq!(
            (&*e.id, &*e.key, &*e.aggregate_type, &*e.event_type),
            (ID, "o-1", "order", "created")
        );
        assert_eq!(
            (&*e.table, e.position, e.xid),
            ("public.outbox", CTX.position, 9)
        );
    }

    #[test]
    fn bad_rows_become_dead_letters_with_reasons() {
        type Case<'a> = (Vec<(&'a str, u32)>, Vec<Option<&'a str>>, &'a str);
        let cases: Vec<Case> = vec![
            (
                DEBEZIUM.to_vec(),
                vec![Some(ID), Some("order"), None, Some("created"), Some("{}")],
                "\"aggregateid\" is NULL",
            ),
            (
                vec![
                    ("id", TEXT),
                    ("aggregatetype", TEXT),
                    ("aggregateid", TEXT),
                    ("type", TEXT),
                    ("payload", TEXT),
                ],
                vec![
                    Some("not-a-uuid"),
                    Some("order"),
                    Some("o-1"),
                    Some("created"),
                    Some("{}"),
                ],
                "not a UUID",
            ),
            (
                vec![
                    ("id", UUID_OID),
                    ("aggregatetype", TEXT),
                    ("aggregateid", TEXT),
                    ("type", TEXT),
                    ("payload", TEXT),
                ],
                vec![
                    Some(ID),
                    Some("order"),
                    Some("o-1"),
                    Some("created"),
                    Some("{oops"),
                ],
                "not valid JSON",
            ),
            (
                DEBEZIUM[..4].to_vec(),
                vec![Some(ID), Some("order"), Some("o-1"), Some("created")],
                "no column \"payload\"",
            ),
        ];
        for (columns, values, expected) in cases {
            match map(&columns, &values) {
                Mapped::DeadLetter(d) => {
                    assert!(
                        d.reason.contains(expected),
                        "{} does not mention {expected}",
                        d.reason
                    );
                    assert_eq!(d.position, CTX.position);
                    assert_eq!(d.table, "public.outbox");
                    assert!(d.row.is_object());
                }
                _ => panic!("expected a dead letter for {expected}"),
            }
        }
    }

    #[test]
    fn other_tables_are_not_outbox_and_unknown_relations_are_errors() {
        let mut mapper = OutboxMapper::new(&["public.outbox".into()]);
        let mut other = relation(&DEBEZIUM);
        other.name = "orders".into();
        mapper.on_relation(other);
        let tuple = Tuple { columns: vec![] };
        assert!(matches!(
            mapper.map_insert(7, &tuple, &Bytes::new(), CTX),
            Ok(Mapped::NotOutbox)
        ));
        assert!(mapper.map_insert(8, &tuple, &Bytes::new(), CTX).is_err());
    }
}
