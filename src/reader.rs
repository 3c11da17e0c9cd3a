//! The reader: drains the replication stream, tracks the open transaction, gives every
//! outbox row its position (commit end LSN, index in the transaction), and hands batches to
//! the pipeline together with the boundaries up to which it may confirm.
//!
//! Invariants:
//! - A boundary is set only where the server has sent everything before it: at a commit's
//!   end, or at a keepalive or non-transactional message outside a transaction. The
//!   pipeline confirms nothing beyond the last boundary every sink acknowledged.
//! - Every outbox row takes the next index of its transaction, whether it becomes an event
//!   or a dead letter, so positions never shift between runs.
//! - A dead letter is stored before the reader moves on; nothing is dropped silently.
//! - On shutdown nothing more is dispatched: a batch dropped on the way out could be
//!   overtaken by a later one.

use crate::config::ChangePolicy;
use crate::dead_letters::DeadLetterStore;
use crate::failure::SessionEnd;
use crate::outbox::{DeadLetter, Mapped, OutboxMapper, RowChange, RowContext};
use crate::pipeline::{BatchLimit, PendingBatch, Pipeline, Progress, WorkerGone};
use crate::row::{self, Row, Value};
use crate::source::pgoutput::{self, Message, Relation};
use crate::source::replication::SourceError;
use crate::source::stream::ReplicationStream;
use crate::source::wire::{ReplicationMessage, PG_EPOCH_UNIX_MICROS};
use crate::tables;
use crate::telemetry::{Metrics, METRICS};
use crate::validation::SchemaRegistry;
use bytes::Bytes;
use outbox_relay_sinks::{Lsn, Position};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

/// The transaction being received.
struct Transaction {
    commit_lsn: Lsn,
    xid: u32,
    commit_time_micros: i64,
    next_index: u32,
}

/// Drains the replication stream into batches.
pub struct Reader {
    stream: ReplicationStream,
    mapper: OutboxMapper,
    links: ReaderLinks,
    /// Renamed outbox tables already reported in this session.
    renames_reported: std::collections::HashSet<u32>,
    transaction: Option<Transaction>,
    pending: PendingBatch,
    pending_boundary: Option<Lsn>,
    counts: ReadCounts,
}

/// What the reader is connected to, for [`Reader::new`].
pub struct ReaderLinks {
    /// Answers what the stream alone cannot: which table a partition belongs to.
    pub catalog: tokio_postgres::Client,
    /// The configured outbox tables by OID, as they were when the session started.
    pub outbox_oids: HashMap<u32, tables::TableName>,
    /// Shutdown: reading stops when it turns true.
    pub stop: watch::Receiver<bool>,
    /// Notified when the checkpoint store's connection closed: the session must end.
    pub store_lost: Arc<Notify>,
    pub schemas: Option<Arc<SchemaRegistry>>,
    pub pipeline: Pipeline,
    pub progress: Arc<Progress>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub slot: String,
    pub publication: String,
    /// Notified when the server asks for a status update.
    pub reply_requested: Arc<Notify>,
}

impl Reader {
    pub fn new(
        stream: ReplicationStream,
        mapper: OutboxMapper,
        limit: BatchLimit,
        links: ReaderLinks,
    ) -> Reader {
        Reader {
            stream,
            mapper,
            links,
            renames_reported: Default::default(),
            transaction: None,
            pending: PendingBatch::new(limit),
            pending_boundary: None,
            counts: ReadCounts::default(),
        }
    }

    /// What the session read so far.
    pub fn counts(&self) -> ReadCounts {
        self.counts
    }
}

/// What a session read, reported when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadCounts {
    pub transactions: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub skipped_updates: u64,
    pub skipped_deletes: u64,
    pub skipped_null_payloads: u64,
    pub truncates: u64,
    pub non_transactional_messages: u64,
}

impl Reader {
    /// Reads until shutdown (drained: [`SessionEnd::Shutdown`]) or a failure; says how the
    /// session ends.
    pub async fn run(&mut self) -> SessionEnd {
        match self.read().await {
            Ok(()) => SessionEnd::Shutdown,
            Err(end) => end,
        }
    }

    /// Classifies a failure of the stream. A publication the server cannot find while
    /// decoding existed when the session started, so it was dropped (and maybe created again)
    /// under the stream: the server cannot decode past the drop, ever.
    fn stream_failed(
        err: SourceError,
        publication: &str,
        confirmed: Lsn,
        slot: &str,
    ) -> SessionEnd {
        if !err.is_missing_publication() {
            return err.into();
        }
        SessionEnd::Fatal(anyhow::anyhow!(
            "{err}\nThe publication {publication} was dropped while the relay streamed, after \
             position {confirmed}, and PostgreSQL reads every change with the publication as it \
             was then: this slot cannot get past the drop, even now that the publication exists \
             again. The rows committed in between reach no subscriber of this slot. To go on, \
             drop the slot (SELECT pg_drop_replication_slot({slot})) and start the relay with \
             source.backfill = true, which publishes the rows still in the outbox tables on a \
             new slot (with their event ids, for consumers to dedup on)",
            slot = crate::sql::literal(slot),
        ))
    }

    async fn read(&mut self) -> Result<(), SessionEnd> {
        loop {
            while let Some(message) = self.stream.next_buffered().map_err(|e| {
                Self::stream_failed(
                    e,
                    &self.links.publication,
                    self.links.progress.confirmed(),
                    &self.links.slot,
                )
            })? {
                self.handle(message).await?;
                if self.pending.is_full() {
                    if !self.links.pipeline.has_room() {
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
            if self.links.pipeline.has_room() {
                self.flush().await?;
            }
            let held = !self.pending.is_empty() || self.pending_boundary.is_some();
            let room = tokio::select! {
                biased;
                _ = self.links.stop.wait_for(|stop| *stop) => return Err(SessionEnd::Shutdown),
                _ = self.links.pipeline.worker_failed() => return Err(SessionEnd::Retry(WorkerGone.into())),
                _ = self.links.store_lost.notified() => return Err(SessionEnd::Retry(anyhow::anyhow!(
                    "the connection for checkpoints and dead letters closed"
                ))),
                room = self.links.pipeline.room(), if held => room,
                filled = self.stream.fill() => {
                    filled.map_err(|e| Self::stream_failed(e, &self.links.publication, self.links.progress.confirmed(), &self.links.slot))?;
                    continue;
                }
            };
            room.map_err(|e| SessionEnd::Retry(e.into()))?;
            self.flush().await?;
        }
    }

    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.pending.is_empty() && self.pending_boundary.is_none() {
            return Ok(());
        }
        let batch = self.pending.take(self.pending_boundary.take());
        tokio::select! {
            biased;
            sent = self.links.pipeline.dispatch(batch) => sent.map_err(|e| SessionEnd::Retry(e.into())),
            _ = self.links.stop.wait_for(|stop| *stop) => Err(SessionEnd::Shutdown),
        }
    }

    async fn handle(&mut self, message: ReplicationMessage) -> Result<(), SessionEnd> {
        match message {
            ReplicationMessage::XLogData { wal_end, data, .. } => {
                self.links.progress.received(Lsn(wal_end));
                self.handle_pgoutput(data).await
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.links.progress.received(Lsn(wal_end));
                if reply_requested {
                    self.links.reply_requested.notify_one();
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

    async fn handle_pgoutput(&mut self, data: Bytes) -> Result<(), SessionEnd> {
        let message = match pgoutput::decode(&data) {
            Ok(message) => message,
            Err(err) => {
                METRICS.decode_errors.inc();
                return Err(SessionEnd::Fatal(anyhow::anyhow!(
                    "{err}; please report this with the server version"
                )));
            }
        };
        match message {
            Message::Begin(begin) => {
                self.transaction = Some(Transaction {
                    commit_lsn: begin.final_lsn,
                    xid: begin.xid,
                    commit_time_micros: begin.commit_time + PG_EPOCH_UNIX_MICROS,
                    next_index: 0,
                });
            }
            Message::Commit(commit) => {
                self.transaction = None;
                self.counts.transactions += 1;
                self.set_boundary(commit.end_lsn);
            }
            Message::Relation(relation) => self.on_relation(table_of(relation)).await?,
            Message::Insert(insert) => {
                let ctx = self.next_row()?;
                let row = Row {
                    values: &insert.new.columns,
                    frame: &data,
                };
                let mapped = self
                    .mapper
                    .map_insert(insert.relation_id, row, ctx)
                    .map_err(|e| SessionEnd::Fatal(e.into()))?;
                self.take(mapped).await?;
            }
            Message::Message(message) if message.transactional => {
                let ctx = self.next_row()?;
                let message = row::Message {
                    prefix: message.prefix,
                    content: message.content,
                    frame: &data,
                };
                let mapped = self.mapper.map_message(message, ctx);
                self.take(mapped).await?;
            }
            Message::Update(update) => {
                let row = update.old.as_ref().unwrap_or(&update.new);
                self.row_change(update.relation_id, RowChange::Update, &row.columns)
                    .await?;
            }
            Message::Delete(delete) => {
                self.row_change(delete.relation_id, RowChange::Delete, &delete.old.columns)
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
                    self.set_boundary(message.lsn);
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
    async fn on_relation(&mut self, relation: row::Table) -> Result<(), SessionEnd> {
        if let Some(configured) = self.links.outbox_oids.get(&relation.id).cloned() {
            self.follow(relation, configured);
            return Ok(());
        }
        if !self.mapper.is_configured(&relation.schema, &relation.name) {
            let catalog = &self.links.catalog;
            let root = abandon_on_stop(&mut self.links.stop, async {
                tables::partition_root(catalog, relation.id)
                    .await
                    .map_err(|e| SessionEnd::Retry(e.context("looking up a partition's table")))
            })
            .await?;
            if let Some((oid, (schema, name))) = root {
                if let Some(configured) = self.links.outbox_oids.get(&oid).cloned() {
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
    fn follow(&mut self, relation: row::Table, configured: tables::TableName) {
        if (relation.schema.as_str(), relation.name.as_str())
            != (configured.0.as_str(), configured.1.as_str())
            && self.renames_reported.insert(relation.id)
        {
            let (was, now) = (
                format!("{}.{}", configured.0, configured.1),
                format!("{}.{}", relation.schema, relation.name),
            );
            warn!(table = %was, %now,
                "outbox table {was} was renamed to {now}: its rows are still published as \
                 {was}'s. Put {now} in source.tables (and its [outbox.\"…\"] mapping) \
                 before the relay restarts: it refuses to start while a configured table is missing");
        }
        self.mapper.on_relation_as(relation, configured);
    }

    /// The context of the next outbox row of the open transaction; consumes nothing yet.
    fn next_row(&self) -> Result<RowContext, SessionEnd> {
        let tx = self.transaction.as_ref().ok_or_else(|| {
            SessionEnd::Fatal(anyhow::anyhow!(
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
    async fn take(&mut self, mapped: Mapped) -> Result<(), SessionEnd> {
        let letter = match mapped {
            Mapped::NotOutbox => return Ok(()),
            Mapped::NullPayloadSkipped(table) => {
                self.counts.skipped_null_payloads += 1;
                debug!(%table, "skipping an outbox row with a NULL payload (on_null_payload = \"skip\")");
                return Ok(());
            }
            Mapped::Event(event) => match self.links.schemas.as_ref().map(|s| s.check(&event)) {
                Some(Err(reason)) => Some(DeadLetter::invalid_payload(&event, reason)),
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

    async fn dead_letter(&mut self, letter: DeadLetter) -> Result<(), SessionEnd> {
        self.counts.dead_letters += 1;
        METRICS.dead_letters.get_or_create(&Metrics::sink("")).inc();
        // The kind only: the reason may quote the row, which stays out of logs.
        warn!(table = %letter.table, position = %letter.position, kind = letter.kind,
            "outbox row cannot become an event; dead-lettered (`outbox-relay dlq list` shows why)");
        let store = &self.links.dead_letters;
        let slot = &self.links.slot;
        abandon_on_stop(&mut self.links.stop, async {
            store
                .store(slot, &letter)
                .await
                .map_err(|e| SessionEnd::Retry(e.context("storing a dead letter")))
        })
        .await
    }

    /// Applies the table's policy to an UPDATE or DELETE of an outbox row.
    async fn row_change(
        &mut self,
        relation_id: u32,
        change: RowChange,
        row: &[Value<'_>],
    ) -> Result<(), SessionEnd> {
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
            ChangePolicy::Fail => Err(SessionEnd::Fatal(anyhow::anyhow!(
                "{change:?} of a row in outbox table {table} and its policy is \"fail\": find what changed it, \
                 or set on_{} = \"skip\" or \"dead-letter\" under [outbox.\"{table}\"]",
                if change == RowChange::Update { "update" } else { "delete" }
            ))),
        }
    }
}

/// The neutral shape of a table the stream describes.
fn table_of(relation: Relation) -> row::Table {
    row::Table {
        id: relation.id,
        schema: relation.namespace,
        name: relation.name,
        columns: relation
            .columns
            .into_iter()
            .map(|c| row::Column {
                name: c.name,
                type_oid: c.type_oid,
            })
            .collect(),
    }
}

/// Runs a database call of the reader, abandoning it when shutdown is requested: a call that
/// hangs (a locked table, a connection that died silently) must not hold the exit.
async fn abandon_on_stop<T>(
    stop: &mut watch::Receiver<bool>,
    call: impl std::future::Future<Output = Result<T, SessionEnd>>,
) -> Result<T, SessionEnd> {
    tokio::select! {
        biased;
        done = call => done,
        _ = stop.wait_for(|stop| *stop) => Err(SessionEnd::Shutdown),
    }
}
