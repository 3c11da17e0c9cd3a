//! The outbox model end to end: each format's exact output (golden files), per-table column
//! mappings, the logical-message outbox, update/delete policies, schema evolution, per-sink
//! match rules, dead letters fixed and replayed with `outbox-relay dlq`, NULL payloads
//! skipped, and `bytea` payloads (backfilled and streamed).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// A file sink `name` writing `dir`/`name`.jsonl, with `extra` lines.
fn named_sink(name: &str, dir: &Path, extra: &str) -> String {
    format!(
        "{}{extra}\n",
        file_sink(name, &dir.join(format!("{name}.jsonl")))
    )
}

/// The newline-terminated lines of a sink's output file (a last line without its newline
/// is still being written).
fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

/// The subjects of the events in the file at `path`, once it holds `count` lines.
fn subjects_once_there_are(path: &Path, count: usize, relay: &Relay) -> Vec<String> {
    assert!(
        wait_until(WAIT, || lines(path).len() == count),
        "relay log:\n{}",
        relay.log()
    );
    read_events(path)
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect()
}

/// Replaces what differs between runs (positions, transaction ids) with placeholders,
/// leaving every other byte as the relay wrote it.
fn normalized(line: &str) -> String {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    let mut line = line.to_owned();
    for key in ["lsn", "txid", "sequence"] {
        if let Some(value) = object.get(key) {
            line = line.replace(
                &format!("\"{key}\":{value}"),
                &format!("\"{key}\":\"<{key}>\""),
            );
        }
    }
    line
}

/// Compares with tests/golden/NAME; `UPDATE_GOLDEN=1` rewrites the file instead.
fn assert_golden(name: &str, actual: &[String]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let actual = actual
        .iter()
        .map(|l| normalized(l) + "\n")
        .collect::<String>();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing {}; run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(actual, expected, "{name} differs from its golden file");
}

const OUTBOX_WITH_OPTIONAL_COLUMNS: &str = "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
    aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, schema_version int, headers jsonb, \
    occurred_at timestamptz, traceparent text, tenant text)";

const GOLDEN_ROWS: &str = "INSERT INTO outbox VALUES \
    ('11111111-1111-4111-8111-111111111111', 'order', 'order-1', 'OrderCreated', '{\"customer\": \"ada\", \"total\": 42.5}', 1, NULL, '2026-01-02 03:04:05.123456+00', NULL, 'acme'), \
    ('22222222-2222-4222-8222-222222222222', 'order', 'order-1', 'OrderPaid', '{\"method\": \"card\"}', 2, '{\"x-request-id\": \"r-9\"}', '2026-01-02 03:04:06+00', '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01', 'acme'), \
    ('33333333-3333-4333-8333-333333333333', 'customer', 'ada', 'CustomerUpgraded', '[\"gold\", null, 3]', NULL, NULL, '2026-01-02 03:04:07+00', NULL, NULL)";

#[test]
fn each_format_writes_exactly_its_golden_output() {
    let pg = PgCluster::start();
    pg.psql(OUTBOX_WITH_OPTIONAL_COLUMNS);
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[outbox.\"public.outbox\"]\nadditional = [{ column = \"tenant\", placement = \"envelope\" }]\n";
    let sinks = [
        named_sink("cloudevents", dir.path(), "format = \"cloudevents\""),
        named_sink("debezium", dir.path(), "format = \"debezium\""),
        named_sink("raw", dir.path(), "format = \"raw\""),
    ]
    .concat();
    let config = ConfigFile::new()
        .sinks(&format!("{mapping}{sinks}"))
        .write(dir.path(), &pg);
    init(&config);
    let relay = Relay::start(&config);
    pg.psql(GOLDEN_ROWS);
    for name in ["cloudevents", "debezium", "raw"] {
        let path = dir.path().join(format!("{name}.jsonl"));
        assert!(
            wait_until(WAIT, || lines(&path).len() == 3),
            "{name}: relay log:\n{}",
            relay.log()
        );
        assert_golden(&format!("{name}.jsonl"), &lines(&path));
    }
    // Debezium's outbox router sends the payload column as the value, unchanged: the same
    // bytes PostgreSQL renders for the jsonb.
    let payloads = pg.psql("SELECT payload::text FROM outbox ORDER BY id");
    assert_eq!(
        lines(&dir.path().join("debezium.jsonl")).join("\n"),
        payloads
    );
}

#[test]
fn two_outbox_tables_with_different_column_names_flow_in_commit_order() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    pg.psql("CREATE SCHEMA billing");
    pg.psql(
        "CREATE TABLE billing.events (event_id uuid PRIMARY KEY DEFAULT gen_random_uuid(), kind text NOT NULL, \
         account text NOT NULL, name text NOT NULL, body jsonb NOT NULL, version int NOT NULL)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mapping = "[outbox.\"billing.events\"]\nid = \"event_id\"\naggregate_type = \"kind\"\naggregate_id = \"account\"\n\
                   type = \"name\"\npayload = \"body\"\nschema_version = \"version\"\nsource = \"/billing/{aggregatetype}\"\n";
    let config = ConfigFile::new()
        .source("tables = [\"public.outbox\", \"billing.events\"]")
        .sinks(&format!("{mapping}{}", named_sink("all", dir.path(), "")))
        .write(dir.path(), &pg);
    init(&config);
    let relay = Relay::start(&config);
    pg.psql(
        "BEGIN; \
         INSERT INTO billing.events (kind, account, name, body, version) VALUES ('invoice', 'acct-1', 'Billed', '{\"n\": 1}', 3); \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{\"n\": 2}'); \
         COMMIT; \
         INSERT INTO billing.events (kind, account, name, body, version) VALUES ('invoice', 'acct-1', 'Paid', '{\"n\": 3}', 4);",
    );
    let path = dir.path().join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 3),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&path);
    let summary: Vec<(String, String, String, Value)> = events
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().into(),
                e["subject"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
                e["schemaversion"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "/billing/invoice".into(),
                "acct-1".into(),
                "Billed".into(),
                Value::from(3)
            ),
            (
                "/public.outbox".into(),
                "o-1".into(),
                "Created".into(),
                Value::Null
            ),
            (
                "/billing/invoice".into(),
                "acct-1".into(),
                "Paid".into(),
                Value::from(4)
            ),
        ]
    );
    assert_eq!(
        events
            .iter()
            .map(|e| e["data"]["n"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[test]
fn logical_messages_are_an_outbox_without_a_table() {
    let (Scenario { pg, dir, .. }, mut relay) = scenario()
        .source("message_prefixes = [\"outbox\"]")
        .sinks_in(|dir| named_sink("all", dir, ""))
        .start();
    pg.psql(
        "BEGIN; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{\"n\": 1}'); \
         SELECT pg_logical_emit_message(true, 'outbox', '{\"id\": \"44444444-4444-4444-8444-444444444444\", \
           \"aggregatetype\": \"order\", \"aggregateid\": \"o-1\", \"type\": \"Shipped\", \"payload\": {\"n\": 2}, \"schema_version\": 2}'); \
         SELECT pg_logical_emit_message(true, 'other-app', '{\"ignored\": true}'); \
         SELECT pg_logical_emit_message(true, 'outbox', 'not json'); \
         COMMIT; \
         SELECT pg_logical_emit_message(false, 'outbox', '{\"non-transactional\": true}'); \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Closed', '{\"n\": 3}');",
    );
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 3),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&path);
    assert_eq!(
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["Created", "Shipped", "Closed"]
    );
    assert_eq!(events[1]["source"], "/message:outbox");
    assert_eq!(events[1]["id"], "44444444-4444-4444-8444-444444444444");
    assert_eq!(events[1]["schemaversion"], 2);
    let reason = pg.psql("SELECT source_table || ': ' || reason FROM outbox_relay.dead_letters");
    assert!(
        reason.starts_with(
            "message:outbox: logical message \"outbox\" is not an outbox event document"
        ),
        "{reason}"
    );
    relay.terminate(WAIT).unwrap();
    assert!(
        relay.log().contains("ignored_non_transactional_messages=1"),
        "{}",
        relay.log()
    );
}

#[test]
fn update_and_delete_policies_skip_dead_letter_or_fail() {
    let policies =
        "[outbox.\"public.outbox\"]\non_update = \"dead-letter\"\non_delete = \"skip\"\n";
    let (Scenario { pg, dir, .. }, relay) = scenario()
        .tables(policies)
        .sinks_in(|dir| named_sink("all", dir, ""))
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{}'); \
         UPDATE outbox SET type = 'Edited'; DELETE FROM outbox; \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'After', '{}');",
    );
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 2),
        "relay log:\n{}",
        relay.log()
    );
    let letter =
        pg.psql("SELECT reason || ' / ' || (row_data->>'type') FROM outbox_relay.dead_letters");
    assert_eq!(
        letter,
        "UPDATE of an outbox row is not an event (on_update = \"dead-letter\") / Edited"
    );
    drop(relay);

    let failing = "[outbox.\"public.outbox\"]\non_delete = \"fail\"\n";
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigFile::new()
        .source("slot = \"strict\"")
        .sinks(&format!("{failing}{}", named_sink("all", dir.path(), "")))
        .write(dir.path(), &pg);
    init(&cfg);
    let mut relay = Relay::start(&cfg);
    pg.psql("DELETE FROM outbox");
    let status = relay
        .wait(WAIT)
        .expect("the relay should stop on a delete with policy fail");
    assert!(!status.success());
    assert!(
        relay.log().contains("policy is \"fail\""),
        "{}",
        relay.log()
    );
}

#[test]
fn a_null_payload_under_the_skip_policy_is_counted_and_its_neighbours_flow() {
    let (Scenario { pg, dir, .. }, mut relay) = scenario()
        .sql("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
        .sinks_in(|dir| {
            format!(
                "[outbox.\"public.outbox\"]\non_null_payload = \"skip\"\n{}",
                named_sink("all", dir, "")
            )
        })
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'Before', '{}'), ('order', 'o-1', 'Empty', NULL), \
         ('order', 'o-1', 'After', '{}')",
    );
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 2),
        "relay log:\n{}",
        relay.log()
    );
    let types: Vec<Value> = read_events(&path)
        .iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    relay.stops_cleanly();
    assert!(
        relay.log().contains("skipped_null_payloads=1"),
        "{}",
        relay.log()
    );
    assert_eq!(dead_letters(&pg, "reason").len(), 0);
}

#[test]
fn bytea_payloads_are_exact_bytes_as_data_base64_whether_backfilled_or_streamed() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE blobs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
         aggregateid text NOT NULL, type text NOT NULL, payload bytea NOT NULL); \
         INSERT INTO blobs (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'Avro', '\\x00ff0a0d7b22c3'); \
         ALTER ROLE ALL SET bytea_output = 'escape'",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigFile::new()
        .source("tables = [\"public.blobs\"]\nbackfill = true")
        .sinks(&format!(
            "[outbox.\"public.blobs\"]\ncontent_type = \"application/avro\"\n{}{}",
            named_sink("envelope", dir.path(), ""),
            named_sink("raw", dir.path(), "format = \"raw\""),
        ))
        .write(dir.path(), &pg);
    init(&cfg);
    let relay = Relay::start(&cfg);
    pg.psql(
        "INSERT INTO blobs (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'Avro', '\\xdeadbeef')",
    );
    let envelope = dir.path().join("envelope.jsonl");
    let raw = dir.path().join("raw.jsonl");
    assert!(
        wait_until(WAIT, || lines(&envelope).len() == 2
            && lines(&raw).len() == 2),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&envelope);
    assert_eq!(
        events
            .iter()
            .map(|e| (e["data_base64"].as_str(), e["datacontenttype"].as_str()))
            .collect::<Vec<_>>(),
        [
            (Some("AP8KDXsiww=="), Some("application/avro")),
            (Some("3q2+7w=="), Some("application/avro")),
        ]
    );
    assert!(events.iter().all(|e| e.get("data").is_none()));
    assert_eq!(lines(&raw), ["AP8KDXsiww==", "3q2+7w=="]);
    assert_eq!(dead_letters(&pg, "reason").len(), 0);
}

#[test]
fn schema_evolution_keeps_flowing() {
    let (Scenario { pg, dir, .. }, relay) = scenario()
        .sinks_in(|dir| named_sink("all", dir, ""))
        .start();
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{\"v\": 1}')");
    pg.psql("ALTER TABLE outbox ADD COLUMN schema_version int");
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) VALUES ('order', 'o-1', 'Created', '{\"v\": 2}', 2)");
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) VALUES ('order', 'o-1', 'Created', '{\"v\": 3, \"new\": true}', 3)");
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 3),
        "relay log:\n{}",
        relay.log()
    );
    let versions: Vec<Value> = read_events(&path)
        .iter()
        .map(|e| e["schemaversion"].clone())
        .collect();
    assert_eq!(versions, [Value::Null, Value::from(2), Value::from(3)]);
}

#[test]
fn match_rules_fan_events_out_to_different_sinks() {
    let (Scenario { pg, dir, .. }, relay) = scenario()
        .sinks_in(|dir| {
            named_sink(
                "orders",
                dir,
                "[sinks.orders.match]\naggregate_types = [\"order\"]",
            ) + &named_sink(
                "upgrades",
                dir,
                "[sinks.upgrades.match]\nevent_types = [\"Customer*\"]",
            )
        })
        .start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
         ('order', 'o-1', 'OrderCreated', '{}'), ('customer', 'c-1', 'CustomerUpgraded', '{}'), \
         ('customer', 'c-1', 'AddressChanged', '{}'), ('order', 'o-2', 'OrderCreated', '{}')",
    );
    let (orders, upgrades) = (dir.join("orders.jsonl"), dir.join("upgrades.jsonl"));
    assert!(
        wait_until(WAIT, || lines(&orders).len() == 2
            && lines(&upgrades).len() == 1),
        "relay log:\n{}",
        relay.log()
    );
    let subjects: Vec<String> = read_events(&orders)
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects, ["o-1", "o-2"]);
    assert_eq!(read_events(&upgrades)[0]["type"], "CustomerUpgraded");
    // Both sinks' checkpoints move past every event, including the ones not for them.
    assert!(wait_until(WAIT, || pg.psql(
        "SELECT count(DISTINCT event_index) FROM outbox_relay.checkpoints"
    ) == "1"
        && pg.psql(
            "SELECT max(event_index) FROM outbox_relay.checkpoints"
        ) == "3"));
}

#[test]
fn a_dead_letter_fixed_in_place_is_replayed_once() {
    let (Scenario { pg, dir, config: cfg, .. }, relay) = scenario()
        .outbox_sql("CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload text)")
        .sinks_in(|dir| named_sink("all", dir, ""))
        .start();
    pg.psql("INSERT INTO outbox VALUES ('55555555-5555-4555-8555-555555555555', 'order', 'o-1', 'Created', '{broken')");
    assert!(
        wait_until(WAIT, || dead_letters(&pg, "reason").len() == 1),
        "{}",
        relay.log()
    );
    let id = pg.psql("SELECT id FROM outbox_relay.dead_letters");

    let list = relay_dlq(&cfg, &["list"]);
    assert!(
        list.contains("public.outbox") && list.contains("not valid JSON"),
        "{list}"
    );
    let shown: Value = serde_json::from_str(&relay_dlq(&cfg, &["show", &id])).unwrap();
    assert_eq!(shown["row"]["payload"], "{broken");

    let refused = relay_command_args(&cfg, &["dlq", "replay", &id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("fix it first"),
        "{}",
        String::from_utf8_lossy(&refused.stdout)
    );

    pg.psql(&format!("UPDATE outbox_relay.dead_letters SET row_data = jsonb_set(row_data, '{{payload}}', to_jsonb('{{\"fixed\": true}}'::text)) WHERE id = {id}"));
    let replayed = relay_dlq(&cfg, &["replay", &id]);
    assert!(replayed.contains("replayed"), "{replayed}");
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 1),
        "relay log:\n{}",
        relay.log()
    );
    let event = &read_events(&path)[0];
    assert_eq!(
        (
            event["id"].as_str(),
            event["source"].as_str(),
            &event["data"]
        ),
        (
            Some("55555555-5555-4555-8555-555555555555"),
            Some("/public.outbox"),
            &serde_json::json!({"fixed": true})
        )
    );
    assert!(relay_dlq(&cfg, &["list"]).contains("(replayed)"));
    assert!(
        !relay_command_args(&cfg, &["dlq", "replay", &id])
            .status
            .success(),
        "a second replay must be refused"
    );
}

#[test]
fn payloads_failing_their_json_schema_are_dead_lettered() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    pg.psql("ALTER TABLE outbox ADD COLUMN schema_version int");
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    std::fs::write(
        schemas.join("OrderCreated.v2.json"),
        r#"{"type": "object", "required": ["total"], "properties": {"total": {"type": "number"}}}"#,
    )
    .unwrap();
    std::fs::write(schemas.join("OrderCreated.json"), r#"{"type": "object"}"#).unwrap();
    let validation = format!("[validation]\nschema_dir = \"{}\"\n", schemas.display());
    let cfg = ConfigFile::new()
        .sinks(&format!(
            "{validation}{}",
            named_sink("all", dir.path(), "")
        ))
        .write(dir.path(), &pg);
    init(&cfg);
    let relay = Relay::start(&cfg);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) VALUES \
         ('order', 'o-1', 'OrderCreated', '{\"total\": 5}', 2), \
         ('order', 'o-2', 'OrderCreated', '{\"total\": \"five\"}', 2), \
         ('order', 'o-3', 'OrderCreated', '[1]', NULL), \
         ('order', 'o-4', 'OrderCreated', '{\"any\": 1}', NULL), \
         ('order', 'o-5', 'Unschematized', '\"anything\"', 7)",
    );
    let path = dir.path().join("all.jsonl");
    let subjects = subjects_once_there_are(&path, 3, &relay);
    assert_eq!(subjects, ["o-1", "o-4", "o-5"]);
    assert!(wait_until(WAIT, || dead_letters(&pg, "reason").len() == 2));
    let reasons = pg.psql("SELECT string_agg(row_data->>'aggregateid' || ': ' || reason, E'\\n' ORDER BY event_index) FROM outbox_relay.dead_letters");
    assert!(
        reasons.contains("o-2: payload fails its JSON Schema") && reasons.contains("/total"),
        "{reasons}"
    );
    assert!(
        reasons.contains("o-3: payload fails its JSON Schema"),
        "{reasons}"
    );

    // A replay that would fail validation again is refused, unless fixed or forced.
    let o2 =
        pg.psql("SELECT id FROM outbox_relay.dead_letters WHERE row_data->>'aggregateid' = 'o-2'");
    let refused = relay_command_args(&cfg, &["dlq", "replay", &o2]);
    let printed = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("its payload still fails validation") && printed.contains("--force"),
        "{printed}"
    );
    pg.psql(&format!(
        "UPDATE outbox_relay.dead_letters SET row_data = jsonb_set(row_data, '{{payload}}', \
         to_jsonb('{{\"total\": 5.5}}'::text)) WHERE id = {o2}"
    ));
    relay_dlq(&cfg, &["replay", &o2]);
    assert!(
        wait_until(WAIT, || lines(&path).len() == 4),
        "relay log:\n{}",
        relay.log()
    );
    relay_dlq(&cfg, &["replay", "--all", "--force"]);
    // The forced replay fails validation in the relay again: a new dead letter, no event.
    assert!(wait_until(WAIT, || dead_letters(&pg, "reason").len() == 3));
    assert_eq!(lines(&path).len(), 4);

    std::fs::write(schemas.join("Broken.json"), "{not json").unwrap();
    let out = relay_command(&cfg, "check");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Broken.json is not JSON"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Inserts `rows` rows for key `key` with seq numbers from `first`, one transaction each.
async fn write_seq(client: tokio_postgres::Client, key: String, first: u64, rows: u64) {
    for seq in first..first + rows {
        client
            .batch_execute(&format!(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', '{key}', 'Seq', '{{\"seq\": {seq}}}')"
            ))
            .await
            .unwrap();
    }
}

fn seqs_by_key(events: &[Value], key: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["subject"] == key)
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_publishes_existing_rows_with_no_gap_or_duplicate_at_the_seam() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    // Rows that exist before the relay (and its slot) do, one key per writer.
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k' || (i % 3), 'Seq', jsonb_build_object('seq', i / 3) FROM generate_series(0, 2999) i",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = ConfigFile::new()
        .source("backfill = true")
        .sinks(&named_sink("all", dir.path(), ""))
        .write(dir.path(), &pg);
    let out = relay_command(&cfg, "init");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("left to `run`"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Writers keep inserting while the relay creates its slot: the seam is crossed live.
    let mut writers = Vec::new();
    for key in 0..3 {
        writers.push(tokio::spawn(write_seq(
            pg.client().await,
            format!("k{key}"),
            1000,
            400,
        )));
    }
    let relay = Relay::start(&cfg);
    for writer in writers {
        writer.await.unwrap();
    }
    let path = dir.path().join("all.jsonl");
    assert!(
        wait_until(WAIT, || lines(&path).len() >= 3 * 1400),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&path);
    assert_eq!(events.len(), 3 * 1400, "every row exactly once");
    for key in ["k0", "k1", "k2"] {
        assert_eq!(
            seqs_by_key(&events, key),
            (0..1400).collect::<Vec<_>>(),
            "per-key order for {key}"
        );
    }
    assert_eq!(
        pg.psql("SELECT rows >= 3000 AND finished_at IS NOT NULL FROM outbox_relay.backfills"),
        "t"
    );
}

#[test]
fn an_interrupted_backfill_starts_over_and_loses_nothing() {
    let (Scenario { pg, dir, config: cfg, .. }, mut relay) = scenario()
        .sql(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'k', 'Seq', jsonb_build_object('seq', i, 'pad', repeat('x', 200)) FROM generate_series(0, 49999) i",
        )
        .source("backfill = true")
        .sinks_in(|dir| named_sink("all", dir, ""))
        .start();
    let path = dir.join("all.jsonl");
    assert!(
        wait_until(WAIT, || !lines(&path).is_empty()),
        "relay log:\n{}",
        relay.log()
    );
    relay.kill9();
    let unfinished =
        pg.psql("SELECT count(*) FROM outbox_relay.backfills WHERE finished_at IS NULL");
    let relay = Relay::start(&cfg);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'k', 'Seq', '{\"seq\": 50000}')");
    assert!(
        wait_until(WAIT, || read_events(&path)
            .last()
            .is_some_and(|e| e["data"]["seq"] == 50000)),
        "relay log:\n{}",
        relay.log()
    );
    let events = read_events(&path);
    let mut seen: Vec<u64> = events
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..=50000).collect::<Vec<_>>(), "nothing lost");
    assert_eq!(unfinished, "1", "the kill should land mid-backfill");
    assert!(relay.log().contains("interrupted"), "{}", relay.log());
    // Repeats can only be rows of the interrupted backfill, never streamed ones.
    assert_eq!(
        events.iter().filter(|e| e["data"]["seq"] == 50000).count(),
        1
    );
}

#[test]
fn backfill_turned_on_for_an_existing_slot_is_a_warning_with_the_way_to_backfill() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let insert = |kind: &str| {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', '{kind}', '{{}}')"
        ))
    };
    insert("Existing");
    let dir = tempfile::tempdir().unwrap();
    let sink = named_sink("all", dir.path(), "");
    // The slot is made without backfill; backfill is turned on afterwards.
    init(&ConfigFile::new().sinks(&sink).write(dir.path(), &pg));
    let cfg = ConfigFile::new()
        .source("backfill = true")
        .sinks(&sink)
        .write(dir.path(), &pg);
    const WARNING: &str =
        "source.backfill = true, but replication slot outbox_relay already exists";
    let (ok, report) = relay_check(&cfg);
    assert!(
        ok && report.contains(&format!("warning: {WARNING}"))
            && report.contains("SELECT pg_drop_replication_slot('outbox_relay')")
            && report.contains("ok: "),
        "{report}"
    );
    let init = relay_command(&cfg, "init");
    assert!(
        init.status.success() && String::from_utf8_lossy(&init.stdout).contains(WARNING),
        "{init:?}"
    );
    let path = dir.path().join("all.jsonl");
    let mut relay = Relay::start(&cfg);
    insert("Streamed");
    assert!(
        wait_until(WAIT, || lines(&path).len() == 1),
        "relay log:\n{}",
        relay.log()
    );
    assert!(relay.log().contains(WARNING), "{}", relay.log());
    relay.stops_cleanly();

    // The way the warning gives: the slot dropped while the relay is stopped.
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    let mut relay = Relay::start(&cfg);
    let types = || -> Vec<String> {
        read_events(&path)
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        wait_until(WAIT, || types().contains(&"Existing".to_owned())),
        "relay log:\n{}",
        relay.log()
    );
    relay.stops_cleanly();
    assert!(!relay.log().contains(WARNING), "{}", relay.log());
    // Once the backfill finished for this slot, nothing is left to warn about.
    let (ok, report) = relay_check(&cfg);
    assert!(ok && !report.contains("warning:"), "{report}");
    let mut relay = Relay::start(&cfg);
    assert!(wait_until(WAIT, || relay.log().contains("streaming")));
    relay.stops_cleanly();
    assert!(!relay.log().contains(WARNING), "{}", relay.log());
}

/// Guarantee: a backfilled row is validated as a streamed one: a payload failing its JSON
/// Schema is dead-lettered with the reason, and the rows around it are published.
#[test]
fn backfilled_rows_failing_their_schema_are_dead_lettered() {
    let (Scenario { pg, dir, .. }, relay) = scenario()
        .sql(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES \
             ('order', 'o-1', 'OrderCreated', '{\"total\": 5}'), \
             ('order', 'o-2', 'OrderCreated', '{\"total\": \"five\"}'), \
             ('order', 'o-3', 'OrderCreated', '{\"total\": 7}')",
        )
        .source("backfill = true")
        .sinks_in(|dir| {
            let schemas = dir.join("schemas");
            std::fs::create_dir(&schemas).unwrap();
            std::fs::write(
                schemas.join("OrderCreated.json"),
                r#"{"type": "object", "properties": {"total": {"type": "number"}}}"#,
            )
            .unwrap();
            format!(
                "[validation]\nschema_dir = \"{}\"\n{}",
                schemas.display(),
                named_sink("all", dir, "")
            )
        })
        .start();
    let path = dir.join("all.jsonl");
    let subjects = subjects_once_there_are(&path, 2, &relay);
    assert_eq!(subjects, ["o-1", "o-3"]);
    assert!(wait_until(WAIT, || dead_letters(&pg, "reason").len() == 1));
    let reason = dead_letters(&pg, "row_data->>'aggregateid', reason").join("");
    assert!(
        reason.starts_with("o-2 | payload fails its JSON Schema"),
        "{reason}"
    );
}
