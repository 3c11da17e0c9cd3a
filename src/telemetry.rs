//! What operators see: the relay's role (for readiness) and its Prometheus metrics. One
//! process-wide instance, updated where things happen and read by the HTTP endpoint.
//!
//! Invariant: every series an alert or a dashboard may ask about exists from start-up, at 0,
//! on standbys too ([`Metrics::register_config`]): `increase()` sees the first event, and a
//! missing series means a relay that is not scraped, not one that is idle. LSN gauges carry
//! their unit (`_lsn_bytes`: a byte position in the WAL).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
    pub build_date: String,
}

/// Every role, for the `role` gauge's label set.
const ROLES: [Role; 3] = [Role::Connecting, Role::Standby, Role::Streaming];

/// Every metric the relay exports.
pub struct Metrics {
    pub registry: Registry,
    role: AtomicU8,
    roles: Family<RoleLabels, Gauge>,
    build_info: Family<BuildLabels, Gauge>,
    /// Per sink, the commit time (µs since the epoch) of the oldest event handed to it and not
    /// yet acknowledged, 0 for none: turned into an age when scraped.
    oldest_unacked: Mutex<BTreeMap<String, i64>>,
    oldest_unacked_age: Family<SinkLabels, Gauge<f64, AtomicU64>>,
    sink_up: Family<SinkLabels, Gauge>,
    /// The sinks whose latest recovery or delivery failed, for `/readyz`.
    failing_sinks: Mutex<BTreeMap<String, bool>>,
    pub events_published: Family<SinkTableLabels, Counter>,
    pub publish_latency: Family<SinkLabels, Histogram>,
    pub dead_letters: Family<SinkLabels, Counter>,
    pub sink_checkpoint_lsn: Family<SinkLabels, Gauge>,
    pub in_flight_events: Family<SinkLabels, Gauge>,
    pub in_flight_bytes: Family<SinkLabels, Gauge>,
    pub sink_retries: Family<SinkLabels, Counter>,
    pub events_skipped: Family<SinkLabels, Counter>,
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
        let metrics = Metrics {
            role: AtomicU8::new(Role::Connecting as u8),
            roles: register(
                &mut registry,
                "role",
                "1 for what the relay is doing (connecting, standby, streaming), 0 for the others",
                Family::<RoleLabels, Gauge>::default(),
            ),
            build_info: register(
                &mut registry,
                "build_info",
                "1, labelled with the relay's version, git commit and build date",
                Family::<BuildLabels, Gauge>::default(),
            ),
            oldest_unacked: Mutex::new(BTreeMap::new()),
            failing_sinks: Mutex::new(BTreeMap::new()),
            oldest_unacked_age: register(
                &mut registry,
                "oldest_unacked_event_age_seconds",
                "Age (since its commit) of the oldest event handed to the sink and not yet acknowledged; 0 when none",
                Family::<SinkLabels, Gauge<f64, AtomicU64>>::default(),
            ),
            sink_up: register(
                &mut registry,
                "sink_up",
                "1 once the sink recovered and while its deliveries succeed; 0 before, and while they fail",
                Family::<SinkLabels, Gauge>::default(),
            ),
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
                "sink_checkpoint_lsn_bytes",
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
            events_skipped: register(
                &mut registry,
                "events_skipped",
                "Events read again after a restart that the sink already held (skipped)",
                Family::<SinkLabels, Counter>::default(),
            ),
            received_lsn: register(
                &mut registry,
                "received_lsn_bytes",
                "Server WAL position last seen on the replication connection",
                Gauge::default(),
            ),
            confirmed_lsn: register(
                &mut registry,
                "confirmed_lsn_bytes",
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
        };
        metrics.set_role(Role::Connecting);
        let _ = metrics.reconnects.get_or_create(&ComponentLabels {
            component: "replication".into(),
        });
        let _ = metrics.dead_letters.get_or_create(&Metrics::sink(""));
        metrics
    }

    /// Creates, at 0, the series of every configured sink and of every (sink, source) pair,
    /// `sources` being what events' `table` is: `schema.table` as the catalog holds it, or
    /// `message:<prefix>`.
    pub fn register_config(&self, sinks: &[String], sources: &[String]) {
        for sink in sinks {
            let labels = Metrics::sink(sink);
            let _ = self.dead_letters.get_or_create(&labels);
            let _ = self.sink_retries.get_or_create(&labels);
            let _ = self.sink_checkpoint_lsn.get_or_create(&labels);
            let _ = self.in_flight_events.get_or_create(&labels);
            let _ = self.in_flight_bytes.get_or_create(&labels);
            let _ = self.publish_latency.get_or_create(&labels);
            let _ = self.sink_up.get_or_create(&labels);
            self.set_oldest_unacked(sink, None);
            for source in sources {
                let _ = self.events_published.get_or_create(&SinkTableLabels {
                    sink: sink.clone(),
                    table: source.clone(),
                });
            }
        }
    }

    pub fn set_build_info(&self, version: &str, commit: &str, build_date: &str) {
        self.build_info
            .get_or_create(&BuildLabels {
                version: version.to_owned(),
                commit: commit.to_owned(),
                build_date: build_date.to_owned(),
            })
            .set(1);
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
        for each in ROLES {
            self.roles
                .get_or_create(&RoleLabels {
                    role: each.name().to_owned(),
                })
                .set(i64::from(each == role));
        }
    }

    /// Whether `sink` recovered, or delivered its latest batch (up), or failed to (down).
    pub fn set_sink_up(&self, sink: &str, up: bool) {
        self.sink_up
            .get_or_create(&Metrics::sink(sink))
            .set(i64::from(up));
        if let Ok(mut failing) = self.failing_sinks.lock() {
            failing.insert(sink.to_owned(), !up);
        }
    }

    /// The sinks whose latest recovery or delivery failed.
    pub fn failing_sinks(&self) -> Vec<String> {
        self.failing_sinks.lock().map_or_else(
            |_| Vec::new(),
            |failing| {
                failing
                    .iter()
                    .filter(|(_, failing)| **failing)
                    .map(|(sink, _)| sink.clone())
                    .collect()
            },
        )
    }

    /// Records the commit time (µs since the epoch) of the oldest event `sink` has not
    /// acknowledged yet; None when it holds none.
    pub fn set_oldest_unacked(&self, sink: &str, commit_time_micros: Option<i64>) {
        if let Ok(mut oldest) = self.oldest_unacked.lock() {
            oldest.insert(sink.to_owned(), commit_time_micros.unwrap_or(0));
        }
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        if let Ok(oldest) = self.oldest_unacked.lock() {
            for (sink, &micros) in oldest.iter() {
                let age = if micros > 0 {
                    now.saturating_sub(micros).max(0) as f64 / 1e6
                } else {
                    0.0
                };
                self.oldest_unacked_age
                    .get_or_create(&Metrics::sink(sink))
                    .set(age);
            }
        }
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
