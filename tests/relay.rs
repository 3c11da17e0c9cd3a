//! End-to-end behaviour of `outbox-relay run` against a real PostgreSQL: events out of
//! committed rows, commit order, restarts and crashes, schema changes, slot advancement.

mod common;

use common::partition_proxy::PartitionProxy;
use common::*;
use std::time::Duration;

#[test]
fn committed_insert_becomes_an_event() {
    let (Scenario { pg, events, .. }, relay) = scenario().start();
    pg.psql(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES \
         ('6f1d6a0e-8f6b-4c1e-9a51-2f0c6b1d9e11', 'order', 'o-1', 'OrderCreated', '{\"total\": 12.5, \"items\": [1, 2]}')",
    );
    relay.delivers(&events, 1);
    let event = &read_events(&events)[0];
    // CloudEvents 1.0, structured mode: the default format.
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], "6f1d6a0e-8f6b-4c1e-9a51-2f0c6b1d9e11");
    assert_eq!(event["source"], "/public.outbox");
    assert_eq!(event["type"], "OrderCreated");
    assert_eq!(event["subject"], "o-1");
    assert_eq!(event["aggregatetype"], "order");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(
        event["data"],
        serde_json::json!({"total": 12.5, "items": [1, 2]})
    );
    assert!(event["time"].as_str().unwrap().ends_with('Z'));
    assert!(event["lsn"].as_str().unwrap().contains('/'));
    assert!(event["txid"].as_u64().unwrap() > 0);
    assert!(
        event["sequence"].as_str().unwrap().ends_with("00000000"),
        "index 0"
    );
}

/// `run` creates a missing slot itself (`source.create_slot`, the default), also on a server
/// that has no slot at all. Before 2026-12-02 it never did there: its query joined the
/// creating function with pg_replication_slots, and the planner, finding the view empty,
/// never called the function ("query returned an unexpected number of rows", retried forever).
#[test]
fn run_creates_its_slot_on_a_server_without_slots() {
    let Scenario {
        pg, config, events, ..
    } = scenario().init();
    // Dropped, with the relay's record of it (else `run` refuses to create it again).
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    pg.psql("DELETE FROM outbox_relay.slots WHERE slot = 'outbox_relay'");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots"), "0");
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || {
            pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'")
                == "1"
        }),
        "no slot; relay log:\n{}",
        relay.log()
    );
    pg.psql(&insert_sql("o-1", 1));
    relay.delivers(&events, 1);
}

/// (lsn, index) of every event, from the CloudEvents `sequence` extension (24 hex digits).
fn positions(events: &[serde_json::Value]) -> Vec<(u64, u64)> {
    events
        .iter()
        .map(|e| {
            let sequence = e["sequence"].as_str().unwrap();
            (
                u64::from_str_radix(&sequence[..16], 16).unwrap(),
                u64::from_str_radix(&sequence[16..], 16).unwrap(),
            )
        })
        .collect()
}

fn assert_commit_order(events: &[serde_json::Value]) {
    let positions = positions(events);
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions not strictly increasing: {positions:?}"
    );
}

fn insert_sql(key: &str, seq: usize) -> String {
    format!("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', '{key}', 'Seq', '{{\"seq\": {seq}}}')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transactions_arrive_in_commit_order() {
    let (Scenario { pg, events, .. }, relay) = scenario().start();

    // Three open transactions, inserted into in interleaved order, committed c, a, b.
    let (a, b, c) = (pg.client().await, pg.client().await, pg.client().await);
    for client in [&a, &b, &c] {
        client.batch_execute("BEGIN").await.unwrap();
    }
    for round in 0..3 {
        for (name, client) in [("a", &a), ("b", &b), ("c", &c)] {
            client
                .batch_execute(&insert_sql(name, round))
                .await
                .unwrap();
        }
    }
    for client in [&c, &a, &b] {
        client.batch_execute("COMMIT").await.unwrap();
    }
    // Then four writers, 40 transactions of 5 rows each, concurrently.
    let mut writers = Vec::new();
    for writer in 0..4 {
        let client = pg.client().await;
        writers.push(tokio::spawn(async move {
            for tx in 0..40 {
                let mut sql = String::from("BEGIN;");
                for row in 0..5 {
                    sql.push_str(&insert_sql(&format!("w{writer}"), tx * 5 + row));
                    sql.push(';');
                }
                sql.push_str("COMMIT;");
                client.batch_execute(&sql).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let expected = 9 + 4 * 40 * 5;
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= expected),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&events);
    assert_eq!(events.len(), expected);
    assert_commit_order(&events);
    let keys: Vec<&str> = events[..9]
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["c", "c", "c", "a", "a", "a", "b", "b", "b"]);
    for writer in 0..4 {
        let key = format!("w{writer}");
        let seqs: Vec<u64> = events
            .iter()
            .filter(|e| e["subject"] == key.as_str())
            .map(|e| e["data"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (0..200).collect::<Vec<u64>>(),
            "per-key order for {key}"
        );
    }
}

#[test]
fn rollbacks_and_rolled_back_savepoints_yield_nothing() {
    let (Scenario { pg, events, .. }, relay) = scenario().start();
    pg.psql(&format!("BEGIN; {}; ROLLBACK;", insert_sql("gone", 0)));
    pg.psql(&format!(
        "BEGIN; {}; SAVEPOINT s; {}; ROLLBACK TO SAVEPOINT s; {}; COMMIT;",
        insert_sql("kept", 1),
        insert_sql("gone", 2),
        insert_sql("kept", 3)
    ));
    // Debezium's housekeeping pattern: insert then delete in one transaction is one event.
    pg.psql(&format!(
        "BEGIN; {}; DELETE FROM outbox WHERE aggregateid = 'tidy'; COMMIT;",
        insert_sql("tidy", 4)
    ));
    pg.psql("UPDATE outbox SET type = 'Changed' WHERE aggregateid = 'kept'"); // two rows
    pg.psql(&insert_sql("last", 5));
    assert!(
        wait_until(WAIT, || read_events(&events)
            .iter()
            .any(|e| e["subject"] == "last")),
        "relay log:\n{}",
        relay.log()
    );
    let seqs = read_seqs(&events);
    assert_eq!(seqs, [1, 3, 4, 5], "only committed inserts are events");
    let mut relay = relay;
    let status = relay
        .terminate(Duration::from_secs(10))
        .expect("no exit after SIGTERM");
    assert!(status.success());
    let log = relay.log();
    assert!(
        log.contains("events=4")
            && log.contains("skipped_updates=2")
            && log.contains("skipped_deletes=1"),
        "{log}"
    );
}

#[test]
fn clean_restart_repeats_nothing() {
    let (
        Scenario {
            pg, config, events, ..
        },
        mut relay,
    ) = scenario().start();
    for i in 0..20 {
        pg.psql(&insert_sql("k", i));
    }
    relay.delivers(&events, 20);
    let status = relay
        .terminate(Duration::from_secs(10))
        .expect("relay did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        relay.log()
    );
    // The final status update reached the server, and the checkpoint names the last event.
    let last_lsn = read_events(&events).last().unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    let confirmed = pg.psql(&format!(
        "SELECT confirmed_flush_lsn > '{last_lsn}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
    ));
    assert_eq!(
        confirmed, "t",
        "slot not confirmed past the last event at {last_lsn}"
    );
    let checkpoint = pg.psql("SELECT commit_lsn || '#' || event_index FROM outbox_relay.checkpoints WHERE slot = 'outbox_relay' AND sink = 'file'");
    assert_eq!(checkpoint, format!("{last_lsn}#0"));

    for i in 20..30 {
        pg.psql(&insert_sql("k", i));
    }
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= 30),
        "relay log:\n{}",
        relay.log()
    );
    let seqs = read_seqs(&events);
    assert_eq!(seqs, (0..30).collect::<Vec<u64>>());
}

/// Starts `writers` concurrent writers, each committing `txs` transactions of 3 rows with
/// per-key sequence numbers continuing from `first_tx * 3`.
async fn start_writers(
    pg: &PgCluster,
    writers: usize,
    first_tx: usize,
    txs: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    for writer in 0..writers {
        let client = pg.client().await;
        handles.push(tokio::spawn(async move {
            for tx in first_tx..first_tx + txs {
                let mut sql = String::from("BEGIN;");
                for row in 0..3 {
                    sql.push_str(&insert_sql(&format!("w{writer}"), tx * 3 + row));
                    sql.push(';');
                }
                sql.push_str("COMMIT;");
                client.batch_execute(&sql).await.unwrap();
            }
        }));
    }
    handles
}

/// Every writer's events arrived exactly once and in per-key order.
fn assert_exactly_once_per_key(events: &[serde_json::Value], writers: usize, rows_per_writer: u64) {
    assert_eq!(
        events.len() as u64,
        writers as u64 * rows_per_writer,
        "every committed row exactly once"
    );
    assert_commit_order(events);
    for writer in 0..writers {
        let key = format!("w{writer}");
        let seqs: Vec<u64> = events
            .iter()
            .filter(|e| e["subject"] == key.as_str())
            .map(|e| e["data"]["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            (0..rows_per_writer).collect::<Vec<u64>>(),
            "per-key order for {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_and_repeats_nothing() {
    let Scenario {
        pg, config, events, ..
    } = scenario().init();
    // Writers run throughout; the relay is killed five times, each time as soon as it has
    // delivered more, so kills land while rows are being written and delivered.
    let (writers, txs, kills) = (3, 1500, 5);
    let running = start_writers(&pg, writers, 0, txs).await;
    let mut killed_mid_stream = 0;
    for kill in 0..kills {
        let mut relay = Relay::start(&config);
        let seen = read_events(&events).len();
        let progressed = wait_until(WAIT, || {
            read_events(&events).len() > seen + 50 || running.iter().all(|w| w.is_finished())
        });
        assert!(
            progressed,
            "round {kill}: no progress; log:\n{}",
            relay.log()
        );
        relay.kill9();
        if running.iter().any(|w| !w.is_finished()) {
            killed_mid_stream += 1;
        }
    }
    for writer in running {
        writer.await.unwrap();
    }
    assert!(
        killed_mid_stream > 0,
        "no kill happened while rows were being written"
    );
    let relay = Relay::start(&config);
    let total = writers * txs * 3;
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= total),
        "relay log:\n{}",
        relay.log()
    );
    assert_exactly_once_per_key(&read_events(&events), writers, (txs * 3) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_then_restart_repeats_nothing_on_the_stdout_sink() {
    // The stdout sink keeps no position of its own, and batches of 4 events split the
    // 3-row transactions, so shutdowns leave transactions partly delivered: only the
    // checkpoint table (not the slot's confirmed LSN) prevents repeating their first rows.
    let Scenario { pg, config, .. } = scenario()
        .relay("checkpoint_interval = \"10s\"\nbatch_size = 4")
        .sinks("[sinks.out]\ntype = \"stdout\"")
        .init();
    let events = stdout_events_path(&config);
    let (writers, chunk, rounds) = (3, 150, 3);
    for round in 0..rounds {
        let mut relay = Relay::start(&config);
        let seen = read_events(&events).len();
        let chunk_writers = start_writers(&pg, writers, round * chunk, chunk).await;
        assert!(
            wait_until(WAIT, || read_events(&events).len() > seen),
            "log:\n{}",
            relay.log()
        );
        let status = relay
            .terminate(Duration::from_secs(10))
            .expect("no exit within 10 s of SIGTERM");
        assert!(status.success(), "exit {status:?}; log:\n{}", relay.log());
        for writer in chunk_writers {
            writer.await.unwrap();
        }
    }
    let relay = Relay::start(&config);
    let total = writers * chunk * rounds * 3;
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= total),
        "relay log:\n{}",
        relay.log()
    );
    assert_exactly_once_per_key(&read_events(&events), writers, (chunk * rounds * 3) as u64);
}

#[test]
fn alter_table_mid_stream_keeps_flowing() {
    let (Scenario { pg, events, .. }, relay) = scenario().start();
    pg.psql(&insert_sql("k", 0));
    relay.delivers(&events, 1);
    pg.psql("ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'acme'");
    pg.psql(&insert_sql("k", 1));
    pg.psql("ALTER TABLE outbox DROP COLUMN tenant");
    pg.psql(&format!(
        "BEGIN; {}; ALTER TABLE outbox ADD COLUMN note text; {}; COMMIT;",
        insert_sql("k", 2),
        insert_sql("k", 3)
    ));
    relay.delivers(&events, 4);
    let seqs = read_seqs(&events);
    assert_eq!(seqs, [0, 1, 2, 3]);
}

#[test]
fn idle_outbox_on_a_busy_database_advances_the_slot() {
    let (Scenario { pg, .. }, relay) = scenario().start();
    pg.psql("CREATE TABLE other (n int)");
    let start = pg.psql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    );
    let advanced = wait_until(WAIT, || {
        pg.psql("INSERT INTO other SELECT generate_series(1, 100)");
        let ahead = pg.psql(&format!(
            "SELECT confirmed_flush_lsn > '{start}'::pg_lsn + 8192 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
        ));
        ahead == "t"
    });
    assert!(
        advanced,
        "confirmed_flush_lsn stayed near {start}; relay log:\n{}",
        relay.log()
    );
}

#[test]
fn bad_rows_are_dead_lettered_and_the_stream_goes_on() {
    let (Scenario { pg, events, .. }, relay) = scenario()
        .outbox_sql("CREATE TABLE outbox (id text PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload text)")
        .start();
    pg.psql(
        "INSERT INTO outbox VALUES \
         ('00000000-0000-0000-0000-000000000001', 'order', 'o-1', 'T', '{not json'), \
         ('00000000-0000-0000-0000-000000000002', 'order', NULL, 'T', '{}'), \
         ('', 'order', 'o-1', 'T', '{}'), \
         ('00000000-0000-0000-0000-000000000004', 'order', 'o-1', 'T', '{\"ok\": true}')",
    );
    relay.delivers(&events, 1);
    assert_eq!(read_events(&events)[0]["data"]["ok"], true);
    assert!(wait_until(WAIT, || dead_letters(&pg, "reason").len() == 3));
    let reasons = pg.psql(
        "SELECT string_agg(reason, ' | ' ORDER BY event_index) FROM outbox_relay.dead_letters",
    );
    assert!(
        reasons.contains("not valid JSON")
            && reasons.contains("\"aggregateid\" is NULL")
            && reasons.contains("the id column is empty"),
        "{reasons}"
    );
    let raw =
        pg.psql("SELECT row_data->>'payload' FROM outbox_relay.dead_letters WHERE event_index = 0");
    assert_eq!(raw, "{not json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_mid_stream_lose_and_repeat_nothing() {
    let (Scenario { pg, events, .. }, relay) = scenario().start();
    let mut expected = 0;
    for mode in ["fast", "immediate"] {
        for i in 0..50 {
            pg.psql(&insert_sql("k", expected + i));
        }
        expected += 50;
        assert!(
            wait_until(WAIT, || read_events(&events).len() >= expected - 10),
            "relay log:\n{}",
            relay.log()
        );
        pg.restart(mode);
    }
    for i in 0..50 {
        pg.psql(&insert_sql("k", expected + i));
    }
    expected += 50;
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= expected),
        "relay log:\n{}",
        relay.log()
    );
    let seqs: Vec<usize> = read_events(&events)
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(seqs, (0..expected).collect::<Vec<_>>());
    assert!(
        relay.log().contains("reconnecting"),
        "the relay should have reconnected:\n{}",
        relay.log()
    );
}

/// Without leader election, the slot itself keeps a second relay out (tests/leader.rs has
/// the same with election on).
#[test]
fn a_second_relay_on_the_same_slot_stands_by_and_takes_over() {
    let (
        Scenario {
            pg, config, events, ..
        },
        mut first,
    ) = scenario().source("[leader]\nenabled = false").start();
    pg.psql(&insert_sql("k", 0));
    first.delivers(&events, 1);
    let second = Relay::start(&config);
    assert!(
        wait_until(WAIT, || second
            .log()
            .contains("standing by until the slot is free")),
        "second relay log:\n{}",
        second.log()
    );
    assert!(
        second
            .log()
            .contains("another relay is streaming from this slot"),
        "{}",
        second.log()
    );
    pg.psql(&insert_sql("k", 1));
    assert!(wait_until(WAIT, || read_events(&events).len() == 2));
    first.kill9();
    pg.psql(&insert_sql("k", 2));
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= 3),
        "second relay log:\n{}",
        second.log()
    );
    let seqs = read_seqs(&events);
    assert_eq!(seqs, [0, 1, 2]);
}

#[test]
fn the_stdout_example_config_works_with_only_the_url_from_the_environment() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/stdout.toml");
    let relay_cmd = |command: &str| {
        let mut cmd = std::process::Command::new(relay_bin());
        cmd.args(["--config", example, command])
            .env("OUTBOX_RELAY__SOURCE__URL", pg.url());
        cmd
    };
    let out = relay_cmd("init").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = relay_cmd("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    pg.psql(&insert_sql("o-7", 7));
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["subject"], "o-7");
    assert_eq!(event["data"]["seq"], 7);
}

#[test]
fn heartbeats_advance_the_slot_of_an_otherwise_idle_database() {
    let Scenario { pg, config, .. } = scenario().source("heartbeat_interval = \"100ms\"").init();
    let start = pg.psql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    );
    let relay = Relay::start(&config);
    // Idle PostgreSQL writes ~50 bytes of WAL per 15 s; ten heartbeats write far more.
    let advanced = wait_until(WAIT, || {
        pg.psql(&format!(
            "SELECT confirmed_flush_lsn >= '{start}'::pg_lsn + 1000 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
        )) == "t"
    });
    assert!(
        advanced,
        "confirmed_flush_lsn stayed near {start}; relay log:\n{}",
        relay.log()
    );
    assert!(!relay.log().contains("heartbeat failed"), "{}", relay.log());
}

/// Checkpoint writes that fail (here a trigger refuses them) are retried while delivery goes
/// on; once the table takes writes again the checkpoint catches up, and a crash after that
/// neither loses nor repeats anything.
#[test]
fn an_unwritable_checkpoint_table_delays_checkpoints_not_delivery() {
    let Scenario {
        pg, config, events, ..
    } = scenario().init();
    pg.psql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'checkpoints are read-only for this test'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON outbox_relay.checkpoints \
         FOR EACH ROW EXECUTE FUNCTION refuse()",
    );
    let mut relay = Relay::start(&config);
    for seq in 0..5 {
        pg.psql(&insert_sql("k", seq));
    }
    assert!(
        wait_until(WAIT, || read_events(&events).len() == 5
            && relay.log().contains("writing checkpoints failed; retrying")),
        "relay log:\n{}",
        relay.log()
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM outbox_relay.checkpoints"),
        "0"
    );

    pg.psql("DROP TRIGGER refuse ON outbox_relay.checkpoints");
    assert!(
        wait_until(WAIT, || pg
            .psql("SELECT count(*) FROM outbox_relay.checkpoints")
            == "1"),
        "relay log:\n{}",
        relay.log()
    );
    relay.kill9();
    for seq in 5..8 {
        pg.psql(&insert_sql("k", seq));
    }
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= 8),
        "relay log:\n{}",
        relay.log()
    );
    let seqs = read_seqs(&events);
    assert_eq!(seqs, (0..8).collect::<Vec<_>>(), "nothing lost or repeated");
}

/// An outbox table dropped and re-created leaves the publication, and logical replication
/// never shows its rows: `run` says so (it cannot see them), and recovers once the table is
/// published again.
#[test]
fn an_outbox_table_missing_from_the_publication_is_reported_by_run() {
    let (Scenario { pg, events, .. }, relay) = scenario()
        .source("publication_check_interval = \"200ms\"")
        .start();
    pg.psql(&insert_sql("k", 0));
    assert!(wait_until(WAIT, || read_events(&events).len() == 1));
    pg.psql("DROP TABLE outbox");
    pg.create_outbox("public.outbox");
    assert!(
        wait_until(WAIT, || relay.log().contains(
            "publication outbox_relay does not include public.outbox"
        )),
        "relay log:\n{}",
        relay.log()
    );
    assert!(relay.log().contains("public.outbox"), "{}", relay.log());
    pg.psql("ALTER PUBLICATION outbox_relay ADD TABLE outbox");
    assert!(
        wait_until(WAIT, || relay.log().contains(
            "the publication delivers every outbox table's inserts again"
        )),
        "relay log:\n{}",
        relay.log()
    );
    pg.psql(&insert_sql("k", 1));
    relay.delivers(&events, 2);
}

/// A silent network partition between the relay and PostgreSQL (packets dropped, nothing
/// reset): the replication connection is given up after `source.tcp_user_timeout`, not after
/// the kernel's ~15 minutes of retransmissions, and once the path heals the relay goes on
/// with nothing lost or repeated. Leader election is off: its lock check would notice too.
#[test]
fn a_silent_partition_from_postgres_ends_the_session_after_the_tcp_user_timeout() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let proxy = PartitionProxy::start_with_small_buffers(pg.port);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        proxy.port
    );
    let config = ConfigFile::new()
        .source(&format!(
            "url = \"{url}\"\nstatus_interval = \"50ms\"\ntcp_user_timeout = \"2s\""
        ))
        .sinks(&format!(
            "[leader]\nenabled = false\n{}",
            file_sink("file", &events)
        ))
        .write(dir.path(), &pg);
    init(&config);
    let relay = Relay::start(&config);
    for seq in 0..5 {
        pg.psql(&insert_sql("o-1", seq));
    }
    relay.delivers(&events, 5);

    proxy.set_cut(true);
    for seq in 5..10 {
        pg.psql(&insert_sql("o-1", seq));
    }
    assert!(
        wait_until(WAIT, || relay.log().contains("replication session ended")),
        "the session should end within seconds of the partition\n{}",
        relay.log()
    );
    proxy.set_cut(false);
    assert!(
        wait_until(Duration::from_secs(60), || read_events(&events).len() >= 10),
        "relay log:\n{}",
        relay.log()
    );
    let ids: std::collections::HashSet<String> = read_events(&events)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 10);
    assert_eq!(read_events(&events).len(), 10, "nothing repeated");
}

/// Guarantee: a position every sink acknowledged is confirmed to PostgreSQL within moments,
/// not at the next standby status interval (60 s here), so a relay killed with SIGKILL
/// afterwards re-reads none of what it delivered: the restarted relay skips nothing
/// (`outbox_relay_events_skipped_total`) and delivers the new events once.
#[test]
fn acknowledged_positions_are_confirmed_promptly_so_a_crash_rereads_nothing() {
    let port = free_port();
    let (
        Scenario {
            pg, config, events, ..
        },
        mut relay,
    ) = scenario()
        .source("status_interval = \"60s\"\n")
        .tables(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    for i in 0..20 {
        pg.psql(&insert_sql("k", i));
    }
    relay.delivers(&events, 20);
    let last_lsn = read_events(&events).last().unwrap()["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    let confirmed = || {
        pg.psql(&format!(
            "SELECT confirmed_flush_lsn > '{last_lsn}'::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = 'outbox_relay'"
        )) == "t"
    };
    assert!(
        wait_until(Duration::from_secs(5), confirmed),
        "the slot was not confirmed past {last_lsn} within 5 s; log:\n{}",
        relay.log()
    );
    relay.kill9();
    for i in 20..30 {
        pg.psql(&insert_sql("k", i));
    }
    let relay = Relay::start(&config);
    relay.delivers(&events, 30);
    assert_eq!(read_seqs(&events), (0..30).collect::<Vec<u64>>());
    let metrics = http_get(port, "/metrics").expect("metrics answer").1;
    let skipped: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("outbox_relay_events_skipped_total{"))
        .collect();
    assert!(
        !skipped.is_empty(),
        "no outbox_relay_events_skipped_total series in the metrics:\n{metrics}"
    );
    assert!(
        skipped.iter().all(|line| line.ends_with(" 0")),
        "the restart re-read delivered events: {skipped:?}"
    );
}
