//! `type = "sqs"` and `type = "sns"`: the serde configurations, how they become
//! [`QueueSettings`], and the settings that would make the service refuse every event.

use super::api::Api;
use super::message::Message;
use super::queue::Sqs;
use super::topic::Sns;
use super::{QueueSettings, SNS_MAX_REQUEST_BYTES, SQS_MAX_REQUEST_BYTES};
use crate::batch::BatchSink;
use crate::format::Format;
use crate::kind::{Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Event, Sink};
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;

/// `type = "sqs"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsConfig {
    /// The queue URL (no placeholders); a name ending in `.fifo` is a FIFO queue.
    pub queue_url: String,
    /// The message body: the CloudEvents envelope, or the payload for debezium/raw.
    #[serde(default)]
    pub format: Format,
    /// Default: the standard AWS chain (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// Default: AWS's endpoint for the region (or `AWS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// Most `SendMessageBatch` requests in flight at once (different keys).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most message bytes per request, as SQS counts them; a larger message is dead-lettered.
    #[serde(default = "default_sqs_max_request_bytes")]
    pub max_request_bytes: usize,
    /// How long one attempt may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

/// `type = "sns"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsConfig {
    /// The topic ARN (no placeholders); a name ending in `.fifo` is a FIFO topic.
    pub topic_arn: String,
    /// The message: the CloudEvents envelope, or the payload for debezium/raw.
    #[serde(default)]
    pub format: Format,
    /// Default: the standard AWS chain (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// Default: AWS's endpoint for the region (or `AWS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// Most `PublishBatch` requests in flight at once (different keys).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most message bytes per request, as SNS counts them; a larger message is dead-lettered.
    #[serde(default = "default_sns_max_request_bytes")]
    pub max_request_bytes: usize,
    /// How long one attempt may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_concurrency() -> usize {
    8
}
fn default_sqs_max_request_bytes() -> usize {
    SQS_MAX_REQUEST_BYTES
}
fn default_sns_max_request_bytes() -> usize {
    SNS_MAX_REQUEST_BYTES
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Why a bytes payload is refused with `debezium` or `raw`: a message body is text.
fn binary_payload_problem(format: Format, service: &str) -> Option<String> {
    let format = match format {
        Format::CloudEvents => return None,
        Format::Raw => "raw",
        Format::Debezium => "debezium",
    };
    Some(format!(
        "an {service} message body in format \"{format}\" is text: every event of the table \
         would be dead-lettered. Use format = \"cloudevents\" (the bytes go into data_base64), \
         or keep the table from the sink with match.tables"
    ))
}

impl QueueSettings {
    /// Mistakes that would make the service refuse every event.
    fn validate(&self, key: &str, service_max: usize) -> Result<(), String> {
        if self.destination.contains('{') {
            return Err(format!(
                "{key} {:?} has a placeholder: a batch request goes to one destination; \
                 configure one sink per destination and route with match",
                self.destination
            ));
        }
        if self.concurrency == 0 {
            return Err("concurrency must be at least 1".into());
        }
        if !(1..=service_max).contains(&self.max_request_bytes) {
            return Err(format!(
                "max_request_bytes must be between 1 and {service_max} (the service's limit)"
            ));
        }
        Ok(())
    }

    /// The message for `event` and its size, or why the service could never take it.
    pub(super) fn message(&self, event: &Event) -> Result<(Message, usize), String> {
        let message = Message::new(event, self.format, self.fifo)?;
        let size = message.size();
        if size > self.max_request_bytes {
            return Err(format!(
                "the event is {size} bytes as a message (body and attributes), over the limit \
                 of {} bytes: store large payloads elsewhere (e.g. S3) and publish a reference",
                self.max_request_bytes
            ));
        }
        Ok((message, size))
    }
}

impl SqsConfig {
    fn settings(&self, ctx: &SinkContext<'_>) -> Result<QueueSettings, ConfigError> {
        let url = url::Url::parse(&self.queue_url).map_err(|err| {
            ConfigError::invalid(
                ctx.name,
                format!(
                    "queue_url {:?} is not a URL ({err}): use the queue's URL, as aws sqs \
                     get-queue-url prints it",
                    self.queue_url
                ),
            )
        })?;
        let settings = QueueSettings {
            name: ctx.name.to_owned(),
            destination: self.queue_url.clone(),
            fifo: url.path().trim_end_matches('/').ends_with(".fifo"),
            format: self.format,
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            concurrency: self.concurrency,
            max_request_bytes: self.max_request_bytes,
            timeout: self.timeout,
        };
        settings
            .validate("queue_url", SQS_MAX_REQUEST_BYTES)
            .map_err(|err| ConfigError::invalid(ctx.name, err))?;
        Ok(settings)
    }
}

impl SnsConfig {
    fn settings(&self, ctx: &SinkContext<'_>) -> Result<QueueSettings, ConfigError> {
        let parts: Vec<&str> = self.topic_arn.split(':').collect();
        if parts.len() != 6 || parts[0] != "arn" || parts[2] != "sns" || parts[5].is_empty() {
            return Err(ConfigError::invalid(
                ctx.name,
                format!(
                    "topic_arn {:?} is not an SNS topic ARN \
                     (arn:aws:sns:REGION:ACCOUNT:NAME): use the ARN aws sns create-topic prints",
                    self.topic_arn
                ),
            ));
        }
        let settings = QueueSettings {
            name: ctx.name.to_owned(),
            destination: self.topic_arn.clone(),
            fifo: parts[5].ends_with(".fifo"),
            format: self.format,
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            concurrency: self.concurrency,
            max_request_bytes: self.max_request_bytes,
            timeout: self.timeout,
        };
        settings
            .validate("topic_arn", SNS_MAX_REQUEST_BYTES)
            .map_err(|err| ConfigError::invalid(ctx.name, err))?;
        Ok(settings)
    }
}

#[async_trait]
impl SinkKind for SqsConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(BatchSink::new(Api::<Sqs>::new(
            self.settings(ctx)?,
        ))))
    }

    fn validate(&self, ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
        self.settings(ctx).map(drop)
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "sqs",
            address: self.queue_url.clone(),
            route: None,
            format: self.format,
            guarantee: if self.queue_url.ends_with(".fifo") {
                "per key (the group id is the event's key); exactly once within the 5-minute \
                 deduplication interval"
            } else {
                "at-least-once, the event id in the id attribute"
            },
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(Api::<Sqs>::new(self.settings(ctx)?).check().await)
    }

    fn binary_payload_problem(&self) -> Option<String> {
        binary_payload_problem(self.format, "SQS")
    }
}

#[async_trait]
impl SinkKind for SnsConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(BatchSink::new(Api::<Sns>::new(
            self.settings(ctx)?,
        ))))
    }

    fn validate(&self, ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
        self.settings(ctx).map(drop)
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "sns",
            address: self.topic_arn.clone(),
            route: None,
            format: self.format,
            guarantee: if self.topic_arn.ends_with(".fifo") {
                "per key (the group id is the event's key); exactly once within the 5-minute \
                 deduplication interval"
            } else {
                "at-least-once, the event id in the id attribute"
            },
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(Api::<Sns>::new(self.settings(ctx)?).check().await)
    }

    fn binary_payload_problem(&self) -> Option<String> {
        binary_payload_problem(self.format, "SNS")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> SinkContext<'static> {
        SinkContext {
            name: "q",
            slot: "s",
        }
    }

    fn sqs(json: &str) -> Result<QueueSettings, String> {
        let config: SqsConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        config.settings(&ctx()).map_err(|e| e.to_string())
    }

    fn sns(json: &str) -> Result<QueueSettings, String> {
        let config: SnsConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        config.settings(&ctx()).map_err(|e| e.to_string())
    }

    #[test]
    fn fifo_comes_from_the_queue_or_topic_name() {
        let s =
            sqs(r#"{"queue_url": "https://sqs.eu-west-1.amazonaws.com/1/orders.fifo"}"#).unwrap();
        assert!(s.fifo);
        assert_eq!(s.max_request_bytes, SQS_MAX_REQUEST_BYTES);
        let s = sqs(r#"{"queue_url": "http://127.0.0.1:5000/123456789012/orders"}"#).unwrap();
        assert!(!s.fifo);
        let s = sns(r#"{"topic_arn": "arn:aws:sns:eu-west-1:123456789012:orders.fifo"}"#).unwrap();
        assert!(s.fifo);
        assert_eq!(s.max_request_bytes, SNS_MAX_REQUEST_BYTES);
    }

    #[test]
    fn settings_that_would_refuse_every_event_are_configuration_errors() {
        let err = sqs(r#"{"queue_url": "orders"}"#).unwrap_err();
        assert!(
            err.contains("sinks.q: queue_url \"orders\" is not a URL"),
            "{err}"
        );
        let err = sqs(r#"{"queue_url": "http://h/1/{aggregatetype}"}"#).unwrap_err();
        assert!(err.contains("placeholder"), "{err}");
        let err =
            sqs(r#"{"queue_url": "http://h/1/q", "max_request_bytes": 2000000}"#).unwrap_err();
        assert!(err.contains("between 1 and 1048576"), "{err}");
        let err = sns(r#"{"topic_arn": "orders"}"#).unwrap_err();
        assert!(err.contains("not an SNS topic ARN"), "{err}");
        let err = sns(r#"{"topic_arn": "arn:aws:sns:r:1:t", "concurrency": 0}"#).unwrap_err();
        assert!(err.contains("concurrency"), "{err}");
        let err = sns(r#"{"topic_arn": "arn:aws:sns:r:1:t", "queue_url": "x"}"#).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }
}
