//! How an event becomes an SQS or SNS message: the body (the CloudEvents envelope, or the
//! payload for `debezium`/`raw`), the message attributes consumers and subscription filter
//! policies read, and on FIFO destinations the group and deduplication ids; its size as the
//! services count it. Both services take the same message, so it is built once here.
//!
//! Invariants:
//! - The group id is a function of the event's key only, so the per-key order the sink
//!   keeps is the order FIFO consumers see; the deduplication id is a function of the event
//!   id only, so a resend after a crash is dropped by the service within its window.
//! - Every character of a body or attribute value is one the services accept: an event
//!   holding another is rejected with the reason, never sent to be refused.

use crate::format::{self, Format};
use crate::{Event, Payload};
use ring::digest;

/// The characters SQS and SNS accept in a body or attribute value (XML 1.0's).
fn allowed(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// The longest group or deduplication id the services accept.
const MAX_ID_LEN: usize = 128;
/// The data type of every attribute the relay sets.
const STRING: &str = "String";

/// One message, service-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) body: String,
    /// Attribute name and string value.
    pub(crate) attributes: Vec<(&'static str, String)>,
    /// `MessageGroupId` and `MessageDeduplicationId`, on FIFO destinations.
    pub(crate) fifo: Option<(String, String)>,
}

impl Message {
    /// The message for `event`, or why neither service could take it.
    pub(crate) fn new(event: &Event, format: Format, fifo: bool) -> Result<Message, String> {
        let body = match (&event.payload, format) {
            (Payload::Tombstone, _) => {
                return Err("the event has no payload (a tombstone: on_null_payload = \
                     \"tombstone\"), and only a Kafka sink can carry one: route the table only \
                     to Kafka sinks"
                    .into())
            }
            (_, Format::CloudEvents) => {
                let mut line = Vec::with_capacity(event.payload.len() + 512);
                format::write_line(Format::CloudEvents, event, &mut line);
                line.pop();
                String::from_utf8(line).expect("the envelope is UTF-8")
            }
            (Payload::Binary { .. }, _) => {
                return Err(
                    "the payload is bytes (a bytea column), and an SQS or SNS message \
                     body is text: use format = \"cloudevents\" (the bytes go into \
                     `data_base64`)"
                        .into(),
                )
            }
            (Payload::Json(json), _) => json.as_str().to_owned(),
        };
        if let Some(c) = body.chars().find(|&c| !allowed(c)) {
            return Err(format!(
                "the message body holds the character U+{:04X}, which SQS and SNS refuse: \
                 escape it in the payload, or use format = \"cloudevents\"",
                u32::from(c)
            ));
        }
        let mut attributes = vec![
            ("id", event.id.as_str().to_owned()),
            ("type", event.event_type.as_str().to_owned()),
            ("aggregatetype", event.aggregate_type.as_str().to_owned()),
            ("aggregateid", event.aggregate_id.as_str().to_owned()),
            ("sequence", sequence(event)),
        ];
        if let Some(version) = event.schema_version {
            attributes.push(("schemaversion", version.to_string()));
        }
        if let Some(version) = event.original_schema_version {
            attributes.push(("originalschemaversion", version.to_string()));
        }
        if let Some(traceparent) = &event.traceparent {
            attributes.push(("traceparent", traceparent.as_str().to_owned()));
        }
        // The services refuse empty attribute values: an empty one is left out.
        attributes.retain(|(_, value)| !value.is_empty());
        if let Some((name, _)) = attributes
            .iter()
            .find(|(_, value)| !value.chars().all(allowed))
        {
            return Err(format!(
                "the message attribute {name} holds a character SQS and SNS refuse (a control \
                 character): fix the outbox row's value"
            ));
        }
        let fifo = fifo.then(|| (fifo_id(&event.key), fifo_id(&event.id)));
        Ok(Message {
            body,
            attributes,
            fifo,
        })
    }

    /// The size the services count against their limits: the body, and each attribute's
    /// name, data type and value.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(name, value)| name.len() + STRING.len() + value.len())
                .sum::<usize>()
    }
}

/// The position as 24 hex digits (the CloudEvents `sequence`): sorts in commit order.
fn sequence(event: &Event) -> String {
    let p = event.position;
    format!("{:016X}{:08X}", p.commit_lsn.0, p.index)
}

/// A group or deduplication id from `value`: itself when the services accept it (1 to 128
/// printable ASCII characters), else `sha256:` and the hex of its SHA-256, the same for the
/// same value.
pub(crate) fn fifo_id(value: &str) -> String {
    let valid =
        (1..=MAX_ID_LEN).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
    if valid {
        return value.to_owned();
    }
    let hash = digest::digest(&digest::SHA256, value.as_bytes());
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    #[test]
    fn a_message_carries_the_envelope_and_its_attributes() {
        let mut event = sample(0x16B3748, 2);
        event.traceparent = Some(Text::from(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        event.schema_version = Some(3);
        event.original_schema_version = Some(1);
        let message = Message::new(&event, Format::CloudEvents, false).unwrap();
        let body: serde_json::Value = serde_json::from_str(&message.body).unwrap();
        assert_eq!(body["id"], event.id.as_str());
        assert_eq!(body["data"]["total"], 12);
        let names: Vec<&str> = message.attributes.iter().map(|(n, _)| *n).collect();
        assert!(names.starts_with(&["id", "type", "aggregatetype", "aggregateid", "sequence"]));
        assert!(names.contains(&"traceparent"));
        assert!(names.contains(&"schemaversion") && names.contains(&"originalschemaversion"));
        assert_eq!(body["originalschemaversion"], 1);
        assert!(names.len() <= 10, "SQS takes at most 10 attributes");
        assert_eq!(message.fifo, None);
        let attributes: usize = message
            .attributes
            .iter()
            .map(|(n, v)| n.len() + 6 + v.len())
            .sum();
        assert_eq!(message.size(), message.body.len() + attributes);
    }

    #[test]
    fn fifo_ids_come_from_the_key_and_the_event_id() {
        let event = sample(1, 0);
        let message = Message::new(&event, Format::Raw, true).unwrap();
        assert_eq!(message.body, r#"{"total": 12}"#);
        let (group, dedup) = message.fifo.unwrap();
        assert_eq!(group, fifo_id(&event.key));
        assert_eq!(dedup, event.id.as_str());
    }

    #[test]
    fn ids_the_services_refuse_are_hashed_the_same_way_every_time() {
        assert_eq!(fifo_id("order-1"), "order-1");
        for bad in ["", "with space", "ünïcode", &"x".repeat(129)] {
            let id = fifo_id(bad);
            assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
            assert_eq!(id, fifo_id(bad));
        }
        assert_ne!(fifo_id("a b"), fifo_id("a  b"));
        assert_eq!(fifo_id(&"x".repeat(128)), "x".repeat(128));
    }

    #[test]
    fn bytes_tombstones_and_refused_characters_are_rejections() {
        let mut event = sample(1, 0);
        event.payload = Payload::Binary {
            bytes: bytes::Bytes::from_static(b"\x00\x01"),
            content_type: "application/x-protobuf".into(),
        };
        let reason = Message::new(&event, Format::Raw, false).unwrap_err();
        assert!(reason.contains("bytea"), "{reason}");
        let message = Message::new(&event, Format::CloudEvents, false).unwrap();
        assert!(message.body.contains("\"data_base64\":\"AAE=\""));
        event.payload = Text::from("\"\u{FFFF}\"").into();
        let reason = Message::new(&event, Format::Raw, false).unwrap_err();
        assert!(reason.contains("U+FFFF"), "{reason}");
        event.payload = Payload::Tombstone;
        let reason = Message::new(&event, Format::CloudEvents, false).unwrap_err();
        assert!(reason.contains("tombstone"), "{reason}");
        let mut event = sample(1, 0);
        event.event_type = Text::from("Order\u{1}Created");
        let reason = Message::new(&event, Format::CloudEvents, false).unwrap_err();
        assert!(reason.contains("attribute type"), "{reason}");
    }
}
