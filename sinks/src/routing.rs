//! Routing primitives shared by the sinks: templates over an event's fields (topic, exchange,
//! routing key, bus, CloudEvents source: `outbox.event.{aggregatetype}`), and which events a
//! sink takes: the configured [`MatchRule`] (`[sinks.NAME.match]`) and the [`EventFilter`] it
//! becomes (by table, aggregate type, event-type glob).

use crate::table_name::{names_one_of, parse_table_name};
use crate::{Event, EventState, Position, Sink, SinkError};
use async_trait::async_trait;
use serde::Deserialize;
use std::fmt::Write;
use std::sync::Arc;

/// A field of an event a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Table,
    AggregateType,
    AggregateId,
    Type,
    Key,
    Id,
    SchemaVersion,
}

const FIELDS: [(&str, Field); 7] = [
    ("table", Field::Table),
    ("aggregatetype", Field::AggregateType),
    ("aggregateid", Field::AggregateId),
    ("type", Field::Type),
    ("key", Field::Key),
    ("id", Field::Id),
    ("schemaversion", Field::SchemaVersion),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A string with `{field}` placeholders, checked when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, thiserror::Error)]
#[error("template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: String,
}

impl Template {
    pub fn parse(template: &str) -> Result<Template, TemplateError> {
        let error = |reason: String| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| error("a '{' is not closed".into()))?;
            let name = &rest[open + 1..open + close];
            let field = FIELDS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
                    error(format!(
                        "unknown field {{{name}}}; known fields: {}",
                        known.join(", ")
                    ))
                })?;
            parts.push(Part::Field(field));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(error("a '}' has no '{'".into()));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// The text, when the template has no placeholders.
    pub fn as_static(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// The text for events of `table`, when the template names no field but `{table}`:
    /// computed once per table instead of once per event.
    pub fn render_for_table(&self, table: &str) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field(Field::Table) => out.push_str(table),
                Part::Field(_) => return None,
            }
        }
        Some(out)
    }

    /// Renders the template for `event` into `out`.
    pub fn render(&self, event: &Event, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Field(Field::Table) => out.push_str(&event.table),
                Part::Field(Field::AggregateType) => out.push_str(&event.aggregate_type),
                Part::Field(Field::AggregateId) => out.push_str(&event.aggregate_id),
                Part::Field(Field::Type) => out.push_str(&event.event_type),
                Part::Field(Field::Key) => out.push_str(&event.key),
                Part::Field(Field::Id) => out.push_str(&event.id),
                Part::Field(Field::SchemaVersion) => {
                    if let Some(version) = event.schema_version {
                        let _ = write!(out, "{version}");
                    }
                }
            }
        }
    }
}

/// Which events to take: each non-empty list must match; an empty filter takes everything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    tables: Vec<String>,
    aggregate_types: Vec<String>,
    event_type_globs: Vec<String>,
    /// The sink's name: an event meant for one sink only ([`Event::only_sink`]) passes the
    /// filter of that sink alone.
    sink: Option<Arc<str>>,
}

impl EventFilter {
    pub fn new(
        tables: Vec<String>,
        aggregate_types: Vec<String>,
        event_type_globs: Vec<String>,
    ) -> Self {
        EventFilter {
            tables,
            aggregate_types,
            event_type_globs,
            sink: None,
        }
    }

    /// The filter of the sink named `sink`.
    pub fn for_sink(mut self, sink: &str) -> Self {
        self.sink = Some(Arc::from(sink));
        self
    }

    pub fn takes_everything(&self) -> bool {
        self.tables.is_empty()
            && self.aggregate_types.is_empty()
            && self.event_type_globs.is_empty()
            && self.sink.is_none()
    }

    pub fn matches(&self, event: &Event) -> bool {
        event
            .only_sink
            .as_deref()
            .is_none_or(|only| self.sink.as_deref() == Some(only))
            && (self.tables.is_empty() || self.tables.iter().any(|t| **t == *event.table))
            && (self.aggregate_types.is_empty()
                || self
                    .aggregate_types
                    .iter()
                    .any(|a| a.as_str() == event.aggregate_type.as_str()))
            && (self.event_type_globs.is_empty()
                || self
                    .event_type_globs
                    .iter()
                    .any(|g| glob_matches(g, &event.event_type)))
    }
}

/// Which events a sink takes; an empty list matches everything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    /// `schema.table`, or `message:PREFIX` for logical-message events.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub aggregate_types: Vec<String>,
    /// Globs: `*` any run of characters, `?` one character.
    #[serde(default)]
    pub event_types: Vec<String>,
}

impl MatchRule {
    /// `tables` as events name their table: `schema.table` (a bare name is in `public`, quotes
    /// are taken off), and `message:PREFIX` as it is.
    pub fn event_tables(&self) -> Vec<String> {
        self.tables
            .iter()
            .map(|t| match parse_table_name(t) {
                Ok((schema, name)) if !t.starts_with("message:") => format!("{schema}.{name}"),
                _ => t.clone(),
            })
            .collect()
    }

    /// Whether the rule lets through events of the table `names` (`schema`, `table`), as far
    /// as `tables` says (the other lists depend on the event).
    pub fn takes_table(&self, names: &(String, String)) -> bool {
        self.tables.is_empty() || names_one_of(&self.tables, names)
    }

    /// The filter that applies the rule to events.
    pub fn event_filter(&self) -> EventFilter {
        EventFilter::new(
            self.event_tables(),
            self.aggregate_types.clone(),
            self.event_types.clone(),
        )
    }
}

/// A sink that only sees the events its filter takes. Events filtered out count as handled:
/// they are not for this sink, so its checkpoint may move past them.
pub struct FilteredSink {
    filter: EventFilter,
    inner: Box<dyn Sink>,
    /// The matching events of the current batch, their indices in it, and their states.
    selected: Vec<Event>,
    indices: Vec<usize>,
    states: Vec<EventState>,
}

impl FilteredSink {
    /// Wraps `inner`; returns it unwrapped when `filter` takes everything.
    pub fn wrap(filter: EventFilter, inner: Box<dyn Sink>) -> Box<dyn Sink> {
        if filter.takes_everything() {
            return inner;
        }
        Box::new(FilteredSink {
            filter,
            inner,
            selected: Vec::new(),
            indices: Vec::new(),
            states: Vec::new(),
        })
    }
}

#[async_trait]
impl Sink for FilteredSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        self.inner.recover().await
    }

    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        // Most batches are all for this sink: they go through without a copy.
        if batch.iter().all(|e| self.filter.matches(e)) {
            return self.inner.send(batch, states).await;
        }
        self.selected.clear();
        self.indices.clear();
        self.states.clear();
        for (index, event) in batch
            .iter()
            .enumerate()
            .filter(|(_, e)| self.filter.matches(e))
        {
            self.selected.push(event.clone());
            self.indices.push(index);
            self.states.push(std::mem::take(&mut states[index]));
        }
        if self.selected.is_empty() {
            return Ok(());
        }
        let sent = self.inner.send(&self.selected, &mut self.states).await;
        for (&index, state) in self.indices.iter().zip(self.states.drain(..)) {
            states[index] = state;
        }
        sent
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.inner.close().await
    }
}

/// `*` matches any run of characters (also none), `?` exactly one; the rest literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;

    #[test]
    fn templates_render_fields_and_reject_unknown_ones() {
        let event = sample(1, 0);
        let template = Template::parse("outbox.event.{aggregatetype}.{type}").unwrap();
        let mut out = String::new();
        template.render(&event, &mut out);
        assert_eq!(out, "outbox.event.order.OrderCreated");
        assert_eq!(Template::parse("/{table}").unwrap().as_static(), None);
        assert_eq!(
            Template::parse("/{table}")
                .unwrap()
                .render_for_table("a.b")
                .as_deref(),
            Some("/a.b")
        );
        assert_eq!(template.render_for_table("a.b"), None);
        assert_eq!(Template::parse("fixed").unwrap().as_static(), Some("fixed"));
        let err = Template::parse("x.{aggregate}").unwrap_err().to_string();
        assert!(
            err.contains("unknown field {aggregate}") && err.contains("aggregatetype"),
            "{err}"
        );
        assert!(Template::parse("x.{type").is_err());
        assert!(Template::parse("x}").is_err());
    }

    #[test]
    fn globs() {
        for (pattern, text, expected) in [
            ("Order*", "OrderCreated", true),
            ("Order*", "Order", true),
            ("*Created", "OrderCreated", true),
            ("Order?", "Orders", true),
            ("Order?", "Order", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b", "xxaxxbxx", false),
            ("Customer*", "OrderCreated", false),
            ("*", "", true),
        ] {
            assert_eq!(glob_matches(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    /// Records what it was sent and rejects the events whose type is "Bad".
    struct Recording(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    #[async_trait]
    impl Sink for Recording {
        async fn send(
            &mut self,
            batch: &[Event],
            states: &mut [EventState],
        ) -> Result<(), SinkError> {
            self.0
                .lock()
                .unwrap()
                .extend(batch.iter().map(|e| e.aggregate_type.to_string()));
            for (event, state) in batch.iter().zip(states) {
                if &*event.event_type == "Bad" {
                    *state = EventState::Rejected("bad".into());
                }
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_filtered_sink_sees_only_its_events_and_reports_rejections_by_batch_index() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let filter = EventFilter::new(vec![], vec!["order".into()], vec![]);
        let mut sink = FilteredSink::wrap(filter, Box::new(Recording(seen.clone())));
        let mut batch = vec![sample(1, 0), sample(1, 1), sample(1, 2)];
        batch[0].aggregate_type = crate::Text::from("customer");
        batch[2].event_type = crate::Text::from("Bad");
        let mut states = vec![EventState::Pending; batch.len()];
        sink.send(&batch, &mut states).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), ["order", "order"]);
        assert_eq!(
            crate::rejections(states),
            vec![crate::Rejection {
                index: 2,
                reason: "bad".into()
            }]
        );
    }

    #[test]
    fn an_event_for_one_sink_passes_that_sinks_filter_only() {
        let event = Event {
            only_sink: Some("rmq".into()),
            ..sample(1, 0)
        };
        assert!(EventFilter::default().for_sink("rmq").matches(&event));
        assert!(!EventFilter::default().for_sink("kafka").matches(&event));
        assert!(EventFilter::default()
            .for_sink("kafka")
            .matches(&sample(1, 1)));
    }

    #[test]
    fn filters_need_every_non_empty_list_to_match() {
        let event = sample(1, 0);
        assert!(EventFilter::default().matches(&event));
        assert!(
            EventFilter::new(vec!["public.outbox".into()], vec![], vec!["Order*".into()])
                .matches(&event)
        );
        assert!(!EventFilter::new(vec![], vec!["customer".into()], vec![]).matches(&event));
        assert!(!EventFilter::new(vec!["billing.events".into()], vec![], vec![]).matches(&event));
    }
}
