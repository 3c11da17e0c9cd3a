//! The pipeline's unit tests: batching, the confirm rule, retries and backpressure, with
//! in-memory sinks.

use super::latency::{bucket_of, bucket_range, BUCKETS, SUB_BUCKETS};
use super::worker::deliver;
use super::*;
use crate::dead_letters::DeadLetterStore;
use crate::outbox::DeadLetter;
use outbox_relay_sinks::test_util::{sample, RecordingSink};
use outbox_relay_sinks::Text;
use outbox_relay_sinks::{EventState, Lsn, Position, Sink, SinkError};
use std::sync::Mutex;
use std::time::Duration;

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
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
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
    async fn send(&mut self, _batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
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
async fn a_retry_shows_the_sink_what_earlier_attempts_settled_and_rejections_are_dead_letters() {
    let shown = Arc::new(Mutex::new(Vec::new()));
    let mut worker = SinkWorker {
        name: "flaky".into(),
        sink: Box::new(FailsOnce {
            shown: shown.clone(),
        }),
        skip_through: None,
        versions: None,
    };
    let letters = Letters::default();
    let events = [sample(10, 0), sample(10, 1)];
    let rejected = deliver(&mut worker, &events, &events, &letters, "slot")
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
        versions: None,
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
    let skipped = crate::telemetry::METRICS
        .events_skipped
        .get_or_create(&crate::telemetry::Metrics::sink("gated"))
        .get();
    assert!(skipped >= 1, "the event skip_through covers is counted");
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
