//! The null sink: acknowledges every event at once and writes nothing. It measures the
//! relay itself (benchmarks) and lets a relay confirm a slot without publishing.

use crate::kind::{Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Event, EventState, Sink, SinkError};
use async_trait::async_trait;
use serde::Deserialize;

/// `type = "null"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

impl SinkKind for NullConfig {
    fn build(&self, _ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(NullSink))
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "null",
            address: String::new(),
            route: None,
            format: crate::format::Format::CloudEvents,
            guarantee: "publishes nothing",
        }
    }
}

#[derive(Debug, Default)]
pub struct NullSink;

#[async_trait]
impl Sink for NullSink {
    async fn send(
        &mut self,
        _batch: &[Event],
        _states: &mut [EventState],
    ) -> Result<(), SinkError> {
        Ok(())
    }
}
