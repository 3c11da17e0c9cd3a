//! The null sink: acknowledges every event at once and writes nothing. It measures the
//! relay itself (benchmarks) and lets a relay confirm a slot without publishing.

use crate::{Delivery, Event, Sink, SinkError};
use async_trait::async_trait;

#[derive(Debug, Default)]
pub struct NullSink;

#[async_trait]
impl Sink for NullSink {
    async fn send(&mut self, _batch: &[Event]) -> Result<Delivery, SinkError> {
        Ok(Delivery::default())
    }
}
