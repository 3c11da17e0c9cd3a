//! `type = "nats"`: the serde configuration and how it becomes [`NatsSettings`] (the subject
//! template parsed, secrets read from their files).

use super::{NatsSettings, NatsSink};
use crate::format::Format;
use crate::kind::{template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Secret, Sink};
use async_trait::async_trait;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `type = "nats"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:4222` (`tls://` for TLS), several comma-separated.
    pub url: String,
    /// Subject template, e.g. `outbox.{aggregatetype}.{type}`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// A NATS credentials file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// User for a user/password login, with `password_file`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A token login, read from this file.
    pub token_file: Option<PathBuf>,
    /// Trusted CA certificates (PEM) for TLS; TLS is then required. Default: the Mozilla
    /// roots, for servers that ask for TLS or `tls://` URLs.
    pub ca_file: Option<PathBuf>,
    /// The message body: the CloudEvents envelope, or the payload (debezium, raw).
    #[serde(default)]
    pub format: Format,
    /// Most publishes awaiting their acknowledgement at once.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Connecting, and each publish's acknowledgement, before the batch is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_subject() -> String {
    "outbox.{aggregatetype}.{type}".into()
}
fn default_window() -> usize {
    256
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl NatsConfig {
    /// The sink's settings: the template parsed, the secrets read.
    pub fn settings(&self, ctx: &SinkContext<'_>) -> Result<NatsSettings, ConfigError> {
        let name = ctx.name;
        let logins = [
            self.credentials_file.is_some(),
            self.username.is_some() || self.password_file.is_some(),
            self.token_file.is_some(),
        ];
        if logins.iter().filter(|set| **set).count() > 1 {
            return Err(ConfigError::invalid(
                name,
                "set one login: credentials_file, username with password_file, or token_file",
            ));
        }
        if self.username.is_some() != self.password_file.is_some() {
            return Err(ConfigError::invalid(
                name,
                "username and password_file go together",
            ));
        }
        if self.window == 0 || self.timeout.is_zero() {
            return Err(ConfigError::invalid(
                name,
                "window and timeout must be above 0",
            ));
        }
        let secret = |file: &Option<PathBuf>, key: &str| -> Result<Option<Secret>, ConfigError> {
            match file {
                Some(file) => Ok(Some(Secret::from_file(
                    file,
                    &format!("sinks.{name}.{key}"),
                )?)),
                None => Ok(None),
            }
        };
        Ok(NatsSettings {
            name: name.to_owned(),
            url: self.url.clone(),
            subject: template(ctx, "subject", &self.subject)?,
            credentials_file: self.credentials_file.clone(),
            username: self.username.clone(),
            password: secret(&self.password_file, "password_file")?,
            token: secret(&self.token_file, "token_file")?,
            ca_file: self.ca_file.clone(),
            format: self.format,
            window: self.window,
            timeout: self.timeout,
        })
    }
}

#[async_trait]
impl SinkKind for NatsConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(NatsSink::new(self.settings(ctx)?)))
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
            protocol: "nats",
            address: self.subject.clone(),
            route: None,
            format: self.format,
            guarantee: "commit order; exactly once within the stream's duplicate window",
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(NatsSink::new(self.settings(ctx)?).check().await)
    }
}
