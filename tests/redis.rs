//! The Redis Streams sink against a real redis-server (tests/common/redis.rs): entries in
//! commit order with the position as their id, exactly once across kill -9, a paused and a
//! restarted Redis, dead letters for what Redis cannot take, and `check`.

mod common;

use common::redis::{Entry, Redis};
use common::*;
use std::collections::HashSet;

/// The `event` field of each entry.
fn events_of(entries: &[Entry]) -> Vec<serde_json::Value> {
    entries.iter().map(Entry::event).collect()
}

fn redis_sink(redis: &Redis, extra: &str) -> String {
    format!(
        "[sinks.redis]\ntype = \"redis\"\nurl = \"{}\"\ntimeout = \"2s\"\n{extra}\n",
        redis.url()
    )
}

/// Waits until `stream` holds `count` distinct events; returns its entries.
fn wait_for(redis: &Redis, stream: &str, count: usize, relay: &Relay) -> Vec<Entry> {
    let mut entries = Vec::new();
    let complete = wait_until(WAIT, || {
        entries = redis.entries(stream);
        entries
            .iter()
            .map(|e| e.text("id"))
            .collect::<HashSet<_>>()
            .len()
            >= count
    });
    assert!(
        complete,
        "{} of {count} in {stream}; relay log:\n{}",
        entries.len(),
        relay.log()
    );
    entries
}

#[test]
fn events_are_entries_in_commit_order_with_their_position_as_id() {
    let redis = Redis::start();
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&redis_sink(&redis, ""))
        .start();
    insert_numbered(&pg, "order", 0, 4);
    insert_numbered(&pg, "invoice", 0, 2);
    insert_numbered(&pg, "order", 20, 2);
    let orders = wait_for(&redis, "outbox.order", 30, &relay);
    let invoices = wait_for(&redis, "outbox.invoice", 10, &relay);
    assert_once_in_order(&events_of(&orders), 30);
    assert_once_in_order(&events_of(&invoices), 10);
    let first = &orders[0];
    let position = outbox_relay_sinks::redis::position_of(&first.id).expect("a position");
    assert_eq!(first.event()["lsn"], position.commit_lsn.to_string());
    assert_eq!(first.event()["id"], first.text("id"));
    assert_eq!(first.text("type"), "Seq");
    assert_eq!(first.text("aggregatetype"), "order");
    assert_eq!(first.text("header:tenant"), "acme");
    // Entry ids are positions: they grow across both streams in commit order.
    let mut all: Vec<_> = orders
        .iter()
        .chain(&invoices)
        .map(|e| outbox_relay_sinks::redis::position_of(&e.id).unwrap())
        .collect();
    let in_stream_order = all.clone();
    all.sort();
    assert_eq!(all.len(), 40);
    assert!(in_stream_order[..30].windows(2).all(|w| w[0] < w[1]));
}

/// kill -9 while rows are written, three times: what the relay sends again after a restart
/// is refused by Redis (its id is not above the stream's last) and found there, so every
/// event is in its stream once, every key in order. With a stream template the relay's
/// checkpoint table decides where to resume; with one stream, the stream's last id.
#[test]
fn kill_9_loses_and_repeats_nothing() {
    for stream in ["outbox.{aggregatetype}", "events"] {
        let redis = Redis::start();
        let (Scenario { pg, config, .. }, mut relay) = scenario()
            .outbox_sql(OUTBOX_WITH_HEADERS)
            .relay("batch_size = 20")
            .sinks(&redis_sink(&redis, &format!("stream = \"{stream}\"")))
            .start();
        let read = if stream == "events" {
            "events"
        } else {
            "outbox.order"
        };
        for round in 0..3 {
            insert_numbered(&pg, "order", round * 100, 20);
            assert!(wait_until(WAIT, || redis.entries(read).len() > round * 100));
            relay.kill9();
            relay = Relay::start(&config);
        }
        let entries = wait_for(&redis, read, 300, &relay);
        assert_once_in_order(&events_of(&entries), 300);
        relay.stops_cleanly();
    }
}

/// Redis paused (SIGSTOP) past the sink's timeout, then stopped and started again: the relay
/// retries, says it is not ready meanwhile, and every event arrives once, in order.
#[test]
fn a_paused_and_a_restarted_redis_delay_but_lose_nothing() {
    let mut redis = Redis::start();
    let port = free_port();
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .tables(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"))
        .sinks(&redis_sink(&redis, "stream = \"events\""))
        .start();
    insert_numbered(&pg, "order", 0, 4);
    wait_for(&redis, "events", 20, &relay);

    redis.signal("-STOP");
    insert_numbered(&pg, "order", 20, 4);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("sink failed; retrying the batch")),
        "{}",
        relay.log()
    );
    let not_ready = http_get(port, "/readyz");
    redis.signal("-CONT");
    assert_eq!(
        not_ready,
        Some((503, "streaming; failing sinks: redis\n".into()))
    );
    wait_for(&redis, "events", 40, &relay);

    redis.restart();
    insert_numbered(&pg, "order", 40, 4);
    let entries = wait_for(&redis, "events", 60, &relay);
    assert_once_in_order(&events_of(&entries), 60);
    assert!(wait_until(WAIT, || http_get(port, "/readyz")
        == Some((200, "streaming\n".into()))));
}

/// An entry over `max_entry_bytes`, and events whose ids another writer's entry already
/// passed, are dead-lettered with the reason; the events after them arrive.
#[test]
fn what_redis_cannot_take_is_dead_lettered_and_the_stream_goes_on() {
    let redis = Redis::start();
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&redis_sink(
            &redis,
            "stream = \"events\"\nmax_entry_bytes = 2000",
        ))
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'big', 'Big', jsonb_build_object('pad', repeat('x', 3000)))",
    );
    insert_numbered(&pg, "order", 0, 1);
    wait_for(&redis, "events", 5, &relay);
    assert!(wait_until(WAIT, || dead_letters(&pg, "sink, reason").len() == 1));
    let letters = dead_letters(&pg, "sink, reason");
    assert!(
        letters[0].starts_with("redis | the stream entry is ")
            && letters[0].contains("over sinks.redis.max_entry_bytes (2000)"),
        "{letters:?}"
    );

    // Another writer's entry far past the relay's positions.
    redis.command(&["XADD", "events", "999999999999-0", "id", "foreign"]);
    insert_numbered(&pg, "order", 5, 1);
    assert!(wait_until(WAIT, || dead_letters(&pg, "sink, reason").len() == 6));
    let letters = dead_letters(&pg, "reason");
    assert!(
        letters[1].contains("Redis refused entry")
            && letters[1].contains("another writer, or a reset stream"),
        "{letters:?}"
    );
    assert_eq!(redis.entries("events").len(), 6);
}

/// `check` names an unreachable Redis, a stream key of another type and an eviction policy
/// that could drop streams; `run` stops with the fix on a key of another type.
#[test]
fn check_reports_what_would_lose_or_stop_events() {
    let mut redis = Redis::start();
    let scenario = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&redis_sink(&redis, "stream = \"events\""))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(ok, "{text}");

    redis.command(&["SET", "events", "not a stream"]);
    redis.restart_with("maxmemory-policy allkeys-lru");
    let (ok, text) = relay_check(&scenario.config);
    assert!(!ok);
    assert!(
        text.contains("key \"events\" holds a string, not a stream")
            && text.contains("maxmemory-policy allkeys-lru"),
        "{text}"
    );
    let mut relay = Relay::start(&scenario.config);
    scenario.pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o', 'T', '{}')",
    );
    let log = relay.stops_with_failure(WAIT, "the stream key holds a string");
    assert!(log.contains("holds another type"), "{log}");

    drop(redis);
    let (ok, text) = relay_check(&scenario.config);
    assert!(!ok);
    assert!(text.contains("connecting to Redis"), "{text}");
}

/// The example config/redis.toml works as documented, with the database URL and the Redis
/// URL from the environment.
#[test]
fn the_example_config_works_with_the_urls_from_the_environment() {
    let redis = Redis::start();
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "redis.toml");
    let (url, redis_url) = (pg.url(), redis.url());
    let env = [
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("OUTBOX_RELAY__SINKS__STREAMS__URL", redis_url.as_str()),
    ];
    init_and_check(&config, &env);
    let relay = Relay::start_with_env(&config, &env);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'OrderCreated', '{\"n\": 1}')",
    );
    let entries = wait_for(&redis, "outbox.order", 1, &relay);
    assert_eq!(entries[0].event()["data"]["n"], 1);
}

/// Guarantee: an ACL user logs in with the user in `url` and the password from
/// `password_file` (the password never in the log); a wrong password is reported by `check`
/// and stops `run` with the fix instead of retrying forever.
#[test]
fn an_acl_user_logs_in_with_its_password_file_and_a_wrong_one_stops_the_relay() {
    let redis = Redis::start();
    redis.command(&["ACL", "SETUSER", "relay", "on", ">s3cret-pw", "~*", "+@all"]);
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "s3cret-pw\n").unwrap();
    let url = redis.url().replace("redis://", "redis://relay@");
    let sink = |file: &std::path::Path| {
        format!(
            "[sinks.redis]\ntype = \"redis\"\nurl = \"{url}\"\npassword_file = \"{}\"\nstream = \"events\"\n",
            file.display()
        )
    };
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&sink(&password))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(ok, "{text}");
    let mut relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 2);
    let entries = wait_for(&redis, "events", 10, &relay);
    assert_once_in_order(&events_of(&entries), 10);
    relay.stops_cleanly();
    assert!(
        !relay.log().contains("s3cret-pw"),
        "the password reached the log"
    );

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&sink(&wrong))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(!ok, "{text}");
    assert!(
        text.contains("set the password (sinks.redis.password_file)"),
        "{text}"
    );
    let mut relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 1);
    let log = relay.stops_with_failure(WAIT, "the password is wrong");
    assert!(
        log.contains("set the password (sinks.redis.password_file)"),
        "{log}"
    );
    assert!(!log.contains("not-it"), "the password reached the log");
}

/// Guarantee: `rediss://` verifies the server's certificate against `ca_file` (Redis behind
/// a TLS proxy with a certificate from a test CA); without it the test CA is not trusted and
/// `check` says so.
#[test]
fn rediss_verifies_the_server_against_the_ca_file() {
    let redis = Redis::start();
    let certs = tempfile::tempdir().unwrap();
    let ca = common::certs::make_ca(certs.path(), "ca");
    let server = common::certs::make_server_cert(certs.path(), "redis", &ca, "01", "IP:127.0.0.1");
    let proxy = common::tls_proxy::TlsProxy::start(&server.cert, &server.key, redis.port);
    let url = format!("rediss://127.0.0.1:{}/0", proxy.port);
    let sink = |extra: &str| {
        format!("[sinks.redis]\ntype = \"redis\"\nurl = \"{url}\"\nstream = \"events\"\n{extra}\n")
    };
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&sink(&format!("ca_file = \"{}\"", ca.cert.display())))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(ok, "{text}");
    let relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 2);
    let entries = wait_for(&redis, "events", 10, &relay);
    assert_once_in_order(&events_of(&entries), 10);

    let untrusted = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&sink(""))
        .init();
    let (ok, text) = relay_check(&untrusted.config);
    assert!(!ok, "{text}");
    assert!(text.contains("connecting to Redis"), "{text}");
}
