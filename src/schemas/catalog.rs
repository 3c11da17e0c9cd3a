//! `outbox-relay catalog`: an AsyncAPI 3.0 document of the events the relay publishes, made
//! from the configuration and the schema directory: one channel per sink (its destination
//! template, its placeholders as parameters, the guarantee it gives), one message per event
//! type and schema version it can carry (the payload's JSON Schema inside the envelope the
//! sink's format writes, and an example), and one `send` operation per channel.
//!
//! Invariant: every name used as a key in the document matches AsyncAPI's
//! `^[a-zA-Z0-9.\-_]+$` (others are replaced by `_`), and every placeholder of an address is
//! a declared parameter, so the document passes the AsyncAPI parser (tests/catalog.rs).

use super::SchemaFile;
use crate::config::Config;
use crate::upcast::Upcasters;
use outbox_relay_sinks::format::Format;
use outbox_relay_sinks::routing::glob_matches;
use outbox_relay_sinks::{Channel, UpcastTarget};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// A key AsyncAPI accepts.
fn key(text: &str) -> String {
    text.chars()
        .map(|c| match c.is_ascii_alphanumeric() || ".-_".contains(c) {
            true => c,
            false => '_',
        })
        .collect()
}

/// The schema files of `dir`, without the keywords that name their own schema format
/// (the document's applies inside it).
fn load_schemas(dir: &Path) -> anyhow::Result<Vec<SchemaFile>> {
    let mut files = super::read_schema_files(dir)?;
    for file in &mut files {
        if let Some(object) = file.schema.as_object_mut() {
            object.remove("$schema");
            object.remove("$id");
        }
    }
    Ok(files)
}

/// A value the schema accepts, for the message's example: its first `examples` entry, else
/// one made from its types.
fn example(schema: &Value) -> Value {
    let Some(object) = schema.as_object() else {
        return json!({});
    };
    if let Some(first) = object
        .get("examples")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(value) = object.get("const").or(object.get("default")) {
        return value.clone();
    }
    if let Some(first) = object
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let kind = match object.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if object.contains_key("properties") => "object",
        _ => "object",
    };
    match kind {
        "object" => {
            let properties = object.get("properties").and_then(Value::as_object);
            let required: Vec<&str> = object
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut out = Map::new();
            for (name, property) in properties.into_iter().flatten() {
                if required.contains(&name.as_str()) || required.is_empty() {
                    out.insert(name.clone(), example(property));
                }
            }
            Value::Object(out)
        }
        "array" => json!([example(object.get("items").unwrap_or(&json!({})))]),
        "string" => json!("string"),
        "integer" => json!(1),
        "number" => json!(1.5),
        "boolean" => json!(true),
        _ => Value::Null,
    }
}

/// The message's payload schema and content type, for an event schema (or anything) in
/// the sink's format.
fn payload(format: Format, data: &Value) -> (Value, &'static str) {
    match format {
        Format::CloudEvents => (
            json!({
                "type": "object",
                "description": "The CloudEvents 1.0 envelope (structured mode).",
                "required": ["specversion", "id", "source", "type", "subject", "time",
                    "datacontenttype", "aggregatetype", "lsn", "txid", "sequence"],
                "properties": {
                    "specversion": {"const": "1.0"},
                    "id": {"type": "string", "description": "The event id: the same on every delivery."},
                    "source": {"type": "string"},
                    "type": {"type": "string", "description": "The event type."},
                    "subject": {"type": "string", "description": "The aggregate id."},
                    "time": {"type": "string", "format": "date-time"},
                    "datacontenttype": {"type": "string"},
                    "aggregatetype": {"type": "string"},
                    "schemaversion": {"type": "integer"},
                    "traceparent": {"type": "string"},
                    "lsn": {"type": "string", "description": "The commit LSN."},
                    "txid": {"type": "integer"},
                    "sequence": {"type": "string", "description": "The position as 24 hex digits: sorts in commit order."},
                    "data": data,
                    "data_base64": {"type": "string", "contentEncoding": "base64"}
                }
            }),
            "application/cloudevents+json",
        ),
        Format::Debezium | Format::Raw => (data.clone(), "application/json"),
    }
}

/// The example of one message in the sink's format.
fn envelope_example(format: Format, event_type: &str, version: Option<i64>, data: Value) -> Value {
    match format {
        Format::CloudEvents => {
            let mut envelope = json!({
                "specversion": "1.0",
                "id": "0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11",
                "source": "/outbox/public.outbox",
                "type": event_type,
                "subject": "order-1",
                "time": "2026-01-02T03:04:05.123456Z",
                "datacontenttype": "application/json",
                "aggregatetype": "order",
                "lsn": "0/16B3748",
                "txid": 742,
                "sequence": "00000000016B374800000000",
                "data": data,
            });
            if let Some(version) = version {
                envelope["schemaversion"] = json!(version);
            }
            envelope
        }
        Format::Debezium | Format::Raw => data,
    }
}

/// The channel of one sink.
fn channel(name: &str, channel: &Channel, messages: Map<String, Value>) -> Value {
    let mut description = format!(
        "Sink `{name}` ({}). Guarantee: {}. Format: {}.",
        channel.protocol,
        channel.guarantee,
        match channel.format {
            Format::CloudEvents => "CloudEvents envelope",
            Format::Debezium => "the payload (Debezium outbox router compatible)",
            Format::Raw => "the payload as stored",
        }
    );
    if let Some(route) = &channel.route {
        description.push_str(&format!(
            " {} `{route}`.",
            match channel.protocol {
                "eventbridge" => "Detail type",
                _ => "Routing key",
            }
        ));
    }
    let mut parameters = Map::new();
    let mut rest = channel.address.as_str();
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let parameter = &rest[start + 1..start + end];
        parameters.insert(
            parameter.to_owned(),
            json!({"description": format!("The event's `{parameter}`.")}),
        );
        rest = &rest[start + end + 1..];
    }
    let mut out = json!({
        "address": if channel.address.is_empty() { Value::Null } else { json!(channel.address) },
        "title": name,
        "description": description,
        "messages": messages,
    });
    if !parameters.is_empty() {
        out["parameters"] = Value::Object(parameters);
    }
    if channel.protocol == "amqp" {
        out["bindings"] = json!({"amqp": {"is": "routingKey", "exchange": {"name": channel.address, "type": "topic"}, "bindingVersion": "0.3.0"}});
    }
    out
}

/// The AsyncAPI document for `config`, with the schemas of `validation.schema_dir`.
pub fn asyncapi(config: &Config) -> anyhow::Result<Value> {
    let schemas = match &config.validation.schema_dir {
        Some(dir) => load_schemas(dir)?,
        None => Vec::new(),
    };
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut components = Map::new();
    let upcasters = Upcasters::compile(&config.upcast)?;
    for (name, sink) in &config.sinks {
        let described = sink.channel();
        let rule = sink.filter();
        let mut messages = Map::new();
        let mut references = Vec::new();
        let channel_key = key(name);
        let events: Vec<(String, Option<i64>, Value)> = if schemas.is_empty() {
            vec![(
                "Event".to_owned(),
                None,
                json!({"description": "Any outbox event (no schema directory)."}),
            )]
        } else {
            schemas
                .iter()
                .filter(|s| {
                    rule.event_types.is_empty()
                        || rule
                            .event_types
                            .iter()
                            .any(|g| glob_matches(g, &s.event_type))
                })
                .filter(|s| {
                    // A version the sink upcasts to a later one is not what it publishes.
                    s.version.is_none_or(|v| {
                        upcasters.published_version(sink.upcast(), &s.event_type, v) == v
                    })
                })
                .map(|s| (s.event_type.clone(), s.version, s.schema.clone()))
                .collect()
        };
        for (event_type, version, schema) in events {
            let message_key = key(&match version {
                Some(v) => format!("{event_type}.v{v}"),
                None => event_type.clone(),
            });
            let component = key(&format!("{message_key}.{}", format_name(described.format)));
            let (payload, content_type) = payload(described.format, &schema);
            let example =
                envelope_example(described.format, &event_type, version, example(&schema));
            let mut message = json!({
                "name": event_type,
                "title": match version { Some(v) => format!("{event_type} v{v}"), None => event_type.clone() },
                "contentType": content_type,
                "payload": payload,
                "examples": [{"payload": example}],
            });
            if described.protocol == "kafka" {
                message["bindings"] = json!({"kafka": {"key": {"type": "string", "description": "The event's key (the aggregate id by default): a key's events share a partition."}, "bindingVersion": "0.5.0"}});
            }
            components.insert(component.clone(), message);
            messages.insert(
                message_key.clone(),
                json!({"$ref": format!("#/components/messages/{component}")}),
            );
            references
                .push(json!({"$ref": format!("#/channels/{channel_key}/messages/{message_key}")}));
        }
        channels.insert(channel_key.clone(), channel(name, &described, messages));
        operations.insert(
            key(&format!("publish.{name}")),
            json!({"action": "send", "channel": {"$ref": format!("#/channels/{channel_key}")}, "messages": references}),
        );
    }
    let tables: Vec<String> = config.source.tables.clone();
    Ok(json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": format!("Outbox events of slot {}", config.source.slot),
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Generated by outbox-relay catalog. Producers: the outbox tables {}. Each channel is one configured sink.",
                tables.join(", ")
            ),
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": components},
    }))
}

/// The one-page Markdown catalog for people: per event type its versions, what changed
/// from each version to the next (the schema differences in both directions), its
/// properties, and the sinks that publish it; the producers' tables; the destinations.
pub fn markdown(config: &Config) -> anyhow::Result<String> {
    let upcasters = Upcasters::compile(&config.upcast)?;
    let schemas = match &config.validation.schema_dir {
        Some(dir) => load_schemas(dir)?,
        None => Vec::new(),
    };
    let mut out = format!(
        "# Outbox events of slot {}\n\nProducers: the outbox tables {}.\n\n## Destinations\n\n\
         | sink | protocol | destination | format | guarantee |\n|---|---|---|---|---|\n",
        config.source.slot,
        config
            .source
            .tables
            .iter()
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (name, sink) in &config.sinks {
        let c = sink.channel();
        let destination = match &c.route {
            Some(route) => format!("`{}` / `{route}`", c.address),
            None if c.address.is_empty() => "-".to_owned(),
            None => format!("`{}`", c.address),
        };
        out.push_str(&format!(
            "| `{name}` | {} | {destination} | {} | {} |\n",
            c.protocol,
            format_name(c.format),
            c.guarantee
        ));
    }
    out.push_str("\n## Event types\n");
    if schemas.is_empty() {
        out.push_str(
            "\nNo schema directory (`validation.schema_dir`): the types are not known here.\n",
        );
    }
    let mut by_type: BTreeMap<&str, Vec<&SchemaFile>> = BTreeMap::new();
    for schema in &schemas {
        by_type.entry(&schema.event_type).or_default().push(schema);
    }
    for (event_type, versions) in by_type {
        out.push_str(&format!("\n### {event_type}\n\n"));
        let sinks: Vec<String> = config
            .sinks
            .iter()
            .filter(|(_, sink)| {
                let globs = &sink.filter().event_types;
                globs.is_empty() || globs.iter().any(|g| glob_matches(g, event_type))
            })
            .map(|(name, sink)| {
                let rule = sink.upcast();
                match rule.pinned.get(event_type) {
                    Some(version) => format!("`{name}` (upcast to v{version})"),
                    None if rule.to == UpcastTarget::Latest
                        && upcasters.steps().any(|(t, _, _)| t == event_type) =>
                    {
                        format!("`{name}` (upcast to the latest version)")
                    }
                    None => format!("`{name}`"),
                }
            })
            .collect();
        out.push_str(&format!("Published by: {}.\n", sinks.join(", ")));
        let mut previous: Option<&SchemaFile> = None;
        for schema in versions {
            let label = schema
                .version
                .map_or("any version".to_owned(), |v| format!("v{v}"));
            let properties: Vec<String> = schema
                .schema
                .get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().map(|k| format!("`{k}`")).collect())
                .unwrap_or_default();
            out.push_str(&format!(
                "\n- **{label}**: properties {}\n",
                if properties.is_empty() {
                    "not listed".to_owned()
                } else {
                    properties.join(", ")
                }
            ));
            if let Some(before) = previous.filter(|_| schema.version.is_some()) {
                let backward = super::compat::narrowings(&before.schema, &schema.schema);
                let forward = super::compat::narrowings(&schema.schema, &before.schema);
                if backward.is_empty() && forward.is_empty() {
                    out.push_str("  - no change consumers can see\n");
                }
                for (direction, differences) in [
                    ("breaks old events", backward),
                    ("breaks old consumers", forward),
                ] {
                    for d in differences {
                        let path = if d.path.is_empty() { "/" } else { &d.path };
                        out.push_str(&format!(
                            "  - {direction}: `{path}`: {} ({})\n",
                            d.detail, d.kind
                        ));
                    }
                }
            }
            previous = Some(schema);
        }
    }
    Ok(out)
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::CloudEvents => "cloudevents",
        Format::Debezium => "debezium",
        Format::Raw => "raw",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_follow_the_schema() {
        let schema = json!({"type": "object", "required": ["id", "n", "tags"], "properties": {
            "id": {"type": "string"}, "n": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
            "note": {"type": "string"}}});
        assert_eq!(
            example(&schema),
            json!({"id": "string", "n": 1, "tags": ["a"]})
        );
        assert_eq!(example(&json!({"examples": [{"x": 1}]})), json!({"x": 1}));
        assert_eq!(key("orders \"eu\""), "orders__eu_");
    }
}
