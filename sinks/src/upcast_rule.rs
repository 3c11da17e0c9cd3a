//! Which schema version a sink publishes each event at (`[sinks.NAME.upcast]`): as stored
//! (the default), upcast to the latest version the relay's upcasters reach, or upcast to a
//! version pinned per event type. The sinks crate only carries the rule; the relay runs the
//! upcasters before a sink's `send` and marks what it changed in
//! [`Event::original_schema_version`](crate::Event::original_schema_version).

use serde::Deserialize;
use std::collections::BTreeMap;

/// `[sinks.NAME.upcast]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpcastRule {
    /// The version of events of types not in `pinned`.
    #[serde(default)]
    pub to: UpcastTarget,
    /// Per event type, the version to upcast to (events already at or past it are
    /// published as stored: there is no downcasting).
    #[serde(default)]
    pub pinned: BTreeMap<String, i64>,
}

/// The version of events whose type is not pinned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpcastTarget {
    /// The version the outbox row carries.
    #[default]
    Stored,
    /// The latest version the event type's upcasters reach.
    Latest,
}

impl UpcastRule {
    /// Whether every event is published as stored.
    pub fn is_stored(&self) -> bool {
        self.to == UpcastTarget::Stored && self.pinned.is_empty()
    }

    /// The version an event of `event_type` is published at, given `latest`: the version
    /// the upcasters reach from the stored one. `None`: as stored.
    pub fn target(&self, event_type: &str, latest: impl FnOnce() -> i64) -> Option<i64> {
        match self.pinned.get(event_type) {
            Some(&pinned) => Some(pinned),
            None if self.to == UpcastTarget::Latest => Some(latest()),
            None => None,
        }
    }
}
