//! One worker per sink: takes batches in order, skips what the sink already holds, delivers
//! with retry (the pipeline keeps each event's state across attempts), sends rejected events
//! to the dead-letter store (with those its upcasters could not take:
//! [`SinkVersions`](crate::upcast::publish::SinkVersions)),
//! and reports acknowledgements to [`Progress`](super::Progress).
//!
//! Invariant: a batch is acknowledged only once `send` returned for it; an error fails that
//! batch, never a later one.

use super::{Batch, BatchLimit, LatencyHistogram, Progress, SinkWorker};
use crate::dead_letters::DeadLetterStore;
use crate::outbox::DeadLetter;
use crate::telemetry::{Metrics, SinkTableLabels, METRICS};
use crate::upcast::publish::UPCAST_FAILED;
use outbox_relay_sinks::{Backoff, Event, EventState, SinkError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

pub(super) async fn run_worker(
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
    // Exported from the start: a restart that read nothing again shows 0, not no series.
    METRICS.events_skipped.get_or_create(&labels).inc_by(0);
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
        let upcast = match &mut worker.versions {
            Some(versions) if !fresh.is_empty() => versions.apply(fresh).await,
            _ => None,
        };
        let published: &[Event] = match &upcast {
            Some(upcast) => &upcast.events,
            None => fresh,
        };
        if let Some(upcast) = &upcast {
            for (index, reason) in &upcast.failed {
                let letter = (&fresh[*index], UPCAST_FAILED, reason.clone());
                store_for_sink(&*dead_letters, &slot, &worker.name, letter).await?;
            }
            METRICS
                .dead_letters
                .get_or_create(&labels)
                .inc_by(upcast.failed.len() as u64);
        }
        if !published.is_empty() {
            let span = info_span!("batch", events = published.len(), first = %published[0].position,
                last = %published[published.len() - 1].position);
            let started = unix_micros();
            METRICS.set_oldest_unacked(&worker.name, Some(published[0].commit_time_micros));
            let rejected = deliver(&mut worker, published, fresh, &*dead_letters, &slot)
                .instrument(span)
                .await?;
            METRICS.set_oldest_unacked(&worker.name, None);
            let acked = unix_micros();
            let ms = |micros: i64| micros as f64 / 1000.0;
            debug!(
                events = published.len(),
                batches = queued.len(),
                oldest_waited_ms = ms(started - published[0].commit_time_micros),
                send_ms = ms(acked - started),
                "batch acknowledged"
            );
            let seconds = METRICS.publish_latency.get_or_create(&labels);
            let mut refused = vec![false; published.len()];
            for &index in &rejected {
                refused[index] = true;
            }
            // Published events are counted per run of one table (usually the whole batch),
            // not per event: a labelled counter lookup allocates its labels.
            let mut run: Option<(&str, u64)> = None;
            for (event, refused) in published.iter().zip(refused) {
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
            let fresh = fresh_of(batch);
            if fresh.start > 0 {
                METRICS
                    .events_skipped
                    .get_or_create(&labels)
                    .inc_by(fresh.start as u64);
            }
            let last = batch.events[fresh].last().map(|e| e.position);
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

/// Sends `events` until the sink takes them, backing off on retryable errors; rejected events
/// go to the dead-letter store, and their indices are returned. The events' states live here,
/// one per event, and every retry of the batch hands the sink the same ones: what an earlier
/// attempt settled is not sent again. `stored` holds the events as the outbox stored them
/// (`events` may be their upcast copies, a subset in the same order): a dead letter keeps
/// the stored event, so its replay is upcast again like the original.
pub(super) async fn deliver(
    worker: &mut SinkWorker,
    events: &[Event],
    stored: &[Event],
    dead_letters: &dyn DeadLetterStore,
    slot: &str,
) -> anyhow::Result<Vec<usize>> {
    let mut states = vec![EventState::Pending; events.len()];
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let sent = worker.sink.send(events, &mut states).await;
        METRICS.set_sink_up(&worker.name, sent.is_ok());
        match sent {
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
        let (event, reason) = as_stored(&events[rejection.index], stored, rejection.reason);
        let letter = (event, "refused by the sink", reason);
        store_for_sink(dead_letters, slot, &worker.name, letter).await?;
    }
    Ok(rejected)
}

/// The event the outbox stored for `sent`, and the sink's `reason`, saying the versions
/// when `sent` is an upcast copy (found among `stored` by position); `sent` itself otherwise.
fn as_stored<'a>(sent: &'a Event, stored: &'a [Event], reason: String) -> (&'a Event, String) {
    let versions = sent.original_schema_version.zip(sent.schema_version);
    let original = stored
        .binary_search_by(|e| e.position.cmp(&sent.position))
        .ok()
        .map(|at| &stored[at]);
    match (versions, original) {
        (Some((from, to)), Some(original)) => (
            original,
            format!("{reason} (sent upcast from version {from} to {to}; kept here as stored, version {from})"),
        ),
        _ => (sent, reason),
    }
}

/// Stores a dead letter of sink `sink` (an event it refused, or could not have at its
/// version): `dlq replay` sends it back to that sink only. The log line says the kind,
/// not the reason, which may quote the event.
async fn store_for_sink(
    dead_letters: &dyn DeadLetterStore,
    slot: &str,
    sink: &str,
    (event, kind, reason): (&Event, &'static str, String),
) -> anyhow::Result<()> {
    let letter = DeadLetter::from_event(event, kind, reason, Some(sink.to_owned()));
    warn!(sink, position = %letter.position, kind,
        "an event is a dead letter for the sink (`outbox-relay dlq list` shows why)");
    dead_letters.store(slot, &letter).await
}
