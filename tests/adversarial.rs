//! Attacks on the relay's promises from outside: names chosen to break out of SQL, events
//! forged by roles that may not write the outbox, secrets and payloads that must stay out of
//! every log, and changes to the publication and the outbox tables under a running relay.
//! Each test failed before its fix (RELIABILITY.md, "Adversarial cases").

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Runs `sql` with psql as `user` (the test clusters trust local connections).
fn psql_as(pg: &PgCluster, user: &str, sql: &str) -> std::process::Output {
    Command::new(pg.bin.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-U", user, "-d", "postgres", "-p", &pg.port.to_string()])
        .args(["-c", sql])
        .output()
        .unwrap()
}

/// Puts `lines` at the start of the config's `[source]` table (and `before` ahead of it).
fn with_source(config: &Path, before: &str, lines: &str) {
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace("[source]\n", &format!("{before}[source]\n{lines}"));
    std::fs::write(config, text).unwrap();
}

/// A relay on the Debezium-layout `outbox` with a file sink, `tables` and `source` lines
/// in its config, that has delivered one event (of aggregate type `order`).
struct Streaming {
    pg: PgCluster,
    config: std::path::PathBuf,
    relay: Relay,
    events: std::path::PathBuf,
}

fn streaming(tables: &str, source: &str) -> Streaming {
    let (
        Scenario {
            pg, config, events, ..
        },
        relay,
    ) = scenario()
        .outbox("outbox")
        .source(source)
        .tables(tables)
        .start();
    insert_kinds(&pg, &["order"]);
    relay.delivers(&events, 1);
    Streaming {
        pg,
        config,
        relay,
        events,
    }
}

#[test]
fn a_column_name_cannot_inject_sql_into_the_backfill() {
    let pg = PgCluster::start();
    pg.create_outbox("outbox");
    // Whoever may name a column of an outbox table must not run SQL as the relay's role.
    let evil = "x\"\"::text, (SELECT pg_drop_replication_slot('victim'))::text, \"\"y";
    pg.psql(&format!(
        "ALTER TABLE outbox ADD COLUMN \"{evil}\" text DEFAULT 'v'"
    ));
    pg.psql("SELECT pg_create_physical_replication_slot('victim')");
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{\"n\": 1}')");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "");
    with_source(&config, "", "backfill = true\n");
    init(&config);
    let mut relay = Relay::start(&config);
    relay.delivers(&events, 1);
    relay.stops_cleanly();
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'victim'"),
        "1",
        "the column name ran SQL"
    );
}

#[test]
fn a_replay_message_from_a_role_without_outbox_rights_is_dead_lettered_not_published() {
    let (Scenario { pg, events, .. }, relay) = scenario()
        .outbox("outbox")
        .sql("CREATE ROLE mallory LOGIN; REVOKE ALL ON outbox FROM mallory")
        .start();

    // Mallory may not insert into the outbox...
    let refused = psql_as(&pg, "mallory", "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Forged', '{}')");
    assert!(!refused.status.success());
    // ...but anyone may emit logical messages: the old replay format, and a signature made up.
    let document = r#"{"id": "66666666-6666-4666-8666-666666666666", "aggregatetype": "order", "aggregateid": "o-1", "type": "Forged", "payload": {"amount": 1000000}, "table": "public.outbox"}"#;
    for content in [
        document.to_owned(),
        format!(r#"{{"mac": "{}", "event": {document}}}"#, "ab".repeat(32)),
    ] {
        let sent = psql_as(
            &pg,
            "mallory",
            &format!(
                "SELECT pg_logical_emit_message(true, 'outbox-relay-replay', '{}')",
                content.replace('\'', "''")
            ),
        );
        assert!(sent.status.success(), "{sent:?}");
    }
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Genuine', '{}')");
    relay.delivers(&events, 1);
    assert!(wait_until(WAIT, || pg.psql(
        "SELECT count(*) FROM outbox_relay.dead_letters WHERE reason LIKE '%did not sign%'"
    ) == "2"));
    let delivered = read_events(&events);
    assert_eq!(delivered[0]["type"], "Genuine", "{delivered:?}");
}

#[test]
fn a_replay_signed_with_the_relays_key_is_published_and_an_altered_one_is_not() {
    let (Scenario { pg, events, .. }, relay) = scenario().outbox("outbox").start();
    let key = pg.psql("SELECT encode(key, 'hex') FROM outbox_relay.replay_key");
    let key: Vec<u8> = (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&key[i..i + 2], 16).unwrap())
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let document = |kind: &str| {
        format!(
            r#"{{"id":"88888888-8888-4888-8888-888888888888","aggregatetype":"order","aggregateid":"o-1","type":"{kind}","payload":{{}},"table":"public.outbox"}}"#
        )
    };
    let signed = |signed: &str, sent: &str| {
        let mac: String = ring::hmac::sign(&key, signed.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(r#"{{"mac":"{mac}","event":{sent}}}"#)
    };
    let emit = |content: String| {
        pg.psql(&format!(
            "SELECT pg_logical_emit_message(true, 'outbox-relay-replay', '{content}')"
        ));
    };
    emit(signed(&document("Altered"), &document("Altered2")));
    emit(signed(&document("Replayed"), &document("Replayed")));
    relay.delivers(&events, 1);
    let event = &read_events(&events)[0];
    assert_eq!(
        (event["type"].as_str(), event["source"].as_str()),
        (Some("Replayed"), Some("/public.outbox"))
    );
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM outbox_relay.dead_letters WHERE reason LIKE '%did not sign%'"
        ),
        "1"
    );
}

#[test]
fn a_password_in_a_broken_config_file_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    for broken in [
        "[source]\nurl = \"postgres://app:Pa55\\word@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
        "[source]\nurl = \"postgres://app:Pa55\"word@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
        "[source]\nurl = \"postgres://app:Pa55word@db/app\n[sinks.out]\ntype = \"stdout\"\n",
    ] {
        std::fs::write(&config, broken).unwrap();
        for command in ["check", "run", "init", "status"] {
            let out = relay_command(&config, command);
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!out.status.success(), "{command}: {all}");
            assert!(
                !all.contains("Pa55"),
                "{command} printed the password: {all}"
            );
            assert!(all.contains("line 2"), "{command} says where: {all}");
        }
    }
}

/// The marker every payload of [`no_payload_or_secret_reaches_any_log_at_trace_level`]
/// carries, and how a library that logs bytes as numbers would print its start.
const PAYLOAD_MARKER: &str = "PAYLOADMARKER7731";
const PAYLOAD_MARKER_BYTES: &str = "80, 65, 89, 76, 79, 65, 68, 77, 65, 82, 75, 69, 82";
const PASSWORD_MARKER: &str = "PASSWORDMARKER4419";

/// Panics with the line that holds any of `markers`, if `log` has one.
fn assert_log_lacks(log: &str, markers: &[&str]) {
    for marker in markers {
        if let Some(at) = log.find(marker) {
            let start = log[..at].rfind('\n').map_or(0, |n| n + 1);
            let end = log[at..].find('\n').map_or(log.len(), |n| at + n);
            panic!(
                "the log holds {marker:?}: {}",
                &log[start..end.min(start + 2000)]
            );
        }
    }
}

#[test]
fn no_payload_or_secret_reaches_any_log_at_trace_level() {
    let pg = PgCluster::start();
    pg.create_outbox("outbox");
    let moto = common::aws::Moto::start();
    let aws = common::aws::Aws::new(&moto);
    let bus = unique("bus");
    aws.bus_into_queue(&bus);
    let kafka = common::kafka::Broker::start_with_sasl("relay", PASSWORD_MARKER);
    let vhost = common::rabbitmq::Vhost::new();
    let rabbit_user = unique("relay");
    common::rabbitmq::rabbitmqctl(&["add_user", &rabbit_user, PASSWORD_MARKER]);
    common::rabbitmq::rabbitmqctl(&[
        "set_permissions",
        "-p",
        &vhost.name,
        &rabbit_user,
        ".*",
        ".*",
        ".*",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{PASSWORD_MARKER}\n")).unwrap();
    let sinks = format!(
        "{}\n\
         [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\ncreate_topics = true\ntimeout = \"5s\"\n\
         sasl_password_file = \"{}\"\n[sinks.kafka.properties]\n\
         \"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
         \"sasl.username\" = \"relay\"\n\n\
         [sinks.bus]\ntype = \"eventbridge\"\nbus = \"{bus}\"\nendpoint_url = \"{}\"\n\n\
         [sinks.exchange]\ntype = \"rabbitmq\"\nurl = \"amqp://127.0.0.1:5672/{}\"\n\
         username = \"{rabbit_user}\"\npassword_file = \"{}\"\nexchange = \"unbound\"\n\
         declare = true\ntimeout = \"5s\"\n\n\
         [sinks.stream]\ntype = \"rabbitmq\"\nmode = \"stream\"\n\
         url = \"rabbitmq-stream://127.0.0.1:5552/{}\"\nusername = \"{rabbit_user}\"\n\
         password_file = \"{}\"\nstream = \"events\"\ndeclare = true\ntimeout = \"5s\"\n",
        file_sink("file", &dir.path().join("events.jsonl")),
        kafka.address(),
        secret.display(),
        moto.url(),
        vhost.name,
        secret.display(),
        vhost.name,
        secret.display(),
    );
    let config = ConfigFile::new().sinks(&sinks).write(dir.path(), &pg);
    // The database password: trust authentication never asks for it, so only a log of the
    // URL would show it.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD_MARKER}@"),
    );
    std::fs::write(&config, text).unwrap();
    init(&config);
    let mut env = common::aws::AWS_ENV.to_vec();
    env.retain(|(name, _)| *name != "AWS_SECRET_ACCESS_KEY");
    env.push(("AWS_SECRET_ACCESS_KEY", PASSWORD_MARKER));
    env.push(("RUST_LOG", "trace"));
    let mut relay = Relay::start_with_env(&config, &env);
    let before = pg.psql("SELECT pg_current_wal_lsn()");
    // Every sink takes these; the exchange has no queue, so RabbitMQ returns them, and the
    // sink dead-letters them: the dead letter's INSERT carries the payload too.
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'o-' || n, 'Created', jsonb_build_object('marker', '{PAYLOAD_MARKER}') \
         FROM generate_series(1, 3) n"
    ));
    assert!(
        wait_until(WAIT, || pg.psql(&format!(
            "SELECT count(*) FROM outbox_relay.checkpoints WHERE commit_lsn > '{before}'"
        )) == "5"),
        "every sink acknowledges: {}",
        relay.log()
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox_relay.dead_letters WHERE sink = 'exchange'"),
        "3",
        "the returned messages are dead-lettered"
    );
    relay.stops_cleanly();
    let log = relay.log();
    assert!(log.contains("DEBUG"), "debug logging was on");
    assert_log_lacks(
        &log,
        &[PAYLOAD_MARKER, PAYLOAD_MARKER_BYTES, PASSWORD_MARKER],
    );
}

const PARTITIONED_OUTBOX: &str = "CREATE TABLE outbox (id uuid NOT NULL DEFAULT gen_random_uuid(), \
     aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, \
     PRIMARY KEY (id, aggregatetype)) PARTITION BY LIST (aggregatetype); \
     CREATE TABLE outbox_order PARTITION OF outbox FOR VALUES IN ('order'); \
     CREATE TABLE outbox_rest PARTITION OF outbox DEFAULT";

fn insert_kinds(pg: &PgCluster, kinds: &[&str]) {
    for kind in kinds {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('{kind}', '{kind}-1', 'Created', '{{}}')"
        ));
    }
}

/// Starts the relay, inserts into the partitions of PARTITIONED_OUTBOX and into one attached
/// while the relay streams, and waits for the three events.
fn insert_into_every_partition(
    pg: &PgCluster,
    config: &Path,
    dir: &Path,
) -> (Relay, std::path::PathBuf) {
    let relay = Relay::start(config);
    insert_kinds(pg, &["order", "customer"]);
    pg.psql("CREATE TABLE outbox_invoice PARTITION OF outbox FOR VALUES IN ('invoice')");
    insert_kinds(pg, &["invoice"]);
    let events = dir.join("events.jsonl");
    relay.delivers(&events, 3);
    (relay, events)
}

fn delivered(events: &Path) -> Vec<(String, String)> {
    read_events(events)
        .iter()
        .map(|e| {
            (
                e["aggregatetype"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_partitioned_outbox_table_publishes_the_rows_of_every_partition() {
    let pg = PgCluster::start();
    pg.psql(PARTITIONED_OUTBOX);
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "");
    init(&config);
    let (ok, report) = relay_check(&config);
    assert!(ok, "{report}");
    let (_relay, events) = insert_into_every_partition(&pg, &config, dir.path());
    let source = "/public.outbox".to_owned();
    assert_eq!(
        delivered(&events),
        [
            ("order".to_owned(), source.clone()),
            ("customer".to_owned(), source.clone()),
            ("invoice".to_owned(), source)
        ]
    );
}

#[test]
fn a_publication_that_sends_partitions_under_their_own_names_still_delivers_them() {
    let pg = PgCluster::start();
    pg.psql(PARTITIONED_OUTBOX);
    // As someone would create it by hand: without publish_via_partition_root.
    pg.psql("CREATE PUBLICATION outbox_relay FOR TABLE outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "");
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("publish_via_partition_root = true"),
        "{report}"
    );
    // init would change the publication; the relay's tables and slot only, here.
    let init = relay_command(&config, "init");
    assert!(init.status.success(), "{init:?}");
    assert!(String::from_utf8_lossy(&init.stdout).contains("via their root"));
    pg.psql("ALTER PUBLICATION outbox_relay SET (publish_via_partition_root = false)");
    let (relay, events) = insert_into_every_partition(&pg, &config, dir.path());
    assert!(delivered(&events)
        .iter()
        .all(|(_, source)| source == "/public.outbox"));
    assert!(relay.log().contains("publish_via_partition_root = true"));
}

#[test]
fn a_renamed_outbox_table_is_followed_and_a_restart_asks_for_its_new_name() {
    let Streaming {
        pg,
        config,
        mut relay,
        events,
    } = streaming("", "");
    pg.psql("ALTER TABLE outbox RENAME TO outbox_v2");
    pg.psql("INSERT INTO outbox_v2 (aggregatetype, aggregateid, type, payload) VALUES ('renamed', 'r-1', 'Created', '{}')");
    relay.delivers(&events, 2);
    assert_eq!(read_events(&events)[1]["source"], "/public.outbox");
    assert!(relay
        .log()
        .contains("outbox table public.outbox was renamed to public.outbox_v2"));
    relay.stops_cleanly();

    // Restarted with the old name, it does not skip the table's rows: it stops with the fix.
    pg.psql("INSERT INTO outbox_v2 (aggregatetype, aggregateid, type, payload) VALUES ('later', 'l-1', 'Created', '{}')");
    let mut refused = Relay::start(&config);
    let log = refused.stops_with_failure(WAIT, "a configured outbox table is missing");
    assert!(
        log.contains("outbox table public.outbox does not exist"),
        "{log}"
    );
    with_source(&config, "", "tables = [\"public.outbox_v2\"]\n");
    let relay = Relay::start(&config);
    relay.delivers(&events, 3);
    assert_eq!(read_events(&events)[2]["source"], "/public.outbox_v2");
}

#[test]
fn a_publication_that_hides_inserts_or_filters_rows_is_refused() {
    let Streaming {
        pg,
        config,
        relay,
        events: _,
    } = streaming("", "publication_check_interval = \"200ms\"\n");
    // While it streams: said at once, with the fix.
    pg.psql("ALTER PUBLICATION outbox_relay SET (publish = 'update, delete')");
    assert!(
        wait_until(WAIT, || relay.log().contains("does not publish inserts")),
        "{}",
        relay.log()
    );
    drop(relay);
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("SET (publish = 'insert, update, delete, truncate')"),
        "{report}"
    );
    let mut refused = Relay::start(&config);
    let log = refused.stops_with_failure(WAIT, "the publication does not publish inserts");
    assert!(log.contains("does not publish inserts"), "{log}");

    pg.psql("ALTER PUBLICATION outbox_relay SET (publish = 'insert, update, delete, truncate')");
    pg.psql("ALTER PUBLICATION outbox_relay SET TABLE outbox WHERE (aggregatetype = 'order')");
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("filters the rows of public.outbox"),
        "{report}"
    );
    let mut refused = Relay::start(&config);
    let log = refused.stops_with_failure(WAIT, "a row filter");
    assert!(log.contains("filters the rows of public.outbox"), "{log}");
}

#[test]
fn sigterm_is_acted_on_while_a_dead_letter_insert_waits_on_a_lock() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload text)");
    let dir = tempfile::tempdir().unwrap();
    let config = ConfigFile::new()
        .relay("shutdown_timeout = \"2s\"")
        .sinks(&file_sink("file", &dir.path().join("events.jsonl")))
        .write(dir.path(), &pg);
    init(&config);
    let mut relay = Relay::start(&config);
    assert!(wait_until(WAIT, || relay.log().contains("streaming")));
    // Another session holds the dead-letter table locked.
    let mut locker = Command::new(pg.bin.join("psql"))
        .args(["-X", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .args(["-p", &pg.port.to_string()])
        .args(["-c", "BEGIN; LOCK TABLE outbox_relay.dead_letters IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(300)"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(WAIT, || {
        pg.psql(
        "SELECT count(*) FROM pg_locks WHERE relation = 'outbox_relay.dead_letters'::regclass AND granted"
    ) == "1"
    }));
    pg.psql("INSERT INTO outbox VALUES ('99999999-9999-4999-8999-999999999999', 'order', 'o-1', 'T', '{not json')");
    assert!(wait_until(WAIT, || {
        pg.psql(
        "SELECT count(*) FROM pg_locks WHERE relation = 'outbox_relay.dead_letters'::regclass AND NOT granted"
    ) == "1"
    }));
    let asked = std::time::Instant::now();
    let status = relay.terminate(Duration::from_secs(30));
    let took = asked.elapsed();
    let _ = locker.kill();
    let _ = locker.wait();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        relay.log()
    );
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(500),
        "took {took:?} (shutdown_timeout 2 s)\n{}",
        relay.log()
    );
}

#[test]
fn a_publication_dropped_and_created_again_under_a_running_relay_stops_it_with_the_fix() {
    let Streaming {
        pg,
        config,
        mut relay,
        events,
    } = streaming("", "");
    pg.psql("DROP PUBLICATION outbox_relay");
    insert_kinds(&pg, &["lost"]);
    pg.psql(
        "CREATE PUBLICATION outbox_relay FOR TABLE outbox WITH (publish_via_partition_root = true)",
    );
    insert_kinds(&pg, &["after"]);
    let log = relay.stops_with_failure(WAIT, "the publication was dropped");
    assert!(
        log.contains("was dropped while the relay streamed")
            && log.contains("source.backfill = true"),
        "{log}"
    );
    // The fix it gives publishes the rows the broken slot could not.
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    with_source(&config, "", "backfill = true\n");
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || {
            let kinds: Vec<String> = delivered(&events).into_iter().map(|(k, _)| k).collect();
            kinds.contains(&"lost".to_owned()) && kinds.contains(&"after".to_owned())
        }),
        "{}",
        relay.log()
    );
}

#[test]
fn check_reports_a_mapped_generated_column() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
             type text NOT NULL, payload jsonb NOT NULL, \
             aggregateid text GENERATED ALWAYS AS (payload ->> 'order') STORED)");
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "");
    init(&config);
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("\"aggregateid\" of outbox table public.outbox (its aggregate_id column) is a generated column"),
        "{report}"
    );
}

#[test]
fn the_relays_sql_connections_dying_under_a_live_stream_are_opened_again() {
    // Without leader election: losing the lock's connection would end the session anyway.
    let Streaming {
        pg,
        config: _,
        relay,
        events,
    } = streaming(
        "[leader]\nenabled = false\n\n",
        "heartbeat_interval = \"200ms\"\n",
    );
    // Every SQL connection of the relay (checkpoints and dead letters, leader lock, catalog,
    // heartbeat) is cut; the replication connection lives on.
    let cut_at = pg.psql("SELECT now()");
    let cut = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND application_name = 'outbox-relay'",
    );
    assert_ne!(cut, "0");
    insert_kinds(&pg, &["after-the-cut"]);
    assert!(wait_until(WAIT, || read_events(&events).len() == 2));
    // The next checkpoint write finds the connection closed and ends the session; the next
    // session connects afresh. Only an event acknowledged there moves the checkpoint on.
    assert!(
        wait_until(WAIT, || relay
            .log()
            .matches("INFO outbox_relay::relay: streaming")
            .count()
            == 2),
        "a second session: {}",
        relay.log()
    );
    let before = pg.psql("SELECT pg_current_wal_lsn()");
    insert_kinds(&pg, &["later"]);
    assert!(
        wait_until(WAIT, || pg.psql(&format!(
            "SELECT count(*) FROM outbox_relay.checkpoints WHERE commit_lsn > '{before}'"
        )) == "1"),
        "the checkpoint moves on: {}",
        relay.log()
    );
    assert_eq!(read_events(&events).len(), 3);
    assert!(
        wait_until(WAIT, || pg.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND query LIKE '%outbox-relay-heartbeat%' AND backend_start > '{cut_at}'"
        )) == "1"),
        "a new heartbeat connection: {}",
        relay.log()
    );
}

#[test]
fn a_mixed_case_table_with_mixed_case_columns_and_bigserial_ids_is_relayed_and_backfilled() {
    let pg = PgCluster::start();
    // As EF Core and MassTransit name them: quoted, mixed case.
    pg.psql(
        "CREATE SCHEMA \"Billing\"; CREATE TABLE \"Billing\".\"OutboxMessage\" (\"Id\" bigserial PRIMARY KEY, \
         \"AggregateType\" text NOT NULL, \"AggregateId\" text NOT NULL, \"Type\" text NOT NULL, \"Payload\" jsonb NOT NULL)",
    );
    let insert = |kind: &str| {
        pg.psql(&format!(
            "INSERT INTO \"Billing\".\"OutboxMessage\" (\"AggregateType\", \"AggregateId\", \"Type\", \"Payload\") \
             VALUES ('invoice', 'i-1', '{kind}', '{{}}')"
        ))
    };
    insert("Existing");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "");
    with_source(
        &config,
        "[outbox.\"Billing.OutboxMessage\"]\nid = \"Id\"\naggregate_type = \"AggregateType\"\n\
         aggregate_id = \"AggregateId\"\ntype = \"Type\"\npayload = \"Payload\"\n\n",
        "tables = [\"Billing.OutboxMessage\"]\nbackfill = true\n",
    );
    init(&config);
    let (ok, report) = relay_check(&config);
    assert!(ok, "{report}");
    let relay = Relay::start(&config);
    insert("Streamed");
    relay.delivers(&events, 2);
    let got: Vec<(String, String, String)> = read_events(&events)
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
                e["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let source = "/Billing.OutboxMessage".to_owned();
    assert_eq!(
        got,
        [
            ("1".to_owned(), "Existing".to_owned(), source.clone()),
            ("2".to_owned(), "Streamed".to_owned(), source)
        ]
    );
}

#[test]
fn a_dead_letters_values_reach_its_store_but_no_log_at_trace_level() {
    let pg = PgCluster::start();
    pg.create_outbox("outbox");
    pg.psql("ALTER TABLE outbox ADD COLUMN occurred_at text");
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    std::fs::write(
        schemas.join("Created.json"),
        r#"{"type": "object", "properties": {"amount": {"type": "integer"}, "code": {"enum": ["a"]}}}"#,
    )
    .unwrap();
    let config = ConfigFile::new()
        .sinks(&format!(
            "[validation]\nschema_dir = \"{}\"\n\n{}",
            schemas.display(),
            file_sink("file", &dir.path().join("events.jsonl"))
        ))
        .write(dir.path(), &pg);
    init(&config);
    let mut relay = Relay::start_with_env(&config, &[("RUST_LOG", "trace")]);
    // A payload that fails its schema, and an occurred_at that is not a timestamp: both
    // reasons quoted the offending values, and the log line carried the reason.
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, occurred_at) VALUES \
         ('order', 'o-1', 'Created', '{{\"amount\": \"{PAYLOAD_MARKER}\", \"code\": \"{PAYLOAD_MARKER}\"}}', NULL), \
         ('order', 'o-2', 'Other', '{{}}', 'yesterday {PAYLOAD_MARKER}')"
    ));
    assert!(
        wait_until(WAIT, || dead_letters(&pg, "reason").len() == 2),
        "{}",
        relay.log()
    );
    assert_eq!(
        pg.psql(&format!(
            "SELECT count(*) FROM outbox_relay.dead_letters \
             WHERE (reason || row_data::text) LIKE '%{PAYLOAD_MARKER}%'"
        )),
        "2",
        "the store keeps the values"
    );
    let reasons = pg.psql(
        "SELECT string_agg(reason, E'\\n' ORDER BY event_index) FROM outbox_relay.dead_letters",
    );
    assert!(
        reasons.contains("\"/amount\" (keyword type") && reasons.contains("occurred_at"),
        "the stored reasons say where: {reasons}"
    );
    relay.stops_cleanly();
    let log = relay.log();
    assert!(log.contains("DEBUG"), "debug logging was on");
    assert!(
        log.matches("dead-lettered").count() >= 2,
        "the dead letters are logged: {log}"
    );
    assert_log_lacks(&log, &[PAYLOAD_MARKER, PAYLOAD_MARKER_BYTES]);
}
