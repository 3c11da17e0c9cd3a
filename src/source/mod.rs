//! The source side: our own replication connection to PostgreSQL, the pgoutput decoder, the
//! relay's slot, and the tasks that keep a streaming session healthy (status updates,
//! heartbeat, publication watch).

mod coalesce;
pub mod heartbeat;
pub mod origin;
pub mod pgoutput;
pub mod publication_watch;
pub mod replication;
pub mod slot;
pub mod status;
pub mod stream;
pub mod wire;
