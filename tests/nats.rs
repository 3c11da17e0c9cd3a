//! The NATS JetStream sink against a real nats-server (tests/common/nats.rs): messages in
//! commit order with the event id as `Nats-Msg-Id`, exactly once across kill -9 within the
//! duplicate window, a paused and a restarted server, dead letters for what the server
//! cannot take, and `check`.

mod common;

use common::nats::{Access, Message, Nats};
use common::webhook::{Hook, Reply};
use common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The body of each message.
fn events_of(messages: &[Message]) -> Vec<serde_json::Value> {
    messages.iter().map(Message::event).collect()
}

fn nats_sink(nats: &Nats, extra: &str) -> String {
    format!(
        "[sinks.nats]\ntype = \"nats\"\nurl = \"{}\"\ntimeout = \"2s\"\n{extra}\n",
        nats.url()
    )
}

/// Waits until stream `name` holds `count` distinct events; returns its messages.
fn wait_for(nats: &Nats, name: &str, count: usize, relay: &Relay) -> Vec<Message> {
    let mut messages = Vec::new();
    let complete = wait_until(WAIT, || {
        messages = nats.messages(name);
        messages
            .iter()
            .map(|m| m.headers["Nats-Msg-Id"].clone())
            .collect::<HashSet<_>>()
            .len()
            >= count
    });
    assert!(
        complete,
        "{} of {count} in {name}; relay log:\n{}",
        messages.len(),
        relay.log()
    );
    messages
}

#[test]
fn events_are_messages_in_commit_order_with_their_id_and_position() {
    let nats = Nats::start();
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, ""))
        .start();
    insert_numbered(&pg, "order", 0, 4);
    insert_numbered(&pg, "invoice", 0, 2);
    insert_numbered(&pg, "order", 20, 2);
    let messages = wait_for(&nats, "OUTBOX", 40, &relay);
    assert_once_in_order(&events_of(&messages), 40);
    let first = &messages[0];
    assert_eq!(first.subject, "outbox.order.Seq");
    assert_eq!(first.event()["id"], first.headers["Nats-Msg-Id"].as_str());
    assert_eq!(first.headers["tenant"], "acme");
    let positions: Vec<outbox_relay_sinks::Position> = messages
        .iter()
        .map(|m| m.headers["Outbox-Relay-Position"].parse().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "commit order");
}

/// kill -9 while rows are written, three times: what the relay publishes again after a
/// restart is inside the stream's duplicate window, and JetStream stores it once.
#[test]
fn kill_9_loses_and_repeats_nothing_within_the_duplicate_window() {
    let nats = Nats::start();
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let (Scenario { pg, config, .. }, mut relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .relay("batch_size = 20")
        .sinks(&nats_sink(&nats, ""))
        .start();
    for round in 0..3 {
        insert_numbered(&pg, "order", round * 100, 20);
        assert!(wait_until(WAIT, || nats.messages("OUTBOX").len() > round * 100));
        relay.kill9();
        relay = Relay::start(&config);
    }
    let messages = wait_for(&nats, "OUTBOX", 300, &relay);
    assert_once_in_order(&events_of(&messages), 300);
    relay.stops_cleanly();
}

/// The server paused (SIGSTOP) past the sink's timeout, then stopped and started again: the
/// relay retries, is not ready meanwhile, and every event is stored once, in order.
#[test]
fn a_paused_and_a_restarted_server_delay_but_lose_nothing() {
    let mut nats = Nats::start();
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let port = free_port();
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .tables(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"))
        .sinks(&nats_sink(&nats, ""))
        .start();
    insert_numbered(&pg, "order", 0, 4);
    wait_for(&nats, "OUTBOX", 20, &relay);

    nats.signal("-STOP");
    insert_numbered(&pg, "order", 20, 4);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("sink failed; retrying the batch")),
        "{}",
        relay.log()
    );
    let not_ready = http_get(port, "/readyz");
    nats.signal("-CONT");
    assert_eq!(
        not_ready,
        Some((503, "streaming; failing sinks: nats\n".into()))
    );
    wait_for(&nats, "OUTBOX", 40, &relay);

    nats.restart();
    insert_numbered(&pg, "order", 40, 4);
    let messages = wait_for(&nats, "OUTBOX", 60, &relay);
    assert_once_in_order(&events_of(&messages), 60);
}

/// A message over the server's `max_payload` is dead-lettered with the reason; the events
/// after it arrive.
#[test]
fn a_message_over_max_payload_is_dead_lettered_and_the_stream_goes_on() {
    let nats = Nats::start_with("max_payload: 4096");
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let (Scenario { pg, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, ""))
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'big', 'Big', jsonb_build_object('pad', repeat('x', 5000)))",
    );
    insert_numbered(&pg, "order", 0, 1);
    wait_for(&nats, "OUTBOX", 5, &relay);
    assert!(wait_until(WAIT, || dead_letters(&pg, "sink, reason").len() == 1));
    let letters = dead_letters(&pg, "sink, reason");
    assert!(
        letters[0].starts_with("nats | the message is about ")
            && letters[0].contains("over the NATS server's max_payload (4096)"),
        "{letters:?}"
    );
}

/// `check` names a subject no stream captures and an unreachable server; `run` waits for
/// the stream, saying so, and delivers once it exists.
#[test]
fn a_subject_without_a_stream_is_reported_and_waited_for() {
    let nats = Nats::start();
    let (Scenario { pg, config, .. }, relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, "subject = \"events.all\""))
        .start();
    let (ok, text) = relay_check(&config);
    assert!(!ok);
    assert!(
        text.contains("no JetStream stream captures subject \"events.all\""),
        "{text}"
    );
    insert_numbered(&pg, "order", 0, 1);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("no JetStream stream captures subject \"events.all\"")),
        "{}",
        relay.log()
    );
    nats.create_stream("EVENTS", &["events.all"]);
    let messages = wait_for(&nats, "EVENTS", 5, &relay);
    assert_once_in_order(&events_of(&messages), 5);
    let (ok, text) = relay_check(&config);
    assert!(ok, "{text}");
    drop(nats);
    let (ok, text) = relay_check(&config);
    assert!(!ok && text.contains("connecting to NATS"), "{text}");
}

/// The example config/nats.toml works as documented, with the URLs from the environment.
#[test]
fn the_example_config_works_with_the_urls_from_the_environment() {
    let nats = Nats::start();
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let config = copy_example(dir.path(), "nats.toml");
    let (url, nats_url) = (pg.url(), nats.url());
    let env = [
        ("OUTBOX_RELAY__SOURCE__URL", url.as_str()),
        ("OUTBOX_RELAY__SINKS__EVENTS__URL", nats_url.as_str()),
    ];
    init_and_check(&config, &env);
    let relay = Relay::start_with_env(&config, &env);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'OrderCreated', '{\"n\": 1}')",
    );
    let messages = wait_for(&nats, "OUTBOX", 1, &relay);
    assert_eq!(messages[0].event()["data"]["n"], 1);
}

/// A secret file holding `text`, in `dir`.
fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path.display().to_string()
}

/// Guarantee: a user logs in with `username` and `password_file`, and a server asking for
/// a token takes `token_file`; a wrong password is reported by `check` and stops `run` with
/// the fix. Secrets never reach the log.
#[test]
fn user_and_token_logins_work_and_a_wrong_password_stops_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let users = "authorization { users = [ \
                 {user: relay, password: \"s3cret-pw\"}, {user: admin, password: \"admin-pw\"} ] }";
    let access = Access {
        user: Some(("admin".into(), "admin-pw".into())),
        ..Access::default()
    };
    let nats = Nats::start_secured(users, access);
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let login = |file: &str| format!("username = \"relay\"\npassword_file = \"{file}\"");
    let right = secret_file(dir.path(), "password", "s3cret-pw");
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, &login(&right)))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(ok, "{text}");
    let mut relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 2);
    let messages = wait_for(&nats, "OUTBOX", 10, &relay);
    assert_once_in_order(&events_of(&messages), 10);
    relay.stops_cleanly();
    assert!(
        !relay.log().contains("s3cret-pw"),
        "the password reached the log"
    );

    let wrong = secret_file(dir.path(), "wrong", "not-it");
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, &login(&wrong)))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(!ok, "{text}");
    assert!(text.contains("check the login"), "{text}");
    let mut relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 1);
    let log = relay.stops_with_failure(WAIT, "the password is wrong");
    assert!(log.contains("check the login"), "{log}");
    assert!(!log.contains("not-it"), "the password reached the log");

    let access = Access {
        token: Some("t0ken-value".into()),
        ..Access::default()
    };
    let nats = Nats::start_secured("authorization { token: \"t0ken-value\" }", access);
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let token = secret_file(dir.path(), "token", "t0ken-value");
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, &format!("token_file = \"{token}\"")))
        .init();
    let relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 1);
    wait_for(&nats, "OUTBOX", 5, &relay);
    assert!(
        !relay.log().contains("t0ken-value"),
        "the token reached the log"
    );
}

/// Guarantee: against a server that requires TLS, the sink verifies its certificate
/// against `ca_file`; without it the test CA is not trusted and `check` says so.
#[test]
fn tls_verifies_the_server_against_the_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    let ca = common::certs::make_ca(certs.path(), "ca");
    let server = common::certs::make_server_cert(certs.path(), "nats", &ca, "01", "IP:127.0.0.1");
    let tls = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
        server.cert.display(),
        server.key.display()
    );
    let access = Access {
        ca_file: Some(ca.cert.clone()),
        ..Access::default()
    };
    let nats = Nats::start_secured(&tls, access);
    nats.create_stream("OUTBOX", &["outbox.>"]);
    let scenario = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(
            &nats,
            &format!("ca_file = \"{}\"", ca.cert.display()),
        ))
        .init();
    let (ok, text) = relay_check(&scenario.config);
    assert!(ok, "{text}");
    let relay = Relay::start(&scenario.config);
    insert_numbered(&scenario.pg, "order", 0, 2);
    let messages = wait_for(&nats, "OUTBOX", 10, &relay);
    assert_once_in_order(&events_of(&messages), 10);

    let untrusted = common::scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .sinks(&nats_sink(&nats, ""))
        .init();
    let (ok, text) = relay_check(&untrusted.config);
    assert!(!ok, "{text}");
    assert!(text.contains("connecting to NATS"), "{text}");
}

/// Guarantee, as documented: past the stream's duplicate window, events acknowledged after
/// the relay's last checkpoint are stored again, each copy with the event id as its
/// `Nats-Msg-Id`. Here a second sink (a webhook answering 503) holds the slot's confirmed
/// position back, as a slow sink does, and the relay writes no checkpoint after its first
/// moments (an interval of an hour; a first event is delivered before the ones under test,
/// so that the checkpoint writer's first round is behind them). The relay is killed and
/// starts again after the one-second window.
#[test]
fn past_the_duplicate_window_a_resend_is_stored_again_with_the_same_msg_id() {
    let nats = Nats::start();
    nats.create_stream_with_window("OUTBOX", &["outbox.>"], std::time::Duration::from_secs(1));
    let held = Arc::new(AtomicBool::new(true));
    let holding = held.clone();
    let hook = Hook::with_plan(Box::new(move |_, _| {
        if holding.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    }));
    let (scenario, mut relay) = scenario()
        .outbox_sql(OUTBOX_WITH_HEADERS)
        .relay("checkpoint_interval = \"1h\"\n")
        .sinks(&format!(
            "{}[sinks.slow]\ntype = \"webhook\"\nurl = \"{}\"\n",
            nats_sink(&nats, ""),
            hook.url("/slow")
        ))
        .start();
    scenario.pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('warmup', 'w', 'T', '{}')",
    );
    wait_for(&nats, "OUTBOX", 1, &relay);
    insert_numbered(&scenario.pg, "order", 0, 2);
    wait_for(&nats, "OUTBOX", 11, &relay);
    relay.kill9();
    // The relay stays down longer than the window: that is the case under test.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    held.store(false, Ordering::SeqCst);
    let relay = Relay::start(&scenario.config);
    let orders_in = |messages: &[Message]| {
        messages
            .iter()
            .filter(|m| m.event()["aggregatetype"] == "order")
            .count()
    };
    let complete = wait_until(WAIT, || orders_in(&nats.messages("OUTBOX")) >= 20);
    let messages = nats.messages("OUTBOX");
    assert!(
        complete,
        "{} messages; relay log:\n{}",
        messages.len(),
        relay.log()
    );
    let orders: Vec<&Message> = messages
        .iter()
        .filter(|m| m.event()["aggregatetype"] == "order")
        .collect();
    assert_eq!(orders.len(), 20, "each event stored again");
    let ids: HashSet<&str> = orders
        .iter()
        .map(|m| m.headers["Nats-Msg-Id"].as_str())
        .collect();
    assert_eq!(ids.len(), 10, "each copy with the same Nats-Msg-Id");
    let second: Vec<serde_json::Value> = orders[10..].iter().map(|m| m.event()).collect();
    assert_once_in_order(&second, 10);
}
