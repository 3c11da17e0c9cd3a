//! The relay's logs: to stderr (stdout belongs to the stdout sink), human-readable or one JSON
//! object per line for collectors, filtered so that no library can log a payload or a secret.
//!
//! The JSON schema (README, docs/operations.md "Logs"), one object per line:
//! - `timestamp` (RFC 3339, UTC, microseconds), `level` (`ERROR` … `TRACE`), `target` (the
//!   module, or for a library's `log` record the library's own target), `message`;
//! - the event's fields at the top level (a field named like one of those keys, or
//!   `spans`, is written as `field.<name>`);
//! - `spans`: the spans the event happened in, outermost first, each `{"span": <span name>,
//!   <its fields>}` (the sink worker's span is `{"span": "sink", "sink": "<name>"}`).
//!
//! A `log` record carries no source path of the machine that built the binary: the
//! `log.file`, `log.line`, `log.module_path` and `log.target` fields the bridge adds are
//! dropped (the target becomes `target`).

use crate::config::{LogConfig, LogFormat};
use serde_json::{Map, Value};
use std::fmt;
use std::io::IsTerminal;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{registry, EnvFilter, Layer};

/// Installs the process's logger as `config` says; `RUST_LOG` wins over `log.level`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.level.as_deref().unwrap_or("info")));
    let filter = filter.and(filter_fn(|metadata| !may_hold_payloads(metadata)));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.format {
        LogFormat::Json => registry()
            .with(
                layer
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLine)
                    .with_filter(filter),
            )
            .init(),
        LogFormat::Pretty => registry().with(layer.with_filter(filter)).init(),
    }
}

/// Whether a library's log line may carry payloads or secrets, whatever `RUST_LOG` or
/// `log.level` ask for. Libraries log what crosses them below info level (tokio-postgres a
/// statement's parameters, a dead letter's row among them; lapin, the stream client, the AWS
/// SDK and librdkafka the frames and bodies they send), and lapin logs every message RabbitMQ
/// returns, body and all, as a warning (the RabbitMQ sink handles and counts returns itself).
/// The relay's own crates log no payloads at any level.
fn may_hold_payloads(metadata: &tracing::Metadata<'_>) -> bool {
    let target = metadata.target();
    if target.starts_with("outbox_relay") {
        return false;
    }
    target.starts_with("lapin::returned_messages") || *metadata.level() > tracing::Level::INFO
}

/// Keys of the line itself, which an event's field does not overwrite.
const RESERVED: [&str; 5] = ["timestamp", "level", "target", "message", "spans"];

/// One JSON object per event (see the module's documentation for the schema).
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        line.insert(
            "message".into(),
            fields.message.take().unwrap_or_default().into(),
        );
        for (name, value) in fields.values {
            let key = if RESERVED.contains(&name.as_str()) {
                format!("field.{name}")
            } else {
                name
            };
            line.insert(key, value);
        }
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut entry = Map::new();
                    entry.insert("span".into(), span.name().into());
                    let extensions = span.extensions();
                    let recorded = extensions
                        .get::<FormattedFields<N>>()
                        .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok());
                    for (name, value) in recorded.into_iter().flatten() {
                        entry.entry(name).or_insert(value);
                    }
                    Value::Object(entry)
                })
                .collect();
            if !spans.is_empty() {
                line.insert("spans".into(), spans.into());
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// An event's message and fields, without the `log` bridge's `log.*` fields.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    values: Vec<(String, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "message" {
            self.message = Some(match value {
                Value::String(text) => text,
                other => other.to_string(),
            });
        } else if !name.starts_with("log.") {
            self.values.push((name.to_owned(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the JSON layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON lines the events `emit` makes.
    fn json_lines(emit: impl FnOnce()) -> Vec<Map<String, Value>> {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .fmt_fields(JsonFields::new())
                .event_format(JsonLine),
        );
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn a_line_has_its_message_and_fields_at_the_top_and_names_each_span_once() {
        let lines = json_lines(|| {
            let sink = tracing::info_span!("sink", sink = "rmq");
            let _sink = sink.enter();
            let batch = tracing::info_span!("batch", events = 3_u64);
            let _batch = batch.enter();
            tracing::warn!(retry_in = ?std::time::Duration::from_millis(100), level = 7, "sink failed");
        });
        let line = &lines[0];
        assert_eq!(line["message"], "sink failed");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["retry_in"], "100ms");
        assert_eq!(line["field.level"], 7);
        assert!(!line.contains_key("fields"));
        assert_eq!(
            line["spans"],
            serde_json::json!([{"span": "sink", "sink": "rmq"}, {"span": "batch", "events": 3}])
        );
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn a_log_record_keeps_its_target_and_no_source_path() {
        let lines = json_lines(|| {
            let record = log::Record::builder()
                .args(format_args!("NOTICE: relation exists"))
                .level(log::Level::Info)
                .target("tokio_postgres::connection")
                .module_path_static(Some("tokio_postgres::connection"))
                .file_static(Some("/home/builder/.cargo/registry/src/connection.rs"))
                .line(Some(42))
                .build();
            tracing_log::format_trace(&record).unwrap();
        });
        let line = &lines[0];
        assert_eq!(line["target"], "tokio_postgres::connection");
        assert_eq!(line["message"], "NOTICE: relation exists");
        assert_eq!(line["level"], "INFO");
        let text = serde_json::to_string(line).unwrap();
        assert!(
            !text.contains("registry") && !text.contains("log."),
            "{text}"
        );
    }
}
