//! The contract of a sink's configuration: what every kind of sink answers from its own keys
//! ([`SinkKind`]), what it is told besides them ([`SinkContext`]), and how it says a key is
//! wrong ([`ConfigError`]). Each sink's module implements it; [`crate::config`] only lists
//! the kinds.
//!
//! Invariant: configuration errors name the key at fault (`sinks.NAME.KEY`) and say what to
//! do; they never quote a secret.

use crate::routing::{MatchRule, TemplateError};
use crate::upcast_rule::UpcastRule;
use crate::{SecretFileError, Sink};
use async_trait::async_trait;

/// What a sink's configuration needs besides its own keys.
#[derive(Debug, Clone, Copy)]
pub struct SinkContext<'a> {
    /// The sink's name (`[sinks.NAME]`): in messages, and in identities derived from it.
    pub name: &'a str,
    /// The replication slot: sinks that name themselves to a broker (Kafka's transactional
    /// id, a RabbitMQ stream producer) derive that name from the slot and the sink's name.
    pub slot: &'a str,
}

/// What every kind of sink answers from its configuration.
#[async_trait]
pub trait SinkKind: Sync {
    /// The sink, ready for `recover` and `send`; nothing connects yet.
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError>;

    /// Mistakes found without connecting, reported when the configuration is loaded.
    fn validate(&self, _ctx: &SinkContext<'_>) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Which events the sink takes (`[sinks.NAME.match]`).
    fn filter(&self) -> &MatchRule;

    /// Which version the sink publishes each event at (`[sinks.NAME.upcast]`).
    fn upcast(&self) -> &UpcastRule;

    /// Whether the sink can carry a tombstone (an event without a payload).
    fn takes_tombstones(&self) -> bool {
        false
    }

    /// Why the sink would refuse every event whose payload is bytes (a `bytea` payload
    /// column), with the fix; `None` when it carries them. `outbox-relay check` reports it
    /// for each such table the sink takes.
    fn binary_payload_problem(&self) -> Option<String> {
        None
    }

    /// Why the sink cannot publish one shard of a key-sharded outbox (`source.shards`), with
    /// the fix; `None` when it can. Positions are a shard's own (every shard numbers the
    /// events of a transaction from 0), so a destination that orders or deduplicates by
    /// position, shared by the shards, would take one shard's events for another's.
    fn shard_problem(&self) -> Option<String> {
        None
    }

    /// Problems with the destination that `outbox-relay check` reports, one line each with
    /// the fix, each naming the sink.
    async fn check(&self, _ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(Vec::new())
    }

    /// Where the sink puts events, for the event catalog (`outbox-relay catalog`).
    fn channel(&self) -> Channel;
}

/// Where a sink puts events, as the event catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// The protocol, as AsyncAPI names it where it has a name (`kafka`, `amqp`, `sqs`,
    /// `sns`, `nats`, `redis`, `http`), else the service (`eventbridge`, `file`, `stdout`).
    pub protocol: &'static str,
    /// The destination: a template (`{aggregatetype}`…) or a fixed name; empty for a sink
    /// that publishes nothing.
    pub address: String,
    /// The routing key (RabbitMQ exchange) or detail type (EventBridge) template.
    pub route: Option<String>,
    /// How each message's body is laid out.
    pub format: crate::format::Format,
    /// The guarantee the sink gives, in one sentence (README's guarantees table).
    pub guarantee: &'static str,
}

/// A mistake in a sink's configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A template that does not parse; `key` is the full key, e.g. `sinks.out.topic`.
    #[error("{key}")]
    Template {
        key: String,
        #[source]
        source: TemplateError,
    },
    /// A secret file that cannot be read.
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
    /// Settings that cannot work together, with the key and the fix.
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    /// A mistake in the settings of sink `name`, as the sink's own validation words it.
    pub fn invalid(name: &str, problem: impl std::fmt::Display) -> Self {
        ConfigError::Invalid(format!("sinks.{name}: {problem}"))
    }
}

/// Parses the template `value` of key `sinks.NAME.KEY`.
pub fn template(
    ctx: &SinkContext<'_>,
    key: &str,
    value: &str,
) -> Result<crate::routing::Template, ConfigError> {
    crate::routing::Template::parse(value).map_err(|source| ConfigError::Template {
        key: format!("sinks.{}.{key}", ctx.name),
        source,
    })
}

/// `true`, for `#[serde(default = …)]`.
pub(crate) fn default_true() -> bool {
    true
}
