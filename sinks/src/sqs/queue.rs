//! SQS: `SendMessageBatch` to one queue, and what `outbox-relay check` asks the queue.

use super::api::Service;
use super::message::Message;
use super::{failed_entry, results, QueueSettings};
use crate::aws::{classify_request_error, UNREACHABLE_HINT};
use crate::batch::{EntryResult, RequestError};
use crate::error_chain;
use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

/// The error codes SQS answers for a queue that does not exist (JSON and query protocol).
const NO_QUEUE: [&str; 2] = [
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
];

/// Amazon SQS, as [`Service`].
pub(super) struct Sqs;

#[async_trait]
impl Service for Sqs {
    type Client = Client;
    const SERVICE: &'static str = "SQS";
    const OPERATION: &'static str = "SendMessageBatch";

    fn client(config: &SdkConfig) -> Client {
        Client::new(config)
    }

    async fn send(
        client: &Client,
        queue_url: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<EntryResult>, RequestError> {
        let count = messages.len();
        let entries = messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| {
                let (group, dedup) = message.fifo.unzip();
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(message.body)
                    .set_message_attributes(Some(
                        message
                            .attributes
                            .into_iter()
                            .map(|(name, value)| (name.to_owned(), attribute(value)))
                            .collect(),
                    ))
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup)
                    .build()
                    .expect("id and body are set")
            })
            .collect();
        let output = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|err| {
                let status = err.raw_response().map(|r| r.status().as_u16());
                classify_request_error(&err, status)
            })?;
        Ok(results(
            count,
            output.successful().iter().map(|s| s.id()),
            output.failed().iter().map(|f| {
                let result = failed_entry(Self::SERVICE, f.code(), f.message(), f.sender_fault());
                (f.id(), result)
            }),
        ))
    }

    fn fatal_hint(s: &QueueSettings, code: &str) -> String {
        let (name, url) = (&s.name, &s.destination);
        if NO_QUEUE.contains(&code) {
            format!(
                "queue {url} does not exist in this account and region: create it or fix \
                 sinks.{name}.queue_url / sinks.{name}.region"
            )
        } else {
            format!(
                "the credentials may not send to queue {url}: allow sqs:SendMessage on it for \
                 the relay's role (and kms:GenerateDataKey and kms:Decrypt on its key when the \
                 queue is encrypted with a customer managed key), or fix sinks.{name}.queue_url"
            )
        }
    }

    /// A queue that does not exist or cannot be read, or takes smaller messages than
    /// `max_request_bytes`. Needs `sqs:GetQueueAttributes` (for this check only).
    async fn check(client: &Client, s: &QueueSettings) -> Vec<String> {
        let (name, url) = (&s.name, &s.destination);
        let answer = client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .send()
            .await;
        match answer {
            Ok(attributes) => {
                let max = attributes
                    .attributes()
                    .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize))
                    .and_then(|v| v.parse::<usize>().ok());
                match max {
                    Some(max) if max < s.max_request_bytes => vec![format!(
                        "sink {name}: queue {url} takes messages up to {max} bytes, but \
                         sinks.{name}.max_request_bytes is {}: larger events would be refused \
                         one by one; set max_request_bytes = {max} (they are then \
                         dead-lettered before sending) or raise the queue's MaximumMessageSize",
                        s.max_request_bytes
                    )],
                    _ => Vec::new(),
                }
            }
            Err(err) if err.code().is_some_and(|c| NO_QUEUE.contains(&c)) => vec![format!(
                "sink {name}: queue {url} does not exist: create it (aws sqs create-queue \
                 --queue-name NAME{}) or fix sinks.{name}.queue_url / sinks.{name}.region",
                if s.fifo {
                    " --attributes FifoQueue=true"
                } else {
                    ""
                }
            )],
            Err(err) if err.code().is_some() => vec![format!(
                "sink {name}: cannot read queue {url}: {}: {}: check the relay's AWS \
                 credentials and that it may use the queue (sqs:SendMessage; \
                 sqs:GetQueueAttributes for this check)",
                err.code().unwrap_or_default(),
                err.message().unwrap_or("no message"),
            )],
            Err(err) => vec![format!(
                "sink {name}: cannot reach SQS: {}: {UNREACHABLE_HINT}",
                error_chain(&err)
            )],
        }
    }
}

fn attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("the data type is set")
}
