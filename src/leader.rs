//! Leader election among relays that share a slot (the sidecars of one app's replicas):
//! only the holder of a session-level advisory lock keyed on the slot streams. The lock lives
//! on a dedicated SQL connection, so PostgreSQL releases it when the leader's process or
//! network dies, and a standby that retries every `leader.interval` takes over.
//!
//! A session starts only while the lock is verified held ([`Leadership::verify`]): after
//! PostgreSQL restarts, the old lock connection is gone and another relay may hold the lock.
//! What retrying cannot fix (a wrong password, a database that does not exist) stops the
//! relay, as it does without election.

use crate::config::Config;
use crate::db;
use crate::telemetry::{Role, METRICS};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// The advisory lock key of a slot: one lock per slot name, shared by all its relays.
const LOCK_KEY_SQL: &str = "hashtextextended('outbox-relay:' || $1, 0)";

/// `FROM` … `WHERE` … of the granted leader lock (`pg_locks l`) of the slot `$1` in this
/// database: how `verify` and `outbox-relay status` look the lock up.
pub(crate) fn granted_lock_sql() -> String {
    format!(
        "pg_locks l, (SELECT {LOCK_KEY_SQL} AS k) lock_key \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND l.classid = ((k >> 32) & 4294967295)::oid \
         AND l.objid = (k & 4294967295)::oid AND l.objsubid = 1"
    )
}

/// Held leadership: the connection that holds the lock.
pub struct Leadership {
    client: tokio_postgres::Client,
    interval: Duration,
    slot: String,
}

impl Leadership {
    /// Waits as a standby until this relay holds the slot's lock; `None` on shutdown, an
    /// error when the server refuses the connection for good.
    pub async fn acquire(
        config: &Config,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Leadership>> {
        let slot = &config.source.slot;
        let interval = config.leader.interval;
        let mut announced = false;
        // A standby keeps its connection between tries.
        let mut connection: Option<tokio_postgres::Client> = None;
        loop {
            match try_lock(config, &mut connection).await {
                Ok(true) => {
                    info!(%slot, "leader: holding the slot's lock; streaming");
                    METRICS.leader.set(1);
                    let client = connection.take().expect("try_lock connected");
                    return Ok(Some(Leadership {
                        client,
                        interval,
                        slot: slot.clone(),
                    }));
                }
                Ok(false) => {
                    METRICS.set_role(Role::Standby);
                    if !announced {
                        info!(%slot, retry_every = ?interval,
                            "standby: another relay holds this slot's leader lock; waiting to take over");
                        announced = true;
                    }
                }
                Err(err) if crate::failure::is_permanent(&err) => {
                    return Err(err.context("taking the leader lock"));
                }
                Err(err) => {
                    METRICS.set_role(Role::Connecting);
                    warn!(error = %format!("{err:#}"), retry_in = ?interval,
                        "cannot reach PostgreSQL for the leader lock");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return Ok(None),
            }
        }
    }

    /// Whether this relay still holds the lock: its connection answers within the interval
    /// and the server lists the lock as granted to that connection.
    pub async fn verify(&self) -> bool {
        let sql = format!(
            "SELECT EXISTS (SELECT FROM {} AND l.pid = pg_backend_pid())",
            granted_lock_sql()
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.slot];
        let query = self.client.query_one(&sql, &params);
        match tokio::time::timeout(self.interval, query).await {
            Ok(Ok(row)) if row.get::<_, bool>(0) => true,
            Ok(Ok(_)) => {
                warn!(slot = %self.slot, "leader: the server does not list this relay's lock; leadership lost");
                false
            }
            Ok(Err(err)) => {
                warn!(error = %format!("{:#}", db::explain(err)), "leader: the lock's connection failed; leadership lost");
                false
            }
            Err(_) => {
                warn!(timeout = ?self.interval, "leader: the lock's connection does not answer; leadership lost");
                false
            }
        }
    }

    /// Completes when this relay can no longer be sure it holds the lock: a check every
    /// interval ([`Leadership::verify`]) failed.
    pub async fn lost(&self) {
        loop {
            tokio::time::sleep(self.interval).await;
            if !self.verify().await {
                break;
            }
        }
        METRICS.leader.set(0);
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // Dropping the client closes its connection, which releases the lock.
        METRICS.leader.set(0);
    }
}

/// Tries the lock once on `connection` (connecting first if needed): whether it was taken.
async fn try_lock(
    config: &Config,
    connection: &mut Option<tokio_postgres::Client>,
) -> anyhow::Result<bool> {
    if connection.as_ref().is_none_or(|c| c.is_closed()) {
        let params = config.source.connect_params()?;
        *connection = Some(db::connect(&params).await?);
    }
    let client = connection.as_ref().expect("connected above");
    let taken = client
        .query_one(
            &format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"),
            &[&config.source.slot],
        )
        .await;
    match taken {
        Ok(row) => Ok(row.get::<_, bool>(0)),
        Err(err) => {
            *connection = None;
            Err(db::explain(err))
        }
    }
}
