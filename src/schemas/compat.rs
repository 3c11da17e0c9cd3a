//! Whether one JSON Schema accepts every document another one accepts: the core of
//! `outbox-relay schemas check`. [`narrowings`]`(writer, reader)` lists the ways `reader`
//! accepts less than `writer`; none means a consumer validating with `reader` can read
//! every event written under `writer`. So version N+1 is BACKWARD compatible with N when
//! `narrowings(N, N+1)` is empty, FORWARD compatible when `narrowings(N+1, N)` is empty,
//! FULL when both are, in the terms of Confluent's JSON Schema compatibility rules (each
//! difference carries the name Confluent gives it).
//!
//! Invariant: a keyword the comparison does not understand (`$ref`, `oneOf`, `anyOf`,
//! `allOf`, `not`, `if`, `patternProperties`, `dependentSchemas`…) is never taken as
//! compatible: it is reported as a difference to review by hand.

use serde_json::{Map, Value};

/// One way the reader accepts less than the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Where in the schema, as a JSON pointer (`/properties/amount`); empty at the root.
    pub path: String,
    /// Confluent's name for it, e.g. `TYPE_NARROWED`.
    pub kind: &'static str,
    pub detail: String,
}

/// Keywords whose meaning the comparison does not follow.
const NOT_COMPARED: [&str; 11] = [
    "$ref",
    "oneOf",
    "anyOf",
    "allOf",
    "not",
    "if",
    "patternProperties",
    "dependentSchemas",
    "dependentRequired",
    "propertyNames",
    "unevaluatedProperties",
];

/// The ways `reader` accepts less than `writer`.
pub fn narrowings(writer: &Value, reader: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    compare(writer, reader, "", &mut out);
    out
}

fn push(out: &mut Vec<Difference>, path: &str, kind: &'static str, detail: String) {
    out.push(Difference {
        path: path.to_owned(),
        kind,
        detail,
    });
}

/// The JSON types a schema allows; `None` when any.
fn types(schema: &Map<String, Value>) -> Option<Vec<String>> {
    match schema.get("type")? {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

/// Whether a value of JSON type `t` is always of one of `allowed`.
fn covered(t: &str, allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a == t || (t == "integer" && a == "number"))
}

fn compare(writer: &Value, reader: &Value, path: &str, out: &mut Vec<Difference>) {
    let (writer, reader) = match (writer, reader) {
        (_, Value::Bool(true)) => return,
        (Value::Bool(false), _) => return,
        (Value::Object(w), Value::Object(r)) => (w, r),
        (Value::Bool(true), Value::Object(r)) => {
            if !r.is_empty() {
                push(
                    out,
                    path,
                    "SCHEMA_NARROWED",
                    "anything was allowed; now constrained".into(),
                );
            }
            return;
        }
        (_, Value::Bool(false)) => {
            push(
                out,
                path,
                "SCHEMA_NARROWED",
                "nothing is allowed any more".into(),
            );
            return;
        }
        _ => return,
    };
    for keyword in NOT_COMPARED {
        if writer.get(keyword) != reader.get(keyword) {
            push(
                out,
                path,
                "NOT_COMPARED",
                format!("`{keyword}` differs: compare by hand"),
            );
        }
    }
    match (types(writer), types(reader)) {
        (_, None) => {}
        (None, Some(r)) => push(
            out,
            path,
            "TYPE_NARROWED",
            format!("any type was allowed; now {}", r.join(", ")),
        ),
        (Some(w), Some(r)) => {
            let lost: Vec<&String> = w.iter().filter(|t| !covered(t, &r)).collect();
            if !lost.is_empty() {
                let kind = if w
                    .iter()
                    .any(|t| r.iter().any(|x| covered(x, std::slice::from_ref(t))))
                {
                    "TYPE_NARROWED"
                } else {
                    "TYPE_CHANGED"
                };
                push(
                    out,
                    path,
                    kind,
                    format!("type {} became {}", w.join(", "), r.join(", ")),
                );
            }
        }
    }
    compare_enum(writer, reader, path, out);
    compare_bounds(writer, reader, path, out);
    compare_object(writer, reader, path, out);
    if let (Some(w), Some(r)) = (writer.get("items"), reader.get("items")) {
        compare(w, r, &format!("{path}/items"), out);
    } else if let (None, Some(r)) = (writer.get("items"), reader.get("items")) {
        compare(&Value::Bool(true), r, &format!("{path}/items"), out);
    }
}

fn compare_enum(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Difference>,
) {
    let allowed = |schema: &Map<String, Value>| -> Option<Vec<Value>> {
        match (schema.get("enum"), schema.get("const")) {
            (Some(Value::Array(values)), _) => Some(values.clone()),
            (_, Some(value)) => Some(vec![value.clone()]),
            _ => None,
        }
    };
    match (allowed(writer), allowed(reader)) {
        (_, None) => {}
        (None, Some(_)) => push(
            out,
            path,
            "ENUM_ARRAY_NARROWED",
            "values now restricted to a list".into(),
        ),
        (Some(w), Some(r)) => {
            let lost: Vec<String> = w
                .iter()
                .filter(|v| !r.contains(v))
                .map(Value::to_string)
                .collect();
            if !lost.is_empty() {
                push(
                    out,
                    path,
                    "ENUM_ARRAY_NARROWED",
                    format!("no longer allowed: {}", lost.join(", ")),
                );
            }
        }
    }
}

/// Numeric bounds: a larger lower bound, a smaller upper bound, or a new one narrows.
fn compare_bounds(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Difference>,
) {
    const LOWER: [(&str, &str); 5] = [
        ("minLength", "MIN_LENGTH_INCREASED"),
        ("minimum", "MINIMUM_INCREASED"),
        ("exclusiveMinimum", "EXCLUSIVE_MINIMUM_INCREASED"),
        ("minItems", "MIN_ITEMS_INCREASED"),
        ("minProperties", "MIN_PROPERTIES_INCREASED"),
    ];
    const UPPER: [(&str, &str); 5] = [
        ("maxLength", "MAX_LENGTH_DECREASED"),
        ("maximum", "MAXIMUM_DECREASED"),
        ("exclusiveMaximum", "EXCLUSIVE_MAXIMUM_DECREASED"),
        ("maxItems", "MAX_ITEMS_DECREASED"),
        ("maxProperties", "MAX_PROPERTIES_DECREASED"),
    ];
    let number = |schema: &Map<String, Value>, key: &str| schema.get(key).and_then(Value::as_f64);
    for (bounds, narrower) in [(&LOWER, true), (&UPPER, false)] {
        for (key, kind) in bounds.iter() {
            let (w, r) = (number(writer, key), number(reader, key));
            let narrowed = match (w, r) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(w), Some(r)) => (narrower && r > w) || (!narrower && r < w),
            };
            if narrowed {
                let was = w.map_or("none".to_owned(), |w| w.to_string());
                push(
                    out,
                    path,
                    kind,
                    format!("{key} {was} became {}", r.unwrap_or_default()),
                );
            }
        }
    }
    for (key, kind) in [
        ("pattern", "PATTERN_CHANGED"),
        ("multipleOf", "MULTIPLE_OF_CHANGED"),
        ("format", "FORMAT_CHANGED"),
    ] {
        if let Some(r) = reader.get(key) {
            if writer.get(key) != Some(r) {
                push(out, path, kind, format!("{key} is now {r}"));
            }
        }
    }
    if reader.get("uniqueItems") == Some(&Value::Bool(true))
        && writer.get("uniqueItems") != Some(&Value::Bool(true))
    {
        push(
            out,
            path,
            "UNIQUE_ITEMS_ADDED",
            "items must now be unique".into(),
        );
    }
}

fn compare_object(
    writer: &Map<String, Value>,
    reader: &Map<String, Value>,
    path: &str,
    out: &mut Vec<Difference>,
) {
    let empty = Map::new();
    let properties = |schema: &Map<String, Value>| {
        schema
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let required = |schema: &Map<String, Value>| -> Vec<String> {
        schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The schema other properties must match: `true` when open.
    let additional = |schema: &Map<String, Value>| {
        schema
            .get("additionalProperties")
            .cloned()
            .unwrap_or(Value::Bool(true))
    };
    let (w_props, r_props) = (properties(writer), properties(reader));
    let (w_required, r_required) = (required(writer), required(reader));
    let (w_more, r_more) = (additional(writer), additional(reader));
    for name in &r_required {
        if w_required.contains(name) {
            continue;
        }
        let has_default = r_props
            .get(name)
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("default"));
        let kind = if has_default {
            "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED"
        } else {
            "REQUIRED_PROPERTY_ADDED"
        };
        push(
            out,
            path,
            kind,
            format!(
                "{name:?} is now required{}",
                if has_default {
                    " (its default does not fill it in for validation: documents without it fail)"
                } else {
                    ""
                }
            ),
        );
    }
    for (name, w_schema) in &w_props {
        let child = format!("{path}/properties/{}", pointer_escape(name));
        match r_props.get(name) {
            Some(r_schema) => compare(w_schema, r_schema, &child, out),
            None if r_more == Value::Bool(false) => push(
                out,
                &child,
                "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                format!("{name:?} is gone and other properties are not allowed"),
            ),
            None => compare(w_schema, &r_more, &child, out),
        }
    }
    for (name, r_schema) in &r_props {
        if w_props.contains_key(name) {
            continue;
        }
        // The writer may have written this property with whatever its open content model
        // allowed.
        let child = format!("{path}/properties/{}", pointer_escape(name));
        let before = out.len();
        compare(&w_more, r_schema, &child, out);
        for difference in &mut out[before..] {
            if difference.kind != "NOT_COMPARED" {
                difference.kind = "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL";
            }
        }
    }
    if w_more != r_more {
        let before = out.len();
        compare(
            &w_more,
            &r_more,
            &format!("{path}/additionalProperties"),
            out,
        );
        for difference in &mut out[before..] {
            if difference.kind == "SCHEMA_NARROWED" || r_more == Value::Bool(false) {
                difference.kind = "ADDITIONAL_PROPERTIES_NARROWED";
            }
        }
    }
}

/// A property name as a JSON pointer token.
fn pointer_escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests;
