//! Everything about the relay's replication slot, for `run`, `init` and `check`: what makes
//! an existing slot usable (its plugin, database, invalidation), creating it (a failover
//! slot if asked), refusing to create again one that was dropped under the relay, checking
//! that the slot's history is this server's ([`crate::source::origin`]), and starting to stream.
//!
//! Invariant: the relay never silently starts over. A slot that is foreign, invalidated, or
//! gone after the relay used it stops the relay with the fix; only a slot the relay has no
//! record of is created.

use crate::config::{Config, SourceConfig};
use crate::db;
use crate::problem::Problem;
use crate::source::origin::Origin;
use crate::source::replication::{ReplicationConnection, SourceError, SystemInfo};
use crate::source::status::StatusWriter;
use crate::source::stream::ReplicationStream;
use crate::tables;
use outbox_relay_sinks::Lsn;
use tokio_postgres::Client;
use tracing::{info, warn};

/// The slot's state, checked before streaming so problems have clear messages.
pub struct SlotState {
    pub confirmed_flush: Lsn,
    /// Created by this session: it starts at `confirmed_flush`, the WAL's end at creation.
    pub created: bool,
    /// An existing slot that `source.failover_slot` asks to make a failover slot.
    pub needs_failover: bool,
}

pub async fn prepare(sql: &tokio_postgres::Client, config: &Config) -> anyhow::Result<SlotState> {
    let source = &config.source;
    for problem in
        tables::publication_problems(sql, &source.publication, &source.tables, source.sharding())
            .await?
    {
        if problem.is_warning() {
            warn!("{problem}");
        } else {
            return Err(Problem(problem.to_string()).into());
        }
    }
    if let Some(problem) = crate::dead_letters::schema_problem(sql, &config.relay.schema).await? {
        return Err(Problem(problem).into());
    }
    let row = sql
        .query_opt(
            &format!(
                "SELECT {}, confirmed_flush_lsn::text, {} FROM pg_replication_slots s \
                 WHERE slot_name = $1",
                SLOT_USABILITY, SLOT_IS_FAILOVER
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    let Some(row) = row else {
        if !source.create_slot {
            return Err(Problem(format!(
                "replication slot {:?} does not exist: run `outbox-relay init`, or set source.create_slot = true",
                source.slot
            ))
            .into());
        }
        info!(slot = %source.slot, "creating the replication slot");
        return Ok(SlotState {
            confirmed_flush: create(sql, source, &config.relay.schema).await?,
            created: true,
            needs_failover: false,
        });
    };
    if let Some(problem) = slot_refusal(&row, 0, &source.slot, &config.relay.schema) {
        return Err(Problem(problem).into());
    }
    let confirmed: Option<String> = row.get(4);
    let confirmed_flush = confirmed
        .as_deref()
        .unwrap_or("0/0")
        .parse()
        .map_err(Problem)?;
    let failover: bool = row.get(5);
    Ok(SlotState {
        confirmed_flush,
        created: false,
        needs_failover: source.failover_slot && !failover,
    })
}

/// Creates the relay's slot (a failover slot if `source.failover_slot`) and returns where it
/// starts: the WAL's end at its creation. Refuses to create again a slot the relay used
/// ([`dropped_slot_problem`]). `run` and `init` create it here.
pub async fn create(
    sql: &tokio_postgres::Client,
    source: &SourceConfig,
    schema: &str,
) -> anyhow::Result<Lsn> {
    if let Some(problem) = dropped_slot_problem(sql, schema, &source.slot).await? {
        return Err(Problem(problem).into());
    }
    // The function's own result, not a join with pg_replication_slots: the planner may scan
    // the view first, and on a server with no slots it then never calls the function at all.
    let start: String = sql
        .query_one(
            &format!(
                "SELECT lsn::text FROM {}",
                create_slot_call(source.failover_slot)
            ),
            &[&source.slot],
        )
        .await
        .map_err(|e| db::explain(e).context(format!("creating replication slot {}", source.slot)))?
        .get(0);
    Ok(start.parse().map_err(Problem)?)
}

/// Stops the relay if its state for the slot comes from another server (see
/// [`crate::source::origin`]); follows a promoted standby's new timeline. Returns the recorded origin.
pub async fn check_origin(
    sql: &tokio_postgres::Client,
    config: &Config,
    system: &SystemInfo,
) -> anyhow::Result<Option<Origin>> {
    let (schema, slot) = (&config.relay.schema, &config.source.slot);
    let origin = Origin::load(sql, schema, slot).await?;
    if let Some(origin) = &origin {
        let new_timeline = origin
            .compare(system, schema, slot)
            .map_err(|err| Problem(err.to_string()))?;
        if new_timeline {
            info!(%slot, system_id = %system.system_id, from = origin.timeline, to = system.timeline,
                "the server moved on to a new timeline (a promoted standby); recording it");
            Origin::record_timeline(sql, schema, slot, system.timeline).await?;
        }
    }
    Ok(origin)
}

/// `source.failover_slot` on a server without failover slots stops the relay; what may keep
/// the failover slot from working is worth a warning.
pub async fn check_failover_slot_support(
    sql: &tokio_postgres::Client,
    source: &SourceConfig,
) -> anyhow::Result<()> {
    if !source.failover_slot {
        return Ok(());
    }
    if let Some(problem) = failover_slot_problem(sql).await? {
        return Err(Problem(problem).into());
    }
    for warning in failover_slot_warnings(sql).await? {
        warn!(slot = %source.slot, "{warning}");
    }
    Ok(())
}

/// Starts streaming; returns what the server said of itself (its WAL end, timeline and
/// system identifier) with the stream's halves. Asked again here rather than reused from the
/// session's start: the WAL end must be the one at streaming, after any backfill.
pub async fn start_streaming(
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

/// Why a missing slot must not simply be created again, if the relay has used it (it has
/// checkpoints for it, or a record in `{schema}.slots`, see [`crate::source::origin`]): it
/// was dropped, or the server is a promoted standby, and a new slot would start at the
/// current WAL position, skipping everything committed since the relay last read. `None`
/// when there is neither (or the relay's tables do not exist yet). `run`, `init` and
/// `check` ask.
pub async fn dropped_slot_problem(
    client: &Client,
    schema: &str,
    slot: &str,
) -> anyhow::Result<Option<String>> {
    let table = crate::sql::qualified(schema, "checkpoints");
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
        crate::source::origin::forget_slot_sql(schema, slot)
    )))
}

/// Whether the row `s` of `pg_replication_slots` is a failover slot, as SQL. Read through
/// JSON: the `failover` column exists only from PostgreSQL 17 on.
pub const SLOT_IS_FAILOVER: &str = "coalesce((to_jsonb(s) ->> 'failover')::bool, false)";

/// Four columns of the row `s` of `pg_replication_slots`, as SQL, that say whether the relay
/// can use the slot: its plugin, its database, the current database, and why it can no
/// longer stream (NULL while it can; read through JSON: `wal_status` exists from PostgreSQL
/// 13, `conflicting` from 16 and `invalidation_reason` from 17 on). [`slot_refusal`] reads
/// them.
pub const SLOT_USABILITY: &str = "plugin::text, database::text, current_database()::text, \
     coalesce(to_jsonb(s) ->> 'invalidation_reason', \
     CASE WHEN to_jsonb(s) ->> 'wal_status' = 'lost' THEN 'wal_removed' \
     WHEN (to_jsonb(s) ->> 'conflicting')::bool THEN 'conflict with recovery' END)";

/// Why the relay cannot use an existing slot whose [`SLOT_USABILITY`] columns start at
/// `first` in `row`: it belongs to something else, or it is invalidated. `None` if it can.
pub fn slot_refusal(
    row: &tokio_postgres::Row,
    first: usize,
    slot: &str,
    schema: &str,
) -> Option<String> {
    let plugin: Option<String> = row.get(first);
    let database: Option<String> = row.get(first + 1);
    let current: String = row.get(first + 2);
    let invalidation: Option<String> = row.get(first + 3);
    foreign_slot_problem(slot, plugin.as_deref(), database.as_deref(), &current)
        .or_else(|| invalidation.map(|reason| invalidated_slot_problem(slot, &reason, schema)))
}

/// What to do about a slot that can no longer stream.
fn invalidated_slot_problem(slot: &str, reason: &str, schema: &str) -> String {
    format!(
        "replication slot {slot:?} is invalidated ({reason}): PostgreSQL removed WAL it still \
         needed (max_slot_wal_keep_size) or it conflicted with recovery, and it can never \
         stream again; the events in the WAL it lost are gone from the stream. Drop it (SELECT \
         pg_drop_replication_slot({literal})) and publish them another way: source.backfill = \
         true creates a new slot and first publishes the rows still in the outbox tables. Or, \
         to accept the gap, drop it, delete the relay's record of it ({forget}) and run \
         `outbox-relay init`",
        literal = crate::sql::literal(slot),
        forget = crate::source::origin::forget_slot_sql(schema, slot),
    )
}

/// What is wrong with an existing slot of the relay's name that is not the relay's kind: a
/// physical slot, another output plugin, or another database. `None` if it is a pgoutput slot
/// of `current_database`.
fn foreign_slot_problem(
    slot: &str,
    plugin: Option<&str>,
    database: Option<&str>,
    current_database: &str,
) -> Option<String> {
    let owner = match (plugin, database) {
        (Some("pgoutput"), Some(database)) if database == current_database => return None,
        (None, _) | (_, None) => "a physical slot".to_owned(),
        (Some(plugin), Some(database)) => {
            format!("a slot of database {database:?} with output plugin {plugin}")
        }
    };
    Some(format!(
        "replication slot {slot:?} already exists as {owner}, and the relay needs a pgoutput \
         slot of database {current_database:?}: it belongs to something else; choose another \
         source.slot"
    ))
}

/// The call that creates the relay's slot (`$1` its name): a failover slot if asked for.
fn create_slot_call(failover: bool) -> &'static str {
    if failover {
        "pg_create_logical_replication_slot($1, 'pgoutput', failover => true)"
    } else {
        "pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// Why `source.failover_slot` cannot work on this server (before PostgreSQL 17 there are no
/// failover slots), if it cannot.
pub async fn failover_slot_problem(client: &Client) -> anyhow::Result<Option<String>> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(db::explain)?;
    let (number, version): (i32, String) = (row.get(0), row.get(1));
    Ok((number < 170_000).then(|| {
        format!(
            "source.failover_slot needs PostgreSQL 17 or later, and this server is {version}: \
             upgrade it, or set source.failover_slot = false"
        )
    }))
}

/// What is wrong with the slots `synchronized_standby_slots` names: one that does not exist
/// here, or whose standby is not connected. The server holds a failover slot's changes back
/// until every one exists and has caught up, so the relay then receives nothing.
pub async fn standby_slot_problems(client: &Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT name, s.active FROM unnest(string_to_array(\
                 coalesce(current_setting('synchronized_standby_slots', true), ''), ',')) AS listed \
             CROSS JOIN btrim(listed, ' \"') AS name \
             LEFT JOIN pg_replication_slots s ON s.slot_name = name \
             WHERE name <> '' AND s.active IS DISTINCT FROM true",
            &[],
        )
        .await
        .map_err(db::explain)?;
    Ok(rows
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            match row.get::<_, Option<bool>>(1) {
                None => format!(
                    "synchronized_standby_slots names slot {name:?}, which does not exist on this \
                     server: it holds the relay's changes back until it does (a promoted standby \
                     keeps its old primary's setting); create the physical slot of a standby, or \
                     remove {name:?} from synchronized_standby_slots and reload"
                ),
                Some(_) => format!(
                    "synchronized_standby_slots names slot {name:?}, whose standby is not \
                     connected: the server holds the relay's changes back until it is; start \
                     that standby, or remove {name:?} from synchronized_standby_slots and reload"
                ),
            }
        })
        .collect())
}

/// What may keep a failover slot from working: an empty `synchronized_standby_slots` (the
/// relay can then publish WAL no standby has received), and [`standby_slot_problems`].
pub async fn failover_slot_warnings(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::from_iter(unprotected_failover_warning(client).await?);
    warnings.extend(standby_slot_problems(client).await?);
    Ok(warnings)
}

/// Why a failover slot may not be safe to fail over to, if it may not: without
/// `synchronized_standby_slots` the relay can publish WAL no standby has received.
async fn unprotected_failover_warning(client: &Client) -> anyhow::Result<Option<String>> {
    let standbys: String = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(db::explain)?
        .get(0);
    Ok(standbys.trim().is_empty().then(|| {
        "synchronized_standby_slots is empty: the relay may publish events from WAL that no \
         standby has received, which a promoted standby then lacks; list the standbys' physical \
         slots in synchronized_standby_slots on the primary (README, \"Failover slots\")"
            .to_owned()
    }))
}
