//! Key-sharded slots (`source.shards`, `source.shard`): each shard's relay streams its own
//! slot through a publication whose row filter takes one hash range of the key, so the
//! shards split the keys between them, every event reaches exactly one shard, and per-key
//! order holds; what sharding cannot do is refused with the fix.

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The configuration of shard `index` of `count`, with a file sink of its own, in `dir`.
fn shard_config(pg: &PgCluster, dir: &Path, index: u32, count: u32, extra: &str) -> PathBuf {
    let dir = dir.join(format!("shard{index}"));
    std::fs::create_dir_all(&dir).unwrap();
    ConfigFile::new()
        .source(&format!("shards = {count}\nshard = {index}\n{extra}"))
        .sinks(&file_sink("file", &dir.join("events.jsonl")))
        .write(&dir, pg)
}

/// Guarantee: two shards' relays together deliver every event exactly once, each key from
/// one shard only and in commit order, transactions that mix keys of both shards included,
/// on Debezium's documented outbox layout (`varchar(255)` key); UPDATE and DELETE of the
/// outbox still work (a shard's publication publishes inserts only); `check` passes, and
/// reports a shard's publication that does not filter its rows.
#[test]
fn two_shards_split_the_keys_and_keep_per_key_order() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
         aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, \
         type varchar(255) NOT NULL, payload jsonb)",
    );
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = (0..2)
        .map(|i| shard_config(&pg, dir.path(), i, 2, ""))
        .collect();
    for config in &configs {
        init(config);
    }
    let slots =
        pg.psql("SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots");
    assert_eq!(slots, "outbox_relay_0_of_2,outbox_relay_1_of_2");
    let relays: Vec<Relay> = configs.iter().map(|c| Relay::start(c)).collect();
    // 40 transactions of 5 rows, each over 5 of 20 keys: most mix both shards.
    for tx in 0..40 {
        let rows: Vec<String> = (0..5)
            .map(|row| {
                let key = (tx * 5 + row) % 20;
                let seq = (tx * 5 + row) / 20;
                format!("('order', 'k{key}', 'Seq', '{{\"seq\": {seq}}}')")
            })
            .collect();
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES {}",
            rows.join(", ")
        ));
    }
    pg.psql("UPDATE outbox SET type = 'Seq' WHERE aggregateid = 'k0'");
    pg.psql("DELETE FROM outbox WHERE aggregateid = 'k1'");
    let files: Vec<PathBuf> = (0..2)
        .map(|i| dir.path().join(format!("shard{i}/events.jsonl")))
        .collect();
    assert!(
        wait_until(WAIT, || files
            .iter()
            .map(|f| read_events(f).len())
            .sum::<usize>()
            == 200),
        "logs:\n{}\n{}",
        relays[0].log(),
        relays[1].log()
    );
    let mut keys_of: Vec<BTreeSet<String>> = Vec::new();
    let mut ids = BTreeSet::new();
    for file in &files {
        let events = read_events(file);
        assert!(!events.is_empty(), "each shard takes some keys");
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for event in &events {
            assert!(ids.insert(event["id"].as_str().unwrap().to_owned()));
            seqs.entry(event["subject"].as_str().unwrap().to_owned())
                .or_default()
                .push(event["data"]["seq"].as_u64().unwrap());
        }
        for (key, seqs) in &seqs {
            assert_eq!(
                seqs,
                &(0..10).collect::<Vec<u64>>(),
                "per-key order of {key}"
            );
        }
        keys_of.push(seqs.into_keys().collect());
    }
    assert_eq!(ids.len(), 200, "every event exactly once");
    assert!(
        keys_of[0].is_disjoint(&keys_of[1]),
        "a key belongs to one shard: {keys_of:?}"
    );
    assert_eq!(keys_of[0].len() + keys_of[1].len(), 20);
    let (ok, report) = relay_check(&configs[0]);
    assert!(ok, "{report}");

    // A shard's publication that publishes every row is reported, with the fix.
    pg.psql("DROP PUBLICATION outbox_relay_1_of_2");
    pg.psql("CREATE PUBLICATION outbox_relay_1_of_2 FOR TABLE outbox");
    let (ok, report) = relay_check(&configs[1]);
    assert!(!ok);
    assert!(
        report.contains("is not the one `outbox-relay init` creates for shard 1 of 2"),
        "{report}"
    );
}

/// Guarantee: a partitioned outbox is sharded by its root (the row filter on the parent,
/// published via the root), here over three shards: every event once, each key from one
/// shard and in order, a partition attached while the relays stream included.
#[test]
fn a_partitioned_outbox_splits_over_three_shards() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE outbox (id uuid NOT NULL DEFAULT gen_random_uuid(), \
         aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, \
         payload jsonb NOT NULL, PRIMARY KEY (id, aggregatetype)) \
         PARTITION BY LIST (aggregatetype); \
         CREATE TABLE outbox_order PARTITION OF outbox FOR VALUES IN ('order'); \
         CREATE TABLE outbox_rest PARTITION OF outbox DEFAULT",
    );
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| shard_config(&pg, dir.path(), i, 3, ""))
        .collect();
    for config in &configs {
        init(config);
    }
    let relays: Vec<Relay> = configs.iter().map(|c| Relay::start(c)).collect();
    // 30 events per kind over 10 keys of that kind: seq 0, 1, 2 per key.
    let insert = |kind: &str| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT '{kind}', '{kind}-' || (n % 10), 'Seq', jsonb_build_object('seq', n / 10) \
             FROM generate_series(0, 29) n"
        ))
    };
    insert("order");
    insert("customer");
    pg.psql("CREATE TABLE outbox_invoice PARTITION OF outbox FOR VALUES IN ('invoice')");
    insert("invoice");
    let files: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("shard{i}/events.jsonl")))
        .collect();
    let delivered = || files.iter().map(|f| read_events(f).len()).sum::<usize>();
    assert!(
        wait_until(WAIT, || delivered() >= 90),
        "{} of 90 delivered; logs:\n{}",
        delivered(),
        relays.iter().map(Relay::log).collect::<Vec<_>>().join("\n")
    );
    let mut ids = BTreeSet::new();
    let mut keys_of: Vec<BTreeSet<String>> = Vec::new();
    for file in &files {
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for event in read_events(file) {
            assert!(ids.insert(event["id"].as_str().unwrap().to_owned()));
            seqs.entry(event["subject"].as_str().unwrap().to_owned())
                .or_default()
                .push(event["data"]["seq"].as_u64().unwrap());
        }
        for (key, seqs) in &seqs {
            assert_eq!(seqs, &[0, 1, 2], "per-key order of {key}");
        }
        keys_of.push(seqs.into_keys().collect());
    }
    assert_eq!(ids.len(), 90, "every event exactly once");
    assert_eq!(keys_of.iter().map(BTreeSet::len).sum::<usize>(), 30);
    assert!(
        keys_of.iter().all(|keys| !keys.is_empty()),
        "each shard takes some keys: {keys_of:?}"
    );
}

/// Guarantee: what a key-sharded outbox cannot do stops the configuration from loading,
/// saying why and what to do: logical-message outboxes, backfill, update and delete
/// policies other than skip, the Redis sink, and a shard index out of range; and `init`
/// refuses a key column of a user-defined type, which no row filter may use.
#[test]
fn what_sharding_cannot_do_is_refused_at_load() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let refused = |extra: &str, sinks: &str| {
        let dir = dir.path().join(format!("c{}", extra.len() + sinks.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = ConfigFile::new()
            .source(&format!("shards = 2\n{extra}"))
            .sinks(if sinks.is_empty() {
                "[sinks.out]\ntype = \"stdout\"\n"
            } else {
                sinks
            })
            .write(&dir, &pg);
        let (ok, report) = relay_check(&config);
        assert!(!ok, "{extra}{sinks}: {report}");
        report
    };
    let report = refused("message_prefixes = [\"outbox\"]\n", "");
    assert!(
        report.contains("source.message_prefixes cannot be sharded"),
        "{report}"
    );
    let report = refused("backfill = true\n", "");
    assert!(
        report.contains("source.backfill is not supported with source.shards > 1"),
        "{report}"
    );
    let report = refused("shard = 2\n", "");
    assert!(
        report.contains("source.shard from 0 to source.shards - 1"),
        "{report}"
    );
    let report = refused(
        "",
        "[outbox.\"public.outbox\"]\non_delete = \"dead-letter\"\n[sinks.out]\ntype = \"stdout\"\n",
    );
    assert!(
        report.contains("on_delete = \"dead-letter\" needs updates and deletes"),
        "{report}"
    );
    let report = refused(
        "",
        "[sinks.r]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\nstream = \"events\"\n",
    );
    assert!(
        report.contains("sinks.r: the redis sink numbers stream entries"),
        "{report}"
    );

    // A key of a user-defined type (here a domain) cannot be in a row filter: init says so.
    pg.psql(
        "CREATE DOMAIN aggregate_key AS text; \
         CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
         aggregatetype text NOT NULL, aggregateid aggregate_key NOT NULL, type text NOT NULL, \
         payload jsonb)",
    );
    let config = shard_config(&pg, dir.path(), 0, 2, "");
    let out = relay_command(&config, "init");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("its type aggregate_key is user-defined")
            && stderr.contains("Change the column to its base type"),
        "{stderr}"
    );
}
