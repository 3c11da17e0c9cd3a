//! The seam between the relay and the outside world: the [`Event`] that crosses it, the
//! [`Sink`] trait every destination implements, and one module per sink.
//!
//! Sinks know nothing about PostgreSQL. They receive batches of events in commit order and
//! answer once every event of the batch is durably accepted (or explicitly rejected), so the
//! relay can move its checkpoint over exactly what was acknowledged.

mod event;
pub mod eventbridge;
pub mod file;
pub mod format;
pub mod kafka;
pub mod null;
pub mod rabbitmq;
pub mod routing;
pub mod stdout;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use event::{Event, Lsn, Payload, Position, Text};

use async_trait::async_trait;

/// Why a sink could not take a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A transient failure (broker down, timeout, throttling): the same batch is retried with
    /// backoff. The sink must tolerate seeing events of a partially delivered batch again.
    #[error("{0} (will retry)")]
    Retryable(String),
    /// A failure that retrying cannot fix (bad credentials, missing destination, a file the
    /// sink did not write). The relay stops with this message.
    #[error("{0}")]
    Permanent(String),
}

impl SinkError {
    /// Classifies an I/O error: interruptions and timeouts are retried, the rest are permanent.
    pub fn from_io(context: &str, err: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match err.kind() {
            Interrupted | TimedOut | WouldBlock | ConnectionReset | ConnectionAborted
            | BrokenPipe => SinkError::Retryable(format!("{context}: {err}")),
            _ => SinkError::Permanent(format!("{context}: {err}")),
        }
    }
}

/// An event of a batch that the sink refused for good (for example larger than the broker
/// accepts). The relay writes it to the dead-letter store with `reason`; it is never dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Index of the event in the batch passed to [`Sink::send`].
    pub index: usize,
    pub reason: String,
}

/// The outcome of a successful [`Sink::send`]: every event is acknowledged except the
/// rejected ones.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub rejected: Vec<Rejection>,
}

/// A destination for events.
///
/// The relay calls `send` with batches in commit order and never calls it again before the
/// previous call returned, so a sink keeps per-key order simply by keeping batch order. A
/// sink may pipeline inside a batch (publisher confirms, idempotent producers, parallel
/// requests per key) as long as it returns only once every event is acknowledged.
#[async_trait]
pub trait Sink: Send {
    /// The position this sink stored durably by itself, for sinks that keep their own
    /// checkpoint (transactional producers, deduplicating streams). `None` means the relay's
    /// checkpoint table is authoritative.
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        Ok(None)
    }

    /// Delivers `batch` and returns once every event is acknowledged or rejected.
    async fn send(&mut self, batch: &[Event]) -> Result<Delivery, SinkError>;

    /// Flushes and releases resources before a clean shutdown.
    async fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
