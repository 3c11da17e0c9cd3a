//! Backfill (`source.backfill = true`): on first start, publish the rows already in the
//! outbox tables before streaming begins, with no gap and no duplicate at the seam.
//!
//! The slot is created over the replication protocol with an exported snapshot; that
//! snapshot sees exactly what committed before the slot's consistent point, and the slot
//! streams exactly what commits after it. The tables are read through a cursor in a
//! REPEATABLE READ transaction pinned to the snapshot and delivered through the normal
//! pipeline (bounded queues, so memory stays flat however large the table). Backfilled
//! events are positioned just below the consistent point, so they sort before every
//! streamed event. Only when every sink acknowledged them is the backfill recorded as
//! finished; a run interrupted before that drops its slot and starts over (rows delivered
//! before the interruption are delivered again, with the same event ids).

use crate::checkpoint::{CheckpointStore, PgCheckpointStore};
use crate::config::{parse_table_name, Config, ConnectParams};
use crate::db;
use crate::dead_letters::{DeadLetterStore, PgDeadLetterStore};
use crate::outbox::{DeadLetter, Mapped, OutboxMapper, RowContext};
use crate::pipeline::{self, BatchLimit, PendingBatch, Progress};
use crate::resume::{ready_workers, Horizon};
use crate::row::{Column, Row, Table, Value};
use crate::source::origin::Origin;
use crate::source::replication::ReplicationConnection;
use crate::sql;
use crate::validation::SchemaRegistry;
use anyhow::Context;
use bytes::Bytes;
use outbox_relay_sinks::{Lsn, Position};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_postgres::types::PgLsn;
use tokio_postgres::IsolationLevel;
use tracing::{info, warn};

/// Most rows fetched from the cursor per round trip. Fewer when rows are large: a fetch
/// holds about one batch's bytes (`relay.batch_bytes`), as a batch does.
const FETCH_ROWS: usize = 1000;

/// Rows of the first fetch from each table, before their size is known.
const FIRST_FETCH_ROWS: usize = 16;

/// Runs the backfill if it is configured and not done yet for the slot. Returns once the
/// slot exists and every backfilled event is acknowledged.
pub async fn ensure(config: &Config, params: &ConnectParams) -> anyhow::Result<()> {
    if !config.source.backfill {
        return Ok(());
    }
    let sql = db::connect(params).await?;
    let backfills = sql::qualified(&config.relay.schema, "backfills");
    let checkpoints = sql::qualified(&config.relay.schema, "checkpoints");
    let slot = &config.source.slot;
    let slot_exists = sql
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(db::explain)?
        .is_some();
    let record = sql
        .query_opt(
            &format!("SELECT finished_at IS NOT NULL FROM {backfills} WHERE slot = $1"),
            &[slot],
        )
        .await
        .map_err(db::explain)
        .context("reading backfill state (run `outbox-relay init` to create the relay's tables)")?;
    match (slot_exists, record.map(|r| r.get::<_, bool>(0))) {
        (true, Some(true)) => return Ok(()),
        (true, None) => {
            warn!(%slot, "{}", skipped_warning(slot));
            return Ok(());
        }
        (true, Some(false)) => {
            warn!(%slot, "an earlier backfill was interrupted: dropping its slot and starting over");
            sql.execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await
                .map_err(db::explain)?;
        }
        (false, _) => {}
    }
    sql.execute(&format!("DELETE FROM {backfills} WHERE slot = $1"), &[slot])
        .await
        .map_err(db::explain)?;
    // A new slot is a new stream: checkpoints of an earlier slot of that name mean nothing.
    sql.execute(
        &format!("DELETE FROM {checkpoints} WHERE slot = $1"),
        &[slot],
    )
    .await
    .map_err(db::explain)?;

    let mut replication = ReplicationConnection::connect(params).await?;
    // Before the slot: a command after it would end the exported snapshot.
    let system = replication.identify_system().await?;
    let (consistent_point, snapshot) = replication
        .create_slot_exporting_snapshot(slot, config.source.failover_slot)
        .await?;
    Origin::record(&sql, &config.relay.schema, slot, &system, consistent_point).await?;
    sql.execute(
        &format!("INSERT INTO {backfills} (slot, consistent_point) VALUES ($1, $2)"),
        &[slot, &PgLsn::from(consistent_point.0)],
    )
    .await
    .map_err(db::explain)?;
    info!(%slot, %consistent_point, "backfilling rows committed before the slot");

    let rows = publish_snapshot(config, params, consistent_point, &snapshot).await?;
    sql.execute(
        &format!("UPDATE {backfills} SET finished_at = now(), rows = $2 WHERE slot = $1"),
        &[slot, &(rows as i64)],
    )
    .await
    .map_err(db::explain)?;
    info!(%slot, rows, "backfill finished; streaming starts at the slot's consistent point");
    drop(replication); // releases the snapshot; the slot stays
    Ok(())
}

/// Why `source.backfill = true` does nothing for `slot`, and how to backfill anyway: the
/// slot existed before any backfill, and a backfill happens only when the relay creates it.
pub fn skipped_warning(slot: &str) -> String {
    format!(
        "source.backfill = true, but replication slot {slot} already exists and no backfill \
         was made for it: the rows already in the outbox tables will not be backfilled (a \
         backfill happens only when the relay creates the slot). To backfill them anyway, stop \
         the relay, drop the slot (SELECT pg_drop_replication_slot({})) and start it again: it \
         creates the slot and backfills first; events the slot already delivered are then \
         delivered again with their ids, which consumers dedup on",
        sql::literal(slot)
    )
}

/// [`skipped_warning`] when it applies to the configured slot: backfill is on, the slot
/// exists, and no backfill was started for it (one that was interrupted is made again by
/// `run`; one that finished is done). Nothing when the relay's tables do not exist yet.
pub async fn skipped(
    client: &tokio_postgres::Client,
    config: &Config,
) -> anyhow::Result<Option<String>> {
    let slot = &config.source.slot;
    if !config.source.backfill {
        return Ok(None);
    }
    let backfills = sql::qualified(&config.relay.schema, "backfills");
    let state = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
             to_regclass($2) IS NOT NULL",
            &[slot, &backfills],
        )
        .await
        .map_err(db::explain)?;
    if !(state.get::<_, bool>(0) && state.get::<_, bool>(1)) {
        return Ok(None);
    }
    let started = client
        .query_opt(
            &format!("SELECT 1 FROM {backfills} WHERE slot = $1"),
            &[slot],
        )
        .await
        .map_err(db::explain)?
        .is_some();
    Ok((!started).then(|| skipped_warning(slot)))
}

/// Reads every outbox table in the snapshot and delivers the rows; returns how many.
async fn publish_snapshot(
    config: &Config,
    params: &ConnectParams,
    consistent_point: Lsn,
    snapshot: &str,
) -> anyhow::Result<u64> {
    let sql = Arc::new(db::connect(params).await?);
    let store = PgCheckpointStore::new(sql.clone(), &config.relay.schema);
    let dead_letters: Arc<dyn DeadLetterStore> =
        Arc::new(PgDeadLetterStore::new(sql, &config.relay.schema));
    // Every backfilled event lies below the consistent point. A destination that holds
    // positions beyond it belongs to another database or history, and a deduplicating one (a
    // RabbitMQ stream) would drop the backfill as already stored.
    let schemas = match &config.validation.schema_dir {
        Some(dir) => Some(Arc::new(SchemaRegistry::load(
            dir,
            config.validation.required,
        )?)),
        None => None,
    };
    let workers = ready_workers(
        config,
        Horizon::NewSlot(consistent_point),
        None,
        schemas.as_ref(),
    )
    .await?;
    let progress = Progress::new(workers.iter().map(|w| w.name.clone()), Lsn(0));
    let limit = BatchLimit::of(&config.relay);
    let (pipeline, handles) = pipeline::start(
        workers,
        progress.clone(),
        dead_letters.clone(),
        &config.source.slot,
        config.relay.queue_depth,
        limit,
    );

    let mut snapshot_reader = db::connect(params).await?;
    let tx = snapshot_reader
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db::explain)?;
    tx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT {}",
        sql::literal(snapshot)
    ))
    .await
    .map_err(db::explain)?;

    // Values are read as the bytes the stream would carry: converted to UTF-8, except in a
    // SQL_ASCII database, whose bytes have no known encoding to convert from (the server
    // refuses, on every attempt): those are read as they are, and a value that is not UTF-8
    // is dead-lettered with its bytes, as when streaming.
    let server_encoding: String = tx
        .query_one("SELECT current_setting('server_encoding')", &[])
        .await
        .map_err(db::explain)?
        .get(0);
    let read_as = if server_encoding == "SQL_ASCII" {
        "SQL_ASCII"
    } else {
        "UTF8"
    };
    let mut mapper = OutboxMapper::new(&config.source.tables, &config.outbox, &[]);
    let before_stream = Lsn(consistent_point.0.saturating_sub(1));
    let now_micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    let mut index: u32 = 0;
    let mut batch = PendingBatch::new(limit);
    for table in &config.source.tables {
        let relation = describe(&tx, table).await?;
        let relation_id = relation.id;
        let select: Vec<String> = relation
            .columns
            .iter()
            .map(|c| {
                format!(
                    "convert_to({}::text, {})",
                    sql::ident(&c.name),
                    sql::literal(read_as)
                )
            })
            .collect();
        let (schema, name) = parse_table_name(table)?;
        mapper.on_relation(relation);
        let portal = tx
            .bind(
                &format!(
                    // Oldest inserting transaction first (age() copes with xid wraparound;
                    // frozen rows count as oldest), then statement, then position. Physical
                    // order alone is not insertion order once backends insert concurrently:
                    // each fills its own target page, and a later row can land in an
                    // earlier page.
                    "SELECT {} FROM {} ORDER BY age(xmin) DESC, cmin::text::bigint, ctid",
                    select.join(", "),
                    sql::qualified(&schema, &name)
                ),
                &[],
            )
            .await
            .map_err(db::explain)?;
        let mut fetch_rows = FIRST_FETCH_ROWS;
        loop {
            let rows = tx
                .query_portal(&portal, fetch_rows as i32)
                .await
                .map_err(db::explain)?;
            if rows.is_empty() {
                break;
            }
            let mut fetched_bytes = 0;
            for row in &rows {
                let (data, ranges) = row_bytes(row);
                fetched_bytes += data.len();
                let values: Vec<Value> = ranges
                    .iter()
                    .map(|r| r.clone().map_or(Value::Null, |r| Value::Text(&data[r])))
                    .collect();
                let row = Row {
                    values: &values,
                    frame: &data,
                };
                let ctx = RowContext {
                    position: Position {
                        commit_lsn: before_stream,
                        index,
                    },
                    xid: 0,
                    commit_time_micros: now_micros,
                };
                match mapper.map_insert(relation_id, row, ctx)? {
                    // Validated as when streaming: a backfilled row is no less an event.
                    Mapped::Event(event) => match schemas.as_ref().map(|s| s.check(&event)) {
                        Some(Err(reason)) => {
                            let letter = DeadLetter::invalid_payload(&event, reason);
                            dead_letters.store(&config.source.slot, &letter).await?
                        }
                        _ => batch.push(*event),
                    },
                    Mapped::DeadLetter(letter) => {
                        dead_letters.store(&config.source.slot, &letter).await?
                    }
                    Mapped::NotOutbox | Mapped::NullPayloadSkipped(_) => continue,
                }
                index = index
                    .checked_add(1)
                    .context("more than 4 billion rows to backfill")?;
                if batch.is_full() {
                    pipeline.dispatch(batch.take(None)).await?;
                }
            }
            let per_row = (fetched_bytes / rows.len()).max(1);
            fetch_rows = (limit.bytes / per_row).clamp(1, FETCH_ROWS);
        }
    }
    tx.commit().await.map_err(db::explain)?;
    // The boundary at the consistent point is passed once every sink took every row.
    pipeline
        .dispatch(batch.take(Some(consistent_point)))
        .await?;
    drop(pipeline);
    for handle in handles {
        handle.await.context("a sink worker panicked")??;
    }
    anyhow::ensure!(
        progress.confirmed() >= consistent_point,
        "backfill ended before every sink acknowledged it"
    );
    store
        .save(&config.source.slot, &progress.checkpoints())
        .await?;
    Ok(u64::from(index))
}

/// The table's shape: its OID and its columns, in the order the stream would send them
/// (generated columns are not sent).
async fn describe(tx: &tokio_postgres::Transaction<'_>, table: &str) -> anyhow::Result<Table> {
    let (schema, name) = parse_table_name(table)?;
    let qualified = sql::qualified(&schema, &name);
    let rows = tx
        .query(
            "SELECT $1::text::regclass::oid, attname::text, atttypid FROM pg_attribute \
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
             AND attgenerated = '' ORDER BY attnum",
            &[&qualified],
        )
        .await
        .map_err(db::explain)
        .with_context(|| format!("reading the columns of {table}"))?;
    let id: u32 = rows
        .first()
        .map(|r| r.get(0))
        .with_context(|| format!("outbox table {table} has no columns"))?;
    Ok(Table {
        id,
        schema,
        name,
        columns: rows
            .iter()
            .map(|r| Column {
                name: r.get(1),
                type_oid: r.get(2),
            })
            .collect(),
    })
}

/// One buffer holding the row's values (their text as bytes), and each value's range in it
/// (None = NULL).
fn row_bytes(row: &tokio_postgres::Row) -> (Bytes, Vec<Option<std::ops::Range<usize>>>) {
    let mut data = Vec::new();
    let mut ranges = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        match row.get::<_, Option<&[u8]>>(i) {
            Some(text) => {
                let start = data.len();
                data.extend_from_slice(text);
                ranges.push(Some(start..data.len()));
            }
            None => ranges.push(None),
        }
    }
    (Bytes::from(data), ranges)
}
