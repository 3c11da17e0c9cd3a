//! outbox-relay: reads the PostgreSQL logical replication stream of outbox tables and
//! publishes every committed row as an event, in commit order, checkpointing exactly what
//! every sink acknowledged.
//!
//! The data path, top-down: [`source::replication`] (our own replication connection) →
//! [`source::pgoutput`] (pure decoder) → [`outbox`] (rows → events) → [`pipeline`] (batching,
//! backpressure, per-sink delivery and acknowledgement) → sinks → [`checkpoint`] → standby
//! status updates.

pub mod admin;
pub mod backfill;
pub mod checkpoint;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod failure;
pub mod http;
pub mod leader;
pub mod outbox;
pub mod pipeline;
pub mod problem;
pub mod reader;
pub mod relay;
pub mod resume;
pub mod row;
pub mod source;
pub mod sql;
pub mod tables;
pub mod telemetry;
pub mod tls;
pub mod validation;
