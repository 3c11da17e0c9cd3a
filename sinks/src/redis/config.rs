//! `type = "redis"`: the serde configuration and how it becomes [`RedisSettings`] (the
//! stream template parsed, the password read from its file, the URL checked).

use super::{RedisSettings, RedisSink};
use crate::format::Format;
use crate::kind::{template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Secret, Sink};
use async_trait::async_trait;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `type = "redis"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user@]host:port/db`, or `rediss://` for TLS.
    pub url: String,
    /// The password, read from this file at start (keeps it out of the TOML and the URL).
    pub password_file: Option<PathBuf>,
    /// Trusted CA certificates (PEM) for `rediss://`; default: the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Stream key template, e.g. `outbox.{aggregatetype}`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The `event` field: the CloudEvents envelope, or the payload (debezium, raw).
    #[serde(default)]
    pub format: Format,
    /// Trim each stream to about this many entries (`XADD … MAXLEN ~ n`); unset: no trimming.
    pub maxlen: Option<u64>,
    /// A larger entry (fields and values) is dead-lettered.
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: usize,
    /// How long one batch may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_stream() -> String {
    "outbox.{aggregatetype}".into()
}
fn default_max_entry_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl RedisConfig {
    /// The sink's settings: the template parsed, the password read.
    pub fn settings(&self, ctx: &SinkContext<'_>) -> Result<RedisSettings, ConfigError> {
        let url = url::Url::parse(&self.url)
            .ok()
            .filter(|url| matches!(url.scheme(), "redis" | "rediss"))
            .ok_or_else(|| {
                ConfigError::invalid(
                    ctx.name,
                    "url must be redis://host:port/db or rediss://host:port/db (TLS)",
                )
            })?;
        if !url.password().unwrap_or_default().is_empty() && self.password_file.is_some() {
            return Err(ConfigError::invalid(
                ctx.name,
                "the password is both in url and in password_file: keep it in password_file",
            ));
        }
        if self.ca_file.is_some() && url.scheme() != "rediss" {
            return Err(ConfigError::invalid(
                ctx.name,
                "ca_file is set but the url is not rediss://",
            ));
        }
        if self.max_entry_bytes == 0 || self.timeout.is_zero() {
            return Err(ConfigError::invalid(
                ctx.name,
                "max_entry_bytes and timeout must be above 0",
            ));
        }
        let password = match &self.password_file {
            Some(file) => Some(Secret::from_file(
                file,
                &format!("sinks.{}.password_file", ctx.name),
            )?),
            None => None,
        };
        Ok(RedisSettings {
            name: ctx.name.to_owned(),
            url: self.url.clone(),
            password,
            ca_file: self.ca_file.clone(),
            stream: template(ctx, "stream", &self.stream)?,
            format: self.format,
            maxlen: self.maxlen,
            max_entry_bytes: self.max_entry_bytes,
            timeout: self.timeout,
        })
    }
}

#[async_trait]
impl SinkKind for RedisConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(RedisSink::new(self.settings(ctx)?)))
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

    fn shard_problem(&self) -> Option<String> {
        Some(
            "the redis sink numbers stream entries by the event's position, and the shards of \
             a key-sharded outbox number their events apart: one stream cannot take two shards' \
             entries. Use source.shards = 1 for this outbox"
                .into(),
        )
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "redis",
            address: self.stream.clone(),
            route: None,
            format: self.format,
            guarantee: "commit order in every stream; exactly once into the stream",
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(RedisSink::new(self.settings(ctx)?).check().await)
    }
}
