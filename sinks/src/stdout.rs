//! The stdout sink: one event per line on standard output, for demos, debugging and piping
//! into other tools. An event is acknowledged once its batch is flushed to the pipe; a crash
//! may repeat the events since the last checkpoint (at-least-once).

use crate::format::{self, Format};
use crate::kind::{Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Event, EventState, Sink, SinkError};
use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// `type = "stdout"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {
    #[serde(default)]
    pub format: Format,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

impl SinkKind for StdoutConfig {
    fn build(&self, _ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(StdoutSink::new(self.format)))
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "stdout",
            address: String::new(),
            route: None,
            format: self.format,
            guarantee: "commit order; at-least-once across crashes",
        }
    }
}

pub struct StdoutSink {
    format: Format,
    out: tokio::io::Stdout,
    buf: Vec<u8>,
}

impl StdoutSink {
    pub fn new(format: Format) -> Self {
        StdoutSink {
            format,
            out: tokio::io::stdout(),
            buf: Vec::with_capacity(64 * 1024),
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    async fn send(&mut self, batch: &[Event], _states: &mut [EventState]) -> Result<(), SinkError> {
        self.buf.clear();
        for event in batch {
            format::write_line(self.format, event, &mut self.buf);
        }
        self.out
            .write_all(&self.buf)
            .await
            .map_err(|e| SinkError::from_io("writing to stdout", e))?;
        self.out
            .flush()
            .await
            .map_err(|e| SinkError::from_io("flushing stdout", e))?;
        Ok(())
    }
}
