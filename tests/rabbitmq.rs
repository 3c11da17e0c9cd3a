//! The RabbitMQ sink end to end, against the RabbitMQ on 127.0.0.1 (5672 for AMQP, 5552 for
//! streams; scripts/install-test-deps.sh installs it, enables the stream plugin and pins the
//! advertised host). Every test works in a virtual host of its own, created with
//! `rabbitmqctl` and deleted afterwards, so tests run in parallel and `close_all_connections`
//! hits only the test's own connections. Tests that stop the broker or need TLS listeners
//! start a RabbitMQ node of their own (`common::rabbitmq::Node`). Messages are read back
//! with lapin (queues) and the stream client (streams).

mod common;

use common::certs::{make_ca, make_server_cert};
use common::partition_proxy::PartitionProxy;
use common::rabbitmq::{Node, Received, Vhost};
use common::tls_proxy::TlsProxy;
use common::*;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use outbox_relay_sinks::rabbitmq::{self, StreamSettings};
use outbox_relay_sinks::test_util::sample;
use outbox_relay_sinks::{rejections, Event, EventState, Sink};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

/// The Debezium outbox layout plus the optional headers and traceparent columns.
const OUTBOX: &str = "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
     aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, \
     payload jsonb NOT NULL, headers jsonb, traceparent text)";

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Inserts `count` events of `aggregate` in one transaction: keys k0..k{keys-1} in turn.
fn insert_events(pg: &PgCluster, aggregate: &str, first: usize, count: usize, keys: usize) {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers, traceparent) \
         SELECT '{aggregate}', 'k' || (i % {keys}), 'Updated', jsonb_build_object('n', i), \
         '{{\"tenant\": \"acme\"}}', '{TRACEPARENT}' FROM generate_series({first}, {}) AS i",
        first + count - 1
    ));
}

/// Writes transactions of 10 events (keys k0..k{keys-1}) from a thread until `stop`, so
/// that what the test does meanwhile (closing connections, kill -9) lands mid-stream.
/// Returns how many events it wrote.
fn spawn_writer(
    pg: &PgCluster,
    first: usize,
    keys: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    let url = pg.url();
    std::thread::spawn(move || {
        let mut from = first;
        while !stop.load(Ordering::Relaxed) {
            let sql = format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 SELECT 'order', 'k' || (i % {keys}), 'Updated', jsonb_build_object('n', i) \
                 FROM generate_series({from}, {}) AS i",
                from + 9
            );
            let out = Command::new(pg_bin().join("psql"))
                .args(["-X", "-q", "-d", &url, "-c", &sql])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            from += 10;
        }
        from - first
    })
}

/// Asserts that each key's (key, sequence) pairs come in commit order.
fn assert_per_key_order(pairs: impl IntoIterator<Item = (String, String)>) {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for (key, sequence) in pairs {
        if let Some(previous) = last.get(&key) {
            assert!(
                *previous < sequence,
                "key {key}: {sequence} arrived after {previous}"
            );
        }
        last.insert(key, sequence);
    }
}

/// How many distinct events (by id) are among `messages`.
fn distinct(messages: &[Received]) -> usize {
    messages
        .iter()
        .map(Received::id)
        .collect::<HashSet<_>>()
        .len()
}

/// Drains the queue `all` into `messages` until `enough` holds of them, or fails the test
/// with what arrived and the relay's log.
fn drain_until(
    vhost: &Vhost,
    messages: &mut Vec<Received>,
    relay: &Relay,
    enough: impl Fn(&[Received]) -> bool,
) {
    let arrived = wait_until(WAIT, || {
        vhost.drain("all", messages);
        enough(messages)
    });
    assert!(
        arrived,
        "{} messages ({} distinct) arrived; relay log:\n{}",
        messages.len(),
        distinct(messages),
        relay.log()
    );
}

/// The last copy of each message, in arrival order.
fn last_copies(messages: &[Received]) -> Vec<&Received> {
    let mut seen = HashSet::new();
    let mut last: Vec<&Received> = messages
        .iter()
        .rev()
        .filter(|m| seen.insert(m.id()))
        .collect();
    last.reverse();
    last
}

/// What the tests read of a dead letter: "sink | aggregatetype | reason".
const LETTER: &str = "sink, row_data->>'aggregatetype', reason";

fn exchange_sink(vhost: &Vhost, extra: &str) -> String {
    format!(
        "[sinks.rabbit]\ntype = \"rabbitmq\"\nurl = \"{}\"\nexchange = \"events\"\n\
         binary = true\nwindow = 16\nchannels = 4\ntimeout = \"5s\"\n{extra}\n",
        vhost.amqp_url()
    )
}

/// Guarantee: exchange mode publishes every event once (no failures here), in per-key
/// commit order over 4 channels (each key on one), persistent, with message_id, type,
/// timestamp, content type, the event's headers, traceparent and the CloudEvents attributes
/// as cloudEvents_ headers. The sink declares the exchange and the bound queue itself;
/// `check` passes.
#[test]
fn exchange_mode_delivers_every_event_once_in_per_key_order_with_its_headers() {
    let vhost = Vhost::new();
    let sink = exchange_sink(&vhost, "declare = true\nqueue = \"all\"\n");
    let Scenario { pg, config, .. } = scenario().outbox_sql(OUTBOX).sinks(&sink).init();
    let check = relay_command(&config, "check");
    assert!(
        check.status.success(),
        "check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let relay = Relay::start(&config);
    for tx in 0..20 {
        insert_events(&pg, "order", tx * 25, 25, 10);
    }
    let mut messages = Vec::new();
    drain_until(&vhost, &mut messages, &relay, |m| m.len() >= 500);
    let ids: HashSet<String> = messages.iter().map(Received::id).collect();
    assert_eq!(
        (messages.len(), ids.len()),
        (500, 500),
        "an event was repeated"
    );
    assert_per_key_order(messages.iter().map(Received::key_and_sequence));

    let first = &messages[0];
    assert_eq!(first.routing_key, "order.Updated");
    assert_eq!(*first.properties.delivery_mode(), Some(2));
    assert_eq!(first.header("cloudEvents_id"), Some(first.id()));
    assert_eq!(
        first.properties.kind().as_ref().map(ShortString::as_str),
        Some("Updated")
    );
    assert_eq!(
        first
            .properties
            .content_type()
            .as_ref()
            .map(ShortString::as_str),
        Some("application/json")
    );
    assert!(first
        .properties
        .timestamp()
        .is_some_and(|t| t > 1_700_000_000));
    assert_eq!(first.header("tenant").as_deref(), Some("acme"));
    assert_eq!(first.header("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(first.header("cloudEvents_type").as_deref(), Some("Updated"));
    assert_eq!(
        first.header("cloudEvents_specversion").as_deref(),
        Some("1.0")
    );
    let payload: Value = serde_json::from_slice(&first.body).unwrap();
    assert!(payload["n"].is_number(), "{payload}");

    // A clean restart (SIGTERM) repeats nothing and loses nothing.
    let mut relay = relay;
    assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    insert_events(&pg, "order", 500, 100, 10);
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || {
            vhost.drain("all", &mut messages);
            distinct(&messages) >= 600
        }),
        "{} arrived after the restart; relay log:\n{}",
        messages.len(),
        relay.log()
    );
    assert_eq!(messages.len(), 600, "the restart repeated events");
    assert_per_key_order(messages.iter().map(Received::key_and_sequence));
}

/// Guarantee: when the broker closes the relay's connection mid-stream (twice), the sink
/// reconnects and publishes what was not confirmed; after a kill -9 the restarted relay
/// publishes again what was not checkpointed. Nothing is lost, and the last copies of every
/// key's events are in commit order (repeats allowed: at-least-once).
#[test]
fn exchange_mode_loses_nothing_when_the_broker_closes_its_connections() {
    let vhost = Vhost::new();
    vhost.declare_queue("events", "all", "#", FieldTable::default());
    let (Scenario { pg, config, .. }, mut relay) = scenario()
        .outbox_sql(OUTBOX)
        .sinks(&exchange_sink(&vhost, ""))
        .start();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&pg, 0, 7, stop.clone());
    let mut messages = Vec::new();
    for round in 1..=2 {
        let before = messages.len();
        assert!(
            wait_until(WAIT, || {
                vhost.drain("all", &mut messages);
                messages.len() > before
            }),
            "round {round}: nothing arrived; relay log:\n{}",
            relay.log()
        );
        vhost.close_all_connections();
    }
    // Written after the last close, so it can only arrive over a new connection.
    insert_events(&pg, "marker", 1_000_000, 1, 7);
    assert!(
        wait_until(WAIT, || {
            vhost.drain("all", &mut messages);
            messages.iter().any(|m| m.routing_key == "marker.Updated")
        }),
        "relay log:\n{}",
        relay.log()
    );
    assert!(
        relay.log().matches("connected to RabbitMQ").count() >= 2,
        "the sink did not reconnect:\n{}",
        relay.log()
    );
    let before = messages.len();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("all", &mut messages);
            messages.len() > before
        }),
        "relay log:\n{}",
        relay.log()
    );
    relay.kill9();
    let relay = Relay::start(&config);
    stop.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap() + 1;
    drain_until(&vhost, &mut messages, &relay, |m| distinct(m) == total);
    assert_per_key_order(
        last_copies(&messages)
            .into_iter()
            .map(Received::key_and_sequence),
    );
}

/// A relay publishing to exchange `events` in `vhost`, where only the queue `orders` is
/// bound, for `order.#`.
fn relay_with_an_orders_queue(vhost: &Vhost) -> (PgCluster, Relay) {
    let sink = exchange_sink(
        vhost,
        "declare = true\nqueue = \"orders\"\nbinding_key = \"order.#\"\n",
    );
    let (Scenario { pg, .. }, relay) = scenario().outbox_sql(OUTBOX).sinks(&sink).start();
    (pg, relay)
}

/// Guarantee: with `mandatory`, an event no queue is bound for comes back, and the
/// `dead-letter` policy (the default for unroutable events) stores it in the dead-letter
/// table with the broker's reason; the routable events arrive and the relay goes on.
#[test]
fn unroutable_events_are_dead_lettered() {
    let vhost = Vhost::new();
    let (pg, relay) = relay_with_an_orders_queue(&vhost);
    insert_events(&pg, "order", 0, 10, 3);
    insert_events(&pg, "invoice", 10, 5, 3);
    insert_events(&pg, "order", 15, 10, 3);
    let mut messages = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("orders", &mut messages);
            messages.len() >= 20 && dead_letters(&pg, LETTER).len() >= 5
        }),
        "{} orders, dead letters {:?}; relay log:\n{}",
        messages.len(),
        dead_letters(&pg, LETTER),
        relay.log()
    );
    assert_eq!(messages.len(), 20);
    assert!(messages.iter().all(|m| m.routing_key == "order.Updated"));
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 5, "{letters:?}");
    for letter in &letters {
        assert!(
            letter.starts_with("rabbit | invoice | returned by RabbitMQ: 312 NO_ROUTE"),
            "{letter}"
        );
    }
}

/// A dead letter one sink refused goes back to that sink only: two unroutable events,
/// dead-lettered by the RabbitMQ sink while the file sink beside it took them, are replayed
/// (`dlq replay --all --sink rabbit`) once a queue is bound for them; they reach that queue,
/// and the file sink does not get them twice. Listing filters and purging follow.
#[test]
fn a_dead_letter_one_sink_refused_is_replayed_to_that_sink_only() {
    let vhost = Vhost::new();
    let sinks = format!(
        "{}\n[sinks.file]\ntype = \"file\"\nfsync = false\npath = \"FILE\"\n",
        exchange_sink(
            &vhost,
            "declare = true\nqueue = \"orders\"\nbinding_key = \"order.#\"\n"
        )
    );
    let (
        Scenario {
            pg, config, dir, ..
        },
        relay,
    ) = scenario()
        .outbox_sql(OUTBOX)
        .sinks_in(move |dir| sinks.replace("FILE", &dir.join("file.jsonl").display().to_string()))
        .start();
    let file = dir.join("file.jsonl");
    insert_events(&pg, "invoice", 0, 2, 2);
    assert!(
        wait_until(WAIT, || dead_letters(&pg, LETTER).len() == 2
            && read_events(&file).len() == 2),
        "{:?}\n{}",
        dead_letters(&pg, LETTER),
        relay.log()
    );
    let dlq = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .arg("--config")
            .arg(&config)
            .arg("dlq")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let listed = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let (code, out) = dlq(&all);
        assert_eq!(code, Some(0), "{out}");
        serde_json::from_str(&out).unwrap()
    };
    assert_eq!(
        listed(&["--sink", "rabbit", "--reason", "no_route"]).len(),
        2
    );
    assert_eq!(listed(&["--sink", "file"]).len(), 0);
    assert_eq!(listed(&["--table", "outbox", "--since", "1h"]).len(), 2);

    vhost.declare_queue("events", "invoices", "invoice.#", FieldTable::default());
    let (code, out) = dlq(&["replay", "--all", "--sink", "rabbit"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("replayed").count(), 2, "{out}");
    let mut invoices = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("invoices", &mut invoices);
            invoices.len() == 2
        }),
        "{}",
        relay.log()
    );
    // A replay is the event as it was: headers, trace context, key.
    for invoice in &invoices {
        assert_eq!(invoice.header("tenant").as_deref(), Some("acme"));
        assert_eq!(invoice.header("traceparent").as_deref(), Some(TRACEPARENT));
    }
    // Written after the replays: once it is in the file, the replays were delivered past it.
    insert_events(&pg, "order", 2, 1, 1);
    assert!(wait_until(WAIT, || read_events(&file).len() >= 3));
    assert_eq!(read_events(&file).len(), 3, "the file sink got a replay");
    assert!(listed(&["--open"]).is_empty());
    assert_eq!(listed(&[]).len(), 2);

    let (code, out) = dlq(&["purge", "--older-than", "0s", "--replayed-only"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("2 dead letter(s)"), "{out}");
    assert!(listed(&[]).is_empty());
}

/// RabbitMQ returns an unroutable message at once but confirms a routed persistent one only
/// once it is on disk, and lapin hands a returned message to whichever confirm completes
/// next (with a multiple ack, any of the acknowledged ones). The sink must find the returned
/// event by its message id: every unroutable event dead-lettered, every routed one
/// delivered, none mistaken for the other.
#[test]
fn interleaved_unroutable_events_are_each_dead_lettered_by_their_own_id() {
    let vhost = Vhost::new();
    let (pg, relay) = relay_with_an_orders_queue(&vhost);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT CASE WHEN i % 2 = 0 THEN 'order' ELSE 'invoice' END, 'k' || (i % 7), \
         'Updated', jsonb_build_object('n', i) FROM generate_series(0, 399) AS i",
    );
    let mut messages = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("orders", &mut messages);
            messages.len() >= 200 && dead_letters(&pg, LETTER).len() >= 200
        }),
        "{} orders, {} dead letters; relay log:\n{}",
        messages.len(),
        dead_letters(&pg, LETTER).len(),
        relay.log()
    );
    let letters = dead_letters(&pg, LETTER);
    let misplaced: Vec<&String> = letters
        .iter()
        .filter(|l| !l.starts_with("rabbit | invoice | returned by RabbitMQ: 312 NO_ROUTE"))
        .collect();
    assert!(misplaced.is_empty(), "{misplaced:?}");
    assert_eq!(letters.len(), 200);
    assert_eq!(messages.len(), 200);
    assert!(messages.iter().all(|m| m.routing_key == "order.Updated"));
}

/// A queue that holds 5 messages and refuses more (`x-overflow = reject-publish`).
fn full_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(5));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    arguments
}

/// Guarantee: events a full queue nacks are published again (policy `retry`, the default)
/// until the queue has room: nothing is lost, and the last copy of every event is in
/// per-key commit order. The exchange exists beforehand (the sink only checks it).
#[test]
fn nacked_events_are_retried_until_the_queue_has_room() {
    let vhost = Vhost::new();
    vhost.declare_queue("events", "small", "#", full_queue_arguments());
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX)
        .sinks(&exchange_sink(&vhost, ""))
        .start();
    insert_events(&pg, "order", 0, 30, 3);
    let mut messages = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("small", &mut messages);
            distinct(&messages) == 30
        }),
        "{} arrived; relay log:\n{}",
        messages.len(),
        relay.log()
    );
    assert!(
        relay.log().contains("nacked by RabbitMQ"),
        "{}",
        relay.log()
    );
    assert_per_key_order(
        last_copies(&messages)
            .into_iter()
            .map(Received::key_and_sequence),
    );
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: with `on_nack = "dead-letter"` the refused events go to the dead-letter
/// table; with `on_nack = "fail"` the relay stops and says what to fix. Never a silent drop.
#[test]
fn nacked_events_follow_the_dead_letter_and_fail_policies() {
    let vhost = Vhost::new();
    vhost.declare_queue("events", "small", "#", full_queue_arguments());
    let (Scenario { pg, dir, .. }, mut relay) = scenario()
        .outbox_sql(OUTBOX)
        .sinks(&exchange_sink(&vhost, "on_nack = \"dead-letter\"\n"))
        .start();
    insert_events(&pg, "order", 0, 12, 3);
    assert!(
        wait_until(WAIT, || dead_letters(&pg, LETTER).len() >= 7),
        "dead letters {:?}; relay log:\n{}",
        dead_letters(&pg, LETTER),
        relay.log()
    );
    let mut messages = Vec::new();
    vhost.drain("small", &mut messages);
    assert_eq!(messages.len(), 5);
    assert_eq!(dead_letters(&pg, LETTER).len(), 7);
    assert!(dead_letters(&pg, LETTER)[0].contains("nacked by RabbitMQ"));
    assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));

    // The queue is empty now; fill it again and fail on the first refusal.
    let config = ConfigFile::new()
        .sinks(&exchange_sink(&vhost, "on_nack = \"fail\"\n"))
        .write(&dir, &pg);
    let mut relay = Relay::start(&config);
    insert_events(&pg, "order", 12, 12, 3);
    let log = relay.stops_with_failure(WAIT, "on_nack = fail");
    assert!(
        log.contains("nacked by RabbitMQ") && log.contains("on_nack"),
        "{log}"
    );
}

/// Guarantee (stream mode): exactly once in the stream, in commit order, across a SIGTERM
/// and three kill -9s of the relay while rows are being written. After each restart the sink reads
/// the producer's last publishing id from RabbitMQ as its checkpoint, and RabbitMQ drops
/// whatever the relay publishes again.
#[test]
fn stream_mode_holds_every_event_exactly_once_across_kill9() {
    let vhost = Vhost::new();
    let sink = format!(
        "[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
         stream = \"events\"\ndeclare = true\nwindow = 32\ntimeout = \"5s\"\n",
        vhost.stream_url()
    );
    let (Scenario { pg, config, .. }, mut relay) =
        scenario().outbox_sql(OUTBOX).sinks(&sink).start();
    insert_events(&pg, "order", 0, 50, 5);
    let received = vhost.read_stream("events");
    let count = || received.lock().unwrap().len();
    assert!(
        wait_until(WAIT, || count() >= 50),
        "relay log:\n{}",
        relay.log()
    );
    assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    relay = Relay::start(&config);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(&pg, 50, 5, stop.clone());
    for round in 1..=3 {
        let before = count();
        assert!(
            wait_until(WAIT, || count() > before),
            "round {round}: nothing new arrived; relay log:\n{}",
            relay.log()
        );
        relay.kill9();
        relay = Relay::start(&config);
    }
    stop.store(true, Ordering::Relaxed);
    let expected = 50 + writer.join().unwrap();
    assert!(
        wait_until(WAIT, || count() >= expected),
        "{} of {expected} in the stream; relay log:\n{}",
        count(),
        relay.log()
    );
    assert!(
        relay
            .log()
            .contains("recovered the position the stream holds"),
        "{}",
        relay.log()
    );
    // One more event, the last one written: once it is in the stream, anything the
    // restarted relays could have repeated would be in the stream before it.
    insert_events(&pg, "order", 10_000, 1, 5);
    assert!(wait_until(WAIT, || count() > expected), "{}", relay.log());
    let events = received.lock().unwrap().clone();
    assert_eq!(
        events.len(),
        expected + 1,
        "an event is in the stream twice"
    );
    let ids: HashSet<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), expected + 1);
    for (id, envelope) in &events {
        assert_eq!(envelope["id"].as_str(), Some(id.as_str()));
    }
    let sequences: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["sequence"].as_str().unwrap())
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "the stream is not in commit order"
    );
}

/// A stream kept while the database behind it is re-created: the producer's last publishing
/// id lies beyond the new database's WAL, and the broker would drop the new database's events
/// as already stored. The relay stops and names the sink instead.
#[test]
fn a_stream_filled_from_a_recreated_database_stops_the_relay() {
    let vhost = Vhost::new();
    let dir = tempfile::tempdir().unwrap();
    let sink = format!(
        "[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
         stream = \"events\"\ndeclare = true\n",
        vhost.stream_url()
    );
    {
        let old = PgCluster::start();
        old.psql(OUTBOX);
        let config = ConfigFile::new().sinks(&sink).write(dir.path(), &old);
        init(&config);
        let mut relay = Relay::start(&config);
        insert_events(&old, "order", 0, 2000, 5);
        let received = vhost.read_stream("events");
        assert!(
            wait_until(WAIT, || received.lock().unwrap().len() >= 2000),
            "relay log:\n{}",
            relay.log()
        );
        assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    }

    let new = PgCluster::start();
    new.psql(OUTBOX);
    let config = ConfigFile::new().sinks(&sink).write(dir.path(), &new);
    init(&config);
    insert_events(&new, "order", 0, 5, 5);
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(
        WAIT,
        "the stream holds positions beyond the new database's WAL",
    );
    assert!(
        log.contains("sink stream: its destination already holds events up to position")
            && log.contains("a new producer_name"),
        "{log}"
    );
}

fn stream_settings(vhost: &Vhost, stream: &str) -> StreamSettings {
    StreamSettings {
        name: "stream".into(),
        url: vhost.stream_url(),
        username: None,
        password: None,
        ca_file: None,
        stream: stream.into(),
        producer_name: "outbox-relay.test.stream".into(),
        declare: true,
        format: outbox_relay_sinks::format::Format::CloudEvents,
        binary: false,
        window: 50,
        timeout: Duration::from_secs(5),
    }
}

/// Guarantee (stream mode, at the sink): publishing the same events again through a new
/// sink that skips `recover` (as a relay replaying from an older checkpoint would) stores
/// nothing twice; `recover` maps the broker's last publishing id back to the last
/// position; an event beyond the per-transaction cap is rejected (dead-lettered), not
/// silently dropped by deduplication.
#[test]
fn stream_replays_are_deduplicated_by_the_broker() {
    let vhost = Vhost::new();
    let rt = Runtime::new().unwrap();
    let batch: Vec<Event> = (0..3)
        .flat_map(|tx| (0..40).map(move |i| sample(0x1000 + tx, i)))
        .collect();
    rt.block_on(async {
        let mut first = rabbitmq::sink(rabbitmq::RabbitMqSettings::Stream(stream_settings(
            &vhost, "replay",
        )));
        assert_eq!(first.recover().await.unwrap(), None);
        let mut states = vec![EventState::Pending; 70];
        first.send(&batch[..70], &mut states).await.unwrap();
        assert!(rejections(states).is_empty());
        first.close().await.unwrap();

        let mut second = rabbitmq::StreamSink::new(stream_settings(&vhost, "replay"));
        let mut last = batch.clone();
        last.push(sample(0x2000, rabbitmq::stream::MAX_INDEX + 1));
        let mut states = vec![EventState::Pending; last.len()];
        second.send(&last, &mut states).await.unwrap();
        let rejected = rejections(states);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, batch.len());
        assert!(rejected[0].reason.contains("dlq replay"));
        second.close().await.unwrap();

        let mut third = rabbitmq::StreamSink::new(stream_settings(&vhost, "replay"));
        assert_eq!(
            third.recover().await.unwrap(),
            Some(batch.last().unwrap().position)
        );
        third.close().await.unwrap();
    });
    let received = vhost.read_stream("replay");
    assert!(wait_until(WAIT, || received.lock().unwrap().len() >= batch.len()));
    let events = received.lock().unwrap().clone();
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    let expected: Vec<&str> = batch.iter().map(|e| &*e.id).collect();
    assert_eq!(ids, expected);
}

/// `outbox-relay check` names what is wrong on the RabbitMQ side: a stream port where
/// nothing answers (the stream plugin not enabled), a missing exchange the sink does not
/// declare, a missing stream.
#[test]
fn check_reports_a_disabled_stream_plugin_and_missing_destinations() {
    let vhost = Vhost::new();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n\n\
             [sinks.no_plugin]\ntype = \"rabbitmq\"\nmode = \"stream\"\n\
             url = \"rabbitmq-stream://127.0.0.1:{closed_port}/\"\nstream = \"events\"\ntimeout = \"5s\"\n\n\
             [sinks.no_stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
             stream = \"missing\"\ntimeout = \"5s\"\n\n\
             [sinks.no_exchange]\ntype = \"rabbitmq\"\nurl = \"{}\"\nexchange = \"missing\"\ntimeout = \"5s\"\n",
            vhost.stream_url(),
            vhost.amqp_url()
        ),
    )
    .unwrap();
    let out = relay_command(&config, "check");
    assert!(!out.status.success());
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("sink no_plugin: nothing answers on the RabbitMQ stream port")
            && report.contains("rabbitmq-plugins enable rabbitmq_stream"),
        "{report}"
    );
    assert!(
        report.contains("sink no_stream (stream \"missing\"): the stream does not exist"),
        "{report}"
    );
    assert!(
        report.contains("sink no_exchange") && report.contains("\"missing\" does not exist"),
        "{report}"
    );
    assert!(!report.contains("guest:guest"), "{report}");
}

/// config/rabbitmq.toml works as documented: both sinks (exchange and stream) deliver, with
/// the database URL and the broker names from the environment.
#[test]
fn the_example_config_works() {
    let vhost = Vhost::new();
    vhost.declare_queue("outbox", "all", "#", FieldTable::default());
    let pg = PgCluster::start();
    pg.psql(OUTBOX);
    // A copy: the relay's logs are written beside its config.
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "rabbitmq.toml");
    let env = [
        ("OUTBOX_RELAY__SOURCE__URL", pg.url()),
        ("OUTBOX_RELAY__SINKS__ORDERS__URL", vhost.amqp_url()),
        (
            "OUTBOX_RELAY__SINKS__ORDERS_STREAM__URL",
            vhost.stream_url(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = relay_command_with_env(&config, "init", &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = Relay::start_with_env(&config, &env);
    insert_events(&pg, "order", 0, 10, 2);
    let received = vhost.read_stream("outbox-events");
    let mut messages = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("all", &mut messages);
            messages.len() >= 10 && received.lock().unwrap().len() >= 10
        }),
        "{} in the queue, {} in the stream; relay log:\n{}",
        messages.len(),
        received.lock().unwrap().len(),
        relay.log()
    );
    assert_eq!(messages[0].routing_key, "order.Updated");
}

/// Guarantee: an exchange sink that upcasts (`upcast = { to = "latest" }`) publishes each
/// event at the later version, the published and the stored version as the
/// `cloudEvents_schemaversion` and `cloudEvents_originalschemaversion` headers, in per-key
/// order.
#[test]
fn an_upcasting_exchange_sink_publishes_the_later_version_with_both_versions() {
    let vhost = Vhost::new();
    let upcaster = "[upcast.Updated.1]\nto = 2\nprogram = '. + {upcast: true}'\n";
    let sink = exchange_sink(
        &vhost,
        "declare = true\nqueue = \"all\"\nupcast = { to = \"latest\" }\n",
    );
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX)
        .sql("ALTER TABLE outbox ADD COLUMN schema_version int DEFAULT 1")
        .sinks(&format!("{upcaster}{sink}"))
        .start();
    insert_events(&pg, "order", 0, 20, 4);
    let mut messages = Vec::new();
    drain_until(&vhost, &mut messages, &relay, |m| m.len() >= 20);
    for message in &messages {
        assert_eq!(
            message.header("cloudEvents_schemaversion").as_deref(),
            Some("2")
        );
        assert_eq!(
            message
                .header("cloudEvents_originalschemaversion")
                .as_deref(),
            Some("1")
        );
        let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
        assert_eq!(body["upcast"], true, "{body}");
    }
    assert_per_key_order(messages.iter().map(Received::key_and_sequence));
}

/// Guarantee: the relay's network to RabbitMQ cut for 30 s mid-stream (a partition: no
/// resets, just silence) delays delivery; after it heals, every event is in the queue, last
/// copies in per-key order (at-least-once: unconfirmed publishes are sent again).
#[test]
fn exchange_mode_loses_nothing_across_a_30_second_network_partition() {
    let vhost = Vhost::new();
    vhost.declare_queue("events", "all", "#", FieldTable::default());
    let proxy = PartitionProxy::start(5672);
    let sink = exchange_sink(&vhost, "").replace(":5672/", &format!(":{}/", proxy.port));
    let (Scenario { pg, .. }, relay) = scenario().outbox_sql(OUTBOX).sinks(&sink).start();
    insert_events(&pg, "order", 0, 20, 4);
    let mut messages = Vec::new();
    assert!(wait_until(WAIT, || {
        vhost.drain("all", &mut messages);
        messages.len() >= 20
    }));

    proxy.set_cut(true);
    let cut_at = std::time::Instant::now();
    insert_events(&pg, "order", 20, 20, 4);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("sink failed; retrying the batch")),
        "the relay should notice the partition:\n{}",
        relay.log()
    );
    // The partition lasts 30 s whatever the relay does.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed()));
    proxy.set_cut(false);

    let total = 40;
    drain_until(&vhost, &mut messages, &relay, |m| distinct(m) == total);
    assert_per_key_order(
        last_copies(&messages)
            .into_iter()
            .map(Received::key_and_sequence),
    );
}

/// Security: amqps:// verifies the broker's certificate against ca_file and the host name.
/// A TLS-terminating proxy with a certificate from a test CA stands in front of the
/// machine's broker.
#[test]
fn amqps_verifies_the_broker_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    let other_ca = make_ca(certs.path(), "other-ca");
    let server = make_server_cert(certs.path(), "broker", &ca, "01", "IP:127.0.0.1");
    let proxy = TlsProxy::start(&server.cert, &server.key, 5672);
    let vhost = Vhost::new();
    vhost.declare_queue("events", "all", "#", FieldTable::default());
    let pg = PgCluster::start();
    pg.psql(OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let sink = |ca: &std::path::Path, host: &str| {
        format!(
            "[sinks.rabbit]\ntype = \"rabbitmq\"\nurl = \"amqps://guest:guest@{host}:{}/{}\"\n\
             exchange = \"events\"\nca_file = \"{}\"\ntimeout = \"5s\"\n",
            proxy.port,
            vhost.name,
            ca.display()
        )
    };

    // Another CA, or a name the certificate is not for: check refuses, naming the reason.
    for (ca, host, reason) in [
        (&other_ca.cert, "127.0.0.1", "UnknownIssuer"),
        (
            &ca.cert,
            "localhost",
            "certificate not valid for name \"localhost\"",
        ),
    ] {
        let config = ConfigFile::new()
            .sinks(&sink(ca, host))
            .write(dir.path(), &pg);
        init(&config);
        let (passed, text) = relay_check(&config);
        assert!(!passed, "{host}: {text}");
        assert!(text.contains(reason), "{host}: missing {reason}:\n{text}");
    }

    // run stops on a refused certificate rather than retrying forever.
    let config = ConfigFile::new()
        .sinks(&sink(&other_ca.cert, "127.0.0.1"))
        .write(dir.path(), &pg);
    insert_events(&pg, "order", 100, 1, 1);
    let mut refused = Relay::start(&config);
    let status = refused
        .wait(Duration::from_secs(30))
        .expect("run should stop on a refused certificate");
    assert!(!status.success());
    assert!(refused.log().contains("check ca_file"), "{}", refused.log());

    let config = ConfigFile::new()
        .sinks(&sink(&ca.cert, "127.0.0.1"))
        .write(dir.path(), &pg);
    let relay = Relay::start(&config);
    insert_events(&pg, "order", 0, 10, 2);
    let mut messages = Vec::new();
    drain_until(&vhost, &mut messages, &relay, |m| m.len() >= 11);
}

/// Outage: the broker itself (a node of the test's own) stopped for 30 s mid-stream, with
/// one relay publishing to an exchange and to a stream on it. Both wait and retry; once the
/// broker is back nothing is lost, per-key order holds, and the stream still holds every
/// event exactly once (the producer's publishing ids survive the stop).
#[test]
fn the_broker_stopped_for_30_seconds_delays_both_modes_but_loses_nothing() {
    let node = Node::start();
    let vhost = Vhost::on(&node);
    vhost.declare_queue("events", "all", "#", FieldTable::default());
    let sinks = format!(
        "{}[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
         stream = \"events\"\ndeclare = true\ntimeout = \"5s\"\n",
        exchange_sink(&vhost, ""),
        vhost.stream_url()
    );
    let (Scenario { pg, .. }, relay) = scenario().outbox_sql(OUTBOX).sinks(&sinks).start();
    insert_events(&pg, "order", 0, 20, 4);
    let mut messages = Vec::new();
    drain_until(&vhost, &mut messages, &relay, |m| m.len() >= 20);

    node.stop_app();
    let stopped_at = std::time::Instant::now();
    insert_events(&pg, "order", 20, 20, 4);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("sink failed; retrying the batch")),
        "the relay should notice the broker is gone:\n{}",
        relay.log()
    );
    // The broker stays down for 30 s whatever the relay does.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped_at.elapsed()));
    node.start_app();

    let total = 40;
    drain_until(&vhost, &mut messages, &relay, |m| distinct(m) == total);
    assert_per_key_order(
        last_copies(&messages)
            .into_iter()
            .map(Received::key_and_sequence),
    );
    let stream = vhost.read_stream("events");
    assert!(
        wait_until(WAIT, || stream.lock().unwrap().len() >= total),
        "{} of {total} in the stream; relay log:\n{}",
        stream.lock().unwrap().len(),
        relay.log()
    );
    // One more event: once it is in the stream, any repeat would be before it.
    insert_events(&pg, "order", 40, 1, 4);
    assert!(wait_until(WAIT, || stream.lock().unwrap().len() > total));
    let events = stream.lock().unwrap().clone();
    assert_eq!(events.len(), total + 1, "an event is in the stream twice");
    assert_per_key_order(events.iter().map(|(_, e)| {
        (
            e["subject"].as_str().unwrap().to_owned(),
            e["sequence"].as_str().unwrap().to_owned(),
        )
    }));
}

/// Security: `rabbitmq-stream+tls://` verifies the broker's certificate, on a node of the
/// test's own with TLS listeners and a certificate from a test CA. Another CA is refused
/// by `check` and stops `run`, naming the reason; with the right CA every event arrives.
#[test]
fn stream_tls_verifies_the_broker_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    let other_ca = make_ca(certs.path(), "other-ca");
    let server = make_server_cert(certs.path(), "broker", &ca, "01", "IP:127.0.0.1");
    let node = Node::start_with_tls(&server, &ca.cert);
    let (_, stream_tls_port) = node.tls_ports.unwrap();
    let vhost = Vhost::on(&node);
    let sink = |ca: &std::path::Path| {
        format!(
            "[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\n\
             url = \"rabbitmq-stream+tls://guest:guest@127.0.0.1:{stream_tls_port}/{}\"\n\
             stream = \"events\"\ndeclare = true\nca_file = \"{}\"\ntimeout = \"5s\"\n",
            vhost.name,
            ca.display()
        )
    };
    let Scenario {
        pg, dir, config, ..
    } = scenario()
        .outbox_sql(OUTBOX)
        .sinks(&sink(&other_ca.cert))
        .init();
    let (passed, text) = relay_check(&config);
    assert!(!passed, "{text}");
    assert!(text.contains("check ca_file"), "{text}");
    insert_events(&pg, "order", 0, 10, 2);
    let mut refused = Relay::start(&config);
    let status = refused
        .wait(WAIT)
        .expect("run should stop on a refused certificate");
    assert!(!status.success());
    assert!(refused.log().contains("check ca_file"), "{}", refused.log());

    let config = ConfigFile::new().sinks(&sink(&ca.cert)).write(&dir, &pg);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
    let relay = Relay::start(&config);
    let stream = vhost.read_stream("events");
    assert!(
        wait_until(WAIT, || stream.lock().unwrap().len() >= 10),
        "relay log:\n{}",
        relay.log()
    );
}

/// A vhost's connection limit reached (other clients use it up, or an operator sets it to 0
/// for a while) is temporary: the exchange sink retries and says what it is, and delivers
/// everything once a connection is allowed again. Stream-protocol connections do not count
/// against the vhost's limit on this RabbitMQ (3.10): the stream sink delivers meanwhile.
#[test]
fn a_vhost_connection_limit_reached_is_retried() {
    let vhost = Vhost::new();
    common::rabbitmq::rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        &vhost.name,
        "{\"max-connections\": 0}",
    ]);
    let sinks = format!(
        "{}\n[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
         stream = \"events\"\ndeclare = true\ntimeout = \"5s\"\n",
        exchange_sink(
            &vhost,
            "declare = true\nqueue = \"orders\"\nbinding_key = \"order.#\"\n"
        ),
        vhost.stream_url()
    );
    let (Scenario { pg, .. }, mut relay) = scenario().outbox_sql(OUTBOX).sinks(&sinks).start();
    insert_events(&pg, "order", 0, 10, 3);
    let received = vhost.read_stream("events");
    assert!(
        wait_until(WAIT, || relay
            .log()
            .matches("the connection limit of virtual host")
            .count()
            >= 2
            && received.lock().unwrap().len() >= 10),
        "{}",
        relay.log()
    );
    assert!(
        relay.wait(Duration::from_millis(100)).is_none(),
        "{}",
        relay.log()
    );
    common::rabbitmq::rabbitmqctl(&["clear_vhost_limits", "-p", &vhost.name]);
    let mut messages = Vec::new();
    assert!(
        wait_until(WAIT, || {
            vhost.drain("orders", &mut messages);
            messages.len() >= 10
        }),
        "{} in the queue\n{}",
        messages.len(),
        relay.log()
    );
    assert_eq!(messages.len(), 10);
}

/// `check` compares what a declaring sink would declare with what exists: an exchange of
/// another type and a queue with other arguments are reported with the fix (RabbitMQ would
/// refuse `run`'s declarations with PRECONDITION_FAILED); an equivalent exchange is not.
#[test]
fn check_reports_an_exchange_or_queue_that_exists_with_other_settings() {
    let vhost = Vhost::new();
    vhost.declare_queue("events", "orders", "order.#", full_queue_arguments());
    let sinks = format!(
        "{}\n[sinks.same]\ntype = \"rabbitmq\"\nurl = \"{}\"\nexchange = \"events\"\n\
         declare = true\ntimeout = \"5s\"\n",
        exchange_sink(
            &vhost,
            "declare = true\nexchange_type = \"direct\"\nqueue = \"orders\"\n"
        ),
        vhost.amqp_url()
    );
    let Scenario {
        pg: _pg, config, ..
    } = scenario().outbox_sql(OUTBOX).sinks(&sinks).init();
    let (ok, report) = relay_check(&config);
    assert!(!ok, "{report}");
    assert!(
        report.contains("sink rabbit: exchange \"events\" exists with other settings")
            && report.contains("type direct")
            && report.contains("sink rabbit: queue \"orders\" exists with other settings")
            && report.contains("PRECONDITION_FAILED"),
        "{report}"
    );
    assert!(!report.contains("sink same"), "{report}");
}

/// A declaring stream sink whose stream name is taken by a queue that is not a stream: the
/// stream protocol's metadata says "no such stream" for it, so `check` cannot tell; `run`
/// stops on creating it, naming the likely cause.
#[test]
fn a_stream_name_taken_by_another_kind_of_queue_stops_run_with_the_cause() {
    let vhost = Vhost::new();
    vhost.declare_queue("events-exchange", "events", "#", FieldTable::default());
    let sink = format!(
        "[sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"{}\"\n\
         stream = \"events\"\ndeclare = true\ntimeout = \"5s\"\n",
        vhost.stream_url()
    );
    let (Scenario { pg: _pg, .. }, mut relay) = scenario().outbox_sql(OUTBOX).sinks(&sink).start();
    let log = relay.stops_with_failure(WAIT, "the stream's name is a classic queue's");
    assert!(
        log.contains("its name is taken by a queue that is not a stream"),
        "{log}"
    );
}
