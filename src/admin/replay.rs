//! `outbox-relay dlq replay`: publishes dead letters again, after they were fixed in place
//! (their `row_data`), as transactional logical messages signed with the relay's key
//! ([`crate::outbox::ReplayKey`]) so that only they become events again; each is marked
//! replayed in the same transaction.
//!
//! - A letter a sink refused goes back to that sink only; one the mapping or validation
//!   refused (no sink) goes to every sink that takes it.
//! - A letter that would fail again is refused with the reason, unless `force`: its row
//!   must map to an event document, its payload must pass the configured JSON Schemas, and
//!   its sink must still be configured.

use super::dlq::{open_ids, Selection};
use super::relay_table;
use crate::config::Config;
use crate::db;
use crate::validation::SchemaRegistry;
use anyhow::Context;

/// What a replay did with each dead letter.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub replayed: Vec<i64>,
    /// Letters not replayed, with why.
    pub refused: Vec<(i64, String)>,
}

impl ReplayReport {
    pub fn text(&self) -> String {
        let mut out = String::new();
        for id in &self.replayed {
            out.push_str(&format!("dead letter {id} replayed\n"));
        }
        for (id, why) in &self.refused {
            out.push_str(&format!("dead letter {id} not replayed: {why}\n"));
        }
        if self.replayed.is_empty() && self.refused.is_empty() {
            out.push_str("no open dead letter matches\n");
        }
        out
    }
}

/// Replays the dead letters `ids`, or every open one of `selection` when `ids` is empty.
pub async fn dlq_replay(
    config: &Config,
    ids: &[i64],
    selection: &Selection,
    force: bool,
) -> anyhow::Result<ReplayReport> {
    let mut client = db::connect(&config.source.connect_params()?).await?;
    let ids = if ids.is_empty() {
        open_ids(&client, config, selection).await?
    } else {
        ids.to_vec()
    };
    let schemas = match &config.validation.schema_dir {
        Some(dir) => Some(SchemaRegistry::load(dir, config.validation.required)?),
        None => None,
    };
    let mut report = ReplayReport::default();
    for id in ids {
        match replay_one(&mut client, config, id, schemas.as_ref(), force).await? {
            Ok(()) => report.replayed.push(id),
            Err(why) => report.refused.push((id, why)),
        }
    }
    Ok(report)
}

/// Replays dead letter `id` in one transaction: Ok(Err(why)) when it is refused.
async fn replay_one(
    client: &mut tokio_postgres::Client,
    config: &Config,
    id: i64,
    schemas: Option<&SchemaRegistry>,
    force: bool,
) -> anyhow::Result<Result<(), String>> {
    let dead_letters = relay_table(config, "dead_letters");
    let tx = client.transaction().await.map_err(db::explain)?;
    let Some(row) = tx
        .query_opt(
            &format!(
                "SELECT source_table, row_data, replayed_at IS NOT NULL, sink FROM {dead_letters} \
                 WHERE id = $1 AND slot = $2 FOR UPDATE"
            ),
            &[&id, &config.source.slot],
        )
        .await
        .map_err(db::explain)?
    else {
        return Ok(Err(format!(
            "there is no dead letter {id} for slot {}",
            config.source.slot
        )));
    };
    let (table, row_data, replayed, sink): (String, serde_json::Value, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if replayed {
        return Ok(Err("it was already replayed".into()));
    }
    let mut document = match replay_document(config, &table, row_data) {
        Ok(document) => document,
        Err(err) => {
            return Ok(Err(format!(
                "{err:#}: fix it first, e.g. UPDATE {dead_letters} SET row_data = \
                 jsonb_set(row_data, '{{payload}}', to_jsonb('{{\"fixed\": true}}'::text)) WHERE id = {id}"
            )))
        }
    };
    if !force {
        if let Some(why) = would_fail_again(config, schemas, &document, &sink) {
            return Ok(Err(format!(
                "{why}; fix its row_data, or pass --force to replay it as it is"
            )));
        }
    }
    if !sink.is_empty() && config.sinks.contains_key(&sink) {
        document["sink"] = serde_json::json!(sink);
    }
    // Every slot of the database receives the message; the one whose dead letter it is
    // publishes it.
    document["slot"] = serde_json::json!(config.source.slot);
    let key = crate::dead_letters::load_replay_key(&tx, &config.relay.schema)
        .await?
        .context("the relay's schema has no replay key: run `outbox-relay init` (it adds one), then replay again")?;
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&crate::outbox::REPLAY_PREFIX, &key.sign(&document)],
    )
    .await
    .map_err(db::explain)
    .context("publishing the replay (the role needs EXECUTE on pg_logical_emit_message)")?;
    tx.execute(
        &format!("UPDATE {dead_letters} SET replayed_at = now() WHERE id = $1"),
        &[&id],
    )
    .await
    .map_err(db::explain)?;
    tx.commit().await.map_err(db::explain)?;
    Ok(Ok(()))
}

/// Why the replay of `document` (a letter `sink` refused, or none) would be dead-lettered
/// again, as far as the relay can tell before publishing it.
fn would_fail_again(
    config: &Config,
    schemas: Option<&SchemaRegistry>,
    document: &serde_json::Value,
    sink: &str,
) -> Option<String> {
    if !sink.is_empty() && !config.sinks.contains_key(sink) {
        return Some(format!(
            "sink {sink:?}, which refused it, is not configured any more (with --force it goes \
             to every sink that takes it)"
        ));
    }
    let schemas = schemas?;
    let payload = document.get("payload").map(|p| p.to_string());
    schemas
        .check_payload(
            document.get("type").and_then(|t| t.as_str()).unwrap_or(""),
            document.get("schema_version").and_then(|v| v.as_i64()),
            payload.as_deref(),
        )
        .err()
        .map(|reason| format!("its payload still fails validation: {reason}"))
}

/// The outbox event document for a dead letter's (fixed) row: the table's column mapping
/// applied to the stored columns, or the stored message content.
fn replay_document(
    config: &Config,
    table: &str,
    row: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::{json, Value};
    let row = match row {
        Value::Object(mut stored) if stored.contains_key(crate::outbox::EVENT_DOCUMENT) => {
            stored.remove(crate::outbox::EVENT_DOCUMENT);
            return event_document(table, stored);
        }
        row => row,
    };
    let mut document = match (table.strip_prefix("message:"), row) {
        (Some(_), Value::String(content)) => {
            serde_json::from_str(&content).context("the stored message content is not JSON")?
        }
        (Some(_), other) => other,
        (None, Value::Object(columns)) => {
            let mapping = config.mapping_for(table);
            let text = |column: &str| match columns.get(column) {
                Some(Value::String(text)) => Some(text.clone()),
                Some(Value::Number(number)) => Some(number.to_string()),
                _ => None,
            };
            let required = |column: &str| {
                text(column)
                    .with_context(|| format!("column {column:?} is missing or NULL in row_data"))
            };
            let payload = required(&mapping.payload)?;
            let mut document = json!({
                "id": required(&mapping.id)?,
                "aggregatetype": required(&mapping.aggregate_type)?,
                "aggregateid": required(&mapping.aggregate_id)?,
                "type": required(&mapping.event_type)?,
                "payload": serde_json::from_str::<Value>(&payload).context("the payload is not valid JSON")?,
            });
            if let Some(key) = mapping.key.as_deref().and_then(text) {
                document["key"] = json!(key);
            }
            let optional = [
                (
                    "schema_version",
                    mapping
                        .schema_version
                        .as_deref()
                        .unwrap_or("schema_version"),
                ),
                ("headers", mapping.headers.as_deref().unwrap_or("headers")),
                (
                    "occurred_at",
                    mapping.occurred_at.as_deref().unwrap_or("occurred_at"),
                ),
                (
                    "traceparent",
                    mapping.traceparent.as_deref().unwrap_or("traceparent"),
                ),
            ];
            for (field, column) in optional {
                if let Some(value) = text(column) {
                    document[field] = match field {
                        "schema_version" => json!(value
                            .parse::<i64>()
                            .context("schema_version is not an integer")?),
                        "headers" => {
                            serde_json::from_str(&value).context("headers is not a JSON object")?
                        }
                        "occurred_at" => json!(crate::outbox::pg_timestamp_to_rfc3339(&value)
                            .context("occurred_at is not a timestamp")?),
                        _ => json!(value),
                    };
                }
            }
            document
        }
        (None, _) => anyhow::bail!("the stored row is not an object of columns"),
    };
    document["table"] = json!(table);
    Ok(document)
}

/// The event document of a letter refused after mapping (`row_data` as
/// [`crate::outbox::DeadLetter::from_event`] stores it, marker removed): its fields as they
/// were, the payload parsed from the text it is stored as.
fn event_document(
    table: &str,
    mut stored: serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::Value;
    let payload = match stored.get("payload") {
        Some(Value::String(text)) => {
            serde_json::from_str::<Value>(text).context("the payload is not valid JSON")?
        }
        Some(Value::Null) | None => {
            anyhow::bail!("a tombstone (NULL payload) is not replayed: nothing to fix in it")
        }
        Some(other) => other.clone(),
    };
    stored.insert("payload".into(), payload);
    for field in ["id", "aggregatetype", "aggregateid", "type"] {
        if !stored.get(field).is_some_and(Value::is_string) {
            anyhow::bail!("{field:?} is missing or not text in row_data");
        }
    }
    stored.retain(|_, value| !value.is_null());
    stored.insert("table".into(), Value::String(table.to_owned()));
    Ok(Value::Object(stored))
}
