//! The Kafka sink against Apache Kafka 4.4, a single-node KRaft broker per test with topic
//! auto-creation off (tests/common/kafka.rs; scripts/install-test-deps.sh fetches its jars).
//! Consumers read with `read_committed`, as a downstream service does, unless a test says
//! otherwise. What each test checks:
//! - per-key order over many keys and partitions, with the headers;
//! - kill -9 during transactions: a read_committed consumer gets every event exactly once,
//!   in per-key order, the relay resuming from the checkpoint committed in Kafka; a
//!   read_uncommitted one also sees the copies of the transactions the kills aborted;
//! - fencing: a second producer with the same transactional id stops the first;
//! - a relay frozen (SIGSTOP) past its `transaction.timeout.ms`: the broker aborts the open
//!   transaction, and once thawed the relay recovers; nothing lost or repeated;
//! - the broker killed and restarted mid-stream: nothing lost or repeated, order kept;
//! - a missing topic with `create_topics = false`: `check` names it, `run` says how to fix
//!   it, and delivers once it exists;
//! - the broker paused (SIGSTOP) for 30 s mid-stream, then resumed: nothing lost, order kept;
//! - an oversized record is dead-lettered and the stream goes on;
//! - at-least-once mode (no transactions) delivers everything in per-key order;
//! - a NULL payload under `on_null_payload = "tombstone"` is a record with the event's key
//!   and a null value, in order with its neighbours;
//! - a `bytea` payload with the `raw` format is the record's value, byte for byte;
//! - TLS with certificate verification, SASL/PLAIN and SASL/SCRAM logins with the password
//!   from a file, and the refusals `check` and `run` name.

mod common;

use common::certs::{make_ca, make_server_cert};
use common::kafka::{consume, consume_all, consume_all_uncommitted, consume_raw, Broker, Record};
use common::*;
use outbox_relay_sinks::kafka::{KafkaSettings, KafkaSink};
use outbox_relay_sinks::routing::Template;
use outbox_relay_sinks::test_util::sample;
use outbox_relay_sinks::{EventState, Lsn, Position, Sink, SinkError};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A `[sinks.kafka]` table on `broker` whose requests time out after `timeout`, with more
/// keys (or tables after it) in `extra`.
fn kafka_sink(broker: &Broker, timeout: &str, extra: &str) -> String {
    format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\n\
         partitions = 4\ntimeout = \"{timeout}\"\n{extra}\n",
        broker.address()
    )
}

/// A scenario whose relay (batches of 50) has one Kafka sink: see [`kafka_sink`].
fn kafka_relay(broker: &Broker, timeout: &str, extra: &str) -> ScenarioBuilder {
    scenario()
        .relay("batch_size = 50")
        .sinks(&kafka_sink(broker, timeout, extra))
}

/// For each key, the seqs of the last copy of every event, in consumption order.
fn last_copies_by_key(records: &[Record]) -> BTreeMap<String, Vec<u64>> {
    let last_index: HashMap<&str, usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        if last_index[record.id.as_str()] == i {
            by_key
                .entry(record.key.clone())
                .or_default()
                .push(record.seq);
        }
    }
    by_key
}

/// Inserts `txs` transactions of 5 rows over `keys` keys, seq per key counting from `first`.
fn write(pg: &PgCluster, keys: usize, txs: usize) {
    let mut next: Vec<usize> = vec![0; keys];
    for tx in 0..txs {
        let mut sql = String::from("BEGIN;");
        for row in 0..5 {
            let key = (tx * 5 + row) % keys;
            sql.push_str(&format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'k{key}', 'Seq', '{{\"seq\": {}}}');",
                next[key]
            ));
            next[key] += 1;
        }
        sql.push_str("COMMIT;");
        pg.psql(&sql);
    }
}

#[test]
fn per_key_order_over_many_keys_and_partitions_with_headers() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(&broker, "10s", "binary = true").start();
    write(&pg, 10, 60);
    let records = consume(&broker, "outbox.event.order", 300);
    assert_eq!(records.len(), 300, "relay log:\n{}", relay.log());
    for (key, seqs) in last_copies_by_key(&records) {
        assert_eq!(seqs, (0..30).collect::<Vec<_>>(), "order of {key}");
    }
    let headers = &records[0].headers;
    assert_eq!(
        headers.get("ce_specversion").map(String::as_str),
        Some("1.0")
    );
    assert_eq!(headers.get("ce_type").map(String::as_str), Some("Seq"));
    assert_eq!(headers.get("ce_subject"), Some(&records[0].key));
    assert_eq!(headers.get("type").map(String::as_str), Some("Seq"));
    assert!(
        records.iter().all(|r| r.id.len() == 36),
        "every record carries its event id"
    );
}

#[test]
fn kill_9_during_transactions_loses_nothing_and_resumes_from_the_kafka_checkpoint() {
    let broker = Broker::start();
    let Scenario { pg, config, .. } = kafka_relay(&broker, "10s", "").init();
    let total_txs = 200;
    let writer = spawn_writer(&pg, total_txs);
    for kill in 0..3 {
        let mut relay = Relay::start(&config);
        assert!(
            wait_until(WAIT, || relay
                .log()
                .contains("recovered the checkpoint committed in Kafka")),
            "kill {kill}: {}",
            relay.log()
        );
        let before = consume_count(&broker);
        assert!(
            wait_until(WAIT, || consume_count(&broker) > before + 20
                || writer.is_finished()),
            "{}",
            relay.log()
        );
        relay.kill9();
    }
    writer.join().unwrap();
    let relay = Relay::start(&config);
    let expected = total_txs * 5;
    assert!(
        wait_until(WAIT, || {
            let records = consume_all(&broker, "outbox.event.order");
            last_copies_by_key(&records)
                .values()
                .map(Vec::len)
                .sum::<usize>()
                >= expected
        }),
        "relay log:\n{}",
        relay.log()
    );
    assert_exactly_once_in_order(&consume_all(&broker, "outbox.event.order"), expected, 4);
    // The kills interrupted open transactions: their records are in the log, aborted.
    let uncommitted = consume_all_uncommitted(&broker, "outbox.event.order");
    eprintln!(
        "read_uncommitted: {} records, {} of them aborted copies",
        uncommitted.len(),
        uncommitted.len() - expected
    );
    assert!(uncommitted.len() >= expected);
}

/// A thread writing `txs` transactions of 5 rows over keys k0..k3, seq per key from 0.
fn spawn_writer(pg: &PgCluster, txs: usize) -> std::thread::JoinHandle<usize> {
    spawn_writer_while(pg, move |tx| tx < txs)
}

/// A thread writing transactions of 5 rows over keys k0..k3, seq per key from 0, while
/// `go(transactions written)`; it returns how many it wrote.
fn spawn_writer_while(
    pg: &PgCluster,
    go: impl Fn(usize) -> bool + Send + 'static,
) -> std::thread::JoinHandle<usize> {
    let url = pg.url();
    std::thread::spawn(move || {
        let mut client = postgres_client(&url);
        let mut tx = 0;
        while go(tx) {
            let mut sql = String::from("BEGIN;");
            for row in 0..5 {
                let n = tx * 5 + row;
                sql.push_str(&format!(
                    "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'k{}', 'Seq', '{{\"seq\": {}}}');",
                    n % 4,
                    n / 4
                ));
            }
            sql.push_str("COMMIT;");
            client.batch(&sql);
            tx += 1;
        }
        tx
    })
}

/// A writer of 5-row transactions (see [`spawn_writer_while`]) that waits `pause` after each,
/// until stopped.
struct PacedWriter {
    writing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl PacedWriter {
    fn start(pg: &PgCluster, pause: Duration) -> PacedWriter {
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let go = writing.clone();
        let thread = spawn_writer_while(pg, move |_| {
            std::thread::sleep(pause);
            go.load(std::sync::atomic::Ordering::Relaxed)
        });
        PacedWriter { writing, thread }
    }

    /// Stops writing; returns how many transactions were written.
    fn stop(self) -> usize {
        self.writing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Waits until a read_committed consumer has every one of `expected` events.
fn wait_for_all(broker: &Broker, expected: usize, relay: &Relay) -> Vec<Record> {
    let mut records = Vec::new();
    let complete = wait_until(WAIT, || {
        records = consume_all(broker, "outbox.event.order");
        records
            .iter()
            .map(|r| r.id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
            >= expected
    });
    assert!(
        complete,
        "relay log:\n{}\nbroker log:\n{}",
        relay.log(),
        broker.log()
    );
    records
}

/// Guarantee: a Kafka sink that upcasts (`upcast = { to = "latest" }`) publishes each event
/// at the later version, with the published version as `schema_version` and the stored one
/// as `original_schema_version` (and as `ce_schemaversion` / `ce_originalschemaversion` in
/// binary mode), same ids, every key in order.
#[test]
fn an_upcasting_sink_publishes_the_later_version_with_both_versions_in_headers() {
    let broker = Broker::start();
    let upcaster = "[upcast.Seq.1]\nto = 2\nprogram = '. + {upcast: true}'\n";
    let sink = kafka_sink(
        &broker,
        "10s",
        "binary = true\nupcast = { to = \"latest\" }",
    );
    let (Scenario { pg, .. }, relay) = scenario()
        .relay("batch_size = 50")
        .sql("ALTER TABLE outbox ADD COLUMN schema_version int")
        .sinks(&format!("{upcaster}{sink}"))
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) \
         SELECT 'order', 'k' || (n % 3), 'Seq', jsonb_build_object('seq', n / 3), 1 \
         FROM generate_series(0, 29) n",
    );
    let records = consume(&broker, "outbox.event.order", 30);
    assert_eq!(records.len(), 30, "relay log:\n{}", relay.log());
    for record in &records {
        let header = |name: &str| record.headers.get(name).map(String::as_str);
        assert_eq!(header("schema_version"), Some("2"), "{:?}", record.headers);
        assert_eq!(header("original_schema_version"), Some("1"));
        assert_eq!(header("ce_schemaversion"), Some("2"));
        assert_eq!(header("ce_originalschemaversion"), Some("1"));
    }
    for (key, seqs) in last_copies_by_key(&records) {
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "order of {key}");
    }
}

/// A relay frozen (SIGSTOP) inside a transaction for longer than its
/// `transaction.timeout.ms`: the broker aborts that transaction and bumps the producer's
/// epoch. Thawed, the relay finds its transaction gone, starts over from the checkpoint
/// committed in Kafka, and a read_committed consumer gets every event once, in order.
#[test]
fn a_relay_frozen_past_its_transaction_timeout_recovers_and_repeats_nothing() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, mut relay) = kafka_relay(
        &broker,
        "3s",
        "[sinks.kafka.properties]\n\"transaction.timeout.ms\" = \"5000\"",
    )
    .start();
    // About 500 events a second: the relay is mostly inside a transaction.
    let writer = PacedWriter::start(&pg, Duration::from_millis(10));
    // Freeze the relay until it is caught inside a transaction: records in the log that
    // a read_committed consumer does not see yet.
    let pid = relay.child.id().to_string();
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap()
    };
    let mut frozen_in_a_transaction = false;
    for _ in 0..20 {
        assert!(!consume(&broker, "outbox.event.order", 1).is_empty());
        signal("-STOP");
        let committed = consume_all(&broker, "outbox.event.order").len();
        if consume_all_uncommitted(&broker, "outbox.event.order").len() > committed {
            frozen_in_a_transaction = true;
            break;
        }
        signal("-CONT");
    }
    assert!(frozen_in_a_transaction, "{}", relay.log());
    // The freeze lasts past the timeout (5 s) and the broker's check for it (every second),
    // whatever the relay does.
    std::thread::sleep(Duration::from_secs(8));
    signal("-CONT");
    let expected = writer.stop() * 5;
    let records = wait_for_all(&broker, expected, &relay);
    assert_exactly_once_in_order(&records, expected, 4);
    assert!(relay.child.try_wait().unwrap().is_none(), "{}", relay.log());
}

/// The broker stopped (SIGTERM) and restarted mid-stream: the relay retries until it is
/// back; a read_committed consumer gets every event once, in order.
#[test]
fn a_broker_restarted_mid_stream_loses_and_repeats_nothing() {
    let mut broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(&broker, "5s", "").start();
    // About 1,000 events a second, through the restart.
    let writer = PacedWriter::start(&pg, Duration::from_millis(5));
    assert_eq!(
        consume(&broker, "outbox.event.order", 100).len(),
        100,
        "{}",
        relay.log()
    );
    broker.restart();
    let expected = writer.stop() * 5;
    let records = wait_for_all(&broker, expected, &relay);
    assert_exactly_once_in_order(&records, expected, 4);
}

/// A cluster of three nodes, every partition on all three, whose transaction coordinator
/// is killed (SIGKILL) mid-stream: the other two take over its partitions and the relay
/// goes on; the node comes back. A read_committed consumer gets every event once, in order.
/// (A single broker killed so can complete the open transaction without its markers on
/// restart: RELIABILITY.md.)
#[test]
fn a_cluster_node_killed_mid_stream_loses_and_repeats_nothing() {
    let mut nodes = Broker::cluster(3);
    let brokers: Vec<String> = nodes.iter().map(Broker::address).collect();
    let sink = format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\n\
         partitions = 4\nreplication_factor = 3\ntimeout = \"10s\"\n",
        brokers.join(",")
    );
    let (Scenario { pg, .. }, relay) = scenario().relay("batch_size = 50").sinks(&sink).start();
    // About 1,000 events a second, through the kill and the return.
    let writer = PacedWriter::start(&pg, Duration::from_millis(5));
    let topic = "outbox.event.order";
    assert_eq!(consume(&nodes[0], topic, 100).len(), 100, "{}", relay.log());
    let coordinator = nodes[0].leader_of("__transaction_state", 0);
    let victim = nodes.iter().position(|n| n.node == coordinator).unwrap();
    let survivor = (victim + 1) % nodes.len();
    let written: usize = pg.psql("SELECT count(*) FROM outbox").parse().unwrap();
    nodes[victim].kill();
    // Events written after the kill arrive while the node is down.
    assert!(
        consume(&nodes[survivor], topic, written + 1000).len() >= written + 1000,
        "the relay made no progress on two nodes:\n{}",
        relay.log()
    );
    nodes[victim].start_again();
    let expected = writer.stop() * 5;
    let records = wait_for_all(&nodes[survivor], expected, &relay);
    assert_exactly_once_in_order(&records, expected, 4);
}

/// A topic that does not exist, with `create_topics = false` (and a broker that creates no
/// topic by itself): the relay retries, saying which topic is missing and what to do, and
/// delivers once the topic is there.
#[test]
fn a_missing_topic_without_create_topics_is_named_and_waited_for() {
    let broker = Broker::start();
    let sink = format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ntimeout = \"2s\"\n",
        broker.address()
    );
    let (Scenario { pg, .. }, relay) = scenario().sinks(&sink).start();
    write(&pg, 2, 2);
    assert!(
        wait_until(WAIT, || relay.log().contains("outbox.event.order")
            && relay.log().contains("create_topics")),
        "{}",
        relay.log()
    );
    create_topic(&broker, "outbox.event.order", 2);
    let records = consume(&broker, "outbox.event.order", 10);
    assert_eq!(records.len(), 10, "{}", relay.log());
}

/// Creates `topic` with `partitions` partitions.
fn create_topic(broker: &Broker, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .create()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = runtime
        .block_on(admin.create_topics(
            [&NewTopic::new(
                topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        ))
        .unwrap();
    assert!(created.iter().all(Result::is_ok), "{created:?}");
}

/// Every one of `expected` events exactly once (no copies), and each of `keys` keys' seqs
/// counting up from 0 in consumption order.
fn assert_exactly_once_in_order(records: &[Record], expected: usize, keys: usize) {
    let ids: std::collections::HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), expected, "events received");
    assert_eq!(records.len(), expected, "records received: repeats");
    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for record in records {
        by_key.entry(&record.key).or_default().push(record.seq);
    }
    assert_eq!(by_key.len(), keys);
    for (key, seqs) in by_key {
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "order of {key}"
        );
    }
}

/// A Kafka checkpoint kept while the database behind it is re-created: it lies beyond the new
/// database's WAL, and the sink would skip the new database's events up to it. The relay stops
/// and names the sink instead.
#[test]
fn a_kafka_checkpoint_from_a_recreated_database_stops_the_relay() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let rows = |n: usize| {
        format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'k' || (i % 10), 'Seq', jsonb_build_object('seq', i) \
             FROM generate_series(1, {n}) i"
        )
    };
    {
        let old = PgCluster::start();
        old.create_outbox("public.outbox");
        let config = ConfigFile::new()
            .relay("batch_size = 50")
            .sinks(&kafka_sink(&broker, "10s", ""))
            .write(dir.path(), &old);
        init(&config);
        let mut relay = Relay::start(&config);
        old.psql(&rows(2000));
        let records = consume(&broker, "outbox.event.order", 2000);
        assert_eq!(records.len(), 2000, "relay log:\n{}", relay.log());
        assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    }

    let new = PgCluster::start();
    new.create_outbox("public.outbox");
    let config = ConfigFile::new()
        .relay("batch_size = 50")
        .sinks(&kafka_sink(&broker, "10s", ""))
        .write(dir.path(), &new);
    init(&config);
    new.psql(&rows(5));
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(
        WAIT,
        "Kafka's checkpoint lies beyond the new database's WAL",
    );
    assert!(
        log.contains("sink kafka: its destination already holds events up to position")
            && log.contains("a new transactional_id"),
        "{log}"
    );
}

fn consume_count(broker: &Broker) -> usize {
    consume_all(broker, "outbox.event.order").len()
}

/// A synchronous SQL client for writer threads.
struct SyncClient {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl SyncClient {
    fn batch(&mut self, sql: &str) {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .unwrap();
    }
}

fn postgres_client(url: &str) -> SyncClient {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    });
    SyncClient { runtime, client }
}

fn settings(broker: &Broker, transactional_id: &str, topic: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: broker.address(),
        topic: Template::parse(topic).unwrap(),
        format: Default::default(),
        binary: false,
        exactly_once: true,
        transactional_id: transactional_id.into(),
        checkpoint_topic: format!("{topic}.checkpoints"),
        create_topics: Some((2, 1)),
        message_max_bytes: 1_000_000,
        timeout: Duration::from_secs(10),
        properties: BTreeMap::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_with_the_same_identity_fences_the_first() {
    let broker = Broker::start();
    let mut first = KafkaSink::new(settings(&broker, "fencing-test", "fenced"));
    assert_eq!(first.recover().await.unwrap(), None);
    first
        .send(&[sample(100, 0)], &mut [EventState::Pending])
        .await
        .unwrap();

    let mut second = KafkaSink::new(settings(&broker, "fencing-test", "fenced"));
    assert_eq!(
        second.recover().await.unwrap(),
        Some(Position {
            commit_lsn: Lsn(100),
            index: 0
        }),
        "the checkpoint rides in the transaction"
    );
    match first
        .send(&[sample(200, 0)], &mut [EventState::Pending])
        .await
    {
        Err(SinkError::Permanent(reason)) => assert!(reason.contains("fenced"), "{reason}"),
        other => panic!("the first producer must be fenced, got {other:?}"),
    }
    second
        .send(&[sample(200, 0)], &mut [EventState::Pending])
        .await
        .unwrap();
    let mut third = KafkaSink::new(settings(&broker, "fencing-test", "fenced"));
    assert_eq!(
        third.recover().await.unwrap(),
        Some(Position {
            commit_lsn: Lsn(200),
            index: 0
        })
    );
}

/// The broker paused (SIGSTOP) for 30 s mid-stream: the relay retries, reports itself not
/// ready (`/readyz` 503 naming the failing sink) until a delivery succeeds again, and loses
/// nothing.
#[test]
fn a_broker_paused_for_30_seconds_delays_but_loses_nothing() {
    let broker = Broker::start();
    let port = free_port();
    let (Scenario { pg, .. }, relay) = scenario()
        .relay("batch_size = 50")
        .sinks(&format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n\n{}",
            kafka_sink(&broker, "2s", "")
        ))
        .start();
    let readiness = || http_get(port, "/readyz");
    write(&pg, 4, 10);
    assert_eq!(
        consume(&broker, "outbox.event.order", 50).len(),
        50,
        "{}",
        relay.log()
    );
    broker.signal("-STOP");
    let stopped = std::time::Instant::now();
    write(&pg, 4, 10);
    let retried = wait_until(WAIT, || {
        relay.log().contains("sink failed; retrying the batch")
    });
    let not_ready = readiness();
    // The outage lasts 30 s whatever the relay does.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    broker.signal("-CONT");
    assert!(
        retried,
        "the relay should have retried while the broker was paused:\n{}",
        relay.log()
    );
    assert_eq!(
        not_ready,
        Some((503, "streaming; failing sinks: kafka\n".into())),
        "{}",
        relay.log()
    );
    assert!(
        wait_until(WAIT, || last_copies_by_key(&consume_all(
            &broker,
            "outbox.event.order"
        ))
        .values()
        .map(Vec::len)
        .sum::<usize>()
            >= 100),
        "{}",
        relay.log()
    );
    assert!(wait_until(WAIT, || readiness() == Some((200, "streaming\n".into()))));
    // Each write numbers its rows per key from 0: 13 rows for k0 and k1, 12 for k2 and k3.
    for (key, seqs) in last_copies_by_key(&consume_all(&broker, "outbox.event.order")) {
        let per_write = if key == "k0" || key == "k1" { 13 } else { 12 };
        let expected: Vec<u64> = (0..per_write).chain(0..per_write).collect();
        assert_eq!(seqs, expected, "nothing lost, order of {key}");
    }
}

/// SIGTERM while the broker does not answer: the relay exits once `relay.shutdown_timeout`
/// (5 s) is over, instead of waiting out the sink's `timeout` in the librdkafka calls that
/// run on blocking threads and cannot be cancelled (the batch's flush, the transaction's
/// checkpoint).
#[test]
fn sigterm_while_the_broker_is_paused_exits_after_the_shutdown_timeout() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, mut relay) = kafka_relay(&broker, "120s", "").start();
    write(&pg, 2, 5);
    assert_eq!(
        consume(&broker, "outbox.event.order", 10).len(),
        10,
        "{}",
        relay.log()
    );
    broker.signal("-STOP");
    write(&pg, 2, 5);
    let written = pg.psql("SELECT pg_current_wal_lsn()");
    assert!(
        wait_until(WAIT, || pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_replication WHERE sent_lsn >= '{written}'"
        )) == "1"),
        "the relay never received the second write:\n{}",
        relay.log()
    );
    let terminated = std::time::Instant::now();
    let status = relay.terminate(Duration::from_secs(60));
    let took = terminated.elapsed();
    broker.signal("-CONT");
    assert!(
        status.is_some(),
        "the relay did not exit within 60 s of SIGTERM:\n{}",
        relay.log()
    );
    assert!(
        took < Duration::from_secs(20),
        "the relay took {took:?} to exit:\n{}",
        relay.log()
    );
}

#[test]
fn an_oversized_record_is_dead_lettered_and_the_stream_goes_on() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(
        &broker,
        "10s",
        "message_max_bytes = 10000\nformat = \"raw\"",
    )
    .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'k', 'Seq', '{\"seq\": 0}'), \
         ('order', 'k', 'Seq', jsonb_build_object('seq', 1, 'pad', repeat('x', 20000))), \
         ('order', 'k', 'Seq', '{\"seq\": 2}')",
    );
    let records = consume(&broker, "outbox.event.order", 2);
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 2],
        "{}",
        relay.log()
    );
    assert!(wait_until(WAIT, || dead_letters(&pg, "reason").len() == 1));
    let reason = pg.psql("SELECT sink || ': ' || reason FROM outbox_relay.dead_letters");
    assert!(
        reason.starts_with("kafka: Kafka record of") && reason.contains("message.max.bytes"),
        "{reason}"
    );
}

#[test]
fn a_null_payload_under_the_tombstone_policy_is_a_record_with_a_null_value_in_order() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(
        &broker,
        "10s",
        "[outbox.\"public.outbox\"]\non_null_payload = \"tombstone\"",
    )
    .sql("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
    .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'k', 'Seq', '{\"seq\": 0}'), \
         ('order', 'k', 'Deleted', NULL), \
         ('order', 'k', 'Seq', '{\"seq\": 2}')",
    );
    let records = consume_raw(&broker, "outbox.event.order", 3);
    assert_eq!(records.len(), 3, "relay log:\n{}", relay.log());
    let values: Vec<Option<serde_json::Value>> = records
        .iter()
        .map(|r| r.value.as_ref().map(|v| serde_json::from_slice(v).unwrap()))
        .collect();
    assert_eq!(values[0].as_ref().unwrap()["data"]["seq"], 0);
    assert_eq!(values[1], None, "the tombstone's value is null");
    assert_eq!(values[2].as_ref().unwrap()["data"]["seq"], 2);
    assert!(records.iter().all(|r| r.key == "k"));
    let tombstone = &records[1].headers;
    assert_eq!(tombstone.get("type").map(String::as_str), Some("Deleted"));
    assert_eq!(tombstone.get("id").map(String::len), Some(36));
    assert_eq!(dead_letters(&pg, "reason").len(), 0);
}

#[test]
fn a_bytea_payload_is_the_raw_record_value_byte_for_byte() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(&broker, "10s", "format = \"raw\"")
        .outbox_sql(
            "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
             aggregateid text NOT NULL, type text NOT NULL, payload bytea NOT NULL)",
        )
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'k', 'Avro', '\\x00ff0a0d7b22c3'), ('order', 'k', 'Avro', '\\x')",
    );
    let records = consume_raw(&broker, "outbox.event.order", 2);
    assert_eq!(records.len(), 2, "relay log:\n{}", relay.log());
    assert_eq!(
        records[0].value.as_deref(),
        Some(&[0x00, 0xff, 0x0a, 0x0d, 0x7b, 0x22, 0xc3][..])
    );
    assert_eq!(records[1].value.as_deref(), Some(&[][..]));
}

#[test]
fn at_least_once_mode_delivers_everything_in_per_key_order() {
    let broker = Broker::start();
    let (Scenario { pg, .. }, relay) = kafka_relay(
        &broker,
        "10s",
        "exactly_once = false\nformat = \"debezium\"",
    )
    .start();
    write(&pg, 5, 20);
    let records = consume(&broker, "outbox.event.order", 100);
    assert_eq!(records.len(), 100, "{}", relay.log());
    for (key, seqs) in last_copies_by_key(&records) {
        assert_eq!(seqs, (0..20).collect::<Vec<_>>(), "order of {key}");
    }
    // Debezium's outbox router: key = aggregate id, header id = event id, value = payload.
    assert!(records
        .iter()
        .all(|r| r.key.starts_with('k') && r.headers.len() == 1 && r.id.len() == 36));
}

/// config/kafka.toml works as documented, with the database URL and the brokers from the
/// environment.
#[test]
fn the_example_config_works() {
    let broker = Broker::start();
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "kafka.toml");
    let (url, brokers) = (pg.url(), broker.address());
    let env = [
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("OUTBOX_RELAY__SINKS__KAFKA__BROKERS", brokers.as_str()),
    ];
    let out = relay_command_with_env(&config, "init", &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = Relay::start_with_env(&config, &env);
    write(&pg, 2, 2);
    let records = consume(&broker, "outbox.event.order", 10);
    assert_eq!(records.len(), 10, "{}", relay.log());
    assert_eq!(
        records[0].headers.get("type").map(String::as_str),
        Some("Seq")
    );
}

/// A broker that is down: `check` says so; a relay started meanwhile keeps retrying instead
/// of exiting, and delivers once the broker is up.
#[test]
fn a_broker_down_at_start_is_reported_by_check_and_waited_for_by_run() {
    let port = free_port();
    let Scenario { pg, config, .. } = scenario().sinks(&format!(
            "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:{port}\"\ncreate_topics = true\ntimeout = \"2s\"\n"
        )).init();
    let (passed, text) = relay_check(&config);
    assert!(!passed, "{text}");
    assert!(
        text.contains(&format!(
            "sink kafka: cannot reach Kafka at 127.0.0.1:{port}"
        )),
        "{text}"
    );
    let mut relay = Relay::start(&config);
    assert!(
        wait_until(Duration::from_secs(30), || relay
            .log()
            .contains("replication session ended; reconnecting")),
        "{}",
        relay.log()
    );
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay exited:\n{}",
        relay.log()
    );
    let broker = Broker::start_on(port);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
    write(&pg, 2, 2);
    let records = consume(&broker, "outbox.event.order", 10);
    assert_eq!(records.len(), 10, "{}", relay.log());
}

/// `check` fails naming each of `reasons`, and `run` stops instead of retrying, with
/// `advice` in its log. Returns `check`'s output and `run`'s log.
fn assert_refused(config: &Path, reasons: &[&str], advice: &str) -> (String, String) {
    let (passed, text) = relay_check(config);
    assert!(!passed, "{text}");
    for reason in reasons {
        assert!(text.contains(reason), "missing {reason:?}:\n{text}");
    }
    let mut relay = Relay::start(config);
    let status = relay.wait(WAIT).expect("run should stop, not retry");
    assert!(!status.success());
    assert!(relay.log().contains(advice), "{}", relay.log());
    (text, relay.log())
}

/// A Kafka sink logging in over SASL as `relay` with `mechanism`, the password from
/// `password_file`.
/// Where [`sasl_relay`] writes the Kafka password, in the relay's directory.
const PASSWORD_FILE: &str = "kafka-password";

/// An initialised relay whose Kafka sink logs in with `mechanism` as `relay` and the
/// password from a file: the cluster, the relay's directory and its config.
fn sasl_relay(
    broker: &Broker,
    mechanism: &str,
    password: &str,
) -> (PgCluster, tempfile::TempDir, PathBuf) {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join(PASSWORD_FILE);
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let config = ConfigFile::new()
        .sinks(&sasl_sink(broker, mechanism, &password_file))
        .write(dir.path(), &pg);
    init(&config);
    (pg, dir, config)
}

fn sasl_sink(broker: &Broker, mechanism: &str, password_file: &Path) -> String {
    format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\ntimeout = \"5s\"\n\
         sasl_password_file = \"{}\"\n[sinks.kafka.properties]\n\
         \"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"{mechanism}\"\n\
         \"sasl.username\" = \"relay\"\n",
        broker.address(),
        password_file.display()
    )
}

/// Security: the Kafka sink over TLS verifies the broker's certificate (from a test CA);
/// `check` and `run` refuse another CA, naming the reason.
#[test]
fn tls_to_the_broker_verifies_its_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    let other_ca = make_ca(certs.path(), "other-ca");
    let server = make_server_cert(certs.path(), "broker", &ca, "01", "IP:127.0.0.1");
    let broker = Broker::start_with_tls(&ca.cert, &server);
    let sink = |ca: &Path| {
        format!(
            "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\ntimeout = \"10s\"\n\
             [sinks.kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
            broker.address(),
            ca.display()
        )
    };
    let Scenario {
        pg, dir, config, ..
    } = scenario().sinks(&sink(&other_ca.cert)).init();
    assert_refused(
        &config,
        &[
            "the broker refused the connection",
            "certificate verify failed",
            "check ssl.ca.location",
        ],
        "check ssl.ca.location",
    );

    let config = ConfigFile::new().sinks(&sink(&ca.cert)).write(&dir, &pg);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
    let relay = Relay::start(&config);
    write(&pg, 2, 2);
    let records = consume(&broker, "outbox.event.order", 10);
    assert_eq!(records.len(), 10, "{}", relay.log());
}

/// Security: a SASL/SCRAM-SHA-512 login with the password from `sasl_password_file`
/// delivers; once the file holds a wrong password, the refused login is named as such by
/// `check` and stops `run`, since retrying cannot fix it. The password appears in no output.
#[test]
fn sasl_scram_logs_in_with_the_password_file_and_a_refused_login_stops_run() {
    sasl_logs_in_and_a_refused_login_stops_run("SCRAM-SHA-512", "kafka-secret-31337");
}

/// Security: the same with SASL/PLAIN.
#[test]
fn sasl_plain_logs_in_with_the_password_file_and_a_refused_login_stops_run() {
    sasl_logs_in_and_a_refused_login_stops_run("PLAIN", "kafka-secret-27182");
}

fn sasl_logs_in_and_a_refused_login_stops_run(mechanism: &str, password: &str) {
    let broker = Broker::start_with_sasl("relay", password);
    let (pg, dir, config) = sasl_relay(&broker, mechanism, password);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
    let mut relay = Relay::start(&config);
    write(&pg, 2, 2);
    let records = consume(&broker, "outbox.event.order", 10);
    assert_eq!(records.len(), 10, "{}", relay.log());
    assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    assert!(!text.contains(password) && !relay.log().contains(password));

    let wrong = "not-the-password";
    std::fs::write(dir.path().join(PASSWORD_FILE), format!("{wrong}\n")).unwrap();
    write(&pg, 1, 1);
    let (text, log) = assert_refused(
        &config,
        &[
            "the broker refused the connection",
            "SASL authentication error",
            "check sasl.username",
        ],
        "check sasl.username",
    );
    for secret in [password, wrong] {
        assert!(!text.contains(secret) && !log.contains(secret));
    }
}
