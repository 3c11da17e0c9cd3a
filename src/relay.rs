//! `outbox-relay run`: one replication session at a time, reconnecting with backoff after
//! transient failures. A session wires the data path: replication stream → pgoutput decoder →
//! outbox mapping → pipeline → sinks, with three helpers beside it: the status updater (its
//! own timer, so a stalled pipeline never trips `wal_sender_timeout`), the checkpoint writer
//! (batched), and the optional heartbeat.

use crate::checkpoint::{
    dropped_slot_problem, load_replay_key, CheckpointStore, PgCheckpointStore,
};
use crate::config::ChangePolicy;
use crate::config::{Config, ConnectParams, SourceConfig};
use crate::db;
use crate::leader::Leadership;
use crate::origin::Origin;
use crate::outbox::{
    DeadLetter, Mapped, OutboxMapper, RowChange, RowContext, PG_EPOCH_OFFSET_MICROS,
};
use crate::pipeline::{self, BatchLimit, PendingBatch, Pipeline, Progress, SinkWorker, WorkerGone};
use crate::source::pgoutput::{self, Message, Relation, Tuple};
use crate::source::replication::{
    ReplicationConnection, ReplicationStream, SourceError, StatusWriter, SystemInfo,
};
use crate::source::wire::ReplicationMessage;
use crate::tables;
use crate::telemetry::{gauge_value, ComponentLabels, Metrics, Role, METRICS};
use crate::validation::SchemaRegistry;
use bytes::Bytes;
use outbox_relay_sinks::{Lsn, Position, Sink, SinkError};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// Shutdown was requested and everything was drained and checkpointed.
    Shutdown,
    /// Something that may heal (network, server restart): try again with backoff.
    Retry(anyhow::Error),
    /// Another relay streams from the slot: wait as a standby and try again shortly.
    SlotInUse(anyhow::Error),
    /// Something an operator must fix.
    Fatal(anyhow::Error),
}

/// Runs the relay until `shutdown` turns true (clean exit) or a permanent error. With leader
/// election on, each session runs only while this relay holds the slot's leader lock.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
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

fn classify_source(err: SourceError) -> SessionEnd {
    if err.is_slot_in_use() {
        SessionEnd::SlotInUse(err.into())
    } else if err.is_retryable() {
        SessionEnd::Retry(err.into())
    } else {
        SessionEnd::Fatal(err.into())
    }
}

/// Connection-level SQL failures are retried; what the server refuses for good (by its
/// SQLSTATE, see [`db::SqlError::is_permanent`], or a replication error that retrying cannot
/// fix) is fatal.
fn classify_sql(err: anyhow::Error) -> SessionEnd {
    let permanent = db::is_permanent(&err)
        || err.chain().any(|cause| {
            cause
                .downcast_ref::<SourceError>()
                .is_some_and(|e| !e.is_retryable())
                // A refused certificate or a server without TLS under sslmode=require:
                // retrying cannot help, the configuration must change. tokio-postgres gives
                // this failure no code or type of its own.
                || cause.to_string().contains("error performing TLS handshake")
        });
    if permanent {
        SessionEnd::Fatal(err)
    } else {
        SessionEnd::Retry(err)
    }
}

/// The slot's state, checked before streaming so problems have clear messages.
struct SlotState {
    confirmed_flush: Lsn,
    /// Created by this session: it starts at `confirmed_flush`, the WAL's end at creation.
    created: bool,
    /// An existing slot that `source.failover_slot` asks to make a failover slot.
    needs_failover: bool,
}

async fn prepare_slot(
    sql: &tokio_postgres::Client,
    config: &Config,
) -> Result<SlotState, SessionEnd> {
    let source = &config.source;
    for problem in tables::publication_problems(sql, &source.publication, &source.tables)
        .await
        .map_err(classify_sql)?
    {
        if problem.is_warning() {
            warn!("{problem}");
        } else {
            return Err(SessionEnd::Fatal(anyhow::anyhow!(problem)));
        }
    }
    if let Some(problem) = crate::checkpoint::schema_problem(sql, &config.relay.schema)
        .await
        .map_err(classify_sql)?
    {
        return Err(SessionEnd::Fatal(anyhow::anyhow!(problem)));
    }
    let row = sql
        .query_opt(
            &format!(
                "SELECT {}, confirmed_flush_lsn::text, {} FROM pg_replication_slots s \
                 WHERE slot_name = $1",
                db::SLOT_USABILITY,
                db::SLOT_IS_FAILOVER
            ),
            &[&source.slot],
        )
        .await
        .map_err(|e| classify_sql(db::explain(e)))?;
    let created = row.is_none();
    let row = match row {
        Some(row) => row,
        None if source.create_slot => {
            refuse_to_recreate_a_dropped_slot(sql, config).await?;
            info!(slot = %source.slot, "creating the replication slot");
            // The function's own result, not a join with pg_replication_slots: the planner
            // may scan the view first, and on a server with no slots it then never calls
            // the function at all.
            sql.query_one(
                &format!(
                    "SELECT 'pgoutput', current_database()::text, current_database()::text, \
                     NULL::text, lsn::text, $2::bool FROM {}",
                    db::create_slot_call(source.failover_slot)
                ),
                &[&source.slot, &source.failover_slot],
            )
            .await
            .map_err(|e| classify_sql(db::explain(e).context("creating the replication slot")))?
        }
        None => {
            return Err(SessionEnd::Fatal(anyhow::anyhow!(
                "replication slot {:?} does not exist: run `outbox-relay init`, or set source.create_slot = true",
                source.slot
            )))
        }
    };
    if let Some(problem) = db::slot_refusal(&row, 0, &source.slot, &config.relay.schema) {
        return Err(SessionEnd::Fatal(anyhow::anyhow!(problem)));
    }
    let confirmed: Option<String> = row.get(4);
    let confirmed_flush = confirmed
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .map_err(|e: String| SessionEnd::Fatal(anyhow::anyhow!(e)))?;
    let failover: bool = row.get(5);
    Ok(SlotState {
        confirmed_flush,
        created,
        needs_failover: source.failover_slot && !failover,
    })
}

/// Stops the relay if its state for the slot comes from another server (see
/// [`crate::origin`]); follows a promoted standby's new timeline. Returns the recorded origin.
async fn check_origin(
    sql: &tokio_postgres::Client,
    config: &Config,
    system: &SystemInfo,
) -> Result<Option<Origin>, SessionEnd> {
    let (schema, slot) = (&config.relay.schema, &config.source.slot);
    let origin = Origin::load(sql, schema, slot)
        .await
        .map_err(classify_sql)?;
    if let Some(origin) = &origin {
        let new_timeline = origin
            .compare(system, schema, slot)
            .map_err(|err| SessionEnd::Fatal(err.into()))?;
        if new_timeline {
            info!(%slot, system_id = %system.system_id, from = origin.timeline, to = system.timeline,
                "the server moved on to a new timeline (a promoted standby); recording it");
            Origin::record_timeline(sql, schema, slot, system.timeline)
                .await
                .map_err(classify_sql)?;
        }
    }
    Ok(origin)
}

/// `source.failover_slot` on a server without failover slots stops the relay; what may keep
/// the failover slot from working is worth a warning.
async fn check_failover_slot_support(
    sql: &tokio_postgres::Client,
    source: &SourceConfig,
) -> Result<(), SessionEnd> {
    if !source.failover_slot {
        return Ok(());
    }
    if let Some(problem) = db::failover_slot_problem(sql).await.map_err(classify_sql)? {
        return Err(SessionEnd::Fatal(anyhow::anyhow!(problem)));
    }
    for warning in db::failover_slot_warnings(sql)
        .await
        .map_err(classify_sql)?
    {
        warn!(slot = %source.slot, "{warning}");
    }
    Ok(())
}

/// A missing slot that this relay has checkpoints for is not created again (see
/// [`dropped_slot_problem`]).
async fn refuse_to_recreate_a_dropped_slot(
    sql: &tokio_postgres::Client,
    config: &Config,
) -> Result<(), SessionEnd> {
    match dropped_slot_problem(sql, &config.relay.schema, &config.source.slot)
        .await
        .map_err(classify_sql)?
    {
        Some(problem) => Err(SessionEnd::Fatal(anyhow::anyhow!(problem))),
        None => Ok(()),
    }
}

/// Builds the configured sinks.
pub fn build_sinks(config: &Config) -> anyhow::Result<Vec<(String, Box<dyn Sink>)>> {
    Ok(outbox_relay_sinks::build_all(
        &config.sinks,
        &config.source.slot,
    )?)
}

async fn session(
    config: &Config,
    acknowledged: &mut BTreeMap<String, Position>,
    shutdown: watch::Receiver<bool>,
) -> SessionEnd {
    let source = &config.source;
    let schemas = match &config.validation.schema_dir {
        Some(dir) => match SchemaRegistry::load(dir, config.validation.required) {
            Ok(registry) => Some(Arc::new(registry)),
            Err(err) => return SessionEnd::Fatal(err),
        },
        None => None,
    };
    let params = match source.connect_params() {
        Ok(params) => params,
        Err(err) => return SessionEnd::Fatal(err),
    };
    let sql = match db::connect(&params).await {
        Ok(sql) => sql,
        Err(err) => return classify_sql(err),
    };
    // The relay cannot run on a standby, and a standby's missing slot says nothing about a
    // dropped one. During a failover the standby the URL reaches may be promoted any moment:
    // retry.
    match db::is_standby(&sql).await {
        Ok(false) => {}
        Ok(true) => {
            return SessionEnd::Retry(anyhow::anyhow!(
                "{}; retrying, in case it is being promoted",
                db::STANDBY_PROBLEM
            ))
        }
        Err(err) => return classify_sql(err),
    }
    // The replication connection first: the relay's state must be this server's before
    // anything is created, backfilled or skipped by it.
    let mut connection = match ReplicationConnection::connect(&params).await {
        Ok(connection) => connection,
        Err(err) => return classify_source(err),
    };
    let system = match connection.identify_system().await {
        Ok(system) => system,
        Err(err) => return classify_source(err),
    };
    let origin = match check_origin(&sql, config, &system).await {
        Ok(origin) => origin,
        Err(end) => return end,
    };
    if let Err(end) = check_failover_slot_support(&sql, source).await {
        return end;
    }
    // Asked about relations the stream names that are not configured outbox tables (are they
    // partitions of one?); the OIDs tell a renamed outbox table from another table.
    let catalog = match db::connect(&params).await {
        Ok(client) => client,
        Err(err) => return classify_sql(err),
    };
    let outbox_oids = match tables::outbox_oids(&catalog, &source.tables).await {
        Ok(oids) => oids,
        Err(err) => return classify_sql(err),
    };
    if let Some(missing) = source.tables.iter().find(|t| {
        crate::config::parse_table_name(t)
            .is_ok_and(|names| !outbox_oids.values().any(|known| *known == names))
    }) {
        return SessionEnd::Fatal(anyhow::anyhow!(
            "outbox table {missing} does not exist: if it was renamed, put its new name in \
             source.tables (and its [outbox.\"…\"] mapping); if it was dropped, remove it from \
             source.tables. The relay does not start while a configured table is missing, so \
             that the rows of a renamed table are not skipped"
        ));
    }
    if let Err(err) = crate::backfill::ensure(config, &params).await {
        let err = err.context("backfill");
        if err.chain().any(|cause| cause.is::<ForeignHistory>()) {
            return SessionEnd::Fatal(err);
        }
        return classify_sql(err);
    }
    let slot = match prepare_slot(&sql, config).await {
        Ok(slot) => slot,
        Err(end) => return end,
    };
    if slot.created || origin.is_none() {
        let recorded = Origin::record(
            &sql,
            &config.relay.schema,
            &source.slot,
            &system,
            slot.confirmed_flush,
        )
        .await;
        if let Err(err) = recorded {
            return classify_sql(err);
        }
    }
    let heartbeat_sql = match source.heartbeat_interval {
        Some(_) => match db::connect(&params).await {
            Ok(client) => Some(client),
            Err(err) => return classify_sql(err),
        },
        None => None,
    };
    // Acquire the slot first: once streaming starts no other relay can write to the sinks,
    // so the positions recovered below cannot go stale.
    let (system, stream, status_writer) = match start_streaming(connection, config, &slot).await {
        Ok(started) => started,
        Err(err) => return classify_source(err),
    };
    let replay_key = match load_replay_key(&sql, &config.relay.schema).await {
        Ok(Some(key)) => Some(key),
        Ok(None) => {
            warn!("the relay's schema has no replay key: replayed dead letters are refused until `outbox-relay init` adds it");
            None
        }
        Err(err) => {
            warn!(error = %format!("{err:#}"), "the replay key cannot be read: replayed dead letters are refused (grant the relay's role SELECT on its replay_key table)");
            None
        }
    };
    let store: Arc<dyn CheckpointStore> =
        Arc::new(PgCheckpointStore::new(sql, &config.relay.schema));
    let stored = match store.load(&source.slot).await {
        Ok(stored) => stored,
        Err(err) => return classify_sql(err),
    };

    let sinks = match build_sinks(config) {
        Ok(sinks) => sinks,
        Err(err) => return SessionEnd::Fatal(err),
    };
    let horizon = if slot.created {
        Horizon::NewSlot(slot.confirmed_flush)
    } else {
        Horizon::WalEnd(system.wal_position)
    };
    let mut workers = Vec::new();
    for (name, mut sink) in sinks {
        let recovered = match sink.recover().await {
            Ok(recovered) => recovered,
            // A broker that is down or restarting: reconnect with backoff, do not exit.
            Err(SinkError::Retryable(reason)) => {
                METRICS
                    .sink_retries
                    .get_or_create(&Metrics::sink(&name))
                    .inc();
                return SessionEnd::Retry(anyhow::anyhow!("sink {name}: {reason}"));
            }
            Err(err) => return SessionEnd::Fatal(anyhow::anyhow!("sink {name}: {err}")),
        };
        let skip_through = match skip_point(
            &name,
            SkipSources {
                stored: stored.get(&name).copied(),
                acknowledged: acknowledged.get(&name).copied(),
                recovered,
            },
            horizon,
            (&source.slot, &config.relay.schema),
        ) {
            Ok(position) => position,
            Err(err) => return SessionEnd::Fatal(err.into()),
        };
        info!(sink = %name, skip_through = ?skip_through.map(|p| p.to_string()), "sink ready");
        workers.push(SinkWorker {
            name,
            sink,
            skip_through,
        });
    }

    METRICS.set_role(Role::Streaming);
    info!(slot = %source.slot, publication = %source.publication, from = %slot.confirmed_flush,
        system_id = %system.system_id, timeline = system.timeline, "streaming");

    let progress = Progress::new(workers.iter().map(|w| w.name.clone()), slot.confirmed_flush);
    let limit = BatchLimit::of(&config.relay);
    let (pipeline, worker_handles) = pipeline::start(
        workers,
        progress.clone(),
        store.clone(),
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
            interval: source.publication_check_interval,
        },
        helpers_stopped.clone(),
    ));
    let heartbeat_task = heartbeat_sql
        .zip(source.heartbeat_interval)
        .map(|(client, interval)| {
            tokio::spawn(heartbeat(
                client,
                params.clone(),
                interval,
                helpers_stopped.clone(),
            ))
        });

    let mut reader = Reader {
        stream,
        mapper: OutboxMapper::new(&source.tables, &config.outbox, &source.message_prefixes)
            .with_replay_key(replay_key),
        catalog,
        outbox_oids,
        stop: shutdown,
        renames_reported: Default::default(),
        store_lost,
        schemas,
        pipeline,
        progress: progress.clone(),
        store: store.clone(),
        slot: source.slot.clone(),
        reply_requested,
        transaction: None,
        pending: PendingBatch::new(limit),
        pending_boundary: None,
        counts: ReadCounts::default(),
    };
    let read_result = reader.run().await;
    let counts = reader.counts;
    drop(reader); // closes the sink queues: workers drain what they hold, then stop

    let mut end = match read_result {
        Ok(()) => SessionEnd::Shutdown,
        Err(ReadError::Stopped) => SessionEnd::Shutdown,
        // The publication existed when the session started, so it was dropped (and maybe
        // created again) under the stream: the server cannot decode past the drop, ever.
        Err(ReadError::Source(err)) if err.is_missing_publication() => SessionEnd::Fatal(
            anyhow::anyhow!(
                "{err}\nThe publication {publication} was dropped while the relay streamed, after \
                 position {confirmed}, and PostgreSQL reads every change with the publication as it \
                 was then: this slot cannot get past the drop, even now that the publication exists \
                 again. The rows committed in between reach no subscriber of this slot. To go on, \
                 drop the slot (SELECT pg_drop_replication_slot({slot})) and start the relay with \
                 source.backfill = true, which publishes the rows still in the outbox tables on a \
                 new slot (with their event ids, for consumers to dedup on)",
                publication = source.publication,
                confirmed = progress.confirmed(),
                slot = crate::sql::literal(&source.slot),
            )
        ),
        Err(ReadError::Source(err)) => classify_source(err),
        Err(ReadError::Fatal(err)) => SessionEnd::Fatal(err),
        Err(ReadError::Retry(err)) => SessionEnd::Retry(err),
    };
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
    end
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

/// Where a sink's earlier deliveries end, by who remembers them.
#[derive(Default)]
pub(crate) struct SkipSources {
    /// The sink's row in the relay's checkpoint table.
    pub(crate) stored: Option<Position>,
    /// What the sink acknowledged in an earlier session of this process.
    pub(crate) acknowledged: Option<Position>,
    /// What the sink's destination says it holds (`Sink::recover`).
    pub(crate) recovered: Option<Position>,
}

/// A sink position beyond the database's history. Not retried: an operator must decide what
/// becomes of the events the destination holds.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct ForeignHistory(String);

/// The furthest position this database's history can hold for a sink.
#[derive(Clone, Copy)]
pub(crate) enum Horizon {
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
pub(crate) fn skip_point(
    sink: &str,
    sources: SkipSources,
    horizon: Horizon,
    (slot, schema): (&str, &str),
) -> Result<Option<Position>, ForeignHistory> {
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
        return Err(ForeignHistory(format!(
            "sink {sink}: its destination already holds events up to position {position}, but \
             {consequence}. Those events come from another database or from WAL this server \
             never had (a failover to a standby that lagged, a restore from backup, a re-created \
             database). Give the sink a destination that starts afresh (file: a new path; kafka: \
             a new transactional_id; rabbitmq stream: a new producer_name), then start the relay \
             again"
        )));
    }
    if let Some(position) = beyond(&sources.stored) {
        return Err(ForeignHistory(format!(
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
        return Err(ForeignHistory(format!(
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

/// Starts streaming; returns what the server said of itself (its WAL end, timeline and
/// system identifier) with the stream's halves. Asked again here rather than reused from the
/// session's start: the WAL end must be the one at streaming, after any backfill.
async fn start_streaming(
    mut connection: ReplicationConnection,
    config: &Config,
    slot: &SlotState,
) -> Result<(SystemInfo, ReplicationStream, StatusWriter), SourceError> {
    if slot.needs_failover {
        info!(slot = %config.source.slot, "making the replication slot a failover slot");
        connection.enable_failover(&config.source.slot).await?;
    }
    let system = connection.identify_system().await?;
    let (stream, status_writer) = connection
        .start_replication(&config.source.slot, &config.source.publication)
        .await?;
    Ok((system, stream, status_writer))
}

/// Sends standby status updates every `interval` and whenever the server asks, independent
/// of the reader; on stop, a final update with the last confirmed LSN, then ends streaming.
async fn status_updates(
    mut writer: StatusWriter,
    progress: Arc<Progress>,
    interval: Duration,
    reply_requested: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = reply_requested.notified() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let (received, confirmed) = (progress.received_lsn(), progress.confirmed());
        writer.send(received, confirmed).await?;
        METRICS.received_lsn.set(gauge_value(received.0));
        METRICS.confirmed_lsn.set(gauge_value(confirmed.0));
        METRICS
            .replication_lag_bytes
            .set(gauge_value(received.0.saturating_sub(confirmed.0)));
    }
    writer
        .send(progress.received_lsn(), progress.confirmed())
        .await?;
    writer.finish().await
}

/// Writes changed checkpoints every `interval`, and once more on stop. A failed write is
/// retried at the next tick: the stream goes on, only the restart point lags. A closed
/// connection is not retried: `store_lost` tells the reader to end the session.
async fn write_checkpoints(
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

/// Emits a non-transactional logical message so the slot advances even when this
/// database has no other writes; a connection that died is opened again at the next tick.
async fn heartbeat(
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

/// What the publication watch needs.
struct PublicationWatch {
    params: ConnectParams,
    publication: String,
    tables: Vec<String>,
    interval: Duration,
}

/// Checks every `interval` that the publication still delivers every outbox table's inserts,
/// and says loudly (error log, `outbox_relay_unpublished_tables`) when it does not: a table
/// dropped and re-created leaves the publication, a changed `publish` or a row filter keeps
/// rows back, and those rows then never reach the relay at all.
async fn watch_publication(watch: PublicationWatch, mut stop: watch::Receiver<bool>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut reported: Vec<tables::PublicationProblem> = Vec::new();
    let mut ticker = tokio::time::interval(watch.interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = db::connect(&watch.params).await.ok();
        }
        let Some(sql) = &client else { continue };
        let problems = match tables::publication_problems(sql, &watch.publication, &watch.tables)
            .await
        {
            Ok(problems) => problems,
            Err(err) => {
                debug!(error = %format!("{err:#}"), "checking the publication failed; trying again later");
                continue;
            }
        };
        let hidden = problems.iter().filter(|p| !p.is_warning()).count();
        METRICS.unpublished_tables.set(hidden as i64);
        if problems != reported {
            if problems.is_empty() {
                info!(publication = %watch.publication, "the publication delivers every outbox table's inserts again");
            }
            for problem in problems.iter().filter(|p| !reported.contains(p)) {
                if problem.is_warning() {
                    warn!(publication = %watch.publication, "{problem}");
                } else {
                    error!(publication = %watch.publication, "{problem}");
                }
            }
            reported = problems;
        }
    }
}

#[derive(Debug)]
enum ReadError {
    /// Shutdown was requested: nothing more may be dispatched, or a batch dropped on the
    /// way out could be overtaken by a later one.
    Stopped,
    Source(SourceError),
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<SourceError> for ReadError {
    fn from(err: SourceError) -> Self {
        ReadError::Source(err)
    }
}

/// The transaction being received.
struct Transaction {
    commit_lsn: Lsn,
    xid: u32,
    commit_time_micros: i64,
    next_index: u32,
}

/// Drains the replication stream into batches.
struct Reader {
    stream: ReplicationStream,
    mapper: OutboxMapper,
    /// Answers what the stream alone cannot: which table a partition belongs to.
    catalog: tokio_postgres::Client,
    /// The configured outbox tables by OID, as they were when the session started.
    outbox_oids: HashMap<u32, tables::TableName>,
    /// Shutdown: reading stops, and a database call the reader waits on is abandoned, when
    /// it turns true.
    stop: watch::Receiver<bool>,
    /// Renamed outbox tables already reported in this session.
    renames_reported: std::collections::HashSet<u32>,
    /// Notified when the checkpoint store's connection closed: the session must end.
    store_lost: Arc<Notify>,
    schemas: Option<Arc<SchemaRegistry>>,
    pipeline: Pipeline,
    progress: Arc<Progress>,
    store: Arc<dyn CheckpointStore>,
    slot: String,
    reply_requested: Arc<Notify>,
    transaction: Option<Transaction>,
    pending: PendingBatch,
    pending_boundary: Option<Lsn>,
    counts: ReadCounts,
}

/// What a session read, reported when it ends.
#[derive(Debug, Default, Clone, Copy)]
struct ReadCounts {
    transactions: u64,
    events: u64,
    dead_letters: u64,
    skipped_updates: u64,
    skipped_deletes: u64,
    skipped_null_payloads: u64,
    truncates: u64,
    non_transactional_messages: u64,
}

impl Reader {
    async fn run(&mut self) -> Result<(), ReadError> {
        match self.read().await {
            Err(ReadError::Stopped) => Ok(()),
            other => other,
        }
    }

    async fn read(&mut self) -> Result<(), ReadError> {
        loop {
            while let Some(message) = self.stream.next_buffered()? {
                self.handle(message).await?;
                if self.pending.is_full() {
                    if !self.pipeline.has_room() {
                        let (events, bytes) = self.pending.size();
                        debug!(
                            events,
                            bytes, "batch full while a sink is behind: reading pauses"
                        );
                    }
                    self.flush().await?;
                }
            }
            // Everything received is handled. Hand it on now if every sink can take it. If
            // one is behind, the batch goes on filling (up to its limit) with what arrives
            // until there is room: fewer, fuller batches while the sinks work off a backlog,
            // and no wait otherwise.
            if self.pipeline.has_room() {
                self.flush().await?;
            }
            let held = !self.pending.is_empty() || self.pending_boundary.is_some();
            let room = tokio::select! {
                biased;
                _ = self.stop.wait_for(|stop| *stop) => return Err(ReadError::Stopped),
                _ = self.pipeline.worker_failed() => return Err(ReadError::Retry(WorkerGone.into())),
                _ = self.store_lost.notified() => return Err(ReadError::Retry(anyhow::anyhow!(
                    "the connection for checkpoints and dead letters closed"
                ))),
                room = self.pipeline.room(), if held => room,
                filled = self.stream.fill() => {
                    filled?;
                    continue;
                }
            };
            room.map_err(|e| ReadError::Retry(e.into()))?;
            self.flush().await?;
        }
    }

    async fn flush(&mut self) -> Result<(), ReadError> {
        if self.pending.is_empty() && self.pending_boundary.is_none() {
            return Ok(());
        }
        let batch = self.pending.take(self.pending_boundary.take());
        tokio::select! {
            biased;
            sent = self.pipeline.dispatch(batch) => sent.map_err(|e| ReadError::Retry(e.into())),
            _ = self.stop.wait_for(|stop| *stop) => Err(ReadError::Stopped),
        }
    }

    async fn handle(&mut self, message: ReplicationMessage) -> Result<(), ReadError> {
        match message {
            ReplicationMessage::XLogData { wal_end, data, .. } => {
                self.progress.received(Lsn(wal_end));
                self.handle_pgoutput(data).await
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.progress.received(Lsn(wal_end));
                if reply_requested {
                    self.reply_requested.notify_one();
                }
                // Outside a transaction, everything up to the server's position was sent.
                if self.transaction.is_none() {
                    self.set_boundary(Lsn(wal_end));
                }
                Ok(())
            }
        }
    }

    fn set_boundary(&mut self, lsn: Lsn) {
        self.pending_boundary = Some(self.pending_boundary.map_or(lsn, |b| b.max(lsn)));
    }

    async fn handle_pgoutput(&mut self, data: Bytes) -> Result<(), ReadError> {
        let message = match pgoutput::decode(&data) {
            Ok(message) => message,
            Err(err) => {
                METRICS.decode_errors.inc();
                return Err(ReadError::Fatal(anyhow::anyhow!(
                    "{err}; please report this with the server version"
                )));
            }
        };
        match message {
            Message::Begin(begin) => {
                self.transaction = Some(Transaction {
                    commit_lsn: Lsn(begin.final_lsn),
                    xid: begin.xid,
                    commit_time_micros: begin.commit_time + PG_EPOCH_OFFSET_MICROS,
                    next_index: 0,
                });
            }
            Message::Commit(commit) => {
                self.transaction = None;
                self.counts.transactions += 1;
                self.set_boundary(Lsn(commit.end_lsn));
            }
            Message::Relation(relation) => self.on_relation(relation).await?,
            Message::Insert(insert) => {
                let ctx = self.next_row()?;
                let mapped = self
                    .mapper
                    .map_insert(insert.relation_id, &insert.new, &data, ctx)
                    .map_err(|e| ReadError::Fatal(e.into()))?;
                self.take(mapped).await?;
            }
            Message::Message(message) if message.transactional => {
                let ctx = self.next_row()?;
                let mapped = self.mapper.map_message(&message, &data, ctx);
                self.take(mapped).await?;
            }
            Message::Update(update) => {
                let row = update.old.as_ref().unwrap_or(&update.new);
                self.row_change(update.relation_id, RowChange::Update, row)
                    .await?;
            }
            Message::Delete(delete) => {
                self.row_change(delete.relation_id, RowChange::Delete, &delete.old)
                    .await?;
            }
            Message::Truncate(truncate) => {
                for id in truncate
                    .relation_ids
                    .iter()
                    .filter(|id| self.mapper.is_outbox(**id))
                {
                    self.counts.truncates += 1;
                    warn!(
                        table = self.mapper.table_name(*id),
                        "outbox table truncated: removed rows are not events"
                    );
                }
            }
            // A non-transactional message is not part of a commit, so never an event. Outside
            // a transaction (our heartbeat, say) it is a point the server decoded everything
            // before: safe to confirm, like a keepalive.
            Message::Message(message) => {
                self.counts.non_transactional_messages += 1;
                if self.transaction.is_none() {
                    self.set_boundary(Lsn(message.lsn));
                }
            }
            Message::Type(_) | Message::Origin(_) => {}
        }
        Ok(())
    }

    /// Records a relation the stream describes. A configured outbox table is known by its OID
    /// first: one that arrives under another name was renamed, and its rows stay that table's
    /// (the relay says so once). A relation that is not an outbox table may be a partition of
    /// one: a publication that does not publish via the partition root sends partitions
    /// under their own names.
    async fn on_relation(&mut self, relation: Relation) -> Result<(), ReadError> {
        if let Some(configured) = self.outbox_oids.get(&relation.id).cloned() {
            self.follow(relation, configured);
            return Ok(());
        }
        if !self
            .mapper
            .is_configured(&relation.namespace, &relation.name)
        {
            let catalog = &self.catalog;
            let root = abandon_on_stop(&mut self.stop, async {
                tables::partition_root(catalog, relation.id)
                    .await
                    .map_err(|e| ReadError::Retry(e.context("looking up a partition's table")))
            })
            .await?;
            if let Some((oid, (schema, name))) = root {
                if let Some(configured) = self.outbox_oids.get(&oid).cloned() {
                    self.mapper.on_relation_as(relation, configured);
                    return Ok(());
                }
                if self.mapper.is_configured(&schema, &name) {
                    self.mapper.on_relation_as(relation, (schema, name));
                    return Ok(());
                }
            }
        }
        self.mapper.on_relation(relation);
        Ok(())
    }

    /// Maps the relation of a configured outbox table (by OID) as that table, whatever its
    /// name now.
    fn follow(&mut self, relation: Relation, configured: tables::TableName) {
        if (relation.namespace.as_str(), relation.name.as_str())
            != (configured.0.as_str(), configured.1.as_str())
            && self.renames_reported.insert(relation.id)
        {
            let (was, now) = (
                format!("{}.{}", configured.0, configured.1),
                format!("{}.{}", relation.namespace, relation.name),
            );
            warn!(table = %was, %now,
                "outbox table {was} was renamed to {now}: its rows are still published as \
                 {was}'s. Put {now} in source.tables (and its [outbox.\"…\"] mapping) \
                 before the relay restarts: it refuses to start while a configured table is missing");
        }
        self.mapper.on_relation_as(relation, configured);
    }

    /// The context of the next outbox row of the open transaction; consumes nothing yet.
    fn next_row(&self) -> Result<RowContext, ReadError> {
        let tx = self.transaction.as_ref().ok_or_else(|| {
            ReadError::Fatal(anyhow::anyhow!(
                "the replication stream sent a change outside a transaction"
            ))
        })?;
        Ok(RowContext {
            position: Position {
                commit_lsn: tx.commit_lsn,
                index: tx.next_index,
            },
            xid: tx.xid,
            commit_time_micros: tx.commit_time_micros,
        })
    }

    /// Queues an event or stores a dead letter; either takes the next index.
    async fn take(&mut self, mapped: Mapped) -> Result<(), ReadError> {
        let letter = match mapped {
            Mapped::NotOutbox => return Ok(()),
            Mapped::NullPayloadSkipped(table) => {
                self.counts.skipped_null_payloads += 1;
                debug!(%table, "skipping an outbox row with a NULL payload (on_null_payload = \"skip\")");
                return Ok(());
            }
            Mapped::Event(event) => match self.schemas.as_ref().map(|s| s.check(&event)) {
                Some(Err(reason)) => Some(DeadLetter::from_event(
                    &event,
                    "payload fails validation",
                    reason,
                    None,
                )),
                _ => {
                    self.counts.events += 1;
                    self.pending.push(*event);
                    None
                }
            },
            Mapped::DeadLetter(letter) => Some(letter),
        };
        if let Some(tx) = self.transaction.as_mut() {
            tx.next_index += 1;
        }
        if let Some(letter) = letter {
            self.dead_letter(letter).await?;
        }
        Ok(())
    }

    async fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), ReadError> {
        self.counts.dead_letters += 1;
        METRICS.dead_letters.get_or_create(&Metrics::sink("")).inc();
        // The kind only: the reason may quote the row, which stays out of logs.
        warn!(table = %letter.table, position = %letter.position, kind = letter.kind,
            "outbox row cannot become an event; dead-lettered (`outbox-relay dlq list` shows why)");
        let store = &self.store;
        let slot = &self.slot;
        abandon_on_stop(&mut self.stop, async {
            store
                .dead_letter(slot, &letter)
                .await
                .map_err(|e| ReadError::Retry(e.context("storing a dead letter")))
        })
        .await
    }

    /// Applies the table's policy to an UPDATE or DELETE of an outbox row.
    async fn row_change(
        &mut self,
        relation_id: u32,
        change: RowChange,
        row: &Tuple<'_>,
    ) -> Result<(), ReadError> {
        let Some(policy) = self.mapper.change_policy(relation_id, change) else {
            return Ok(());
        };
        let table = self
            .mapper
            .table_name(relation_id)
            .unwrap_or_default()
            .to_owned();
        match policy {
            ChangePolicy::Skip => {
                match change {
                    RowChange::Update => self.counts.skipped_updates += 1,
                    RowChange::Delete => self.counts.skipped_deletes += 1,
                }
                debug!(%table, ?change, "skipping a change of an outbox row: only inserts are events");
                Ok(())
            }
            ChangePolicy::DeadLetter => {
                let ctx = self.next_row()?;
                let letter = self.mapper.change_dead_letter(relation_id, change, row, ctx);
                self.take(Mapped::DeadLetter(letter)).await
            }
            ChangePolicy::Fail => Err(ReadError::Fatal(anyhow::anyhow!(
                "{change:?} of a row in outbox table {table} and its policy is \"fail\": find what changed it, \
                 or set on_{} = \"skip\" or \"dead-letter\" under [outbox.\"{table}\"]",
                if change == RowChange::Update { "update" } else { "delete" }
            ))),
        }
    }
}

/// Runs a database call of the reader, abandoning it when shutdown is requested: a call that
/// hangs (a locked table, a connection that died silently) must not hold the exit.
async fn abandon_on_stop<T>(
    stop: &mut watch::Receiver<bool>,
    call: impl std::future::Future<Output = Result<T, ReadError>>,
) -> Result<T, ReadError> {
    tokio::select! {
        biased;
        done = call => done,
        _ = stop.wait_for(|stop| *stop) => Err(ReadError::Stopped),
    }
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
    ) -> Result<Option<Position>, ForeignHistory> {
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
