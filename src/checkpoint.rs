//! The checkpoint store: per (slot, sink), the highest position below which that sink has
//! acknowledged everything, and the task that writes it. Writes are batched: one statement
//! per interval for all sinks, never one per event.
//!
//! Invariant: a stored position is one the pipeline reports as acknowledged
//! ([`Progress::checkpoints`]); a failed write only delays the restart point, it never
//! moves it past what a sink acknowledged.

use crate::db;
use crate::pipeline::Progress;
use crate::sql;
use crate::telemetry::{gauge_value, Metrics, METRICS};
use anyhow::Context;
use async_trait::async_trait;
use outbox_relay_sinks::{Lsn, Position};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;
use tracing::{error, warn};

/// Where the relay keeps how far each sink got.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// Every sink's stored checkpoint for `slot`.
    async fn load(&self, slot: &str) -> anyhow::Result<BTreeMap<String, Position>>;
    /// Stores the given sinks' checkpoints for `slot` atomically.
    async fn save(&self, slot: &str, positions: &BTreeMap<String, Position>) -> anyhow::Result<()>;
    /// Whether the store's connection is gone for good: every later call fails too.
    fn is_closed(&self) -> bool;
}

/// Checkpoints in the `checkpoints` table of the relay's schema (see migrations/).
pub struct PgCheckpointStore {
    client: Arc<Client>,
    load_sql: String,
    save_sql: String,
}

impl PgCheckpointStore {
    pub fn new(client: Arc<Client>, schema: &str) -> Self {
        let checkpoints = sql::qualified(schema, "checkpoints");
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
}

/// Writes changed checkpoints every `interval`, and once more on stop. A failed write is
/// retried at the next tick: the stream goes on, only the restart point lags. A closed
/// connection is not retried: `store_lost` tells the reader to end the session.
pub async fn write_checkpoints(
    store: Arc<dyn CheckpointStore>,
    slot: String,
    progress: Arc<Progress>,
    interval: Duration,
    store_lost: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut saved = BTreeMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = stop.wait_for(|stop| *stop) => true,
        };
        let current = progress.checkpoints();
        if current != saved {
            match store.save(&slot, &current).await {
                Ok(()) => {
                    for (sink, position) in &current {
                        METRICS
                            .sink_checkpoint_lsn
                            .get_or_create(&Metrics::sink(sink))
                            .set(gauge_value(position.commit_lsn.0));
                    }
                    saved = current;
                }
                Err(err) if stopping => return Err(err),
                // The connection died: no later write can succeed on it. End the session, and
                // the next one connects afresh (and re-reads from the last checkpoint).
                Err(err) if store.is_closed() => {
                    error!(error = %format!("{err:#}"), "the connection for checkpoints closed; reconnecting");
                    store_lost.notify_one();
                    return Err(err);
                }
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "writing checkpoints failed; retrying")
                }
            }
        }
        if stopping {
            return Ok(());
        }
    }
}
