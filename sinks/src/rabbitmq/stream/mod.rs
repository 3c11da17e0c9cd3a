//! Stream mode: the RabbitMQ Streams protocol, exactly once into one stream through the
//! broker's own deduplication.
//!
//! - **Publishing ids.** A named producer (`producer_name`, by default
//!   `outbox-relay.<slot>.<sink>`) publishes every event with the publishing id
//!   [`publishing_id`] = `commit LSN << 16 | index`. Positions are ordered by commit, so ids
//!   grow with every event, and the map is injective. RabbitMQ keeps, per producer name and
//!   stream, the highest publishing id it stored, and drops (while still confirming) any
//!   message whose id is not above it. So whatever the relay publishes again after a crash
//!   or a lost connection is stored once.
//! - **Caps.** The index takes 16 bits: a transaction's first 65,536 outbox events
//!   (indexes 0–65,535) get ids. A later event of the same transaction cannot get an id
//!   that keeps deduplication correct, so it is rejected: the relay writes it to its
//!   dead-letter table, from where `dlq replay` publishes it again (as a new transaction,
//!   so it then gets an id). The LSN takes 48 bits (256 TiB of WAL); a commit beyond that
//!   stops the relay with an error, since no id above the stored ones is left.
//! - **Checkpoint.** [`Sink::recover`] asks the broker for the producer's last publishing id
//!   (`query_publisher_sequence`) and maps it back to a position: the relay skips what the
//!   stream already holds. Id 0 means "nothing stored" (LSN 0 is never a commit).
//! - **Confirms.** Messages are published in commit order, several per frame (frames stay
//!   under the 1 MiB `stream.frame_max` default), up to `window` unconfirmed. `send`
//!   returns once every event is confirmed. A lost connection, a publish error or a missing
//!   confirm (`timeout`) drops the connection and returns a retryable error; on reconnect
//!   the sink asks for the producer's sequence again and publishes only what is above it.
//!   An event the broker refused (publish error) while a later one was stored can no longer
//!   be stored under its id: it is rejected (dead-lettered) with the broker's code rather
//!   than dropped by deduplication.
//! - **Leader.** The producer connects to the stream's leader as the broker advertises it
//!   (`stream.advertised_host` / `advertised_port` in rabbitmq.conf); the URL names any
//!   node to ask.
//! - **Messages.** AMQP 1.0 messages: `message_id` = the event id, `content_type`,
//!   `subject` = the event type, `creation_time`; application properties = the event's
//!   headers, `traceparent`, and in CloudEvents binary mode the `cloudEvents_*` attributes.
//! - **TLS.** `rabbitmq-stream+tls://` URLs need `ca_file` (the stream client trusts only
//!   that file); the server's host name is verified.

mod connect;
mod ids;
mod settings;

pub use connect::check;

use connect::refused;
pub use ids::{position_of, publishing_id, IdError, INDEX_BITS, MAX_INDEX, MAX_LSN};
pub use settings::StreamSettings;

use super::{backoff, event_time_millis, permanent, retryable, Content};
use crate::format::AttributeValue;
use crate::{Event, EventState, Lsn, Position, Sink, SinkError};
use async_trait::async_trait;
use rabbitmq_stream_client::types::{Message, ResponseCode};
use rabbitmq_stream_client::Client;
use rabbitmq_stream_protocol::codec::Encoder;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The frame size the sink asks for and keeps under: RabbitMQ's default `stream.frame_max`.
pub const FRAME_MAX: u32 = 1024 * 1024;

/// Room left in a publish frame for its header and each message's id and length fields.
const FRAME_OVERHEAD: usize = 64;

const MESSAGE_OVERHEAD: usize = 12;

/// The publisher id of the sink's producer on its connection.
const PUBLISHER_ID: u8 = 1;

/// Connection attempts `recover` makes before it gives up (with backoff, about 15 s).
const RECOVER_ATTEMPTS: u32 = 6;

/// What the connection's handler passes on.
enum Notice {
    Confirmed(Vec<u64>),
    Refused(Vec<(u64, ResponseCode)>),
    Closed,
}

/// An open connection to the stream's leader with the producer declared.
struct Link {
    client: Client,
    notices: mpsc::UnboundedReceiver<Notice>,
    /// The producer's last publishing id the broker stored, when connected.
    stored: u64,
}

pub struct StreamSink {
    settings: StreamSettings,
    link: Option<Link>,
}

impl StreamSink {
    pub fn new(settings: StreamSettings) -> Self {
        StreamSink {
            settings,
            link: None,
        }
    }

    fn context(&self) -> String {
        format!(
            "sink {} (stream {:?})",
            self.settings.name, self.settings.stream
        )
    }

    /// Runs a request with the sink's timeout.
    async fn timed<T, E: std::fmt::Display>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(self.settings.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(retryable(format!("{}: {what}: {err}", self.context()))),
            Err(_) => Err(retryable(format!(
                "{}: {what} timed out after {:?}",
                self.context(),
                self.settings.timeout
            ))),
        }
    }

    async fn disconnect(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(self.settings.timeout, link.client.close()).await;
        }
    }

    /// The message for `event` with its publishing id, or why it cannot be published.
    fn prepare(&self, event: &Event, id: u64) -> Result<Message, String> {
        let content = Content::of(event, self.settings.format, self.settings.binary);
        let time =
            chrono::DateTime::from_timestamp_millis(event_time_millis(event)).unwrap_or_default();
        let mut properties = Message::builder()
            .body(content.body)
            .properties()
            .message_id(event.id.to_string())
            .content_type(content.content_type)
            .subject(event.event_type.to_string())
            .creation_time(time)
            .message_builder()
            .application_properties();
        for (name, value) in content.headers {
            properties = match value {
                AttributeValue::String(text) => properties.insert(name, text),
                AttributeValue::Integer(number) => properties.insert(name, number),
            };
        }
        let message = properties.message_builder().publising_id(id).build();
        let size = message.encoded_size() as usize + MESSAGE_OVERHEAD;
        if size > FRAME_MAX as usize - FRAME_OVERHEAD {
            return Err(format!(
                "message of {size} bytes does not fit a stream frame ({FRAME_MAX} bytes, \
                 RabbitMQ's stream.frame_max)"
            ));
        }
        Ok(message)
    }

    /// Publishes every pending event once, pipelined, and waits for the confirms.
    async fn publish(
        &mut self,
        messages: &[Option<(u64, Message)>],
        states: &mut [EventState],
    ) -> Result<(), SinkError> {
        if self.link.is_none() {
            self.link = Some(self.connect().await?);
        }
        let context = self.context();
        let stored = self.link.as_ref().expect("connected above").stored;
        let mut pending = VecDeque::new();
        for (index, state) in states.iter_mut().enumerate() {
            if state.is_settled() {
                continue;
            }
            let (id, message) = messages[index]
                .as_ref()
                .expect("pending events are prepared");
            if *id > stored {
                pending.push_back((index, *id, message.clone()));
            } else if let EventState::Refused(code) = state {
                *state = EventState::Rejected(format!(
                    "RabbitMQ refused the message ({code}) and stored a later one of this \
                     producer, so its publishing id can no longer be stored"
                ));
            } else {
                *state = EventState::Acked;
            }
        }
        let window = self.settings.window;
        let timeout = self.settings.timeout;
        let link = self.link.as_mut().expect("connected above");
        let mut waiting: HashMap<u64, usize> = HashMap::new();
        while !pending.is_empty() || !waiting.is_empty() {
            let mut frame = Vec::new();
            let mut frame_bytes = FRAME_OVERHEAD;
            while let Some((_, _, message)) = pending.front() {
                let size = message.encoded_size() as usize + MESSAGE_OVERHEAD;
                if waiting.len() + frame.len() >= window || frame_bytes + size > FRAME_MAX as usize
                {
                    break;
                }
                let (index, id, message) = pending.pop_front().expect("front exists");
                frame_bytes += size;
                waiting.insert(id, index);
                frame.push(message);
            }
            if !frame.is_empty() {
                tokio::time::timeout(timeout, link.client.publish(PUBLISHER_ID, frame))
                    .await
                    .map_err(|_| retryable(format!("{context}: publishing timed out")))?
                    .map_err(|err| retryable(format!("{context}: publishing: {err}")))?;
                if !pending.is_empty() && waiting.len() < window {
                    continue;
                }
            }
            let notice = tokio::time::timeout(timeout, link.notices.recv())
                .await
                .map_err(|_| {
                    retryable(format!(
                        "{context}: no publish confirm within {timeout:?}; reconnecting"
                    ))
                })?
                .unwrap_or(Notice::Closed);
            match notice {
                Notice::Confirmed(ids) => {
                    for id in ids {
                        if let Some(index) = waiting.remove(&id) {
                            states[index] = EventState::Acked;
                        }
                    }
                }
                Notice::Refused(errors) => {
                    let mut permanent_error = None;
                    for (id, code) in errors {
                        if let Some(index) = waiting.remove(&id) {
                            if matches!(
                                code,
                                ResponseCode::StreamDoesNotExist | ResponseCode::AccessRefused
                            ) {
                                permanent_error = Some(refused(&context, "publishing", &code));
                            }
                            states[index] = EventState::Refused(format!("{code:?}"));
                        }
                    }
                    return Err(permanent_error.unwrap_or_else(|| {
                        retryable(format!(
                            "{context}: RabbitMQ refused messages; reconnecting to publish them \
                             again"
                        ))
                    }));
                }
                Notice::Closed => {
                    return Err(retryable(format!(
                        "{context}: the connection to RabbitMQ was closed"
                    )))
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for StreamSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        let mut backoff = backoff(Duration::from_millis(500));
        for attempt in 1..=RECOVER_ATTEMPTS {
            match self.connect().await {
                Ok(link) => {
                    self.link = Some(link);
                    break;
                }
                Err(SinkError::Retryable(reason)) if attempt < RECOVER_ATTEMPTS => {
                    let delay = backoff.next_delay();
                    warn!(sink = %self.settings.name, %reason, retry_in = ?delay, "cannot read the stream's position yet");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
            }
        }
        let stored = self.link.as_ref().expect("connected above").stored;
        let position = position_of(stored);
        info!(sink = %self.settings.name, producer = %self.settings.producer_name, position = ?position.map(|p| p.to_string()), "recovered the position the stream holds");
        Ok(position)
    }

    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        let mut messages = Vec::with_capacity(batch.len());
        for (event, state) in batch.iter().zip(states.iter_mut()) {
            let prepared = match publishing_id(event.position) {
                Ok(id) => self.prepare(event, id).map(|message| (id, message)),
                Err(IdError::IndexTooLarge(index)) => Err(format!(
                    "event #{index} of its transaction is beyond the {} events per transaction \
                     that stream mode can deduplicate; `outbox-relay dlq replay` publishes it \
                     again",
                    MAX_INDEX + 1
                )),
                Err(IdError::LsnTooLarge(lsn)) => {
                    return Err(permanent(format!(
                        "{}: commit LSN {lsn} is beyond the highest LSN stream mode can turn into \
                         a publishing id ({}); publish this sink in exchange mode instead",
                        self.context(),
                        Lsn(MAX_LSN)
                    )));
                }
            };
            match prepared {
                Ok(message) => messages.push(Some(message)),
                Err(reason) => {
                    if !state.is_settled() {
                        *state = EventState::Rejected(reason);
                    }
                    messages.push(None);
                }
            }
        }
        let result = self.publish(&messages, states).await;
        if result.is_err() {
            self.disconnect().await;
        }
        result
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.disconnect().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_that_do_not_fit_a_frame_are_refused() {
        let sink = StreamSink::new(settings::tests::settings("rabbitmq-stream://broker"));
        let mut event = crate::format::tests::sample(1, 0);
        assert!(sink.prepare(&event, 1).is_ok());
        event.payload = crate::Text::from(format!("\"{}\"", "x".repeat(FRAME_MAX as usize))).into();
        let err = sink.prepare(&event, 1).unwrap_err();
        assert!(err.contains("stream.frame_max"), "{err}");
    }
}
