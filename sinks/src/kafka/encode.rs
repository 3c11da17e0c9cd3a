//! How an event becomes a Kafka record: its headers, its value (a tombstone's is null), and
//! the size librdkafka counts for it against `message.max.bytes`.

use super::KafkaSettings;
use crate::format::{self, Format};
use crate::{Event, Payload};
use rdkafka::message::{Header, OwnedHeaders};

/// The record's headers: the event's identity and headers, and the CloudEvents attributes
/// in binary mode.
pub(super) fn headers(settings: &KafkaSettings, event: &Event) -> OwnedHeaders {
    // `insert` takes the list by value; `Option::take` moves it out without making a
    // new one (`mem::take` would create and free an empty librdkafka list per header).
    let mut headers = Some(OwnedHeaders::new());
    let mut add = |key: &str, value: &str| {
        headers = headers.take().map(|list| {
            list.insert(Header {
                key,
                value: Some(value),
            })
        });
    };
    add("id", &event.id);
    if settings.format != Format::Debezium {
        add("type", &event.event_type);
        if let Some(version) = event.schema_version {
            add("schema_version", &version.to_string());
        }
        if let Some(version) = event.original_schema_version {
            add("original_schema_version", &version.to_string());
        }
        if let Some(traceparent) = &event.traceparent {
            add("traceparent", traceparent);
        }
    }
    for (key, value) in &event.headers {
        add(key, value);
    }
    match (settings.format, settings.binary) {
        (Format::CloudEvents, true) => {
            add("content-type", event.payload.content_type());
            for (name, value) in format::attributes(event) {
                if name != "datacontenttype" {
                    add(&format!("ce_{name}"), &value.to_string());
                }
            }
        }
        (Format::CloudEvents, false) => add(
            "content-type",
            "application/cloudevents+json; charset=UTF-8",
        ),
        _ => {}
    }
    headers.expect("every insert puts the list back")
}

/// Encodes the value of `event` into `value`; `false` for a tombstone, whose record has a
/// null value in every format.
pub(super) fn value(settings: &KafkaSettings, event: &Event, value: &mut Vec<u8>) -> bool {
    value.clear();
    if event.payload == Payload::Tombstone {
        return false;
    }
    match (settings.format, settings.binary) {
        (Format::CloudEvents, false) => {
            format::write_line(Format::CloudEvents, event, value);
            value.pop(); // the newline
        }
        _ => value.extend_from_slice(event.payload.as_bytes()),
    }
    true
}

/// The size librdkafka compares with `message.max.bytes` before it takes a record
/// (`rd_kafka_msg_new0`): the key, the value, the headers as they are serialized (each name
/// and value with its length as a zigzag varint), and the most that a record's framing can
/// take. A refusal states this sum, so that its numbers agree with the limit.
pub(super) struct RecordSize {
    key: usize,
    value: usize,
    headers: usize,
}

impl RecordSize {
    /// `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: the varints of the record's length, offset delta,
    /// key and value lengths and header count (5 bytes each at most), the timestamp delta's
    /// (10), and the attributes byte.
    const FRAMING: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

    pub(super) fn of(key: usize, value: usize, headers: Option<&OwnedHeaders>) -> RecordSize {
        use rdkafka::message::Headers;
        let with_length = |len: usize| len + zigzag_varint_len(len);
        let headers = headers.map_or(0, |headers| {
            headers
                .iter()
                .map(|h| with_length(h.key.len()) + with_length(h.value.map_or(0, <[u8]>::len)))
                .sum()
        });
        RecordSize {
            key,
            value,
            headers,
        }
    }

    fn total(&self) -> usize {
        Self::FRAMING + self.key + self.value + self.headers
    }
}

impl std::fmt::Display for RecordSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes as librdkafka counts it (value {}, key {}, headers {}, framing {})",
            self.total(),
            self.value,
            self.key,
            self.headers,
            Self::FRAMING
        )
    }
}

/// Bytes of `len` as a zigzag-encoded varint (librdkafka's `rd_uvarint_enc_i64`).
fn zigzag_varint_len(len: usize) -> usize {
    let mut encoded = (len as u64) << 1;
    let mut bytes = 1;
    while encoded >= 0x80 {
        encoded >>= 7;
        bytes += 1;
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    /// The size a refusal states is the one librdkafka compared: around the limit, a record
    /// is refused exactly when that size is over `message.max.bytes`.
    #[test]
    fn a_refused_record_states_the_size_librdkafka_compared() {
        const MAX: usize = 2000;
        let producer: FutureProducer = ClientConfig::new()
            // Nothing listens there: a record is checked and queued without a broker.
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.max.bytes", MAX.to_string())
            .create()
            .unwrap();
        let headers = || {
            OwnedHeaders::new()
                .insert(Header {
                    key: "id",
                    value: Some("0123456789abcdef"),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json; charset=UTF-8"),
                })
        };
        let key = "order-17";
        for value_len in MAX - 200..MAX {
            let value = vec![b'x'; value_len];
            let record = FutureRecord::to("t")
                .key(key)
                .payload(&value)
                .headers(headers());
            let refused = matches!(
                producer.send_result(record),
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _
                ))
            );
            let size = RecordSize::of(key.len(), value_len, Some(&headers()));
            assert_eq!(refused, size.total() > MAX, "{size}");
        }
    }
}
