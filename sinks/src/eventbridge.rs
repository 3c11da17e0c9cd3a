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
//!   retryable error after a few attempts, and remembers what was already accepted: the
//!   relay's retry of the same batch resends only the rest. Delivery is at-least-once
//!   (EventBridge does not deduplicate): a response lost after the service accepted the
//!   entries means they are sent again.

use crate::format::{self, Format};
use crate::routing::Template;
use crate::{Backoff, Delivery, Event, Payload, Position, Rejection, Sink, SinkError};

/// Why a binary payload (a `bytea` column) is refused with `debezium` or `raw`: the column
/// type is known only from the database (`check` reports it), so the configuration cannot
/// refuse it, and each such event is rejected.
const NOT_JSON: &str = "the payload is bytes (a bytea column), and EventBridge's Detail must be \
     a JSON object: use format = \"cloudevents\" (the bytes go into `data_base64`)";

/// Why a tombstone is refused: the configuration lets only Kafka sinks take them.
const NO_PAYLOAD: &str =
    "the event has no payload (a tombstone: on_null_payload = \"tombstone\"), \
     and only a Kafka sink can carry one: route the table only to Kafka sinks";
use async_trait::async_trait;
use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region, SdkConfig};
use aws_sdk_eventbridge::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_eventbridge::operation::put_events::PutEventsOutput;
use aws_sdk_eventbridge::primitives::DateTime;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// EventBridge's limit on entries per `PutEvents` request.
pub const MAX_ENTRIES_PER_REQUEST: usize = 10;
/// EventBridge's limit on the total entry size of one `PutEvents` request (256 KiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;
/// What AWS counts for a `Time` parameter, whatever its value.
const TIME_BYTES: usize = 14;
/// Failures of one event within one `send` before the batch is handed back to the relay.
const ATTEMPTS_PER_SEND: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Entry error codes the EventBridge API reference calls retryable, plus the 5xx ones.
const RETRYABLE_CODES: [&str; 6] = [
    "ThrottlingException",
    "InternalFailure",
    "InternalException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
];
/// Entry error codes that are about the entry itself: it is rejected (dead-lettered).
const REJECTED_CODES: [&str; 6] = [
    "InvalidArgument",
    "MalformedDetail",
    "RedactionFailure",
    "NotAuthorizedForSourceException",
    "NotAuthorizedForDetailTypeException",
    "ValidationException",
];
/// Entry error codes that are about the bus or the credentials: the relay stops.
const FATAL_CODES: [&str; 3] = [
    "ResourceNotFoundException",
    "AccessDeniedException",
    "InvalidAccountIdException",
];

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

/// The size of an entry as EventBridge counts it against its limit.
pub fn entry_size(source: &str, detail_type: &str, detail: &str, resources: &[String]) -> usize {
    TIME_BYTES
        + source.len()
        + detail_type.len()
        + detail.len()
        + resources.iter().map(String::len).sum::<usize>()
}

/// The W3C `traceparent` as an X-Ray trace header (what `TraceHeader` takes), converted the
/// way OpenTelemetry's X-Ray propagator does; `None` when it is not a valid traceparent.
pub fn xray_trace_header(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    if !valid {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1;
    Some(format!(
        "Root=1-{}-{};Parent={parent};Sampled={sampled}",
        &trace[..8],
        &trace[8..]
    ))
}

/// One event as a `PutEvents` entry, with its size.
#[derive(Debug, Clone)]
struct Entry {
    entry: PutEventsRequestEntry,
    size: usize,
}

impl EventBridgeSettings {
    /// Mistakes that would make EventBridge refuse every event: a fixed bus name it cannot
    /// accept, a fixed empty source or detail type, no room for a request.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(bus) = self.bus.as_static() {
            let valid = bus
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c));
            if bus.is_empty() || !valid {
                return Err(format!(
                    "bus {bus:?} is not an event bus name or ARN (letters, digits and /._-)"
                ));
            }
        }
        for (key, template) in [("source", &self.source), ("detail_type", &self.detail_type)] {
            if template.as_static() == Some("") {
                return Err(format!("{key} must not be empty"));
            }
        }
        if self.concurrency == 0 || self.max_request_bytes == 0 {
            return Err("concurrency and max_request_bytes must be at least 1".into());
        }
        Ok(())
    }

    /// The entry for `event`, or why EventBridge could never take it.
    fn entry(&self, event: &Event) -> Result<Entry, String> {
        let render = |template: &Template| {
            let mut out = String::new();
            template.render(event, &mut out);
            out
        };
        if event.payload == Payload::Tombstone {
            return Err(NO_PAYLOAD.into());
        }
        let detail = match self.format {
            Format::CloudEvents => {
                let mut line = Vec::with_capacity(event.payload.len() + 512);
                format::write_line(Format::CloudEvents, event, &mut line);
                line.pop();
                String::from_utf8(line).expect("the envelope is UTF-8")
            }
            Format::Debezium | Format::Raw => {
                let Some(payload) = event.payload.as_json() else {
                    return Err(NOT_JSON.into());
                };
                if !payload.trim_start().starts_with('{') {
                    return Err(
                        "the payload is not a JSON object, and EventBridge's Detail must be one: \
                         use format = \"cloudevents\" (the payload goes into `data`) or publish \
                         objects"
                            .into(),
                    );
                }
                payload.to_string()
            }
        };
        let source = render(&self.source);
        let detail_type = render(&self.detail_type);
        let resources: Vec<String> = self.resources.iter().map(render).collect();
        let size = entry_size(&source, &detail_type, &detail, &resources);
        if size > self.max_request_bytes {
            return Err(format!(
                "the event is {size} bytes as an EventBridge entry (Source, DetailType, Detail, \
                 Resources and 14 for Time), over the limit of {} bytes: store large payloads \
                 elsewhere (e.g. S3) and publish a reference",
                self.max_request_bytes
            ));
        }
        let time = match &event.occurred_at {
            Some(time) => humantime::parse_rfc3339_weak(time).ok(),
            None => None,
        }
        .unwrap_or_else(|| {
            UNIX_EPOCH + Duration::from_micros(event.commit_time_micros.max(0) as u64)
        });
        let entry = PutEventsRequestEntry::builder()
            .event_bus_name(render(&self.bus))
            .source(source)
            .detail_type(detail_type)
            .detail(detail)
            .time(DateTime::from(time))
            .set_resources((!resources.is_empty()).then_some(resources))
            .set_trace_header(event.traceparent.as_deref().and_then(xray_trace_header))
            .build();
        Ok(Entry { entry, size })
    }
}

/// Where an event of the batch being sent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Pending,
    InFlight,
    Acknowledged,
    Rejected(String),
}

impl State {
    fn is_done(&self) -> bool {
        matches!(self, State::Acknowledged | State::Rejected(_))
    }
}

#[derive(Debug)]
struct Slot {
    entry: Option<Entry>,
    /// Index of the event's key in [`Scheduler::groups`].
    group: usize,
    state: State,
    /// Failures in this `send`.
    failures: u32,
    /// The wait before its next attempt after a failure.
    backoff: Backoff,
    not_before: Instant,
    /// Sent alone: a request holding it was refused as a whole as invalid.
    alone: bool,
}

/// What one finished request means for its entries.
enum Outcome {
    Acknowledged,
    Retry(String),
    Reject(String),
}

/// Decides which events go out in which request: at most one event per key in flight, in
/// key order; at most 10 entries and `max_bytes` per request.
struct Scheduler {
    slots: Vec<Slot>,
    /// The events of each key, in batch order, and how many of them are done.
    groups: Vec<(Vec<usize>, usize)>,
    max_bytes: usize,
}

impl Scheduler {
    fn new(entries: Vec<(Option<Entry>, State)>, keys: &[&str], max_bytes: usize) -> Self {
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
        let now = Instant::now();
        let slots = entries
            .into_iter()
            .zip(keys)
            .enumerate()
            .map(|(index, ((entry, state), key))| {
                let group = *group_of.entry(key).or_insert_with(|| {
                    groups.push((Vec::new(), 0));
                    groups.len() - 1
                });
                groups[group].0.push(index);
                Slot {
                    entry,
                    group,
                    state,
                    failures: 0,
                    backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
                    not_before: now,
                    alone: false,
                }
            })
            .collect();
        let mut scheduler = Scheduler {
            slots,
            groups,
            max_bytes,
        };
        for group in 0..scheduler.groups.len() {
            scheduler.advance(group);
        }
        scheduler
    }

    /// Moves the group's cursor past its finished events.
    fn advance(&mut self, group: usize) {
        let (members, done) = &mut self.groups[group];
        while *done < members.len() && self.slots[members[*done]].state.is_done() {
            *done += 1;
        }
    }

    /// The first unfinished event of each key that is pending, in batch order.
    fn heads(&self) -> Vec<usize> {
        let mut heads: Vec<usize> = self
            .groups
            .iter()
            .filter_map(|(members, done)| members.get(*done).copied())
            .filter(|&i| self.slots[i].state == State::Pending)
            .collect();
        heads.sort_unstable();
        heads
    }

    fn all_done(&self) -> bool {
        self.groups
            .iter()
            .all(|(members, done)| *done == members.len())
    }

    /// The events of the next request among those ready at `now`, marked in flight; empty
    /// when none is ready.
    fn next_request(&mut self, now: Instant) -> Vec<usize> {
        let ready = self
            .heads()
            .into_iter()
            .filter(|&i| self.slots[i].not_before <= now);
        let request = pack(
            ready.map(|i| {
                let slot = &self.slots[i];
                let size = slot.entry.as_ref().map_or(0, |e| e.size);
                (i, size, slot.alone)
            }),
            self.max_bytes,
        );
        for &i in &request {
            self.slots[i].state = State::InFlight;
        }
        request
    }

    /// When the earliest pending head becomes ready.
    fn next_ready(&self) -> Option<Instant> {
        self.heads()
            .into_iter()
            .map(|i| self.slots[i].not_before)
            .min()
    }

    /// Records the outcome of an event that was in flight; returns whether it has now failed
    /// too often in this `send`.
    fn finish(&mut self, index: usize, outcome: Outcome, now: Instant) -> bool {
        let slot = &mut self.slots[index];
        let mut exhausted = false;
        match outcome {
            Outcome::Acknowledged => slot.state = State::Acknowledged,
            Outcome::Reject(reason) => slot.state = State::Rejected(reason),
            Outcome::Retry(_) => {
                slot.state = State::Pending;
                slot.failures += 1;
                slot.not_before = now + slot.backoff.next_delay();
                exhausted = slot.failures >= ATTEMPTS_PER_SEND;
            }
        }
        let group = slot.group;
        self.advance(group);
        exhausted
    }

    /// A request refused as a whole as invalid: its events go again one per request, so
    /// only the one at fault is rejected. Returns whether the request held a single event.
    fn isolate(&mut self, request: &[usize]) -> bool {
        for &i in request {
            self.slots[i].state = State::Pending;
            self.slots[i].alone = true;
        }
        request.len() == 1
    }
}

/// Packs one request from `candidates` (index, entry size, must go alone), taken in order:
/// each one that still fits goes in, up to 10 entries and `max_bytes`.
fn pack(candidates: impl Iterator<Item = (usize, usize, bool)>, max_bytes: usize) -> Vec<usize> {
    let mut request = Vec::new();
    let mut bytes = 0;
    for (index, size, alone) in candidates {
        if alone {
            if request.is_empty() {
                return vec![index];
            }
            continue;
        }
        if bytes + size <= max_bytes {
            request.push(index);
            bytes += size;
            if request.len() == MAX_ENTRIES_PER_REQUEST {
                break;
            }
        }
    }
    request
}

/// How a whole request failed.
enum RequestError {
    /// Transient: throttling, 5xx, network, timeout, credentials not available yet.
    Retry(String),
    /// The request was refused as invalid: one of its entries is at fault.
    Invalid(String),
    /// The bus, the credentials or the permissions must be fixed by an operator: the error
    /// code and the message.
    Fatal(String, String),
}

/// An error and its sources on one line, without the SDK's debug dump.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(err) = current {
        let text = err
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

/// What to check when EventBridge could not be asked at all.
const UNREACHABLE_HINT: &str = "check the network, the endpoint (endpoint_url, \
    AWS_ENDPOINT_URL) and the AWS credentials (environment, profile, web identity or instance \
    role)";

fn classify_request_error<R: std::fmt::Debug + 'static>(
    err: &SdkError<aws_sdk_eventbridge::operation::put_events::PutEventsError, R>,
    status: Option<u16>,
) -> RequestError {
    let Some(code) = err.code() else {
        return RequestError::Retry(format!("{}: {UNREACHABLE_HINT}", error_chain(err)));
    };
    let message = format!("{code}: {}", err.message().unwrap_or("no message"));
    match code {
        code if RETRYABLE_CODES.contains(&code) || code == "ExpiredTokenException" => {
            RequestError::Retry(message)
        }
        "ValidationException" | "InvalidArgument" | "SerializationException" => {
            RequestError::Invalid(message)
        }
        _ if status.is_some_and(|s| s >= 500 || s == 429) => RequestError::Retry(message),
        code => RequestError::Fatal(code.to_owned(), message),
    }
}

/// Why the relay must stop, with what to do about it; `buses` are those the failed
/// request named.
fn fatal_hint(settings: &EventBridgeSettings, code: &str, buses: &[&str]) -> String {
    let name = &settings.name;
    let create = match buses {
        [bus] => *bus,
        _ => "NAME",
    };
    let buses = buses.join(", ");
    match code {
        "ResourceNotFoundException" => format!(
            "event bus {buses} does not exist in this account and region: create it (aws \
             events create-event-bus --name {create}) or fix sinks.{name}.bus / sinks.{name}.region"
        ),
        "AccessDeniedException" | "InvalidAccountIdException" => format!(
            "the credentials may not publish to event bus {buses}: allow events:PutEvents on \
             it for the relay's role, or fix sinks.{name}.bus"
        ),
        _ => format!(
            "check the relay's AWS credentials and permissions (events:PutEvents), and \
             sinks.{name}.bus / sinks.{name}.region"
        ),
    }
}

/// The `PutEvents` sink.
pub struct EventBridgeSink {
    settings: EventBridgeSettings,
    client: Option<Client>,
    /// What earlier attempts at the current batch achieved: the relay retries the same
    /// batch after a retryable error, and acknowledged entries are not sent again.
    resume: Option<(Vec<Position>, Vec<State>)>,
}

impl EventBridgeSink {
    pub fn new(settings: EventBridgeSettings) -> Self {
        EventBridgeSink {
            settings,
            client: None,
            resume: None,
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
    async fn send(&mut self, batch: &[Event]) -> Result<Delivery, SinkError> {
        let client = self.client().await?;
        let positions: Vec<Position> = batch.iter().map(|e| e.position).collect();
        let previous = match self.resume.take() {
            Some((resumed, states)) if resumed == positions => Some(states),
            _ => None,
        };
        let entries = batch
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let before = previous.as_ref().map(|states| states[i].clone());
                match before {
                    Some(state) if state.is_done() => (None, state),
                    _ => match self.settings.entry(event) {
                        Ok(entry) => (Some(entry), State::Pending),
                        Err(reason) => (None, State::Rejected(reason)),
                    },
                }
            })
            .collect();
        let keys: Vec<&str> = batch.iter().map(|e| e.key.as_str()).collect();
        let mut scheduler = Scheduler::new(entries, &keys, self.settings.max_request_bytes);
        let result = self.run(&client, &mut scheduler).await;
        let states: Vec<State> = scheduler
            .slots
            .into_iter()
            .map(|slot| match slot.state {
                State::InFlight => State::Pending,
                state => state,
            })
            .collect();
        match result {
            Ok(()) => Ok(Delivery {
                rejected: states
                    .into_iter()
                    .enumerate()
                    .filter_map(|(index, state)| match state {
                        State::Rejected(reason) => Some(Rejection { index, reason }),
                        _ => None,
                    })
                    .collect(),
            }),
            Err(err @ SinkError::Retryable(_)) => {
                self.resume = Some((positions, states));
                Err(err)
            }
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    fn settings(format: Format) -> EventBridgeSettings {
        EventBridgeSettings {
            name: "bus".into(),
            bus: Template::parse("orders").unwrap(),
            source: Template::parse("outbox.{aggregatetype}").unwrap(),
            detail_type: Template::parse("{type}").unwrap(),
            resources: vec![Template::parse("arn:aws:example:::order/{aggregateid}").unwrap()],
            format,
            region: None,
            endpoint_url: None,
            concurrency: 4,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn an_entry_carries_the_envelope_routing_time_and_trace() {
        let mut event = sample(0x16B3748, 2);
        event.occurred_at = Some(Text::from("2026-01-02T03:04:05.123456Z"));
        event.traceparent = Some(Text::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let Entry { entry, size } = settings(Format::CloudEvents).entry(&event).unwrap();
        assert_eq!(entry.event_bus_name(), Some("orders"));
        assert_eq!(entry.source(), Some("outbox.order"));
        assert_eq!(entry.detail_type(), Some("OrderCreated"));
        assert_eq!(entry.resources(), ["arn:aws:example:::order/order-\"1\""]);
        let detail: serde_json::Value = serde_json::from_str(entry.detail().unwrap()).unwrap();
        assert_eq!(detail["id"], "0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11");
        assert_eq!(detail["sequence"], "00000000016B374800000002");
        assert_eq!(detail["data"]["total"], 12);
        assert_eq!(
            entry.time().unwrap().to_millis().unwrap(),
            1_767_323_045_123
        );
        assert_eq!(
            entry.trace_header(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        let expected = 14
            + "outbox.order".len()
            + "OrderCreated".len()
            + entry.detail().unwrap().len()
            + entry.resources()[0].len();
        assert_eq!(size, expected);
    }

    #[test]
    fn without_occurred_at_the_time_is_the_commit_time() {
        let event = sample(1, 0);
        let Entry { entry, .. } = settings(Format::Raw).entry(&event).unwrap();
        assert_eq!(
            entry.time().unwrap().to_millis().unwrap(),
            1_700_000_000_123
        );
        assert_eq!(entry.detail(), Some(r#"{"total": 12}"#));
        assert_eq!(entry.trace_header(), None);
    }

    #[test]
    fn raw_details_must_be_objects() {
        let mut event = sample(1, 0);
        event.payload = Text::from(r#" ["gold", 3]"#).into();
        let reason = settings(Format::Debezium).entry(&event).unwrap_err();
        assert!(reason.contains("not a JSON object"), "{reason}");
        assert!(settings(Format::CloudEvents).entry(&event).is_ok());
    }

    #[test]
    fn bytes_and_tombstones_are_refused_as_raw_details_bytes_go_in_the_envelope() {
        let mut event = sample(1, 0);
        event.payload = Payload::Binary {
            bytes: bytes::Bytes::from_static(b"\x00\x01"),
            content_type: "application/x-protobuf".into(),
        };
        for format in [Format::Debezium, Format::Raw] {
            let reason = settings(format).entry(&event).unwrap_err();
            assert!(
                reason.contains("the payload is bytes (a bytea column)"),
                "{reason}"
            );
        }
        let Entry { entry, .. } = settings(Format::CloudEvents).entry(&event).unwrap();
        let detail: serde_json::Value = serde_json::from_str(entry.detail().unwrap()).unwrap();
        assert_eq!(detail["data_base64"], "AAE=");
        assert_eq!(detail["datacontenttype"], "application/x-protobuf");
        event.payload = Payload::Tombstone;
        for format in [Format::CloudEvents, Format::Debezium, Format::Raw] {
            let reason = settings(format).entry(&event).unwrap_err();
            assert!(
                reason.contains("only a Kafka sink can carry one"),
                "{reason}"
            );
        }
    }

    #[test]
    fn an_event_over_the_limit_on_its_own_is_refused_at_the_boundary() {
        let mut s = settings(Format::Raw);
        s.resources.clear();
        let fixed = 14 + "outbox.order".len() + "OrderCreated".len();
        let payload = |len: usize| format!("{{\"p\":\"{}\"}}", "x".repeat(len - 8));
        let mut event = sample(1, 0);
        event.payload = Text::from(payload(DEFAULT_MAX_REQUEST_BYTES - fixed)).into();
        assert_eq!(s.entry(&event).unwrap().size, DEFAULT_MAX_REQUEST_BYTES);
        event.payload = Text::from(payload(DEFAULT_MAX_REQUEST_BYTES - fixed + 1)).into();
        let reason = s.entry(&event).unwrap_err();
        assert!(reason.contains("262145 bytes"), "{reason}");
    }

    #[test]
    fn settings_that_would_refuse_every_event_are_configuration_errors() {
        assert_eq!(settings(Format::CloudEvents).validate(), Ok(()));
        let mut s = settings(Format::CloudEvents);
        s.bus = Template::parse("arn:aws:events:eu-west-1:123456789012:event-bus/orders").unwrap();
        assert_eq!(s.validate(), Ok(()));
        s.bus = Template::parse("my orders").unwrap();
        assert!(s.validate().unwrap_err().contains("not an event bus name"));
        s.bus = Template::parse("orders-{aggregatetype}").unwrap();
        assert_eq!(s.validate(), Ok(()));
        s.detail_type = Template::parse("").unwrap();
        assert_eq!(s.validate().unwrap_err(), "detail_type must not be empty");
        let mut s = settings(Format::CloudEvents);
        s.concurrency = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn trace_headers_are_converted_or_left_out() {
        assert_eq!(
            xray_trace_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").as_deref(),
            Some("Root=1-0af76519-16cd43dd8448eb211c80319c;Parent=b7ad6b7169203331;Sampled=0")
        );
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(xray_trace_header(bad), None, "{bad}");
        }
    }

    #[test]
    fn packing_stops_at_ten_entries() {
        let candidates = (0..25).map(|i| (i, 100, false));
        assert_eq!(
            pack(candidates, DEFAULT_MAX_REQUEST_BYTES),
            (0..10).collect::<Vec<_>>()
        );
    }

    #[test]
    fn packing_respects_the_byte_limit_exactly() {
        let max = DEFAULT_MAX_REQUEST_BYTES;
        // Exactly at the limit: both fit.
        assert_eq!(
            pack([(0, max - 1000, false), (1, 1000, false)].into_iter(), max),
            [0, 1]
        );
        // One byte over: the second waits for the next request, a smaller one still fits.
        assert_eq!(
            pack(
                [(0, max - 1000, false), (1, 1001, false), (2, 1000, false)].into_iter(),
                max
            ),
            [0, 2]
        );
        // A maximal entry goes alone.
        assert_eq!(pack([(0, max, false), (1, 1, false)].into_iter(), max), [0]);
    }

    #[test]
    fn isolated_entries_travel_alone() {
        let max = DEFAULT_MAX_REQUEST_BYTES;
        assert_eq!(pack([(0, 10, true), (1, 10, false)].into_iter(), max), [0]);
        assert_eq!(
            pack(
                [(0, 10, false), (1, 10, true), (2, 10, false)].into_iter(),
                max
            ),
            [0, 2]
        );
    }

    fn scheduler(keys: &[&str], size: usize) -> Scheduler {
        let entries = keys
            .iter()
            .map(|_| {
                let entry = Entry {
                    entry: PutEventsRequestEntry::builder().build(),
                    size,
                };
                (Some(entry), State::Pending)
            })
            .collect();
        Scheduler::new(entries, keys, DEFAULT_MAX_REQUEST_BYTES)
    }

    #[test]
    fn one_event_per_key_in_flight_and_keys_in_parallel() {
        let mut s = scheduler(&["a", "a", "b", "c", "b"], 100);
        let now = Instant::now();
        assert_eq!(s.next_request(now), [0, 2, 3]);
        assert!(
            s.next_request(now).is_empty(),
            "a and b already have an event in flight"
        );
        // b's first event fails for now: b's second must wait for it, even though a retry
        // is pending and the request with it would be quicker.
        s.finish(2, Outcome::Retry("ThrottlingException".into()), now);
        s.finish(0, Outcome::Acknowledged, now);
        s.finish(3, Outcome::Reject("MalformedDetail".into()), now);
        assert_eq!(
            s.next_request(now),
            [1],
            "event 2 backs off; event 4 waits behind it"
        );
        let later = s.next_ready().unwrap();
        assert!(later > now);
        assert_eq!(s.next_request(later), [2]);
        s.finish(2, Outcome::Acknowledged, later);
        s.finish(1, Outcome::Acknowledged, later);
        assert_eq!(s.next_request(later), [4]);
        s.finish(4, Outcome::Acknowledged, later);
        assert!(s.all_done());
    }

    #[test]
    fn requests_split_by_size_across_keys() {
        let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        // 100 KiB entries: two per request, never ten.
        let mut s = scheduler(&keys, 100 * 1024);
        let now = Instant::now();
        let mut requests = Vec::new();
        loop {
            let request = s.next_request(now);
            if request.is_empty() {
                break;
            }
            requests.push(request);
        }
        assert_eq!(requests.len(), 15);
        assert!(requests.iter().all(|r| r.len() == 2));
    }

    #[test]
    fn an_event_fails_a_bounded_number_of_times_per_send() {
        let mut s = scheduler(&["a"], 10);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for attempt in 1..=ATTEMPTS_PER_SEND {
            assert_eq!(s.next_request(now), [0]);
            let exhausted = s.finish(0, Outcome::Retry("ThrottlingException".into()), now);
            assert_eq!(exhausted, attempt == ATTEMPTS_PER_SEND);
            let ready = s.next_ready().unwrap();
            waits.push(ready - now);
            now = ready;
        }
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert!(waits.iter().all(|wait| *wait <= MAX_BACKOFF), "{waits:?}");
    }
}
