//! Inputs and conditions from an adversarial review that once lost events, looped forever or
//! stopped the relay: a full disk under the file sink, logical messages holding NUL bytes,
//! payloads spanning lines, payloads deeper or larger than serde_json's defaults, non-ISO
//! `DateStyle`s and non-UTF-8 bytes in a `SQL_ASCII` database. Each must end in delivered
//! events or dead letters (with their raw bytes), and the stream must go on.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the length of a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "64k") at `dir`; `None` when we are not root.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Some(Tmpfs(dir.to_owned()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs failed: {status}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `a <= b` for two LSNs in PostgreSQL's text form.
fn lsn_at_or_below(pg: &PgCluster, a: &str, b: &str) -> bool {
    pg.psql(&format!("SELECT '{a}'::pg_lsn <= '{b}'::pg_lsn")) == "t"
}

/// Item 6: a write that hits ENOSPC fails its own batch. Nothing past the file's content is
/// acknowledged, the batch is retried, and once space is freed every event is in the file
/// exactly once, in order.
#[test]
fn a_full_disk_fails_the_batch_that_hit_it_and_loses_nothing_once_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&dir.path().join("disk"), "64k") else {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    };
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let events = disk.0.join("events.jsonl");
    let config = ConfigFile::new()
        .sinks(&format!(
            "[sinks.file]\ntype = \"file\"\nfsync = true\npath = \"{}\"\n",
            events.display()
        ))
        .write(dir.path(), &pg);
    init(&config);
    let mut relay = Relay::start(&config);
    // About 1.2 KB per line: the 64 KiB disk fills after some 50 events.
    const ROWS: u64 = 120;
    for seq in 0..ROWS {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
             ('order', 'o', 'T', jsonb_build_object('seq', {seq}, 'pad', repeat('x', 1000)))"
        ));
    }
    assert!(
        wait_until(WAIT, || {
            let log = relay.log();
            log.contains("No space left on device") || log.contains("no storage space")
        }),
        "the disk never filled up:\n{}",
        relay.log()
    );
    // Give the relay time to (wrongly) acknowledge what it could not write: several status
    // updates and checkpoint writes.
    let log_len = relay.log().len();
    assert!(
        wait_until(WAIT, || relay.log()[log_len..]
            .matches("retrying the batch")
            .count()
            >= 3),
        "the batch that hit the full disk must be retried:\n{}",
        relay.log()
    );
    let confirmed = pg.psql(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    );
    let checkpoint = pg.psql("SELECT commit_lsn FROM outbox_relay.checkpoints");
    let written = read_seqs(&events).len();
    assert!(
        (written as u64) < ROWS,
        "everything fit: make the rows larger"
    );
    disk.resize("16m");
    assert!(
        wait_until(WAIT, || read_seqs(&events).len() as u64 >= ROWS),
        "after space was freed: {} of {ROWS} events\n{}",
        read_seqs(&events).len(),
        relay.log()
    );
    relay.stops_cleanly();
    assert_eq!(read_seqs(&events), (0..ROWS).collect::<Vec<_>>());
    // The first event that was not in the file while the disk was full: neither the slot
    // nor the checkpoint may have passed its commit.
    let first_missing = read_events(&events)[written]["lsn"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        lsn_at_or_below(&pg, &confirmed, &first_missing),
        "the slot confirmed {confirmed} while the event committed at {first_missing} was not \
         in the file ({written} events were)"
    );
    assert!(
        checkpoint.is_empty() || !lsn_at_or_below(&pg, &first_missing, &checkpoint),
        "the checkpoint {checkpoint} passed the event committed at {first_missing}, which was \
         not in the file"
    );
}

/// Item 7: a logical message whose content `jsonb` cannot hold (a NUL byte; bytes that are
/// not UTF-8) is dead-lettered with its exact bytes, `dlq show` shows them, and the stream
/// goes on.
#[test]
fn a_message_holding_nul_or_non_utf8_bytes_is_dead_lettered_with_its_raw_bytes() {
    let (
        Scenario {
            pg, config, events, ..
        },
        relay,
    ) = scenario().source("message_prefixes = [\"outbox\"]").start();
    pg.psql("SELECT pg_logical_emit_message(true, 'outbox', E'\\\\x00'::bytea)");
    pg.psql("SELECT pg_logical_emit_message(true, 'outbox', E'\\\\x7b00e97d'::bytea)");
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"seq\": 1}')",
    );
    assert!(
        wait_until(WAIT, || read_seqs(&events) == [1]),
        "the event after the messages:\n{}",
        relay.log()
    );
    let dead = pg.psql(
        "SELECT source_table, encode(raw, 'hex'), row_data::text FROM outbox_relay.dead_letters ORDER BY id",
    );
    assert_eq!(
        dead,
        "message:outbox|00|\"\u{FFFD}\"\nmessage:outbox|7b00e97d|\"{\u{FFFD}\u{FFFD}}\""
    );
    let id = pg.psql("SELECT min(id) FROM outbox_relay.dead_letters");
    let shown = Command::new(relay_bin())
        .arg("--config")
        .arg(&config)
        .args(["dlq", "show", &id])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(r#""raw": "\\x00""#), "{shown}");
    assert!(!relay.log().contains("panicked"), "{}", relay.log());
}

/// Item 7, upgrade: relay tables from before the `raw` column make `run` stop and `check`
/// fail with the fix (`init`), instead of retrying the first dead letter forever; `init`
/// adds the column.
#[test]
fn a_dead_letter_table_without_the_raw_column_asks_for_init() {
    let Scenario { pg, config, .. } = scenario().init();
    pg.psql("ALTER TABLE outbox_relay.dead_letters DROP COLUMN raw");
    let (passed, text) = relay_check(&config);
    assert!(
        !passed && text.contains("run `outbox-relay init`"),
        "{text}"
    );
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "the dead-letter table lacks raw");
    assert!(log.contains("has no column raw"), "{log}");
    init(&config);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
}

/// Item 9: a `json` payload typed over several lines is one line in every line-based format,
/// the same JSON, and the file sink still reads its position back after a restart.
#[test]
fn a_payload_with_line_breaks_is_one_line_in_every_format_and_survives_a_restart() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload json NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let formats = ["cloudevents", "debezium", "raw"];
    let sinks: String = formats
        .iter()
        .map(|format| {
            format!(
                "[sinks.{format}]\ntype = \"file\"\nformat = \"{format}\"\nfsync = false\npath = \"{}\"\n",
                dir.path().join(format!("{format}.jsonl")).display()
            )
        })
        .collect();
    let config = ConfigFile::new().sinks(&sinks).write(dir.path(), &pg);
    init(&config);
    let insert = |seq: u32| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', \
             E'{{\\r\\n  \"seq\": {seq},\\n  \"text\": \"two\\\\nlines\"\\n}}\\n')"
        ));
    };
    let seqs = |format: &str| -> Vec<u64> {
        read_events(&dir.path().join(format!("{format}.jsonl")))
            .iter()
            .map(|e| {
                let data = if format == "cloudevents" {
                    &e["data"]
                } else {
                    e
                };
                assert_eq!(data["text"], "two\nlines", "{e}");
                data["seq"].as_u64().unwrap()
            })
            .collect()
    };
    let mut relay = Relay::start(&config);
    insert(1);
    assert!(
        wait_until(WAIT, || formats.iter().all(|f| seqs(f) == [1])),
        "{}",
        relay.log()
    );
    relay.stops_cleanly();
    let mut relay = Relay::start(&config);
    insert(2);
    assert!(
        wait_until(WAIT, || formats.iter().all(|f| seqs(f) == [1, 2])),
        "after a restart: {}",
        relay.log()
    );
    relay.stops_cleanly();
    for format in formats {
        let text = std::fs::read_to_string(dir.path().join(format!("{format}.jsonl"))).unwrap();
        assert_eq!(text.lines().count(), 2, "{format}: {text}");
    }
}

/// The non-empty lines of a file sink's output.
fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// Item 16: payloads nested 200 deep, or holding numbers beyond f64 (`1e400`), in `jsonb`
/// and in `text` columns, are events with validation off and with it on.
#[test]
fn deep_payloads_and_numbers_beyond_f64_are_events_with_and_without_validation() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    pg.psql(
        "CREATE TABLE loose (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload text NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    for event_type in ["deep", "huge"] {
        std::fs::write(
            schemas.join(format!("{event_type}.json")),
            r#"{"type": "array"}"#,
        )
        .unwrap();
    }
    let events = dir.path().join("events.jsonl");
    let config = ConfigFile::new()
        .sinks(&format!(
            "[sinks.file]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n",
            events.display()
        ))
        .write(dir.path(), &pg);
    let base = std::fs::read_to_string(&config).unwrap().replace(
        "[source]\n",
        "[source]\ntables = [\"public.outbox\", \"public.loose\"]\n",
    );
    std::fs::write(&config, &base).unwrap();
    init(&config);
    let insert_all = || {
        for table in ["outbox", "loose"] {
            let cast = if table == "outbox" { "::jsonb" } else { "" };
            pg.psql(&format!(
                "INSERT INTO {table} (aggregatetype, aggregateid, type, payload) VALUES \
                 ('order', '{table}', 'deep', (repeat('[', 200) || '1' || repeat(']', 200)){cast}), \
                 ('order', '{table}', 'huge', ('[1e400, -1e400, 1' || repeat('0', 400) || ']'){cast})"
            ));
        }
    };
    let is_json = |line: &String| serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok();
    for (round, validation) in [
        "",
        "[validation]\nschema_dir = \"SCHEMAS\"\nrequired = true\n",
    ]
    .into_iter()
    .enumerate()
    {
        let validation = validation.replace("SCHEMAS", &schemas.display().to_string());
        std::fs::write(&config, format!("{base}\n{validation}")).unwrap();
        let mut relay = Relay::start(&config);
        insert_all();
        let expected = 4 * (round + 1);
        assert!(
            wait_until(WAIT, || lines(&events).len() >= expected),
            "validation {validation:?}: {} events, dead letters: {}\n{}",
            lines(&events).len(),
            pg.psql("SELECT reason FROM outbox_relay.dead_letters"),
            relay.log()
        );
        relay.stops_cleanly();
        let written = lines(&events);
        assert_eq!(written.len(), expected);
        assert!(written.iter().all(is_json));
        for event_type in ["deep", "huge"] {
            assert_eq!(
                written
                    .iter()
                    .filter(|l| l.contains(&format!("\"type\":\"{event_type}\"")))
                    .count(),
                2 * (round + 1)
            );
        }
    }
    assert_eq!(dead_letters(&pg, "reason").len(), 0);
}

/// Item 15: a database whose `DateStyle` is not ISO, and whose time zone has offsets with
/// seconds (local mean time), still has its `occurred_at` read, when streamed and when
/// backfilled; the instants are exact.
#[test]
fn occurred_at_is_read_whatever_the_database_date_style_and_time_zone() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, occurred_at timestamptz)",
    );
    pg.psql("ALTER DATABASE postgres SET DateStyle = 'SQL, DMY'");
    pg.psql("ALTER DATABASE postgres SET TimeZone = 'Europe/Amsterdam'");
    let insert = |seq: u32, time: &str| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, occurred_at) VALUES \
             ('order', 'o', 'T', '{{\"seq\": {seq}}}', '{time}')"
        ));
    };
    // Before the slot: backfilled through a SQL connection.
    insert(1, "2026-11-22 22:39:38.658915+00");
    insert(2, "1900-01-01 00:00:00 Europe/Amsterdam");
    let dir = tempfile::tempdir().unwrap();
    let (config, events) = write_config(dir.path(), &pg, "backfill = true");
    init(&config);
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || read_seqs(&events).len() == 2),
        "backfill: events {:?}, dead letters: {}\n{}",
        read_seqs(&events),
        pg.psql("SELECT reason FROM outbox_relay.dead_letters"),
        relay.log()
    );
    insert(3, "2026-11-22 22:39:38.658915+00");
    insert(4, "1900-01-01 00:00:00 Europe/Amsterdam");
    assert!(
        wait_until(WAIT, || read_seqs(&events).len() == 4),
        "events: {:?}, dead letters: {}\n{}",
        read_seqs(&events),
        pg.psql("SELECT reason FROM outbox_relay.dead_letters"),
        relay.log()
    );
    let times: Vec<String> = read_events(&events)
        .iter()
        .map(|e| e["time"].as_str().unwrap().to_owned())
        .collect();
    let modern = "2026-11-22T23:39:38.658915+01:00";
    let lmt = "1899-12-31T23:40:28Z";
    assert_eq!(times, [modern, lmt, modern, lmt]);
}

/// Runs SQL with psql on database `db` in `client_encoding`; returns its unaligned output.
fn psql_on(pg: &PgCluster, db: &str, client_encoding: &str, sql: &str) -> String {
    let out = Command::new(pg.bin.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args([
            "-U",
            "postgres",
            "-d",
            db,
            "-p",
            &pg.port.to_string(),
            "-c",
            sql,
        ])
        .env("PGCLIENTENCODING", client_encoding)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A relay config with a file sink for database `db` of `pg`, backfilling, with a slot of
/// the database's name (slots are per cluster); (config, events).
fn config_for_database(dir: &Path, pg: &PgCluster, db: &str) -> (PathBuf, PathBuf) {
    let (config, events) = write_config(
        dir,
        pg,
        &format!("backfill = true\nslot = \"{db}\"\npublication = \"{db}\""),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("/postgres?", &format!("/{db}?"));
    std::fs::write(&config, text).unwrap();
    (config, events)
}

/// Item 8: a SQL_ASCII database with a byte that is not UTF-8 in a text column: the row is
/// dead-lettered with its exact bytes, when backfilled and when streamed, and the next row
/// is delivered (no reconnect loop); a logical message whose prefix is not UTF-8 is ignored.
/// A LATIN1 database's 'é' converts and is delivered.
#[test]
fn non_utf8_bytes_in_a_sql_ascii_database_are_dead_lettered_and_latin1_converts() {
    let pg = PgCluster::start();
    for (db, encoding) in [("ascii", "SQL_ASCII"), ("latin", "LATIN1")] {
        pg.psql(&format!(
            "CREATE DATABASE {db} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ));
        psql_on(
            &pg,
            db,
            "UTF8",
            "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
             aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL)",
        );
    }
    let insert = |db: &str, encoding: &str, key: &str, seq: u32| {
        psql_on(
            &pg,
            db,
            encoding,
            &format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
                 ('order', {key}, 'T', '{{\"seq\": {seq}}}')"
            ),
        );
    };
    let dead = |db: &str| {
        psql_on(
            &pg,
            db,
            "UTF8",
            "SELECT reason, encode(raw, 'escape') FROM outbox_relay.dead_letters ORDER BY id",
        )
    };

    let dir = tempfile::tempdir().unwrap();
    insert("ascii", "SQL_ASCII", "E'caf\\xe9'", 1);
    insert("ascii", "SQL_ASCII", "'good'", 2);
    let (config, events) = config_for_database(dir.path(), &pg, "ascii");
    init(&config);
    let relay = Relay::start(&config);
    // Backfilled; then streamed.
    assert!(
        wait_until(WAIT, || read_seqs(&events) == [2]),
        "backfill: events {:?}, dead letters: {}\n{}",
        read_seqs(&events),
        dead("ascii"),
        relay.log()
    );
    insert("ascii", "SQL_ASCII", "E'caf\\xe9'", 3);
    // Any session may emit a logical message whose prefix is not UTF-8: no outbox prefix.
    psql_on(
        &pg,
        "ascii",
        "SQL_ASCII",
        "SELECT pg_logical_emit_message(true, E'caf\\xe9', 'x')",
    );
    insert("ascii", "SQL_ASCII", "'good'", 4);
    assert!(
        wait_until(WAIT, || read_seqs(&events) == [2, 4]),
        "events {:?}, dead letters: {}\n{}",
        read_seqs(&events),
        dead("ascii"),
        relay.log()
    );
    // The exact bytes of the column, in the raw row (whose lengths may print as newlines).
    let letters = dead("ascii");
    assert_eq!(
        psql_on(
            &pg,
            "ascii",
            "UTF8",
            "SELECT count(*) FROM outbox_relay.dead_letters WHERE reason LIKE \
             'column \"aggregateid\" is not valid UTF-8%' AND position('\\x69640000000004636166e9'::bytea IN raw) > 0"
        ),
        "2",
        "{letters}"
    );
    assert!(!relay.log().contains("panicked"), "{}", relay.log());
    drop(relay);

    let dir = tempfile::tempdir().unwrap();
    insert("latin", "UTF8", "'café'", 1);
    let (config, events) = config_for_database(dir.path(), &pg, "latin");
    init(&config);
    let relay = Relay::start(&config);
    assert!(
        wait_until(WAIT, || read_seqs(&events) == [1]),
        "backfill: events {:?}\n{}",
        read_seqs(&events),
        relay.log()
    );
    insert("latin", "UTF8", "'café'", 2);
    assert!(
        wait_until(WAIT, || read_seqs(&events) == [1, 2]),
        "events {:?}, dead letters: {}\n{}",
        read_seqs(&events),
        dead("latin"),
        relay.log()
    );
    assert!(read_events(&events).iter().all(|e| e["subject"] == "café"));
}
