//! `type = "kafka"`: the serde configuration and how it becomes [`KafkaSettings`] (the topic
//! template parsed, the transactional id derived from the slot, `sasl.password` read from
//! its file).

use super::{KafkaSettings, KafkaSink};
use crate::format::Format;
use crate::kind::{default_true, template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Secret, Sink};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `type = "kafka"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. "kafka-1:9092,kafka-2:9092".
    pub brokers: String,
    /// Topic template.
    #[serde(default = "default_topic")]
    pub topic: String,
    #[serde(default)]
    pub format: Format,
    /// CloudEvents binary mode (attributes as `ce_` headers) instead of structured.
    #[serde(default)]
    pub binary: bool,
    /// One Kafka transaction per batch carrying the checkpoint; false: idempotent producer,
    /// at-least-once, for brokers without transactions.
    #[serde(default = "default_true")]
    pub exactly_once: bool,
    /// Default: `outbox-relay.<slot>.<sink>`; also the checkpoint's consumer group.
    pub transactional_id: Option<String>,
    #[serde(default = "default_checkpoint_topic")]
    pub checkpoint_topic: String,
    /// Create destination topics on first use.
    #[serde(default)]
    pub create_topics: bool,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Larger records are dead-lettered (the broker's limit; librdkafka's default).
    #[serde(default = "default_message_max_bytes")]
    pub message_max_bytes: usize,
    /// How long a delivery or transaction step may take before the batch is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// `sasl.password` read from this file at start (keeps it out of the TOML and env).
    pub sasl_password_file: Option<PathBuf>,
    /// Any librdkafka property: security.protocol, ssl.ca.location, sasl.mechanism, ...
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_topic() -> String {
    "outbox.event.{aggregatetype}".into()
}
fn default_checkpoint_topic() -> String {
    "outbox-relay.checkpoints".into()
}
fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    1
}
fn default_message_max_bytes() -> usize {
    1_000_000
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl KafkaConfig {
    /// The sink's settings: the topic template parsed, the identity derived from the slot,
    /// `sasl.password` read from its file.
    pub fn settings(&self, ctx: &SinkContext<'_>) -> Result<KafkaSettings, ConfigError> {
        let (name, slot) = (ctx.name, ctx.slot);
        let mut properties = self.properties.clone();
        if let Some(file) = &self.sasl_password_file {
            let key = format!("sinks.{name}.sasl_password_file");
            let password = Secret::from_file(file, &key)?;
            properties.insert("sasl.password".into(), password.expose().to_owned());
        }
        Ok(KafkaSettings {
            brokers: self.brokers.clone(),
            topic: template(ctx, "topic", &self.topic)?,
            format: self.format,
            binary: self.binary,
            exactly_once: self.exactly_once,
            transactional_id: self
                .transactional_id
                .clone()
                .unwrap_or_else(|| format!("outbox-relay.{slot}.{name}")),
            checkpoint_topic: self.checkpoint_topic.clone(),
            create_topics: self
                .create_topics
                .then_some((self.partitions, self.replication_factor)),
            message_max_bytes: self.message_max_bytes,
            timeout: self.timeout,
            properties,
        })
    }
}

#[async_trait]
impl SinkKind for KafkaConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(KafkaSink::new(self.settings(ctx)?)))
    }

    /// Only the topic: the SASL password file is read when the sink is built.
    fn validate(&self, ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
        template(ctx, "topic", &self.topic).map(drop)
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "kafka",
            address: self.topic.clone(),
            route: None,
            format: self.format,
            guarantee: if self.exactly_once {
                "per key (the record key is the event's key); exactly once for read_committed \
                 consumers"
            } else {
                "per key (the record key is the event's key); at-least-once"
            },
        }
    }

    fn takes_tombstones(&self) -> bool {
        true
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        let problems = KafkaSink::new(self.settings(ctx)?).check().await;
        let name = ctx.name;
        Ok(problems
            .into_iter()
            .map(|problem| format!("sink {name}: {problem}"))
            .collect())
    }
}
