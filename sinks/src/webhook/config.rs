//! `type = "webhook"`: the serde configuration and how it becomes [`WebhookSettings`]
//! (the URL template checked, headers parsed, the secret and authorization read from their
//! files).

use super::request::Mode;
use super::{client, WebhookApi, WebhookSettings};
use crate::batch::BatchSink;
use crate::kind::{template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Secret, Sink};
use async_trait::async_trait;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `type = "webhook"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// URL template (`http://` or `https://`).
    pub url: String,
    /// CloudEvents HTTP binding: `structured` (the envelope) or `binary` (the payload).
    #[serde(default)]
    pub mode: Mode,
    /// A file holding the Standard Webhooks signing secret (`whsec_…`).
    pub secret_file: Option<PathBuf>,
    /// A file holding the `Authorization` header's value.
    pub authorization_file: Option<PathBuf>,
    /// More headers sent with every request (not secret: they are in the configuration).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Trusted CA certificates (PEM) for `https`; default: the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Most requests in flight at once (different keys).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// One request, from connecting to the answer, before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_concurrency() -> usize {
    16
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Headers the sink sets itself: configured ones would be sent twice.
const OWN_HEADERS: [&str; 7] = [
    "content-type",
    "content-length",
    "host",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

impl WebhookConfig {
    /// Where the template's fixed part says the events go: its scheme and host, when no
    /// placeholder comes before the path.
    fn fixed_origin(&self) -> Option<hyper::Uri> {
        let rest = self.url.split_once("://")?.1;
        let authority = rest.split(['/', '?']).next()?;
        if authority.contains('{') || authority.is_empty() {
            return None;
        }
        let scheme = self.url.split_once("://")?.0;
        format!("{scheme}://{authority}/").parse().ok()
    }

    fn settings(&self, ctx: &SinkContext<'_>) -> Result<WebhookSettings, ConfigError> {
        let invalid = |problem: String| ConfigError::invalid(ctx.name, problem);
        let url = template(ctx, "url", &self.url)?;
        let scheme = self.url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(scheme, Some("http" | "https")) {
            return Err(invalid(format!(
                "url {:?} must start with http:// or https://",
                self.url
            )));
        }
        if self.ca_file.is_some() && scheme != Some("https") {
            return Err(invalid("ca_file is set but the url is not https://".into()));
        }
        if self.concurrency == 0 {
            return Err(invalid("concurrency must be at least 1".into()));
        }
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("headers: {name:?} is not a header name")))?;
            let own = OWN_HEADERS.contains(&header.as_str()) || header.as_str().starts_with("ce-");
            if own || (header == AUTHORIZATION && self.authorization_file.is_some()) {
                return Err(invalid(format!(
                    "headers: {name} is set by the sink itself (or by authorization_file): \
                     remove it"
                )));
            }
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("headers: the value of {name} is not valid")))?;
            headers.push((header, value));
        }
        if let Some(file) = &self.authorization_file {
            let key = format!("sinks.{}.authorization_file", ctx.name);
            let secret = Secret::from_file(file, &key)?;
            let mut value = HeaderValue::from_str(secret.expose()).map_err(|_| {
                invalid(format!(
                    "authorization_file {}: its first line is not a header value",
                    file.display()
                ))
            })?;
            value.set_sensitive(true);
            headers.push((AUTHORIZATION, value));
        }
        let signing_key = match &self.secret_file {
            Some(file) => {
                let key = format!("sinks.{}.secret_file", ctx.name);
                let secret = Secret::from_file(file, &key)?;
                let key = super::request::signing_key(secret.expose()).map_err(|problem| {
                    invalid(format!("secret_file {}: {problem}", file.display()))
                })?;
                Some(key)
            }
            None => None,
        };
        Ok(WebhookSettings {
            name: ctx.name.to_owned(),
            url,
            mode: self.mode,
            headers,
            signing_key,
            ca_file: self.ca_file.clone(),
            concurrency: self.concurrency,
            timeout: self.timeout,
        })
    }
}

#[async_trait]
impl SinkKind for WebhookConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        let api = WebhookApi::new(self.settings(ctx)?)
            .map_err(|problem| ConfigError::invalid(ctx.name, problem))?;
        Ok(Box::new(BatchSink::new(api)))
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
            protocol: "http",
            address: self.url.clone(),
            route: None,
            format: match self.mode {
                Mode::Structured => crate::format::Format::CloudEvents,
                Mode::Binary => crate::format::Format::Raw,
            },
            guarantee: "per key (one request per key in flight); at-least-once with an \
                        Idempotency-Key",
        }
    }

    /// A host that cannot be reached (TCP, and TLS for `https`); nothing is sent.
    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        let settings = self.settings(ctx)?;
        let Some(origin) = self.fixed_origin() else {
            return Ok(Vec::new());
        };
        let connected =
            client::connect(settings.ca_file.as_deref(), origin, settings.timeout).await;
        Ok(match connected {
            Ok(()) => Vec::new(),
            Err(problem) => vec![format!(
                "sink {}: {problem}: check the url, the network and, for https, the server's \
                 certificate (ca_file)",
                ctx.name
            )],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<WebhookSettings, String> {
        let config: WebhookConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let ctx = SinkContext {
            name: "hook",
            slot: "s",
        };
        config.settings(&ctx).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_that_would_fail_every_request_are_configuration_errors() {
        assert!(settings(r#"{"url": "https://hooks.example.com/{aggregatetype}"}"#).is_ok());
        for (json, problem) in [
            (r#"{"url": "hooks.example.com"}"#, "must start with http"),
            (r#"{"url": "{aggregatetype}"}"#, "must start with http"),
            (
                r#"{"url": "http://h/", "ca_file": "/ca.pem"}"#,
                "ca_file is set but the url is not https",
            ),
            (r#"{"url": "http://h/", "concurrency": 0}"#, "concurrency"),
            (
                r#"{"url": "http://h/", "headers": {"Idempotency-Key": "x"}}"#,
                "set by the sink itself",
            ),
            (
                r#"{"url": "http://h/", "headers": {"bad name": "x"}}"#,
                "not a header name",
            ),
            (
                r#"{"url": "http://h/", "mode": "batch"}"#,
                "unknown variant",
            ),
            (
                r#"{"url": "http://h/", "secret_file": "/nonexistent/secret"}"#,
                "cannot read sinks.hook.secret_file",
            ),
        ] {
            let err = settings(json).unwrap_err();
            assert!(err.contains(problem), "{json}: {err}");
        }
    }

    #[test]
    fn the_origin_is_checked_only_when_the_template_fixes_it() {
        let config = |url: &str| WebhookConfig {
            url: url.into(),
            ..serde_json::from_str(r#"{"url": ""}"#).unwrap()
        };
        assert_eq!(
            config("https://hooks.example.com:8443/in/{type}")
                .fixed_origin()
                .map(|u| u.to_string()),
            Some("https://hooks.example.com:8443/".into())
        );
        assert!(config("https://{aggregatetype}.example.com/in")
            .fixed_origin()
            .is_none());
    }
}
