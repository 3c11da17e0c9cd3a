//! Optional JSON Schema validation of payloads, per (event type, schema version), from a
//! directory of schema files: `<type>.v<version>.json` for a version, `<type>.json` for
//! events without one (or without a versioned file). An event that fails goes to the
//! dead-letter store with the validation errors, never to a sink.
//!
//! Every payload PostgreSQL accepted is validated, not refused as "not JSON": one nested
//! deeper than serde_json's default limit (128) is parsed without the limit, on a thread of
//! its own with a large stack ([`DEEP_STACK`]), where it is validated and dropped too; a
//! number beyond f64's range (`1e400`, which `jsonb` keeps) is validated as ±f64::MAX, the
//! nearest value the validator can hold. Payloads that parse within the defaults (nearly
//! all) take neither detour. A payload that is not JSON (bytes from a `bytea` column, or a
//! tombstone) is not validated.

use anyhow::{bail, Context};
use outbox_relay_sinks::Event;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The stack of the thread that parses and validates a payload nested deeper than
/// serde_json's default limit. PostgreSQL's own parser bounds the depth by its stack
/// (`max_stack_depth`, a few MB); this leaves a wide margin. Only touched pages are used.
const DEEP_STACK: usize = 256 * 1024 * 1024;

/// The event type and version a schema file is for, from its name; `None` for a file that
/// is not `*.json`.
pub fn schema_key(file_name: &str) -> Option<(String, Option<i64>)> {
    let name = file_name.strip_suffix(".json")?;
    let versioned = name.rsplit_once(".v").and_then(|(event_type, version)| {
        let digits = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
        digits
            .then(|| version.parse::<i64>().ok())
            .flatten()
            .map(|v| (event_type, v))
    });
    Some(match versioned {
        Some((event_type, version)) => (event_type.to_owned(), Some(version)),
        None => (name.to_owned(), None),
    })
}

/// One schema file of the schema directory, read and parsed.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    pub event_type: String,
    /// `None` for `<type>.json` (any version).
    pub version: Option<i64>,
    pub path: PathBuf,
    pub schema: serde_json::Value,
}

/// Every `*.json` schema file of `dir`, parsed, by type then version: the one reader of
/// the schema directory (validation, `schemas check`, the catalog).
pub fn read_schema_files(dir: &Path) -> anyhow::Result<Vec<SchemaFile>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read schema directory {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some((event_type, version)) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(schema_key)
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let schema = serde_json::from_str(&text)
            .with_context(|| format!("schema file {} is not JSON", path.display()))?;
        files.push(SchemaFile {
            event_type,
            version,
            path,
            schema,
        });
    }
    files.sort_by(|a, b| (&a.event_type, a.version).cmp(&(&b.event_type, b.version)));
    Ok(files)
}

pub struct SchemaRegistry {
    validators: HashMap<(String, Option<i64>), jsonschema::Validator>,
    /// Whether an event type without a schema is refused (dead-lettered).
    required: bool,
}

impl SchemaRegistry {
    /// Compiles every `*.json` schema in `dir`; a bad file is an error that names it.
    pub fn load(dir: &Path, required: bool) -> anyhow::Result<Self> {
        let files = read_schema_files(dir)?;
        if files.is_empty() {
            bail!(
                "validation.schema_dir {} holds no schema: name files <type>.v<version>.json or <type>.json",
                dir.display()
            );
        }
        Self::compile(&files, required)
    }

    /// Compiles schema files already read.
    pub fn compile(files: &[SchemaFile], required: bool) -> anyhow::Result<Self> {
        let mut validators = HashMap::new();
        for file in files {
            let validator = jsonschema::validator_for(&file.schema).map_err(|e| {
                anyhow::anyhow!(
                    "schema file {} is not a valid JSON Schema: {e}",
                    file.path.display()
                )
            })?;
            validators.insert((file.event_type.clone(), file.version), validator);
        }
        Ok(SchemaRegistry {
            validators,
            required,
        })
    }

    /// Whether a schema covers events of `event_type` at `schema_version` (a versioned
    /// file, or the type's unversioned one).
    pub fn covers(&self, event_type: &str, schema_version: Option<i64>) -> bool {
        let key = |version| (event_type.to_owned(), version);
        schema_version.is_some_and(|v| self.validators.contains_key(&key(Some(v))))
            || self.validators.contains_key(&key(None))
    }

    /// `Err` with the reason when the event's payload does not match its schema. An event
    /// without a JSON payload (bytes from a `bytea` column, or a tombstone) has nothing to
    /// validate: JSON Schemas describe JSON.
    pub fn check(&self, event: &Event) -> Result<(), String> {
        self.check_payload(
            &event.event_type,
            event.schema_version,
            event.payload.as_json().map(|text| &**text),
        )
    }

    /// [`SchemaRegistry::check`] on an event's parts: its type, schema version and JSON
    /// payload (None for bytes or a tombstone).
    pub fn check_payload(
        &self,
        event_type: &str,
        schema_version: Option<i64>,
        payload: Option<&str>,
    ) -> Result<(), String> {
        let Some(payload) = payload else {
            return Ok(());
        };
        let validator = schema_version
            .and_then(|v| self.validators.get(&(event_type.to_owned(), Some(v))))
            .or_else(|| self.validators.get(&(event_type.to_owned(), None)));
        let Some(validator) = validator else {
            return if self.required {
                Err(format!(
                    "no schema for type {event_type:?} version {schema_version:?} and validation.required = true"
                ))
            } else {
                Ok(())
            };
        };
        match serde_json::from_str::<serde_json::Value>(payload) {
            Ok(payload) => conforms(validator, &payload),
            Err(_) => std::thread::scope(|scope| {
                std::thread::Builder::new()
                    .name("deep-payload".into())
                    .stack_size(DEEP_STACK)
                    .spawn_scoped(scope, || {
                        let payload = parse_unbounded(payload)
                            .map_err(|e| format!("payload is not JSON: {e}"))?;
                        conforms(validator, &payload)
                    })
                    .map_err(|e| format!("cannot start a thread to validate a deep payload: {e}"))?
                    .join()
                    .unwrap_or_else(|_| Err("validating the payload panicked".to_owned()))
            }),
        }
    }
}

/// `Err` with the first validation errors when `payload` does not match: each says where
/// (the JSON pointer into the payload) and which keyword of the schema failed, with the
/// payload's value masked (`value is not of type "integer"`), not quoted.
fn conforms(validator: &jsonschema::Validator, payload: &serde_json::Value) -> Result<(), String> {
    let errors: Vec<String> = validator
        .iter_errors(payload)
        .take(5)
        .map(|e| {
            format!(
                "{} at {:?} (keyword {} at {})",
                e.masked(),
                e.instance_path().as_str(),
                e.kind().keyword(),
                e.schema_path()
            )
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "payload fails its JSON Schema: {}",
            errors.join("; ")
        ))
    }
}

/// Parses JSON at any depth, numbers beyond f64's range clamped to ±f64::MAX. Recursive:
/// run it on a stack as deep as the document (see [`DEEP_STACK`]).
fn parse_unbounded(text: &str) -> serde_json::Result<serde_json::Value> {
    let text = clamp_huge_numbers(text);
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    deserializer.disable_recursion_limit();
    let value = serde_json::Value::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// `text` with every number outside strings whose f64 value is infinite (`1e400`) replaced
/// by ±f64::MAX, which serde_json can hold; borrowed when there is none.
fn clamp_huge_numbers(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut copied = 0;
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 2,
            b'"' => {
                in_string = !in_string;
                i += 1;
            }
            b'-' | b'0'..=b'9' if !in_string => {
                let start = i;
                i += 1;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                let number = &text[start..i];
                if number.parse::<f64>().is_ok_and(f64::is_infinite) {
                    out.push_str(&text[copied..start]);
                    out.push_str(if number.starts_with('-') {
                        "-1.7976931348623157e308"
                    } else {
                        "1.7976931348623157e308"
                    });
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    if copied == 0 {
        Cow::Borrowed(text)
    } else {
        out.push_str(&text[copied..]);
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_relay_sinks::test_util::sample;
    use outbox_relay_sinks::Text;

    /// An event of type `T` (the schema the tests write) carrying `payload`.
    fn event(payload: &str) -> Event {
        Event {
            event_type: Text::from("T"),
            payload: Text::from(payload).into(),
            ..sample(0, 0)
        }
    }

    fn registry(schema: &str) -> (tempfile::TempDir, SchemaRegistry) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("T.json"), schema).unwrap();
        let registry = SchemaRegistry::load(dir.path(), true).unwrap();
        (dir, registry)
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn deep_payloads_and_numbers_beyond_f64_are_validated_not_refused() {
        let (_dir, any_array) = registry(r#"{"type": "array"}"#);
        for payload in [
            nested(200),
            nested(20_000),
            "[1e400]".to_owned(),
            format!("[-1{}]", "0".repeat(400)),
            format!("[{{\"s\": \"1e400 \\\" 2e400\"}}, {}]", nested(300)),
        ] {
            assert_eq!(
                any_array.check(&event(&payload)),
                Ok(()),
                "{}",
                &payload[..40.min(payload.len())]
            );
        }
        let (_dir, object) = registry(r#"{"type": "object"}"#);
        assert!(object
            .check(&event(&nested(200)))
            .unwrap_err()
            .contains("fails its JSON Schema"));
        let (_dir, small) = registry(r#"{"type": "array", "items": {"maximum": 1e300}}"#);
        assert!(small.check(&event("[1e400]")).is_err());
        assert!(small.check(&event("[1e299]")).is_ok());
    }

    #[test]
    fn a_failure_names_where_and_which_keyword_not_the_value() {
        let (_dir, registry) = registry(
            r#"{"type": "object", "properties": {"amount": {"type": "integer"}, "code": {"pattern": "^[a-z]+$"}}}"#,
        );
        let reason = registry
            .check(&event(r#"{"amount": "SECRET1", "code": "SECRET2"}"#))
            .unwrap_err();
        assert!(!reason.contains("SECRET"), "{reason}");
        assert!(
            reason.contains(r#"at "/amount" (keyword type at /properties/amount/type)"#),
            "{reason}"
        );
        assert!(
            reason.contains(r#"at "/code" (keyword pattern"#),
            "{reason}"
        );
    }

    #[test]
    fn bytes_and_tombstones_are_not_validated() {
        let (_dir, object) = registry(r#"{"type": "object"}"#);
        let mut binary = event("[]");
        assert!(object.check(&binary).is_err());
        binary.payload = outbox_relay_sinks::Payload::Binary {
            bytes: bytes::Bytes::from_static(b"[]"),
            content_type: "application/avro".into(),
        };
        assert_eq!(object.check(&binary), Ok(()));
        binary.payload = outbox_relay_sinks::Payload::Tombstone;
        assert_eq!(object.check(&binary), Ok(()));
    }

    #[test]
    fn huge_numbers_are_clamped_outside_strings_only() {
        assert_eq!(
            clamp_huge_numbers(r#"{"a\"1e400": 1e400, "b": -2E+999, "c": 1.5}"#),
            r#"{"a\"1e400": 1.7976931348623157e308, "b": -1.7976931348623157e308, "c": 1.5}"#
        );
        assert!(matches!(clamp_huge_numbers("[1, 2e10]"), Cow::Borrowed(_)));
    }
}
