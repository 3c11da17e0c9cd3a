//! The pipeline between the reader and the sinks: batches in commit order fan out to one
//! worker per sink over bounded channels (a full channel pauses the reader once the batch it
//! holds is full: backpressure, not buffering), each worker delivers with retry, and
//! [`Progress`] records what each sink has acknowledged.
//!
//! A batch may carry a *boundary*: an LSN that becomes safe to confirm to PostgreSQL once the
//! batch (and so everything before it) is acknowledged. Boundaries are commit end LSNs, or a
//! keepalive position when no transaction is open. Every sink sees every boundary, in the same
//! order, so the LSN confirmed upstream is the minimum over sinks of one monotone sequence.
//!
//! A sink that publishes some events at a later schema version than stored
//! (`[sinks.NAME.upcast]`) gets its own copy of those events, upcast, before `send`
//! ([`SinkVersions`]); the others share the batch.
//!
//! Each worker also measures commit→acknowledgement latency per event (the commit time
//! PostgreSQL stamped on the transaction to the moment the sink's `send` returned) into a
//! fixed-size [`LatencyHistogram`], and logs its percentiles when it stops.

mod batch;
mod latency;
mod progress;
mod worker;

pub use batch::{BatchLimit, PendingBatch};
pub use latency::LatencyHistogram;
pub use progress::Progress;
use worker::run_worker;

use crate::dead_letters::DeadLetterStore;
use crate::telemetry::{Metrics, SinkLabels, METRICS};
use crate::upcast::publish::SinkVersions;
use outbox_relay_sinks::{Event, Lsn, Position, Sink};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};
use tracing::{info_span, Instrument};

/// Events in commit order, and the LSN that is confirmable once they are all acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub boundary: Option<Lsn>,
    /// The events' [`Event::size_bytes`], summed.
    bytes: usize,
}

/// The reader's handle on the sink workers.
pub struct Pipeline {
    senders: Vec<mpsc::Sender<Arc<Batch>>>,
    /// The sinks' metric labels, in the senders' order.
    labels: Vec<SinkLabels>,
    /// Notified when a worker stops with an error, so an idle reader stops too.
    worker_failed: Arc<Notify>,
}

/// A sink worker stopped: its error says why.
#[derive(Debug, thiserror::Error)]
#[error("a sink worker stopped")]
pub struct WorkerGone;

impl Pipeline {
    /// Hands `batch` to every sink, waiting while any sink's queue is full.
    pub async fn dispatch(&self, batch: Batch) -> Result<(), WorkerGone> {
        let batch = Arc::new(batch);
        let (events, bytes) = (batch.events.len() as i64, batch.bytes as i64);
        for (sender, labels) in self.senders.iter().zip(&self.labels) {
            sender.send(batch.clone()).await.map_err(|_| WorkerGone)?;
            METRICS
                .in_flight_events
                .get_or_create(labels)
                .inc_by(events);
            METRICS.in_flight_bytes.get_or_create(labels).inc_by(bytes);
        }
        Ok(())
    }

    /// Whether every sink's queue can take a batch now.
    pub fn has_room(&self) -> bool {
        self.senders.iter().all(|sender| sender.capacity() > 0)
    }

    /// Completes once every sink's queue can take a batch. The reader is the queues' only
    /// sender, so the room stays until it dispatches.
    pub async fn room(&self) -> Result<(), WorkerGone> {
        for sender in &self.senders {
            sender.reserve().await.map_err(|_| WorkerGone)?;
        }
        Ok(())
    }

    /// Completes once a worker has stopped with an error (the session then ends, without
    /// waiting for the next event to find the worker gone).
    pub async fn worker_failed(&self) {
        self.worker_failed.notified().await
    }
}

/// One sink and what it needs to deliver.
pub struct SinkWorker {
    pub name: String,
    pub sink: Box<dyn Sink>,
    /// Events at or below this position were delivered before: skip them.
    pub skip_through: Option<Position>,
    /// The versions the sink publishes events at; `None`: as stored.
    pub versions: Option<SinkVersions>,
}

/// Starts one worker task per sink; returns the reader's handle and the workers' handles.
pub fn start(
    workers: Vec<SinkWorker>,
    progress: Arc<Progress>,
    dead_letters: Arc<dyn DeadLetterStore>,
    slot: &str,
    queue_depth: usize,
    limit: BatchLimit,
) -> (Pipeline, Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) {
    let mut senders = Vec::new();
    let mut labels = Vec::new();
    let mut handles = Vec::new();
    let worker_failed = Arc::new(Notify::new());
    for (index, worker) in workers.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(queue_depth);
        senders.push(tx);
        labels.push(Metrics::sink(&worker.name));
        let span = info_span!("sink", sink = %worker.name);
        let task = run_worker(
            index,
            worker,
            rx,
            progress.clone(),
            dead_letters.clone(),
            slot.to_owned(),
            limit,
        );
        let failed = worker_failed.clone();
        let task = async move {
            let result = task.await;
            if result.is_err() {
                failed.notify_one();
            }
            result
        };
        handles.push(tokio::spawn(task.instrument(span)));
    }
    (
        Pipeline {
            senders,
            labels,
            worker_failed,
        },
        handles,
    )
}

#[cfg(test)]
mod tests;
