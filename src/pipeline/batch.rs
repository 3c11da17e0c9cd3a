//! A batch being filled by the reader, and the limits (events, bytes) that close it.

use super::Batch;
use crate::config::RelayConfig;
use outbox_relay_sinks::{Event, Lsn};

/// The events gathered for the next batch, their bytes counted as they arrive (the reader's
/// and the backfill's): full at its [`BatchLimit`], handed on as a [`Batch`].
#[derive(Debug)]
pub struct PendingBatch {
    events: Vec<Event>,
    bytes: usize,
    limit: BatchLimit,
}

impl PendingBatch {
    pub fn new(limit: BatchLimit) -> Self {
        PendingBatch {
            events: Vec::with_capacity(limit.events),
            bytes: 0,
            limit,
        }
    }

    pub fn push(&mut self, event: Event) {
        self.bytes += event.size_bytes();
        self.events.push(event);
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.limit.reached(self.events.len(), self.bytes)
    }

    /// (events, bytes), for logs.
    pub fn size(&self) -> (usize, usize) {
        (self.events.len(), self.bytes)
    }

    /// The gathered events as a batch with `boundary`; starts the next one empty.
    pub fn take(&mut self, boundary: Option<Lsn>) -> Batch {
        let events = std::mem::replace(&mut self.events, Vec::with_capacity(self.limit.events));
        Batch {
            events,
            boundary,
            bytes: std::mem::take(&mut self.bytes),
        }
    }
}

/// How large a batch grows: it closes at `events` events, or once its events hold `bytes`
/// bytes (`relay.batch_size`, `relay.batch_bytes`). The byte limit keeps memory bounded when
/// rows are large. The event that reaches it closes the batch, so a batch exceeds it by at
/// most one event, and an event larger than the limit still goes through.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimit {
    pub events: usize,
    pub bytes: usize,
}

impl BatchLimit {
    pub fn of(relay: &RelayConfig) -> Self {
        BatchLimit {
            events: relay.batch_size,
            bytes: relay.batch_bytes,
        }
    }

    /// Whether a batch of `events` events holding `bytes` bytes is closed.
    pub(super) fn reached(&self, events: usize, bytes: usize) -> bool {
        events >= self.events || bytes >= self.bytes
    }

    /// Whether a batch of `events` events and `bytes` bytes may still take `more` on top.
    pub(super) fn fits(&self, events: usize, bytes: usize, more: &Batch) -> bool {
        events + more.events.len() <= self.events && bytes + more.bytes <= self.bytes
    }
}
