//! Optional JSON Schema validation of payloads, per (event type, schema version), from a
//! directory of schema files: `<type>.v<version>.json` for a version, `<type>.json` for
//! events without one (or without a versioned file). An event that fails goes to the
//! dead-letter store with the validation errors, never to a sink.

use anyhow::{bail, Context};
use outbox_relay_sinks::Event;
use std::collections::HashMap;
use std::path::Path;

pub struct SchemaRegistry {
    validators: HashMap<(String, Option<i64>), jsonschema::Validator>,
    /// Whether an event type without a schema is refused (dead-lettered).
    required: bool,
}

impl SchemaRegistry {
    /// Compiles every `*.json` schema in `dir`; a bad file is an error that names it.
    pub fn load(dir: &Path, required: bool) -> anyhow::Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read validation.schema_dir {}", dir.display()))?;
        let mut validators = HashMap::new();
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let key = match name.rsplit_once(".v") {
                Some((event_type, version))
                    if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    (event_type.to_owned(), Some(version.parse::<i64>()?))
                }
                _ => (name.to_owned(), None),
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("schema file {} is not JSON", path.display()))?;
            let validator = jsonschema::validator_for(&schema).map_err(|e| {
                anyhow::anyhow!(
                    "schema file {} is not a valid JSON Schema: {e}",
                    path.display()
                )
            })?;
            validators.insert(key, validator);
        }
        if validators.is_empty() {
            bail!(
                "validation.schema_dir {} holds no schema: name files <type>.v<version>.json or <type>.json",
                dir.display()
            );
        }
        Ok(SchemaRegistry {
            validators,
            required,
        })
    }

    /// `Err` with the reason when the event's payload does not match its schema.
    pub fn check(&self, event: &Event) -> Result<(), String> {
        let event_type = event.event_type.to_string();
        let validator = event
            .schema_version
            .and_then(|v| self.validators.get(&(event_type.clone(), Some(v))))
            .or_else(|| self.validators.get(&(event_type, None)));
        let Some(validator) = validator else {
            return if self.required {
                Err(format!(
                    "no schema for type {:?} version {:?} and validation.required = true",
                    &*event.event_type, event.schema_version
                ))
            } else {
                Ok(())
            };
        };
        let payload: serde_json::Value = serde_json::from_str(&event.payload)
            .map_err(|e| format!("payload is not JSON: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&payload)
            .take(5)
            .map(|e| format!("{} at {}", e, e.instance_path()))
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
}
