//! The schema directory as a whole (`validation.schema_dir`): how its files are named,
//! `outbox-relay schemas check`, which tells producers' teams when a new version of an
//! event's schema would break its consumers, and the event catalog ([`catalog`]).
//!
//! Files are `<type>.v<version>.json` (one per version) or `<type>.json` (any version).
//! For every type with several versions, each version is compared with the one before it
//! ([`compat`]): BACKWARD (consumers on the new version read old events), FORWARD (consumers
//! still on the old version read new events), FULL (both).

pub mod catalog;
pub mod compat;

use anyhow::bail;
use compat::{narrowings, Difference};
use std::collections::BTreeMap;
use std::path::Path;

pub use crate::validation::{read_schema_files, schema_key, SchemaFile};

/// Which directions a new version must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compatibility {
    /// Consumers on the new version can read events of the previous one.
    Backward,
    /// Consumers on the previous version can read events of the new one.
    Forward,
    /// Both.
    Full,
}

/// Differences Confluent's rules accept: reported, not a break.
const ACCEPTED: [&str; 1] = ["REQUIRED_PROPERTY_WITH_DEFAULT_ADDED"];

/// One version compared with the one before it.
#[derive(Debug)]
pub struct Step {
    pub event_type: String,
    pub from: i64,
    pub to: i64,
    /// Ways the new version accepts less than the old one (breaks BACKWARD).
    pub backward: Vec<Difference>,
    /// Ways the old version accepts less than the new one (breaks FORWARD).
    pub forward: Vec<Difference>,
}

impl Step {
    fn breaks(differences: &[Difference]) -> bool {
        differences.iter().any(|d| !ACCEPTED.contains(&d.kind))
    }

    /// Whether this step keeps `level`.
    pub fn keeps(&self, level: Compatibility) -> bool {
        let backward = !Self::breaks(&self.backward);
        let forward = !Self::breaks(&self.forward);
        match level {
            Compatibility::Backward => backward,
            Compatibility::Forward => forward,
            Compatibility::Full => backward && forward,
        }
    }
}

/// Compares every version of every type with the version before it; `dir` names the
/// directory `files` come from, for the message when none is versioned.
pub fn check_files(dir: &Path, files: &[SchemaFile]) -> anyhow::Result<Vec<Step>> {
    let mut versions: BTreeMap<&str, BTreeMap<i64, &serde_json::Value>> = BTreeMap::new();
    for file in files {
        if let Some(version) = file.version {
            versions
                .entry(&file.event_type)
                .or_default()
                .insert(version, &file.schema);
        }
    }
    if versions.is_empty() {
        bail!(
            "{} holds no versioned schema: name files <type>.v<version>.json",
            dir.display()
        );
    }
    let mut steps = Vec::new();
    for (event_type, schemas) in versions {
        let ordered: Vec<(&i64, &&serde_json::Value)> = schemas.iter().collect();
        for pair in ordered.windows(2) {
            let ((from, old), (to, new)) = (pair[0], pair[1]);
            steps.push(Step {
                event_type: event_type.to_owned(),
                from: *from,
                to: *to,
                backward: narrowings(old, new),
                forward: narrowings(new, old),
            });
        }
    }
    Ok(steps)
}

/// The report `schemas check` prints: one line per step, then one per difference.
pub fn report(steps: &[Step], level: Compatibility) -> String {
    let mut out = String::new();
    let verdict = |differences: &[Difference]| match Step::breaks(differences) {
        true => "broken",
        false => "ok",
    };
    for step in steps {
        out.push_str(&format!(
            "{} v{} -> v{}: BACKWARD {}, FORWARD {}{}\n",
            step.event_type,
            step.from,
            step.to,
            verdict(&step.backward),
            verdict(&step.forward),
            if step.keeps(level) {
                ""
            } else {
                "  <- breaks the required compatibility"
            }
        ));
        for (direction, differences) in [("backward", &step.backward), ("forward", &step.forward)] {
            for d in differences {
                let path = if d.path.is_empty() { "/" } else { &d.path };
                out.push_str(&format!(
                    "  {direction}: {path}: {} ({})\n",
                    d.detail, d.kind
                ));
            }
        }
    }
    if steps.is_empty() {
        out.push_str("no event type has two versions yet: nothing to compare\n");
    }
    out
}

/// Runs every upcaster on the `examples` of the schema of the version it starts from and
/// validates each result against the schema of the version it goes to: that consumers of
/// the new version can read old events once upcast. One line per example; `false` when one
/// fails.
pub fn check_upcasters(
    files: &[SchemaFile],
    upcasters: &crate::upcast::Upcasters,
) -> anyhow::Result<(String, bool)> {
    let registry = crate::validation::SchemaRegistry::compile(files, false)?;
    let mut out = String::new();
    let mut passed = true;
    for (event_type, from, to) in upcasters.steps() {
        let source = files
            .iter()
            .find(|f| f.event_type == event_type && f.version == Some(from));
        let examples = source
            .and_then(|f| f.schema.get("examples"))
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        if examples.is_empty() {
            out.push_str(&format!(
                "{event_type} v{from} -> v{to} upcaster: no examples in {event_type}.v{from}.json \
                 to try it on\n"
            ));
            continue;
        }
        for (n, example) in examples.into_iter().enumerate() {
            let verdict = upcasters
                .upcast(event_type, from, Some(to), example)
                .and_then(|(payload, version)| {
                    registry.check_payload(event_type, Some(version), Some(&payload.to_string()))
                });
            let line = match verdict {
                Ok(()) => "validates".to_owned(),
                Err(reason) => {
                    passed = false;
                    format!("fails: {reason}")
                }
            };
            out.push_str(&format!(
                "{event_type} v{from} -> v{to} upcaster, example {}: {line}\n",
                n + 1
            ));
        }
    }
    Ok((out, passed))
}
