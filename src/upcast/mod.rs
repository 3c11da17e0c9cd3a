//! Upcasters: per event type, jq programs that turn a payload of version N into version
//! N+1 (`[upcast.<type>.<N>] to = N+1, program = '…'`), run in-process with jaq (a Rust jq;
//! no subprocess), chained from a version to a later one.
//!
//! Inside the stream the chains run in a helper process ([`sandbox`]) and each sink
//! publishes at the version its `[sinks.NAME.upcast]` asks ([`publish`]).
//!
//! Invariants:
//! - Every program compiles when the configuration loads; a step goes to a later version.
//! - A step must produce exactly one JSON value: none, several, or a jq error is a failure
//!   whose reason names the type and the versions, never the payload's values (a jq error
//!   can quote them).

use anyhow::bail;
use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Native, RcIter};
use jaq_json::Val;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub mod publish;
pub mod sandbox;

/// `[upcast.<type>.<version>]`: the step from that version.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpcastStep {
    /// The version the program's output is.
    pub to: i64,
    /// A jq program from a payload of the step's version to one of `to`.
    pub program: String,
}

/// `[upcast]`: by event type, then by the version a step starts from (as the TOML key).
pub type Programs = BTreeMap<String, BTreeMap<String, UpcastStep>>;

type Filter = jaq_core::Filter<Native<Val>>;

/// One compiled step.
struct Step {
    to: i64,
    filter: Filter,
}

/// Every configured upcaster, compiled.
#[derive(Default)]
pub struct Upcasters {
    /// By event type, then by the version the step starts from.
    steps: BTreeMap<String, BTreeMap<i64, Step>>,
}

/// Compiles one jq program; the error says what does not parse or is not defined.
fn compile(program: &str) -> Result<Filter, String> {
    let loader = Loader::new(jaq_std::defs().chain(jaq_json::defs()));
    let arena = Arena::default();
    let modules = loader
        .load(
            &arena,
            File {
                code: program,
                path: (),
            },
        )
        .map_err(|errors| format!("it does not parse ({} error(s))", errors.len()))?;
    Compiler::default()
        .with_funs(jaq_std::funs().chain(jaq_json::funs()))
        .compile(modules)
        .map_err(|errors| {
            let names: Vec<String> = errors
                .into_iter()
                .flat_map(|(_, undefined)| undefined.into_iter().map(|(name, _)| name.to_string()))
                .collect();
            format!("it names what jq does not define: {}", names.join(", "))
        })
}

impl Upcasters {
    /// Compiles `[upcast]` (type → version → step); a program that does not compile or a
    /// step that does not go to a later version is an error naming its key.
    pub fn compile(config: &Programs) -> anyhow::Result<Self> {
        let mut steps: BTreeMap<String, BTreeMap<i64, Step>> = BTreeMap::new();
        for (event_type, versions) in config {
            for (from, step) in versions {
                let key = format!("upcast.{event_type}.{from}");
                let Ok(from) = from.parse::<i64>() else {
                    bail!("{key}: the version must be a number, as in [upcast.{event_type}.1]");
                };
                if step.to <= from {
                    bail!(
                        "{key}: to = {} must be a later version than {from}",
                        step.to
                    );
                }
                let filter = compile(&step.program)
                    .map_err(|problem| anyhow::anyhow!("{key}.program: {problem}"))?;
                steps.entry(event_type.clone()).or_default().insert(
                    from,
                    Step {
                        to: step.to,
                        filter,
                    },
                );
            }
        }
        Ok(Upcasters { steps })
    }

    /// Every step: event type, the version it starts from, the version it goes to.
    pub fn steps(&self) -> impl Iterator<Item = (&str, i64, i64)> {
        self.steps.iter().flat_map(|(event_type, steps)| {
            steps
                .iter()
                .map(move |(from, step)| (event_type.as_str(), *from, step.to))
        })
    }

    /// The latest version the chain from `from` reaches for `event_type`.
    pub fn latest(&self, event_type: &str, from: i64) -> i64 {
        let mut version = from;
        while let Some(step) = self.steps.get(event_type).and_then(|s| s.get(&version)) {
            version = step.to;
        }
        version
    }

    /// The version a sink with `rule` publishes an event of `event_type` stored at `stored`
    /// at: the pinned or latest version when the rule asks for a later one, else `stored`
    /// (there is no downcasting).
    pub fn published_version(
        &self,
        rule: &outbox_relay_sinks::UpcastRule,
        event_type: &str,
        stored: i64,
    ) -> i64 {
        rule.target(event_type, || self.latest(event_type, stored))
            .map_or(stored, |target| target.max(stored))
    }

    /// Runs the chain from version `from` up to `to` (the latest when `None`); the payload
    /// and its version. Stops where the chain would pass `to`.
    pub fn upcast(
        &self,
        event_type: &str,
        from: i64,
        to: Option<i64>,
        mut payload: serde_json::Value,
    ) -> Result<(serde_json::Value, i64), String> {
        let target = to.unwrap_or_else(|| self.latest(event_type, from));
        let mut version = from;
        while version < target {
            let Some(step) = self.steps.get(event_type).and_then(|s| s.get(&version)) else {
                return Err(format!(
                    "no upcaster for {event_type} from version {version}: add \
                     [upcast.{event_type}.{version}]"
                ));
            };
            if step.to > target {
                return Err(format!(
                    "the upcasters of {event_type} go from version {version} to {}, past {target}",
                    step.to
                ));
            }
            payload = run(&step.filter, payload).map_err(|problem| {
                format!(
                    "the upcaster of {event_type} from version {version} to {} {problem}",
                    step.to
                )
            })?;
            version = step.to;
        }
        Ok((payload, version))
    }
}

/// Runs one step: exactly one output is the result.
fn run(filter: &Filter, payload: serde_json::Value) -> Result<serde_json::Value, String> {
    let inputs = RcIter::new(core::iter::empty());
    let mut outputs = filter.run((Ctx::new([], &inputs), Val::from(payload)));
    let first = match outputs.next() {
        None => return Err("produced no value".into()),
        Some(Err(_)) => return Err("failed (a jq error)".into()),
        Some(Ok(value)) => value,
    };
    if outputs.next().is_some() {
        return Err("produced more than one value".into());
    }
    Ok(first.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn upcasters(steps: &[(&str, &str, i64, &str)]) -> anyhow::Result<Upcasters> {
        let mut config: BTreeMap<String, BTreeMap<String, UpcastStep>> = BTreeMap::new();
        for (event_type, from, to, program) in steps {
            config.entry((*event_type).into()).or_default().insert(
                (*from).into(),
                UpcastStep {
                    to: *to,
                    program: (*program).into(),
                },
            );
        }
        Upcasters::compile(&config)
    }

    #[test]
    fn a_chain_runs_step_by_step_up_to_the_latest_or_the_pinned_version() {
        let u = upcasters(&[
            (
                "OrderPlaced",
                "1",
                2,
                r#"{totalAmount: .amount, currency: "USD", items: []} + del(.amount)"#,
            ),
            ("OrderPlaced", "2", 3, r#". + {channel: "web"}"#),
        ])
        .unwrap();
        let v1 = json!({"amount": 12, "id": "o-1"});
        let (v3, version) = u.upcast("OrderPlaced", 1, None, v1.clone()).unwrap();
        assert_eq!(version, 3);
        assert_eq!(
            v3,
            json!({"id": "o-1", "totalAmount": 12, "currency": "USD", "items": [], "channel": "web"})
        );
        let (v2, version) = u.upcast("OrderPlaced", 1, Some(2), v1.clone()).unwrap();
        assert_eq!((version, v2["channel"].clone()), (2, json!(null)));
        assert_eq!(
            u.upcast("OrderPlaced", 3, None, v3.clone()).unwrap(),
            (v3, 3)
        );
        assert_eq!(u.latest("Unknown", 4), 4);
        let err = u.upcast("OrderPlaced", 1, Some(5), v1).unwrap_err();
        assert!(
            err.contains("no upcaster for OrderPlaced from version 3"),
            "{err}"
        );
    }

    #[test]
    fn a_step_must_give_exactly_one_value_and_errors_do_not_quote_the_payload() {
        let u = upcasters(&[
            ("None", "1", 2, "empty"),
            ("Two", "1", 2, ".a, .b"),
            ("Fails", "1", 2, r#".secret | error"#),
        ])
        .unwrap();
        let payload = json!({"a": 1, "b": 2, "secret": "hunter2"});
        let err = u.upcast("None", 1, None, payload.clone()).unwrap_err();
        assert!(err.ends_with("produced no value"), "{err}");
        let err = u.upcast("Two", 1, None, payload.clone()).unwrap_err();
        assert!(err.ends_with("produced more than one value"), "{err}");
        let err = u.upcast("Fails", 1, None, payload).unwrap_err();
        assert!(
            err.contains("failed (a jq error)") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn programs_and_steps_are_checked_when_the_configuration_loads() {
        let err = upcasters(&[("T", "1", 2, "{a: ")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("upcast.T.1.program: it does not parse"),
            "{err}"
        );
        let err = upcasters(&[("T", "1", 2, "nosuchfunction(1)")])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("nosuchfunction"), "{err}");
        let err = upcasters(&[("T", "2", 2, ".")]).err().unwrap().to_string();
        assert!(err.contains("must be a later version than 2"), "{err}");
        let err = upcasters(&[("T", "one", 2, ".")])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("the version must be a number"), "{err}");
    }
}
