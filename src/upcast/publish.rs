//! One sink's view of a batch: its events at the versions the sink publishes
//! (`[sinks.NAME.upcast]`: as stored, the latest, or pinned per type), upcast in the
//! [`Sandbox`], validated against the target version's schema when validation is on.
//!
//! Invariants:
//! - Only the events the sink takes (its match rule) are upcast; the others pass unchanged
//!   for the sink's own filter to drop.
//! - An event that cannot be upcast (the program fails, runs out of time or memory, or its
//!   result fails the target schema) is a dead letter for this sink, with the reason; the
//!   batch goes on without it. Never a stall, never a silent drop.
//! - A step that ran out of time or memory is not run again in this process: its later
//!   events are dead-lettered at once, naming the first (a program that loops on one input
//!   would otherwise cost `relay.upcast_timeout` per event).
//! - An upcast event keeps its id and position; its `schema_version` is the published
//!   version and `original_schema_version` the stored one.

use super::sandbox::{Job, Limits, Outcome, Sandbox};
use super::{Programs, Upcasters};
use crate::validation::SchemaRegistry;
use outbox_relay_sinks::routing::EventFilter;
use outbox_relay_sinks::{Backoff, Event, Payload, SinkConfig, Text, UpcastRule};
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, warn};

/// The dead-letter kind of an event that could not be upcast for a sink.
pub const UPCAST_FAILED: &str = "upcast failed";

/// Upcasts a sink's events to the versions it publishes.
pub struct SinkVersions {
    sink: String,
    rule: UpcastRule,
    filter: EventFilter,
    upcasters: Arc<Upcasters>,
    schemas: Option<Arc<SchemaRegistry>>,
    sandbox: Sandbox,
    /// Steps (type, version upcast from) that ran out of time or memory, and why. Usually
    /// empty.
    broken: Vec<(String, i64, String)>,
}

/// A batch as the sink publishes it.
pub struct Published {
    /// The events to send, in order.
    pub events: Vec<Event>,
    /// The events that could not be upcast, by index in the batch given, and why: dead
    /// letters for the sink, of kind [`UPCAST_FAILED`].
    pub failed: Vec<(usize, String)>,
}

impl SinkVersions {
    /// The view of sink `sink`, configured by `config`; `None` when it publishes every
    /// event as stored. `programs` is `[upcast]`, which `upcasters` compiles.
    pub fn for_sink(
        sink: &str,
        config: &SinkConfig,
        programs: &Programs,
        limits: Limits,
        upcasters: &Arc<Upcasters>,
        schemas: Option<&Arc<SchemaRegistry>>,
    ) -> anyhow::Result<Option<Self>> {
        let rule = config.upcast();
        if rule.is_stored() {
            return Ok(None);
        }
        let exe = std::env::current_exe().map_err(|e| {
            anyhow::anyhow!(
                "sink {sink} upcasts events, which runs this binary again, but its path is \
                 unknown: {e}"
            )
        })?;
        Ok(Some(SinkVersions {
            sink: sink.to_owned(),
            rule: rule.clone(),
            filter: config.filter().event_filter().for_sink(sink),
            upcasters: upcasters.clone(),
            schemas: schemas.cloned(),
            sandbox: Sandbox::new(exe, programs, limits),
            broken: Vec::new(),
        }))
    }

    /// The version `event` is published at, when that is a later one than stored.
    fn target(&self, event: &Event) -> Option<i64> {
        let from = event.schema_version?;
        event.payload.as_json()?;
        if !self.filter.matches(event) {
            return None;
        }
        let target = self
            .upcasters
            .published_version(&self.rule, &event.event_type, from);
        (target > from).then_some(target)
    }

    /// `events` at the sink's versions; `None` when every one is published as stored.
    pub async fn apply(&mut self, events: &[Event]) -> Option<Published> {
        let targets: Vec<(usize, i64)> = events
            .iter()
            .enumerate()
            .filter_map(|(index, event)| self.target(event).map(|to| (index, to)))
            .collect();
        if targets.is_empty() {
            return None;
        }
        let mut results: Vec<Result<String, String>> = Vec::with_capacity(targets.len());
        while results.len() < targets.len() {
            let jobs: Vec<Job<'_>> = targets[results.len()..]
                .iter()
                .map(|&(index, to)| job(&events[index], to))
                .take_while(|job| self.broken(job).is_none())
                .collect();
            if jobs.is_empty() {
                let (index, to) = targets[results.len()];
                let why = self
                    .broken(&job(&events[index], to))
                    .expect("a broken step");
                results.push(Err(why.to_owned()));
                continue;
            }
            for outcome in self.run(&jobs).await {
                let event = &events[targets[results.len()].0];
                results.push(self.settle(outcome, event));
            }
        }
        let mut published = Published {
            events: Vec::with_capacity(events.len()),
            failed: Vec::new(),
        };
        let mut results = targets.iter().zip(results).peekable();
        for (index, event) in events.iter().enumerate() {
            let Some(((_, to), result)) = results.next_if(|((at, _), _)| *at == index) else {
                published.events.push(event.clone());
                continue;
            };
            match result.and_then(|payload| self.validated(event, *to, payload)) {
                Ok(upcast) => published.events.push(upcast),
                Err(reason) => published.failed.push((index, reason)),
            }
        }
        Some(published)
    }

    /// Why the step `job` starts with is not run, when it broke earlier.
    fn broken(&self, job: &Job<'_>) -> Option<&str> {
        self.broken
            .iter()
            .find(|(event_type, from, _)| event_type == job.event_type && *from == job.from)
            .map(|(_, _, why)| why.as_str())
    }

    /// Runs `jobs` in the sandbox; waits and tries again while no helper process starts
    /// (the fault is the machine's, not the events').
    async fn run(&mut self, jobs: &[Job<'_>]) -> Vec<Outcome> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            match self.sandbox.run(jobs).await {
                Ok(outcomes) => return outcomes,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(sink = %self.sink, error = %e, retry_in = ?delay,
                        "cannot start the upcaster process; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// An outcome as a result; a step that ran out of time or memory is marked broken.
    fn settle(&mut self, outcome: Outcome, event: &Event) -> Result<String, String> {
        let from = event.schema_version.expect("targets have a version");
        let step = format!("the upcaster of {} from version {from}", event.event_type);
        let why = match outcome {
            Outcome::Upcast(payload) => return Ok(payload),
            Outcome::Failed(reason) => return Err(reason),
            Outcome::TimedOut => format!(
                "{step} ran longer than relay.upcast_timeout ({})",
                humantime::format_duration(self.sandbox.limits().time)
            ),
            Outcome::Died(how) => format!(
                "{step} ended its process ({how}): it ran out of memory \
                 (relay.upcast_memory_bytes = {}) or stack",
                self.sandbox.limits().memory_bytes
            ),
        };
        error!(sink = %self.sink, position = %event.position, "{why}; the step is not run \
            again until the relay restarts: fix the program, restart, and replay its dead letters");
        self.broken.push((
            event.event_type.to_string(),
            from,
            format!(
                "{why} on the event at {}, so it is not run again until the relay restarts: \
                 fix the program, restart, and replay this dead letter",
                event.position
            ),
        ));
        Err(format!(
            "{why}: fix the program, restart, and replay this dead letter"
        ))
    }

    /// The upcast event, after checking the result against the target version's schema.
    fn validated(&self, event: &Event, to: i64, payload: String) -> Result<Event, String> {
        let from = event.schema_version.expect("targets have a version");
        if let Some(schemas) = &self.schemas {
            if let Err(target) = schemas.check_payload(&event.event_type, Some(to), Some(&payload))
            {
                let stored = if !schemas.covers(&event.event_type, Some(from)) {
                    format!("the stored version {from} has no schema")
                } else {
                    match schemas.check(event) {
                        Ok(()) => format!("the stored version {from} passes its schema"),
                        Err(reason) => format!("the stored version {from}: {reason}"),
                    }
                };
                return Err(format!(
                    "the upcast from version {from} to {to} fails version {to}'s schema: \
                     {target}; {stored}"
                ));
            }
        }
        Ok(Event {
            payload: Payload::Json(Text::from(payload)),
            schema_version: Some(to),
            original_schema_version: Some(from),
            ..event.clone()
        })
    }
}

/// The job that upcasts `event` (a target: a JSON payload with a version) to `to`.
fn job(event: &Event, to: i64) -> Job<'_> {
    Job {
        event_type: &event.event_type,
        from: event.schema_version.expect("targets have a version"),
        to,
        payload: event.payload.as_json().expect("targets are JSON"),
    }
}
