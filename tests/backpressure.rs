//! A stalled sink pauses reading (backpressure) while standby status updates keep flowing on
//! their own timer, so the walsender is not killed by `wal_sender_timeout`; once the sink
//! drains, every event arrives once, in order.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::time::Duration;

#[test]
fn a_stalled_sink_does_not_trip_wal_sender_timeout() {
    let pg = PgCluster::start();
    pg.psql("ALTER SYSTEM SET wal_sender_timeout = '2s'");
    pg.psql("SELECT pg_reload_conf()");
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "");
    // The file sink writes into a pipe nobody reads yet: it blocks once the pipe is full.
    let status = std::process::Command::new("mkfifo")
        .arg(&events)
        .status()
        .unwrap();
    assert!(status.success());
    let out = relay_command(&config, "init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay = Relay::start(&config);

    let rows = 3000;
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k', 'Seq', jsonb_build_object('seq', i, 'pad', repeat('x', 1000)) \
         FROM generate_series(0, {}) i",
        rows - 1
    ));
    let pid =
        || pg.psql("SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'outbox_relay'");
    assert!(
        wait_until(Duration::from_secs(30), || !pid().is_empty()),
        "relay log:\n{}",
        relay.log()
    );
    let walsender = pid();
    let stalled_since = pg.psql("SELECT now()");

    // Status updates keep arriving for three times wal_sender_timeout while the sink is stuck.
    let kept_alive = wait_until(Duration::from_secs(30), || {
        pg.psql(&format!(
            "SELECT coalesce(max(reply_time) > '{stalled_since}'::timestamptz + interval '6 seconds', false) \
             FROM pg_stat_replication WHERE pid = {walsender}"
        )) == "t"
    });
    assert!(
        kept_alive,
        "no status updates during the stall; relay log:\n{}",
        relay.log()
    );
    assert_eq!(pid(), walsender, "the walsender was replaced: it timed out");
    assert!(!relay.log().contains("reconnecting"), "{}", relay.log());

    // Drain the pipe: every event arrives once, in order.
    let reader = BufReader::new(std::fs::File::open(&events).unwrap());
    let seqs: Vec<u64> = reader
        .lines()
        .take(rows)
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap()["data"]["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (0..rows as u64).collect::<Vec<_>>());
}
