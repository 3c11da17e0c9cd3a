//! The one sink behind every request/response API that answers per entry: the AWS batch
//! APIs (EventBridge `PutEvents`, SQS `SendMessageBatch`, SNS `PublishBatch`, 10 entries a
//! request) and HTTP webhooks (one event a request). Each API says how an event becomes an
//! entry and how to send a request ([`BatchApi`]); [`BatchSink`] schedules entries (one
//! event per key in flight, at most `concurrency` requests at once), retries what may pass
//! later (after the service's `Retry-After` when it gives one), splits requests refused as
//! invalid and stops the relay on what only an operator can fix.
//!
//! Invariants:
//! - `send` returns once every event is acknowledged or rejected, so the relay's checkpoint
//!   only moves over accepted entries. When failures persist it returns a retryable error
//!   after a few attempts; the events' states say what was already accepted, and the
//!   relay's retry of the same batch resends only the rest.
//! - A whole request refused as invalid is split up, so only the entry at fault is rejected.

mod scheduler;

use crate::{Event, EventState, Sink, SinkError};
use async_trait::async_trait;
use scheduler::{Outcome, Scheduler};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Failures of one event within one `send` before the batch is handed back to the relay.
const ATTEMPTS_PER_SEND: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured; a longer one waits this long.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How a whole request failed.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// Transient: throttling, 5xx, network, timeout, credentials not available yet.
    Retry(String),
    /// The request was refused as invalid: one of its entries is at fault.
    Invalid(String),
    /// The destination, the credentials or the permissions must be fixed by an operator:
    /// the error code and the message.
    Fatal(String, String),
}

/// What the service answered for one entry of a request.
#[derive(Debug)]
pub(crate) enum EntryResult {
    Accepted,
    /// May pass later (throttling, internal failure): sent again after a backoff.
    Retry(String),
    /// The same, and the service asked to wait at least this long (`Retry-After`).
    RetryAfter(String, Duration),
    /// About the entry itself: dead-lettered with the reason.
    Reject(String),
    /// About the destination or the permissions: the relay stops. The code and the reason.
    Fatal(String, String),
}

/// One AWS batch API, as the batch sink drives it.
#[async_trait]
pub(crate) trait BatchApi: Send + Sync + 'static {
    /// One entry of a request.
    type Entry: Clone + Send + 'static;
    /// Most entries in one request.
    const MAX_ENTRIES: usize;
    /// The service's name, for dead-letter reasons.
    const SERVICE: &'static str;
    /// The operation's name, for messages.
    const OPERATION: &'static str;

    /// The sink's name in the configuration.
    fn name(&self) -> &str;
    /// Most requests in flight at once.
    fn concurrency(&self) -> usize;
    /// Most entry bytes per request.
    fn max_request_bytes(&self) -> usize;
    /// Makes the client (region, credentials chain, endpoint); an error stops the relay.
    async fn ready(&self) -> Result<(), SinkError>;
    /// The entry for `event` and its size as the service counts it, or why the service
    /// could never take it.
    fn entry(&self, event: &Event) -> Result<(Self::Entry, usize), String>;
    /// Sends one request (after [`BatchApi::ready`]); one result per entry, in order.
    async fn put(&self, entries: Vec<Self::Entry>) -> Result<Vec<EntryResult>, RequestError>;
    /// What to do about a fatal error `code` on a request holding `entries`.
    fn fatal_hint(&self, code: &str, entries: &[&Self::Entry]) -> String;
}

/// The requests in flight: each one's entries (indexes into the batch) and its answer.
type InFlight = JoinSet<(Vec<usize>, Result<Vec<EntryResult>, RequestError>)>;

/// The sink: an API and the scheduling around it.
pub(crate) struct BatchSink<A> {
    api: Arc<A>,
}

impl<A: BatchApi> BatchSink<A> {
    pub(crate) fn new(api: A) -> Self {
        BatchSink { api: Arc::new(api) }
    }

    /// Sends the entries of the scheduler until all are done, too many failures pile up
    /// (a retryable error), or the relay must stop.
    async fn run(&self, scheduler: &mut Scheduler<A::Entry>) -> Result<(), SinkError> {
        let name = self.api.name();
        let operation = A::OPERATION;
        let concurrency = self.api.concurrency();
        let mut in_flight = InFlight::new();
        let mut exhausted: Option<String> = None;
        loop {
            let now = Instant::now();
            while exhausted.is_none() && in_flight.len() < concurrency {
                let request = scheduler.next_request(now);
                if request.is_empty() {
                    break;
                }
                let entries: Vec<A::Entry> = request
                    .iter()
                    .map(|&i| {
                        let entry = scheduler.slots[i].entry.as_ref();
                        entry.expect("pending events have entries").clone()
                    })
                    .collect();
                let api = Arc::clone(&self.api);
                in_flight.spawn(async move { (request, api.put(entries).await) });
            }
            if in_flight.is_empty() {
                if scheduler.all_done() {
                    return Ok(());
                }
                if let Some(reason) = exhausted {
                    return Err(SinkError::Retryable(format!("sink {name}: {reason}")));
                }
                if let Some(ready) = scheduler.next_ready() {
                    tokio::time::sleep_until(ready).await;
                }
                continue;
            }
            let wake = scheduler
                .next_ready()
                .filter(|_| exhausted.is_none() && in_flight.len() < concurrency);
            let joined = tokio::select! {
                joined = in_flight.join_next() => joined,
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => None,
            };
            let Some(joined) = joined else { continue };
            let (request, result) = joined.map_err(|err| {
                SinkError::Permanent(format!("sink {name}: a {operation} task failed: {err}"))
            })?;
            let now = Instant::now();
            match result {
                Ok(results) => {
                    if let Some(reason) = self.record(scheduler, &request, results, now)? {
                        exhausted = Some(reason);
                    }
                }
                Err(RequestError::Retry(reason)) => {
                    tracing::warn!(sink = %name, entries = request.len(), %reason,
                        "{operation} failed; retrying its entries");
                    for &i in &request {
                        if scheduler.finish(i, Outcome::Retry(reason.clone(), None), now) {
                            exhausted = Some(format!("{operation} keeps failing: {reason}"));
                        }
                    }
                }
                Err(RequestError::Invalid(reason)) => {
                    if scheduler.isolate(&request) {
                        let index = request[0];
                        let reason = format!("{} refused the entry: {reason}", A::SERVICE);
                        scheduler.finish(index, Outcome::Reject(reason), now);
                    } else {
                        tracing::warn!(sink = %name, entries = request.len(), %reason,
                            "{operation} refused a request as invalid; sending its entries one by one");
                    }
                }
                Err(RequestError::Fatal(code, reason)) => {
                    return Err(self.fatal(scheduler, &request, &code, &reason));
                }
            }
        }
    }

    fn fatal(
        &self,
        scheduler: &Scheduler<A::Entry>,
        request: &[usize],
        code: &str,
        reason: &str,
    ) -> SinkError {
        let entries: Vec<&A::Entry> = request
            .iter()
            .filter_map(|&i| scheduler.slots[i].entry.as_ref())
            .collect();
        SinkError::Permanent(format!(
            "sink {}: {} failed ({reason}); {}",
            self.api.name(),
            A::OPERATION,
            self.api.fatal_hint(code, &entries)
        ))
    }

    /// Applies the results of one request to its entries; returns the reason when one of
    /// them has failed too often in this `send`.
    fn record(
        &self,
        scheduler: &mut Scheduler<A::Entry>,
        request: &[usize],
        results: Vec<EntryResult>,
        now: Instant,
    ) -> Result<Option<String>, SinkError> {
        let name = self.api.name();
        let operation = A::OPERATION;
        if results.len() != request.len() {
            return Err(SinkError::Retryable(format!(
                "sink {name}: {operation} answered {} results for {} entries",
                results.len(),
                request.len()
            )));
        }
        let mut exhausted = None;
        let mut retried: Option<(usize, String)> = None;
        for (&index, result) in request.iter().zip(results) {
            let outcome = match result {
                EntryResult::Accepted => Outcome::Acknowledged,
                EntryResult::Reject(reason) => Outcome::Reject(reason),
                EntryResult::Retry(reason) => {
                    let count = retried.as_ref().map_or(0, |(count, _)| *count);
                    retried = Some((count + 1, reason.clone()));
                    Outcome::Retry(reason, None)
                }
                EntryResult::RetryAfter(reason, after) => {
                    let count = retried.as_ref().map_or(0, |(count, _)| *count);
                    retried = Some((count + 1, reason.clone()));
                    Outcome::Retry(reason, Some(after.min(MAX_RETRY_AFTER)))
                }
                EntryResult::Fatal(code, reason) => {
                    return Err(self.fatal(scheduler, &[index], &code, &reason));
                }
            };
            let reason = match &outcome {
                Outcome::Retry(reason, _) => Some(format!("an entry keeps failing: {reason}")),
                _ => None,
            };
            if scheduler.finish(index, outcome, now) {
                exhausted = reason;
            }
        }
        if let Some((failed, reason)) = retried {
            tracing::warn!(sink = %name, failed, of = request.len(), last_reason = %reason,
                "{operation} refused some entries for now; retrying them");
        }
        Ok(exhausted)
    }
}

#[async_trait]
impl<A: BatchApi> Sink for BatchSink<A> {
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        self.api.ready().await?;
        let entries = batch
            .iter()
            .zip(states.iter())
            .map(|(event, state)| match state {
                state if state.is_settled() => (None, state.clone()),
                _ => match self.api.entry(event) {
                    Ok(entry) => (Some(entry), EventState::Pending),
                    Err(reason) => (None, EventState::Rejected(reason)),
                },
            })
            .collect();
        let keys: Vec<&str> = batch.iter().map(|e| e.key.as_str()).collect();
        let limits = (A::MAX_ENTRIES, self.api.max_request_bytes());
        let mut scheduler = Scheduler::new(entries, &keys, limits);
        let result = self.run(&mut scheduler).await;
        for (state, slot) in states.iter_mut().zip(scheduler.slots) {
            *state = slot.state;
        }
        result
    }
}
