//! Exchange mode: AMQP 0-9-1 publishes to an exchange, with publisher confirms.
//!
//! - **Messages.** Exchange from the settings, routing key from a template (default
//!   `{aggregatetype}.{type}`), `mandatory` by default. Properties: persistent delivery
//!   mode, `message_id` = the event id, `type` = the event type, `timestamp` (seconds),
//!   `content_type`, `app_id` = `outbox-relay`; headers = the event's headers, `traceparent`,
//!   and in CloudEvents binary mode the attributes as `cloudEvents_*` headers.
//! - **Confirms.** One channel per sink, in confirm mode. Publishes are pipelined: up to
//!   `window` events are handed to lapin and unconfirmed at once (see `Publishing`), and
//!   `send` returns only when every event of the batch is confirmed or rejected, so the
//!   relay's checkpoint only moves over confirmed events.
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

use super::{backoff, event_time_millis, permanent, retryable, Content, Outcome, Policy, Progress};
use crate::format::{AttributeValue, Format};
use crate::routing::Template;
use crate::{Delivery, Event, Position, Secret, Sink, SinkError};
use async_trait::async_trait;
use lapin::message::BasicReturnMessage;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm,
};
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Rounds of publishing inside one `send` before a batch with retried events is handed
/// back to the relay's backoff.
const ROUNDS_PER_SEND: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
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
    /// Most unconfirmed publishes at once.
    pub window: usize,
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

/// An open connection and its publishing channel, in confirm mode.
struct Link {
    connection: Connection,
    channel: Channel,
}

pub struct ExchangeSink {
    settings: ExchangeSettings,
    link: Option<Link>,
    /// The connection `recover` opens in the background for the first batch.
    connecting: Option<JoinHandle<Result<Link, SinkError>>>,
    progress: Progress,
}

/// One event ready to publish.
#[derive(Debug)]
struct Prepared {
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// What the broker said about one publish.
enum Answer {
    Confirmed,
    Nacked,
    Unroutable(String),
}

/// A message RabbitMQ returned as unroutable. lapin hands it to whichever confirm
/// completes next (with a multiple ack, any of the acknowledged ones), not necessarily the
/// returned message's own: its `message_id` (the event id) says whose it is.
struct Returned {
    message_id: Option<String>,
    reason: String,
}

impl ExchangeSink {
    pub fn new(settings: ExchangeSettings) -> Self {
        ExchangeSink {
            settings,
            link: None,
            connecting: None,
            progress: Progress::default(),
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
            let channel = connection.create_channel().await.map_err(io)?;
            declare(&channel, settings).await.map_err(io)?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(io)?;
            Ok::<_, SinkError>(channel)
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
            Ok(channel) => {
                info!(sink = %settings.name, endpoint = %settings.endpoint(), exchange = %settings.exchange, "connected to RabbitMQ");
                Ok(Link {
                    connection,
                    channel,
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
        outcomes: &mut [Outcome],
    ) -> Result<(), SinkError> {
        if self
            .link
            .as_ref()
            .is_some_and(|link| !link.channel.status().connected())
        {
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
        let channel = &self.link.as_ref().expect("connected above").channel;
        let context = format!("sink {}", settings.name);
        let options = BasicPublishOptions {
            mandatory: settings.mandatory,
            immediate: false,
        };
        let mut in_flight = VecDeque::new();
        let pending: Vec<usize> = (0..batch.len())
            .filter(|&i| outcomes[i] == Outcome::Pending)
            .collect();
        let mut answers = Answers::new(&pending);
        for &index in &pending {
            let message = prepared[index]
                .as_ref()
                .expect("pending events are prepared");
            let publishing = Publishing::start(channel.basic_publish(
                ShortString::from(settings.exchange.as_str()),
                message.routing_key.clone(),
                options,
                &message.body,
                message.properties.clone(),
            ))
            .await;
            in_flight.push_back((index, publishing));
            while in_flight.len() >= settings.window {
                let (index, publishing) = in_flight.pop_front().expect("window is not empty");
                let answer = publishing.answer(settings, &context).await?;
                answers.settle(settings, batch, index, answer, outcomes)?;
            }
        }
        while let Some((index, publishing)) = in_flight.pop_front() {
            let answer = publishing.answer(settings, &context).await?;
            answers.settle(settings, batch, index, answer, outcomes)?;
        }
        let to_retry = answers.to_retry;
        if let Some((first, reason)) = to_retry.first() {
            warn!(sink = %settings.name, events = to_retry.len(), first = %batch[*first].position, %reason, "publishing refused events again, with the later events of their keys");
        }
        for (index, _) in to_retry {
            republish_later_events_of_key(batch, index, outcomes);
        }
        Ok(())
    }
}

/// Declares the exchange (and the queue) when configured; otherwise checks that the
/// exchange exists, on a channel of its own since a failed check closes it.
async fn declare(channel: &Channel, settings: &ExchangeSettings) -> Result<(), lapin::Error> {
    if settings.exchange.is_empty() {
        return Ok(());
    }
    let options = ExchangeDeclareOptions {
        passive: !settings.declare,
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            ShortString::from(settings.exchange.as_str()),
            settings.exchange_kind(),
            options,
            FieldTable::default(),
        )
        .await?;
    if let (true, Some(queue)) = (settings.declare, &settings.queue) {
        channel
            .queue_declare(
                ShortString::from(queue.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(settings.exchange.as_str()),
                ShortString::from(settings.binding_key.as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// A message handed to lapin. `basic_publish` queues the message's frames for lapin's I/O
/// thread on its first poll and then waits until that thread has written them; awaiting each
/// publish in turn would cost a hand-off between threads per message. So the first poll
/// happens at once (messages go out in the order they were started) and the write is
/// awaited together with the confirm.
enum Publishing<F> {
    Writing(Pin<Box<F>>),
    Written(lapin::Result<PublisherConfirm>),
}

impl<F: Future<Output = lapin::Result<PublisherConfirm>>> Publishing<F> {
    async fn start(publish: F) -> Self {
        let mut publish = Box::pin(publish);
        match std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await {
            Poll::Ready(written) => Publishing::Written(written),
            Poll::Pending => Publishing::Writing(publish),
        }
    }

    /// What the broker answered for the message, and the returned message its confirm
    /// carried, if any.
    async fn answer(
        self,
        settings: &ExchangeSettings,
        context: &str,
    ) -> Result<(Answer, Option<Returned>), SinkError> {
        let written = match self {
            Publishing::Writing(publish) => publish.await,
            Publishing::Written(written) => written,
        };
        let confirm =
            written.map_err(|err| classify(&format!("{context}: publishing"), &err, settings))?;
        await_confirm(confirm, settings).await
    }
}

async fn await_confirm(
    confirm: PublisherConfirm,
    settings: &ExchangeSettings,
) -> Result<(Answer, Option<Returned>), SinkError> {
    let context = format!("sink {}", settings.name);
    let confirmation = tokio::time::timeout(settings.timeout, confirm)
        .await
        .map_err(|_| {
            retryable(format!(
                "{context}: no publisher confirm within {:?}; reconnecting",
                settings.timeout
            ))
        })?
        .map_err(|err| classify(&format!("{context}: waiting for a confirm"), &err, settings))?;
    let describe = |returned: BasicReturnMessage| Returned {
        message_id: returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        reason: format!(
            "returned by RabbitMQ: {} {} (no queue is bound to exchange {:?} for routing key \
             {:?})",
            returned.reply_code,
            returned.reply_text,
            settings.exchange,
            returned.delivery.routing_key.as_str()
        ),
    };
    Ok(match confirmation {
        Confirmation::Ack(returned) => (Answer::Confirmed, returned.map(describe)),
        Confirmation::Nack(returned) => (Answer::Nacked, returned.map(describe)),
        Confirmation::NotRequested => {
            return Err(retryable(format!(
                "{context}: the channel is not in confirm mode; reconnecting"
            )))
        }
    })
}

/// What one publishing round learned, as the confirms come in.
struct Answers<'a> {
    /// The round's events, among which a returned message's owner is looked up by id
    /// (returns are rare: no index is built for them).
    round: &'a [usize],
    /// Events returned as unroutable: their own confirm, which may come before or after the
    /// returned message, must not mark them confirmed.
    returned: HashSet<usize>,
    /// Events to publish again, with why.
    to_retry: Vec<(usize, String)>,
}

impl<'a> Answers<'a> {
    fn new(round: &'a [usize]) -> Self {
        Answers {
            round,
            returned: HashSet::new(),
            to_retry: Vec::new(),
        }
    }

    /// Settles event `index` by its confirm, and the owner of the returned message the
    /// confirm carried.
    fn settle(
        &mut self,
        settings: &ExchangeSettings,
        batch: &[Event],
        index: usize,
        (answer, returned): (Answer, Option<Returned>),
        outcomes: &mut [Outcome],
    ) -> Result<(), SinkError> {
        if !self.returned.contains(&index) {
            settle(settings, batch, index, answer, outcomes, &mut self.to_retry)?;
        }
        let Some(returned) = returned else {
            return Ok(());
        };
        let owner = returned.message_id.as_deref().and_then(|id| {
            self.round
                .iter()
                .copied()
                .find(|i| batch[*i].id.as_str() == id && !self.returned.contains(i))
        });
        let owner = owner.unwrap_or_else(|| {
            warn!(sink = %settings.name, message_id = ?returned.message_id, "RabbitMQ returned a message of no event in flight; counting it against the confirm that carried it");
            index
        });
        self.returned.insert(owner);
        // The return decides: a retry the owner's own nack asked for is taken back.
        self.to_retry.retain(|&(retried, _)| retried != owner);
        let answer = Answer::Unroutable(returned.reason);
        settle(settings, batch, owner, answer, outcomes, &mut self.to_retry)
    }
}

/// Applies the policy for what the broker answered about event `index`.
fn settle(
    settings: &ExchangeSettings,
    batch: &[Event],
    index: usize,
    answer: Answer,
    outcomes: &mut [Outcome],
    to_retry: &mut Vec<(usize, String)>,
) -> Result<(), SinkError> {
    let (policy, reason) = match answer {
        Answer::Confirmed => {
            outcomes[index] = Outcome::Confirmed;
            return Ok(());
        }
        Answer::Nacked => (
            settings.on_nack,
            "nacked by RabbitMQ (a queue refused it: full with x-overflow=reject-publish, or \
             an internal error)"
                .to_owned(),
        ),
        Answer::Unroutable(reason) => (settings.on_unroutable, reason),
    };
    let event = &batch[index];
    match policy {
        Policy::Retry => to_retry.push((index, reason)),
        Policy::DeadLetter => outcomes[index] = Outcome::Rejected(reason),
        Policy::Fail => {
            return Err(permanent(format!(
                "sink {}: event {} at {} was {reason}; fix the broker side (or set on_nack / \
                 on_unroutable to retry or dead-letter), then restart the relay",
                settings.name, event.id, event.position
            )))
        }
    }
    Ok(())
}

/// Event `index` is published again: so are the later events of its key that the broker
/// already confirmed, so that the key's last copies stay in order.
fn republish_later_events_of_key(batch: &[Event], index: usize, outcomes: &mut [Outcome]) {
    outcomes[index] = Outcome::Pending;
    let key = &batch[index].key;
    for later in index + 1..batch.len() {
        if batch[later].key == *key && outcomes[later] == Outcome::Confirmed {
            outcomes[later] = Outcome::Pending;
        }
    }
}

/// Sorts a lapin error into retryable (network, broker restart, resource alarms) and
/// permanent (missing exchange, refused access, bad credentials or vhost) with the fix.
fn classify(context: &str, err: &lapin::Error, settings: &ExchangeSettings) -> SinkError {
    let ErrorKind::ProtocolError(amqp) = err.kind() else {
        // rustls refusing the broker's certificate: retrying cannot help.
        if err.to_string().contains("invalid peer certificate") {
            return permanent(format!(
                "{context}: {err}: check ca_file and that the certificate is for the host in url"
            ));
        }
        return retryable(format!("{context}: {err}"));
    };
    let message = amqp.get_message().as_str();
    match amqp.kind() {
        AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => permanent(format!(
            "{context}: {message}: the exchange {:?} does not exist; create it or set \
             declare = true",
            settings.exchange
        )),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => permanent(format!(
            "{context}: {message}: check the username and password (password_file), and that \
             the user may write to the exchange (rabbitmqctl set_permissions)"
        )),
        AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => permanent(format!(
            "{context}: {message}: the exchange or queue exists with other settings, or a \
             message exceeds the broker's max_message_size (lower max_message_bytes)"
        )),
        // RabbitMQ refuses with NOT_ALLOWED both what an operator must fix (a vhost that does
        // not exist, a user without access) and what passes (the vhost's or user's connection
        // limit reached, the vhost restarting); its reply text tells them apart.
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) if message.contains("connection limit") => {
            retryable(format!(
                "{context}: the connection limit of virtual host {:?} (or of the user) is \
                 reached ({message}); retrying. Raise it (rabbitmqctl set_vhost_limits, \
                 set_user_limits) or close other clients' connections",
                settings.uri().map(|uri| uri.vhost).unwrap_or_default()
            ))
        }
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) if message.contains("is down") => retryable(
            format!("{context}: {message}; retrying until the virtual host is up"),
        ),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => permanent(format!(
            "{context}: {message}: the virtual host does not exist or the user may not use it"
        )),
        _ => retryable(format!("{context}: {message}")),
    }
}

async fn close(connection: Connection, timeout: Duration) {
    let closing = connection.close(200, ShortString::from("outbox-relay sink closing"));
    let _ = tokio::time::timeout(timeout, closing).await;
}

/// Problems `outbox-relay check` reports: the broker unreachable, credentials or vhost
/// refused, the exchange missing (when the sink does not declare it), or an exchange or
/// queue the sink declares that exists with other settings.
pub async fn check(settings: &ExchangeSettings) -> Vec<String> {
    // Declares nothing here: what the sink declares is compared below.
    let without_declarations = ExchangeSettings {
        declare: false,
        exchange: match settings.declare {
            true => String::new(),
            false => settings.exchange.clone(),
        },
        ..settings.clone()
    };
    match ExchangeSink::connect(&without_declarations).await {
        Ok(link) => {
            let problems = match settings.declare {
                true => declaration_clashes(&link.connection, settings).await,
                false => Vec::new(),
            };
            close(link.connection, settings.timeout).await;
            problems
        }
        Err(err) => vec![err.to_string()],
    }
}

/// What the sink would declare that already exists with other settings (type, durability,
/// arguments), which RabbitMQ refuses with PRECONDITION_FAILED when `run` declares it. An
/// existing exchange or queue is declared again with the sink's own settings, each step on a
/// channel of its own (a refused declaration closes its channel): an equivalent declaration
/// changes nothing, and what does not exist yet is left for `run` to create.
async fn declaration_clashes(connection: &Connection, settings: &ExchangeSettings) -> Vec<String> {
    let name = &settings.name;
    let mut problems = Vec::new();
    let exchange = ShortString::from(settings.exchange.as_str());
    let declare_exchange = |passive: bool| {
        let exchange = exchange.clone();
        async move {
            let channel = connection.create_channel().await?;
            let options = ExchangeDeclareOptions {
                passive,
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            channel
                .exchange_declare(
                    exchange,
                    settings.exchange_kind(),
                    options,
                    FieldTable::default(),
                )
                .await
        }
    };
    if declare_exchange(true).await.is_ok() {
        if let Err(err) = declare_exchange(false).await {
            problems.push(format!(
                "sink {name}: exchange {:?} exists with other settings than the sink declares \
                 (type {}, durable, no arguments): {err}. Set exchange_type to its type, set \
                 declare = false to use it as it is, or delete it so that the sink declares it",
                settings.exchange, settings.exchange_type
            ));
        }
    }
    if let Some(queue) = &settings.queue {
        let declare_queue = |passive: bool| async move {
            let channel = connection.create_channel().await?;
            let options = QueueDeclareOptions {
                passive,
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    options,
                    FieldTable::default(),
                )
                .await
        };
        if declare_queue(true).await.is_ok() {
            if let Err(err) = declare_queue(false).await {
                problems.push(format!(
                    "sink {name}: queue {queue:?} exists with other settings than the sink \
                     declares (durable, no arguments): {err}. Remove queue from the sink's \
                     settings and bind the queue yourself, or delete it so that the sink \
                     declares it"
                ));
            }
        }
    }
    problems
}

#[async_trait]
impl Sink for ExchangeSink {
    /// Starts connecting (handshake, declarations, confirm mode) while the stream starts,
    /// so the first batch does not wait for it (17 ms against a local broker). What fails
    /// is reported by the first batch, which retries it as before.
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        let settings = self.settings.clone();
        self.connecting = Some(tokio::spawn(async move { Self::connect(&settings).await }));
        Ok(None)
    }

    async fn send(&mut self, batch: &[Event]) -> Result<Delivery, SinkError> {
        let mut outcomes = std::mem::take(self.progress.start(batch));
        let prepared: Vec<Option<Prepared>> = batch
            .iter()
            .zip(outcomes.iter_mut())
            .map(|(event, outcome)| match self.prepare(event) {
                Ok(message) => Some(message),
                Err(reason) => {
                    *outcome = Outcome::Rejected(reason);
                    None
                }
            })
            .collect();
        let mut backoff = backoff(FIRST_BACKOFF);
        for round in 1..=ROUNDS_PER_SEND {
            let result = self.publish_round(batch, &prepared, &mut outcomes).await;
            if let Err(err) = result {
                self.disconnect().await;
                for index in 0..batch.len() {
                    if outcomes[index] == Outcome::Pending {
                        republish_later_events_of_key(batch, index, &mut outcomes);
                    }
                }
                self.progress.outcomes = outcomes;
                return Err(err);
            }
            let pending = outcomes.iter().filter(|o| **o == Outcome::Pending).count();
            if pending == 0 {
                self.progress.outcomes = outcomes;
                return Ok(self.progress.finish());
            }
            if round < ROUNDS_PER_SEND {
                tokio::time::sleep(backoff.next_delay()).await;
            } else {
                self.progress.outcomes = outcomes;
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
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_retry_takes_the_later_confirmed_events_of_the_same_key_along() {
        let mut batch = vec![sample(1, 0), sample(1, 1), sample(1, 2), sample(1, 3)];
        batch[1].key = Text::from("other");
        let mut outcomes = vec![
            Outcome::Pending,
            Outcome::Confirmed,
            Outcome::Confirmed,
            Outcome::Rejected("too big".into()),
        ];
        republish_later_events_of_key(&batch, 0, &mut outcomes);
        assert_eq!(
            outcomes,
            vec![
                Outcome::Pending,
                Outcome::Confirmed,
                Outcome::Pending,
                Outcome::Rejected("too big".into())
            ]
        );
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
