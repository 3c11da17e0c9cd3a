//! The corpus of schema pairs: one per rule, each with what BACKWARD (`narrowings(old,
//! new)`) and FORWARD (`narrowings(new, old)`) find.

use super::*;
use serde_json::json;

fn kinds(writer: &Value, reader: &Value) -> Vec<&'static str> {
    narrowings(writer, reader)
        .into_iter()
        .map(|d| d.kind)
        .collect()
}

/// A rule, the old and new schema, and what BACKWARD and FORWARD find.
type Case = (
    &'static str,
    Value,
    Value,
    Vec<&'static str>,
    Vec<&'static str>,
);

fn corpus() -> Vec<Case> {
    let object = |properties: Value, required: Value| json!({"type": "object", "properties": properties, "required": required});
    vec![
        (
            "identical",
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            vec![],
            vec![],
        ),
        (
            "optional property added to an open content model",
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            object(
                json!({"id": {"type": "string"}, "note": {"type": "string"}}),
                json!(["id"]),
            ),
            vec!["PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL"],
            vec![],
        ),
        (
            "required property added without default",
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            object(
                json!({"id": {"type": "string"}, "currency": {"type": "string"}}),
                json!(["id", "currency"]),
            ),
            vec![
                "REQUIRED_PROPERTY_ADDED",
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
            ],
            vec![],
        ),
        (
            "required property added with a default",
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            object(
                json!({"id": {"type": "string"}, "currency": {"type": "string", "default": "USD"}}),
                json!(["id", "currency"]),
            ),
            vec![
                "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED",
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
            ],
            vec![],
        ),
        (
            "required property removed",
            object(
                json!({"id": {"type": "string"}, "amount": {"type": "number"}}),
                json!(["id", "amount"]),
            ),
            object(json!({"id": {"type": "string"}}), json!(["id"])),
            vec![],
            vec![
                "REQUIRED_PROPERTY_ADDED",
                "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
            ],
        ),
        (
            "property removed from a closed content model",
            json!({"type": "object", "properties": {"a": {}, "b": {}}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}),
            vec!["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
            vec![],
        ),
        (
            "content model closed",
            json!({"type": "object", "properties": {"a": {}}}),
            json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}),
            vec!["ADDITIONAL_PROPERTIES_NARROWED"],
            vec![],
        ),
        (
            "type narrowed: number to integer",
            object(json!({"amount": {"type": "number"}}), json!([])),
            object(json!({"amount": {"type": "integer"}}), json!([])),
            vec!["TYPE_NARROWED"],
            vec![],
        ),
        (
            "type changed: string to number",
            object(json!({"amount": {"type": "string"}}), json!([])),
            object(json!({"amount": {"type": "number"}}), json!([])),
            vec!["TYPE_CHANGED"],
            vec!["TYPE_CHANGED"],
        ),
        (
            "type widened: a union",
            object(json!({"amount": {"type": "string"}}), json!([])),
            object(json!({"amount": {"type": ["string", "null"]}}), json!([])),
            vec![],
            vec!["TYPE_NARROWED"],
        ),
        (
            "enum narrowed",
            object(
                json!({"state": {"enum": ["new", "paid", "sent"]}}),
                json!([]),
            ),
            object(json!({"state": {"enum": ["new", "paid"]}}), json!([])),
            vec!["ENUM_ARRAY_NARROWED"],
            vec![],
        ),
        (
            "maximum decreased, maxLength decreased",
            object(
                json!({"n": {"type": "integer", "maximum": 10}, "s": {"type": "string", "maxLength": 20}}),
                json!([]),
            ),
            object(
                json!({"n": {"type": "integer", "maximum": 5}, "s": {"type": "string", "maxLength": 10}}),
                json!([]),
            ),
            vec!["MAXIMUM_DECREASED", "MAX_LENGTH_DECREASED"],
            vec![],
        ),
        (
            "minimum added",
            object(json!({"n": {"type": "integer"}}), json!([])),
            object(json!({"n": {"type": "integer", "minimum": 0}}), json!([])),
            vec!["MINIMUM_INCREASED"],
            vec![],
        ),
        (
            "pattern added",
            object(json!({"s": {"type": "string"}}), json!([])),
            object(
                json!({"s": {"type": "string", "pattern": "^[A-Z]{3}$"}}),
                json!([]),
            ),
            vec!["PATTERN_CHANGED"],
            vec![],
        ),
        (
            "nested: array items narrowed",
            object(
                json!({"items": {"type": "array", "items": {"type": "number"}}}),
                json!([]),
            ),
            object(
                json!({"items": {"type": "array", "items": {"type": "integer"}, "maxItems": 5}}),
                json!([]),
            ),
            vec!["TYPE_NARROWED", "MAX_ITEMS_DECREASED"],
            vec![],
        ),
        (
            "a keyword not compared",
            object(json!({"p": {"oneOf": [{"type": "string"}]}}), json!([])),
            object(
                json!({"p": {"oneOf": [{"type": "string"}, {"type": "null"}]}}),
                json!([]),
            ),
            vec!["NOT_COMPARED"],
            vec!["NOT_COMPARED"],
        ),
    ]
}

#[test]
fn each_rule_of_the_corpus_is_found_in_the_right_direction() {
    for (rule, old, new, backward, forward) in corpus() {
        let mut found = kinds(&old, &new);
        let mut expected = backward.clone();
        found.sort_unstable();
        expected.sort_unstable();
        assert_eq!(found, expected, "{rule}: backward");
        let mut found = kinds(&new, &old);
        let mut expected = forward.clone();
        found.sort_unstable();
        expected.sort_unstable();
        assert_eq!(found, expected, "{rule}: forward");
    }
}

#[test]
fn differences_say_where() {
    let old = json!({"type": "object", "properties": {"a/b": {"type": "number"}}});
    let new = json!({"type": "object", "properties": {"a/b": {"type": "integer"}}});
    let found = narrowings(&old, &new);
    assert_eq!(found[0].path, "/properties/a~1b");
    assert_eq!(found[0].detail, "type number became integer");
}
