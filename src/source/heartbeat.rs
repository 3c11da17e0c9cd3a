//! The optional heartbeat (`source.heartbeat_interval`): a non-transactional logical message
//! at every tick, so the slot advances (and the server can recycle WAL) even when the
//! outbox tables see no writes while the rest of the database does.
//!
//! Invariant: a failed heartbeat only warns; it never ends the session.

use crate::config::ConnectParams;
use crate::db;
use crate::telemetry::{gauge_value, METRICS};
use std::time::Duration;
use tokio::sync::watch;
use tracing::warn;

/// Emits a non-transactional logical message so the slot advances even when this
/// database has no other writes; a connection that died is opened again at the next tick.
pub async fn heartbeat(
    client: tokio_postgres::Client,
    params: ConnectParams,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = Some(client);
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match db::connect(&params).await {
                Ok(client) => Some(client),
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "heartbeat: cannot connect; trying again at the next tick");
                    continue;
                }
            };
        }
        let Some(sql) = &client else { continue };
        let written = sql
            .execute(
                "SELECT pg_logical_emit_message(false, 'outbox-relay-heartbeat', '')",
                &[],
            )
            .await;
        match written {
            Ok(_) => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                METRICS
                    .last_heartbeat_seconds
                    .set(now.map_or(0, |d| gauge_value(d.as_secs())));
            }
            Err(err) => {
                warn!(error = %format!("{:#}", db::explain(err)),
                    "heartbeat failed (the relay's role needs EXECUTE on pg_logical_emit_message)");
            }
        }
    }
}
