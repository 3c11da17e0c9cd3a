//! The crash-loop checker: concurrent writers insert outbox rows with a sequence number per
//! key while the relay, publishing to seven sinks at once, is killed with SIGKILL at random
//! moments and restarted. Then an independent consumer per sink reads everything back and
//! counts lost, duplicated and reordered events.
//!
//! Short by default (it runs in CI); long on demand, with the report written as JSON:
//!   CRASH_LOOP_KILLS=50 CRASH_LOOP_EVENTS=100000 CRASH_LOOP_REPORT=crash-loop.json \
//!     cargo nextest run --test crash_loop --no-capture
//!
//! What is asserted, per sink:
//! - file (exactly-once): nothing lost, nothing repeated, every key in order.
//! - RabbitMQ stream (exactly-once by broker dedup): the same.
//! - Redis stream (exactly-once: an entry's id is the event's position, and Redis refuses
//!   one that is not above the stream's last): the same.
//! - NATS JetStream (exactly-once within the stream's duplicate window, which every restart
//!   here is inside: `Nats-Msg-Id` is the event id): the same.
//! - Kafka, transactional (Apache Kafka, tests/common/kafka.rs), read by a `read_committed`
//!   consumer: the same, since the relay resumes from the checkpoint committed in Kafka and
//!   the transactions a kill interrupted are aborted. A `read_uncommitted` consumer of the
//!   same topic shows those aborted copies: nothing lost, last copies in order, its repeats
//!   reported.
//! - RabbitMQ exchange (at-least-once): nothing lost; last copies in per-key order; repeats
//!   reported, each with its stable message id.
//! - HTTP webhook (at-least-once, an endpoint in the test answering 204): the same, each
//!   repeat with its `Idempotency-Key`.
//!
//! The AWS sinks have a loop of their own on moto, with fewer events and small batches,
//! since moto takes only a few hundred messages a second: EventBridge (at-least-once, read
//! through a rule into SQS), an SQS FIFO queue and an SNS FIFO topic (exactly-once within
//! the services' 5-minute deduplication interval, which every restart here is inside: the
//! deduplication id is the event id):
//!   CRASH_LOOP_AWS_KILLS=20 CRASH_LOOP_AWS_EVENTS=2000 \
//!     cargo nextest run --test crash_loop aws --no-capture
//! Asserted: nothing lost, last copies in per-key order; the FIFO destinations nothing
//! repeated and first copies in order; EventBridge's repeats reported.
//!
//! Key-sharded slots have a loop of their own: two shards' relays, each with a file sink and
//! a transactional Kafka sink into one topic, killed in turn at random. Asserted over both
//! shards' output: nothing lost, nothing repeated, every key in order, no key in both:
//!   CRASH_LOOP_SHARD_KILLS=20 CRASH_LOOP_SHARD_EVENTS=20000 \
//!     cargo nextest run --test crash_loop sharded --no-capture

mod common;

use common::aws::{eventbridge_sink, Aws, Moto, AWS_ENV};
use common::kafka::{consume_all, consume_all_uncommitted, Broker, Record};
use common::nats::Nats;
use common::rabbitmq::Vhost;
use common::redis::Redis;
use common::webhook::Hook;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 5;
/// Mean time between kills.
const MEAN_INTERVAL: Duration = Duration::from_millis(800);

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator: the seed is printed, so a run can be repeated.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One delivered copy of an event, as a consumer saw it.
struct Copy {
    id: String,
    key: String,
    seq: u64,
}

#[derive(Debug)]
struct SinkReport {
    sink: &'static str,
    delivered: usize,
    lost: usize,
    duplicated: usize,
    /// Keys whose first copies are not in sequence order.
    reordered_first_copies: usize,
    /// Keys whose last copies are not in sequence order.
    reordered_last_copies: usize,
}

fn analyse(sink: &'static str, copies: &[Copy], expected: &HashSet<String>) -> SinkReport {
    let distinct: HashSet<&str> = copies.iter().map(|c| c.id.as_str()).collect();
    let lost = expected
        .iter()
        .filter(|id| !distinct.contains(id.as_str()))
        .count();
    let first_index: HashMap<&str, usize> = copies
        .iter()
        .enumerate()
        .rev()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let last_index: HashMap<&str, usize> = copies
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let out_of_order = |chosen: &HashMap<&str, usize>| {
        let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (i, copy) in copies.iter().enumerate() {
            if chosen[copy.id.as_str()] == i {
                by_key.entry(&copy.key).or_default().push(copy.seq);
            }
        }
        by_key
            .values()
            .filter(|seqs| seqs.windows(2).any(|w| w[0] >= w[1]))
            .count()
    };
    SinkReport {
        sink,
        delivered: copies.len(),
        lost,
        duplicated: copies.len() - distinct.len(),
        reordered_first_copies: out_of_order(&first_index),
        reordered_last_copies: out_of_order(&last_index),
    }
}

fn envelope_copy(envelope: &Value) -> Copy {
    Copy {
        id: envelope["id"].as_str().unwrap().to_owned(),
        key: envelope["subject"].as_str().unwrap().to_owned(),
        seq: envelope["data"]["seq"].as_u64().unwrap(),
    }
}

/// Writes `events` rows, spread over the writers' keys, in transactions of 1 to 5 rows, at
/// about `rate` rows per second in all.
fn spawn_writers(
    pg: &PgCluster,
    events: usize,
    rate: f64,
    seed: u64,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..WRITERS)
        .map(|writer| {
            let url = pg.url();
            let share = events / WRITERS + usize::from(writer < events % WRITERS);
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let client = runtime.block_on(async {
                    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(connection);
                    client
                });
                let mut random =
                    XorShift(seed ^ (writer as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut next_seq = [0u64; KEYS_PER_WRITER];
                let started = Instant::now();
                let mut written = 0;
                while written < share {
                    let rows = (1 + random.next() % 5).min((share - written) as u64) as usize;
                    let mut sql = String::from("BEGIN;");
                    for _ in 0..rows {
                        let key = (random.next() % KEYS_PER_WRITER as u64) as usize;
                        sql.push_str(&format!(
                            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                             VALUES ('order', 'w{writer}-k{key}', 'Seq', '{{\"seq\": {}}}');",
                            next_seq[key]
                        ));
                        next_seq[key] += 1;
                    }
                    sql.push_str("COMMIT;");
                    runtime.block_on(client.batch_execute(&sql)).unwrap();
                    written += rows;
                    // Pace: this writer's share of the rate.
                    let due = Duration::from_secs_f64(written as f64 * WRITERS as f64 / rate);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
            })
        })
        .collect()
}

/// The seed: `CRASH_LOOP_SEED`, else the clock.
fn seed() -> u64 {
    std::env::var("CRASH_LOOP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

/// Writes `events` rows while killing one of the relays (one per config, chosen at random)
/// with SIGKILL `kills` times at random moments and restarting it; returns the relays that
/// run after the last kill.
fn write_while_killing(
    pg: &PgCluster,
    configs: &[&Path],
    env: &[(&str, &str)],
    events: usize,
    kills: usize,
    seed: u64,
) -> Vec<Relay> {
    let rate = events as f64 / (kills as f64 * MEAN_INTERVAL.as_secs_f64()).max(1.0);
    let writers = spawn_writers(pg, events, rate, seed);
    let mut random = XorShift(seed);
    let mut relays: Vec<Relay> = configs
        .iter()
        .map(|config| Relay::start_with_env(config, env))
        .collect();
    for _ in 0..kills {
        let pause = MEAN_INTERVAL.as_millis() as u64 / 4
            + random.next() % (MEAN_INTERVAL.as_millis() as u64 * 3 / 2);
        std::thread::sleep(Duration::from_millis(pause));
        let victim = (random.next() % configs.len() as u64) as usize;
        relays[victim].kill9();
        relays[victim] = Relay::start_with_env(configs[victim], env);
    }
    for writer in writers {
        writer.join().unwrap();
    }
    relays
}

/// Every committed row's id, from the table itself.
fn committed_ids(pg: &PgCluster, events: usize) -> HashSet<String> {
    let expected: HashSet<String> = pg
        .psql("SELECT id FROM outbox")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(expected.len(), events);
    expected
}

/// Prints the table, and writes it as JSON where the environment variable `report_var`
/// names a file.
fn report(reports: &[SinkReport], kills: usize, events: usize, seed: u64, report_var: &str) {
    eprintln!(
        "{:<30} {:>9} {:>5} {:>10} {:>16} {:>15}",
        "sink", "delivered", "lost", "duplicated", "reordered first", "reordered last"
    );
    for r in reports {
        eprintln!(
            "{:<30} {:>9} {:>5} {:>10} {:>16} {:>15}",
            r.sink,
            r.delivered,
            r.lost,
            r.duplicated,
            r.reordered_first_copies,
            r.reordered_last_copies
        );
    }
    if let Ok(path) = std::env::var(report_var) {
        let report = serde_json::json!({
            "kills": kills, "events": events, "writers": WRITERS,
            "keys": WRITERS * KEYS_PER_WRITER, "seed": seed,
            "sinks": reports.iter().map(|r| serde_json::json!({
                "sink": r.sink, "delivered": r.delivered, "lost": r.lost,
                "duplicated": r.duplicated, "reordered_first_copies": r.reordered_first_copies,
                "reordered_last_copies": r.reordered_last_copies,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(
            Path::new(&path),
            serde_json::to_string_pretty(&report).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn kill_9_loops_lose_nothing_and_keep_per_key_order_on_every_sink() {
    let kills = setting("CRASH_LOOP_KILLS", 5);
    let events = setting("CRASH_LOOP_EVENTS", 3_000);
    let seed = seed();
    eprintln!("crash loop: {kills} kills, {events} events, CRASH_LOOP_SEED={seed}");

    let broker = Broker::start();
    let redis = Redis::start();
    let nats = Nats::start();
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let hook = Hook::start();
    let vhost = Vhost::new();
    vhost.declare_queue("outbox", "all", "#", Default::default());
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let sinks = format!(
        "[sinks.file]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n\
         [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\npartitions = 4\ntimeout = \"10s\"\n\
         [sinks.exchange]\ntype = \"rabbitmq\"\nurl = \"{}\"\nexchange = \"outbox\"\nchannels = 4\n\
         [sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\nstream = \"events\"\ndeclare = true\n\
         [sinks.redis]\ntype = \"redis\"\nurl = \"{}\"\nstream = \"events\"\n\
         [sinks.nats]\ntype = \"nats\"\nurl = \"{}\"\n\
         [sinks.webhook]\ntype = \"webhook\"\nurl = \"{}\"\n",
        file.display(),
        broker.address(),
        vhost.amqp_url(),
        vhost.stream_url(),
        redis.url(),
        nats.url(),
        hook.url("/events"),
    );
    let config = ConfigFile::new().sinks(&sinks).write(dir.path(), &pg);
    init(&config);

    let relay = write_while_killing(&pg, &[&config], &[], events, kills, seed).remove(0);
    let expected = committed_ids(&pg, events);

    let stream = vhost.read_stream("events");
    let mut queued = Vec::new();
    let mut kafka = Vec::new();
    let complete = wait_until(Duration::from_secs(120), || {
        vhost.drain("all", &mut queued);
        let distinct = |ids: &mut dyn Iterator<Item = String>| ids.collect::<HashSet<_>>().len();
        let file_done = read_events(&file).len() >= events;
        let stream_done =
            stream.lock().unwrap().len() >= events && redis.entries("events").len() >= events;
        let queue_done = distinct(&mut queued.iter().map(|m| m.id())) >= events
            && distinct(&mut hook.accepted().iter().map(|r| r.json()["id"].to_string())) >= events;
        let kafka_done = file_done && stream_done && queue_done && {
            kafka = consume_all(&broker, "outbox.event.order");
            distinct(&mut kafka.iter().map(|r| r.id.clone())) >= events
        };
        kafka_done
    });
    let file_copies: Vec<Copy> = read_events(&file).iter().map(envelope_copy).collect();
    let stream_copies: Vec<Copy> = stream
        .lock()
        .unwrap()
        .iter()
        .map(|(_, envelope)| envelope_copy(envelope))
        .collect();
    let queue_copies: Vec<Copy> = queued
        .iter()
        .map(|m| envelope_copy(&serde_json::from_slice(&m.body).unwrap()))
        .collect();
    let redis_copies: Vec<Copy> = redis
        .entries("events")
        .iter()
        .map(|entry| envelope_copy(&entry.event()))
        .collect();
    let nats_copies: Vec<Copy> = nats
        .messages("OUTBOX")
        .iter()
        .map(|message| envelope_copy(&message.event()))
        .collect();
    let webhook_copies: Vec<Copy> = hook
        .accepted()
        .iter()
        .map(|request| envelope_copy(&request.json()))
        .collect();
    let record_copy = |r: &Record| Copy {
        id: r.id.clone(),
        key: r.key.clone(),
        seq: r.seq,
    };
    let kafka_copies: Vec<Copy> = kafka.iter().map(record_copy).collect();
    let uncommitted_copies: Vec<Copy> = consume_all_uncommitted(&broker, "outbox.event.order")
        .iter()
        .map(record_copy)
        .collect();
    let reports = [
        analyse("file", &file_copies, &expected),
        analyse("rabbitmq stream", &stream_copies, &expected),
        analyse("kafka (read_committed)", &kafka_copies, &expected),
        analyse("redis stream", &redis_copies, &expected),
        analyse("nats jetstream", &nats_copies, &expected),
        analyse("kafka (read_uncommitted)", &uncommitted_copies, &expected),
        analyse("rabbitmq exchange", &queue_copies, &expected),
        analyse("webhook", &webhook_copies, &expected),
    ];
    report(&reports, kills, events, seed, "CRASH_LOOP_REPORT");
    assert!(
        complete,
        "not every sink received every event; relay log:\n{}",
        relay.log()
    );
    for r in &reports {
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.reordered_last_copies, 0, "{r:?}");
    }
    for exactly_once in &reports[..5] {
        assert_eq!(exactly_once.duplicated, 0, "{exactly_once:?}");
        assert_eq!(exactly_once.reordered_first_copies, 0, "{exactly_once:?}");
    }
}

#[test]
fn aws_kill_9_loops_lose_nothing_and_fifo_destinations_repeat_nothing() {
    let kills = setting("CRASH_LOOP_AWS_KILLS", 5);
    let events = setting("CRASH_LOOP_AWS_EVENTS", 300);
    let seed = seed();
    eprintln!("AWS crash loop: {kills} kills, {events} events, CRASH_LOOP_SEED={seed}");

    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("crash-loop");
    let bus_queue = aws.bus_into_queue(&bus);
    let fifo_queue = aws.queue(&unique("crash-loop"), true);
    let (topic, topic_queue) = aws.topic_into_queue(&unique("crash-loop"), true);
    let url = moto.url();
    // Small batches: moto takes a few hundred messages a second, and a batch must be able
    // to finish between two kills.
    let Scenario { pg, config, .. } = scenario()
        .relay("batch_size = 20\n")
        .sinks(&format!(
            "{}[sinks.fifo]\ntype = \"sqs\"\nqueue_url = \"{fifo_queue}\"\nendpoint_url = \"{url}\"\n\
             [sinks.topic]\ntype = \"sns\"\ntopic_arn = \"{topic}\"\nendpoint_url = \"{url}\"\n",
            eventbridge_sink("bus", &bus, &url, "")
        ))
        .init();

    let relay = write_while_killing(&pg, &[&config], &AWS_ENV, events, kills, seed).remove(0);
    let expected = committed_ids(&pg, events);
    let id_of = |e: &Value| e["id"].as_str().unwrap_or_default().to_owned();
    let (mut from_bus, mut from_fifo, mut from_topic) = (Vec::new(), Vec::new(), Vec::new());
    // moto reads a queue back slowly (each receive scans it): allow a quarter second per
    // event, and at least two minutes.
    let patience = Duration::from_millis(250 * events as u64).max(Duration::from_secs(120));
    let mut read_all = || {
        aws.receive(&bus_queue, &mut from_bus);
        aws.receive(&fifo_queue, &mut from_fifo);
        aws.receive(&topic_queue, &mut from_topic);
        let bus_ids: HashSet<String> = from_bus.iter().map(|e| id_of(&e["detail"])).collect();
        let fifo_ids: HashSet<String> = from_fifo.iter().map(id_of).collect();
        let topic_ids: HashSet<String> = from_topic.iter().map(id_of).collect();
        [bus_ids.len(), fifo_ids.len(), topic_ids.len()]
            .iter()
            .all(|&n| n >= events)
    };
    let mut complete = wait_until(patience, &mut read_all);
    // One more read: what is still on its way shows up, as a repeat or as the last events
    // when moto was too slow to hand everything back within the wait.
    complete |= read_all();
    let bus_copies: Vec<Copy> = from_bus
        .iter()
        .map(|e| envelope_copy(&e["detail"]))
        .collect();
    let fifo_copies: Vec<Copy> = from_fifo.iter().map(envelope_copy).collect();
    let topic_copies: Vec<Copy> = from_topic.iter().map(envelope_copy).collect();
    let reports = [
        analyse("sqs fifo (moto)", &fifo_copies, &expected),
        analyse("sns fifo (moto)", &topic_copies, &expected),
        analyse("eventbridge (moto)", &bus_copies, &expected),
    ];
    report(&reports, kills, events, seed, "CRASH_LOOP_AWS_REPORT");
    assert!(
        complete,
        "the AWS destinations did not receive every event; relay log:\n{}",
        relay.log()
    );
    for r in &reports {
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.reordered_last_copies, 0, "{r:?}");
    }
    for fifo in &reports[..2] {
        assert_eq!(fifo.duplicated, 0, "{fifo:?}");
        assert_eq!(fifo.reordered_first_copies, 0, "{fifo:?}");
    }
}

/// Key-sharded slots under the crash loop: two shards, each its own relay with a file sink
/// and a transactional Kafka sink into one topic, killed in turn at random. Together they
/// deliver every event exactly once, each key in order (a key belongs to one shard): each
/// shard resumes from its own checkpoints (`CRASH_LOOP_SHARD_KILLS`, `_EVENTS`, `_REPORT`).
#[test]
fn sharded_kill_9_loops_lose_nothing_and_repeat_nothing() {
    let kills = setting("CRASH_LOOP_SHARD_KILLS", 6);
    let events = setting("CRASH_LOOP_SHARD_EVENTS", 3_000);
    let seed = seed();
    eprintln!("sharded crash loop: {kills} kills, {events} events, CRASH_LOOP_SEED={seed}");

    let broker = Broker::start();
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let shard_file = |shard: u32| dir.path().join(format!("shard{shard}/events.jsonl"));
    let configs: Vec<std::path::PathBuf> = (0..2)
        .map(|shard| {
            let shard_dir = dir.path().join(format!("shard{shard}"));
            std::fs::create_dir_all(&shard_dir).unwrap();
            let sinks = format!(
                "[sinks.file]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n\
                 [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\npartitions = 4\ntimeout = \"10s\"\n",
                shard_file(shard).display(),
                broker.address(),
            );
            let config = ConfigFile::new()
                .source(&format!("shards = 2\nshard = {shard}\n"))
                .sinks(&sinks)
                .write(&shard_dir, &pg);
            init(&config);
            config
        })
        .collect();
    let config_paths: Vec<&Path> = configs.iter().map(|c| c.as_path()).collect();

    let relays = write_while_killing(&pg, &config_paths, &[], events, kills, seed);
    let expected = committed_ids(&pg, events);
    let files = || -> Vec<Value> {
        (0..2)
            .flat_map(|shard| read_events(&shard_file(shard)))
            .collect()
    };
    let mut kafka = Vec::new();
    let complete = wait_until(Duration::from_secs(120), || {
        files().len() >= events && {
            kafka = consume_all(&broker, "outbox.event.order");
            kafka.iter().map(|r| &r.id).collect::<HashSet<_>>().len() >= events
        }
    });
    let mut keys_of_shard = Vec::new();
    for shard in 0..2 {
        let keys: HashSet<String> = read_events(&shard_file(shard))
            .iter()
            .map(|e| envelope_copy(e).key)
            .collect();
        keys_of_shard.push(keys);
    }
    let file_copies: Vec<Copy> = files().iter().map(envelope_copy).collect();
    let kafka_copies: Vec<Copy> = kafka
        .iter()
        .map(|r| Copy {
            id: r.id.clone(),
            key: r.key.clone(),
            seq: r.seq,
        })
        .collect();
    let reports = [
        analyse("file, both shards", &file_copies, &expected),
        analyse(
            "kafka (read_committed), both shards",
            &kafka_copies,
            &expected,
        ),
    ];
    report(&reports, kills, events, seed, "CRASH_LOOP_SHARD_REPORT");
    assert!(
        complete,
        "the shards did not deliver every event; logs:\n{}\n{}",
        relays[0].log(),
        relays[1].log()
    );
    assert!(
        keys_of_shard[0].is_disjoint(&keys_of_shard[1]) && !keys_of_shard[0].is_empty(),
        "each key belongs to one shard: {keys_of_shard:?}"
    );
    for r in &reports {
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.duplicated, 0, "{r:?}");
        assert_eq!(r.reordered_first_copies, 0, "{r:?}");
    }
}
