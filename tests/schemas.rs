//! Schema evolution end to end: `outbox-relay schemas check` (a schema directory with
//! versions that keep and break compatibility, given with `--dir` or through the
//! configuration's `validation.schema_dir`; the report and the exit code application CI
//! relies on), `outbox-relay upcast` by hand, and upcasting in the stream: each sink at its
//! own version, bad upcasts dead-lettered.

mod common;

use common::relay_bin;
use std::path::Path;
use std::process::{Command, Output};

fn write(dir: &Path, name: &str, schema: serde_json::Value) {
    std::fs::write(dir.join(name), schema.to_string()).unwrap();
}

fn schemas_check(args: &[&str]) -> (Output, String) {
    let out = Command::new(relay_bin())
        .args(["schemas", "check"])
        .args(args)
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

/// Guarantee: a new version that only adds an optional property to a closed content model
/// passes BACKWARD (the default) and fails FULL; a version narrowing a type fails BACKWARD
/// with the property, the rule and a non-zero exit; the configuration's schema_dir is used
/// when no --dir is given.
#[test]
fn schemas_check_reports_each_step_and_fails_on_a_break() {
    let dir = tempfile::tempdir().unwrap();
    let closed = |properties: serde_json::Value| {
        serde_json::json!({"type": "object", "properties": properties, "required": ["amount"],
            "additionalProperties": false})
    };
    write(
        dir.path(),
        "OrderPlaced.v1.json",
        closed(serde_json::json!({"amount": {"type": "number"}})),
    );
    write(
        dir.path(),
        "OrderPlaced.v2.json",
        closed(serde_json::json!({"amount": {"type": "number"}, "note": {"type": "string"}})),
    );
    write(
        dir.path(),
        "Unversioned.json",
        serde_json::json!({"type": "object"}),
    );
    let path = dir.path().to_str().unwrap();

    let (out, text) = schemas_check(&["--dir", path]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("OrderPlaced v1 -> v2: BACKWARD ok, FORWARD broken"),
        "{text}"
    );
    assert!(
        text.contains("forward: /properties/note:")
            && text.contains("PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"),
        "{text}"
    );

    let (out, text) = schemas_check(&["--dir", path, "--compatibility", "full"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("breaks the required compatibility"), "{text}");

    write(
        dir.path(),
        "OrderPlaced.v3.json",
        closed(serde_json::json!({"amount": {"type": "integer"}, "note": {"type": "string"}})),
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"postgres://relay@localhost/app\"\n[validation]\nschema_dir = \"{path}\"\n\
             [sinks.out]\ntype = \"stdout\"\n"
        ),
    )
    .unwrap();
    let (out, text) = schemas_check(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("OrderPlaced v2 -> v3: BACKWARD broken")
            && text.contains(
                "backward: /properties/amount: type number became integer (TYPE_NARROWED)"
            ),
        "{text}"
    );

    let (out, text) = schemas_check(&["--dir", "/nonexistent/schemas"]);
    assert!(!out.status.success());
    assert!(
        text.contains("cannot read schema directory /nonexistent/schemas"),
        "{text}"
    );
}

/// Runs `outbox-relay --config CONFIG upcast ARGS` with `stdin`; its exit status, stdout and
/// stderr.
fn upcast(config: &Path, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(relay_bin())
        .args(["--config", config.to_str().unwrap(), "upcast"])
        .args(args)
        .env_remove("OUTBOX_RELAY_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Guarantee: `upcast` runs the configured jq chain on a payload and validates the result
/// against the target version's schema; a program that does not compile stops the
/// configuration from loading, naming its key.
#[test]
fn upcast_runs_the_chain_and_validates_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    write(
        &schemas,
        "OrderPlaced.v2.json",
        serde_json::json!({"type": "object", "required": ["totalAmount", "currency"],
            "properties": {"totalAmount": {"type": "number"}, "currency": {"type": "string"}}}),
    );
    let config = |program: &str| {
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"postgres://relay@localhost/app\"\n[validation]\nschema_dir = \"{}\"\n\
                 [upcast.OrderPlaced.1]\nto = 2\nprogram = '{program}'\n[sinks.out]\ntype = \"stdout\"\n",
                schemas.display()
            ),
        )
        .unwrap();
        path
    };
    let good = config(r#"{totalAmount: .amount, currency: "USD"} + del(.amount)"#);
    let (code, stdout, stderr) = upcast(
        &good,
        &["--type", "OrderPlaced", "--from", "1"],
        r#"{"amount": 12, "id": "o-1"}"#,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let payload: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        payload,
        serde_json::json!({"id": "o-1", "totalAmount": 12, "currency": "USD"})
    );
    assert!(stderr.contains("OrderPlaced version 1 -> 2"), "{stderr}");

    let forgetful = config(r#"{totalAmount: .amount}"#);
    let (code, _, stderr) = upcast(
        &forgetful,
        &["--type", "OrderPlaced", "--from", "1"],
        r#"{"amount": 12}"#,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("version 2 of OrderPlaced does not validate"),
        "{stderr}"
    );

    let broken = config("{totalAmount: ");
    let (code, _, stderr) = upcast(&broken, &["--type", "OrderPlaced", "--from", "1"], "{}");
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("upcast.OrderPlaced.1.program: it does not parse"),
        "{stderr}"
    );
}

/// Guarantee: `schemas check` with the configuration runs each upcaster on the examples of
/// its version's schema and validates the results against the next version's schema,
/// naming each example that fails.
#[test]
fn schemas_check_tries_each_upcaster_on_the_examples_of_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    write(
        &schemas,
        "OrderPlaced.v1.json",
        serde_json::json!({"type": "object", "properties": {"amount": {"type": "number"}},
            "examples": [{"amount": 12}, {"amount": 7.5}]}),
    );
    write(
        &schemas,
        "OrderPlaced.v2.json",
        serde_json::json!({"type": "object", "required": ["totalAmount"],
            "properties": {"totalAmount": {"type": "integer"}}}),
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"postgres://relay@localhost/app\"\n[validation]\nschema_dir = \"{}\"\n\
             [upcast.OrderPlaced.1]\nto = 2\nprogram = '{{totalAmount: .amount}}'\n\
             [sinks.out]\ntype = \"stdout\"\n",
            schemas.display()
        ),
    )
    .unwrap();
    let (out, text) = schemas_check(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("OrderPlaced v1 -> v2 upcaster, example 1: validates")
            && text.contains("OrderPlaced v1 -> v2 upcaster, example 2: fails:"),
        "{text}"
    );
    assert!(!text.contains("7.5"), "a failure quotes no value: {text}");
}

const UPCAST_SCHEMAS: &[(&str, &str)] = &[
    (
        "OrderPlaced.v1.json",
        r#"{"type": "object", "required": ["amount"], "properties": {"amount": {"type": "number"}}}"#,
    ),
    (
        "OrderPlaced.v2.json",
        r#"{"type": "object", "required": ["totalAmount", "currency", "items"],
            "properties": {"totalAmount": {"type": "number"}, "currency": {"type": "string"},
            "items": {"type": "array"}}}"#,
    ),
    (
        "OrderPlaced.v3.json",
        r#"{"type": "object", "required": ["totalAmount", "channel"]}"#,
    ),
    (
        "Invalid.v2.json",
        r#"{"type": "object", "required": ["total"]}"#,
    ),
];

const UPCASTERS: &str = r#"
[upcast.OrderPlaced.1]
to = 2
program = '{totalAmount: .amount, currency: "USD", items: []} + del(.amount)'
[upcast.OrderPlaced.2]
to = 3
program = '. + {channel: "web"}'
[upcast.Failing.1]
to = 2
program = 'error("no")'
[upcast.Slow.1]
to = 2
program = 'until(false; .)'
[upcast.Hog.1]
to = 2
program = '"x" | until(false; . + .)'
[upcast.Invalid.1]
to = 2
program = '{other: 1}'
"#;

/// Guarantee: each sink publishes at its own version: as stored (the default), upcast to
/// the latest version, or pinned per type; an upcast event carries the published version
/// and the stored one (`originalschemaversion`). An event whose chain fails, runs out of
/// time or memory, or whose result fails the target schema is a dead letter for that sink
/// with the reason (both versions' for a schema failure), and the stream goes on: a step
/// that ran out of time or memory is not run again in the run, so it cannot stall the sink.
#[test]
fn each_sink_publishes_at_its_version_and_a_bad_upcast_is_a_dead_letter() {
    use common::*;
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    pg.psql("ALTER TABLE outbox ADD COLUMN schema_version int");
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    for (name, schema) in UPCAST_SCHEMAS {
        std::fs::write(schemas.join(name), schema).unwrap();
    }
    let sink = |name: &str, rule: &str| {
        format!(
            "{}upcast = {rule}\n",
            file_sink(name, &dir.path().join(format!("{name}.jsonl")))
        )
    };
    let cfg = ConfigFile::new()
        .relay("upcast_timeout = \"500ms\"\nupcast_memory_bytes = 67108864\n")
        .sinks(&format!(
            "[validation]\nschema_dir = \"{}\"\n{UPCASTERS}{}{}{}",
            schemas.display(),
            file_sink("stored", &dir.path().join("stored.jsonl")),
            sink("latest", "{ to = \"latest\" }"),
            sink("pinned", "{ pinned = { OrderPlaced = 2 } }"),
        ))
        .write(dir.path(), &pg);
    init(&cfg);
    let relay = Relay::start(&cfg);
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, schema_version) VALUES \
         ('order', 'e1', 'OrderPlaced', '{\"amount\": 12}', 1), \
         ('order', 'e2', 'OrderPlaced', '{\"totalAmount\": 7, \"currency\": \"EUR\", \"items\": []}', 2), \
         ('order', 'e3', 'OrderPlaced', '{\"totalAmount\": 9, \"channel\": \"app\"}', 3), \
         ('order', 'e4', 'Failing', '{}', 1), \
         ('order', 'e5', 'Failing', '{}', 1), \
         ('order', 'e6', 'Slow', '{}', 1), \
         ('order', 'e7', 'Slow', '{}', 1), \
         ('order', 'e8', 'Hog', '{}', 1), \
         ('order', 'e9', 'Invalid', '{}', 1), \
         ('order', 'e10', 'OrderPlaced', '{\"amount\": 5}', 1), \
         ('order', 'e11', 'Unversioned', '{\"any\": 1}', NULL)",
    );
    let events = |name: &str| read_events(&dir.path().join(format!("{name}.jsonl")));
    let seen = |relay: &Relay, name: &str, count: usize| {
        assert!(
            wait_until(WAIT, || events(name).len() == count),
            "sink {name} has {:?}; relay log:\n{}",
            events(name),
            relay.log()
        );
        events(name)
    };
    let subjects = |events: &[serde_json::Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["subject"].as_str().unwrap().to_owned())
            .collect()
    };

    let stored = seen(&relay, "stored", 11);
    assert!(stored
        .iter()
        .all(|e| e.get("originalschemaversion").is_none()));
    assert_eq!(stored[0]["data"], serde_json::json!({"amount": 12}));

    let latest = seen(&relay, "latest", 5);
    assert_eq!(subjects(&latest), ["e1", "e2", "e3", "e10", "e11"]);
    assert_eq!(
        latest[0]["data"],
        serde_json::json!({"totalAmount": 12, "currency": "USD", "items": [], "channel": "web"})
    );
    let versions = |e: &serde_json::Value| {
        (
            e["schemaversion"].as_i64(),
            e.get("originalschemaversion").and_then(|v| v.as_i64()),
        )
    };
    let published: Vec<_> = latest.iter().map(versions).collect();
    assert_eq!(
        published,
        [
            (Some(3), Some(1)),
            (Some(3), Some(2)),
            (Some(3), None),
            (Some(3), Some(1)),
            (None, None)
        ]
    );
    assert_eq!(
        latest[0]["id"], stored[0]["id"],
        "an upcast event keeps its id"
    );

    let pinned = seen(&relay, "pinned", 11);
    let published: Vec<_> = pinned.iter().take(3).map(versions).collect();
    assert_eq!(
        published,
        [(Some(2), Some(1)), (Some(2), None), (Some(3), None)]
    );
    assert_eq!(
        pinned[0]["data"],
        serde_json::json!({"totalAmount": 12, "currency": "USD", "items": []})
    );

    let letters = dead_letters(&pg, "sink, row_data->>'aggregateid', reason");
    assert_eq!(letters.len(), 6, "{letters:#?}");
    let reason = |id: &str| {
        letters
            .iter()
            .find(|l| l.starts_with(&format!("latest | {id} | ")))
            .unwrap_or_else(|| panic!("no dead letter of {id} for sink latest: {letters:#?}"))
            .clone()
    };
    for id in ["e4", "e5"] {
        assert!(reason(id).contains("failed (a jq error)"), "{}", reason(id));
    }
    assert!(
        reason("e6").contains("ran longer than relay.upcast_timeout (500ms)"),
        "{}",
        reason("e6")
    );
    assert!(
        reason("e7").contains("not run again until the relay restarts"),
        "{}",
        reason("e7")
    );
    assert!(
        reason("e8").contains("ended its process") && reason("e8").contains("out of memory"),
        "{}",
        reason("e8")
    );
    assert!(
        reason("e9").contains("fails version 2's schema")
            && reason("e9").contains("the stored version 1 has no schema"),
        "{}",
        reason("e9")
    );
    let log = relay.log();
    assert!(!log.contains("amount"), "payloads stay out of logs:\n{log}");

    // The helper processes end with the relay, even when it is killed.
    let helpers = Command::new("pgrep")
        .args(["-P", &relay.child.id().to_string()])
        .output()
        .unwrap();
    let helpers: Vec<String> = String::from_utf8_lossy(&helpers.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(
        !helpers.is_empty(),
        "the upcasting sinks run helper processes"
    );
    let mut relay = relay;
    relay.kill9();
    let gone = |pid: &String| {
        // Gone, or a zombie its dead parent left for init to reap.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |stat| stat.contains(") Z "))
    };
    assert!(
        wait_until(WAIT, || helpers.iter().all(gone)),
        "helpers {helpers:?} outlived the relay"
    );

    // Fixed and restarted, the relay publishes a replayed dead letter at the sink's version.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(r#"error("no")"#, "{fixed: true}")).unwrap();
    let relay = Relay::start(&cfg);
    let e4 =
        pg.psql("SELECT id FROM outbox_relay.dead_letters WHERE row_data->>'aggregateid' = 'e4'");
    relay_dlq(&cfg, &["replay", &e4]);
    let latest = seen(&relay, "latest", 6);
    assert_eq!(latest[5]["subject"], "e4");
    assert_eq!(latest[5]["data"], serde_json::json!({"fixed": true}));
    assert_eq!(versions(&latest[5]), (Some(2), Some(1)));
    assert_eq!(
        events("stored").len(),
        11,
        "a replay for one sink reaches that sink only"
    );
}

/// Guarantee: a sink rule the upcasters cannot serve stops the configuration from loading
/// with the fix: a pin no upcaster produces, `latest` without any upcaster.
#[test]
fn a_sink_rule_the_upcasters_cannot_serve_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = |tables: &str| {
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\nurl = \"postgres://relay@localhost/app\"\ntables = [\"public.outbox\"]\n\
                 {tables}[sinks.out]\ntype = \"stdout\"\n"
            ),
        )
        .unwrap();
        path
    };
    let pinned = config(
        "[upcast.OrderPlaced.1]\nto = 2\nprogram = '.'\n[sinks.old]\ntype = \"stdout\"\n\
         upcast = { pinned = { OrderPlaced = 3 } }\n",
    );
    let (code, _, stderr) = upcast(&pinned, &["--type", "OrderPlaced", "--from", "1"], "{}");
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("sinks.old.upcast.pinned.OrderPlaced = 3")
            && stderr.contains("no [upcast.OrderPlaced.<version>] program has to = 3"),
        "{stderr}"
    );
    let latest = config("[sinks.new]\ntype = \"stdout\"\nupcast = { to = \"latest\" }\n");
    let (code, _, stderr) = upcast(&latest, &["--type", "OrderPlaced", "--from", "1"], "{}");
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("sinks.new.upcast.to = \"latest\", but no upcaster is configured"),
        "{stderr}"
    );
}
