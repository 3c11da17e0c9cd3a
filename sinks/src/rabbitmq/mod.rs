//! The RabbitMQ sink, in one of two modes.
//!
//! - **Exchange mode** ([`exchange`], AMQP 0-9-1 through `lapin`): every event is published
//!   to an exchange with a routing key from a template, persistent, with publisher confirms
//!   pipelined over a bounded window. Delivery is at-least-once: after a lost connection
//!   or a negative acknowledgement, events are published again with the same `message_id`,
//!   which consumers dedup on. Per-key order holds for the last copy of every event (see
//!   the module for exactly what a consumer can see after a retry).
//! - **Stream mode** ([`stream`], the RabbitMQ Streams protocol through
//!   `rabbitmq-stream-client`): every event is published to one stream by a named producer,
//!   with a publishing id derived from the event's source position. RabbitMQ drops any
//!   message whose publishing id is not above the last one it stored for that producer, so
//!   replays after a crash are deduplicated by the broker itself, and the sink's checkpoint
//!   is the producer's last publishing id, read back from the broker on start: every event
//!   is in the stream exactly once, in commit order.
//!
//! Both modes share the message content ([`Content`]): CloudEvents structured (the JSON
//! envelope as the body, `application/cloudevents+json`) or binary (the payload as the
//! body, the attributes as `cloudEvents_`-prefixed headers, per the CloudEvents AMQP
//! binding), or the payload alone for the `debezium` and `raw` formats. A binary payload (a
//! `bytea` column) is the body as it is, with the mapping's content type, except in the
//! structured envelope, which carries it as `data_base64`.

mod config;
pub mod exchange;
pub mod stream;

use crate::format::{self, AttributeValue, Format};
use crate::{Event, Sink, SinkError};
use serde::Deserialize;

pub use config::{RabbitMqConfig, RabbitMqMode};
pub use exchange::{ExchangeSettings, ExchangeSink};
pub use stream::{StreamSettings, StreamSink};

/// The prefix of CloudEvents attributes carried as message headers in binary mode (the
/// CloudEvents AMQP protocol binding).
pub const CLOUDEVENTS_HEADER_PREFIX: &str = "cloudEvents_";

/// What to do with an event the broker refused (a negative acknowledgement) or could not
/// route (a `mandatory` publish returned because no queue is bound for its routing key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Publish it again with backoff (and, to keep per-key order, every later event of its
    /// key in the batch), until the broker takes it.
    Retry,
    /// Hand it to the relay's dead-letter table with the broker's reason; the rest goes on.
    DeadLetter,
    /// Stop the relay with the reason, so an operator can fix the broker side.
    Fail,
}

/// The settings of either mode.
#[derive(Debug, Clone)]
pub enum RabbitMqSettings {
    Exchange(ExchangeSettings),
    Stream(StreamSettings),
}

/// The sink for `settings`. Nothing connects before the first `recover` or `send`.
pub fn sink(settings: RabbitMqSettings) -> Box<dyn Sink> {
    match settings {
        RabbitMqSettings::Exchange(settings) => Box::new(ExchangeSink::new(settings)),
        RabbitMqSettings::Stream(settings) => Box::new(StreamSink::new(settings)),
    }
}

/// Problems `outbox-relay check` reports for this sink: the broker unreachable, wrong
/// credentials, the stream plugin not enabled, a missing exchange or stream.
pub async fn check(settings: &RabbitMqSettings) -> Vec<String> {
    match settings {
        RabbitMqSettings::Exchange(settings) => exchange::check(settings).await,
        RabbitMqSettings::Stream(settings) => stream::check(settings).await,
    }
}

/// What a message carries besides its routing: the body, its content type, and the headers
/// (event headers, then the CloudEvents attributes in binary mode).
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub body: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, AttributeValue)>,
}

impl Content {
    pub fn of(event: &Event, format: Format, binary: bool) -> Content {
        let mut headers: Vec<(String, AttributeValue)> = event
            .headers
            .iter()
            .map(|(name, value)| (name.to_string(), AttributeValue::String(value.to_string())))
            .collect();
        let mut add = |name: &str, value: AttributeValue| {
            if !headers.iter().any(|(existing, _)| existing == name) {
                headers.push((name.to_owned(), value));
            }
        };
        if let Some(traceparent) = &event.traceparent {
            add(
                "traceparent",
                AttributeValue::String(traceparent.to_string()),
            );
        }
        match format {
            Format::CloudEvents if binary => {
                for (name, value) in format::attributes(event) {
                    if name != "datacontenttype" {
                        add(&format!("{CLOUDEVENTS_HEADER_PREFIX}{name}"), value);
                    }
                }
                Content {
                    body: event.payload.as_bytes().to_vec(),
                    content_type: event.payload.content_type().to_owned(),
                    headers,
                }
            }
            Format::CloudEvents => {
                let mut body = Vec::with_capacity(event.payload.len() + 512);
                format::write_line(format, event, &mut body);
                body.pop();
                Content {
                    body,
                    content_type: "application/cloudevents+json; charset=UTF-8".to_owned(),
                    headers,
                }
            }
            Format::Debezium | Format::Raw => {
                if format == Format::Debezium {
                    add("id", AttributeValue::String(event.id.to_string()));
                }
                if let Some(version) = event.schema_version {
                    add("schema_version", AttributeValue::Integer(version));
                }
                if let Some(version) = event.original_schema_version {
                    add("original_schema_version", AttributeValue::Integer(version));
                }
                Content {
                    body: event.payload.as_bytes().to_vec(),
                    content_type: event.payload.content_type().to_owned(),
                    headers,
                }
            }
        }
    }
}

/// The event's time in milliseconds since the Unix epoch: `occurred_at` when it parses,
/// else the commit time.
pub fn event_time_millis(event: &Event) -> i64 {
    event
        .occurred_at
        .as_deref()
        .and_then(|text| humantime::parse_rfc3339_weak(text).ok())
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(event.commit_time_micros / 1000, |d| d.as_millis() as i64)
}

/// Backoff between rounds inside one `send`, and between `recover`'s connection attempts:
/// from `first` up to 5 s.
fn backoff(first: std::time::Duration) -> crate::Backoff {
    crate::Backoff::new(first, std::time::Duration::from_secs(5))
}

fn permanent(message: impl Into<String>) -> SinkError {
    SinkError::Permanent(message.into())
}

fn retryable(message: impl Into<String>) -> SinkError {
    SinkError::Retryable(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    #[test]
    fn a_binary_payload_is_the_body_with_its_content_type_or_data_base64_in_the_envelope() {
        let mut event = sample(1, 0);
        event.payload = crate::Payload::Binary {
            bytes: bytes::Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
            content_type: "application/avro".into(),
        };
        for (format, binary) in [
            (Format::Raw, false),
            (Format::Debezium, false),
            (Format::CloudEvents, true),
        ] {
            let content = Content::of(&event, format, binary);
            assert_eq!(content.body, [0xde, 0xad, 0xbe, 0xef], "{format:?}");
            assert_eq!(content.content_type, "application/avro", "{format:?}");
        }
        let content = Content::of(&event, Format::CloudEvents, false);
        let envelope: serde_json::Value = serde_json::from_slice(&content.body).unwrap();
        assert_eq!(envelope["data_base64"], "3q2+7w==");
        assert_eq!(envelope["datacontenttype"], "application/avro");
    }

    #[test]
    fn binary_mode_puts_attributes_in_prefixed_headers_and_the_payload_in_the_body() {
        let mut event = sample(0x16B_3748, 2);
        event.traceparent = Some(Text::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        event.headers = vec![("tenant".into(), Text::from("acme"))];
        let content = Content::of(&event, Format::CloudEvents, true);
        assert_eq!(content.body, br#"{"total": 12}"#);
        assert_eq!(content.content_type, "application/json");
        let header = |name: &str| {
            content
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_string())
        };
        assert_eq!(header("tenant").as_deref(), Some("acme"));
        assert_eq!(header("cloudEvents_specversion").as_deref(), Some("1.0"));
        assert_eq!(header("cloudEvents_type").as_deref(), Some("OrderCreated"));
        assert_eq!(
            header("cloudEvents_sequence").as_deref(),
            Some("00000000016B374800000002")
        );
        assert!(header("traceparent").is_some());
        assert_eq!(header("cloudEvents_datacontenttype"), None);
    }

    #[test]
    fn structured_mode_is_the_envelope_and_debezium_carries_the_id_header() {
        let event = sample(7, 0);
        let content = Content::of(&event, Format::CloudEvents, false);
        let envelope: serde_json::Value = serde_json::from_slice(&content.body).unwrap();
        assert_eq!(envelope["id"], &*event.id);
        assert_eq!(envelope["data"]["total"], 12);
        assert!(content
            .content_type
            .starts_with("application/cloudevents+json"));
        let content = Content::of(&event, Format::Debezium, false);
        assert_eq!(content.body, br#"{"total": 12}"#);
        assert_eq!(
            content.headers,
            vec![(
                "id".to_owned(),
                AttributeValue::String(event.id.to_string())
            )]
        );
        let upcast = Event {
            schema_version: Some(3),
            original_schema_version: Some(1),
            ..event
        };
        let content = Content::of(&upcast, Format::Raw, false);
        assert_eq!(
            content.headers,
            vec![
                ("schema_version".to_owned(), AttributeValue::Integer(3)),
                (
                    "original_schema_version".to_owned(),
                    AttributeValue::Integer(1)
                )
            ]
        );
    }

    #[test]
    fn event_time_prefers_occurred_at() {
        let mut event = sample(7, 0);
        assert_eq!(event_time_millis(&event), 1_700_000_000_123);
        event.occurred_at = Some(Text::from("2026-01-02T03:04:05.5Z"));
        assert_eq!(event_time_millis(&event), 1_767_323_045_500);
    }
}
