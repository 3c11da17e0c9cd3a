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
//! - **Acknowledgement.** As every AWS batch sink ([`crate::aws`]): `send` returns once every
//!   event is acknowledged or rejected. Delivery is at-least-once (EventBridge does not
//!   deduplicate): a response lost after the service accepted the entries means they are
//!   sent again.

mod config;
mod entry;
mod errors;

pub use config::EventBridgeConfig;
pub use entry::{entry_size, xray_trace_header};

use crate::aws::{
    classify_request_error, sdk_config_of, MAX_ENTRIES_PER_REQUEST, UNREACHABLE_HINT,
};
use crate::batch::{BatchApi, EntryResult, RequestError};
use crate::error_chain;
use crate::format::Format;
use crate::routing::Template;
use crate::{Event, SinkError};
use async_trait::async_trait;
use aws_sdk_eventbridge::error::ProvideErrorMetadata;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use aws_sdk_eventbridge::Client;
use errors::{fatal_hint, FATAL_CODES, REJECTED_CODES};
use std::time::Duration;
use tokio::sync::OnceCell;

/// EventBridge's limit on the total entry size of one `PutEvents` request (256 KiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 * 1024;

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

/// `PutEvents`, as the AWS batch sink drives it.
pub struct EventBridgeApi {
    settings: EventBridgeSettings,
    client: OnceCell<Client>,
}

impl EventBridgeApi {
    pub fn new(settings: EventBridgeSettings) -> Self {
        EventBridgeApi {
            settings,
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> Result<&Client, SinkError> {
        let s = &self.settings;
        self.client
            .get_or_try_init(|| async {
                let config = sdk_config_of(
                    &s.name,
                    s.region.as_deref(),
                    s.endpoint_url.as_deref(),
                    s.timeout,
                )
                .await?;
                Ok(Client::new(&config))
            })
            .await
    }

    /// Problems that would stop the sink, one line each with the fix: no region, no
    /// credentials, a bus that does not exist or cannot be seen. Only a bus without
    /// placeholders can be checked; the relay needs `events:DescribeEventBus` for this check
    /// only.
    pub async fn check(&self) -> Vec<String> {
        let name = &self.settings.name;
        let client = match self.client().await {
            Ok(client) => client,
            Err(err) => return vec![err.to_string()],
        };
        let Some(bus) = self.settings.bus.as_static() else {
            return Vec::new();
        };
        match client.describe_event_bus().name(bus).send().await {
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
}

#[async_trait]
impl BatchApi for EventBridgeApi {
    type Entry = PutEventsRequestEntry;
    const MAX_ENTRIES: usize = MAX_ENTRIES_PER_REQUEST;
    const SERVICE: &'static str = "EventBridge";
    const OPERATION: &'static str = "PutEvents";

    fn name(&self) -> &str {
        &self.settings.name
    }

    fn concurrency(&self) -> usize {
        self.settings.concurrency
    }

    fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.client().await.map(drop)
    }

    fn entry(&self, event: &Event) -> Result<(PutEventsRequestEntry, usize), String> {
        self.settings.entry(event)
    }

    async fn put(
        &self,
        entries: Vec<PutEventsRequestEntry>,
    ) -> Result<Vec<EntryResult>, RequestError> {
        let client = self.client.get().expect("ready() made the client");
        let result = client.put_events().set_entries(Some(entries)).send().await;
        let output = result.map_err(|err| {
            let status = err.raw_response().map(|r| r.status().as_u16());
            classify_request_error(&err, status)
        })?;
        Ok(output.entries().iter().map(entry_result).collect())
    }

    fn fatal_hint(&self, code: &str, entries: &[&PutEventsRequestEntry]) -> String {
        let mut buses: Vec<&str> = entries.iter().filter_map(|e| e.event_bus_name()).collect();
        buses.sort_unstable();
        buses.dedup();
        fatal_hint(&self.settings, code, &buses)
    }
}

/// What one entry of a `PutEvents` response means.
fn entry_result(result: &aws_sdk_eventbridge::types::PutEventsResultEntry) -> EntryResult {
    match result.error_code() {
        None if result.event_id().is_some() => EntryResult::Accepted,
        None => EntryResult::Retry("PutEvents returned neither an event id nor an error".into()),
        Some(code) => {
            let reason = format!("{code}: {}", result.error_message().unwrap_or_default());
            if FATAL_CODES.contains(&code) {
                EntryResult::Fatal(code.to_owned(), reason)
            } else if REJECTED_CODES.contains(&code) {
                EntryResult::Reject(format!("EventBridge rejected the entry: {reason}"))
            } else {
                // Retryable codes, and codes this version does not know: retrying keeps the
                // event; an unknown permanent code shows in the warnings.
                EntryResult::Retry(reason)
            }
        }
    }
}
