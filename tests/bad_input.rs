//! The bad-input corpus: rows, messages, schema changes and configurations that must each
//! end in a dead letter with its reason, a delivered event, or a clear error naming what to
//! fix; never a panic, a hang or a silent drop. Cases are data (one table per test), and
//! every case's outcome is asserted.

mod common;

use common::*;
use std::collections::BTreeMap;

/// What must become of a row.
enum Outcome {
    /// Dead-lettered, with a reason containing this.
    Dead(&'static str),
    /// Delivered as an event.
    Event,
    /// Neither (not an outbox change, by design).
    Nothing,
}

/// Each case is SQL run on its own; rows carry the case name in the unmapped `note` column
/// (dead letters keep every column) or in the payload's "case" field (events).
const ROW_CASES: &[(&str, &str, Outcome)] = &[
    ("payload-not-json", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000001', 'order', 'o', 'T', '{not json', 'payload-not-json')", Outcome::Dead("the payload column is not valid JSON")),
    ("payload-empty", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000002', 'order', 'o', 'T', '', 'payload-empty')", Outcome::Dead("the payload column is not valid JSON")),
    ("payload-truncated-json", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000003', 'order', 'o', 'T', '{\"a\": [1, 2', 'payload-truncated-json')", Outcome::Dead("the payload column is not valid JSON")),
    ("null-id", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES (NULL, 'order', 'o', 'T', '{}', 'null-id')", Outcome::Dead("column \"id\" is NULL")),
    ("null-aggregatetype", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000005', NULL, 'o', 'T', '{}', 'null-aggregatetype')", Outcome::Dead("column \"aggregatetype\" is NULL")),
    ("null-aggregateid", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000006', 'order', NULL, 'T', '{}', 'null-aggregateid')", Outcome::Dead("column \"aggregateid\" is NULL")),
    ("null-type", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000007', 'order', 'o', NULL, '{}', 'null-type')", Outcome::Dead("column \"type\" is NULL")),
    ("null-payload", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000008', 'order', 'o', 'T', NULL, 'null-payload')", Outcome::Dead("column \"payload\" is NULL")),
    ("id-empty", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('', 'order', 'o', 'T', '{}', 'id-empty')", Outcome::Dead("the id column is empty")),
    ("id-not-uuid", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('order-42', 'order', 'o', 'T', '{\"case\": \"id-not-uuid\"}', 'id-not-uuid')", Outcome::Event),
    ("schema-version-not-int", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, schema_version, note) VALUES ('00000000-0000-4000-8000-000000000010', 'order', 'o', 'T', '{}', 'v2', 'schema-version-not-int')", Outcome::Dead("the schema_version column is not an integer")),
    ("headers-not-json", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, headers, note) VALUES ('00000000-0000-4000-8000-000000000011', 'order', 'o', 'T', '{}', 'x=1', 'headers-not-json')", Outcome::Dead("the headers column is not a JSON object")),
    ("headers-array", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, headers, note) VALUES ('00000000-0000-4000-8000-000000000012', 'order', 'o', 'T', '{}', '[\"a\"]', 'headers-array')", Outcome::Dead("the headers column is not a JSON object")),
    ("header-not-string", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, headers, note) VALUES ('00000000-0000-4000-8000-000000000013', 'order', 'o', 'T', '{}', '{\"n\": 1}', 'header-not-string')", Outcome::Dead("header \"n\" is not a string")),
    ("occurred-at-not-time", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, occurred_at, note) VALUES ('00000000-0000-4000-8000-000000000014', 'order', 'o', 'T', '{}', 'yesterday', 'occurred-at-not-time')", Outcome::Dead("the occurred_at column is not a timestamp")),
    ("payload-json-scalar", "INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000015', 'order', 'o', 'T', '42', 'payload-json-scalar')", Outcome::Event),
    ("missing-columns", "INSERT INTO missing_columns (id, payload, note) VALUES ('00000000-0000-4000-8000-000000000016', '{}', 'missing-columns')", Outcome::Dead("outbox table public.missing_columns has no column")),
    ("wrong-column-types", "INSERT INTO wrong_types (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000017', 7, 8, 9, 10, 'wrong-column-types')", Outcome::Event),
    ("unicode", "INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'ключ-🔑', 'T', '{\"case\": \"unicode\", \"text\": \"שלום 👋\"}')", Outcome::Event),
    ("five-mb-payload", "INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'big', 'T', jsonb_build_object('case', 'five-mb-payload', 'pad', repeat('x', 5 * 1024 * 1024)))", Outcome::Event),
    ("jsonb-headers-array", "INSERT INTO strict (aggregatetype, aggregateid, type, payload, headers, note) VALUES ('order', 'o', 'T', '{}', '[1]', 'jsonb-headers-array')", Outcome::Dead("the headers column is not a JSON object")),
    ("mixed-transaction", "BEGIN; INSERT INTO not_outbox VALUES ('ignored'); INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"mixed-transaction\"}'); INSERT INTO not_outbox VALUES ('ignored too'); COMMIT", Outcome::Event),
    ("rolled-back", "BEGIN; INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"rolled-back\"}'); ROLLBACK", Outcome::Nothing),
    ("update-skipped", "UPDATE strict SET note = 'update-skipped' WHERE aggregateid = 'o'", Outcome::Nothing),
    ("delete-skipped", "DELETE FROM strict WHERE aggregateid = 'ключ-🔑'", Outcome::Nothing),
    ("truncate", "TRUNCATE strict", Outcome::Nothing),
    ("good-and-bad-in-one-transaction", "BEGIN; INSERT INTO loose (id, aggregatetype, aggregateid, type, payload, note) VALUES ('00000000-0000-4000-8000-000000000026', 'order', 'o', 'T', 'nope', 'good-and-bad-in-one-transaction'); INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"good-and-bad-in-one-transaction\"}'); COMMIT", Outcome::Dead("the payload column is not valid JSON")),
    ("message-not-json", "SELECT pg_logical_emit_message(true, 'outbox', 'message-not-json: not json at all')", Outcome::Dead("message-not-json")),
    ("message-missing-fields", "SELECT pg_logical_emit_message(true, 'outbox', '{\"case\": \"message-missing-fields\"}')", Outcome::Dead("message-missing-fields")),
    ("message-non-transactional", "SELECT pg_logical_emit_message(false, 'outbox', '{\"case\": \"message-non-transactional\"}')", Outcome::Nothing),
    ("message-other-prefix", "SELECT pg_logical_emit_message(true, 'someone-else', '{\"case\": \"message-other-prefix\"}')", Outcome::Nothing),
    ("table-dropped-and-recreated", "BEGIN; DROP TABLE missing_columns; CREATE TABLE missing_columns (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, note text); ALTER PUBLICATION outbox_relay ADD TABLE missing_columns; COMMIT; INSERT INTO missing_columns (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"table-dropped-and-recreated\"}')", Outcome::Event),
    ("column-added-mid-stream", "BEGIN; ALTER TABLE strict ADD COLUMN extra int DEFAULT 1; COMMIT; INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"column-added-mid-stream\"}')", Outcome::Event),
];

#[test]
fn every_bad_row_ends_as_a_dead_letter_with_its_reason_and_the_stream_goes_on() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE loose (id text, aggregatetype text, aggregateid text, type text, payload text, \
           schema_version text, headers text, occurred_at text, note text); \
         CREATE TABLE strict (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), aggregatetype text NOT NULL, \
           aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, headers jsonb, note text); \
         CREATE TABLE missing_columns (id uuid PRIMARY KEY, payload jsonb, note text); \
         CREATE TABLE wrong_types (id uuid PRIMARY KEY, aggregatetype int, aggregateid bigint, \
           type numeric, payload int, note text); \
         CREATE TABLE not_outbox (v text)",
    );
    let dir = tempfile::tempdir().unwrap();
    let events_path = dir.path().join("events.jsonl");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\nstatus_interval = \"500ms\"\n\
             tables = [\"public.loose\", \"public.strict\", \"public.missing_columns\", \"public.wrong_types\"]\n\
             message_prefixes = [\"outbox\"]\n\
             [relay]\ncheckpoint_interval = \"100ms\"\n\
             [sinks.file]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n",
            pg.url(),
            events_path.display()
        ),
    )
    .unwrap();
    init(&config);
    let relay = Relay::start(&config);
    for (_, sql, _) in ROW_CASES {
        pg.psql(sql);
    }
    // A last good row: once it is out, every case before it was handled.
    pg.psql(
        "INSERT INTO strict (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o', 'T', '{\"case\": \"the-end\"}')",
    );
    let case_of = |event: &serde_json::Value| -> String {
        match &event["data"] {
            serde_json::Value::Object(data) => data
                .get("case")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_owned(),
            other => other.to_string(),
        }
    };
    assert!(
        wait_until(WAIT, || read_events(&events_path)
            .iter()
            .any(|e| case_of(e) == "the-end")),
        "relay log:\n{}",
        relay.log()
    );
    let delivered: Vec<String> = read_events(&events_path).iter().map(case_of).collect();
    let dead: BTreeMap<String, String> = pg
        .psql(
            "SELECT coalesce(row_data->>'note', row_data #>> '{}', ''), reason FROM outbox_relay.dead_letters",
        )
        .lines()
        .filter_map(|line| line.split_once('|'))
        .map(|(note, reason)| (note.to_owned(), reason.to_owned()))
        .collect();
    // The note column, or for logical messages the content, names the case.
    let dead_reason = |case: &str| {
        dead.iter()
            .find(|(note, _)| {
                *note == case
                    || note.starts_with(&format!("{case}:"))
                    || note.contains(&format!("\"case\": \"{case}\""))
            })
            .map(|(_, reason)| reason.clone())
    };
    let mut failures = Vec::new();
    // An UPDATE, DELETE or TRUNCATE that wrongly became an event would repeat a case name.
    let mut seen = std::collections::HashSet::new();
    for case in &delivered {
        if !seen.insert(case) {
            failures.push(format!("{case} was delivered more than once"));
        }
    }
    let expected_dead = ROW_CASES
        .iter()
        .filter(|(_, _, outcome)| matches!(outcome, Outcome::Dead(_)))
        .count();
    if dead.len() != expected_dead {
        failures.push(format!(
            "{} dead letters, expected {expected_dead}",
            dead.len()
        ));
    }
    for (case, _, outcome) in ROW_CASES {
        let got_event = delivered.iter().any(|d| d == case)
            || (*case == "payload-json-scalar" && delivered.iter().any(|d| d == "42"))
            || (*case == "wrong-column-types" && delivered.iter().any(|d| d == "10"));
        let reason = dead_reason(case);
        let ok = match outcome {
            Outcome::Dead(expected) => reason.as_deref().is_some_and(|r| {
                r.contains(expected) || (expected.starts_with("message-") && !r.is_empty())
            }),
            Outcome::Event => got_event && reason.is_none(),
            Outcome::Nothing => !got_event && reason.is_none(),
        };
        if !ok {
            failures.push(format!(
                "{case}: event delivered: {got_event}, dead letter: {reason:?}"
            ));
        }
    }
    let big = read_events(&events_path)
        .into_iter()
        .find(|e| case_of(e) == "five-mb-payload")
        .unwrap();
    assert_eq!(big["data"]["pad"].as_str().unwrap().len(), 5 * 1024 * 1024);
    let unicode = read_events(&events_path)
        .into_iter()
        .find(|e| case_of(e) == "unicode")
        .unwrap();
    assert_eq!(unicode["subject"], "ключ-🔑");
    assert!(
        failures.is_empty(),
        "{} of {} cases went wrong:\n{}\ndead letters: {dead:#?}\ndelivered: {delivered:?}\nrelay log:\n{}",
        failures.len(),
        ROW_CASES.len(),
        failures.join("\n"),
        relay.log()
    );
    assert!(
        !relay.log().contains("panicked"),
        "relay log:\n{}",
        relay.log()
    );
}

/// `check` on a bad configuration: exit 1 and a message naming the key (or the file).
const CONFIG_CASES: &[(&str, &str, &str)] = &[
    ("invalid TOML", "[source\nurl = 1", "relay.toml"),
    ("unknown key", "[source]\nurl = \"postgres://u@h/d\"\ncolour = \"blue\"\n[sinks.s]\ntype = \"stdout\"\n", "colour"),
    ("wrong type", "[source]\nurl = \"postgres://u@h/d\"\n[relay]\nbatch_size = \"many\"\n[sinks.s]\ntype = \"stdout\"\n", "batch_size"),
    ("zero batch bytes", "[source]\nurl = \"postgres://u@h/d\"\n[relay]\nbatch_bytes = 0\n[sinks.s]\ntype = \"stdout\"\n", "relay.batch_bytes"),
    ("no source url", "[source]\n[sinks.s]\ntype = \"stdout\"\n", "url"),
    ("no sinks", "[source]\nurl = \"postgres://u@h/d\"\n", "sinks"),
    ("unknown sink type", "[source]\nurl = \"postgres://u@h/d\"\n[sinks.s]\ntype = \"carrier-pigeon\"\n", "carrier-pigeon"),
    ("bad url", "[source]\nurl = \"mysql://u@h:99999/d\"\n[sinks.s]\ntype = \"stdout\"\n", "source.url"),
    ("bad sslmode", "[source]\nurl = \"postgres://u@h/d?sslmode=sometimes\"\n[sinks.s]\ntype = \"stdout\"\n", "sslmode"),
    ("missing password file", "[source]\nurl = \"postgres://u@h/d\"\npassword_file = \"/nonexistent/secret\"\n[sinks.s]\ntype = \"stdout\"\n", "password_file"),
    ("bad duration", "[source]\nurl = \"postgres://u@h/d\"\n[leader]\ninterval = \"soon\"\n[sinks.s]\ntype = \"stdout\"\n", "interval"),
    ("bad listen address", "[source]\nurl = \"postgres://u@h/d\"\n[http]\nlisten = \"everywhere\"\n[sinks.s]\ntype = \"stdout\"\n", "listen"),
    ("bad topic template", "[source]\nurl = \"postgres://u@h/d\"\n[sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"events.{nope}\"\n", "topic"),
    ("bad table name", "[source]\nurl = \"postgres://u@h/d\"\ntables = [\"a.b.c\"]\n[sinks.s]\ntype = \"stdout\"\n", "tables"),
    ("tombstone to a file sink", "[source]\nurl = \"postgres://u@h/d\"\n[outbox.\"public.outbox\"]\non_null_payload = \"tombstone\"\n[sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\n[sinks.f]\ntype = \"file\"\npath = \"/tmp/x\"\n", "sink \"f\" takes the table's events and is not a Kafka sink"),
    ("bad null-payload policy", "[source]\nurl = \"postgres://u@h/d\"\n[outbox.\"public.outbox\"]\non_null_payload = \"drop\"\n[sinks.s]\ntype = \"stdout\"\n", "on_null_payload"),
    ("rabbitmq stream without stream", "[source]\nurl = \"postgres://u@h/d\"\n[sinks.r]\ntype = \"rabbitmq\"\nmode = \"stream\"\nurl = \"rabbitmq-stream://h:5552/%2f\"\n", "stream"),
];

#[test]
fn every_bad_configuration_is_refused_with_the_key_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (case, toml, expected) in CONFIG_CASES {
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, toml).unwrap();
        let out = relay_command(&path, "check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() || !text.contains(expected) || text.contains("panicked") {
            failures.push(format!("{case}: exit {:?}: {text}", out.status.code()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

/// Wrong credentials for a broker: `check` names the broker and the refusal.
#[test]
fn wrong_broker_credentials_are_named_by_check() {
    let Scenario { pg: _pg, config, .. } = scenario().sinks("[sinks.rabbit]\ntype = \"rabbitmq\"\nurl = \"amqp://guest:wrong-password@127.0.0.1:5672/%2f\"\nexchange = \"x\"\ndeclare = true\n").init();
    let (passed, text) = relay_check(&config);
    assert!(!passed, "{text}");
    assert!(
        text.contains("sink rabbit")
            && text.contains("ACCESS_REFUSED")
            && text.contains("check the username and password")
            && !text.contains("wrong-password"),
        "the sink is named and the password is not shown:\n{text}"
    );
}
