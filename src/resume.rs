//! Where each sink resumes: builds the configured sinks (each with the versions it publishes
//! at, [`SinkVersions`]), asks each destination what it
//! holds ([`Sink::recover`]), and decides through which position the sink skips events it
//! has already. Used by streaming and by the backfill alike.
//!
//! Invariant: a sink skips only through a position within this database's history (below
//! the [`Horizon`]); a position beyond it comes from another history, and stops the relay
//! (a [`Problem`]) rather than dropping this database's events without a trace.

use crate::config::Config;
use crate::pipeline::SinkWorker;
use crate::problem::Problem;
use crate::telemetry::{Metrics, METRICS};
use crate::upcast::publish::SinkVersions;
use crate::upcast::sandbox::Limits;
use crate::upcast::Upcasters;
use crate::validation::SchemaRegistry;
use outbox_relay_sinks::{Lsn, Position, SinkError};
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::info;

/// What this relay remembers of the sinks' earlier deliveries, by sink name.
pub struct Remembered<'a> {
    /// The relay's checkpoint table.
    pub stored: &'a BTreeMap<String, Position>,
    /// What the sinks acknowledged in earlier sessions of this process.
    pub acknowledged: &'a BTreeMap<String, Position>,
}

/// Builds the configured sinks and readies each to resume. With `remembered` (streaming),
/// each skips through the furthest position anyone remembers; without (a backfill, which
/// delivers everything below the slot's start again), none skips, but every destination is
/// still checked against the horizon. A sink that fails to recover fails with its own
/// verdict ([`SinkError`]), named.
pub async fn ready_workers(
    config: &Config,
    horizon: Horizon,
    remembered: Option<Remembered<'_>>,
    schemas: Option<&Arc<SchemaRegistry>>,
) -> anyhow::Result<Vec<SinkWorker>> {
    let upcasters = Arc::new(Upcasters::compile(&config.upcast)?);
    let limits = Limits {
        time: config.relay.upcast_timeout,
        memory_bytes: config.relay.upcast_memory_bytes,
    };
    let mut workers = Vec::new();
    for (name, mut sink) in outbox_relay_sinks::build_all(&config.sinks, &config.source.slot)? {
        let recovered = sink.recover().await;
        METRICS.set_sink_up(&name, recovered.is_ok());
        let recovered = match recovered {
            Ok(recovered) => recovered,
            Err(SinkError::Retryable(reason)) => {
                METRICS
                    .sink_retries
                    .get_or_create(&Metrics::sink(&name))
                    .inc();
                return Err(SinkError::Retryable(format!("sink {name}: {reason}")).into());
            }
            Err(SinkError::Permanent(reason)) => {
                return Err(SinkError::Permanent(format!("sink {name}: {reason}")).into())
            }
        };
        let sources = SkipSources {
            stored: remembered
                .as_ref()
                .and_then(|r| r.stored.get(&name).copied()),
            acknowledged: remembered
                .as_ref()
                .and_then(|r| r.acknowledged.get(&name).copied()),
            recovered,
        };
        let skip_through = skip_point(
            &name,
            sources,
            horizon,
            (&config.source.slot, &config.relay.schema),
        )?
        .filter(|_| remembered.is_some());
        if remembered.is_some() {
            info!(sink = %name, skip_through = ?skip_through.map(|p| p.to_string()), "sink ready");
        }
        let versions = SinkVersions::for_sink(
            &name,
            &config.sinks[&name],
            &config.upcast,
            limits,
            &upcasters,
            schemas,
        )?;
        workers.push(SinkWorker {
            name,
            sink,
            skip_through,
            versions,
        });
    }
    Ok(workers)
}

/// Where a sink's earlier deliveries end, by who remembers them.
#[derive(Default)]
pub struct SkipSources {
    /// The sink's row in the relay's checkpoint table.
    pub stored: Option<Position>,
    /// What the sink acknowledged in an earlier session of this process.
    pub acknowledged: Option<Position>,
    /// What the sink's destination says it holds (`Sink::recover`).
    pub recovered: Option<Position>,
}

/// The furthest position this database's history can hold for a sink.
#[derive(Clone, Copy)]
pub enum Horizon {
    /// The server's WAL end when streaming starts: every event ever delivered from this
    /// database lies at or below it.
    WalEnd(Lsn),
    /// A slot created just now starts at the WAL's end at its creation, and events delivered
    /// from this database earlier lie at or below that.
    NewSlot(Lsn),
}

/// The position through which a sink skips events (it has them already), after checking
/// that the position lies within this database's history. A position beyond the horizon
/// comes from another history (a failover to a standby that lagged, a restore, a re-created
/// database), and skipping up to it would drop this database's events without a trace.
pub fn skip_point(
    sink: &str,
    sources: SkipSources,
    horizon: Horizon,
    (slot, schema): (&str, &str),
) -> Result<Option<Position>, Problem> {
    let (limit, consequence) = match horizon {
        Horizon::WalEnd(lsn) => (
            lsn,
            format!(
                "this database's WAL ends at {lsn}, so streaming would skip its events up to there"
            ),
        ),
        Horizon::NewSlot(lsn) => (
            lsn,
            format!(
                "the slot starts at {lsn}, so it would skip this database's events up to there"
            ),
        ),
    };
    let beyond = |position: &Option<Position>| position.filter(|p| p.commit_lsn > limit);
    if let Some(position) = beyond(&sources.recovered) {
        return Err(Problem(format!(
            "sink {sink}: its destination already holds events up to position {position}, but \
             {consequence}. Those events come from another database or from WAL this server \
             never had (a failover to a standby that lagged, a restore from backup, a re-created \
             database). Give the sink a destination that starts afresh (file: a new path; kafka: \
             a new transactional_id; rabbitmq stream: a new producer_name), then start the relay \
             again"
        )));
    }
    if let Some(position) = beyond(&sources.stored) {
        return Err(Problem(format!(
            "sink {sink}: the checkpoint table holds position {position} for slot {slot:?}, but \
             {consequence}. The checkpoint comes from another database or an earlier history (a \
             restore, a copied relay schema). Once the events after it are published another \
             way, or to accept the gap, delete it and start again: DELETE FROM {} WHERE slot = {} \
             AND sink = {}",
            crate::sql::qualified(schema, "checkpoints"),
            crate::sql::literal(slot),
            crate::sql::literal(sink)
        )));
    }
    if let Some(position) = beyond(&sources.acknowledged) {
        return Err(Problem(format!(
            "sink {sink}: this relay delivered events up to position {position} before it \
             reconnected, but {consequence}. The server it reconnected to is not the one it \
             streamed from (a failover to a standby that had not received that WAL): the events \
             it delivered beyond {limit} are not in this database. Check what the sink holds, \
             then start the relay again"
        )));
    }
    Ok([sources.stored, sources.acknowledged, sources.recovered]
        .into_iter()
        .flatten()
        .max())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64) -> Option<Position> {
        Some(Position {
            commit_lsn: Lsn(lsn),
            index: 3,
        })
    }

    fn skip(
        stored: Option<Position>,
        acknowledged: Option<Position>,
        recovered: Option<Position>,
    ) -> Result<Option<Position>, Problem> {
        let sources = SkipSources {
            stored,
            acknowledged,
            recovered,
        };
        skip_point(
            "orders",
            sources,
            Horizon::WalEnd(Lsn(1000)),
            ("outbox_relay", "outbox_relay"),
        )
    }

    #[test]
    fn a_sink_skips_through_the_furthest_position_anyone_remembers() {
        assert_eq!(skip(None, None, None).unwrap(), None);
        assert_eq!(skip(at(10), at(30), at(20)).unwrap(), at(30));
        assert_eq!(skip(at(1000), None, at(999)).unwrap(), at(1000));
    }

    #[test]
    fn a_position_beyond_the_wal_end_stops_the_relay_and_names_its_source() {
        let recovered = skip(at(10), None, at(1001)).unwrap_err().to_string();
        assert!(
            recovered.contains(
                "sink orders: its destination already holds events up to position 0/3E9#3"
            ),
            "{recovered}"
        );
        assert!(recovered.contains("WAL ends at 0/3E8"), "{recovered}");
        let stored = skip(at(2000), None, None).unwrap_err().to_string();
        assert!(stored.contains("DELETE FROM \"outbox_relay\".\"checkpoints\" WHERE slot = 'outbox_relay' AND sink = 'orders'"), "{stored}");
        let acknowledged = skip(None, at(5000), at(20)).unwrap_err().to_string();
        assert!(
            acknowledged.contains("before it reconnected"),
            "{acknowledged}"
        );
        let sources = SkipSources {
            recovered: at(1001),
            ..SkipSources::default()
        };
        let new_slot = skip_point("orders", sources, Horizon::NewSlot(Lsn(1000)), ("s", "r"))
            .unwrap_err()
            .to_string();
        assert!(new_slot.contains("the slot starts at 0/3E8"), "{new_slot}");
    }
}
