//! `outbox-relay dlq`: list, show and purge dead letters, selected by sink, table, reason
//! and time. Replays live beside this file (`replay.rs`).

use super::relay_table;
use crate::config::{parse_table_name, Config};
use crate::db;
use anyhow::Context;
use serde::Serialize;
use std::time::{Duration, SystemTime};
use tokio_postgres::types::ToSql;

/// Which dead letters a `dlq` command is about; every given part must match.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Selection {
    /// The sink that refused them (`""` for rows the mapping or validation refused).
    #[arg(long)]
    pub sink: Option<String>,
    /// The outbox table they came from (`schema.table`, or `message:PREFIX`).
    #[arg(long)]
    pub table: Option<String>,
    /// Text their reason contains (case-insensitive).
    #[arg(long)]
    pub reason: Option<String>,
    /// Stored at or after this time: an RFC 3339 time, or a duration ago (`2h`, `7d`).
    #[arg(long, value_parser = parse_when)]
    pub since: Option<SystemTime>,
    /// Stored before this time: an RFC 3339 time, or a duration ago.
    #[arg(long, value_parser = parse_when)]
    pub until: Option<SystemTime>,
}

impl Selection {
    /// The SQL condition (after `WHERE slot = $1`) and its text parameters, numbered from $2.
    fn condition(&self, slot: &str) -> (String, Vec<String>) {
        let mut sql = String::from("slot = $1");
        let mut params = vec![slot.to_owned()];
        let mut add = |clause: &str, value: String| {
            params.push(value);
            sql.push_str(&clause.replace('$', &format!("${}", params.len())));
        };
        if let Some(sink) = &self.sink {
            add(" AND sink = $", sink.clone());
        }
        if let Some(table) = &self.table {
            let table = match parse_table_name(table) {
                Ok((schema, name)) if !table.starts_with("message:") => format!("{schema}.{name}"),
                _ => table.clone(),
            };
            add(" AND source_table = $", table);
        }
        if let Some(reason) = &self.reason {
            add(" AND strpos(lower(reason), lower($)) > 0", reason.clone());
        }
        if let Some(since) = self.since {
            add(" AND created_at >= $::text::timestamptz", rfc3339(since));
        }
        if let Some(until) = self.until {
            add(" AND created_at < $::text::timestamptz", rfc3339(until));
        }
        (sql, params)
    }
}

/// An RFC 3339 time, or a duration before now.
fn parse_when(text: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        return SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{text} ago is before the epoch"));
    }
    humantime::parse_rfc3339_weak(text).map_err(|_| {
        format!(
            "{text:?} is neither a duration (2h, 7d) nor an RFC 3339 time (2026-01-31T12:00:00Z)"
        )
    })
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_micros(time).to_string()
}

/// Text parameters as the client takes them.
fn as_params(params: &[String]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

/// One dead letter as `dlq list` shows it.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub id: i64,
    pub created_at: String,
    pub sink: String,
    pub table: String,
    /// `commit_lsn#index`.
    pub position: String,
    pub reason: String,
    pub replayed_at: Option<String>,
}

/// `dlq list`: the newest `limit` dead letters of `selection` (only those not replayed yet
/// with `open`), oldest first, as text lines or a JSON array.
pub async fn dlq_list(
    config: &Config,
    selection: &Selection,
    open: bool,
    limit: i64,
    json: bool,
) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let (mut condition, params) = selection.condition(&config.source.slot);
    if open {
        condition.push_str(" AND replayed_at IS NULL");
    }
    let rows = client
        .query(
            &format!(
                "SELECT id, created_at::text, sink, source_table, \
                 commit_lsn::text || '#' || event_index, reason, replayed_at::text \
                 FROM {} WHERE {condition} ORDER BY id DESC LIMIT {}",
                relay_table(config, "dead_letters"),
                limit.max(0)
            ),
            &as_params(&params),
        )
        .await
        .map_err(db::explain)
        .context("reading dead letters (run `outbox-relay init` first)")?;
    let listed: Vec<Listed> = rows
        .iter()
        .rev()
        .map(|row| Listed {
            id: row.get(0),
            created_at: row.get(1),
            sink: row.get(2),
            table: row.get(3),
            position: row.get(4),
            reason: row.get(5),
            replayed_at: row.get(6),
        })
        .collect();
    if json {
        return Ok(serde_json::to_string_pretty(&listed)? + "\n");
    }
    let mut out = String::new();
    for letter in &listed {
        out.push_str(&format!(
            "{:>6}  {}  {}  {}{}{}  {}\n",
            letter.id,
            letter.created_at,
            letter.table,
            letter.position,
            if letter.sink.is_empty() {
                String::new()
            } else {
                format!("  sink={}", letter.sink)
            },
            if letter.replayed_at.is_some() {
                "  (replayed)"
            } else {
                ""
            },
            letter.reason,
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
                 'row', row_data, 'replayed_at', replayed_at), raw FROM {} WHERE id = $1 AND slot = $2",
                relay_table(config, "dead_letters")
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

/// `dlq purge`: deletes the dead letters of `selection` stored more than `older_than` ago
/// (only replayed ones with `replayed_only`); says how many.
pub async fn dlq_purge(
    config: &Config,
    selection: &Selection,
    older_than: Duration,
    replayed_only: bool,
) -> anyhow::Result<String> {
    let client = db::connect(&config.source.connect_params()?).await?;
    let cutoff = SystemTime::now()
        .checked_sub(older_than)
        .context("--older-than reaches before the epoch")?;
    let (mut condition, mut params) = selection.condition(&config.source.slot);
    params.push(rfc3339(cutoff));
    condition.push_str(&format!(
        " AND created_at < ${}::text::timestamptz",
        params.len()
    ));
    if replayed_only {
        condition.push_str(" AND replayed_at IS NOT NULL");
    }
    let deleted = client
        .execute(
            &format!(
                "DELETE FROM {} WHERE {condition}",
                relay_table(config, "dead_letters")
            ),
            &as_params(&params),
        )
        .await
        .map_err(db::explain)
        .context("purging dead letters (the role needs DELETE on the relay's dead_letters)")?;
    Ok(format!(
        "{deleted} dead letter(s) stored before {} purged\n",
        rfc3339(cutoff)
    ))
}

/// The ids of the dead letters of `selection` not replayed yet, oldest first.
pub(super) async fn open_ids(
    client: &tokio_postgres::Client,
    config: &Config,
    selection: &Selection,
) -> anyhow::Result<Vec<i64>> {
    let (condition, params) = selection.condition(&config.source.slot);
    let rows = client
        .query(
            &format!(
                "SELECT id FROM {} WHERE {condition} AND replayed_at IS NULL ORDER BY id",
                relay_table(config, "dead_letters")
            ),
            &as_params(&params),
        )
        .await
        .map_err(db::explain)?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selection_is_one_numbered_condition_per_part() {
        let selection = Selection {
            sink: Some("rmq".into()),
            table: Some("outbox".into()),
            reason: Some("too large".into()),
            ..Selection::default()
        };
        let (sql, params) = selection.condition("slot");
        assert_eq!(
            sql,
            "slot = $1 AND sink = $2 AND source_table = $3 AND strpos(lower(reason), lower($4)) > 0"
        );
        assert_eq!(params, ["slot", "rmq", "public.outbox", "too large"]);
        let message = Selection {
            table: Some("message:outbox".into()),
            ..Selection::default()
        };
        assert_eq!(message.condition("s").1, ["s", "message:outbox"]);
    }

    #[test]
    fn a_time_is_a_duration_ago_or_an_rfc3339_time() {
        let ago = parse_when("2h").unwrap();
        let elapsed = SystemTime::now().duration_since(ago).unwrap();
        assert!(elapsed >= Duration::from_secs(7200) && elapsed < Duration::from_secs(7300));
        assert!(parse_when("2026-01-31T12:00:00Z").is_ok());
        assert!(parse_when("yesterday").unwrap_err().contains("neither"));
    }
}
