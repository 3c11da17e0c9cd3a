//! The Amazon EventBridge sink: every event becomes one `PutEvents` entry on an event bus.
//!
//! - **Entries.** `EventBusName`, `Source` and `DetailType` come from templates (default
//!   bus `default`, source `outbox.{aggregatetype}`, detail type `{type}`). `Detail` is the
//!   CloudEvents envelope in structured JSON (default) or, with format `raw`/`debezium`, the
//!   payload, which must then be a JSON object (a tombstone, or bytes from a `bytea`
//!   column, is rejected: dead-lettered with the fix; the envelope carries bytes as
//!   `data_base64`). `Time` is `occurred_at`, else the commit time;
//!   `Resources` are optional templates; `TraceHeader` is the event's W3C `traceparent`
//!   converted to the X-Ray header format. EventBridge assigns its own event ids, so the
//!   outbox event id travels inside `Detail` (the CloudEvents `id`) for consumers to dedup on.
//! - **Batching.** A request holds at most 10 entries and at most `max_request_bytes`
//!   (256 KiB) of entries, sized the way AWS documents it (Time 14 bytes, Source, DetailType,
//!   Detail and each resource as UTF-8 bytes). An event larger than that on its own is
//!   rejected before sending (dead-lettered): EventBridge emulators do not enforce the limit.
//! - **Per-key order.** At most one event per key is in flight, and an event is sent only
//!   once every earlier event of its key is acknowledged or rejected, so a retried event can
//!   never land after a later one of its key. Different keys go in parallel: up to
//!   `concurrency` requests at once.
//! - **Partial failures.** `PutEvents` accepts some entries and refuses others. Refusals that
//!   may pass later (throttling, internal failures) are retried alone with backoff; refusals
//!   of the entry itself (malformed detail, invalid argument, source or detail type not
//!   authorised) are returned as rejections. A whole request refused as invalid is split up,
//!   so only the entry at fault is rejected. A missing bus or missing permissions stop the
//!   relay with the fix: dead-lettering every event until an operator fixes IAM would only
//!   move the outage into the dead-letter table.
//! - **Acknowledgement.** `send` returns once every event is acknowledged or rejected, so the
//!   relay's checkpoint only moves over accepted entries. When failures persist it returns a
//!   retryable error after a few attempts; the events' states say what was already accepted,
//!   and the relay's retry of the same batch resends only the rest. Delivery is at-least-once
//!   (EventBridge does not deduplicate): a response lost after the service accepted the
//!   entries means they are sent again.

mod config;
mod entry;
mod errors;
mod scheduler;

pub use config::EventBridgeConfig;
pub use entry::{entry_size, xray_trace_header};

use crate::format::Format;
use crate::routing::Template;
use crate::{Event, EventState, Sink, SinkError};
use async_trait::async_trait;
use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region, SdkConfig};
use aws_sdk_eventbridge::error::ProvideErrorMetadata;
use aws_sdk_eventbridge::operation::put_events::PutEventsOutput;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use errors::{
    classify_request_error, error_chain, fatal_hint, RequestError, FATAL_CODES, REJECTED_CODES,
    UNREACHABLE_HINT,
};
use scheduler::{Outcome, Scheduler};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// EventBridge's limit on entries per `PutEvents` request.
pub const MAX_ENTRIES_PER_REQUEST: usize = 10;
/// EventBridge's limit on the total entry size of one `PutEvents` request (256 KiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Failures of one event within one `send` before the batch is handed back to the relay.
const ATTEMPTS_PER_SEND: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Everything the sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct EventBridgeSettings {
    /// The sink's name in the configuration, for messages.
    pub name: String,
    /// Event bus name or ARN.
    pub bus: Template,
    pub source: Template,
    pub detail_type: Template,
    /// Resource ARNs attached to every entry (templates).
    pub resources: Vec<Template>,
    pub format: Format,
    /// Default: the standard chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Default: AWS's endpoint for the region, or `AWS_ENDPOINT_URL`.
    pub endpoint_url: Option<String>,
    /// Most `PutEvents` requests in flight at once.
    pub concurrency: usize,
    /// Most entry bytes per request; a larger event is rejected.
    pub max_request_bytes: usize,
    /// How long one `PutEvents` attempt may take before it is retried.
    pub timeout: Duration,
}

/// Loads the AWS configuration the standard way (environment, profile, web identity, IMDS),
/// with an HTTPS client on rustls + ring and the SDK's own retries off: the sink retries
/// entries itself, because only it knows which entries of a request failed.
pub async fn sdk_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    timeout: Duration,
) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(timeout)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// The `PutEvents` sink.
pub struct EventBridgeSink {
    settings: EventBridgeSettings,
    client: Option<Client>,
}

impl EventBridgeSink {
    pub fn new(settings: EventBridgeSettings) -> Self {
        EventBridgeSink {
            settings,
            client: None,
        }
    }

    async fn client(&mut self) -> Result<Client, SinkError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let s = &self.settings;
        let config = sdk_config(s.region.as_deref(), s.endpoint_url.as_deref(), s.timeout).await;
        if config.region().is_none() {
            return Err(SinkError::Permanent(format!(
                "sink {}: no AWS region: set sinks.{}.region or AWS_REGION",
                s.name, s.name
            )));
        }
        let client = Client::new(&config);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Problems that would stop the sink, one line each with the fix: no region, no
    /// credentials, a bus that does not exist or cannot be seen. Only a bus without
    /// placeholders can be checked; the relay needs `events:DescribeEventBus` for this check
    /// only.
    pub async fn check(&mut self) -> Vec<String> {
        let name = self.settings.name.clone();
        let client = match self.client().await {
            Ok(client) => client,
            Err(err) => return vec![err.to_string()],
        };
        let Some(bus) = self.settings.bus.as_static().map(str::to_owned) else {
            return Vec::new();
        };
        match client.describe_event_bus().name(&bus).send().await {
            Ok(_) => Vec::new(),
            Err(err) if err.code() == Some("ResourceNotFoundException") => vec![format!(
                "sink {name}: event bus {bus:?} does not exist: create it (aws events \
                 create-event-bus --name {bus}) or fix sinks.{name}.bus / sinks.{name}.region"
            )],
            Err(err) if err.code().is_some() => vec![format!(
                "sink {name}: cannot describe event bus {bus:?}: {}: {}: check the relay's AWS \
                 credentials and that it may use the bus (events:PutEvents; \
                 events:DescribeEventBus for this check)",
                err.code().unwrap_or_default(),
                err.message().unwrap_or("no message"),
            )],
            Err(err) => vec![format!(
                "sink {name}: cannot reach EventBridge: {}: {UNREACHABLE_HINT}",
                error_chain(&err)
            )],
        }
    }

    /// Sends the entries of the scheduler until all are done, too many failures pile up
    /// (a retryable error), or the relay must stop.
    async fn run(&self, client: &Client, scheduler: &mut Scheduler) -> Result<(), SinkError> {
        let name = &self.settings.name;
        let mut in_flight: JoinSet<(Vec<usize>, Result<PutEventsOutput, RequestError>)> =
            JoinSet::new();
        let mut exhausted: Option<String> = None;
        loop {
            let now = Instant::now();
            while exhausted.is_none() && in_flight.len() < self.settings.concurrency {
                let request = scheduler.next_request(now);
                if request.is_empty() {
                    break;
                }
                let entries: Vec<PutEventsRequestEntry> = request
                    .iter()
                    .map(|&i| {
                        let entry = scheduler.slots[i].entry.as_ref();
                        entry.expect("pending events have entries").entry.clone()
                    })
                    .collect();
                let client = client.clone();
                in_flight.spawn(async move {
                    let result = client.put_events().set_entries(Some(entries)).send().await;
                    let result = result.map_err(|err| {
                        let status = err.raw_response().map(|r| r.status().as_u16());
                        classify_request_error(&err, status)
                    });
                    (request, result)
                });
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
                .filter(|_| exhausted.is_none() && in_flight.len() < self.settings.concurrency);
            let joined = tokio::select! {
                joined = in_flight.join_next() => joined,
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => None,
            };
            let Some(joined) = joined else { continue };
            let (request, result) = joined.map_err(|err| {
                SinkError::Permanent(format!("sink {name}: a PutEvents task failed: {err}"))
            })?;
            let now = Instant::now();
            match result {
                Ok(output) => {
                    if let Some(reason) = self.record(scheduler, &request, &output, now)? {
                        exhausted = Some(reason);
                    }
                }
                Err(RequestError::Retry(reason)) => {
                    tracing::warn!(sink = %name, entries = request.len(), %reason,
                        "PutEvents failed; retrying its entries");
                    for &i in &request {
                        if scheduler.finish(i, Outcome::Retry(reason.clone()), now) {
                            exhausted = Some(format!("PutEvents keeps failing: {reason}"));
                        }
                    }
                }
                Err(RequestError::Invalid(reason)) => {
                    if scheduler.isolate(&request) {
                        let index = request[0];
                        scheduler.finish(
                            index,
                            Outcome::Reject(format!("EventBridge refused the entry: {reason}")),
                            now,
                        );
                    } else {
                        tracing::warn!(sink = %name, entries = request.len(), %reason,
                            "PutEvents refused a request as invalid; sending its entries one by one");
                    }
                }
                Err(RequestError::Fatal(code, reason)) => {
                    let mut buses: Vec<&str> = request
                        .iter()
                        .filter_map(|&i| scheduler.slots[i].entry.as_ref())
                        .filter_map(|e| e.entry.event_bus_name())
                        .collect();
                    buses.sort_unstable();
                    buses.dedup();
                    return Err(SinkError::Permanent(format!(
                        "sink {name}: PutEvents failed ({reason}); {}",
                        fatal_hint(&self.settings, &code, &buses)
                    )));
                }
            }
        }
    }

    /// Applies a `PutEvents` response to its entries; returns the reason when one of them
    /// has failed too often in this `send`.
    fn record(
        &self,
        scheduler: &mut Scheduler,
        request: &[usize],
        output: &PutEventsOutput,
        now: Instant,
    ) -> Result<Option<String>, SinkError> {
        let name = &self.settings.name;
        let results = output.entries();
        if results.len() != request.len() {
            return Err(SinkError::Retryable(format!(
                "sink {name}: PutEvents answered {} results for {} entries",
                results.len(),
                request.len()
            )));
        }
        let mut exhausted = None;
        let mut retried: Option<(usize, String)> = None;
        for (&index, result) in request.iter().zip(results) {
            let outcome = match result.error_code() {
                None if result.event_id().is_some() => Outcome::Acknowledged,
                None => {
                    Outcome::Retry("PutEvents returned neither an event id nor an error".into())
                }
                Some(code) => {
                    let reason = format!("{code}: {}", result.error_message().unwrap_or_default());
                    if FATAL_CODES.contains(&code) {
                        let slot = &scheduler.slots[index];
                        let bus = slot.entry.as_ref().and_then(|e| e.entry.event_bus_name());
                        return Err(SinkError::Permanent(format!(
                            "sink {name}: EventBridge refused an entry ({reason}); {}",
                            fatal_hint(&self.settings, code, &[bus.unwrap_or_default()])
                        )));
                    }
                    if REJECTED_CODES.contains(&code) {
                        Outcome::Reject(format!("EventBridge rejected the entry: {reason}"))
                    } else {
                        // Retryable codes, and codes this version does not know: retrying
                        // keeps the event; an unknown permanent code shows in the warnings.
                        Outcome::Retry(reason)
                    }
                }
            };
            if let Outcome::Retry(reason) = &outcome {
                let count = retried.as_ref().map_or(0, |(count, _)| *count);
                retried = Some((count + 1, reason.clone()));
                let reason = format!("an entry keeps failing: {reason}");
                if scheduler.finish(index, outcome, now) {
                    exhausted = Some(reason);
                }
            } else {
                scheduler.finish(index, outcome, now);
            }
        }
        if let Some((failed, reason)) = retried {
            tracing::warn!(sink = %name, failed, of = request.len(), last_reason = %reason,
                "PutEvents refused some entries for now; retrying them");
        }
        Ok(exhausted)
    }
}

#[async_trait]
impl Sink for EventBridgeSink {
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        let client = self.client().await?;
        let entries = batch
            .iter()
            .zip(states.iter())
            .map(|(event, state)| match state {
                state if state.is_settled() => (None, state.clone()),
                _ => match self.settings.entry(event) {
                    Ok(entry) => (Some(entry), EventState::Pending),
                    Err(reason) => (None, EventState::Rejected(reason)),
                },
            })
            .collect();
        let keys: Vec<&str> = batch.iter().map(|e| e.key.as_str()).collect();
        let mut scheduler = Scheduler::new(entries, &keys, self.settings.max_request_bytes);
        let result = self.run(&client, &mut scheduler).await;
        for (state, slot) in states.iter_mut().zip(scheduler.slots) {
            *state = slot.state;
        }
        result
    }
}
