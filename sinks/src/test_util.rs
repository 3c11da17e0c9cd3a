//! Test kit (feature `test-util`): what tests of the relay and of the sinks need over and
//! over, kept in one place so a change to [`Event`] or [`Sink`] is made once: a sample event
//! and a sink that records what it was sent.
//!
//! The checkpoint and dead-letter stores are the relay crate's traits, so their test doubles
//! live in that crate's tests (the pipeline's tests record dead letters in memory).

use crate::{Event, EventState, Lsn, Position, Sink, SinkError, Text};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};

/// An `OrderCreated` event of aggregate `k` from `public.outbox` at position (`lsn`,
/// `index`), with an empty JSON object as payload. Its id is unique to its position, as a
/// real event's is; tests change the fields they care about
/// (`Event { payload: ..., ..sample(lsn, index) }`).
pub fn sample(lsn: u64, index: u32) -> Event {
    Event {
        position: Position {
            commit_lsn: Lsn(lsn),
            index,
        },
        xid: 1,
        commit_time_micros: 1_700_000_000_000_000,
        table: "public.outbox".into(),
        source: "/public.outbox".into(),
        id: Text::from(format!(
            "00000000-0000-4000-8000-{:012x}",
            lsn * 100_000 + u64::from(index)
        )),
        key: Text::from("k"),
        aggregate_type: Text::from("order"),
        aggregate_id: Text::from("k"),
        event_type: Text::from("OrderCreated"),
        schema_version: None,
        original_schema_version: None,
        occurred_at: None,
        traceparent: None,
        headers: Vec::new(),
        attributes: Vec::new(),
        payload: Text::from("{}").into(),
        only_sink: None,
    }
}

/// A sink that accepts everything and records every batch it was sent. Clones share the
/// record: keep one, hand the other to the code under test.
#[derive(Clone, Default)]
pub struct RecordingSink {
    batches: Arc<Mutex<Vec<Vec<Event>>>>,
}

impl RecordingSink {
    /// The batches sent so far, in the order they were sent.
    pub fn batches(&self) -> Vec<Vec<Event>> {
        self.batches.lock().unwrap().clone()
    }
}

#[async_trait]
impl Sink for RecordingSink {
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        self.batches.lock().unwrap().push(batch.to_vec());
        states.fill(EventState::Acked);
        Ok(())
    }
}
