//! The HTTP webhook sink: every event becomes one `POST` to a URL from a template, in the
//! CloudEvents HTTP binding (structured or binary mode), with `Idempotency-Key` = the event
//! id and, with a secret, the Standard Webhooks signature.
//!
//! - **Per-key order.** At most one request per key in flight; the next event of a key is
//!   sent only once the previous one is accepted or dead-lettered. Different keys go in
//!   parallel, up to `concurrency` requests (the batch sink, [`crate::batch`]).
//! - **Answers.** 2xx: delivered. 408, 425, 429 and 5xx, and a connection refused, reset
//!   or timed out: retried with backoff, never sooner than the answer's `Retry-After` (up
//!   to five minutes). Any other status (3xx: redirects are not followed; 4xx): the event
//!   is dead-lettered with the status, the stream goes on.
//! - **Acknowledgement.** An event counts as delivered once its request answered 2xx.
//!   At-least-once: a request whose answer was lost (timeout, dropped connection) is sent
//!   again, with the same `Idempotency-Key` and `webhook-id` for the receiver to dedup on.

mod client;
mod config;
pub mod request;

pub use config::WebhookConfig;

use crate::batch::{BatchApi, EntryResult, RequestError};
use crate::routing::Template;
use crate::{Event, SinkError};
use async_trait::async_trait;
use client::HttpClient;
use hyper::header::{HeaderName, HeaderValue};
use request::{Mode, Request};
use ring::hmac;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Everything the sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The sink's name in the configuration, for messages.
    pub name: String,
    pub url: Template,
    pub mode: Mode,
    /// Sent with every request (`headers`, and `Authorization` from its file).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The Standard Webhooks signing key, when a secret is configured.
    pub signing_key: Option<hmac::Key>,
    /// Trusted roots for `https`; the platform's when `None`.
    pub ca_file: Option<PathBuf>,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// One request, from connecting to the answer.
    pub timeout: Duration,
}

/// The webhook endpoint, as the batch sink drives it: one event per request.
pub struct WebhookApi {
    settings: WebhookSettings,
    client: HttpClient,
}

impl WebhookApi {
    pub fn new(settings: WebhookSettings) -> Result<Self, String> {
        let client = client::client(settings.ca_file.as_deref(), settings.timeout)?;
        Ok(WebhookApi { settings, client })
    }

    /// What the answer to one request means for its event.
    fn result(&self, shown_url: &str, answer: Result<client::Answer, String>) -> EntryResult {
        let answer = match answer {
            Ok(answer) => answer,
            Err(reason) => return EntryResult::Retry(reason),
        };
        let status = answer.status;
        if status.is_success() {
            return EntryResult::Accepted;
        }
        let reason = format!("POST {shown_url} answered HTTP {status}");
        let code = status.as_u16();
        if matches!(code, 408 | 425 | 429) || status.is_server_error() {
            let after = answer
                .headers
                .get(hyper::header::RETRY_AFTER)
                .and_then(|value| request::retry_after(value, SystemTime::now()));
            return match after {
                Some(after) => EntryResult::RetryAfter(reason, after),
                None => EntryResult::Retry(reason),
            };
        }
        let fix = if status.is_redirection() {
            "redirects are not followed: set the sink's url to where it points"
        } else {
            "the receiver refused the event: fix it or the receiver, then replay it with \
             outbox-relay dlq replay"
        };
        EntryResult::Reject(format!("{reason}: {fix}"))
    }
}

#[async_trait]
impl BatchApi for WebhookApi {
    type Entry = Request;
    const MAX_ENTRIES: usize = 1;
    const SERVICE: &'static str = "the webhook endpoint";
    const OPERATION: &'static str = "POST";

    fn name(&self) -> &str {
        &self.settings.name
    }

    fn concurrency(&self) -> usize {
        self.settings.concurrency
    }

    fn max_request_bytes(&self) -> usize {
        usize::MAX
    }

    async fn ready(&self) -> Result<(), SinkError> {
        Ok(())
    }

    fn entry(&self, event: &Event) -> Result<(Request, usize), String> {
        let request = request::build(event, &self.settings.url, self.settings.mode)?;
        let size = request.body.len();
        Ok((request, size))
    }

    async fn put(&self, requests: Vec<Request>) -> Result<Vec<EntryResult>, RequestError> {
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let signature = self.settings.signing_key.as_ref().map(|key| {
                request::signature_headers(key, &request.id, &request.body, SystemTime::now())
            });
            let extra = self
                .settings
                .headers
                .iter()
                .cloned()
                .chain(signature.into_iter().flatten());
            let shown = request.shown_url.clone();
            let answer = client::post(&self.client, request, extra, self.settings.timeout).await;
            results.push(self.result(&shown, answer));
        }
        Ok(results)
    }

    fn fatal_hint(&self, _code: &str, _entries: &[&Request]) -> String {
        format!("check sinks.{}.url", self.settings.name)
    }
}
