//! What operators see: the relay's role (for readiness) and its Prometheus metrics. One
//! process-wide instance, updated where things happen and read by the HTTP endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::LazyLock;

/// What the relay is doing, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Connecting, or waiting to reconnect after an error.
    Connecting = 0,
    /// Waiting for the leader's lock or for the slot: healthy, not streaming.
    Standby = 1,
    /// Streaming from the slot.
    Streaming = 2,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Connecting => "connecting",
            Role::Standby => "standby",
            Role::Streaming => "streaming",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkTableLabels {
    pub sink: String,
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabels {
    pub component: String,
}

/// Every metric the relay exports.
pub struct Metrics {
    pub registry: Registry,
    role: AtomicU8,
    pub events_published: Family<SinkTableLabels, Counter>,
    pub publish_latency: Family<SinkLabels, Histogram>,
    pub dead_letters: Family<SinkLabels, Counter>,
    pub sink_checkpoint_lsn: Family<SinkLabels, Gauge>,
    pub in_flight_events: Family<SinkLabels, Gauge>,
    pub in_flight_bytes: Family<SinkLabels, Gauge>,
    pub sink_retries: Family<SinkLabels, Counter>,
    pub received_lsn: Gauge,
    pub confirmed_lsn: Gauge,
    pub replication_lag_bytes: Gauge,
    pub reconnects: Family<ComponentLabels, Counter>,
    pub leader: Gauge,
    pub last_heartbeat_seconds: Gauge,
    pub decode_errors: Counter,
    pub unpublished_tables: Gauge,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("outbox_relay");
        Metrics {
            role: AtomicU8::new(Role::Connecting as u8),
            events_published: register(
                &mut registry,
                "events_published",
                "Events a sink acknowledged, per sink and source table",
                Family::<SinkTableLabels, Counter>::default(),
            ),
            publish_latency: register(
                &mut registry,
                "publish_latency_seconds",
                "Commit time in PostgreSQL to the sink's acknowledgement",
                Family::<SinkLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _),
            ),
            dead_letters: register(
                &mut registry,
                "dead_letters",
                "Events stored as dead letters; sink=\"\" for rows the mapping or validation refused",
                Family::<SinkLabels, Counter>::default(),
            ),
            sink_checkpoint_lsn: register(
                &mut registry,
                "sink_checkpoint_lsn",
                "Commit LSN of the last event each sink acknowledged",
                Family::<SinkLabels, Gauge>::default(),
            ),
            in_flight_events: register(
                &mut registry,
                "in_flight_events",
                "Events handed to a sink's queue and not yet acknowledged by it",
                Family::<SinkLabels, Gauge>::default(),
            ),
            in_flight_bytes: register(
                &mut registry,
                "in_flight_bytes",
                "Bytes of those events, as relay.batch_bytes counts them",
                Family::<SinkLabels, Gauge>::default(),
            ),
            sink_retries: register(
                &mut registry,
                "sink_retries",
                "Batches a sink failed with a retryable error (broker down, throttled, ...)",
                Family::<SinkLabels, Counter>::default(),
            ),
            received_lsn: register(
                &mut registry,
                "received_lsn",
                "Server WAL position last seen on the replication connection",
                Gauge::default(),
            ),
            confirmed_lsn: register(
                &mut registry,
                "confirmed_lsn",
                "LSN confirmed to PostgreSQL (every sink acknowledged everything before it)",
                Gauge::default(),
            ),
            replication_lag_bytes: register(
                &mut registry,
                "replication_lag_bytes",
                "Server WAL position minus the confirmed LSN",
                Gauge::default(),
            ),
            reconnects: register(
                &mut registry,
                "reconnects",
                "Sessions ended by an error that is retried, per component",
                Family::<ComponentLabels, Counter>::default(),
            ),
            leader: register(
                &mut registry,
                "leader",
                "1 while this relay holds the leader lock and may stream, else 0",
                Gauge::default(),
            ),
            last_heartbeat_seconds: register(
                &mut registry,
                "last_heartbeat_timestamp_seconds",
                "Unix time of the last heartbeat written to the source database",
                Gauge::default(),
            ),
            decode_errors: register(
                &mut registry,
                "decode_errors",
                "Replication messages that could not be decoded",
                Counter::default(),
            ),
            unpublished_tables: register(
                &mut registry,
                "unpublished_tables",
                "Outbox tables (source.tables) missing from the publication: their rows never arrive",
                Gauge::default(),
            ),
            registry,
        }
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Standby,
            2 => Role::Streaming,
            _ => Role::Connecting,
        }
    }

    pub fn sink(name: &str) -> SinkLabels {
        SinkLabels {
            sink: name.to_owned(),
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Gauges hold i64: LSNs and byte counts of any real cluster fit.
pub fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Registers `metric` under `name` and returns it (a handle onto the registered one).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
