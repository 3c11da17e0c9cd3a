//! Which server and which slot the relay's state belongs to: per slot, one row in
//! `{schema}.slots` with the server's system identifier and timeline and the LSN the relay
//! started streaming from. It is written when the relay creates the slot (`run`, `init`, a
//! backfill) or first streams from one it did not create, and it lives in the database, so
//! it is replicated to standbys and dumped and restored with the relay's other tables.
//!
//! Invariants:
//! - A missing slot that has a row here was dropped, or this server is a promoted standby: a
//!   new slot would skip what committed since, so the relay does not create it
//!   ([`crate::source::slot::dropped_slot_problem`]), even before the first checkpoint.
//! - A row of another system identifier, or of a later timeline, means that the relay's
//!   state (checkpoints included) comes from another server: its positions mean nothing
//!   here and skipping by them would drop this server's events, so the relay stops
//!   ([`Origin::compare`]). A promoted standby keeps the system identifier and starts a
//!   later timeline: that is the failover path, and the row follows it.

use crate::db;
use crate::source::replication::SystemInfo;
use crate::sql;
use outbox_relay_sinks::Lsn;
use tokio_postgres::types::PgLsn;
use tokio_postgres::Client;

/// What the relay recorded about a slot's server.
#[derive(Debug, Clone)]
pub struct Origin {
    pub system_id: String,
    pub timeline: u32,
    /// Where the relay's stream from this slot started.
    pub start_lsn: Lsn,
}

/// The relay's state for a slot comes from another server than the one it reached. Not
/// retried: an operator must decide which server the relay belongs to.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ForeignServer(String);

/// The statements that make the relay forget `slot`: its checkpoints and its record, as
/// advice an operator can paste.
pub fn forget_slot_sql(schema: &str, slot: &str) -> String {
    format!(
        "DELETE FROM {} WHERE slot = {}; DELETE FROM {} WHERE slot = {}",
        sql::qualified(schema, "checkpoints"),
        sql::literal(slot),
        sql::qualified(schema, "slots"),
        sql::literal(slot)
    )
}

impl Origin {
    /// The recorded origin of `slot`; `None` if there is none (or the relay's tables do not
    /// exist yet).
    pub async fn load(client: &Client, schema: &str, slot: &str) -> anyhow::Result<Option<Origin>> {
        let table = sql::qualified(schema, "slots");
        let exists = db::table_exists(client, &table).await?;
        if !exists {
            return Ok(None);
        }
        let row = client
            .query_opt(
                &format!("SELECT system_id, timeline, start_lsn FROM {table} WHERE slot = $1"),
                &[&slot],
            )
            .await
            .map_err(db::explain)?;
        Ok(row.map(|row| Origin {
            system_id: row.get(0),
            timeline: u32::try_from(row.get::<_, i64>(1)).unwrap_or_default(),
            start_lsn: Lsn(u64::from(row.get::<_, PgLsn>(2))),
        }))
    }

    /// Records that the relay streams from `slot` on `system`, from `start_lsn` on (a slot it
    /// just created, or one it streams from for the first time); replaces an earlier record.
    pub async fn record(
        client: &Client,
        schema: &str,
        slot: &str,
        system: &SystemInfo,
        start_lsn: Lsn,
    ) -> anyhow::Result<()> {
        client
            .execute(
                &format!(
                    "INSERT INTO {} (slot, system_id, timeline, start_lsn) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (slot) DO UPDATE SET \
                     system_id = EXCLUDED.system_id, timeline = EXCLUDED.timeline, \
                     start_lsn = EXCLUDED.start_lsn, recorded_at = now()",
                    sql::qualified(schema, "slots")
                ),
                &[
                    &slot,
                    &system.system_id,
                    &i64::from(system.timeline),
                    &PgLsn::from(start_lsn.0),
                ],
            )
            .await
            .map_err(db::explain)
            .map_err(|err| {
                err.context(format!(
                    "recording the replication slot in {schema}.slots (run `outbox-relay init`, \
                     which creates that table)"
                ))
            })?;
        Ok(())
    }

    /// Records that `slot`'s server moved on to `timeline` (a promoted standby).
    pub async fn record_timeline(
        client: &Client,
        schema: &str,
        slot: &str,
        timeline: u32,
    ) -> anyhow::Result<()> {
        client
            .execute(
                &format!(
                    "UPDATE {} SET timeline = $2, recorded_at = now() WHERE slot = $1",
                    sql::qualified(schema, "slots")
                ),
                &[&slot, &i64::from(timeline)],
            )
            .await
            .map_err(db::explain)?;
        Ok(())
    }

    /// Whether the server the relay reached is the one its state for `slot` comes from:
    /// `Ok(true)` when it is, on a later timeline (a promoted standby; record it), `Ok(false)`
    /// when nothing changed.
    pub fn compare(
        &self,
        system: &SystemInfo,
        schema: &str,
        slot: &str,
    ) -> Result<bool, ForeignServer> {
        let reset = format!(
            "if the relay is to stream from this server, reset its state for the slot, so that \
             no position of the other server is applied here: {}",
            forget_slot_sql(schema, slot)
        );
        if system.system_id != self.system_id {
            return Err(ForeignServer(format!(
                "the relay's state for slot {slot:?} was recorded on PostgreSQL system \
                 {recorded} (timeline {timeline}), but the server at source.url is system \
                 {current}: another server (a new cluster at the same address, a restored dump \
                 or a copied relay schema). Its checkpoints are positions in system \
                 {recorded}'s WAL, and streaming by them would skip this server's events. \
                 Point source.url at system {recorded}, or, {reset}",
                recorded = self.system_id,
                timeline = self.timeline,
                current = system.system_id,
            )));
        }
        if system.timeline < self.timeline {
            return Err(ForeignServer(format!(
                "the relay's state for slot {slot:?} was recorded on timeline {recorded} of \
                 PostgreSQL system {system_id}, but the server at source.url is on timeline \
                 {current}: it lacks the history the relay streamed (an old primary back after \
                 a failover, say). Point source.url at the current primary, or, {reset}",
                recorded = self.timeline,
                system_id = self.system_id,
                current = system.timeline,
            )));
        }
        Ok(system.timeline > self.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system(system_id: &str, timeline: u32) -> SystemInfo {
        SystemInfo {
            system_id: system_id.into(),
            timeline,
            wal_position: Lsn(100),
        }
    }

    #[test]
    fn only_the_same_system_on_the_same_or_a_later_timeline_is_the_origin() {
        let origin = Origin {
            system_id: "7001".into(),
            timeline: 2,
            start_lsn: Lsn(10),
        };
        assert!(!origin.compare(&system("7001", 2), "r", "s").unwrap());
        assert!(origin.compare(&system("7001", 3), "r", "s").unwrap());
        let foreign = origin
            .compare(&system("7002", 2), "r", "s")
            .unwrap_err()
            .to_string();
        assert!(
            foreign.contains("recorded on PostgreSQL system 7001")
                && foreign.contains("is system 7002")
                && foreign.contains("DELETE FROM \"r\".\"checkpoints\" WHERE slot = 's'; DELETE FROM \"r\".\"slots\" WHERE slot = 's'"),
            "{foreign}"
        );
        let earlier = origin
            .compare(&system("7001", 1), "r", "s")
            .unwrap_err()
            .to_string();
        assert!(earlier.contains("is on timeline 1"), "{earlier}");
    }
}
