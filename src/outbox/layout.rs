//! Where the mapped columns sit in a table, resolved once per table shape, and what its
//! payload column holds.

use crate::config::{Placement, TableMapping};
use crate::row::Table;
use std::sync::Arc;

pub(super) const JSONB_OID: u32 = 3802;
pub(super) const BYTEA_OID: u32 = 17;

/// What the payload column holds, by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PayloadKind {
    /// `jsonb`: JSON already.
    Jsonb,
    /// `bytea`: bytes, in the text form `\x` + hex (the relay's connections pin
    /// `bytea_output = hex`).
    Bytea,
    /// Any other type (`json`, `text`, …): text that must be JSON.
    JsonText,
}

/// Positions of the mapped columns within the relation.
pub(super) struct Layout {
    pub(super) id: usize,
    pub(super) aggregate_type: usize,
    pub(super) aggregate_id: usize,
    pub(super) event_type: usize,
    pub(super) payload: usize,
    pub(super) payload_kind: PayloadKind,
    pub(super) key: usize,
    pub(super) schema_version: Option<usize>,
    pub(super) headers: Option<usize>,
    pub(super) occurred_at: Option<usize>,
    pub(super) traceparent: Option<usize>,
    pub(super) additional: Vec<(usize, Placement, Arc<str>)>,
}

impl Layout {
    pub(super) fn resolve(relation: &Table, mapping: &TableMapping) -> Result<Layout, String> {
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
