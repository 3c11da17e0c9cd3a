//! `type = "rabbitmq"`: the serde configuration of both modes and how it becomes
//! [`RabbitMqSettings`] (templates parsed, the password file read, every key checked against
//! the mode).

use super::exchange::{ExchangeSettings, DEFAULT_CHANNELS, DEFAULT_MAX_MESSAGE_BYTES};
use super::stream::StreamSettings;
use super::{Policy, RabbitMqSettings};
use crate::format::Format;
use crate::kind::{template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Secret, Sink};
use async_trait::async_trait;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `type = "rabbitmq"`: exchange mode (AMQP 0-9-1, at-least-once) or stream mode (RabbitMQ
/// Streams, exactly-once through the broker's deduplication).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqConfig {
    #[serde(default)]
    pub mode: RabbitMqMode,
    /// `amqp://host:5672/vhost` / `amqps://` (exchange mode), `rabbitmq-stream://host:5552/vhost`
    /// / `rabbitmq-stream+tls://` (stream mode).
    pub url: String,
    /// Override the URL's credentials; `password_file` wins over `password`.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust for TLS.
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub format: Format,
    /// CloudEvents binary mode (attributes as `cloudEvents_` headers) instead of structured.
    #[serde(default)]
    pub binary: bool,
    /// Most unconfirmed messages at once.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Connecting, each request, and waiting for a confirm.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Exchange mode: declare the exchange (stream mode: create the stream) on connect.
    #[serde(default)]
    pub declare: bool,
    /// Exchange mode.
    pub exchange: Option<String>,
    pub exchange_type: Option<String>,
    pub routing_key: Option<String>,
    pub queue: Option<String>,
    pub binding_key: Option<String>,
    pub mandatory: Option<bool>,
    /// Channels the events are spread over by key (each key always on the same one).
    pub channels: Option<usize>,
    pub on_nack: Option<Policy>,
    pub on_unroutable: Option<Policy>,
    pub max_message_bytes: Option<usize>,
    /// Stream mode.
    pub stream: Option<String>,
    /// Default: `outbox-relay.<slot>.<sink>`.
    pub producer_name: Option<String>,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RabbitMqMode {
    #[default]
    Exchange,
    Stream,
}

fn default_window() -> usize {
    1024
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl RabbitMqConfig {
    /// The sink's settings: templates parsed, the password file read, keys checked against
    /// the mode.
    pub fn settings(&self, ctx: &SinkContext<'_>) -> Result<RabbitMqSettings, ConfigError> {
        let (name, slot) = (ctx.name, ctx.slot);
        let password = match &self.password_file {
            Some(file) => Some(Secret::from_file(
                file,
                &format!("sinks.{name}.password_file"),
            )?),
            None => self.password.clone(),
        };
        let misplaced = |keys: &[(&str, bool)], mode: &str| -> Result<(), ConfigError> {
            match keys.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(ConfigError::Invalid(format!(
                    "sinks.{name}.{key} is only for mode = \"{mode}\""
                ))),
                None => Ok(()),
            }
        };
        let settings = match self.mode {
            RabbitMqMode::Exchange => {
                misplaced(
                    &[
                        ("stream", self.stream.is_some()),
                        ("producer_name", self.producer_name.is_some()),
                    ],
                    "stream",
                )?;
                let exchange = self.exchange.clone().ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "sinks.{name}.exchange is required in exchange mode (\"\" is the default \
                         exchange)"
                    ))
                })?;
                let routing_key = self
                    .routing_key
                    .as_deref()
                    .unwrap_or("{aggregatetype}.{type}");
                RabbitMqSettings::Exchange(ExchangeSettings {
                    name: name.to_owned(),
                    url: self.url.clone(),
                    username: self.username.clone(),
                    password,
                    ca_file: self.ca_file.clone(),
                    exchange,
                    exchange_type: self.exchange_type.clone().unwrap_or_else(|| "topic".into()),
                    declare: self.declare,
                    queue: self.queue.clone(),
                    binding_key: self.binding_key.clone().unwrap_or_else(|| "#".into()),
                    routing_key: template(ctx, "routing_key", routing_key)?,
                    format: self.format,
                    binary: self.binary,
                    mandatory: self.mandatory.unwrap_or(true),
                    on_nack: self.on_nack.unwrap_or(Policy::Retry),
                    on_unroutable: self.on_unroutable.unwrap_or(Policy::DeadLetter),
                    window: self.window,
                    channels: self.channels.unwrap_or(DEFAULT_CHANNELS),
                    max_message_bytes: self.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
                    timeout: self.timeout,
                })
            }
            RabbitMqMode::Stream => {
                misplaced(
                    &[
                        ("exchange", self.exchange.is_some()),
                        ("exchange_type", self.exchange_type.is_some()),
                        ("routing_key", self.routing_key.is_some()),
                        ("queue", self.queue.is_some()),
                        ("binding_key", self.binding_key.is_some()),
                        ("mandatory", self.mandatory.is_some()),
                        ("channels", self.channels.is_some()),
                        ("on_nack", self.on_nack.is_some()),
                        ("on_unroutable", self.on_unroutable.is_some()),
                        ("max_message_bytes", self.max_message_bytes.is_some()),
                    ],
                    "exchange",
                )?;
                RabbitMqSettings::Stream(StreamSettings {
                    name: name.to_owned(),
                    url: self.url.clone(),
                    username: self.username.clone(),
                    password,
                    ca_file: self.ca_file.clone(),
                    stream: self.stream.clone().ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "sinks.{name}.stream is required in stream mode"
                        ))
                    })?,
                    producer_name: self
                        .producer_name
                        .clone()
                        .unwrap_or_else(|| format!("outbox-relay.{slot}.{name}")),
                    declare: self.declare,
                    format: self.format,
                    binary: self.binary,
                    window: self.window,
                    timeout: self.timeout,
                })
            }
        };
        let valid = match &settings {
            RabbitMqSettings::Exchange(exchange) => exchange.validate(),
            RabbitMqSettings::Stream(stream) => stream.validate(),
        };
        valid.map_err(|err| ConfigError::invalid(name, err))?;
        Ok(settings)
    }
}

#[async_trait]
impl SinkKind for RabbitMqConfig {
    /// Nothing connects before the first `recover` or `send`.
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(super::sink(self.settings(ctx)?))
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
        match self.mode {
            RabbitMqMode::Exchange => Channel {
                protocol: "amqp",
                address: self.exchange.clone().unwrap_or_default(),
                route: Some(
                    self.routing_key
                        .clone()
                        .unwrap_or_else(|| "{aggregatetype}.{type}".into()),
                ),
                format: self.format,
                guarantee: "per key, for the last copy of every event; at-least-once with a \
                            stable message_id",
            },
            RabbitMqMode::Stream => Channel {
                protocol: "rabbitmq-stream",
                address: self.stream.clone().unwrap_or_default(),
                route: None,
                format: self.format,
                guarantee: "commit order; exactly once into the stream",
            },
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(super::check(&self.settings(ctx)?).await)
    }
}
