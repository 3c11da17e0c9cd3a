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
//! Each worker also measures commit→acknowledgement latency per event (the commit time
//! PostgreSQL stamped on the transaction to the moment the sink's `send` returned) into a
//! fixed-size [`LatencyHistogram`], and logs its percentiles when it stops.

use crate::config::RelayConfig;
use crate::dead_letters::DeadLetterStore;
use crate::outbox::DeadLetter;
use crate::telemetry::{Metrics, SinkLabels, SinkTableLabels, METRICS};
use outbox_relay_sinks::{Backoff, Event, EventState, Lsn, Position, Sink, SinkError};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

/// Events in commit order, and the LSN that is confirmable once they are all acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub boundary: Option<Lsn>,
    /// The events' [`Event::size_bytes`], summed.
    bytes: usize,
}

/// The events gathered for the next batch, their bytes counted as they arrive (the reader's
/// and the backfill's): full at its [`BatchLimit`], handed on as a [`Batch`].
#[derive(Debug)]
pub struct PendingBatch {
    events: Vec<Event>,
    bytes: usize,
    limit: BatchLimit,
}

impl PendingBatch {
    pub fn new(limit: BatchLimit) -> Self {
        PendingBatch {
            events: Vec::with_capacity(limit.events),
            bytes: 0,
            limit,
        }
    }

    pub fn push(&mut self, event: Event) {
        self.bytes += event.size_bytes();
        self.events.push(event);
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.limit.reached(self.events.len(), self.bytes)
    }

    /// (events, bytes), for logs.
    pub fn size(&self) -> (usize, usize) {
        (self.events.len(), self.bytes)
    }

    /// The gathered events as a batch with `boundary`; starts the next one empty.
    pub fn take(&mut self, boundary: Option<Lsn>) -> Batch {
        let events = std::mem::replace(&mut self.events, Vec::with_capacity(self.limit.events));
        Batch {
            events,
            boundary,
            bytes: std::mem::take(&mut self.bytes),
        }
    }
}

/// How large a batch grows: it closes at `events` events, or once its events hold `bytes`
/// bytes (`relay.batch_size`, `relay.batch_bytes`). The byte limit keeps memory bounded when
/// rows are large. The event that reaches it closes the batch, so a batch exceeds it by at
/// most one event, and an event larger than the limit still goes through.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimit {
    pub events: usize,
    pub bytes: usize,
}

impl BatchLimit {
    pub fn of(relay: &RelayConfig) -> Self {
        BatchLimit {
            events: relay.batch_size,
            bytes: relay.batch_bytes,
        }
    }

    /// Whether a batch of `events` events holding `bytes` bytes is closed.
    fn reached(&self, events: usize, bytes: usize) -> bool {
        events >= self.events || bytes >= self.bytes
    }

    /// Whether a batch of `events` events and `bytes` bytes may still take `more` on top.
    fn fits(&self, events: usize, bytes: usize, more: &Batch) -> bool {
        events + more.events.len() <= self.events && bytes + more.bytes <= self.bytes
    }
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
        let span = info_span!("sink", name = %worker.name);
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

async fn run_worker(
    index: usize,
    mut worker: SinkWorker,
    mut batches: mpsc::Receiver<Arc<Batch>>,
    progress: Arc<Progress>,
    dead_letters: Arc<dyn DeadLetterStore>,
    slot: String,
    limit: BatchLimit,
) -> anyhow::Result<()> {
    let mut latency = LatencyHistogram::new();
    let labels = Metrics::sink(&worker.name);
    let mut queued = Vec::new();
    let mut merged = Vec::new();
    let mut carried = None;
    loop {
        let batch = match carried.take() {
            Some(batch) => batch,
            None => match batches.recv().await {
                Some(batch) => batch,
                None => break,
            },
        };
        // A worker that fell behind joins the batches already queued, up to one batch's
        // limit, into one send: an event then waits for the send in progress rather than
        // for each small batch ahead of it, and a sink with a fixed cost per send (a round
        // trip, a Kafka commit) catches up. What one send may leave unacknowledged at a
        // crash stays one batch's worth. With nothing queued the batch is sent as it is,
        // without copying.
        let (mut events, mut bytes) = (batch.events.len(), batch.bytes);
        queued.push(batch);
        while !limit.reached(events, bytes) {
            let Ok(more) = batches.try_recv() else { break };
            if !limit.fits(events, bytes, &more) {
                carried = Some(more);
                break;
            }
            events += more.events.len();
            bytes += more.bytes;
            queued.push(more);
        }
        let skip_through = worker.skip_through;
        let fresh_of = |batch: &Batch| -> std::ops::Range<usize> {
            let start = match skip_through {
                Some(done) => batch.events.partition_point(|e| e.position <= done),
                None => 0,
            };
            start..batch.events.len()
        };
        let fresh: &[Event] = if queued.len() == 1 {
            &queued[0].events[fresh_of(&queued[0])]
        } else {
            merged.clear();
            for batch in &queued {
                merged.extend_from_slice(&batch.events[fresh_of(batch)]);
            }
            &merged
        };
        if !fresh.is_empty() {
            let span = info_span!("batch", events = fresh.len(), first = %fresh[0].position,
                last = %fresh[fresh.len() - 1].position);
            let started = unix_micros();
            let rejected = deliver(&mut worker, fresh, &*dead_letters, &slot)
                .instrument(span)
                .await?;
            let acked = unix_micros();
            let ms = |micros: i64| micros as f64 / 1000.0;
            debug!(
                events = fresh.len(),
                batches = queued.len(),
                oldest_waited_ms = ms(started - fresh[0].commit_time_micros),
                send_ms = ms(acked - started),
                "batch acknowledged"
            );
            let seconds = METRICS.publish_latency.get_or_create(&labels);
            let mut refused = vec![false; fresh.len()];
            for &index in &rejected {
                refused[index] = true;
            }
            // Published events are counted per run of one table (usually the whole batch),
            // not per event: a labelled counter lookup allocates its labels.
            let mut run: Option<(&str, u64)> = None;
            for (event, refused) in fresh.iter().zip(refused) {
                let micros = acked.saturating_sub(event.commit_time_micros);
                latency.record(micros);
                seconds.observe(micros.max(0) as f64 / 1e6);
                if refused {
                    continue;
                }
                match &mut run {
                    Some((table, count)) if *table == &*event.table => *count += 1,
                    _ => {
                        count_published(&worker.name, run.replace((&*event.table, 1)));
                    }
                }
            }
            count_published(&worker.name, run);
            METRICS
                .dead_letters
                .get_or_create(&labels)
                .inc_by(rejected.len() as u64);
        }
        for batch in &queued {
            let last = batch.events[fresh_of(batch)].last().map(|e| e.position);
            progress.acknowledge(index, last, batch.boundary);
            METRICS
                .in_flight_events
                .get_or_create(&labels)
                .dec_by(batch.events.len() as i64);
            METRICS
                .in_flight_bytes
                .get_or_create(&labels)
                .dec_by(batch.bytes as i64);
        }
        // Let go of the events (and the receive buffers they share) before waiting.
        merged.clear();
        queued.clear();
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    info!(
        events = latency.count(),
        latency_p50_ms = ms(latency.quantile(0.50)),
        latency_p90_ms = ms(latency.quantile(0.90)),
        latency_p99_ms = ms(latency.quantile(0.99)),
        latency_max_ms = ms(latency.max()),
        "sink worker stopped; commit-to-acknowledgement latency of this session"
    );
    worker
        .sink
        .close()
        .await
        .map_err(|e| anyhow::anyhow!("closing sink {}: {e}", worker.name))
}

/// Adds a run of `count` events of one table to the sink's published counter.
fn count_published(sink: &str, run: Option<(&str, u64)>) {
    if let Some((table, count)) = run {
        METRICS
            .events_published
            .get_or_create(&SinkTableLabels {
                sink: sink.to_owned(),
                table: table.to_owned(),
            })
            .inc_by(count);
    }
}

/// Microseconds since the Unix epoch, the clock of [`Event::commit_time_micros`].
fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Sub-buckets per power of two: values are kept to within 1/32 (about 3%).
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Values are exact below this, then log-linear.
const LINEAR_LIMIT: u64 = 2 * SUB_BUCKETS;
/// Enough buckets for any u64.
const BUCKETS: usize = (LINEAR_LIMIT + (64 - SUB_BUCKET_BITS as u64 - 1) * SUB_BUCKETS) as usize;

/// A fixed-size log-linear histogram of microseconds (as HdrHistogram with 5 bits of
/// precision): recording is a few integer operations on an array allocated once, with no
/// allocation per event, so it can run for every event on the hot path.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    count: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            count: 0,
            max: 0,
        }
    }

    /// Records one latency; negative values (clock steps) count as zero.
    pub fn record(&mut self, micros: i64) {
        let value = micros.max(0) as u64;
        self.counts[bucket_of(value)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the middle of its bucket, never above the maximum
    /// recorded; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(index);
                return (low + (high - low) / 2).min(self.max);
            }
        }
        self.max
    }
}

fn bucket_of(value: u64) -> usize {
    if value < LINEAR_LIMIT {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // > SUB_BUCKET_BITS
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = (value >> shift) - SUB_BUCKETS; // 0..SUB_BUCKETS
    (LINEAR_LIMIT + u64::from(shift - 1) * SUB_BUCKETS + sub) as usize
}

/// The values `[low, high]` that land in bucket `index`.
fn bucket_range(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR_LIMIT {
        return (index, index);
    }
    let shift = (index - LINEAR_LIMIT) / SUB_BUCKETS + 1;
    let sub = (index - LINEAR_LIMIT) % SUB_BUCKETS;
    let low = (SUB_BUCKETS + sub) << shift;
    (low, low + ((1u64 << shift) - 1))
}

/// Sends `events` until the sink takes them, backing off on retryable errors; rejected events
/// go to the dead-letter store, and their indices are returned. The events' states live here,
/// one per event, and every retry of the batch hands the sink the same ones: what an earlier
/// attempt settled is not sent again.
async fn deliver(
    worker: &mut SinkWorker,
    events: &[Event],
    dead_letters: &dyn DeadLetterStore,
    slot: &str,
) -> anyhow::Result<Vec<usize>> {
    let mut states = vec![EventState::Pending; events.len()];
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        match worker.sink.send(events, &mut states).await {
            Ok(()) => break,
            Err(SinkError::Retryable(reason)) => {
                let delay = backoff.next_delay();
                warn!(%reason, retry_in = ?delay, "sink failed; retrying the batch");
                METRICS
                    .sink_retries
                    .get_or_create(&Metrics::sink(&worker.name))
                    .inc();
                tokio::time::sleep(delay).await;
            }
            Err(SinkError::Permanent(reason)) => {
                anyhow::bail!("sink {} failed: {reason}", worker.name)
            }
        }
    }
    let rejections = outbox_relay_sinks::rejections(states);
    let mut rejected = Vec::with_capacity(rejections.len());
    for rejection in rejections {
        rejected.push(rejection.index);
        let letter = DeadLetter::from_event(
            &events[rejection.index],
            "refused by the sink",
            rejection.reason,
            Some(worker.name.clone()),
        );
        // Not the reason: a sink's refusal may quote the event.
        warn!(sink = %worker.name, position = %letter.position,
            "sink refused an event; dead-lettered (`outbox-relay dlq list` shows why)");
        dead_letters.store(slot, &letter).await?;
    }
    Ok(rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_relay_sinks::test_util::{sample, RecordingSink};
    use outbox_relay_sinks::Text;

    #[test]
    fn latency_buckets_cover_every_value_within_their_precision() {
        let mut previous_high = None;
        for index in 0..BUCKETS {
            let (low, high) = bucket_range(index);
            assert!(low <= high);
            if let Some(previous) = previous_high {
                assert_eq!(low, previous + 1, "bucket {index} leaves a gap");
            }
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(high), index);
            assert!((high - low) as f64 <= low as f64 / SUB_BUCKETS as f64);
            previous_high = Some(high);
        }
        assert_eq!(previous_high, Some(u64::MAX));
    }

    #[test]
    fn latency_quantiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.99), 0);
        for micros in 1..=10_000 {
            h.record(micros);
        }
        h.record(-5);
        assert_eq!(h.count(), 10_001);
        assert_eq!(h.max(), 10_000);
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 5_000.0).abs() / 5_000.0 < 0.04, "{p50}");
        assert!((p99 - 9_900.0).abs() / 9_900.0 < 0.04, "{p99}");
        assert_eq!(h.quantile(1.0), 10_000);
        assert_eq!(h.quantile(0.0), 0);
    }

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

    /// A sink whose sends wait for a permit, recording each batch.
    struct Gated {
        recording: RecordingSink,
        gate: Arc<tokio::sync::Semaphore>,
        entered: Arc<Notify>,
    }

    #[async_trait::async_trait]
    impl Sink for Gated {
        async fn send(
            &mut self,
            batch: &[Event],
            states: &mut [EventState],
        ) -> Result<(), SinkError> {
            self.entered.notify_one();
            self.gate.acquire().await.expect("gate open").forget();
            self.recording.send(batch, states).await
        }
    }

    /// Acknowledges the first event and fails; on the retry, records what it was shown and
    /// rejects the second.
    struct FailsOnce {
        shown: Arc<Mutex<Vec<Vec<EventState>>>>,
    }

    #[async_trait::async_trait]
    impl Sink for FailsOnce {
        async fn send(
            &mut self,
            _batch: &[Event],
            states: &mut [EventState],
        ) -> Result<(), SinkError> {
            let mut shown = self.shown.lock().unwrap();
            shown.push(states.to_vec());
            if shown.len() == 1 {
                states[0] = EventState::Acked;
                return Err(SinkError::Retryable("broker away".into()));
            }
            states[1] = EventState::Rejected("too big".into());
            Ok(())
        }
    }

    /// Keeps no checkpoint; records the positions of dead letters.
    #[derive(Default)]
    struct Letters(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl DeadLetterStore for Letters {
        async fn store(&self, _: &str, letter: &DeadLetter) -> anyhow::Result<()> {
            self.0.lock().unwrap().push(letter.position.to_string());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_retry_shows_the_sink_what_earlier_attempts_settled_and_rejections_are_dead_letters()
    {
        let shown = Arc::new(Mutex::new(Vec::new()));
        let mut worker = SinkWorker {
            name: "flaky".into(),
            sink: Box::new(FailsOnce {
                shown: shown.clone(),
            }),
            skip_through: None,
        };
        let letters = Letters::default();
        let events = [sample(10, 0), sample(10, 1)];
        let rejected = deliver(&mut worker, &events, &letters, "slot")
            .await
            .unwrap();
        assert_eq!(rejected, [1]);
        assert_eq!(
            *shown.lock().unwrap(),
            [
                vec![EventState::Pending, EventState::Pending],
                vec![EventState::Acked, EventState::Pending]
            ]
        );
        assert_eq!(letters.0.lock().unwrap().len(), 1);
    }

    fn two_event_batch(lsn: u64) -> Batch {
        batch_of(vec![sample(lsn, 0), sample(lsn, 1)], Some(Lsn(lsn + 1)))
    }

    fn batch_of(events: Vec<Event>, boundary: Option<Lsn>) -> Batch {
        Batch {
            bytes: events.iter().map(Event::size_bytes).sum(),
            events,
            boundary,
        }
    }

    /// One send for the first batch, less the event skip_through says was delivered before
    /// (10/0); then the three batches that queued meanwhile, joined up to `limit`. Returns
    /// the sizes of the sends.
    async fn sends_after_falling_behind(limit: BatchLimit) -> Vec<usize> {
        let recording = RecordingSink::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let entered = Arc::new(Notify::new());
        let sink = Gated {
            recording: recording.clone(),
            gate: gate.clone(),
            entered: entered.clone(),
        };
        let progress = Progress::new(["gated".to_string()], Lsn(0));
        let worker = SinkWorker {
            name: "gated".into(),
            sink: Box::new(sink),
            skip_through: Some(Position {
                commit_lsn: Lsn(10),
                index: 0,
            }),
        };
        let (pipeline, handles) = start(
            vec![worker],
            progress.clone(),
            Arc::new(Letters::default()),
            "slot",
            4,
            limit,
        );
        pipeline.dispatch(two_event_batch(10)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), entered.notified())
            .await
            .expect("the worker sends the first batch");
        // The worker is in its first send: these three wait in its queue.
        for lsn in [20, 30, 40] {
            pipeline.dispatch(two_event_batch(lsn)).await.unwrap();
        }
        // Enough for the first send and one per queued batch, however they are joined.
        gate.add_permits(4);
        drop(pipeline);
        for handle in handles {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("the worker stops once the pipeline is dropped")
                .unwrap()
                .unwrap();
        }
        assert_eq!(progress.confirmed(), Lsn(41));
        assert_eq!(
            progress.checkpoints()["gated"],
            Position {
                commit_lsn: Lsn(40),
                index: 1
            }
        );
        recording.batches().iter().map(Vec::len).collect()
    }

    #[tokio::test]
    async fn a_worker_that_fell_behind_joins_queued_batches_up_to_the_batch_size() {
        let limit = BatchLimit {
            events: 4,
            bytes: usize::MAX,
        };
        // Two queued batches of two events fill one send of 4; the third goes in the next.
        assert_eq!(sends_after_falling_behind(limit).await, [1, 4, 2]);
    }

    #[tokio::test]
    async fn a_worker_that_fell_behind_joins_queued_batches_up_to_the_batch_bytes() {
        // Room for one and a half queued batches: joining a second would pass the limit, so
        // each queued batch goes alone.
        let batch_bytes = two_event_batch(20).bytes;
        let limit = BatchLimit {
            events: usize::MAX,
            bytes: batch_bytes * 3 / 2,
        };
        assert_eq!(sends_after_falling_behind(limit).await, [1, 2, 2, 2]);
    }

    #[test]
    fn a_batch_counts_the_bytes_of_its_events() {
        let mut big = sample(10, 0);
        big.payload = Text::from("x".repeat(1000)).into();
        big.headers.push(("tenant".into(), Text::from("acme")));
        let small = sample(10, 1);
        let mut pending = PendingBatch::new(BatchLimit {
            events: 10,
            bytes: usize::MAX,
        });
        pending.push(big.clone());
        pending.push(small.clone());
        let batch = pending.take(None);
        assert_eq!(big.size_bytes(), small.size_bytes() - 2 + 1000 + 10);
        assert_eq!(batch.bytes, big.size_bytes() + small.size_bytes());
    }
}
