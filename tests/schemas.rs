//! `outbox-relay schemas check` end to end: a schema directory with versions that keep and
//! break compatibility, given with `--dir` or through the configuration's
//! `validation.schema_dir`; the report and the exit code application CI relies on.

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
