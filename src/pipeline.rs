//! The pipeline between the reader and the sinks: batches in commit order fan out to one
//! worker per sink over bounded channels (a full channel pauses the reader: backpressure, not
//! buffering), each worker delivers with retry, and [`Progress`] records what each sink has
//! acknowledged.
//!
//! A batch may carry a *boundary*: an LSN that becomes safe to confirm to PostgreSQL once the
//! batch (and so everything before it) is acknowledged. Boundaries are commit end LSNs, or a
//! keepalive position when no transaction is open. Every sink sees every boundary, in the same
//! order, so the LSN confirmed upstream is the minimum over sinks of one monotone sequence.

use crate::checkpoint::CheckpointStore;
use crate::outbox::DeadLetter;
use outbox_relay_sinks::{Event, Lsn, Position, Sink, SinkError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info_span, warn, Instrument};

/// Events in commit order, and the LSN that is confirmable once they are all acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub boundary: Option<Lsn>,
}

/// What one sink has acknowledged.
#[derive(Debug, Clone, Copy, Default)]
struct Acked {
    /// The last event acknowledged: everything at or below it is delivered.
    position: Option<Position>,
    /// The last boundary passed: everything before it is delivered.
    confirmable: Lsn,
}

struct SinkProgress {
    name: String,
    acked: Mutex<Acked>,
}

/// Shared progress of one replication session.
pub struct Progress {
    received: AtomicU64,
    sinks: Vec<SinkProgress>,
}

impl Progress {
    /// `start` is the slot's confirmed position: nothing below it will be re-sent.
    pub fn new(sink_names: impl IntoIterator<Item = String>, start: Lsn) -> Arc<Self> {
        let sinks = sink_names
            .into_iter()
            .map(|name| SinkProgress {
                name,
                acked: Mutex::new(Acked {
                    position: None,
                    confirmable: start,
                }),
            })
            .collect();
        Arc::new(Progress {
            received: AtomicU64::new(start.0),
            sinks,
        })
    }

    /// Records the highest WAL position received from the server.
    pub fn received(&self, lsn: Lsn) {
        self.received.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub fn received_lsn(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Relaxed))
    }

    /// The LSN every sink has fully acknowledged: what PostgreSQL may forget.
    pub fn confirmed(&self) -> Lsn {
        self.sinks
            .iter()
            .map(|s| s.acked.lock().expect("progress lock").confirmable)
            .min()
            .unwrap_or_default()
    }

    /// Each sink's acknowledged position, for the checkpoint store.
    pub fn checkpoints(&self) -> BTreeMap<String, Position> {
        self.sinks
            .iter()
            .filter_map(|s| {
                Some((
                    s.name.clone(),
                    s.acked.lock().expect("progress lock").position?,
                ))
            })
            .collect()
    }

    fn acknowledge(&self, sink: usize, last: Option<Position>, boundary: Option<Lsn>) {
        let mut acked = self.sinks[sink].acked.lock().expect("progress lock");
        if let Some(position) = last {
            acked.position = Some(acked.position.map_or(position, |p| p.max(position)));
        }
        if let Some(lsn) = boundary {
            acked.confirmable = acked.confirmable.max(lsn);
        }
    }
}

/// The reader's handle on the sink workers.
pub struct Pipeline {
    senders: Vec<mpsc::Sender<Arc<Batch>>>,
}

/// A sink worker stopped: its error says why.
#[derive(Debug, thiserror::Error)]
#[error("a sink worker stopped")]
pub struct WorkerGone;

impl Pipeline {
    /// Hands `batch` to every sink, waiting while any sink's queue is full.
    pub async fn dispatch(&self, batch: Batch) -> Result<(), WorkerGone> {
        let batch = Arc::new(batch);
        for sender in &self.senders {
            sender.send(batch.clone()).await.map_err(|_| WorkerGone)?;
        }
        Ok(())
    }
}

/// One sink and what it needs to deliver.
pub struct SinkWorker {
    pub name: String,
    pub sink: Box<dyn Sink>,
    /// Events at or below this position were delivered before: skip them.
    pub skip_through: Option<Position>,
}

/// Starts one worker task per sink; returns the reader's handle and the workers' handles.
pub fn start(
    workers: Vec<SinkWorker>,
    progress: Arc<Progress>,
    store: Arc<dyn CheckpointStore>,
    slot: &str,
    queue_depth: usize,
) -> (Pipeline, Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) {
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(queue_depth);
        senders.push(tx);
        let span = info_span!("sink", name = %worker.name);
        let task = run_worker(
            index,
            worker,
            rx,
            progress.clone(),
            store.clone(),
            slot.to_owned(),
        );
        handles.push(tokio::spawn(task.instrument(span)));
    }
    (Pipeline { senders }, handles)
}

async fn run_worker(
    index: usize,
    mut worker: SinkWorker,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    progress: Arc<Progress>,
    store: Arc<dyn CheckpointStore>,
    slot: String,
) -> anyhow::Result<()> {
    while let Some(batch) = batches.recv().await {
        let fresh = match worker.skip_through {
            Some(done) => &batch.events[batch.events.partition_point(|e| e.position <= done)..],
            None => &batch.events[..],
        };
        if !fresh.is_empty() {
            deliver(&mut worker, fresh, &*store, &slot).await?;
        }
        progress.acknowledge(index, fresh.last().map(|e| e.position), batch.boundary);
    }
    worker
        .sink
        .close()
        .await
        .map_err(|e| anyhow::anyhow!("closing sink {}: {e}", worker.name))
}

/// Sends `events` until the sink takes them, backing off on retryable errors; rejected events
/// go to the dead-letter store.
async fn deliver(
    worker: &mut SinkWorker,
    events: &[Event],
    store: &dyn CheckpointStore,
    slot: &str,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    let delivery = loop {
        match worker.sink.send(events).await {
            Ok(delivery) => break delivery,
            Err(SinkError::Retryable(reason)) => {
                warn!(%reason, retry_in = ?backoff, "sink failed; retrying the batch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(SinkError::Permanent(reason)) => {
                anyhow::bail!("sink {} failed: {reason}", worker.name)
            }
        }
    };
    for rejection in delivery.rejected {
        let event = events.get(rejection.index).ok_or_else(|| {
            anyhow::anyhow!(
                "sink {} rejected event #{} of a batch of {}",
                worker.name,
                rejection.index,
                events.len()
            )
        })?;
        let letter = DeadLetter {
            table: event.table.to_string(),
            position: event.position,
            xid: event.xid,
            reason: rejection.reason,
            row: serde_json::json!({
                "id": &*event.id,
                "aggregatetype": &*event.aggregate_type,
                "aggregateid": &*event.key,
                "type": &*event.event_type,
                "payload": &*event.payload,
            }),
            sink: Some(worker.name.clone()),
        };
        warn!(position = %letter.position, reason = %letter.reason, "sink refused an event; dead-lettered");
        store.dead_letter(slot, &letter).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmed_is_the_minimum_boundary_over_sinks() {
        let progress = Progress::new(["a".to_string(), "b".to_string()], Lsn(10));
        assert_eq!(progress.confirmed(), Lsn(10));
        let p = |lsn, index| Position {
            commit_lsn: Lsn(lsn),
            index,
        };
        progress.acknowledge(0, Some(p(20, 1)), Some(Lsn(25)));
        assert_eq!(
            progress.confirmed(),
            Lsn(10),
            "sink b has not acknowledged the boundary"
        );
        progress.acknowledge(1, Some(p(20, 0)), None);
        assert_eq!(
            progress.confirmed(),
            Lsn(10),
            "a partial transaction confirms nothing"
        );
        progress.acknowledge(1, Some(p(20, 1)), Some(Lsn(25)));
        assert_eq!(progress.confirmed(), Lsn(25));
        assert_eq!(progress.checkpoints()["b"], p(20, 1));
        progress.acknowledge(0, None, Some(Lsn(24)));
        assert_eq!(progress.confirmed(), Lsn(25), "never moves backwards");
    }
}
