//! The one place that knows every kind of sink: [`SinkConfig`], the `[sinks.NAME]` table of
//! the configuration, tagged by `type`. Each kind's serde struct lives in the sink's own
//! module and implements [`SinkKind`]; the enum only names the kinds and hands every question
//! (build, validate, filter, tombstones, check) to the one it holds. The relay asks the enum,
//! never a kind.
//! What each kind answers is its [`SinkKind`] implementation ([`crate::kind`]).

use crate::eventbridge::EventBridgeConfig;
use crate::file::FileConfig;
use crate::kafka::KafkaConfig;
use crate::kind::{ConfigError, SinkContext, SinkKind};
use crate::nats::NatsConfig;
use crate::null::NullConfig;
use crate::rabbitmq::RabbitMqConfig;
use crate::redis::RedisConfig;
use crate::routing::{FilteredSink, MatchRule};
use crate::sqs::{SnsConfig, SqsConfig};
use crate::stdout::StdoutConfig;
use crate::upcast_rule::UpcastRule;
use crate::webhook::WebhookConfig;
use crate::Sink;
use serde::Deserialize;
use std::collections::BTreeMap;

/// `[sinks.NAME]`: one variant per kind of sink, named by `type`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// One event per line on standard output.
    Stdout(StdoutConfig),
    /// Acknowledges everything, publishes nothing (benchmarks, draining a slot).
    Null(NullConfig),
    /// One event per line appended to `path`.
    File(FileConfig),
    /// Apache Kafka (and Kafka-protocol brokers).
    Kafka(KafkaConfig),
    /// Amazon EventBridge `PutEvents`.
    EventBridge(EventBridgeConfig),
    /// RabbitMQ: an exchange (AMQP 0-9-1) or a stream.
    RabbitMq(RabbitMqConfig),
    /// Redis Streams (`XADD`).
    Redis(RedisConfig),
    /// NATS JetStream.
    Nats(NatsConfig),
    /// Amazon SQS `SendMessageBatch` (standard and FIFO queues).
    Sqs(SqsConfig),
    /// Amazon SNS `PublishBatch` (standard and FIFO topics).
    Sns(SnsConfig),
    /// HTTP webhooks: one `POST` per event.
    Webhook(WebhookConfig),
}

impl SinkConfig {
    /// The kind this configuration holds: the one match over every kind of sink.
    fn kind(&self) -> &dyn SinkKind {
        match self {
            SinkConfig::Stdout(config) => config,
            SinkConfig::Null(config) => config,
            SinkConfig::File(config) => config,
            SinkConfig::Kafka(config) => config,
            SinkConfig::EventBridge(config) => config,
            SinkConfig::RabbitMq(config) => config,
            SinkConfig::Redis(config) => config,
            SinkConfig::Nats(config) => config,
            SinkConfig::Sqs(config) => config,
            SinkConfig::Sns(config) => config,
            SinkConfig::Webhook(config) => config,
        }
    }

    /// The sink, seeing only the events its match rule takes.
    pub fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        build_filtered(self.kind(), ctx)
    }

    /// Mistakes found without connecting.
    pub fn validate(&self, ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
        self.kind().validate(ctx)
    }

    /// Which events this sink takes.
    pub fn filter(&self) -> &MatchRule {
        self.kind().filter()
    }

    /// Which version this sink publishes each event at.
    pub fn upcast(&self) -> &UpcastRule {
        self.kind().upcast()
    }

    /// Whether this sink can carry a tombstone (only Kafka has records with a null value).
    pub fn takes_tombstones(&self) -> bool {
        self.kind().takes_tombstones()
    }

    /// Why this sink would refuse every event with a bytes payload ([`SinkKind`]).
    pub fn binary_payload_problem(&self) -> Option<String> {
        self.kind().binary_payload_problem()
    }

    /// Why this sink cannot publish one shard of a key-sharded outbox ([`SinkKind`]).
    pub fn shard_problem(&self) -> Option<String> {
        self.kind().shard_problem()
    }

    /// Where this sink puts events, for the event catalog.
    pub fn channel(&self) -> crate::kind::Channel {
        self.kind().channel()
    }

    /// Problems `outbox-relay check` reports for this sink, one line each.
    pub async fn check(&self, ctx: &SinkContext<'_>) -> Vec<String> {
        self.kind()
            .check(ctx)
            .await
            .unwrap_or_else(|err| vec![with_causes(&err)])
    }
}

/// The sink `kind` configures, behind the filter of its match rule (and of events meant for
/// one sink only).
fn build_filtered(
    kind: &dyn SinkKind,
    ctx: &SinkContext<'_>,
) -> Result<Box<dyn Sink>, ConfigError> {
    Ok(FilteredSink::wrap(
        kind.filter().event_filter().for_sink(ctx.name),
        kind.build(ctx)?,
    ))
}

/// A built sink and its name.
pub type NamedSink = (String, Box<dyn Sink>);

/// Every configured sink, built, in the order of their names.
pub fn build_all(
    sinks: &BTreeMap<String, SinkConfig>,
    slot: &str,
) -> Result<Vec<NamedSink>, ConfigError> {
    sinks
        .iter()
        .map(|(name, sink)| Ok((name.clone(), sink.build(&SinkContext { name, slot })?)))
        .collect()
}

/// `err` with its causes, `: `-separated.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    //! What adding a sink takes, shown on a toy: a configuration that is a [`SinkKind`] and a
    //! [`Sink`]. Registering it is then one variant of [`SinkConfig`] and its arm in
    //! `SinkConfig::kind`.

    use super::*;
    use crate::format::tests::sample;
    use crate::{Event, EventState, SinkError, Text};
    use async_trait::async_trait;
    use std::sync::{Arc, Mutex};

    /// `type = "tally"`: counts the events it takes; refuses a configuration without room.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TallyConfig {
        capacity: usize,
        #[serde(default, rename = "match")]
        filter: MatchRule,
        #[serde(default)]
        upcast: UpcastRule,
        #[serde(skip)]
        seen: Arc<Mutex<usize>>,
    }

    struct TallySink(Arc<Mutex<usize>>);

    #[async_trait]
    impl Sink for TallySink {
        async fn send(
            &mut self,
            batch: &[Event],
            _states: &mut [EventState],
        ) -> Result<(), SinkError> {
            *self.0.lock().unwrap() += batch.len();
            Ok(())
        }
    }

    impl SinkKind for TallyConfig {
        fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
            self.validate(ctx)?;
            Ok(Box::new(TallySink(self.seen.clone())))
        }

        fn validate(&self, ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
            match self.capacity {
                0 => Err(ConfigError::invalid(
                    ctx.name,
                    "capacity must be at least 1",
                )),
                _ => Ok(()),
            }
        }

        fn filter(&self) -> &MatchRule {
            &self.filter
        }

        fn upcast(&self) -> &UpcastRule {
            &self.upcast
        }

        fn channel(&self) -> crate::kind::Channel {
            crate::kind::Channel {
                protocol: "tally",
                address: String::new(),
                route: None,
                format: crate::format::Format::CloudEvents,
                guarantee: "counts events",
            }
        }
    }

    #[tokio::test]
    async fn a_toy_sink_is_a_sink_kind_and_a_sink() {
        let ctx = SinkContext {
            name: "tally",
            slot: "outbox_relay",
        };
        let config: TallyConfig =
            serde_json::from_str(r#"{"capacity": 10, "match": {"aggregate_types": ["order"]}}"#)
                .unwrap();
        let mut sink = build_filtered(&config, &ctx).unwrap();
        let mut batch = vec![sample(1, 0), sample(1, 1)];
        batch[1].aggregate_type = Text::from("customer");
        let mut states = vec![EventState::Pending; batch.len()];
        sink.send(&batch, &mut states).await.unwrap();
        assert_eq!(*config.seen.lock().unwrap(), 1, "the match rule applies");
        let empty: TallyConfig = serde_json::from_str(r#"{"capacity": 0}"#).unwrap();
        let err = build_filtered(&empty, &ctx).err().unwrap().to_string();
        assert_eq!(err, "sinks.tally: capacity must be at least 1");
    }

    #[test]
    fn sinks_are_told_apart_by_type_and_refuse_unknown_keys() {
        let sink = |json: &str| serde_json::from_str::<SinkConfig>(json).map_err(|e| e.to_string());
        assert!(matches!(
            sink(r#"{"type": "null"}"#),
            Ok(SinkConfig::Null(_))
        ));
        assert!(sink(r#"{"type": "null", "colour": "red"}"#)
            .unwrap_err()
            .contains("colour"));
        let kafka = sink(r#"{"type": "kafka", "brokers": "b:9092"}"#).unwrap();
        assert!(
            kafka.takes_tombstones() && !sink(r#"{"type": "stdout"}"#).unwrap().takes_tombstones()
        );
        let ctx = SinkContext {
            name: "k",
            slot: "s",
        };
        let bad = sink(r#"{"type": "kafka", "brokers": "b", "topic": "t.{nope}"}"#).unwrap();
        let err = bad.validate(&ctx).unwrap_err();
        assert_eq!(err.to_string(), "sinks.k.topic");
        assert!(
            with_causes(&err).contains("unknown field {nope}"),
            "{}",
            with_causes(&err)
        );
    }
}
