//! The EventBridge sink end to end: PostgreSQL → relay → moto's EventBridge (installed in
//! .venv-brokers by scripts/install-test-deps.sh) → a rule → an SQS queue, read back with
//! the AWS SDK. Each test starts its own moto server and PostgreSQL cluster.
//!
//! Failures moto cannot produce (throttling, 5xx, entries refused in part of a request, a
//! request refused as invalid) come from a small HTTP proxy between the relay and moto that
//! refuses chosen requests or entries before they reach moto, as EventBridge does: a
//! refused entry is not published.

mod common;

use common::aws::{eventbridge_sink, Aws, Moto, AWS_ENV};
use common::aws_proxy::{self, forward, forward_whole, json_response};
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

/// Inserts `count` events in one transaction: keys k0..k{keys-1} in turn, payload `{"n": i}`.
fn insert_events(pg: &PgCluster, first: usize, count: usize, keys: usize) {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k' || (i % {keys}), 'OrderUpdated', jsonb_build_object('n', i) \
         FROM generate_series({first}, {}) AS i",
        first + count - 1
    ));
}

/// Asserts that every key's events (CloudEvents details) arrived in commit order.
fn assert_per_key_order(events: &[Value]) {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for event in events {
        let detail = &event["detail"];
        let key = detail["subject"].as_str().unwrap().to_owned();
        let sequence = detail["sequence"].as_str().unwrap().to_owned();
        if let Some(previous) = last.get(&key) {
            assert!(
                *previous < sequence,
                "key {key}: {sequence} arrived after {previous}"
            );
        }
        last.insert(key, sequence);
    }
}

fn ids(events: &[Value]) -> HashSet<String> {
    events
        .iter()
        .map(|e| e["detail"]["id"].as_str().unwrap().to_owned())
        .collect()
}

/// What the tests read of a dead letter: "sink | type | reason".
const LETTER: &str = "sink, row_data->>'type', reason";

/// A scenario on `outbox` whose one sink, `bus`, puts to `bus` at `endpoint` (more sink
/// keys in `extra`).
fn bus_relay(bus: &str, endpoint: &str, extra: &str) -> ScenarioBuilder {
    scenario()
        .outbox("outbox")
        .sinks(&eventbridge_sink("bus", bus, endpoint, extra))
}

/// Guarantee: each event becomes one PutEvents entry whose source, detail-type, detail
/// (CloudEvents envelope with the outbox id, or the raw payload), resources and time are
/// what the configuration says; a rule routes them to SQS.
#[test]
fn events_arrive_through_a_rule_with_their_source_detail_type_and_detail() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let (cloud_bus, raw_bus) = (unique("orders"), unique("raw"));
    let cloud_queue = aws.bus_into_queue(&cloud_bus);
    let raw_queue = aws.bus_into_queue(&raw_bus);

    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text \
         NOT NULL, type text NOT NULL, payload jsonb NOT NULL, occurred_at timestamptz, traceparent text)",
    );
    let dir = tempfile::tempdir().unwrap();
    let sinks = format!(
        "[sinks.cloud]\ntype = \"eventbridge\"\nbus = \"{cloud_bus}\"\n\
         resources = [\"arn:aws:example:us-east-1:123456789012:order/{{aggregateid}}\"]\n\n\
         [sinks.raw]\ntype = \"eventbridge\"\nbus = \"{raw_bus}\"\nformat = \"raw\"\n\
         source = \"outbox.raw.{{aggregatetype}}\"\ndetail_type = \"{{aggregatetype}}.{{type}}\"\n"
    );
    let config = ConfigFile::new().sinks(&sinks).write(dir.path(), &pg);
    init(&config);
    let moto_url = moto.url();
    let mut env = AWS_ENV.to_vec();
    env.push(("AWS_ENDPOINT_URL", &moto_url));
    let relay = Relay::start_with_env(&config, &env);
    pg.psql(
        "INSERT INTO outbox VALUES \
         ('11111111-1111-4111-8111-111111111111', 'order', 'o-1', 'OrderCreated', '{\"total\": 42.5}', \
          '2026-01-02 03:04:05+00', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'), \
         ('22222222-2222-4222-8222-222222222222', 'order', 'o-1', 'OrderPaid', '{\"method\": \"card\"}', NULL, NULL), \
         ('33333333-3333-4333-8333-333333333333', 'customer', 'c-9', 'CustomerJoined', '{\"name\": \"ada\"}', NULL, NULL)",
    );

    let cloud = aws.wait_for(&cloud_queue, 3, &relay);
    assert_eq!(cloud.len(), 3);
    let by_id = |id: &str| {
        cloud
            .iter()
            .find(|e| e["detail"]["id"] == id)
            .unwrap_or_else(|| panic!("{id} is missing: {cloud:?}"))
    };
    let first = by_id("11111111-1111-4111-8111-111111111111");
    assert_eq!(first["time"], "2026-01-02T03:04:05Z", "Time is occurred_at");
    assert_eq!(first["source"], "outbox.order");
    assert_eq!(first["detail-type"], "OrderCreated");
    assert_eq!(
        first["resources"],
        json!(["arn:aws:example:us-east-1:123456789012:order/o-1"])
    );
    let detail = &first["detail"];
    assert_eq!(detail["specversion"], "1.0");
    assert_eq!(detail["id"], "11111111-1111-4111-8111-111111111111");
    assert_eq!(detail["type"], "OrderCreated");
    assert_eq!(detail["subject"], "o-1");
    assert_eq!(detail["time"], "2026-01-02T03:04:05Z");
    assert_eq!(
        detail["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(detail["data"], json!({"total": 42.5}));
    let customer = by_id("33333333-3333-4333-8333-333333333333");
    assert_eq!(customer["source"], "outbox.customer");
    assert_eq!(customer["detail-type"], "CustomerJoined");
    assert_per_key_order(&cloud);
    assert_eq!(
        ids(&cloud),
        [
            "11111111-1111-4111-8111-111111111111",
            "22222222-2222-4222-8222-222222222222",
            "33333333-3333-4333-8333-333333333333"
        ]
        .map(String::from)
        .into()
    );

    let raw = aws.wait_for(&raw_queue, 3, &relay);
    let mut seen: Vec<(String, String, Value)> = raw
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().to_owned(),
                e["detail-type"].as_str().unwrap().to_owned(),
                e["detail"].clone(),
            )
        })
        .collect();
    seen.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        seen,
        [
            (
                "outbox.raw.customer".to_owned(),
                "customer.CustomerJoined".to_owned(),
                json!({"name": "ada"})
            ),
            (
                "outbox.raw.order".to_owned(),
                "order.OrderCreated".to_owned(),
                json!({"total": 42.5})
            ),
            (
                "outbox.raw.order".to_owned(),
                "order.OrderPaid".to_owned(),
                json!({"method": "card"})
            ),
        ]
    );
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: an entry EventBridge refuses for good is dead-lettered with the service's
/// reason, and the other entries of the same batch, including later events of the same key,
/// are delivered. moto refuses an empty DetailType with InvalidArgument per entry (AWS does
/// too); an event with an empty type produces one.
#[test]
fn an_entry_refused_by_eventbridge_is_dead_lettered_and_the_rest_delivered() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("orders");
    let queue = aws.bus_into_queue(&bus);
    let (Scenario { pg, .. }, relay) = bus_relay(&bus, &moto.url(), "").start_with_env(&AWS_ENV);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'OrderCreated', '{\"n\": 1}'), \
         ('order', 'o-2', 'OrderCreated', '{\"n\": 2}'), \
         ('order', 'o-1', '', '{\"n\": 3}'), \
         ('order', 'o-1', 'OrderPaid', '{\"n\": 4}'), \
         ('order', 'o-2', 'OrderPaid', '{\"n\": 5}')",
    );
    let events = aws.wait_for(&queue, 4, &relay);
    let numbers: HashSet<i64> = events
        .iter()
        .map(|e| e["detail"]["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 4, 5].into());
    assert_per_key_order(&events);
    assert!(wait_until(WAIT, || !dead_letters(&pg, LETTER).is_empty()));
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("bus |  | EventBridge rejected the entry: InvalidArgument"),
        "{letters:?}"
    );
}

/// Guarantee: an event larger than EventBridge's 256 KiB entry limit is dead-lettered by
/// the relay (moto does not enforce the limit), and the events around it are delivered.
#[test]
fn an_oversized_event_is_dead_lettered_by_the_relay() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("orders");
    let queue = aws.bus_into_queue(&bus);
    let (Scenario { pg, .. }, relay) = bus_relay(&bus, &moto.url(), "").start_with_env(&AWS_ENV);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'Small', '{\"n\": 1}'), \
         ('order', 'o-1', 'Huge', jsonb_build_object('blob', repeat('x', 300000))), \
         ('order', 'o-1', 'Small', '{\"n\": 3}')",
    );
    let events = aws.wait_for(&queue, 2, &relay);
    assert_eq!(
        events
            .iter()
            .map(|e| e["detail"]["data"]["n"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [1, 3]
    );
    assert!(wait_until(WAIT, || !dead_letters(&pg, LETTER).is_empty()));
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("bus | Huge | the event is 300")
            && letters[0].contains("over the limit of 262144 bytes"),
        "{letters:?}"
    );
}

/// A bytea payload: a `raw` Detail cannot hold bytes, which `check` names before `run`
/// dead-letters them with the same fix; a `cloudevents` Detail carries them as `data_base64`.
#[test]
fn a_bytea_payload_is_data_base64_in_the_envelope_and_refused_as_a_raw_detail() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("bytes");
    let queue = aws.bus_into_queue(&bus);
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload bytea NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let sink = |name: &str, format: &str| {
        eventbridge_sink(name, &bus, &moto.url(), &format!("format = \"{format}\""))
    };
    let config = ConfigFile::new()
        .sinks(&format!(
            "{}{}",
            sink("envelope", "cloudevents"),
            sink("detail", "raw")
        ))
        .write(dir.path(), &pg);
    init(&config);
    let out = relay_command_with_env(&config, "check", &AWS_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && stdout
                .contains("sink detail: the payload column of outbox table public.outbox is bytea")
            && stdout.contains("format = \"cloudevents\"")
            && !stdout.contains("sink envelope:"),
        "{stdout}"
    );
    let relay = Relay::start_with_env(&config, &AWS_ENV);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'Avro', '\\xdeadbeef')",
    );
    let events = aws.wait_for(&queue, 1, &relay);
    assert_eq!(events[0]["detail"]["data_base64"], "3q2+7w==");
    assert_eq!(
        events[0]["detail"]["datacontenttype"],
        "application/octet-stream"
    );
    assert!(wait_until(WAIT, || !dead_letters(&pg, LETTER).is_empty()));
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("detail | Avro | the payload is bytes (a bytea column)"),
        "{letters:?}"
    );
}

/// EventBridge's protocol: JSON 1.1.
const JSON_1_1: &str = "application/x-amz-json-1.1";

/// Failures the proxy injects into PutEvents requests before they reach moto.
#[derive(Default)]
struct Faults {
    /// Whole requests still to refuse: 500 InternalFailure and 400 ThrottlingException in turn.
    whole: AtomicUsize,
    /// Requests of several entries still to answer with every other entry refused
    /// (ThrottlingException), the rest forwarded.
    partial: AtomicUsize,
    /// Requests holding an entry of this detail type are refused as invalid (400).
    invalid_detail_type: Option<&'static str>,
    /// Hold the first full (10-entry) PutEvents request until another one arrives (for at
    /// most 10 s): a batch with more than 10 keys ready sends the next request at once.
    hold_first_full: bool,
    injected_whole: AtomicUsize,
    injected_entries: AtomicUsize,
    injected_invalid: AtomicUsize,
    full_requests_seen: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    overlap: tokio::sync::Notify,
}

/// Takes one from `counter` if it is not zero; returns what it was.
fn take(counter: &AtomicUsize) -> Option<usize> {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .ok()
}

/// Starts the fault-injecting proxy to moto on `rt`; returns its URL.
fn start_proxy(rt: &Runtime, moto: &Moto, faults: Arc<Faults>) -> String {
    aws_proxy::start(rt, moto.port, move |head, body, upstream| {
        let faults = faults.clone();
        async move { respond(&head, &body, upstream, &faults).await }
    })
}

async fn respond(head: &str, body: &[u8], upstream: u16, faults: &Faults) -> Vec<u8> {
    if aws_proxy::target(head) != "AWSEvents.PutEvents" {
        return forward_whole(head, body, upstream).await;
    }
    let concurrent = faults.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    faults.max_in_flight.fetch_max(concurrent, Ordering::SeqCst);
    if concurrent >= 2 {
        faults.overlap.notify_one();
    }
    let entries = serde_json::from_slice::<Value>(body).unwrap()["Entries"]
        .as_array()
        .map_or(0, Vec::len);
    if faults.hold_first_full
        && entries == 10
        && faults.full_requests_seen.fetch_add(1, Ordering::SeqCst) == 0
    {
        let _ = tokio::time::timeout(Duration::from_secs(10), faults.overlap.notified()).await;
    }
    let response = put_events(head, body, upstream, faults).await;
    faults.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn put_events(head: &str, body: &[u8], upstream: u16, faults: &Faults) -> Vec<u8> {
    let request: Value = serde_json::from_slice(body).unwrap();
    let entries = request["Entries"].as_array().unwrap().clone();
    if let Some(invalid) = faults.invalid_detail_type {
        if entries.iter().any(|e| e["DetailType"] == invalid) {
            faults.injected_invalid.fetch_add(1, Ordering::SeqCst);
            return json_response(
                JSON_1_1,
                "400 Bad Request",
                &json!({"__type": "ValidationException", "message": "1 validation error detected (injected)"}),
            );
        }
    }
    if let Some(left) = take(&faults.whole) {
        faults.injected_whole.fetch_add(1, Ordering::SeqCst);
        return if left % 2 == 0 {
            json_response(
                JSON_1_1,
                "500 Internal Server Error",
                &json!({"__type": "InternalFailure", "message": "injected"}),
            )
        } else {
            json_response(
                JSON_1_1,
                "400 Bad Request",
                &json!({"__type": "ThrottlingException", "message": "Rate exceeded (injected)"}),
            )
        };
    }
    if entries.len() >= 2 && take(&faults.partial).is_some() {
        let kept: Vec<Value> = entries.iter().step_by(2).cloned().collect();
        let refused = entries.len() - kept.len();
        faults.injected_entries.fetch_add(refused, Ordering::SeqCst);
        let forwarded = serde_json::to_vec(&json!({ "Entries": kept })).unwrap();
        let (_, answer) = forward(head, &forwarded, upstream).await;
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        let mut accepted = answer["Entries"].as_array().unwrap().iter();
        let results: Vec<Value> = (0..entries.len())
            .map(|i| match i % 2 {
                0 => accepted.next().unwrap().clone(),
                _ => json!({"ErrorCode": "ThrottlingException", "ErrorMessage": "Rate exceeded (injected)"}),
            })
            .collect();
        let failed = answer["FailedEntryCount"].as_u64().unwrap() as usize + refused;
        return json_response(
            JSON_1_1,
            "200 OK",
            &json!({"FailedEntryCount": failed, "Entries": results}),
        );
    }
    forward_whole(head, body, upstream).await
}

/// Guarantee: throttling and server errors, of whole requests and of single entries, are
/// retried without loss and without reordering any key; since refused entries are not
/// published (the proxy never forwards them), every event arrives exactly once here. Also:
/// requests for different keys are in flight at the same time.
#[test]
fn throttling_and_server_errors_are_retried_without_loss_or_reordering() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let faults = Arc::new(Faults {
        whole: AtomicUsize::new(5),
        partial: AtomicUsize::new(6),
        hold_first_full: true,
        ..Faults::default()
    });
    let proxy = start_proxy(&aws.rt, &moto, faults.clone());
    let bus = unique("orders");
    let queue = aws.bus_into_queue(&bus);
    let Scenario { pg, config, .. } = bus_relay(&bus, &proxy, "concurrency = 4").init();
    // 25 keys, written before the relay starts so that its first batches hold many keys:
    // their first events fill three requests, sent concurrently.
    insert_events(&pg, 0, 30, 25);
    for tx in 0..9 {
        insert_events(&pg, 30 + tx * 10, 10, 25);
    }
    let total = 120;
    let relay = Relay::start_with_env(&config, &AWS_ENV);
    let events = aws.wait_for(&queue, total, &relay);
    assert_eq!(events.len(), total);
    assert_eq!(ids(&events).len(), total, "an event arrived twice");
    assert_per_key_order(&events);
    assert!(
        faults.max_in_flight.load(Ordering::SeqCst) >= 2,
        "requests for different keys were not sent concurrently"
    );
    assert_eq!(faults.injected_whole.load(Ordering::SeqCst), 5);
    assert_eq!(faults.partial.load(Ordering::SeqCst), 0);
    assert!(faults.injected_entries.load(Ordering::SeqCst) >= 6);
    assert!(dead_letters(&pg, LETTER).is_empty());
    let log = relay.log();
    assert!(
        log.contains("PutEvents failed; retrying its entries"),
        "{log}"
    );
    assert!(
        log.contains("PutEvents refused some entries for now"),
        "{log}"
    );
}

/// Guarantee: when EventBridge refuses a whole request as invalid because of one entry, the
/// relay sends its entries one by one, dead-letters only the one at fault and delivers the
/// rest.
#[test]
fn a_request_refused_as_invalid_is_split_and_only_the_bad_entry_dead_lettered() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let faults = Arc::new(Faults {
        invalid_detail_type: Some("Poison"),
        ..Faults::default()
    });
    let proxy = start_proxy(&aws.rt, &moto, faults.clone());
    let bus = unique("orders");
    let queue = aws.bus_into_queue(&bus);
    let (Scenario { pg, .. }, relay) = bus_relay(&bus, &proxy, "").start_with_env(&AWS_ENV);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'OrderCreated', '{\"n\": 1}'), \
         ('order', 'o-2', 'Poison', '{\"n\": 2}'), \
         ('order', 'o-3', 'OrderCreated', '{\"n\": 3}'), \
         ('order', 'o-2', 'OrderPaid', '{\"n\": 4}')",
    );
    let events = aws.wait_for(&queue, 3, &relay);
    let numbers: HashSet<i64> = events
        .iter()
        .map(|e| e["detail"]["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 3, 4].into());
    assert!(wait_until(WAIT, || !dead_letters(&pg, LETTER).is_empty()));
    let letters = dead_letters(&pg, LETTER);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0].starts_with("bus | Poison | EventBridge refused the entry")
            && letters[0].contains("ValidationException"),
        "{letters:?}"
    );
    assert!(faults.injected_invalid.load(Ordering::SeqCst) >= 2);
}

/// Guarantee: a bus that does not exist is a clear error: `check` names it with the fix,
/// and `run` stops with it instead of dead-lettering events (nothing is lost: the events
/// are sent once the bus exists).
#[test]
fn a_missing_bus_is_reported_by_check_and_stops_run() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("missing");
    let Scenario { pg, config, .. } = bus_relay(&bus, &moto.url(), "").init();
    let out = relay_command_with_env(&config, "check", &AWS_ENV);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("sink bus: event bus \"{bus}\" does not exist"))
            && stdout.contains("create-event-bus"),
        "{stdout}"
    );

    let mut relay = Relay::start_with_env(&config, &AWS_ENV);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'OrderCreated', '{}')");
    let log = relay.stops_with_failure(WAIT, "the relay should stop");
    assert!(
        log.contains("ResourceNotFoundException")
            && log.contains(&format!("event bus {bus} does not exist"))
            && log.contains(&format!("create-event-bus --name {bus}")),
        "{log}"
    );

    let queue = aws.bus_into_queue(&bus);
    assert!(relay_command_with_env(&config, "check", &AWS_ENV)
        .status
        .success());
    let relay = Relay::start_with_env(&config, &AWS_ENV);
    let events = aws.wait_for(&queue, 1, &relay);
    assert_eq!(events[0]["detail-type"], "OrderCreated");
}

/// Guarantees across restarts: after SIGTERM nothing is lost or repeated; after kill -9
/// nothing is lost, events acknowledged after the last checkpoint are sent again (same
/// event id in the detail), and every event's last copy is in per-key order.
#[test]
fn restarts_lose_nothing_and_keep_per_key_order() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("orders");
    let queue = aws.bus_into_queue(&bus);
    let Scenario { pg, config, .. } = bus_relay(&bus, &moto.url(), "").init();

    let mut relay = Relay::start_with_env(&config, &AWS_ENV);
    insert_events(&pg, 0, 50, 4);
    let mut events = aws.wait_for(&queue, 50, &relay);
    assert!(relay.terminate(WAIT).is_some_and(|s| s.success()));
    insert_events(&pg, 50, 50, 4);
    let relay = Relay::start_with_env(&config, &AWS_ENV);
    let mut more = Vec::new();
    assert!(wait_until(WAIT, || {
        aws.receive(&queue, &mut more);
        more.len() >= 50
    }));
    events.extend(more);
    assert_eq!(events.len(), 100, "SIGTERM: {}", relay.log());
    assert_eq!(ids(&events).len(), 100, "SIGTERM repeated an event");
    assert_per_key_order(&events);

    let mut relay = relay;
    for round in 0..3 {
        let first = 100 + round * 200;
        for tx in 0..20 {
            insert_events(&pg, first + tx * 10, 10, 4);
        }
        let before = events.len();
        assert!(wait_until(WAIT, || {
            aws.receive(&queue, &mut events);
            events.len() > before
        }));
        relay.kill9();
        relay = Relay::start_with_env(&config, &AWS_ENV);
    }
    let expected = 100 + 3 * 200;
    assert!(
        wait_until(WAIT, || {
            aws.receive(&queue, &mut events);
            ids(&events).len() == expected
        }),
        "{} of {expected} events arrived; relay log:\n{}",
        ids(&events).len(),
        relay.log()
    );
    let mut last_copies: Vec<Value> = Vec::new();
    let mut seen = HashSet::new();
    for event in events.iter().rev() {
        if seen.insert(event["detail"]["id"].as_str().unwrap().to_owned()) {
            last_copies.push(event.clone());
        }
    }
    last_copies.reverse();
    assert_per_key_order(&last_copies);
}

/// The example config/eventbridge.toml works as documented, with the database URL, the
/// credentials and the endpoint from the environment.
#[test]
fn the_example_config_works_with_the_url_and_aws_settings_from_the_environment() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let queue = aws.bus_into_queue("orders");
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "eventbridge.toml");
    let (url, moto_url) = (pg.url(), moto.url());
    let mut env = AWS_ENV.to_vec();
    env.extend([
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("AWS_ENDPOINT_URL", moto_url.as_str()),
    ]);
    let out = relay_command_with_env(&config, "init", &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = relay_command_with_env(&config, "check", &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let relay = Relay::start_with_env(&config, &env);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'OrderCreated', '{\"n\": 1}')");
    let events = aws.wait_for(&queue, 1, &relay);
    assert_eq!(events[0]["source"], "outbox.order");
    assert_eq!(events[0]["detail"]["data"]["n"], 1);
}

/// Guarantee: EventBridge unreachable for 30 s mid-stream (the emulator stopped with
/// SIGSTOP: requests time out) delays delivery but loses nothing and keeps per-key order.
#[test]
fn a_30_second_outage_delays_but_loses_nothing() {
    let moto = Moto::start();
    let aws = Aws::new(&moto);
    let bus = unique("outage");
    let queue = aws.bus_into_queue(&bus);
    let (Scenario { pg, .. }, relay) =
        bus_relay(&bus, &moto.url(), "timeout = \"2s\"").start_with_env(&AWS_ENV);
    insert_events(&pg, 0, 20, 4);
    let mut events = aws.wait_for(&queue, 20, &relay);

    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &moto.pid().to_string()])
            .status()
            .unwrap()
    };
    signal("-STOP");
    let stopped = std::time::Instant::now();
    insert_events(&pg, 20, 20, 4);
    assert!(
        wait_until(WAIT, || relay.log().contains("PutEvents failed; retrying")),
        "the relay should retry while EventBridge is down:\n{}",
        relay.log()
    );
    // The outage lasts 30 s whatever the relay does.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed()));
    signal("-CONT");
    assert!(
        wait_until(WAIT, || {
            aws.receive(&queue, &mut events);
            ids(&events).len() >= 40
        }),
        "{} events after the outage; relay log:\n{}",
        ids(&events).len(),
        relay.log()
    );
    assert_eq!(ids(&events).len(), 40, "nothing lost");
    // Requests that timed out while the emulator was stopped are still processed when it
    // resumes, so an event can arrive twice (at-least-once): order holds for first copies.
    let mut seen = HashSet::new();
    let first_copies: Vec<Value> = events
        .iter()
        .filter(|e| seen.insert(e["detail"]["id"].to_string()))
        .cloned()
        .collect();
    assert_per_key_order(&first_copies);
    assert!(dead_letters(&pg, LETTER).is_empty());
}
