//! `[outbox."schema.table"]`: how a table's columns map to an event's fields, and what the
//! relay does with updates, deletes and NULL payloads. Defaults are Debezium's outbox router
//! column names.

use outbox_relay_sinks::table_name::parse_table_name;
use serde::Deserialize;
use std::collections::BTreeMap;

/// How the columns of one outbox table become an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapping {
    #[serde(default = "column_id")]
    pub id: String,
    #[serde(default = "column_aggregate_type")]
    pub aggregate_type: String,
    #[serde(default = "column_aggregate_id")]
    pub aggregate_id: String,
    #[serde(default = "column_type", rename = "type")]
    pub event_type: String,
    #[serde(default = "column_payload")]
    pub payload: String,
    /// The message key (what per-key order means); default: the aggregate id column.
    pub key: Option<String>,
    /// Optional columns: used when the table has them. Naming one here that the table lacks
    /// dead-letters its rows with that reason.
    pub schema_version: Option<String>,
    pub headers: Option<String>,
    pub occurred_at: Option<String>,
    pub traceparent: Option<String>,
    /// Further columns to carry, as Debezium's `table.fields.additional.placement`.
    #[serde(default)]
    pub additional: Vec<AdditionalColumn>,
    /// CloudEvents `source` template, e.g. "/orders/{aggregatetype}"; default "/{table}".
    #[serde(default = "default_ce_source")]
    pub source: String,
    /// What an UPDATE of an outbox row does.
    #[serde(default)]
    pub on_update: ChangePolicy,
    /// What a DELETE of an outbox row does (the default fits "insert then delete").
    #[serde(default)]
    pub on_delete: ChangePolicy,
    /// What an inserted row whose payload column is NULL becomes.
    #[serde(default)]
    pub on_null_payload: NullPayloadPolicy,
    /// The CloudEvents `datacontenttype` of a `bytea` payload (e.g. "application/avro");
    /// JSON payloads are always "application/json".
    #[serde(default = "default_binary_content_type")]
    pub content_type: String,
}

impl Default for TableMapping {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every mapping field has a default")
    }
}

/// A column an outbox table's mapping reads.
pub struct MappedColumn<'a> {
    pub name: &'a str,
    /// What the mapping reads it as (`id`, `payload`, …).
    pub role: &'static str,
    /// Whether a row without it is dead-lettered; the optional columns under their default
    /// names are used only when the table has them.
    pub required: bool,
}

impl TableMapping {
    /// Every column the mapping reads, with its role.
    pub fn columns(&self) -> Vec<MappedColumn<'_>> {
        let required = |name, role| MappedColumn {
            name,
            role,
            required: true,
        };
        let mut columns = vec![
            required(&self.id, "id"),
            required(&self.aggregate_type, "aggregate_type"),
            required(&self.aggregate_id, "aggregate_id"),
            required(&self.event_type, "type"),
            required(&self.payload, "payload"),
        ];
        if let Some(key) = &self.key {
            columns.push(required(key, "key"));
        }
        for (configured, default, role) in [
            (&self.schema_version, "schema_version", "schema_version"),
            (&self.headers, "headers", "headers"),
            (&self.occurred_at, "occurred_at", "occurred_at"),
            (&self.traceparent, "traceparent", "traceparent"),
        ] {
            columns.push(MappedColumn {
                name: configured.as_deref().unwrap_or(default),
                role,
                required: configured.is_some(),
            });
        }
        for extra in &self.additional {
            columns.push(required(&extra.column, "additional"));
        }
        columns
    }
}

/// A column carried along with the event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdditionalColumn {
    pub column: String,
    pub placement: Placement,
    /// The header or attribute name; default: the column name.
    #[serde(rename = "as")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// A message header.
    Header,
    /// An attribute of the envelope (a CloudEvents extension attribute).
    Envelope,
}

/// What to do with an UPDATE or DELETE on an outbox table (Debezium's
/// `table.op.invalid.behavior`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChangePolicy {
    /// Count it and go on.
    #[default]
    Skip,
    /// Store it in the dead-letter table with the row.
    DeadLetter,
    /// Stop the relay with an error.
    Fail,
}

/// What an inserted row with a NULL payload becomes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NullPayloadPolicy {
    /// A dead letter with the reason `column "payload" is NULL`.
    #[default]
    DeadLetter,
    /// Nothing: counted in the session summary, logged at debug level.
    Skip,
    /// An event without a payload: a Kafka record with the event's key and a null value
    /// (Debezium's `route.tombstone.on.empty.payload`). Only Kafka sinks may take the table.
    Tombstone,
}

fn column_id() -> String {
    "id".into()
}

fn column_aggregate_type() -> String {
    "aggregatetype".into()
}

fn column_aggregate_id() -> String {
    "aggregateid".into()
}

fn column_type() -> String {
    "type".into()
}

fn column_payload() -> String {
    "payload".into()
}

fn default_binary_content_type() -> String {
    "application/octet-stream".into()
}

fn default_ce_source() -> String {
    "/{table}".into()
}

/// The mapping `mappings` (`[outbox."schema.table"]`) has for `table`, or the default one.
pub fn mapping_in(mappings: &BTreeMap<String, TableMapping>, table: &str) -> TableMapping {
    let names = parse_table_name(table).ok();
    mappings
        .iter()
        .find(|(t, _)| names.is_some() && parse_table_name(t).ok() == names)
        .map(|(_, m)| m.clone())
        .unwrap_or_default()
}
