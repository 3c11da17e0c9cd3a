//! `outbox-relay dlq`: list, show and replay dead letters. A replay is signed with the
//! relay's key ([`crate::outbox::ReplayKey`]) so that only it becomes an event again.

use super::relay_table;
use crate::config::Config;
use crate::db;
use anyhow::Context;

/// `dlq list`: the newest dead letters, one line each.
pub async fn dlq_list(config: &Config, limit: i64) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let dead_letters = relay_table(config, "dead_letters");
    let rows = client
        .query(
            &format!(
                "SELECT id, created_at::text, sink, source_table, commit_lsn::text, event_index, reason, \
                 replayed_at IS NOT NULL FROM {dead_letters} WHERE slot = $1 ORDER BY id DESC LIMIT $2"
            ),
            &[&config.source.slot, &limit],
        )
        .await
        .map_err(db::explain)
        .context("reading dead letters (run `outbox-relay init` first)")?;
    let mut out = String::new();
    for row in rows.iter().rev() {
        let sink: String = row.get(2);
        out.push_str(&format!(
            "{:>6}  {}  {}  {}#{}{}{}  {}\n",
            row.get::<_, i64>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(3),
            row.get::<_, String>(4),
            row.get::<_, i32>(5),
            if sink.is_empty() {
                String::new()
            } else {
                format!("  sink={sink}")
            },
            if row.get::<_, bool>(7) {
                "  (replayed)"
            } else {
                ""
            },
            row.get::<_, String>(6),
        ));
    }
    if out.is_empty() {
        out.push_str("no dead letters\n");
    }
    Ok(out)
}

/// `dlq show ID`: one dead letter as JSON, with its raw row. When `row_data` is not exact
/// (NUL characters or bytes that are not UTF-8 became U+FFFD), `raw` shows the exact bytes,
/// escaped (`\xe9`, `\x00`): the content of a message, or each column of a row.
pub async fn dlq_show(config: &Config, id: i64) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT jsonb_build_object('id', id, 'created_at', created_at, 'sink', sink, 'table', source_table, \
                 'commit_lsn', commit_lsn::text, 'event_index', event_index, 'xid', xid, 'reason', reason, \
                 'row', row_data, 'replayed_at', replayed_at), raw FROM {}.dead_letters WHERE id = $1 AND slot = $2",
                config.relay.schema
            ),
            &[&id, &config.source.slot],
        )
        .await
        .map_err(db::explain)?
        .with_context(|| format!("there is no dead letter {id} for slot {}", config.source.slot))?;
    let mut letter: serde_json::Value = row.get(0);
    if let Some(raw) = row.get::<_, Option<Vec<u8>>>(1) {
        letter["raw"] = show_raw(&letter["row"], &raw);
    }
    Ok(serde_json::to_string_pretty(&letter)? + "\n")
}

/// A dead letter's exact bytes, readably: escaped text for a message's content (its `row` is
/// a string), an object of escaped column values for a row.
fn show_raw(row: &serde_json::Value, raw: &[u8]) -> serde_json::Value {
    use serde_json::Value;
    let escaped = |bytes: &[u8]| Value::String(bytes.escape_ascii().to_string());
    match (row, crate::outbox::unframe_columns(raw)) {
        (Value::Object(_), Some(columns)) => Value::Object(
            columns
                .into_iter()
                .map(|(name, value)| (name, value.map_or(Value::Null, |v| escaped(&v))))
                .collect(),
        ),
        _ => escaped(raw),
    }
}

/// `dlq replay ID`: publishes a dead letter again, after it was fixed in place (its
/// `row_data`), as a transactional logical message the relay maps like the original row;
/// marks it replayed in the same transaction.
pub async fn dlq_replay(config: &Config, id: i64) -> anyhow::Result<String> {
    let mut client = db::connect(&config.source.connect_params()?).await?;
    let dead_letters = relay_table(config, "dead_letters");
    let tx = client.transaction().await.map_err(db::explain)?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT source_table, row_data, replayed_at IS NOT NULL FROM {dead_letters} \
                 WHERE id = $1 AND slot = $2 FOR UPDATE"
            ),
            &[&id, &config.source.slot],
        )
        .await
        .map_err(db::explain)?
        .with_context(|| {
            format!(
                "there is no dead letter {id} for slot {}",
                config.source.slot
            )
        })?;
    let (table, row_data, replayed): (String, serde_json::Value, bool) =
        (row.get(0), row.get(1), row.get(2));
    if replayed {
        anyhow::bail!("dead letter {id} was already replayed");
    }
    let document = replay_document(config, &table, row_data).with_context(|| {
        format!(
            "dead letter {id} cannot be replayed as it is: fix it first, e.g. \
             UPDATE {dead_letters} SET row_data = jsonb_set(row_data, '{{payload}}', to_jsonb('{{\"fixed\": true}}'::text)) WHERE id = {id}"
        )
    })?;
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
    Ok(format!(
        "dead letter {id} replayed: the relay publishes it as a new event of {table}\n"
    ))
}

/// The outbox event document for a dead letter's (fixed) row: the table's column mapping
/// applied to the stored columns, or the stored message content.
fn replay_document(
    config: &Config,
    table: &str,
    row: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::{json, Value};
    let mut document = match (table.strip_prefix("message:"), row) {
        (Some(_), Value::String(content)) => {
            serde_json::from_str(&content).context("the stored message content is not JSON")?
        }
        (Some(_), other) => other,
        (None, Value::Object(columns)) => {
            let mapping = config.mapping_for(table);
            let text = |column: &str| {
                columns
                    .get(column)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
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
