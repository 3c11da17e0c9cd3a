//! PostgreSQL failover to a physical standby that lagged behind the primary the relay streamed
//! from. Before PostgreSQL 17 the promoted standby has no logical slot, and WAL the relay had
//! already published may never have reached it. The relay must say so instead of re-creating
//! the slot silently, and a sink whose destination holds events from that lost WAL must not
//! skip the new primary's events up to their positions.

mod common;

use common::*;
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
        wait_until(Duration::from_secs(30), || {
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
    assert!(
        wait_until(Duration::from_secs(30), || read_events(&events).len()
            == 220),
        "220 events delivered\n{}",
        relay.log()
    );
    let (system_id, timeline) = streamed_from(&relay.log());
    assert_eq!(timeline, "1");
    relay.kill9();
    primary.stop("immediate");
    standby.start_stopped();
    standby.promote();
    assert_eq!(standby.psql("SELECT count(*) FROM outbox"), "20");

    // The relay now reaches the new primary (as through a moved DNS name), with the same sink.
    let (config, events_again) = write_config(dir.path(), &standby, "");
    assert_eq!(events, events_again);
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(
        Duration::from_secs(30),
        "the slot did not survive the failover",
    );
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
    standby.psql("DELETE FROM outbox_relay.checkpoints WHERE slot = 'outbox_relay'");
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(
        Duration::from_secs(30),
        "the file holds events beyond the new slot's start",
    );
    assert!(
        log.contains("sink file: its destination already holds events up to position")
            && log.contains("file: a new path"),
        "{log}"
    );

    // A fresh destination: the new primary's events are delivered.
    std::fs::rename(&events, dir.path().join("before-failover.jsonl")).unwrap();
    let mut relay = Relay::start(&config);
    insert_rows(&standby, 1, 5, 100);
    assert!(
        wait_until(Duration::from_secs(30), || read_events(&events).len() == 5),
        "the new primary's 5 events\n{}",
        relay.log()
    );
    assert_eq!(
        streamed_from(&relay.log()),
        (system_id, "2".to_owned()),
        "the same system on a new timeline"
    );
    assert!(relay
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
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
    assert!(
        wait_until(Duration::from_secs(30), || read_events(&events).len()
            == 400),
        "400 events delivered\n{}",
        relay.log()
    );
    assert!(relay
        .terminate(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    drop(old);

    let new = PgCluster::start();
    new.create_outbox("public.outbox");
    insert_rows(&new, 1, 5, 100);
    let (config, _) = write_config(dir.path(), &new, "backfill = true");
    init(&config);
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(
        Duration::from_secs(30),
        "the file holds events beyond the new database's WAL",
    );
    assert!(
        log.contains("sink file: its destination already holds events up to position"),
        "{log}"
    );
    assert_eq!(read_events(&events).len(), 400, "nothing was appended");
}

/// A relay that reaches a standby (a switchover in progress, a name not yet moved) waits
/// instead of exiting or creating anything, and streams once the standby is promoted.
#[test]
fn a_relay_pointed_at_a_standby_waits_for_its_promotion() {
    let primary = PgCluster::start();
    primary.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &primary, "");
    init(&config);
    let standby = PgCluster::start_standby_of(&primary);
    let (config, events) = write_config(dir.path(), &standby, "");

    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("the server is a standby in recovery"),
        "{report}"
    );
    let mut relay = Relay::start(&config);
    assert!(
        wait_until(Duration::from_secs(30), || relay
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
        wait_until(Duration::from_secs(60), || {
            standby.psql("SELECT count(*) FROM pg_replication_slots") == "1"
        }),
        "the relay creates its slot on the promoted standby\n{}",
        relay.log()
    );
    insert_rows(&standby, 1, 5, 100);
    assert!(
        wait_until(Duration::from_secs(30), || read_events(&events).len() == 5),
        "the 5 rows written after the slot\n{}",
        relay.log()
    );
}
