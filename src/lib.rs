//! outbox-relay: reads the PostgreSQL logical replication stream of outbox tables and
//! publishes every committed row as an event, in commit order, checkpointing exactly what
//! every sink acknowledged.
//!
//! One row's path, one file per hop, top-down:
//! 1. [`source::replication`]: our own replication connection (TLS, auth, START_REPLICATION).
//! 2. [`source::stream`]: reads the socket, frames CopyData into replication messages.
//! 3. [`source::pgoutput`]: the pure decoder, bytes → Begin / Relation / Insert / … / Commit.
//! 4. [`reader`]: transactions → positions (commit end LSN, index) and confirmable
//!    boundaries; pgoutput's shapes become the neutral [`row`].
//! 5. [`outbox`]: a row or logical message → an event, or a dead letter with its reason
//!    ([`dead_letters`] stores it).
//! 6. [`pipeline`]: batches, one worker per sink, backpressure, acknowledgement progress.
//! 7. the sinks crate (`outbox_relay_sinks`): one folder per sink, publishing and confirming.
//! 8. [`checkpoint`]: stores each sink's acknowledged position.
//! 9. [`source::status`]: confirms to PostgreSQL the end of every transaction all sinks
//!    acknowledged.
//!
//! [`relay`] wires one session of these together. Beside the path: [`source::slot`] readies
//! the slot, [`resume`] readies the sinks (what each already holds), [`backfill`] is the
//! second source of rows, [`failure`] decides what a failure leads to, [`leader`] elects one
//! relay per slot, [`lifecycle`] runs it under signals (SIGTERM drains, SIGHUP reloads),
//! [`admin`] holds the other commands; [`logging`], [`telemetry`] and [`http`]
//! are what operators see.

pub mod admin;
pub mod backfill;
pub mod checkpoint;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod failure;
pub mod http;
pub mod leader;
pub mod lifecycle;
pub mod logging;
pub mod outbox;
pub mod pipeline;
pub mod problem;
pub mod reader;
pub mod relay;
pub mod resume;
pub mod row;
pub mod schemas;
pub mod source;
pub mod sql;
pub mod tables;
pub mod telemetry;
pub mod tls;
pub mod upcast;
pub mod validation;
