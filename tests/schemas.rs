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
