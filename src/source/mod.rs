//! The source side: our own replication connection to PostgreSQL and the pgoutput decoder.

mod coalesce;
pub mod pgoutput;
pub mod replication;
pub mod tls;
pub mod wire;
