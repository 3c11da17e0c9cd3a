//! `outbox-relay run`: one replication session at a time, reconnecting with backoff after
//! transient failures, and standing by while another relay holds the slot. This file only
//! wires the data path (its hops are listed in lib.rs) and the session's helper tasks; it
//! holds none of their logic.

use crate::backfill;
use crate::checkpoint::{write_checkpoints, CheckpointStore, PgCheckpointStore};
use crate::config::{Config, ConnectParams};
use crate::db;
use crate::dead_letters::{load_replay_key, DeadLetterStore, PgDeadLetterStore};
use crate::failure::SessionEnd;
use crate::leader::Leadership;
use crate::outbox::{OutboxMapper, ReplayKey};
use crate::pipeline::{self, BatchLimit, Progress};
use crate::problem::Problem;
use crate::reader::{Reader, ReaderLinks};
use crate::resume::{ready_workers, Horizon, Remembered};
use crate::source::heartbeat::heartbeat;
use crate::source::origin::Origin;
use crate::source::publication_watch::{watch_publication, PublicationWatch};
use crate::source::replication::ReplicationConnection;
use crate::source::slot::{self, SlotState};
use crate::source::status::status_updates;
use crate::tables;
use crate::telemetry::{ComponentLabels, Role, METRICS};
use crate::validation::SchemaRegistry;
use outbox_relay_sinks::Position;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

/// Runs the relay until `shutdown` turns true (clean exit) or a permanent error. With leader
/// election on, each session runs only while this relay holds the slot's leader lock.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    METRICS.register_config(
        &config.sinks.keys().cloned().collect::<Vec<_>>(),
        &config.event_sources(),
    );
    // What each sink acknowledged in earlier sessions of this process.
    let mut acknowledged: BTreeMap<String, Position> = BTreeMap::new();
    let mut backoff =
        outbox_relay_sinks::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut standby = false;
    let mut leadership: Option<Leadership> = None;
    loop {
        // Held through a failed session, the lock may be gone (PostgreSQL restarted, and
        // another relay took it): a session starts only while it is verified held.
        drop_leadership_unless_held(&mut leadership).await;
        if config.leader.enabled && leadership.is_none() {
            let mut waiting = shutdown.clone();
            match Leadership::acquire(&config, &mut waiting).await? {
                Some(held) => leadership = Some(held),
                None => return Ok(()),
            }
        }
        let started = Instant::now();
        let (end, lost_leadership) =
            session_while_leader(&config, &mut acknowledged, &shutdown, leadership.as_ref()).await;
        if lost_leadership {
            // Stopped reading at once and drained; stand by for the lock again.
            leadership = None;
            METRICS.set_role(Role::Connecting);
            continue;
        }
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(err) => return Err(err),
            SessionEnd::SlotInUse(err) => {
                drop_leadership_unless_held(&mut leadership).await;
                METRICS.set_role(Role::Standby);
                if !standby {
                    info!(error = %format!("{err:#}"), retry_every = ?STANDBY_RETRY, "standing by until the slot is free");
                    standby = true;
                }
                let mut shutdown = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
            }
            SessionEnd::Retry(err) => {
                drop_leadership_unless_held(&mut leadership).await;
                METRICS.set_role(Role::Connecting);
                METRICS
                    .reconnects
                    .get_or_create(&ComponentLabels {
                        component: "replication".into(),
                    })
                    .inc();
                standby = false;
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(error = %format!("{err:#}"), retry_in = ?delay, "replication session ended; reconnecting");
                let mut shutdown = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
                }
            }
        }
    }
}

/// Gives up leadership that this relay can no longer be sure of ([`Leadership::verify`]).
/// Asked before each session, and at once after a failed one, so that the relay stops
/// reporting itself as the leader while another takes over.
async fn drop_leadership_unless_held(leadership: &mut Option<Leadership>) {
    if let Some(held) = leadership {
        if !held.verify().await {
            *leadership = None;
        }
    }
}

/// Runs one session, stopping it (stop reading, drain, checkpoint) on shutdown or when the
/// leader lock is lost; says whether leadership was lost.
async fn session_while_leader(
    config: &Config,
    acknowledged: &mut BTreeMap<String, Position>,
    shutdown: &watch::Receiver<bool>,
    leadership: Option<&Leadership>,
) -> (SessionEnd, bool) {
    let (stop, stopped) = watch::channel(false);
    let session = session(config, acknowledged, stopped);
    tokio::pin!(session);
    let mut shutdown = shutdown.clone();
    let lost = async {
        match leadership {
            Some(leadership) => leadership.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(lost);
    let mut lost_leadership = false;
    let mut stopping = false;
    // A session told to stop drains within relay.shutdown_timeout and gives up its final
    // writes by then; one still busy after that is stuck in a call that does not return (a
    // query on a locked table while the session starts, say), and is dropped.
    let give_up = tokio::time::sleep(Duration::MAX);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            end = &mut session => return (end, lost_leadership),
            _ = shutdown.wait_for(|stop| *stop), if !stopping => {
                stopping = true;
                give_up.as_mut().reset(tokio::time::Instant::now() + stop_limit(config));
                let _ = stop.send(true);
            }
            _ = &mut lost, if !stopping => {
                warn!("leader lock lost: stopping at once; another relay may take over");
                stopping = true;
                lost_leadership = true;
                give_up.as_mut().reset(tokio::time::Instant::now() + stop_limit(config));
                let _ = stop.send(true);
            }
            _ = &mut give_up => {
                warn!(timeout = ?stop_limit(config), "the session did not stop in time; abandoning it");
                let end = if lost_leadership { SessionEnd::Retry(anyhow::anyhow!("leader lock lost")) } else { SessionEnd::Shutdown };
                return (end, lost_leadership);
            }
        }
    }
}

/// How long a stopping session may take: draining, then the final checkpoint, each bounded
/// by relay.shutdown_timeout, and a little for the status update.
fn stop_limit(config: &Config) -> Duration {
    config.relay.shutdown_timeout * 2 + Duration::from_millis(500)
}

/// How often a standby relay retries a slot that another relay streams from.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// What a session checked and opened before streaming.
struct Prepared {
    /// Read once per session: the password file is read here.
    params: ConnectParams,
    sql: tokio_postgres::Client,
    catalog: tokio_postgres::Client,
    heartbeat_sql: Option<tokio_postgres::Client>,
    connection: ReplicationConnection,
    outbox_oids: HashMap<u32, tables::TableName>,
    schemas: Option<Arc<SchemaRegistry>>,
    slot: SlotState,
}

/// Connects, and checks everything that must hold before streaming: the server is the
/// primary and the one the relay's state comes from, the outbox tables exist, the backfill
/// (if configured) is done, and the slot is usable.
async fn prepare(config: &Config) -> Result<Prepared, SessionEnd> {
    let source = &config.source;
    let schemas = match &config.validation.schema_dir {
        Some(dir) => Some(Arc::new(
            SchemaRegistry::load(dir, config.validation.required).map_err(SessionEnd::Fatal)?,
        )),
        None => None,
    };
    let params = source.connect_params().map_err(SessionEnd::Fatal)?;
    let sql = db::connect(&params).await.map_err(SessionEnd::of)?;
    // The relay cannot run on a standby, and a standby's missing slot says nothing about a
    // dropped one. During a failover the standby the URL reaches may be promoted any moment:
    // retry.
    if db::is_standby(&sql).await.map_err(SessionEnd::of)? {
        return Err(SessionEnd::Retry(anyhow::anyhow!(
            "{}; retrying, in case it is being promoted",
            db::STANDBY_PROBLEM
        )));
    }
    // The replication connection first: the relay's state must be this server's before
    // anything is created, backfilled or skipped by it.
    let mut connection = ReplicationConnection::connect(&params).await?;
    let system = connection.identify_system().await?;
    let origin = slot::check_origin(&sql, config, &system)
        .await
        .map_err(SessionEnd::of)?;
    slot::check_failover_slot_support(&sql, source)
        .await
        .map_err(SessionEnd::of)?;
    // Asked about relations the stream names that are not configured outbox tables (are they
    // partitions of one?); the OIDs tell a renamed outbox table from another table.
    let catalog = db::connect(&params).await.map_err(SessionEnd::of)?;
    let outbox_oids = tables::outbox_oids(&catalog, &source.tables)
        .await
        .map_err(SessionEnd::of)?;
    if let Some(problem) = tables::missing_table_problem(&source.tables, &outbox_oids) {
        return Err(SessionEnd::Fatal(Problem(problem).into()));
    }
    backfill::ensure(config, &params)
        .await
        .map_err(|err| SessionEnd::of(err.context("backfill")))?;
    let slot = slot::prepare(&sql, config).await.map_err(SessionEnd::of)?;
    if slot.created || origin.is_none() {
        Origin::record(
            &sql,
            &config.relay.schema,
            &source.slot,
            &system,
            slot.confirmed_flush,
        )
        .await
        .map_err(SessionEnd::of)?;
    }
    let heartbeat_sql = match source.heartbeat_interval {
        Some(_) => Some(db::connect(&params).await.map_err(SessionEnd::of)?),
        None => None,
    };
    Ok(Prepared {
        params,
        sql,
        catalog,
        heartbeat_sql,
        connection,
        outbox_oids,
        schemas,
        slot,
    })
}

/// The replay key, or `None` (replays refused) with a warning that says how to fix it.
async fn replay_key(sql: &tokio_postgres::Client, schema: &str) -> Option<ReplayKey> {
    match load_replay_key(sql, schema).await {
        Ok(Some(key)) => Some(key),
        Ok(None) => {
            warn!("the relay's schema has no replay key: replayed dead letters are refused until `outbox-relay init` adds it");
            None
        }
        Err(err) => {
            warn!(error = %format!("{err:#}"), "the replay key cannot be read: replayed dead letters are refused (grant the relay's role SELECT on its replay_key table)");
            None
        }
    }
}

async fn session(
    config: &Config,
    acknowledged: &mut BTreeMap<String, Position>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    match stream(config, acknowledged, shutdown).await {
        Ok(end) | Err(end) => end,
    }
}

/// Streams until shutdown or a failure: the pipeline's workers, the reader, and the helper
/// tasks beside them; then drains, writes the final checkpoint and says how it ended.
async fn stream(
    config: &Config,
    acknowledged: &mut BTreeMap<String, Position>,
    shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, SessionEnd> {
    let source = &config.source;
    let prepared = prepare(config).await?;
    let params = prepared.params;
    // Acquire the slot first: once streaming starts no other relay can write to the sinks,
    // so the positions recovered below cannot go stale.
    let (system, stream, status_writer) =
        slot::start_streaming(prepared.connection, config, &prepared.slot).await?;
    let replay_key = replay_key(&prepared.sql, &config.relay.schema).await;
    let sql = Arc::new(prepared.sql);
    let store: Arc<dyn CheckpointStore> =
        Arc::new(PgCheckpointStore::new(sql.clone(), &config.relay.schema));
    let dead_letters: Arc<dyn DeadLetterStore> =
        Arc::new(PgDeadLetterStore::new(sql, &config.relay.schema));
    let stored = store.load(&source.slot).await.map_err(SessionEnd::of)?;
    let horizon = if prepared.slot.created {
        Horizon::NewSlot(prepared.slot.confirmed_flush)
    } else {
        Horizon::WalEnd(system.wal_position)
    };
    let remembered = Remembered {
        stored: &stored,
        acknowledged,
    };
    let workers = ready_workers(config, horizon, Some(remembered), prepared.schemas.as_ref())
        .await
        .map_err(SessionEnd::of)?;

    METRICS.set_role(Role::Streaming);
    info!(slot = %source.slot, publication = %source.publication, from = %prepared.slot.confirmed_flush,
        system_id = %system.system_id, timeline = system.timeline, "streaming");

    let progress = Progress::new(
        workers.iter().map(|w| w.name.clone()),
        prepared.slot.confirmed_flush,
    );
    let limit = BatchLimit::of(&config.relay);
    let (pipeline, worker_handles) = pipeline::start(
        workers,
        progress.clone(),
        dead_letters.clone(),
        &source.slot,
        config.relay.queue_depth,
        limit,
    );
    let (stop_helpers, helpers_stopped) = watch::channel(false);
    let reply_requested = Arc::new(Notify::new());
    let status_task = tokio::spawn(status_updates(
        status_writer,
        progress.clone(),
        source.status_interval,
        reply_requested.clone(),
        helpers_stopped.clone(),
    ));
    let store_lost = Arc::new(Notify::new());
    let checkpoint_task = tokio::spawn(write_checkpoints(
        store.clone(),
        source.slot.clone(),
        progress.clone(),
        config.relay.checkpoint_interval,
        store_lost.clone(),
        helpers_stopped.clone(),
    ));
    let publication_task = tokio::spawn(watch_publication(
        PublicationWatch {
            params: params.clone(),
            publication: source.publication.clone(),
            tables: source.tables.clone(),
            shard: source.sharding(),
            interval: source.publication_check_interval,
        },
        helpers_stopped.clone(),
    ));
    let heartbeat_task =
        prepared
            .heartbeat_sql
            .zip(source.heartbeat_interval)
            .map(|(client, interval)| {
                tokio::spawn(heartbeat(
                    client,
                    params.clone(),
                    interval,
                    helpers_stopped.clone(),
                ))
            });

    let mapper = OutboxMapper::new(&source.tables, &config.outbox, &source.message_prefixes)
        .for_slot(&source.slot)
        .with_replay_key(replay_key);
    let links = ReaderLinks {
        catalog: prepared.catalog,
        outbox_oids: prepared.outbox_oids,
        stop: shutdown,
        store_lost,
        schemas: prepared.schemas,
        pipeline,
        progress: progress.clone(),
        dead_letters,
        slot: source.slot.clone(),
        publication: source.publication.clone(),
        reply_requested,
    };
    let mut reader = Reader::new(stream, mapper, limit, links);
    let mut end = reader.run().await;
    let counts = reader.counts();
    drop(reader); // closes the sink queues: workers drain what they hold, then stop

    let drain = async {
        let mut failures = Vec::new();
        for handle in worker_handles {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => failures.push(err),
                Err(join) => failures.push(anyhow::anyhow!("sink worker panicked: {join}")),
            }
        }
        failures
    };
    match tokio::time::timeout(config.relay.shutdown_timeout, drain).await {
        Ok(failures) => {
            if let Some(err) = failures.into_iter().next() {
                end = SessionEnd::Fatal(err);
            }
        }
        Err(_) => warn!(timeout = ?config.relay.shutdown_timeout,
            "sinks did not drain in time; undelivered events will be sent again after restart"),
    }
    let _ = stop_helpers.send(true);
    // The helpers' connections may be as dead as the stream (a partition): a final write that
    // hangs must not keep the relay from reconnecting.
    let deadline = tokio::time::Instant::now() + config.relay.shutdown_timeout;
    match join_by(checkpoint_task, deadline).await {
        Some(Ok(())) => {}
        Some(Err(err)) => {
            error!(error = %format!("{err:#}"), "the final checkpoint could not be written; events since the last one may be delivered again")
        }
        None => warn!(timeout = ?config.relay.shutdown_timeout,
            "the final checkpoint was not written in time (is the database reachable?); events since the last one may be delivered again"),
    }
    if let Some(Err(err)) = join_by(status_task, deadline).await {
        debug!(error = %err, "final status update failed");
    }
    if let Some(task) = heartbeat_task {
        join_by(task, deadline).await;
    }
    join_by(publication_task, deadline).await;
    for (sink, position) in progress.checkpoints() {
        let entry = acknowledged.entry(sink).or_insert(position);
        *entry = (*entry).max(position);
    }
    info!(
        confirmed = %progress.confirmed(),
        transactions = counts.transactions,
        events = counts.events,
        dead_letters = counts.dead_letters,
        skipped_updates = counts.skipped_updates,
        skipped_deletes = counts.skipped_deletes,
        skipped_null_payloads = counts.skipped_null_payloads,
        truncates = counts.truncates,
        ignored_non_transactional_messages = counts.non_transactional_messages,
        "session ended"
    );
    Ok(end)
}

/// Waits for a helper task until `deadline`; one still running then is aborted. `None` if it
/// did not finish (or panicked).
async fn join_by<T>(
    mut task: tokio::task::JoinHandle<T>,
    deadline: tokio::time::Instant,
) -> Option<T> {
    match tokio::time::timeout_at(deadline, &mut task).await {
        Ok(joined) => joined.ok(),
        Err(_) => {
            task.abort();
            None
        }
    }
}
