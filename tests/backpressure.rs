//! A stalled sink pauses reading (backpressure) while standby status updates keep flowing on
//! their own timer, so the walsender is not killed by `wal_sender_timeout`; until then the
//! reader fills the batch it holds, up to its event and byte limits; once the sink drains,
//! every event arrives once, in order.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

#[test]
fn a_stalled_sink_does_not_trip_wal_sender_timeout() {
    let pg = PgCluster::start();
    pg.psql("ALTER SYSTEM SET wal_sender_timeout = '2s'");
    pg.psql("SELECT pg_reload_conf()");
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "");
    // The file sink writes into a pipe nobody reads yet: it blocks once the pipe is full.
    mkfifo(&events);
    init(&config);
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
        wait_until(WAIT, || !pid().is_empty()),
        "relay log:\n{}",
        relay.log()
    );
    let walsender = pid();
    let stalled_since = pg.psql("SELECT now()");

    // Status updates keep arriving for three times wal_sender_timeout while the sink is stuck.
    let kept_alive = wait_until(WAIT, || {
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
    assert_eq!(
        read_seqs(&events, rows),
        (0..rows as u64).collect::<Vec<_>>()
    );
}

/// While a sink is behind, the reader goes on reading into the batch it holds (up to
/// `relay.batch_size` events) instead of waiting with a small one: the sink later gets fewer,
/// fuller batches, and the position received goes on moving.
#[test]
fn the_reader_fills_its_batch_while_a_sink_is_behind() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (relay, events) = relay_into_a_pipe(&pg, dir.path(), "batch_size = 1000\nqueue_depth = 1");
    let insert = |from: u64, to: u64| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'k', 'Seq', jsonb_build_object('seq', i, 'pad', repeat('x', 1000)) \
             FROM generate_series({from}, {to}) i"
        ))
    };
    let received_through = |lsn: &str| {
        pg.psql(&format!(
            "SELECT coalesce(bool_and(write_lsn >= '{lsn}'::pg_lsn), false) FROM pg_stat_replication"
        )) == "t"
    };
    // One transaction of 100 events, more than the pipe holds: the sink stalls in it.
    insert(0, 99);
    let stalled_at = pg.psql("SELECT pg_current_wal_flush_lsn()");
    assert!(
        wait_until(WAIT, || received_through(&stalled_at)),
        "the relay did not read the first transaction; log:\n{}",
        relay.log()
    );
    // Ten more transactions of one event each, while the sink is stalled and its queue of
    // one batch fills up.
    let mut last_start = String::new();
    for seq in 100..110 {
        last_start = pg.psql("SELECT pg_current_wal_flush_lsn()");
        insert(seq, seq);
    }
    assert!(
        wait_until(WAIT, || received_through(&last_start)),
        "the reader stopped reading while the sink was behind; log:\n{}",
        relay.log()
    );

    // Once the sink drains, every event arrives once, in order.
    assert_eq!(read_seqs(&events, 110), (0..110).collect::<Vec<_>>());
}

/// With large rows a batch closes at `relay.batch_bytes`, not at `relay.batch_size` events:
/// what the relay holds while a sink is behind stays about `queue_depth + 2` batches of that
/// many bytes, however large the rows (before, 1,000 rows of 64 KiB made a 64 MiB batch, and
/// a stalled broker sink peaked at 400 MB).
#[test]
fn a_batch_closes_at_its_byte_limit_while_a_sink_is_behind() {
    const BATCH_BYTES: u64 = 64 * 1024;
    const PAD: u64 = 16 * 1024;
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let (relay, events) = relay_into_a_pipe(
        &pg,
        dir.path(),
        &format!("batch_size = 1000\nbatch_bytes = {BATCH_BYTES}\nqueue_depth = 1"),
    );
    // 100 rows of 16 KiB: far more than the pipe, the sink's queue and one batch can hold.
    pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k', 'Seq', jsonb_build_object('seq', i, 'pad', repeat('x', {PAD})) \
         FROM generate_series(0, 99) i"
    ));
    let paused = "batch full while a sink is behind: reading pauses";
    assert!(
        wait_until(WAIT, || relay.log().contains(paused)),
        "the reader never filled a batch; log:\n{}",
        relay.log()
    );
    let log = relay.log();
    let line = log.lines().find(|line| line.contains(paused)).unwrap();
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The batch closed with the event that took it to the limit: 4 rows of a little more
    // than 16 KiB, not 100.
    assert_eq!(field("events"), 4, "{line}");
    assert!(
        (BATCH_BYTES..BATCH_BYTES + PAD + 1024).contains(&field("bytes")),
        "{line}"
    );

    // Once the sink drains, every event arrives once, in order.
    assert_eq!(read_seqs(&events, 100), (0..100).collect::<Vec<_>>());
}

/// A relay with these `[relay]` settings whose file sink writes into a pipe nobody reads
/// yet; returns it and the pipe's path.
fn relay_into_a_pipe(pg: &PgCluster, dir: &Path, relay_settings: &str) -> (Relay, PathBuf) {
    pg.create_outbox("public.outbox");
    let events = dir.join("events.jsonl");
    mkfifo(&events);
    let config = ConfigFile::new()
        .relay(relay_settings)
        .sinks(&format!(
            "[sinks.file]\ntype = \"file\"\npath = \"{}\"\nfsync = false\n",
            events.display()
        ))
        .write(dir, pg);
    init(&config);
    (Relay::start(&config), events)
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// The `data.seq` of the first `rows` events written into the pipe at `events`.
fn read_seqs(events: &Path, rows: usize) -> Vec<u64> {
    let reader = BufReader::new(std::fs::File::open(events).unwrap());
    reader
        .lines()
        .take(rows)
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap()["data"]["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}
