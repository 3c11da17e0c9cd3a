//! Amazon SQS queues (`type = "sqs"`, `SendMessageBatch`) and Amazon SNS topics
//! (`type = "sns"`, `PublishBatch`): both take the same message ([`message`]), answer per
//! entry with the same shape, and run on the AWS batch sink ([`crate::aws`]).
//!
//! - **Destination.** One queue URL or topic ARN per sink, without placeholders: a batch
//!   request goes to one queue or topic. Route to several with several sinks and `match`.
//! - **FIFO** (a name ending in `.fifo`): `MessageGroupId` = the event's key, so per-key
//!   order is the queue's group order; `MessageDeduplicationId` = the event id, so a
//!   resend after a crash within the service's 5-minute deduplication interval is dropped:
//!   exactly-once into the queue within that interval, at-least-once past it.
//! - **Standard** queues and topics: at-least-once, the event id in the `id` attribute for
//!   consumers to deduplicate on; SQS does not keep order on a standard queue.
//! - **Per-key order** as every AWS batch sink: one event per key in flight, the next only
//!   once it is acknowledged or rejected.
//! - **Limits.** 10 messages and `max_request_bytes` per request (SQS 1 MiB, SNS 256 KiB,
//!   counted as the services count: body plus attribute names, types and values); a larger
//!   message is dead-lettered before sending.
//! - **Errors.** An entry refused with `SenderFault` (invalid content) is dead-lettered with
//!   the service's code; throttling and internal failures are retried; a missing queue or
//!   topic, or missing permissions (including the KMS key of an encrypted queue), stop the
//!   relay with the fix.

mod api;
mod config;
mod message;
mod queue;
mod topic;

pub use config::{SnsConfig, SqsConfig};

use crate::batch::EntryResult;
use crate::format::Format;
use std::time::Duration;

/// SQS's limit on a message and on a `SendMessageBatch` request (1 MiB).
pub const SQS_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// SNS's limit on a message and on a `PublishBatch` request (256 KiB).
pub const SNS_MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Everything an SQS or SNS sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// The sink's name in the configuration, for messages.
    pub name: String,
    /// The queue URL or the topic ARN.
    pub destination: String,
    /// Whether the destination is FIFO (its name ends in `.fifo`).
    pub fifo: bool,
    pub format: Format,
    /// Default: the standard chain (`AWS_REGION`, profile, IMDS).
    pub region: Option<String>,
    /// Default: AWS's endpoint for the region, or `AWS_ENDPOINT_URL`.
    pub endpoint_url: Option<String>,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Most message bytes per request; a larger message is rejected.
    pub max_request_bytes: usize,
    /// How long one attempt may take before it is retried.
    pub timeout: Duration,
}

/// Entry error codes about the destination or the permissions: the relay stops.
const FATAL_ENTRY_CODES: [&str; 14] = [
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "NotFound",
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "KMSAccessDenied",
    "KMSDisabled",
    "KMSNotFound",
    "KMSInvalidState",
    "KmsAccessDenied",
    "KmsDisabled",
    "KmsNotFound",
    "KmsInvalidState",
];
/// Entry error codes that pass with time.
const RETRYABLE_ENTRY_CODES: [&str; 6] = [
    "Throttled",
    "ThrottlingException",
    "RequestThrottled",
    "KmsThrottled",
    "KMSThrottling",
    "InternalError",
];

/// What a failed entry of an SQS or SNS batch response means: its code decides first; then
/// a sender fault rejects the event and a service fault retries it.
fn failed_entry(
    service: &str,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> EntryResult {
    let reason = format!("{code}: {}", message.unwrap_or("no message"));
    if FATAL_ENTRY_CODES.contains(&code) {
        EntryResult::Fatal(code.to_owned(), reason)
    } else if RETRYABLE_ENTRY_CODES.contains(&code) || !sender_fault {
        EntryResult::Retry(reason)
    } else {
        EntryResult::Reject(format!("{service} refused the message: {reason}"))
    }
}

/// One result per entry of a request of `count` entries whose ids are their indexes, from
/// the ids that succeeded and the failed entries; an entry the response does not mention is
/// retried.
fn results<'a>(
    count: usize,
    successful: impl Iterator<Item = &'a str>,
    failed: impl Iterator<Item = (&'a str, EntryResult)>,
) -> Vec<EntryResult> {
    let mut results: Vec<Option<EntryResult>> = (0..count).map(|_| None).collect();
    let slot = |id: &str| id.parse::<usize>().ok().filter(|&i| i < count);
    for id in successful {
        if let Some(i) = slot(id) {
            results[i] = Some(EntryResult::Accepted);
        }
    }
    for (id, result) in failed {
        if let Some(i) = slot(id) {
            results[i] = Some(result);
        }
    }
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| EntryResult::Retry("the response did not mention the entry".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_entries_are_sorted_by_code_then_by_fault() {
        assert!(matches!(
            failed_entry("SQS", "InvalidParameterValue", None, true),
            EntryResult::Reject(_)
        ));
        assert!(matches!(
            failed_entry("SQS", "InternalError", None, false),
            EntryResult::Retry(_)
        ));
        assert!(matches!(
            failed_entry("SQS", "SomethingNew", None, false),
            EntryResult::Retry(_)
        ));
        assert!(matches!(
            failed_entry("SQS", "Throttled", None, true),
            EntryResult::Retry(_)
        ));
        assert!(matches!(
            failed_entry("SQS", "KMSAccessDenied", Some("no"), true),
            EntryResult::Fatal(..)
        ));
    }

    #[test]
    fn an_entry_the_response_leaves_out_is_retried() {
        let failed = [("2", EntryResult::Reject("bad".into()))];
        let results = results(4, ["0", "1", "9"].into_iter(), failed.into_iter());
        assert!(matches!(results[0], EntryResult::Accepted));
        assert!(matches!(results[1], EntryResult::Accepted));
        assert!(matches!(results[2], EntryResult::Reject(_)));
        assert!(matches!(results[3], EntryResult::Retry(_)));
    }
}
