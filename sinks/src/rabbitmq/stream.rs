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

use super::{backoff, event_time_millis, permanent, retryable, Content, Outcome, Progress};
use crate::format::{AttributeValue, Format};
use crate::{Delivery, Event, Lsn, Position, Secret, Sink, SinkError};
use async_trait::async_trait;
use rabbitmq_stream_client::types::{Message, MessageResult, ResponseCode, ResponseKind};
use rabbitmq_stream_client::{Client, ClientOptions, TlsConfiguration};
use rabbitmq_stream_protocol::codec::Encoder;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Bits of the publishing id that hold the event's index in its transaction.
pub const INDEX_BITS: u32 = 16;
/// The highest index that gets a publishing id.
pub const MAX_INDEX: u32 = (1 << INDEX_BITS) - 1;
/// The highest commit LSN that gets a publishing id.
pub const MAX_LSN: u64 = (1 << (64 - INDEX_BITS)) - 1;
/// The frame size the sink asks for and keeps under: RabbitMQ's default `stream.frame_max`.
pub const FRAME_MAX: u32 = 1024 * 1024;
/// Room left in a publish frame for its header and each message's id and length fields.
const FRAME_OVERHEAD: usize = 64;
const MESSAGE_OVERHEAD: usize = 12;
/// The publisher id of the sink's producer on its connection.
const PUBLISHER_ID: u8 = 1;
/// Connection attempts `recover` makes before it gives up (with backoff, about 15 s).
const RECOVER_ATTEMPTS: u32 = 6;

/// Why a position gets no publishing id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    /// The event's index in its transaction is above [`MAX_INDEX`].
    IndexTooLarge(u32),
    /// The commit LSN is above [`MAX_LSN`].
    LsnTooLarge(Lsn),
}

/// The publishing id of the event at `position`: `commit LSN << 16 | index`. Injective and
/// order-preserving over positions within the caps.
pub fn publishing_id(position: Position) -> Result<u64, IdError> {
    if position.index > MAX_INDEX {
        return Err(IdError::IndexTooLarge(position.index));
    }
    if position.commit_lsn.0 > MAX_LSN {
        return Err(IdError::LsnTooLarge(position.commit_lsn));
    }
    Ok((position.commit_lsn.0 << INDEX_BITS) | u64::from(position.index))
}

/// The position a publishing id was derived from; `None` for 0, which the broker answers
/// when the producer has stored nothing.
pub fn position_of(id: u64) -> Option<Position> {
    (id != 0).then(|| Position {
        commit_lsn: Lsn(id >> INDEX_BITS),
        index: (id & u64::from(MAX_INDEX)) as u32,
    })
}

/// Everything stream mode needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The sink's name, for messages.
    pub name: String,
    /// `rabbitmq-stream://host:5552/vhost` or `rabbitmq-stream+tls://host:5551/vhost`; may
    /// carry `user:password@`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of the CA certificates to trust; required for `rabbitmq-stream+tls://`.
    pub ca_file: Option<PathBuf>,
    pub stream: String,
    /// The producer name: the broker deduplicates per (producer name, stream).
    pub producer_name: String,
    /// Create the stream if it does not exist.
    pub declare: bool,
    pub format: Format,
    pub binary: bool,
    /// Most unconfirmed messages at once.
    pub window: usize,
    /// Connecting, each request, and waiting for confirms.
    pub timeout: Duration,
}

/// Where to connect, resolved from the URL and the credentials.
struct Endpoint {
    host: String,
    port: u16,
    vhost: String,
    user: String,
    password: Secret,
    tls: bool,
}

impl StreamSettings {
    /// Checks what can be checked without a broker.
    pub fn validate(&self) -> Result<(), String> {
        let endpoint = self.endpoint()?;
        if endpoint.tls && self.ca_file.is_none() {
            return Err(
                "rabbitmq-stream+tls:// needs ca_file: the PEM file of the CA that \
                        signed the broker's certificate"
                    .into(),
            );
        }
        if !endpoint.tls && self.ca_file.is_some() {
            return Err("ca_file is set but the url is not rabbitmq-stream+tls://".into());
        }
        if self.stream.is_empty() || self.producer_name.is_empty() {
            return Err("stream and producer_name must not be empty".into());
        }
        if self.window == 0 {
            return Err("window must be at least 1".into());
        }
        Ok(())
    }

    fn endpoint(&self) -> Result<Endpoint, String> {
        let url = url::Url::parse(&self.url).map_err(|err| {
            format!(
                "url is not a URL ({err}): use rabbitmq-stream://host:5552/vhost or \
                 rabbitmq-stream+tls://host:5551/vhost"
            )
        })?;
        let tls = match url.scheme() {
            "rabbitmq-stream" => false,
            "rabbitmq-stream+tls" => true,
            other => {
                return Err(format!(
                    "url scheme {other:?} is not rabbitmq-stream or rabbitmq-stream+tls \
                     (stream mode speaks the stream protocol, port 5552)"
                ))
            }
        };
        let host = url
            .host_str()
            .ok_or("url names no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = url.port().unwrap_or(if tls { 5551 } else { 5552 });
        let decode = |text: &str| {
            url::form_urlencoded::parse(format!("x={text}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => decode(path),
        };
        let user = match (&self.username, url.username()) {
            (Some(user), _) => user.clone(),
            (None, "") => "guest".to_owned(),
            (None, user) => decode(user),
        };
        let password = match (&self.password, url.password()) {
            (Some(password), _) => password.clone(),
            (None, Some(password)) => Secret::new(decode(password)),
            (None, None) => Secret::new("guest"),
        };
        Ok(Endpoint {
            host,
            port,
            vhost,
            user,
            password,
            tls,
        })
    }
}

impl Endpoint {
    fn options(&self, host: &str, port: u16, ca_file: Option<&PathBuf>) -> ClientOptions {
        let mut builder = ClientOptions::builder()
            .host(host)
            .port(port)
            .user(&self.user)
            .password(self.password.expose())
            .v_host(&self.vhost)
            .max_frame_size(FRAME_MAX);
        if let Some(ca_file) = ca_file {
            builder = builder.tls(
                TlsConfiguration::builder()
                    .enable(true)
                    .add_root_certificates(ca_file.display().to_string())
                    .build(),
            );
        }
        builder.build()
    }
}

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
    progress: Progress,
    /// Events of the current batch the broker refused in their last attempt, by id.
    refused: HashMap<u64, ResponseCode>,
}

impl StreamSink {
    pub fn new(settings: StreamSettings) -> Self {
        StreamSink {
            settings,
            link: None,
            progress: Progress::default(),
            refused: HashMap::new(),
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

    /// Connects to a node, finds (or creates) the stream and its leader, connects there and
    /// declares the producer.
    async fn connect(&self) -> Result<Link, SinkError> {
        let settings = &self.settings;
        let endpoint = settings.endpoint().map_err(permanent)?;
        let ca_file = settings.ca_file.as_ref();
        if let Some(path) = ca_file {
            let pem = std::fs::read_to_string(path).map_err(|err| {
                permanent(format!(
                    "{}: cannot read ca_file {}: {err}",
                    self.context(),
                    path.display()
                ))
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(permanent(format!(
                    "{}: ca_file {} holds no PEM certificate",
                    self.context(),
                    path.display()
                )));
            }
        }
        let locator = self
            .open(&endpoint, &endpoint.host, endpoint.port, ca_file)
            .await?;
        let leader = self.leader(&locator).await;
        let _ = tokio::time::timeout(settings.timeout, locator.close()).await;
        let (host, port) = leader?;
        let client = self.open(&endpoint, &host, port, ca_file).await?;
        match self.declare_producer(&client).await {
            Ok((notices, stored)) => {
                info!(sink = %settings.name, stream = %settings.stream, leader = %format!("{host}:{port}"), producer = %settings.producer_name, stored = ?position_of(stored).map(|p| p.to_string()), "connected to the RabbitMQ stream");
                Ok(Link {
                    client,
                    notices,
                    stored,
                })
            }
            Err(err) => {
                let _ = tokio::time::timeout(settings.timeout, client.close()).await;
                Err(err)
            }
        }
    }

    async fn open(
        &self,
        endpoint: &Endpoint,
        host: &str,
        port: u16,
        ca_file: Option<&PathBuf>,
    ) -> Result<Client, SinkError> {
        let options = endpoint.options(host, port, ca_file);
        let connecting = Client::connect(options);
        match tokio::time::timeout(self.settings.timeout, connecting).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(rabbitmq_stream_client::error::ClientError::RequestError(code))) => {
                Err(refused_at_connect(&self.context(), &code, endpoint))
            }
            // rustls refusing the broker's certificate: retrying cannot help.
            Ok(Err(err)) if err.to_string().contains("invalid peer certificate") => {
                Err(permanent(format!(
                    "{}: connecting to {host}:{port}: {err}: check ca_file and that the \
                     broker's certificate is for the host in url",
                    self.context()
                )))
            }
            Ok(Err(err)) => Err(retryable(format!(
                "{}: connecting to {host}:{port}: {err}: is RabbitMQ running with the stream \
                 plugin enabled (rabbitmq-plugins enable rabbitmq_stream)?",
                self.context()
            ))),
            Err(_) => Err(retryable(format!(
                "{}: connecting to {host}:{port} timed out after {:?}",
                self.context(),
                self.settings.timeout
            ))),
        }
    }

    /// The stream leader's advertised host and port; creates the stream if allowed.
    async fn leader(&self, client: &Client) -> Result<(String, u16), SinkError> {
        let stream = &self.settings.stream;
        let mut found = self
            .timed(
                "reading stream metadata",
                client.metadata(vec![stream.clone()]),
            )
            .await?;
        let exists = |found: &HashMap<String, _>| {
            matches!(
                found.get(stream.as_str()),
                Some(rabbitmq_stream_client::types::StreamMetadata {
                    response_code: ResponseCode::Ok,
                    ..
                })
            )
        };
        if !exists(&found) {
            if !self.settings.declare {
                return Err(permanent(format!(
                    "{}: the stream does not exist: create it (rabbitmq-streams add_stream or \
                     any stream client) or set declare = true",
                    self.context()
                )));
            }
            let response = self
                .timed(
                    "creating the stream",
                    client.create_stream(stream, HashMap::new()),
                )
                .await?;
            if *response.code() == ResponseCode::PrecoditionFailed {
                // Metadata says "no such stream" for a queue of another type too, and only
                // creating the stream tells them apart.
                return Err(permanent(format!(
                    "{}: creating the stream was refused (PRECONDITION_FAILED): its name is \
                     taken by a queue that is not a stream, or a stream with other arguments: \
                     choose another stream, or delete that queue",
                    self.context()
                )));
            }
            if !response.is_ok() && *response.code() != ResponseCode::StreamAlreadyExists {
                return Err(permanent(format!(
                    "{}: creating the stream was refused: {:?}",
                    self.context(),
                    response.code()
                )));
            }
            found = self
                .timed(
                    "reading stream metadata",
                    client.metadata(vec![stream.clone()]),
                )
                .await?;
        }
        match found.get(stream.as_str()) {
            Some(meta) if meta.response_code == ResponseCode::Ok => {
                let port = u16::try_from(meta.leader.port).map_err(|_| {
                    permanent(format!(
                        "{}: the broker advertises port {} for the leader",
                        self.context(),
                        meta.leader.port
                    ))
                })?;
                Ok((meta.leader.host.clone(), port))
            }
            _ => Err(retryable(format!(
                "{}: the stream has no available leader yet",
                self.context()
            ))),
        }
    }

    async fn declare_producer(
        &self,
        client: &Client,
    ) -> Result<(mpsc::UnboundedReceiver<Notice>, u64), SinkError> {
        let (tx, notices) = mpsc::unbounded_channel();
        client
            .set_handler(move |message: MessageResult| {
                let tx = tx.clone();
                async move {
                    let notice = match message {
                        Some(Ok(response)) => match response.kind() {
                            ResponseKind::PublishConfirm(confirm)
                                if confirm.publisher_id == PUBLISHER_ID =>
                            {
                                Some(Notice::Confirmed(confirm.publishing_ids))
                            }
                            ResponseKind::PublishError(error)
                                if error.publisher_id == PUBLISHER_ID =>
                            {
                                Some(Notice::Refused(
                                    error
                                        .publishing_errors
                                        .into_iter()
                                        .map(|e| (e.publishing_id, e.error_code))
                                        .collect(),
                                ))
                            }
                            _ => None,
                        },
                        Some(Err(_)) | None => Some(Notice::Closed),
                    };
                    if let Some(notice) = notice {
                        let _ = tx.send(notice);
                    }
                    Ok(())
                }
            })
            .await;
        let settings = &self.settings;
        let response = self
            .timed(
                "declaring the producer",
                client.declare_publisher(
                    PUBLISHER_ID,
                    Some(settings.producer_name.clone()),
                    &settings.stream,
                ),
            )
            .await?;
        if !response.is_ok() {
            return Err(refused(
                &self.context(),
                "declaring the producer",
                response.code(),
            ));
        }
        let stored = self
            .timed(
                "querying the producer's sequence",
                client.query_publisher_sequence(&settings.producer_name, &settings.stream),
            )
            .await?;
        Ok((notices, stored))
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
        outcomes: &mut [Outcome],
    ) -> Result<(), SinkError> {
        if self.link.is_none() {
            self.link = Some(self.connect().await?);
        }
        let context = self.context();
        let stored = self.link.as_ref().expect("connected above").stored;
        let mut pending = VecDeque::new();
        for (index, outcome) in outcomes.iter_mut().enumerate() {
            if *outcome != Outcome::Pending {
                continue;
            }
            let (id, message) = messages[index]
                .as_ref()
                .expect("pending events are prepared");
            if *id > stored {
                pending.push_back((index, *id, message.clone()));
            } else if let Some(code) = self.refused.get(id) {
                *outcome = Outcome::Rejected(format!(
                    "RabbitMQ refused the message ({code:?}) and stored a later one of this \
                     producer, so its publishing id can no longer be stored"
                ));
            } else {
                *outcome = Outcome::Confirmed;
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
                            outcomes[index] = Outcome::Confirmed;
                            self.refused.remove(&id);
                        }
                    }
                }
                Notice::Refused(errors) => {
                    let mut permanent_error = None;
                    for (id, code) in errors {
                        if waiting.remove(&id).is_some() {
                            if matches!(
                                code,
                                ResponseCode::StreamDoesNotExist | ResponseCode::AccessRefused
                            ) {
                                permanent_error = Some(refused(&context, "publishing", &code));
                            }
                            self.refused.insert(id, code);
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

/// The error for a request the broker answered with `code`.
fn refused(context: &str, what: &str, code: &ResponseCode) -> SinkError {
    match code {
        ResponseCode::StreamDoesNotExist => permanent(format!(
            "{context}: {what}: the stream does not exist: create it or set declare = true"
        )),
        ResponseCode::AccessRefused => permanent(format!(
            "{context}: {what}: access refused: grant the user write permission on the stream \
             (rabbitmqctl set_permissions)"
        )),
        ResponseCode::PrecoditionFailed => permanent(format!(
            "{context}: {what}: precondition failed: another producer with the name already \
             publishes to the stream? Each relay needs its own producer_name"
        )),
        other => retryable(format!("{context}: {what}: RabbitMQ answered {other:?}")),
    }
}

fn refused_at_connect(context: &str, code: &ResponseCode, endpoint: &Endpoint) -> SinkError {
    match code {
        ResponseCode::AuthenticationFailure | ResponseCode::AuthenticationFailureLoopback => {
            permanent(format!(
                "{context}: RabbitMQ refused the credentials of user {:?} ({code:?}): check the \
                 username and password (password_file); guest may only connect from localhost",
                endpoint.user
            ))
        }
        ResponseCode::VirtualHostAccessFailure => permanent(format!(
            "{context}: the virtual host {:?} does not exist or user {:?} may not use it",
            endpoint.vhost, endpoint.user
        )),
        other => retryable(format!(
            "{context}: connecting: RabbitMQ answered {other:?}"
        )),
    }
}

/// Problems `outbox-relay check` reports: the stream port closed (the stream plugin not
/// enabled), refused credentials, a missing stream the sink may not create.
pub async fn check(settings: &StreamSettings) -> Vec<String> {
    let sink = StreamSink::new(settings.clone());
    let endpoint = match settings.endpoint() {
        Ok(endpoint) => endpoint,
        Err(err) => return vec![format!("sink {}: {err}", settings.name)],
    };
    let address = format!("{}:{}", endpoint.host, endpoint.port);
    let reachable = tokio::time::timeout(
        settings.timeout,
        tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
    )
    .await;
    if !matches!(reachable, Ok(Ok(_))) {
        return vec![format!(
            "sink {}: nothing answers on the RabbitMQ stream port {address}: enable the stream \
             plugin (rabbitmq-plugins enable rabbitmq_stream) and make sure port {} is \
             reachable, or fix the url",
            settings.name, endpoint.port
        )];
    }
    let locator = match sink
        .open(
            &endpoint,
            &endpoint.host,
            endpoint.port,
            settings.ca_file.as_ref(),
        )
        .await
    {
        Ok(client) => client,
        Err(err) => return vec![err.to_string()],
    };
    let problems = match settings.declare {
        true => Vec::new(),
        false => match sink.leader(&locator).await {
            Ok(_) => Vec::new(),
            Err(err) => vec![err.to_string()],
        },
    };
    let _ = tokio::time::timeout(settings.timeout, locator.close()).await;
    problems
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

    async fn send(&mut self, batch: &[Event]) -> Result<Delivery, SinkError> {
        if !self.progress.is_current(batch) {
            self.refused.clear();
        }
        let mut outcomes = std::mem::take(self.progress.start(batch));
        let mut messages = Vec::with_capacity(batch.len());
        for (event, outcome) in batch.iter().zip(outcomes.iter_mut()) {
            let prepared = match publishing_id(event.position) {
                Ok(id) => self.prepare(event, id).map(|message| (id, message)),
                Err(IdError::IndexTooLarge(index)) => Err(format!(
                    "event #{index} of its transaction is beyond the {} events per transaction \
                     that stream mode can deduplicate; `outbox-relay dlq replay` publishes it \
                     again",
                    MAX_INDEX + 1
                )),
                Err(IdError::LsnTooLarge(lsn)) => {
                    self.progress.outcomes = outcomes;
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
                    if *outcome == Outcome::Pending {
                        *outcome = Outcome::Rejected(reason);
                    }
                    messages.push(None);
                }
            }
        }
        let result = self.publish(&messages, &mut outcomes).await;
        self.progress.outcomes = outcomes;
        match result {
            Ok(()) => {
                self.refused.clear();
                Ok(self.progress.finish())
            }
            Err(err) => {
                self.disconnect().await;
                Err(err)
            }
        }
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.disconnect().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(lsn: u64, index: u32) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            index,
        }
    }

    #[test]
    fn publishing_ids_preserve_order_and_round_trip() {
        let positions = [
            position(1, 0),
            position(1, 1),
            position(1, MAX_INDEX),
            position(2, 0),
            position(0x16_B374_D848, 7),
            position(MAX_LSN, MAX_INDEX),
        ];
        let ids: Vec<u64> = positions
            .iter()
            .map(|&p| publishing_id(p).unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        for (&p, &id) in positions.iter().zip(&ids) {
            assert_eq!(position_of(id), Some(p));
        }
        assert_eq!(position_of(0), None);
        assert_eq!(
            publishing_id(position(1, MAX_INDEX + 1)),
            Err(IdError::IndexTooLarge(MAX_INDEX + 1))
        );
        assert_eq!(
            publishing_id(position(MAX_LSN + 1, 0)),
            Err(IdError::LsnTooLarge(Lsn(MAX_LSN + 1)))
        );
    }

    fn settings(url: &str) -> StreamSettings {
        StreamSettings {
            name: "s".into(),
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            stream: "events".into(),
            producer_name: "outbox-relay.slot.s".into(),
            declare: false,
            format: Format::CloudEvents,
            binary: false,
            window: 100,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn urls_name_host_port_vhost_and_credentials() {
        let endpoint = settings("rabbitmq-stream://relay:p%40ss@broker:5553/prod%2Fa")
            .endpoint()
            .unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.vhost.as_str()
            ),
            ("broker", 5553, "prod/a")
        );
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.expose()),
            ("relay", "p@ss")
        );
        let endpoint = settings("rabbitmq-stream://broker").endpoint().unwrap();
        assert_eq!((endpoint.port, endpoint.vhost.as_str()), (5552, "/"));
        assert_eq!(endpoint.user, "guest");
        let endpoint = settings("rabbitmq-stream+tls://broker/%2f")
            .endpoint()
            .unwrap();
        assert_eq!(
            (endpoint.port, endpoint.vhost.as_str(), endpoint.tls),
            (5551, "/", true)
        );
        let mut overridden = settings("rabbitmq-stream://a:b@broker");
        overridden.password = Some(Secret::new("from-file"));
        assert_eq!(
            overridden.endpoint().unwrap().password.expose(),
            "from-file"
        );
        assert!(!format!("{overridden:?}").contains("from-file"));
        let err = settings("amqp://broker").validate().unwrap_err();
        assert!(err.contains("rabbitmq-stream"), "{err}");
        let err = settings("rabbitmq-stream+tls://broker")
            .validate()
            .unwrap_err();
        assert!(err.contains("ca_file"), "{err}");
    }

    #[test]
    fn messages_that_do_not_fit_a_frame_are_refused() {
        let sink = StreamSink::new(settings("rabbitmq-stream://broker"));
        let mut event = crate::format::tests::sample(1, 0);
        assert!(sink.prepare(&event, 1).is_ok());
        event.payload = crate::Text::from(format!("\"{}\"", "x".repeat(FRAME_MAX as usize))).into();
        let err = sink.prepare(&event, 1).unwrap_err();
        assert!(err.contains("stream.frame_max"), "{err}");
    }
}
