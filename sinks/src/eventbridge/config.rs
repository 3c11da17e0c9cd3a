//! `type = "eventbridge"`: the serde configuration and how it becomes
//! [`EventBridgeSettings`] (templates parsed, settings that would refuse every event refused).

use super::{EventBridgeApi, EventBridgeSettings, DEFAULT_MAX_REQUEST_BYTES};
use crate::batch::BatchSink;
use crate::format::Format;
use crate::kind::{template, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::Sink;
use async_trait::async_trait;
use serde::Deserialize;
use std::time::Duration;

/// `type = "eventbridge"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventBridgeConfig {
    /// Event bus name or ARN template.
    #[serde(default = "default_bus")]
    pub bus: String,
    /// `Source` template.
    #[serde(default = "default_source")]
    pub source: String,
    /// `DetailType` template.
    #[serde(default = "default_detail_type")]
    pub detail_type: String,
    /// `Resources` templates (ARNs), attached to every entry.
    #[serde(default)]
    pub resources: Vec<String>,
    /// `Detail`: the CloudEvents envelope, or the payload (a JSON object) for debezium/raw.
    #[serde(default)]
    pub format: Format,
    /// Default: the standard AWS chain (`AWS_REGION`, profile, instance metadata).
    pub region: Option<String>,
    /// Default: AWS's endpoint for the region (or `AWS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// Most `PutEvents` requests in flight at once (different keys).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Most entry bytes per request, as AWS counts them; a larger event is dead-lettered.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// How long one `PutEvents` attempt may take before it is retried.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

fn default_bus() -> String {
    "default".into()
}
fn default_source() -> String {
    "outbox.{aggregatetype}".into()
}
fn default_detail_type() -> String {
    "{type}".into()
}
fn default_concurrency() -> usize {
    16
}
fn default_max_request_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl EventBridgeConfig {
    /// The sink's settings, its templates parsed.
    pub fn settings(&self, ctx: &SinkContext<'_>) -> Result<EventBridgeSettings, ConfigError> {
        let settings = EventBridgeSettings {
            name: ctx.name.to_owned(),
            bus: template(ctx, "bus", &self.bus)?,
            source: template(ctx, "source", &self.source)?,
            detail_type: template(ctx, "detail_type", &self.detail_type)?,
            resources: self
                .resources
                .iter()
                .map(|r| template(ctx, "resources", r))
                .collect::<Result<_, _>>()?,
            format: self.format,
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
            concurrency: self.concurrency,
            max_request_bytes: self.max_request_bytes,
            timeout: self.timeout,
        };
        settings
            .validate()
            .map_err(|err| ConfigError::invalid(ctx.name, err))?;
        Ok(settings)
    }
}

#[async_trait]
impl SinkKind for EventBridgeConfig {
    fn build(&self, ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(BatchSink::new(EventBridgeApi::new(
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
            protocol: "eventbridge",
            address: self.bus.clone(),
            route: Some(self.detail_type.clone()),
            format: self.format,
            guarantee: "per key (one event per key in flight); at-least-once",
        }
    }

    async fn check(&self, ctx: &SinkContext<'_>) -> Result<Vec<String>, ConfigError> {
        Ok(EventBridgeApi::new(self.settings(ctx)?).check().await)
    }

    /// A Detail must be a JSON object; only CloudEvents carries bytes (in `data_base64`).
    fn binary_payload_problem(&self) -> Option<String> {
        let format = match self.format {
            Format::CloudEvents => return None,
            Format::Raw => "raw",
            Format::Debezium => "debezium",
        };
        Some(format!(
            "an EventBridge Detail in format \"{format}\" must be a JSON object: every event \
             of the table would be dead-lettered. Use format = \"cloudevents\" (the bytes go \
             into data_base64), or keep the table from the sink with match.tables"
        ))
    }
}
