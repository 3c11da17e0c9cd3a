//! Cases from an adversarial review of the slot and the server the relay streams from: a slot
//! dropped before the first checkpoint, a relay state that belongs to another server, a slot
//! of another database or plugin, an invalidated slot, permanent connection errors under
//! leader election, and a leader that outlives a PostgreSQL restart. In each the relay must
//! stop (or stand by) and say what to do, never skip events or stream without its lock.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn insert(pg: &PgCluster, aggregate_id: &str) {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', '{aggregate_id}', 'T', '{{}}')"
    ));
}

/// Writes WAL and switches to a new segment `segments` times: moves the server's WAL
/// position on by at least that many 16 MB segments.
fn write_wal(pg: &PgCluster, segments: usize) {
    pg.psql("CREATE TABLE IF NOT EXISTS filler (x int)");
    for _ in 0..segments {
        pg.psql("INSERT INTO filler SELECT generate_series(1, 100); SELECT pg_switch_wal()");
    }
}

fn system_identifier(pg: &PgCluster) -> String {
    pg.psql("SELECT system_identifier FROM pg_control_system()")
}

/// Runs SQL with psql in database `database` of `pg`.
fn psql_in(pg: &PgCluster, database: &str, sql: &str) -> String {
    let out = Command::new(pg.bin.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-U", "postgres", "-d", database, "-p", &pg.port.to_string()])
        .args(["-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Item 4: an idle outbox gives the relay nothing to checkpoint, yet it has streamed from the
/// slot. Dropped then, the slot must not be created again at the current WAL end: the row
/// committed in between would never be published.
#[test]
fn a_slot_dropped_before_the_first_checkpoint_is_not_recreated() {
    let (
        Scenario {
            pg, config, events, ..
        },
        mut relay,
    ) = scenario().start();
    assert!(
        wait_until(WAIT, || pg.psql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' AND active"
        ) == "1"),
        "the relay never streamed\n{}",
        relay.log()
    );
    relay.stops_cleanly();
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox_relay.checkpoints"),
        "0",
        "an idle outbox leaves no checkpoint"
    );
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    insert(&pg, "committed-while-the-slot-was-gone");

    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the slot was dropped");
    let fix = "DELETE FROM \"outbox_relay\".\"checkpoints\" WHERE slot = 'outbox_relay'; \
               DELETE FROM \"outbox_relay\".\"slots\" WHERE slot = 'outbox_relay'";
    assert!(
        log.contains("replication slot \"outbox_relay\" is gone, but the relay has used it")
            && log.contains("source.backfill = true")
            && log.contains(fix),
        "{log}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "no slot was created"
    );
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("is gone, but the relay has used it"),
        "{report}"
    );
    let out = relay_command(&config, "init");
    assert!(
        !out.status.success() && stderr(&out).contains("is gone, but the relay has used it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots"), "0");

    // The first way on that the message offers: a backfill publishes the row.
    let mut relay = Relay::start_with_env(&config, &[("OUTBOX_RELAY__SOURCE__BACKFILL", "true")]);
    relay.delivers(&events, 1);
    relay.stops_cleanly();
}

/// Item 5: the relay's tables copied from server A into server B (a restored dump, a copied
/// relay schema), same slot and publication names. A's checkpoint positions mean nothing in
/// B's WAL; applied as skip points they would drop B's events below them.
#[test]
fn a_relay_state_from_another_server_stops_run_naming_both_systems() {
    let a = PgCluster::start();
    a.create_outbox("public.outbox");
    // A's events lie far into its WAL, beyond where B's events will be.
    write_wal(&a, 4);
    let a_dir = tempfile::tempdir().unwrap();
    let (a_config, a_events) = write_config(a_dir.path(), &a, "");
    init(&a_config);
    let mut relay = Relay::start(&a_config);
    for i in 0..3 {
        insert(&a, &format!("a-{i}"));
    }
    assert!(
        wait_until(WAIT, || read_events(&a_events).len() == 3
            && a.psql("SELECT count(*) FROM outbox_relay.checkpoints") == "1"),
        "A's events were not delivered\n{}",
        relay.log()
    );
    relay.stops_cleanly();
    let a_checkpoint = a.psql("SELECT commit_lsn FROM outbox_relay.checkpoints");

    let b = PgCluster::start();
    b.create_outbox("public.outbox");
    let b_dir = tempfile::tempdir().unwrap();
    let (b_config, b_events) = write_config(b_dir.path(), &b, "");
    init(&b_config);
    for i in 0..3 {
        insert(&b, &format!("b-{i}"));
    }
    // B's WAL ends beyond A's checkpoint, so the checkpoint passes as a position of B's.
    write_wal(&b, 8);
    assert_eq!(
        b.psql(&format!(
            "SELECT confirmed_flush_lsn < '{a_checkpoint}' AND pg_current_wal_lsn() > '{a_checkpoint}' \
             FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
        )),
        "t",
        "B's events lie below A's checkpoint, and B's WAL ends beyond it"
    );
    let copy = a.psql(
        "SELECT string_agg(format('INSERT INTO outbox_relay.checkpoints (slot, sink, commit_lsn, event_index) \
         VALUES (%L, %L, %L, %s)', slot, sink, commit_lsn, event_index), '; ') FROM outbox_relay.checkpoints",
    );
    let copy_origin = a.psql(
        "SELECT string_agg(format('INSERT INTO outbox_relay.slots (slot, system_id, timeline, start_lsn) \
         VALUES (%L, %L, %s, %L)', slot, system_id, timeline, start_lsn), '; ') FROM outbox_relay.slots",
    );
    b.psql(&format!(
        "BEGIN; DELETE FROM outbox_relay.checkpoints; DELETE FROM outbox_relay.slots; \
         {copy}; {copy_origin}; COMMIT"
    ));

    let (a_system, b_system) = (system_identifier(&a), system_identifier(&b));
    assert_ne!(a_system, b_system);
    let mut relay = Relay::start(&b_config);
    let log = relay.stops_with_failure(WAIT, "the relay's state belongs to server A");
    assert!(
        log.contains(&format!("recorded on PostgreSQL system {a_system}"))
            && log.contains(&format!("the server at source.url is system {b_system}"))
            && log.contains(
                "DELETE FROM \"outbox_relay\".\"checkpoints\" WHERE slot = 'outbox_relay'"
            ),
        "{log}"
    );
    assert!(read_events(&b_events).is_empty(), "nothing was delivered");
    let (ok, report) = relay_check(&b_config);
    assert!(
        !ok && report.contains(&format!("recorded on PostgreSQL system {a_system}")),
        "{report}"
    );

    // Reset as the message says: B's own events are all delivered.
    b.psql(
        "DELETE FROM outbox_relay.checkpoints WHERE slot = 'outbox_relay'; \
         DELETE FROM outbox_relay.slots WHERE slot = 'outbox_relay'",
    );
    let mut relay = Relay::start(&b_config);
    relay.delivers(&b_events, 3);
    relay.stops_cleanly();
}

/// Item 18: a slot of the relay's name made by something else (another output plugin, or
/// another database) is not taken for the relay's own, by `init` and `check` as by `run`.
#[test]
fn a_slot_of_another_plugin_or_database_is_refused_by_init_check_and_run() {
    let Scenario { pg, config, .. } = scenario().without_init();
    pg.psql("SELECT pg_create_logical_replication_slot('outbox_relay', 'test_decoding')");
    let expect_refusal = |owner: &str| {
        let out = relay_command(&config, "init");
        let text = stderr(&out);
        assert!(
            !out.status.success()
                && text.contains(owner)
                && text.contains("choose another source.slot"),
            "init: {text}"
        );
        let (ok, report) = relay_check(&config);
        assert!(
            !ok && report.contains(owner) && report.contains("choose another source.slot"),
            "check: {report}"
        );
        let mut relay = Relay::start(&config);
        let log = relay.stops_with_failure(WAIT, "the slot is not the relay's");
        assert!(log.contains(owner), "run: {log}");
    };
    expect_refusal("a slot of database \"postgres\" with output plugin test_decoding");

    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    pg.psql("CREATE DATABASE other");
    psql_in(
        &pg,
        "other",
        "SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')",
    );
    expect_refusal("a slot of database \"other\" with output plugin pgoutput");
}

/// Item 20: a slot PostgreSQL invalidated (it removed WAL the slot still needed, past
/// `max_slot_wal_keep_size`) can never stream again, and the events in that WAL are lost:
/// `check` reports it and `run` stops before streaming, both with the ways on. PostgreSQL 15
/// says so in `wal_status`, 17 in `invalidation_reason` too.
#[test]
fn an_invalidated_slot_is_reported_by_check_and_stops_run() {
    an_invalidated_slot_stops_the_relay(pg_bin_before_17());
}

#[test]
fn an_invalidated_slot_is_reported_by_check_and_stops_run_on_postgres_17() {
    an_invalidated_slot_stops_the_relay(pg17_bin());
}

fn an_invalidated_slot_stops_the_relay(bin: std::path::PathBuf) {
    let Scenario { pg, config, .. } = scenario()
        .cluster(ClusterOptions {
            bin,
            settings: vec!["max_slot_wal_keep_size = 1MB".into()],
            ..Default::default()
        })
        .init();
    assert!(
        wait_until(WAIT, || {
            insert(&pg, "lost");
            pg.psql("SELECT pg_switch_wal(); CHECKPOINT");
            pg.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
                == "lost"
        }),
        "the slot was not invalidated"
    );
    let expected = "replication slot \"outbox_relay\" is invalidated (wal_removed)";
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains(expected) && report.contains("source.backfill = true"),
        "{report}"
    );
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the slot is invalidated");
    assert!(
        log.contains(expected) && log.contains("SELECT pg_drop_replication_slot('outbox_relay')"),
        "{log}"
    );
}

/// Item 21: with leader election on (the default), a wrong password or a database that does
/// not exist stops `run` with the fix, as it does with election off, rather than retrying
/// the leader lock's connection forever.
#[test]
fn permanent_connection_errors_stop_run_with_leader_election_on_or_off() {
    let (pg, _dir, config, secret) = cluster_with_a_password();
    let wrong_password = format!(
        "postgres://app@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    let no_database = format!(
        "postgres://postgres@127.0.0.1:{}/no_such_database?sslmode=disable",
        pg.port
    );
    let secret = secret.to_str().unwrap();
    for election in ["true", "false"] {
        let mut relay = Relay::start_with_env(
            &config,
            &[
                ("OUTBOX_RELAY__SOURCE__URL", &wrong_password),
                ("OUTBOX_RELAY__SOURCE__PASSWORD_FILE", secret),
                ("OUTBOX_RELAY__LEADER__ENABLED", election),
            ],
        );
        let log = relay.stops_with_failure(WAIT, "the password is wrong");
        assert!(
            log.contains("password authentication failed") && log.contains("source.password_file"),
            "leader.enabled = {election}: {log}"
        );
        assert!(!log.contains("wrong"), "the password leaked: {log}");

        let mut relay = Relay::start_with_env(
            &config,
            &[
                ("OUTBOX_RELAY__SOURCE__URL", &no_database),
                ("OUTBOX_RELAY__LEADER__ENABLED", election),
            ],
        );
        let log = relay.stops_with_failure(WAIT, "the database does not exist");
        assert!(
            log.contains("database \"no_such_database\" does not exist")
                && log.contains("fix the database name in source.url"),
            "leader.enabled = {election}: {log}"
        );
    }
}

/// What a relay says of itself: its /readyz state and whether its `outbox_relay_leader`
/// gauge is 1.
fn state(port: u16) -> (String, bool) {
    let ready =
        http_get(port, "/readyz").map_or_else(|| "down".into(), |(_, body)| body.trim().to_owned());
    let leader = http_get(port, "/metrics")
        .is_some_and(|(_, metrics)| metrics.lines().any(|line| line == "outbox_relay_leader 1"));
    (ready, leader)
}

/// Item 22b: PostgreSQL restarts under a leader; its lock went with its connection, and a
/// standby may take it. The old leader must not start a session on the strength of the lock
/// it held before: at no moment does one relay stream while the other holds the lock. The
/// old leader checks its lock only every 10 s, the standby tries every 500 ms, so without
/// the check before each session the overlap would last seconds.
#[test]
fn after_a_restart_a_relay_streams_only_while_it_holds_the_lock() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let ports = [free_port(), free_port()];
    let [first, second] = [("first", ports[0], "10s"), ("second", ports[1], "500ms")].map(
        |(name, port, interval)| {
            let config_dir = dir.path().join(name);
            std::fs::create_dir(&config_dir).unwrap();
            sidecar_config(&config_dir, &pg, &events, port, interval)
        },
    );
    init(&first);
    let leader = Relay::start(&first);
    assert!(
        wait_until(WAIT, || state(ports[0]) == ("streaming".into(), true)),
        "the first relay leads\n{}",
        leader.log()
    );
    let relays = [leader, Relay::start(&second)];
    let logs = || {
        relays
            .iter()
            .map(Relay::log)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert!(
        wait_until(WAIT, || state(ports[1]) == ("standby".into(), false)),
        "the second relay stands by\n{}",
        logs()
    );
    insert(&pg, "before-restart");
    assert!(
        wait_until(WAIT, || read_events(&events).len() == 1),
        "{}",
        logs()
    );

    pg.restart("fast");
    let watch_until = Instant::now() + Duration::from_secs(15);
    let mut samples = 0;
    while Instant::now() < watch_until {
        let states = [state(ports[0]), state(ports[1])];
        for (me, other) in [(0, 1), (1, 0)] {
            assert!(
                !(states[me].0 == "streaming" && states[other].1),
                "relay {me} streams while relay {other} holds the lock: {states:?}\n{}",
                logs()
            );
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(samples > 50, "too few samples: {samples}");

    // One of them leads again and delivers.
    insert(&pg, "after-restart");
    assert!(
        wait_until(WAIT, || read_events(&events)
            .iter()
            .any(|event| event["subject"] == "after-restart")),
        "nothing delivered after the restart\n{}",
        logs()
    );
    let states = [state(ports[0]), state(ports[1])];
    assert_eq!(
        states
            .iter()
            .filter(|(ready, leader)| ready == "streaming" && *leader)
            .count(),
        1,
        "{states:?}"
    );
}
