//! How an event becomes a `PutEvents` entry (Detail, routing, Time, TraceHeader) and what
//! it weighs against EventBridge's request limit; the settings that would make EventBridge
//! refuse every event.

use super::EventBridgeSettings;
use crate::format::{self, Format};
use crate::routing::Template;
use crate::{Event, Payload};
use aws_sdk_eventbridge::primitives::DateTime;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use std::time::{Duration, UNIX_EPOCH};

/// Why a binary payload (a `bytea` column) is refused with `debezium` or `raw`: the column
/// type is known only from the database (`check` reports it), so the configuration cannot
/// refuse it, and each such event is rejected.
const NOT_JSON: &str = "the payload is bytes (a bytea column), and EventBridge's Detail must be \
     a JSON object: use format = \"cloudevents\" (the bytes go into `data_base64`)";

/// Why a tombstone is refused: the configuration lets only Kafka sinks take them.
const NO_PAYLOAD: &str =
    "the event has no payload (a tombstone: on_null_payload = \"tombstone\"), \
     and only a Kafka sink can carry one: route the table only to Kafka sinks";
/// What AWS counts for a `Time` parameter, whatever its value.
const TIME_BYTES: usize = 14;

/// The size of an entry as EventBridge counts it against its limit.
pub fn entry_size(source: &str, detail_type: &str, detail: &str, resources: &[String]) -> usize {
    TIME_BYTES
        + source.len()
        + detail_type.len()
        + detail.len()
        + resources.iter().map(String::len).sum::<usize>()
}

/// The W3C `traceparent` as an X-Ray trace header (what `TraceHeader` takes), converted the
/// way OpenTelemetry's X-Ray propagator does; `None` when it is not a valid traceparent.
pub fn xray_trace_header(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    if !valid {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1;
    Some(format!(
        "Root=1-{}-{};Parent={parent};Sampled={sampled}",
        &trace[..8],
        &trace[8..]
    ))
}

impl EventBridgeSettings {
    /// Mistakes that would make EventBridge refuse every event: a fixed bus name it cannot
    /// accept, a fixed empty source or detail type, no room for a request.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(bus) = self.bus.as_static() {
            let valid = bus
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-:".contains(c));
            if bus.is_empty() || !valid {
                return Err(format!(
                    "bus {bus:?} is not an event bus name or ARN (letters, digits and /._-)"
                ));
            }
        }
        for (key, template) in [("source", &self.source), ("detail_type", &self.detail_type)] {
            if template.as_static() == Some("") {
                return Err(format!("{key} must not be empty"));
            }
        }
        if self.concurrency == 0 || self.max_request_bytes == 0 {
            return Err("concurrency and max_request_bytes must be at least 1".into());
        }
        Ok(())
    }

    /// The entry for `event` and its size, or why EventBridge could never take it.
    pub(super) fn entry(&self, event: &Event) -> Result<(PutEventsRequestEntry, usize), String> {
        let render = |template: &Template| {
            let mut out = String::new();
            template.render(event, &mut out);
            out
        };
        if event.payload == Payload::Tombstone {
            return Err(NO_PAYLOAD.into());
        }
        let detail = match self.format {
            Format::CloudEvents => {
                let mut line = Vec::with_capacity(event.payload.len() + 512);
                format::write_line(Format::CloudEvents, event, &mut line);
                line.pop();
                String::from_utf8(line).expect("the envelope is UTF-8")
            }
            Format::Debezium | Format::Raw => {
                let Some(payload) = event.payload.as_json() else {
                    return Err(NOT_JSON.into());
                };
                if !payload.trim_start().starts_with('{') {
                    return Err(
                        "the payload is not a JSON object, and EventBridge's Detail must be one: \
                         use format = \"cloudevents\" (the payload goes into `data`) or publish \
                         objects"
                            .into(),
                    );
                }
                payload.to_string()
            }
        };
        let source = render(&self.source);
        let detail_type = render(&self.detail_type);
        let resources: Vec<String> = self.resources.iter().map(render).collect();
        let size = entry_size(&source, &detail_type, &detail, &resources);
        if size > self.max_request_bytes {
            return Err(format!(
                "the event is {size} bytes as an EventBridge entry (Source, DetailType, Detail, \
                 Resources and 14 for Time), over the limit of {} bytes: store large payloads \
                 elsewhere (e.g. S3) and publish a reference",
                self.max_request_bytes
            ));
        }
        let time = match &event.occurred_at {
            Some(time) => humantime::parse_rfc3339_weak(time).ok(),
            None => None,
        }
        .unwrap_or_else(|| {
            UNIX_EPOCH + Duration::from_micros(event.commit_time_micros.max(0) as u64)
        });
        let entry = PutEventsRequestEntry::builder()
            .event_bus_name(render(&self.bus))
            .source(source)
            .detail_type(detail_type)
            .detail(detail)
            .time(DateTime::from(time))
            .set_resources((!resources.is_empty()).then_some(resources))
            .set_trace_header(event.traceparent.as_deref().and_then(xray_trace_header))
            .build();
        Ok((entry, size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventbridge::DEFAULT_MAX_REQUEST_BYTES;
    use crate::format::tests::sample;
    use crate::Text;

    fn settings(format: Format) -> EventBridgeSettings {
        EventBridgeSettings {
            name: "bus".into(),
            bus: Template::parse("orders").unwrap(),
            source: Template::parse("outbox.{aggregatetype}").unwrap(),
            detail_type: Template::parse("{type}").unwrap(),
            resources: vec![Template::parse("arn:aws:example:::order/{aggregateid}").unwrap()],
            format,
            region: None,
            endpoint_url: None,
            concurrency: 4,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn an_entry_carries_the_envelope_routing_time_and_trace() {
        let mut event = sample(0x16B3748, 2);
        event.occurred_at = Some(Text::from("2026-01-02T03:04:05.123456Z"));
        event.traceparent = Some(Text::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let (entry, size) = settings(Format::CloudEvents).entry(&event).unwrap();
        assert_eq!(entry.event_bus_name(), Some("orders"));
        assert_eq!(entry.source(), Some("outbox.order"));
        assert_eq!(entry.detail_type(), Some("OrderCreated"));
        assert_eq!(entry.resources(), ["arn:aws:example:::order/order-\"1\""]);
        let detail: serde_json::Value = serde_json::from_str(entry.detail().unwrap()).unwrap();
        assert_eq!(detail["id"], "0b6f1d62-3c1a-4f5e-9d1e-6a9f0c3b2a11");
        assert_eq!(detail["sequence"], "00000000016B374800000002");
        assert_eq!(detail["data"]["total"], 12);
        assert_eq!(
            entry.time().unwrap().to_millis().unwrap(),
            1_767_323_045_123
        );
        assert_eq!(
            entry.trace_header(),
            Some("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1")
        );
        let expected = 14
            + "outbox.order".len()
            + "OrderCreated".len()
            + entry.detail().unwrap().len()
            + entry.resources()[0].len();
        assert_eq!(size, expected);
    }

    #[test]
    fn without_occurred_at_the_time_is_the_commit_time() {
        let event = sample(1, 0);
        let (entry, _) = settings(Format::Raw).entry(&event).unwrap();
        assert_eq!(
            entry.time().unwrap().to_millis().unwrap(),
            1_700_000_000_123
        );
        assert_eq!(entry.detail(), Some(r#"{"total": 12}"#));
        assert_eq!(entry.trace_header(), None);
    }

    #[test]
    fn raw_details_must_be_objects() {
        let mut event = sample(1, 0);
        event.payload = Text::from(r#" ["gold", 3]"#).into();
        let reason = settings(Format::Debezium).entry(&event).unwrap_err();
        assert!(reason.contains("not a JSON object"), "{reason}");
        assert!(settings(Format::CloudEvents).entry(&event).is_ok());
    }

    #[test]
    fn bytes_and_tombstones_are_refused_as_raw_details_bytes_go_in_the_envelope() {
        let mut event = sample(1, 0);
        event.payload = Payload::Binary {
            bytes: bytes::Bytes::from_static(b"\x00\x01"),
            content_type: "application/x-protobuf".into(),
        };
        for format in [Format::Debezium, Format::Raw] {
            let reason = settings(format).entry(&event).unwrap_err();
            assert!(
                reason.contains("the payload is bytes (a bytea column)"),
                "{reason}"
            );
        }
        let (entry, _) = settings(Format::CloudEvents).entry(&event).unwrap();
        let detail: serde_json::Value = serde_json::from_str(entry.detail().unwrap()).unwrap();
        assert_eq!(detail["data_base64"], "AAE=");
        assert_eq!(detail["datacontenttype"], "application/x-protobuf");
        event.payload = Payload::Tombstone;
        for format in [Format::CloudEvents, Format::Debezium, Format::Raw] {
            let reason = settings(format).entry(&event).unwrap_err();
            assert!(
                reason.contains("only a Kafka sink can carry one"),
                "{reason}"
            );
        }
    }

    #[test]
    fn an_event_over_the_limit_on_its_own_is_refused_at_the_boundary() {
        let mut s = settings(Format::Raw);
        s.resources.clear();
        let fixed = 14 + "outbox.order".len() + "OrderCreated".len();
        let payload = |len: usize| format!("{{\"p\":\"{}\"}}", "x".repeat(len - 8));
        let mut event = sample(1, 0);
        event.payload = Text::from(payload(DEFAULT_MAX_REQUEST_BYTES - fixed)).into();
        assert_eq!(s.entry(&event).unwrap().1, DEFAULT_MAX_REQUEST_BYTES);
        event.payload = Text::from(payload(DEFAULT_MAX_REQUEST_BYTES - fixed + 1)).into();
        let reason = s.entry(&event).unwrap_err();
        assert!(reason.contains("262145 bytes"), "{reason}");
    }

    #[test]
    fn settings_that_would_refuse_every_event_are_configuration_errors() {
        assert_eq!(settings(Format::CloudEvents).validate(), Ok(()));
        let mut s = settings(Format::CloudEvents);
        s.bus = Template::parse("arn:aws:events:eu-west-1:123456789012:event-bus/orders").unwrap();
        assert_eq!(s.validate(), Ok(()));
        s.bus = Template::parse("my orders").unwrap();
        assert!(s.validate().unwrap_err().contains("not an event bus name"));
        s.bus = Template::parse("orders-{aggregatetype}").unwrap();
        assert_eq!(s.validate(), Ok(()));
        s.detail_type = Template::parse("").unwrap();
        assert_eq!(s.validate().unwrap_err(), "detail_type must not be empty");
        let mut s = settings(Format::CloudEvents);
        s.concurrency = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn trace_headers_are_converted_or_left_out() {
        assert_eq!(
            xray_trace_header("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").as_deref(),
            Some("Root=1-0af76519-16cd43dd8448eb211c80319c;Parent=b7ad6b7169203331;Sampled=0")
        );
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(xray_trace_header(bad), None, "{bad}");
        }
    }
}
