//! The seam between the relay and the outside world: the [`Event`] that crosses it, the
//! [`Sink`] trait every destination implements, one module per sink, and [`SinkConfig`], the
//! one place that knows every kind of sink.
//!
//! Sinks know nothing about PostgreSQL. They receive batches of events in commit order and
//! answer once every event of the batch is durably accepted (or explicitly rejected), so the
//! relay can move its checkpoint over exactly what was acknowledged.
//!
//! # Adding a sink
//!
//! 1. A module (a folder once it has more than one job: `config.rs`, encoding, transport,
//!    `mod.rs` with the sink) holding the serde configuration of `[sinks.NAME]`, with
//!    `#[serde(deny_unknown_fields)]`, a `match` key ([`routing::MatchRule`]) and an
//!    `upcast` key ([`UpcastRule`]), and a [`Sink`].
//! 2. [`SinkKind`] for the configuration: `build` the sink, and where they apply `validate`
//!    (what can be refused when the configuration loads), `takes_tombstones`,
//!    `binary_payload_problem`, `check` (what `outbox-relay check` reports), and `channel`
//!    (where it publishes, for `outbox-relay catalog`).
//! 3. One variant of [`SinkConfig`] (its name is the `type`) and its arm in
//!    `SinkConfig::kind`. Nothing in the relay's crate changes.
//!
//! The test module of `config.rs` shows it on a toy sink.

pub mod aws;
mod backoff;
mod batch;
pub mod config;
mod event;
pub mod eventbridge;
pub mod file;
pub mod format;
pub mod kafka;
pub mod kind;
pub mod nats;
pub mod null;
pub mod rabbitmq;
pub mod redis;
pub mod routing;
mod secret;
pub mod sqs;
pub mod stdout;
pub mod table_name;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod upcast_rule;
pub mod webhook;

pub use backoff::Backoff;
pub use config::{build_all, SinkConfig};
pub use event::{Event, Lsn, Payload, Position, Text};
pub use kind::{Channel, ConfigError, SinkContext, SinkKind};
pub use secret::{Secret, SecretFileError};
pub use upcast_rule::{UpcastRule, UpcastTarget};

use async_trait::async_trait;

/// An error and its sources on one line (whitespace folded, repeats left out), without a
/// library's debug dump: what sinks put in their messages.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(err) = current {
        let text = err
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

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

/// Where one event of a batch stands with a sink. The relay keeps one per event of a batch
/// across its own retries of that batch and hands the same slice to every [`Sink::send`]
/// of it, so a sink remembers nothing of an earlier attempt: what is settled is in the
/// slice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EventState {
    /// Not known to be delivered: the next attempt sends it.
    #[default]
    Pending,
    /// Sent, and refused by the destination for a reason that may pass (`reason`): the next
    /// attempt sends it again or, if the destination has meanwhile made that impossible,
    /// rejects it. Sinks whose refusals need no memory never use it.
    Refused(String),
    /// Durably accepted by the destination.
    Acked,
    /// Refused for good (for example larger than the broker accepts). The relay writes it to
    /// the dead-letter store with `reason`; it is never dropped.
    Rejected(String),
}

impl EventState {
    /// Acknowledged or rejected: no attempt sends it again, unless the sink's own per-key
    /// ordering rule makes it pending again.
    pub fn is_settled(&self) -> bool {
        matches!(self, EventState::Acked | EventState::Rejected(_))
    }
}

/// An event the sink rejected, by its index in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub reason: String,
}

/// The rejected events of a batch whose `send` succeeded: every other one is acknowledged.
pub fn rejections(states: Vec<EventState>) -> Vec<Rejection> {
    states
        .into_iter()
        .enumerate()
        .filter_map(|(index, state)| match state {
            EventState::Rejected(reason) => Some(Rejection { index, reason }),
            _ => None,
        })
        .collect()
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
    ///
    /// `states` has one entry per event: all [`EventState::Pending`] on the first attempt,
    /// and on the relay's retries of the same batch what earlier attempts left there. The
    /// sink sends only the events that are not settled (and, where its per-key ordering rule
    /// says so, later events of their key again), records what it learns as it goes, also
    /// when it fails, and marks refused-for-good events [`EventState::Rejected`]. `Ok(())`
    /// means every event that is not rejected is acknowledged.
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError>;

    /// Flushes and releases resources before a clean shutdown.
    async fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}
