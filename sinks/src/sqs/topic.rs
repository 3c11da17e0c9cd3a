//! SNS: `PublishBatch` to one topic, and what `outbox-relay check` asks the topic.

use super::api::Service;
use super::message::Message;
use super::{failed_entry, results, QueueSettings};
use crate::aws::{classify_request_error, UNREACHABLE_HINT};
use crate::batch::{EntryResult, RequestError};
use crate::error_chain;
use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_sns::error::ProvideErrorMetadata;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use aws_sdk_sns::Client;

/// Amazon SNS, as [`Service`].
pub(super) struct Sns;

#[async_trait]
impl Service for Sns {
    type Client = Client;
    const SERVICE: &'static str = "SNS";
    const OPERATION: &'static str = "PublishBatch";

    fn client(config: &SdkConfig) -> Client {
        Client::new(config)
    }

    async fn send(
        client: &Client,
        topic_arn: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<EntryResult>, RequestError> {
        let count = messages.len();
        let entries = messages
            .into_iter()
            .enumerate()
            .map(|(i, message)| {
                let (group, dedup) = message.fifo.unzip();
                PublishBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message(message.body)
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
                    .expect("id and message are set")
            })
            .collect();
        let output = client
            .publish_batch()
            .topic_arn(topic_arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
            .map_err(|err| {
                let status = err.raw_response().map(|r| r.status().as_u16());
                classify_request_error(&err, status)
            })?;
        Ok(results(
            count,
            output.successful().iter().filter_map(|s| s.id()),
            output.failed().iter().map(|f| {
                let result = failed_entry(Self::SERVICE, f.code(), f.message(), f.sender_fault());
                (f.id(), result)
            }),
        ))
    }

    fn fatal_hint(s: &QueueSettings, code: &str) -> String {
        let (name, arn) = (&s.name, &s.destination);
        if code == "NotFound" {
            format!(
                "topic {arn} does not exist in this account and region: create it or fix \
                 sinks.{name}.topic_arn / sinks.{name}.region"
            )
        } else {
            format!(
                "the credentials may not publish to topic {arn}: allow sns:Publish on it for \
                 the relay's role (and kms:GenerateDataKey and kms:Decrypt on its key when the \
                 topic is encrypted), or fix sinks.{name}.topic_arn"
            )
        }
    }

    /// A topic that does not exist or cannot be read. Needs `sns:GetTopicAttributes` (for
    /// this check only).
    async fn check(client: &Client, s: &QueueSettings) -> Vec<String> {
        let (name, arn) = (&s.name, &s.destination);
        match client.get_topic_attributes().topic_arn(arn).send().await {
            Ok(_) => Vec::new(),
            Err(err) if err.code() == Some("NotFound") => vec![format!(
                "sink {name}: topic {arn} does not exist: create it (aws sns create-topic \
                 --name NAME{}) or fix sinks.{name}.topic_arn / sinks.{name}.region",
                if s.fifo {
                    " --attributes FifoTopic=true"
                } else {
                    ""
                }
            )],
            Err(err) if err.code().is_some() => vec![format!(
                "sink {name}: cannot read topic {arn}: {}: {}: check the relay's AWS \
                 credentials and that it may use the topic (sns:Publish; \
                 sns:GetTopicAttributes for this check)",
                err.code().unwrap_or_default(),
                err.message().unwrap_or("no message"),
            )],
            Err(err) => vec![format!(
                "sink {name}: cannot reach SNS: {}: {UNREACHABLE_HINT}",
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
