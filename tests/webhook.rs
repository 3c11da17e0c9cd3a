//! The webhook sink end to end: PostgreSQL → relay → an HTTP endpoint written in the test
//! (tests/common/webhook.rs, on hyper) that records every request and answers as each test
//! plans: statuses, `Retry-After`, delays past the sink's timeout, dropped connections.

mod common;

use base64::Engine;
use common::certs::{make_ca, make_server_cert};
use common::tls_proxy::TlsProxy;
use common::webhook::{Hook, Recorded, Reply};
use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The signing secret of the tests (Standard Webhooks form).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the tests read of a dead letter: "sink | type | reason".
const LETTER: &str = "sink, row_data->>'type', reason";

/// A `[sinks.hook]` table posting to `url`, with more keys in `extra`.
fn hook_sink(url: &str, extra: &str) -> String {
    format!("[sinks.hook]\ntype = \"webhook\"\nurl = \"{url}\"\n{extra}\n")
}

fn relay_to(sinks: &str) -> ScenarioBuilder {
    scenario().outbox_sql(OUTBOX_WITH_HEADERS).sinks(sinks)
}

/// Waits until the endpoint has accepted `count` distinct events; returns the accepted
/// requests in arrival order.
fn wait_accepted(hook: &Hook, count: usize, relay: &Relay) -> Vec<Recorded> {
    let distinct = |requests: &[Recorded]| {
        requests
            .iter()
            .map(|r| r.header("idempotency-key").to_owned())
            .collect::<HashSet<_>>()
            .len()
    };
    let arrived = wait_until(WAIT, || distinct(&hook.accepted()) >= count);
    assert!(
        arrived,
        "{} of {count} events accepted; relay log:\n{}",
        distinct(&hook.accepted()),
        relay.log()
    );
    hook.accepted()
}

fn bodies(requests: &[Recorded]) -> Vec<Value> {
    requests.iter().map(Recorded::json).collect()
}

/// The signature a Standard Webhooks receiver computes for `request`.
fn expected_signature(request: &Recorded) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let signed = [
        request.header("webhook-id").as_bytes(),
        b".",
        request.header("webhook-timestamp").as_bytes(),
        b".",
        &request.body,
    ]
    .concat();
    let tag = ring::hmac::sign(&key, &signed);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Guarantee: each event is one POST of its CloudEvents envelope to the URL its template
/// renders, once, in per-key order, with `Idempotency-Key` = the event id, a valid Standard
/// Webhooks signature, the configured headers and the `Authorization` from its file.
#[test]
fn events_arrive_once_in_key_order_signed_with_an_idempotency_key() {
    let hook = Hook::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(dir.path(), "secret", &format!("{SECRET}\n"));
    let authorization = write_file(dir.path(), "authorization", "Bearer t0ken\n");
    let sink = hook_sink(
        &hook.url("/hooks/{aggregatetype}"),
        &format!(
            "secret_file = \"{secret}\"\nauthorization_file = \"{authorization}\"\n\
             headers = {{ \"X-Team\" = \"payments\" }}"
        ),
    );
    let (Scenario { pg, .. }, relay) = relay_to(&sink).start();
    insert_numbered(&pg, "order", 0, 40);
    let requests = wait_accepted(&hook, 200, &relay);
    assert_once_in_order(&bodies(&requests), 200);
    for request in &requests {
        let body = request.json();
        assert_eq!(request.path, "/hooks/order");
        assert_eq!(
            request.header("content-type"),
            "application/cloudevents+json; charset=utf-8"
        );
        assert_eq!(request.header("idempotency-key"), body["id"]);
        assert_eq!(request.header("webhook-id"), body["id"]);
        assert_eq!(
            request.header("webhook-signature"),
            expected_signature(request)
        );
        assert_eq!(request.header("authorization"), "Bearer t0ken");
        assert_eq!(request.header("x-team"), "payments");
        assert_eq!(body["tenant"], "acme");
    }
    assert!(!relay.log().contains("t0ken"), "a secret reached the log");
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: in binary mode the body is the payload as stored and the CloudEvents
/// attributes travel as `ce-` headers (percent-encoded).
#[test]
fn binary_mode_sends_the_payload_with_ce_headers() {
    let hook = Hook::start();
    let (Scenario { pg, .. }, relay) =
        relay_to(&hook_sink(&hook.url("/in"), "mode = \"binary\"")).start();
    insert_numbered(&pg, "order", 0, 2);
    let requests = wait_accepted(&hook, 10, &relay);
    let mut numbers = Vec::new();
    for request in &requests {
        let body = request.json();
        numbers.push(body["n"].as_u64().unwrap());
        assert_eq!(request.header("content-type"), "application/json");
        assert_eq!(request.header("ce-specversion"), "1.0");
        assert_eq!(request.header("ce-type"), "Seq");
        assert_eq!(request.header("ce-id"), request.header("idempotency-key"));
        assert!(request.header("ce-subject").starts_with('k'));
        assert_eq!(request.header("ce-tenant"), "acme");
        assert_eq!(request.header("ce-sequence").len(), 24);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..10).collect::<Vec<_>>());
}

/// Guarantee: 429 and 5xx answers are retried, never sooner than their `Retry-After`, and a
/// key's later events wait for the retried one: nothing lost, nothing out of order.
#[test]
fn retries_honour_retry_after_and_keep_per_key_order() {
    let hook = Hook::with_plan(Box::new(|_, count| match count % 5 {
        0 => Reply::status(429).header("Retry-After", "1"),
        3 => Reply::status(503),
        _ => Reply::ok(),
    }));
    let (Scenario { pg, .. }, relay) = relay_to(&hook_sink(&hook.url("/in"), "")).start();
    insert_numbered(&pg, "order", 0, 6);
    let accepted = wait_accepted(&hook, 30, &relay);
    assert_once_in_order(&bodies(&accepted), 30);
    let requests = hook.requests();
    let mut throttled = 0;
    for (i, request) in requests.iter().enumerate() {
        if request.status != 429 {
            continue;
        }
        let id = request.header("idempotency-key");
        if let Some(retry) = requests[i + 1..]
            .iter()
            .find(|r| r.header("idempotency-key") == id)
        {
            throttled += 1;
            assert!(
                retry.at.duration_since(request.at) >= Duration::from_millis(990),
                "retried {:?} after a Retry-After of 1 s",
                retry.at.duration_since(request.at)
            );
        }
    }
    assert!(throttled > 0, "the plan throttled nothing");
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: an event the endpoint refuses (a 4xx other than 408 and 429, or a redirect)
/// is dead-lettered with the status; the stream goes on, in order.
#[test]
fn refused_events_are_dead_lettered_and_the_stream_goes_on() {
    let hook = Hook::with_plan(Box::new(|request, _| {
        match request.json()["type"].as_str() {
            Some("Poison") => Reply::status(422),
            Some("Moved") => Reply::status(308).header("Location", "http://elsewhere/"),
            _ => Reply::ok(),
        }
    }));
    let (Scenario { pg, .. }, relay) = relay_to(&hook_sink(&hook.url("/in"), "")).start();
    insert_numbered(&pg, "order", 0, 1);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'k0', 'Poison', '{}'), ('order', 'k1', 'Moved', '{}')",
    );
    insert_numbered(&pg, "order", 5, 1);
    let accepted = wait_accepted(&hook, 10, &relay);
    assert_once_in_order(&bodies(&accepted), 10);
    assert!(wait_until(WAIT, || dead_letters(&pg, LETTER).len() == 2));
    let letters = dead_letters(&pg, LETTER);
    assert!(
        letters.iter().any(|l| l.starts_with("hook | Poison |")
            && l.contains("answered HTTP 422 Unprocessable Entity")),
        "{letters:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| l.starts_with("hook | Moved |") && l.contains("redirects are not followed")),
        "{letters:?}"
    );
}

/// Guarantee: an event the endpoint refuses after the relay upcast it for this sink is a dead
/// letter that keeps the event as stored (payload and version), the reason naming both
/// versions; replayed once the endpoint takes it, it is upcast again and carries both.
#[test]
fn a_refused_upcast_event_is_kept_as_stored_and_upcast_again_on_replay() {
    let fixed = Arc::new(AtomicBool::new(false));
    let plan_fixed = fixed.clone();
    let hook = Hook::with_plan(Box::new(move |request, _| {
        if request.json()["data"]["total"] == 13 && !plan_fixed.load(Ordering::SeqCst) {
            Reply::status(422)
        } else {
            Reply::ok()
        }
    }));
    let upcaster = "[upcast.OrderPlaced.1]\nto = 2\nprogram = '{total: .amount}'\n";
    let sink = hook_sink(&hook.url("/in"), "upcast = { to = \"latest\" }");
    let (Scenario { pg, config, .. }, relay) = relay_to(&format!("{upcaster}{sink}"))
        .sql("ALTER TABLE outbox ADD COLUMN schema_version int")
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) VALUES \
         ('order', 'k1', 'OrderPlaced', '{\"amount\": 12}', 1), \
         ('order', 'k2', 'OrderPlaced', '{\"amount\": 13}', 1), \
         ('order', 'k3', 'OrderPlaced', '{\"amount\": 14}', 1)",
    );
    wait_accepted(&hook, 2, &relay);
    assert!(wait_until(WAIT, || dead_letters(&pg, LETTER).len() == 1));
    let kept = pg.psql(
        "SELECT (row_data->>'schema_version') || ' ' || \
         ((row_data->>'payload')::jsonb = '{\"amount\": 13}')::text \
         FROM outbox_relay.dead_letters",
    );
    assert_eq!(
        kept, "1 true",
        "the dead letter keeps the stored version and payload"
    );
    let letters = dead_letters(&pg, LETTER);
    assert!(
        letters[0].starts_with("hook | OrderPlaced |")
            && letters[0].contains("answered HTTP 422")
            && letters[0].contains("sent upcast from version 1 to 2"),
        "{letters:?}"
    );

    fixed.store(true, Ordering::SeqCst);
    relay_dlq(&config, &["replay", "--all", "--sink", "hook"]);
    let accepted = wait_accepted(&hook, 3, &relay);
    let replayed = bodies(&accepted)
        .into_iter()
        .find(|body| body["data"]["total"] == 13)
        .expect("the replay reached the endpoint");
    assert_eq!(replayed["schemaversion"], 2);
    assert_eq!(replayed["originalschemaversion"], 1);
}

/// Guarantee: connections dropped without an answer and answers slower than the sink's
/// timeout are retried: nothing lost, every event's last copy in per-key order, and a
/// repeat carries the same `Idempotency-Key` (at-least-once).
#[test]
fn dropped_connections_and_slow_answers_are_retried_at_least_once() {
    let hook = Hook::with_plan(Box::new(|_, count| match count % 7 {
        2 => Reply::dropped(),
        5 => Reply::ok().after(Duration::from_millis(1500)),
        _ => Reply::ok(),
    }));
    let (Scenario { pg, .. }, relay) =
        relay_to(&hook_sink(&hook.url("/in"), "timeout = \"500ms\"")).start();
    insert_numbered(&pg, "order", 0, 10);
    let accepted = wait_accepted(&hook, 50, &relay);
    // The last copy of each event, in arrival order.
    let mut seen = HashSet::new();
    let mut last: Vec<Value> = bodies(&accepted)
        .into_iter()
        .rev()
        .filter(|b| seen.insert(b["id"].as_str().unwrap().to_owned()))
        .collect();
    last.reverse();
    assert_once_in_order(&last, 50);
    assert!(
        hook.requests().iter().any(|r| r.status == 0),
        "the plan dropped nothing"
    );
    assert!(dead_letters(&pg, LETTER).is_empty());
}

/// Guarantee: `concurrency` bounds the requests in flight, and different keys use it.
#[test]
fn concurrency_bounds_the_requests_in_flight() {
    let hook = Hook::with_plan(Box::new(|_, _| {
        Reply::ok().after(Duration::from_millis(100))
    }));
    let (Scenario { pg, .. }, relay) =
        relay_to(&hook_sink(&hook.url("/in"), "concurrency = 3")).start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'key' || n, 'Seq', jsonb_build_object('n', n) \
         FROM generate_series(1, 30) n",
    );
    wait_accepted(&hook, 30, &relay);
    assert_eq!(hook.max_in_flight(), 3);
}

/// Guarantee: `https` endpoints are verified against `ca_file` (or the platform's roots,
/// which do not hold the test CA: `check` and `run` say so and nothing is delivered).
#[test]
fn https_endpoints_are_verified_against_the_ca_file() {
    let hook = Hook::start();
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "ca");
    let server = make_server_cert(certs.path(), "hook", &ca, "01", "IP:127.0.0.1");
    let proxy = TlsProxy::start(&server.cert, &server.key, hook.port);
    let url = format!("https://127.0.0.1:{}/secure", proxy.port);
    let ca_file = ca.cert.display().to_string();
    let Scenario { pg, config, .. } =
        relay_to(&hook_sink(&url, &format!("ca_file = \"{ca_file}\""))).init();
    let (ok, text) = relay_check(&config);
    assert!(ok, "{text}");
    let relay = Relay::start(&config);
    insert_numbered(&pg, "order", 0, 1);
    let accepted = wait_accepted(&hook, 5, &relay);
    assert!(accepted.iter().all(|r| r.path == "/secure"));
    drop(relay);

    let Scenario {
        pg: _pg, config, ..
    } = relay_to(&hook_sink(&url, "")).init();
    let (ok, text) = relay_check(&config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("sink hook: cannot connect to https://127.0.0.1") && text.contains("ca_file"),
        "{text}"
    );
}

/// The example config/webhook.toml works as documented, with the database URL and the
/// endpoint's URL from the environment.
#[test]
fn the_example_config_works_with_settings_from_the_environment() {
    let hook = Hook::start();
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "webhook.toml");
    let url = pg.url();
    let hook_url = hook.url("/events/{aggregatetype}");
    let env = [
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("OUTBOX_RELAY__SINKS__ORDERS__URL", hook_url.as_str()),
    ];
    init_and_check(&config, &env);
    let relay = Relay::start_with_env(&config, &env);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'OrderCreated', '{\"n\": 1}')");
    let requests = wait_accepted(&hook, 1, &relay);
    assert_eq!(requests[0].path, "/events/order");
    assert_eq!(requests[0].json()["data"]["n"], 1);
}
