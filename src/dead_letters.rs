//! The dead-letter store: rows that cannot become events, and events a sink refused for
//! good, each with its reason, in the `dead_letters` table of the relay's schema. Also the
//! key `dlq replay` signs replays with.
//!
//! Invariants: a dead letter is stored before the stream moves past it (it must be as
//! durable as a checkpoint); the store takes any bytes (the exact row in `raw`, beside a
//! jsonb-safe `row_data`); storing the same dead letter again is a no-op.

use crate::db;
use crate::outbox::{DeadLetter, ReplayKey};
use crate::sql;
use anyhow::Context;
use async_trait::async_trait;
use std::sync::Arc;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

/// Where dead letters go.
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// Stores a dead letter; storing the same one again is a no-op.
    async fn store(&self, slot: &str, letter: &DeadLetter) -> anyhow::Result<()>;
}

/// Dead letters in the `dead_letters` table of the relay's schema (see migrations/).
pub struct PgDeadLetterStore {
    client: Arc<Client>,
    insert_sql: String,
}

impl PgDeadLetterStore {
    pub fn new(client: Arc<Client>, schema: &str) -> Self {
        let dead_letters = sql::qualified(schema, "dead_letters");
        PgDeadLetterStore {
            client,
            insert_sql: format!(
                "INSERT INTO {dead_letters} \
                 (slot, sink, source_table, commit_lsn, event_index, xid, reason, row_data, raw) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (slot, sink, commit_lsn, event_index) DO NOTHING"
            ),
        }
    }
}

#[async_trait]
impl DeadLetterStore for PgDeadLetterStore {
    async fn store(&self, slot: &str, letter: &DeadLetter) -> anyhow::Result<()> {
        let lsn = PgLsn::from(letter.position.commit_lsn.0);
        let (row, raw) = letter.storable();
        self.client
            .execute(
                &self.insert_sql,
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
