//! What every sink has acknowledged, and so what the relay may confirm to PostgreSQL.
//!
//! Invariant (the confirm rule): the confirmed LSN is the minimum over sinks of the last
//! boundary each acknowledged in full; it never moves backwards, and a partly acknowledged
//! transaction confirms nothing.

use outbox_relay_sinks::{Lsn, Position};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What one sink has acknowledged.
#[derive(Debug, Clone, Copy, Default)]
struct Acked {
    /// The last event acknowledged: everything at or below it is delivered.
    position: Option<Position>,
    /// The last boundary passed: everything before it is delivered.
    confirmable: Lsn,
}

struct SinkProgress {
    name: String,
    acked: Mutex<Acked>,
}

/// Shared progress of one replication session.
pub struct Progress {
    received: AtomicU64,
    sinks: Vec<SinkProgress>,
}

impl Progress {
    /// `start` is the slot's confirmed position: nothing below it will be re-sent.
    pub fn new(sink_names: impl IntoIterator<Item = String>, start: Lsn) -> Arc<Self> {
        let sinks = sink_names
            .into_iter()
            .map(|name| SinkProgress {
                name,
                acked: Mutex::new(Acked {
                    position: None,
                    confirmable: start,
                }),
            })
            .collect();
        Arc::new(Progress {
            received: AtomicU64::new(start.0),
            sinks,
        })
    }

    /// Records the highest WAL position received from the server.
    pub fn received(&self, lsn: Lsn) {
        self.received.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub fn received_lsn(&self) -> Lsn {
        Lsn(self.received.load(Ordering::Relaxed))
    }

    /// The LSN every sink has fully acknowledged: what PostgreSQL may forget.
    pub fn confirmed(&self) -> Lsn {
        self.sinks
            .iter()
            .map(|s| s.acked.lock().expect("progress lock").confirmable)
            .min()
            .unwrap_or_default()
    }

    /// Each sink's acknowledged position, for the checkpoint store.
    pub fn checkpoints(&self) -> BTreeMap<String, Position> {
        self.sinks
            .iter()
            .filter_map(|s| {
                Some((
                    s.name.clone(),
                    s.acked.lock().expect("progress lock").position?,
                ))
            })
            .collect()
    }

    pub(super) fn acknowledge(&self, sink: usize, last: Option<Position>, boundary: Option<Lsn>) {
        let mut acked = self.sinks[sink].acked.lock().expect("progress lock");
        if let Some(position) = last {
            acked.position = Some(acked.position.map_or(position, |p| p.max(position)));
        }
        if let Some(lsn) = boundary {
            acked.confirmable = acked.confirmable.max(lsn);
        }
    }
}
