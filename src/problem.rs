//! A problem the relay's own checks found that an operator must fix: a foreign or invalidated
//! slot, a dropped slot the relay used, a server that is not the one its state comes from, a
//! sink holding positions beyond this database's history. Its text says what to do.
//! [`crate::failure`] stops the relay on it; retrying could only skip or repeat events.

#![forbid(unsafe_code)]

/// See the module documentation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Problem(pub String);
