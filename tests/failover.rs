//! PostgreSQL failover to a physical standby that lagged behind the primary the relay streamed
//! from. Before PostgreSQL 17 the promoted standby has no logical slot, and WAL the relay had
//! already published may never have reached it. The relay must say so instead of re-creating
//! the slot silently, and a sink whose destination holds events from that lost WAL must not
//! skip the new primary's events up to their positions. With PostgreSQL 17's failover slots
//! the standby keeps a copy of the slot, and the relay goes on from it.

mod common;

use common::partition_proxy::PartitionProxy;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn insert_rows(pg: &PgCluster, transactions: usize, rows: usize, payload_bytes: usize) {
    for _ in 0..transactions {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'o-' || (i % 7), 'T', jsonb_build_object('pad', repeat('x', {payload_bytes})) \
             FROM generate_series(1, {rows}) i"
        ));
    }
}

/// The `system_id=… timeline=…` of the relay log's last `streaming` line.
fn streamed_from(log: &str) -> (String, String) {
    let line = log
        .lines()
        .rfind(|line| line.contains("streaming") && line.contains("timeline="))
        .unwrap_or_else(|| panic!("no streaming line in\n{log}"));
    let field = |name: &str| {
        let start = line.find(name).expect(name) + name.len();
        line[start..].split_whitespace().next().unwrap().to_owned()
    };
    (field("system_id="), field("timeline="))
}

#[test]
fn a_failover_to_a_lagging_standby_stops_the_relay_instead_of_skipping_events() {
    let primary = PgCluster::start();
    primary.create_outbox("public.outbox");
    let standby = PgCluster::start_standby_of(&primary);
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &primary, "");
    init(&config);

    // The standby has everything the relay published so far, checkpoint included.
    let mut relay = Relay::start(&config);
    insert_rows(&primary, 2, 10, 100);
    assert!(
        wait_until(WAIT, || {
            read_events(&events).len() == 20
                && standby.psql("SELECT count(*) FROM outbox_relay.checkpoints") == "1"
                && standby.psql("SELECT count(*) FROM outbox") == "20"
        }),
        "20 events delivered and the checkpoint on the standby\n{}",
        relay.log()
    );

    // The standby stops receiving; the relay publishes 200 more events, from WAL that only
    // the primary has. Then the primary is lost and the standby promoted.
    standby.stop("fast");
    insert_rows(&primary, 10, 20, 2000);
    let system_id = delivered_from_the_first_timeline(&relay, &events, 220);
    relay.kill9();
    primary.stop("immediate");
    standby.start_stopped();
    standby.promote();
    assert_eq!(standby.psql("SELECT count(*) FROM outbox"), "20");

    // The relay now reaches the new primary (as through a moved DNS name), with the same sink.
    let (config, events_again) = write_config(dir.path(), &standby, "");
    assert_eq!(events, events_again);
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the slot did not survive the failover");
    assert!(
        log.contains("replication slot \"outbox_relay\" is gone, but the relay has checkpoints")
            && log.contains("promoted standby"),
        "{log}"
    );
    assert_eq!(
        standby.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "no slot was created"
    );

    // The operator accepts the gap, as the message offers. The file still ends with events
    // whose positions lie beyond the new primary's WAL: streaming now would skip the new
    // primary's events up to there.
    standby.psql(
        "DELETE FROM outbox_relay.checkpoints WHERE slot = 'outbox_relay'; \
         DELETE FROM outbox_relay.slots WHERE slot = 'outbox_relay'",
    );
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the file holds events beyond the new slot's start");
    assert!(
        log.contains("sink file: its destination already holds events up to position")
            && log.contains("file: a new path"),
        "{log}"
    );

    // A fresh destination: the new primary's events are delivered.
    std::fs::rename(&events, dir.path().join("before-failover.jsonl")).unwrap();
    let mut relay = Relay::start(&config);
    insert_rows(&standby, 1, 5, 100);
    relay.delivers(&events, 5);
    assert_eq!(
        streamed_from(&relay.log()),
        (system_id, "2".to_owned()),
        "the same system on a new timeline"
    );
    relay.stops_cleanly();
}

/// A destination kept while the database behind it is re-created (or restored): the new
/// database's WAL positions start lower, and neither the backfill nor the stream may treat its
/// events as already delivered.
#[test]
fn a_destination_filled_from_a_recreated_database_is_not_trusted() {
    let old = PgCluster::start();
    old.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &old, "");
    init(&config);
    let mut relay = Relay::start(&config);
    insert_rows(&old, 20, 20, 2000);
    relay.delivers(&events, 400);
    relay.stops_cleanly();
    drop(old);

    let new = PgCluster::start();
    new.create_outbox("public.outbox");
    insert_rows(&new, 1, 5, 100);
    let (config, _) = write_config(dir.path(), &new, "backfill = true");
    init(&config);
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the file holds events beyond the new database's WAL");
    assert!(
        log.contains("sink file: its destination already holds events up to position"),
        "{log}"
    );
    assert_eq!(read_events(&events).len(), 400, "nothing was appended");
}

/// A relay that reaches a standby (a switchover in progress, a name not yet moved) waits
/// instead of exiting or creating anything, and streams once the standby is promoted (after a
/// backfill: the primary's slot is gone).
#[test]
fn a_relay_pointed_at_a_standby_waits_for_its_promotion() {
    let Scenario {
        pg: primary, dir, ..
    } = scenario().init();
    let standby = PgCluster::start_standby_of(&primary);
    // The slot `init` made on the primary does not survive the failover (before PostgreSQL
    // 17), and rows committed after it may be on the standby: rather than skip them on a new
    // slot, the relay backfills them.
    let (config, events) = write_config(&dir, &standby, "backfill = true");

    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("the server is a standby in recovery"),
        "{report}"
    );
    let mut relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || relay
            .log()
            .contains("the server is a standby in recovery")),
        "{}",
        relay.log()
    );
    assert!(
        relay.wait(Duration::from_millis(100)).is_none(),
        "run should keep retrying\n{}",
        relay.log()
    );

    primary.stop("fast");
    standby.promote();
    assert!(
        wait_until(WAIT, || {
            standby.psql("SELECT count(*) FROM pg_replication_slots") == "1"
        }),
        "the relay creates its slot on the promoted standby\n{}",
        relay.log()
    );
    insert_rows(&standby, 1, 5, 100);
    relay.delivers(&events, 5);
}

/// Waits until the file at `events` holds `count` events, all streamed on timeline 1;
/// returns the system identifier the relay streamed from.
fn delivered_from_the_first_timeline(relay: &Relay, events: &Path, count: usize) -> String {
    relay.delivers(events, count);
    let (system_id, timeline) = streamed_from(&relay.log());
    assert_eq!(timeline, "1");
    system_id
}

/// Rows `first..first + rows` in one transaction, keyed `o-0`..`o-6`, with `data.seq` their
/// number.
fn insert_numbered_rows(pg: &PgCluster, first: u64, rows: u64) {
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'o-' || (i % 7), 'T', jsonb_build_object('seq', i, 'pad', repeat('x', 500)) \
         FROM generate_series({first}, {}) i",
        first + rows - 1
    ));
}

/// A cluster of the server binaries in `bin`, with the outbox table.
fn cluster_with_outbox(bin: std::path::PathBuf) -> PgCluster {
    let pg = PgCluster::start_with(ClusterOptions {
        bin,
        ..Default::default()
    });
    pg.create_outbox("public.outbox");
    pg
}

/// A PostgreSQL 17 primary with the outbox table, and a standby that keeps copies of its
/// failover slots and streams through the physical slot `standby_slot`, which the primary
/// lists in `synchronized_standby_slots`.
fn primary_waiting_for_a_slot_syncing_standby() -> (PgCluster, PgCluster) {
    let primary = PgCluster::start_with(ClusterOptions {
        bin: pg17_bin(),
        settings: vec!["synchronized_standby_slots = 'standby_slot'".into()],
        ..Default::default()
    });
    primary.create_outbox("public.outbox");
    let standby = PgCluster::start_slot_syncing_standby_of(&primary, "standby_slot");
    (primary, standby)
}

/// Every number delivered exactly once, and each key's in increasing order.
fn assert_each_once_in_key_order(events: &[serde_json::Value], count: u64) {
    let mut seqs: Vec<u64> = events
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect();
    let mut last_per_key = BTreeMap::new();
    for event in events {
        let key = event["subject"].as_str().unwrap_or_default().to_owned();
        let seq = event["data"]["seq"].as_u64().unwrap();
        if let Some(last) = last_per_key.insert(key.clone(), seq) {
            assert!(last < seq, "key {key}: {seq} after {last}");
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=count).collect::<Vec<_>>(), "each event once");
}

/// PostgreSQL 17: with `source.failover_slot`, `init` creates a failover slot, a standby with
/// `sync_replication_slots` keeps a copy, and the primary waits for that standby
/// (`synchronized_standby_slots`) before the relay sees any change. When the primary is lost,
/// the relay, reaching the database through a name that moves, waits at the standby until it
/// is promoted and then streams from the copy of its slot: no operator step, nothing lost,
/// nothing repeated in the file.
#[test]
fn a_failover_slot_lets_the_relay_go_on_from_the_promoted_standby() {
    let (primary, standby) = primary_waiting_for_a_slot_syncing_standby();
    let database = PartitionProxy::start(primary.port);
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &primary, "failover_slot = true");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("127.0.0.1:{}/", primary.port),
        &format!("127.0.0.1:{}/", database.port),
    );
    std::fs::write(&config, text).unwrap();
    let out = relay_command(&config, "init");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && printed.contains("replication slot outbox_relay: created (a failover slot)"),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!printed.contains("warning"), "{printed}");
    assert_eq!(
        primary.psql("SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"),
        "t"
    );
    let status = String::from_utf8_lossy(&relay_command(&config, "status").stdout).into_owned();
    assert!(
        status.contains("slot outbox_relay: inactive") && status.contains(", a failover slot\n"),
        "{status}"
    );

    let mut relay = Relay::start(&config);
    insert_numbered_rows(&primary, 1, 20);
    // The copy is ready for failover once it is synchronized and no longer temporary.
    // PostgreSQL keeps it temporary until the slot on the primary has moved past what the
    // standby keeps: its catalog xmin moves at the next snapshot of running transactions,
    // which the server logs every 15 s, or at once when asked.
    assert!(
        wait_until(Duration::from_secs(120), || {
            primary.psql("SELECT pg_log_standby_snapshot()");
            read_events(&events).len() == 20
                && standby.psql(
                    "SELECT count(*) FROM pg_replication_slots \
                     WHERE slot_name = 'outbox_relay' AND synced AND NOT temporary",
                ) == "1"
        }),
        "20 events delivered and the slot synchronized to the standby\n{}\n{}",
        relay.log(),
        standby.psql("SELECT * FROM pg_replication_slots")
    );
    for batch in 0..10 {
        insert_numbered_rows(&primary, 21 + batch * 20, 20);
    }
    let system_id = delivered_from_the_first_timeline(&relay, &events, 220);

    // The primary is lost; the name moves to the standby before it is promoted.
    primary.stop("immediate");
    database.set_upstream(standby.port);
    let waits_before = relay
        .log()
        .matches("the server is a standby in recovery")
        .count();
    assert!(
        wait_until(WAIT, || relay
            .log()
            .matches("the server is a standby in recovery")
            .count()
            > waits_before),
        "the relay waits at the standby\n{}",
        relay.log()
    );
    standby.promote();
    insert_numbered_rows(&standby, 221, 5);
    // The standby's configuration came from the primary with its base backup, so the new
    // primary waits for a standby slot it does not have: PostgreSQL holds the relay back and
    // warns. The relay says so at the start of its session and logs the server's warning,
    // and `check` reports it. Clearing the setting lets the events through.
    let server_says = "replication slot \"standby_slot\" specified in parameter \"synchronized_standby_slots\" does not exist";
    let relay_says = "synchronized_standby_slots names slot \"standby_slot\", which does not exist on this server";
    assert!(
        wait_until(WAIT, || {
            let log = relay.log();
            log.contains(server_says) && log.contains(relay_says)
        }),
        "the warnings in the relay's log\n{}",
        relay.log()
    );
    assert_eq!(read_events(&events).len(), 220);
    let (ok, report) = relay_check(&config);
    assert!(!ok && report.contains(relay_says), "{report}");
    standby.psql("ALTER SYSTEM SET synchronized_standby_slots = ''");
    standby.psql("SELECT pg_reload_conf()");
    assert!(
        wait_until(WAIT, || relay_check(&config).0),
        "check passes once the setting is cleared\n{}",
        relay_check(&config).1
    );
    relay.delivers(&events, 225);
    assert_each_once_in_key_order(&read_events(&events), 225);
    assert_eq!(
        streamed_from(&relay.log()),
        (system_id.clone(), "2".to_owned()),
        "the same system on a new timeline"
    );
    assert_eq!(
        standby.psql("SELECT system_id || ' ' || timeline FROM outbox_relay.slots"),
        format!("{system_id} 2"),
        "the relay's record of the slot follows the promotion"
    );
    assert!(
        relay.wait(Duration::from_millis(100)).is_none(),
        "the relay keeps running\n{}",
        relay.log()
    );
    relay.stops_cleanly();
}

/// `synchronized_standby_slots` holds a failover slot's changes back while a listed standby
/// is down: the relay delivers nothing, logs PostgreSQL's warning, and goes on once the
/// standby is back.
#[test]
fn a_listed_standby_that_is_down_holds_the_relay_back_until_it_returns() {
    let (primary, standby) = primary_waiting_for_a_slot_syncing_standby();
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &primary, "failover_slot = true");
    init(&config);
    let mut relay = Relay::start(&config);
    insert_numbered_rows(&primary, 1, 5);
    relay.delivers(&events, 5);

    standby.stop("fast");
    insert_numbered_rows(&primary, 6, 5);
    let server_says = "replication slot \"standby_slot\" specified in parameter \"synchronized_standby_slots\" does not have active_pid";
    assert!(
        wait_until(WAIT, || relay.log().contains(server_says)),
        "the server's warning in the relay's log\n{}",
        relay.log()
    );
    assert_eq!(
        read_events(&events).len(),
        5,
        "held back while the standby is down"
    );
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains(
            "synchronized_standby_slots names slot \"standby_slot\", whose standby is not connected"
        ),
        "{report}"
    );

    standby.start_stopped();
    relay.delivers(&events, 10);
    assert_each_once_in_key_order(&read_events(&events), 10);
    relay.stops_cleanly();
}

/// `source.failover_slot` turns failover on for a slot made without it (by `run`, before
/// streaming), and creates the slot with it when a backfill does.
#[test]
fn failover_slot_makes_existing_and_backfill_slots_failover_slots() {
    let pg = cluster_with_outbox(pg17_bin());
    let failover = |slot: &str| {
        pg.psql(&format!(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "");
    init(&config);
    assert_eq!(failover("outbox_relay"), "f");
    let (config, _) = write_config(dir.path(), &pg, "failover_slot = true");
    let mut relay = Relay::start(&config);
    insert_numbered_rows(&pg, 1, 3);
    relay.delivers(&events, 3);
    assert_eq!(failover("outbox_relay"), "t");
    assert!(
        relay
            .log()
            .contains("making the replication slot a failover slot")
            && relay.log().contains("synchronized_standby_slots is empty"),
        "{}",
        relay.log()
    );
    relay.stops_cleanly();

    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(
        dir.path(),
        &pg,
        "slot = \"backfilled\"\nfailover_slot = true\nbackfill = true",
    );
    init(&config);
    let mut relay = Relay::start(&config);
    relay.delivers(&events, 3);
    assert_eq!(failover("backfilled"), "t");
    relay.stops_cleanly();
}

/// Before PostgreSQL 17 there are no failover slots: `init`, `check` and `run` say so.
#[test]
fn failover_slot_before_postgres_17_is_refused_with_what_to_do() {
    let pg = cluster_with_outbox(pg_bin_before_17());
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "failover_slot = true");
    let version = pg.psql("SHOW server_version");
    let expected = format!(
        "source.failover_slot needs PostgreSQL 17 or later, and this server is {version}: \
         upgrade it, or set source.failover_slot = false"
    );
    let out = relay_command(&config, "init");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(&expected),
        "{stderr}"
    );
    let (ok, report) = relay_check(&config);
    assert!(!ok && report.contains(&expected), "{report}");
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "no failover slots before 17");
    assert!(log.contains(&expected), "{log}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots"), "0");
}
