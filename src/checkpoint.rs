//! The checkpoint store: per (slot, sink), the highest position below which that sink has
//! acknowledged everything; plus dead letters, which must be as durable as a checkpoint
//! before the stream moves past them. Writes are batched: one statement per interval for all
//! sinks, never one per event.

use crate::db;
use crate::origin::Origin;
use crate::outbox::{DeadLetter, ReplayKey};
use crate::sql;
use anyhow::Context;
use async_trait::async_trait;
use outbox_relay_sinks::{Lsn, Position};
use std::collections::BTreeMap;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

/// Where the relay keeps what it must not forget.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Every sink's stored checkpoint for `slot`.
    async fn load(&self, slot: &str) -> anyhow::Result<BTreeMap<String, Position>>;
    /// Stores the given sinks' checkpoints for `slot` atomically.
    async fn save(&self, slot: &str, positions: &BTreeMap<String, Position>) -> anyhow::Result<()>;
    /// Stores a dead letter; storing the same one again is a no-op.
    async fn dead_letter(&self, slot: &str, letter: &DeadLetter) -> anyhow::Result<()>;
    /// Whether the store's connection is gone for good: every later call fails too.
    fn is_closed(&self) -> bool;
}

/// Checkpoints and dead letters in tables of the relay's schema (see migrations/).
pub struct PgCheckpointStore {
    client: Client,
    load_sql: String,
    save_sql: String,
    dead_letter_sql: String,
}

impl PgCheckpointStore {
    pub fn new(client: Client, schema: &str) -> Self {
        let checkpoints = sql::qualified(schema, "checkpoints");
        let dead_letters = sql::qualified(schema, "dead_letters");
        PgCheckpointStore {
            client,
            load_sql: format!(
                "SELECT sink, commit_lsn, event_index FROM {checkpoints} WHERE slot = $1"
            ),
            save_sql: format!(
                "INSERT INTO {checkpoints} (slot, sink, commit_lsn, event_index, updated_at) \
                 SELECT $1, s.sink, s.lsn::pg_lsn, s.idx, now() \
                 FROM unnest($2::text[], $3::text[], $4::int[]) AS s(sink, lsn, idx) \
                 ON CONFLICT (slot, sink) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, \
                 event_index = EXCLUDED.event_index, updated_at = EXCLUDED.updated_at"
            ),
            dead_letter_sql: format!(
                "INSERT INTO {dead_letters} \
                 (slot, sink, source_table, commit_lsn, event_index, xid, reason, row_data, raw) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (slot, sink, commit_lsn, event_index) DO NOTHING"
            ),
        }
    }
}

#[async_trait]
impl CheckpointStore for PgCheckpointStore {
    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn load(&self, slot: &str) -> anyhow::Result<BTreeMap<String, Position>> {
        let rows = self
            .client
            .query(&self.load_sql, &[&slot])
            .await
            .map_err(db::explain)
            .context("reading checkpoints (did `outbox-relay init` run?)")?;
        Ok(rows
            .iter()
            .map(|row| {
                let lsn: PgLsn = row.get(1);
                let index: i32 = row.get(2);
                let position = Position {
                    commit_lsn: Lsn(u64::from(lsn)),
                    index: index as u32,
                };
                (row.get::<_, String>(0), position)
            })
            .collect())
    }

    async fn save(&self, slot: &str, positions: &BTreeMap<String, Position>) -> anyhow::Result<()> {
        let sinks: Vec<&str> = positions.keys().map(String::as_str).collect();
        let lsns: Vec<String> = positions
            .values()
            .map(|p| p.commit_lsn.to_string())
            .collect();
        let indexes: Vec<i32> = positions.values().map(|p| p.index as i32).collect();
        self.client
            .execute(&self.save_sql, &[&slot, &sinks, &lsns, &indexes])
            .await
            .map_err(db::explain)
            .context("writing checkpoints")?;
        Ok(())
    }

    async fn dead_letter(&self, slot: &str, letter: &DeadLetter) -> anyhow::Result<()> {
        let lsn = PgLsn::from(letter.position.commit_lsn.0);
        let (row, raw) = letter.storable();
        self.client
            .execute(
                &self.dead_letter_sql,
                &[
                    &slot,
                    &letter.sink.as_deref().unwrap_or(""),
                    &letter.table,
                    &lsn,
                    &(letter.position.index as i32),
                    &i64::from(letter.xid),
                    &letter.reason,
                    &row,
                    &raw,
                ],
            )
            .await
            .map_err(db::explain)
            .context("writing a dead letter")?;
        Ok(())
    }
}

/// What keeps the relay's tables from taking dead letters, if anything: the `raw` column
/// (added to `dead_letters` in a later version) is missing until `init` runs again.
pub async fn schema_problem(client: &Client, schema: &str) -> anyhow::Result<Option<String>> {
    let missing: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND NOT EXISTS (SELECT FROM pg_attribute \
             WHERE attrelid = to_regclass($1) AND attname = 'raw' AND NOT attisdropped)",
            &[&sql::qualified(schema, "dead_letters")],
        )
        .await
        .map_err(db::explain)?
        .get(0);
    Ok(missing.then(|| {
        format!(
            "{schema}.dead_letters has no column raw, which this version stores dead letters' \
             exact bytes in: run `outbox-relay init` (it adds the column)"
        )
    }))
}

/// The key `dlq replay` signs with and the relay verifies replays with (see
/// [`ReplayKey`]); `None` when the relay's schema predates it (`init` adds it).
pub async fn load_replay_key(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
) -> anyhow::Result<Option<ReplayKey>> {
    let table = sql::qualified(schema, "replay_key");
    let exists = db::table_exists(client, &table).await?;
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(&format!("SELECT key FROM {table}"), &[])
        .await
        .map_err(db::explain)
        .with_context(|| format!("reading the replay key in {table}"))?;
    Ok(row.map(|row| ReplayKey::new(row.get::<_, &[u8]>(0))))
}

/// Why a missing slot must not simply be created again, if the relay has used it (it has
/// checkpoints for it, or a record in `{schema}.slots`, see [`crate::origin`]): it
/// was dropped, or the server is a promoted standby, and a new slot would start at the
/// current WAL position, skipping everything committed since the relay last read. `None`
/// when there is neither (or the relay's tables do not exist yet). `run`, `init` and
/// `check` ask.
pub async fn dropped_slot_problem(
    client: &Client,
    schema: &str,
    slot: &str,
) -> anyhow::Result<Option<String>> {
    let table = sql::qualified(schema, "checkpoints");
    let exists = db::table_exists(client, &table).await?;
    let last = if exists {
        client
            .query_opt(
                &format!(
                    "SELECT max(commit_lsn)::text FROM {table} WHERE slot = $1 HAVING count(*) > 0"
                ),
                &[&slot],
            )
            .await
            .map_err(db::explain)?
            .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default())
    } else {
        None
    };
    let evidence = match (last, Origin::load(client, schema, slot).await?) {
        (Some(last), _) => format!("the relay has checkpoints for it (up to {last})"),
        (None, Some(origin)) => format!(
            "the relay has used it (created it or streamed from it, from {} on, on system {} \
             timeline {}), though it has no checkpoint yet",
            origin.start_lsn, origin.system_id, origin.timeline
        ),
        (None, None) => return Ok(None),
    };
    Ok(Some(format!(
        "replication slot {slot:?} is gone, but {evidence}: it was dropped, or this server is a \
         promoted standby (before PostgreSQL 17, logical slots do not survive a failover). A new \
         slot would start at the current WAL position, and the events committed since the relay \
         last read would never be published. Publish them another way (source.backfill = true \
         publishes the rows still in the outbox tables, on a new slot), or delete the relay's \
         record of the slot to accept the gap and start afresh: {}",
        crate::origin::forget_slot_sql(schema, slot)
    )))
}
