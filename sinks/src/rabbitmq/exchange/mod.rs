//! Exchange mode: AMQP 0-9-1 publishes to an exchange, with publisher confirms.
//!
//! - **Messages.** Exchange from the settings, routing key from a template (default
//!   `{aggregatetype}.{type}`), `mandatory` by default. Properties: persistent delivery
//!   mode, `message_id` = the event id, `type` = the event type, `timestamp` (seconds),
//!   `content_type`, `app_id` = `outbox-relay`; headers = the event's headers, `traceparent`,
//!   and in CloudEvents binary mode the attributes as `cloudEvents_*` headers.
//! - **Channels and confirms.** One connection per sink with `channels` channels in confirm
//!   mode; each event goes to the channel its key hashes to, so every event of a key takes
//!   one channel, and RabbitMQ keeps a channel's messages in order. RabbitMQ handles each
//!   channel in a process of its own, so several channels publish in parallel where one
//!   waits. Publishes are pipelined: up to `window` events per channel are handed to lapin
//!   and unconfirmed at once (see `Publishing`), and `send` returns only when every event of
//!   the batch is confirmed or rejected, so the relay's checkpoint only moves over confirmed
//!   events.
//! - **Negative outcomes.** A `basic.nack` follows `on_nack`, a `mandatory` publish
//!   returned unroutable follows `on_unroutable`: `retry`, `dead-letter` (a rejection the
//!   relay stores in its dead-letter table with the broker's reason) or `fail` (the relay
//!   stops with the reason). Nothing is dropped silently. A returned message is matched
//!   to its event by `message_id`, not by the confirm lapin attaches it to (see `Returned`).
//! - **Per-key order on retry.** Publishes are pipelined, so when event 5 of key K is
//!   nacked, a later event 6 of K may already be confirmed. Retrying 5 alone would put it
//!   after 6 for good. So a retry publishes the nacked event again *and every later event
//!   of its key in the batch*, in batch order, even those already confirmed. A consumer
//!   can then see 6, 5, 6: the last copy of every event is in per-key order, and the
//!   `message_id` (and, in CloudEvents, the `sequence` attribute) tell the copies apart.
//!   The same rule applies to events whose confirm was lost with the connection.
//! - **Connection loss, broker restart.** A failed publish, a channel or connection error,
//!   or a confirm that does not come within `timeout` drops the connection and returns a
//!   retryable error: the relay backs off and hands the batch back, the sink reconnects
//!   and publishes what was not confirmed. Events confirmed before are not sent again
//!   (except as described above); events whose confirm was lost are sent again. Delivery
//!   is therefore at-least-once, with a stable `message_id` for consumers to dedup on.
//! - **Declarations.** With `declare`, the exchange (durable) and optionally a durable
//!   queue bound to it are declared on every connect. Without it the exchange must exist:
//!   a missing one stops the relay with the fix instead of dead-lettering everything.
//! - **TLS.** `amqps://` URLs use rustls with the system's CA certificates, plus the PEM
//!   file `ca_file` when set; the server's host name is verified.

mod broker;
mod confirm;

pub use broker::check;

use super::{backoff, event_time_millis, permanent, retryable, Content, Policy};
use crate::format::{AttributeValue, Format};
use crate::routing::Template;
use crate::{Event, EventState, Position, Secret, Sink, SinkError};
use async_trait::async_trait;
use broker::{classify, close, declare};
use confirm::{republish_later_events_of_key, Answers, Publishing};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Rounds of publishing inside one `send` before a batch with retried events is handed
/// back to the relay's backoff.
const ROUNDS_PER_SEND: u32 = 5;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Channels per sink unless `channels` says otherwise: chosen by measurement
/// (BENCHMARKS.md, the RabbitMQ channels experiment).
pub const DEFAULT_CHANNELS: usize = 4;

/// RabbitMQ's default `max_message_size` (128 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// Everything exchange mode needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct ExchangeSettings {
    /// The sink's name, for messages and the connection name.
    pub name: String,
    /// `amqp://host:5672/vhost` or `amqps://...`; may carry `user:password@` and the
    /// `heartbeat`, `connection_timeout`, `frame_max` query parameters.
    pub url: String,
    /// Overrides the URL's user.
    pub username: Option<String>,
    /// Overrides the URL's password.
    pub password: Option<Secret>,
    /// PEM file of CA certificates trusted for `amqps://`, besides the system's.
    pub ca_file: Option<PathBuf>,
    pub exchange: String,
    /// `topic`, `direct`, `fanout`, `headers`, or a plugin's type; used when declaring.
    pub exchange_type: String,
    /// Declare the exchange (durable) on connect.
    pub declare: bool,
    /// Also declare this durable queue and bind it with `binding_key` (tests, demos).
    pub queue: Option<String>,
    pub binding_key: String,
    pub routing_key: Template,
    pub format: Format,
    /// CloudEvents binary mode: attributes as `cloudEvents_` headers, the payload as body.
    pub binary: bool,
    /// Publish with the `mandatory` flag, so unroutable events come back.
    pub mandatory: bool,
    pub on_nack: Policy,
    pub on_unroutable: Policy,
    /// Most unconfirmed publishes at once, per channel.
    pub window: usize,
    /// Channels the events are spread over by key.
    pub channels: usize,
    /// Larger messages are dead-lettered (RabbitMQ's `max_message_size`).
    pub max_message_bytes: usize,
    /// Connecting, and waiting for one confirm.
    pub timeout: Duration,
}

impl ExchangeSettings {
    /// Checks what can be checked without a broker.
    pub fn validate(&self) -> Result<(), String> {
        let uri = self.uri()?;
        if self.ca_file.is_some() && uri.scheme != AMQPScheme::AMQPS {
            return Err("ca_file is set but the url is not amqps://".into());
        }
        if self.window == 0 {
            return Err("window must be at least 1".into());
        }
        if !(1..=MAX_CHANNELS).contains(&self.channels) {
            return Err(format!("channels must be from 1 to {MAX_CHANNELS}"));
        }
        if ShortString::try_new(self.exchange.as_str()).is_err() {
            return Err("exchange names are at most 255 bytes".into());
        }
        Ok(())
    }

    /// The URL with the configured credentials.
    fn uri(&self) -> Result<AMQPUri, String> {
        let mut uri: AMQPUri = self.url.parse().map_err(|err| {
            format!("url is not an AMQP URL ({err}): use amqp://host:5672/vhost or amqps://...")
        })?;
        if let Some(username) = &self.username {
            uri.authority.userinfo.username = username.clone();
        }
        if let Some(password) = &self.password {
            uri.authority.userinfo.password = password.expose().to_owned();
        }
        Ok(uri)
    }

    /// Where the sink connects, without credentials: for messages.
    fn endpoint(&self) -> String {
        match self.uri() {
            Ok(uri) => format!(
                "{}:{} (vhost {:?})",
                uri.authority.host, uri.authority.port, uri.vhost
            ),
            Err(_) => "<invalid url>".into(),
        }
    }

    fn exchange_kind(&self) -> ExchangeKind {
        match self.exchange_type.as_str() {
            "topic" => ExchangeKind::Topic,
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "headers" => ExchangeKind::Headers,
            other => ExchangeKind::Custom(other.to_owned()),
        }
    }
}

/// The most channels a sink opens (RabbitMQ's default `channel_max` is 2047).
const MAX_CHANNELS: usize = 64;

/// An open connection and its publishing channels, in confirm mode.
struct Link {
    connection: Connection,
    channels: Vec<Channel>,
}

pub struct ExchangeSink {
    settings: ExchangeSettings,
    link: Option<Link>,
    /// The connection `recover` opens in the background for the first batch.
    connecting: Option<JoinHandle<Result<Link, SinkError>>>,
}

/// One event ready to publish.
#[derive(Debug)]
struct Prepared {
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl ExchangeSink {
    pub fn new(settings: ExchangeSettings) -> Self {
        ExchangeSink {
            settings,
            link: None,
            connecting: None,
        }
    }

    async fn connect(settings: &ExchangeSettings) -> Result<Link, SinkError> {
        let uri = settings.uri().map_err(permanent)?;
        let tls = match &settings.ca_file {
            Some(path) => OwnedTLSConfig {
                identity: None,
                cert_chain: Some(std::fs::read_to_string(path).map_err(|err| {
                    permanent(format!(
                        "sink {}: cannot read ca_file {}: {err}",
                        settings.name,
                        path.display()
                    ))
                })?),
            },
            None => OwnedTLSConfig::default(),
        };
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("outbox-relay sink {}", settings.name),
        ));
        let endpoint = settings.endpoint();
        let runtime = lapin::runtime::default_runtime()
            .map_err(|err| permanent(format!("no async runtime for lapin: {err}")))?;
        let connecting = Connection::connect_uri_with_config(uri, properties, tls, runtime);
        let connection = tokio::time::timeout(settings.timeout, connecting)
            .await
            .map_err(|_| {
                retryable(format!(
                    "sink {}: connecting to RabbitMQ at {endpoint} timed out after {:?}",
                    settings.name, settings.timeout
                ))
            })?
            .map_err(|err| {
                classify(
                    &format!(
                        "sink {}: connecting to RabbitMQ at {endpoint}",
                        settings.name
                    ),
                    &err,
                    settings,
                )
            })?;
        Self::open_channel(settings, connection).await
    }

    /// Declares or checks the topology, then opens the publishing channel.
    async fn open_channel(
        settings: &ExchangeSettings,
        connection: Connection,
    ) -> Result<Link, SinkError> {
        let context = format!("sink {}", settings.name);
        let io = |err: lapin::Error| classify(&context, &err, settings);
        let setup = async {
            let mut channels = Vec::with_capacity(settings.channels);
            for _ in 0..settings.channels {
                let channel = connection.create_channel().await.map_err(io)?;
                if channels.is_empty() {
                    declare(&channel, settings).await.map_err(io)?;
                }
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(io)?;
                channels.push(channel);
            }
            Ok::<_, SinkError>(channels)
        };
        let result = tokio::time::timeout(settings.timeout, setup)
            .await
            .unwrap_or_else(|_| {
                Err(retryable(format!(
                    "{context}: opening a channel timed out after {:?}",
                    settings.timeout
                )))
            });
        match result {
            Ok(channels) => {
                info!(sink = %settings.name, endpoint = %settings.endpoint(), exchange = %settings.exchange,
                    channels = channels.len(), "connected to RabbitMQ");
                Ok(Link {
                    connection,
                    channels,
                })
            }
            Err(err) => {
                close(connection, settings.timeout).await;
                Err(err)
            }
        }
    }

    async fn disconnect(&mut self) {
        if let Some(connecting) = self.connecting.take() {
            // One still connecting is given up rather than waited for.
            if !connecting.is_finished() {
                connecting.abort();
            } else if let Ok(Ok(link)) = connecting.await {
                close(link.connection, self.settings.timeout).await;
            }
        }
        if let Some(link) = self.link.take() {
            close(link.connection, self.settings.timeout).await;
        }
    }

    /// The message for `event`, or why it cannot be published.
    fn prepare(&self, event: &Event) -> Result<Prepared, String> {
        let settings = &self.settings;
        let content = Content::of(event, settings.format, settings.binary);
        if content.body.len() > settings.max_message_bytes {
            return Err(format!(
                "message of {} bytes is larger than max_message_bytes ({}, RabbitMQ's \
                 max_message_size)",
                content.body.len(),
                settings.max_message_bytes
            ));
        }
        let mut routing_key = String::new();
        settings.routing_key.render(event, &mut routing_key);
        let routing_key = ShortString::try_new(routing_key).map_err(|err| {
            format!("routing key is too long for AMQP ({err}): shorten the routing_key template")
        })?;
        let short = |what: &str, value: &str| {
            ShortString::try_new(value)
                .map_err(|err| format!("{what} is too long for an AMQP property ({err})"))
        };
        let mut headers = FieldTable::default();
        for (name, value) in content.headers {
            let value = match value {
                AttributeValue::String(text) => AMQPValue::LongString(LongString::from(text)),
                AttributeValue::Integer(number) => AMQPValue::LongLongInt(number),
            };
            headers.insert(short("header name", &name)?, value);
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(short("event id", &event.id)?)
            .with_type(short("event type", &event.event_type)?)
            .with_timestamp((event_time_millis(event).max(0) / 1000) as u64)
            .with_content_type(ShortString::from(content.content_type))
            .with_app_id(ShortString::from("outbox-relay"))
            .with_headers(headers);
        Ok(Prepared {
            routing_key,
            body: content.body,
            properties,
        })
    }

    /// Publishes the pending events of `batch` once, pipelined, and records what the
    /// broker answered. Events to retry stay pending. Errors leave the connection unusable.
    async fn publish_round(
        &mut self,
        batch: &[Event],
        prepared: &[Option<Prepared>],
        states: &mut [EventState],
    ) -> Result<(), SinkError> {
        if self.link.as_ref().is_some_and(|link| {
            link.channels
                .iter()
                .any(|channel| !channel.status().connected())
        }) {
            self.disconnect().await;
        }
        if self.link.is_none() {
            let link = match self.connecting.take() {
                Some(connecting) => connecting.await.unwrap_or_else(|err| {
                    Err(retryable(format!(
                        "sink {}: connecting to RabbitMQ failed: {err}",
                        self.settings.name
                    )))
                })?,
                None => Self::connect(&self.settings).await?,
            };
            self.link = Some(link);
        }
        let settings = &self.settings;
        let channels = &self.link.as_ref().expect("connected above").channels;
        let context = format!("sink {}", settings.name);
        let options = BasicPublishOptions {
            mandatory: settings.mandatory,
            immediate: false,
        };
        let mut in_flight = VecDeque::new();
        let pending: Vec<usize> = (0..batch.len())
            .filter(|&i| states[i] == EventState::Pending)
            .collect();
        let mut answers = Answers::new(&pending);
        let window = settings.window * channels.len();
        for &index in &pending {
            let message = prepared[index]
                .as_ref()
                .expect("pending events are prepared");
            let channel = &channels[channel_of(&batch[index].key, channels.len())];
            let publishing = Publishing::start(channel.basic_publish(
                ShortString::from(settings.exchange.as_str()),
                message.routing_key.clone(),
                options,
                &message.body,
                message.properties.clone(),
            ))
            .await;
            in_flight.push_back((index, publishing));
            while in_flight.len() >= window {
                let (index, publishing) = in_flight.pop_front().expect("window is not empty");
                let answer = publishing.answer(settings, &context).await?;
                answers.settle(settings, batch, index, answer, states)?;
            }
        }
        while let Some((index, publishing)) = in_flight.pop_front() {
            let answer = publishing.answer(settings, &context).await?;
            answers.settle(settings, batch, index, answer, states)?;
        }
        let to_retry = answers.to_retry;
        if let Some((first, reason)) = to_retry.first() {
            warn!(sink = %settings.name, events = to_retry.len(), first = %batch[*first].position, %reason, "publishing refused events again, with the later events of their keys");
        }
        for (index, _) in to_retry {
            republish_later_events_of_key(batch, index, states);
        }
        Ok(())
    }
}

/// The channel of the events of `key`: a hash that stays the same across runs and
/// versions (FNV-1a), so a key's events keep to one channel.
fn channel_of(key: &str, channels: usize) -> usize {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (hash % channels as u64) as usize
}

#[async_trait]
impl Sink for ExchangeSink {
    /// Starts connecting (handshake, declarations, confirm mode) while the stream starts,
    /// so the first batch does not wait for it. What fails
    /// is reported by the first batch, which retries it as before.
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        let settings = self.settings.clone();
        self.connecting = Some(tokio::spawn(async move { Self::connect(&settings).await }));
        Ok(None)
    }

    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        let prepared: Vec<Option<Prepared>> = batch
            .iter()
            .zip(states.iter_mut())
            .map(|(event, state)| match self.prepare(event) {
                Ok(message) => Some(message),
                Err(reason) => {
                    *state = EventState::Rejected(reason);
                    None
                }
            })
            .collect();
        let mut backoff = backoff(FIRST_BACKOFF);
        for round in 1..=ROUNDS_PER_SEND {
            let result = self.publish_round(batch, &prepared, states).await;
            if let Err(err) = result {
                self.disconnect().await;
                for index in 0..batch.len() {
                    if states[index] == EventState::Pending {
                        republish_later_events_of_key(batch, index, states);
                    }
                }
                return Err(err);
            }
            let pending = states
                .iter()
                .filter(|state| **state == EventState::Pending)
                .count();
            if pending == 0 {
                return Ok(());
            }
            if round < ROUNDS_PER_SEND {
                tokio::time::sleep(backoff.next_delay()).await;
            } else {
                return Err(retryable(format!(
                    "sink {}: {pending} events were refused or returned by RabbitMQ in \
                     {ROUNDS_PER_SEND} rounds; retrying with the relay's backoff",
                    self.settings.name
                )));
            }
        }
        unreachable!("the last round returns")
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.disconnect().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    pub(crate) fn settings() -> ExchangeSettings {
        ExchangeSettings {
            name: "amqp".into(),
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            username: None,
            password: None,
            ca_file: None,
            exchange: "outbox".into(),
            exchange_type: "topic".into(),
            declare: false,
            queue: None,
            binding_key: "#".into(),
            routing_key: Template::parse("{aggregatetype}.{type}").unwrap(),
            format: Format::CloudEvents,
            binary: true,
            mandatory: true,
            on_nack: Policy::Retry,
            on_unroutable: Policy::DeadLetter,
            window: 64,
            channels: DEFAULT_CHANNELS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn messages_carry_the_event_identity_and_refuse_what_amqp_cannot_hold() {
        let sink = ExchangeSink::new(settings());
        let mut event = sample(0x10, 1);
        let message = sink.prepare(&event).unwrap();
        assert_eq!(message.routing_key.as_str(), "order.OrderCreated");
        assert_eq!(
            message.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(&*event.id)
        );
        assert_eq!(
            message.properties.kind().as_ref().map(|s| s.as_str()),
            Some("OrderCreated")
        );
        assert_eq!(*message.properties.delivery_mode(), Some(2));
        assert_eq!(*message.properties.timestamp(), Some(1_700_000_000));
        let headers = message.properties.headers().as_ref().unwrap();
        assert!(headers.inner().contains_key("cloudEvents_id"));
        event.event_type = Text::from("x".repeat(300));
        let err = sink.prepare(&event).unwrap_err();
        assert!(err.contains("routing key is too long"), "{err}");
        let mut small = settings();
        small.max_message_bytes = 4;
        let err = ExchangeSink::new(small).prepare(&sample(1, 0)).unwrap_err();
        assert!(err.contains("max_message_bytes"), "{err}");
    }

    #[test]
    fn a_key_keeps_to_one_channel_and_keys_spread_over_all() {
        let mut used = [0; 4];
        for n in 0..1000 {
            let key = format!("order-{n}");
            let channel = channel_of(&key, 4);
            assert_eq!(channel, channel_of(&key, 4));
            used[channel] += 1;
        }
        assert!(used.iter().all(|&n| n > 150), "{used:?}");
        assert_eq!(channel_of("anything", 1), 0);
    }

    #[test]
    fn urls_take_the_configured_credentials_and_never_show_them() {
        let mut settings = settings();
        settings.username = Some("relay".into());
        settings.password = Some(Secret::new("s3cret"));
        let uri = settings.uri().unwrap();
        assert_eq!(uri.authority.userinfo.username, "relay");
        assert_eq!(uri.authority.userinfo.password, "s3cret");
        assert!(!settings.endpoint().contains("s3cret"));
        assert!(!format!("{settings:?}").contains("s3cret"));
        settings.url = "http://nope".into();
        assert!(settings.validate().unwrap_err().contains("amqp://"));
        let mut tls = self::tests::settings();
        tls.ca_file = Some("/tmp/ca.pem".into());
        assert!(tls.validate().unwrap_err().contains("amqps://"));
    }
}
