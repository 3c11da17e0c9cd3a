//! `outbox-relay catalog` end to end: the AsyncAPI document of a configuration with five
//! kinds of sink and a schema directory, checked for what it must say and validated by the
//! AsyncAPI project's own parser (installed into .asyncapi-parser by
//! scripts/install-test-deps.sh, run with Node.js).

mod common;

use common::relay_bin;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Guarantee: one channel per sink with its destination, placeholders as parameters and
/// its guarantee; one message per schema version a sink's match rule lets through, with
/// the schema and an example in the sink's format; the document passes the AsyncAPI
/// parser.
#[test]
fn the_catalog_is_a_valid_asyncapi_document_of_every_sink_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    let order = |extra: Value| {
        let mut properties = json!({"amount": {"type": "number"}});
        properties
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["amount"], "properties": properties})
        .to_string()
    };
    write(&schemas, "OrderPlaced.v1.json", &order(json!({})));
    write(
        &schemas,
        "OrderPlaced.v2.json",
        &order(json!({"currency": {"enum": ["EUR", "USD"]}})),
    );
    write(
        &schemas,
        "ParcelShipped.json",
        r#"{"type": "object", "examples": [{"parcel": "p-1"}]}"#,
    );
    let config = dir.path().join("relay.toml");
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[source]\nurl = \"postgres://relay@localhost/app\"\ntables = [\"public.outbox\"]\n\
             [validation]\nschema_dir = \"{}\"\n\
             [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n\
             [sinks.exchange]\ntype = \"rabbitmq\"\nurl = \"amqp://localhost:5672/%2f\"\nexchange = \"outbox\"\n\
             [sinks.queue]\ntype = \"sqs\"\nqueue_url = \"https://sqs.eu-west-1.amazonaws.com/1/orders.fifo\"\nformat = \"raw\"\n\
             [upcast.OrderPlaced.1]\nto = 2\nprogram = '. + {{currency: \"EUR\"}}'\n\
             [sinks.hook]\ntype = \"webhook\"\nurl = \"https://hooks.example.com/{{aggregatetype}}/{{type}}\"\n\
             upcast = {{ to = \"latest\" }}\n\
             [sinks.hook.match]\nevent_types = [\"Order*\"]\n\
             [sinks.log]\ntype = \"stdout\"\n",
            schemas.display()
        ),
    );
    let out = Command::new(relay_bin())
        .args(["--config", config.to_str().unwrap(), "catalog"])
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let document: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(document["asyncapi"], "3.0.0");
    let channels = document["channels"].as_object().unwrap();
    assert_eq!(channels.len(), 5);
    let kafka = &channels["kafka"];
    assert_eq!(kafka["address"], "outbox.event.{aggregatetype}");
    assert!(kafka["parameters"]["aggregatetype"].is_object());
    assert!(kafka["description"]
        .as_str()
        .unwrap()
        .contains("exactly once"));
    assert_eq!(kafka["messages"].as_object().unwrap().len(), 3);
    assert!(channels["exchange"]["description"]
        .as_str()
        .unwrap()
        .contains("Routing key `{aggregatetype}.{type}`"));
    let hook = &channels["hook"];
    let hook_messages: Vec<&String> = hook["messages"].as_object().unwrap().keys().collect();
    assert_eq!(
        hook_messages,
        ["OrderPlaced.v2"],
        "match.event_types applies, and the sink upcasts v1 to v2"
    );
    assert!(hook["parameters"]["type"].is_object());
    assert_eq!(channels["log"]["address"], Value::Null);
    let messages = &document["components"]["messages"];
    let v2 = &messages["OrderPlaced.v2.cloudevents"];
    assert_eq!(v2["contentType"], "application/cloudevents+json");
    assert_eq!(
        v2["payload"]["properties"]["data"]["properties"]["currency"]["enum"],
        json!(["EUR", "USD"])
    );
    assert_eq!(v2["examples"][0]["payload"]["schemaversion"], 2);
    assert_eq!(v2["examples"][0]["payload"]["data"], json!({"amount": 1.5}));
    let raw = &messages["ParcelShipped.raw"];
    assert_eq!(raw["examples"][0]["payload"], json!({"parcel": "p-1"}));
    assert_eq!(document["operations"].as_object().unwrap().len(), 5);

    let parser = Path::new(env!("CARGO_MANIFEST_DIR")).join(".asyncapi-parser");
    assert!(
        parser.join("node_modules/@asyncapi/parser").exists(),
        "the AsyncAPI parser is missing: run scripts/install-test-deps.sh"
    );
    let file = dir.path().join("asyncapi.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let validated = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/asyncapi/validate.mjs"))
        .arg(&parser)
        .arg(&file)
        .output()
        .expect("node (Node.js) runs the AsyncAPI parser");
    let report = String::from_utf8_lossy(&validated.stdout).into_owned()
        + &String::from_utf8_lossy(&validated.stderr);
    assert!(
        validated.status.success(),
        "the AsyncAPI parser refused the document:\n{report}"
    );
    assert!(!report.contains("error "), "{report}");
}

/// Guarantee: `catalog --markdown` lists the destinations, each type's versions with what
/// changed between them, and the sinks that publish each type.
#[test]
fn the_markdown_catalog_says_what_changed_between_versions() {
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir(&schemas).unwrap();
    write(
        &schemas,
        "OrderPlaced.v1.json",
        r#"{"type": "object", "properties": {"amount": {"type": "number"}}}"#,
    );
    write(
        &schemas,
        "OrderPlaced.v2.json",
        r#"{"type": "object", "properties": {"amount": {"type": "integer"}}}"#,
    );
    let config = dir.path().join("relay.toml");
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[source]\nurl = \"postgres://relay@localhost/app\"\ntables = [\"public.outbox\"]\n\
             [validation]\nschema_dir = \"{}\"\n[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n",
            schemas.display()
        ),
    );
    let out = Command::new(relay_bin())
        .args([
            "--config",
            config.to_str().unwrap(),
            "catalog",
            "--markdown",
        ])
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{page}");
    assert!(
        page.contains("| `kafka` | kafka | `outbox.event.{aggregatetype}` |"),
        "{page}"
    );
    assert!(
        page.contains("### OrderPlaced") && page.contains("Published by: `kafka`."),
        "{page}"
    );
    assert!(
        page.contains(
            "- breaks old events: `/properties/amount`: type number became integer (TYPE_NARROWED)"
        ),
        "{page}"
    );
}
