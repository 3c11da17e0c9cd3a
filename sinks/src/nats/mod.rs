//! The NATS JetStream sink: every event is one message, published to a subject from a
//! template and acknowledged by JetStream (`PubAck`) before it counts.
//!
//! - `Nats-Msg-Id` is the event id: within the stream's duplicate window (two minutes by
//!   default) JetStream drops a message it already stored, so what a crash or a lost
//!   acknowledgement sends again is not stored twice. Past the window (a relay down longer
//!   than it, with events acknowledged after its last checkpoint) a repeat is stored again,
//!   with the same `Nats-Msg-Id` for consumers to dedup on.
//! - The sink does not resume from the stream's last message: a message JetStream refused
//!   (and the relay had not yet dead-lettered when it crashed) can sit before one it stored,
//!   and skipping through the stored one would lose it. The relay's checkpoint and the
//!   duplicate window decide instead.
//! - Messages are published in commit order on one connection, up to `window` awaiting
//!   their acknowledgement; a message over the server's `max_payload` is dead-lettered.
//! - Every message carries `Outbox-Relay-Position` (`16/B374D848#3`) and the event's
//!   headers (and `traceparent`) as NATS headers.
//!
//! The configuration lives in `config.rs`.

mod config;

pub use config::NatsConfig;

use crate::format::{self, Format};
use crate::routing::Template;
use crate::{Event, EventState, Secret, Sink, SinkError};
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::{ConnectErrorKind, ConnectOptions, HeaderMap};
use async_trait::async_trait;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

/// The header that carries the event's position.
pub const POSITION_HEADER: &str = "Outbox-Relay-Position";

/// Everything the NATS sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub name: String,
    pub url: String,
    pub subject: Template,
    pub credentials_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// Trusted roots (PEM); TLS is required when set.
    pub ca_file: Option<PathBuf>,
    pub format: Format,
    pub window: usize,
    pub timeout: Duration,
}

pub struct NatsSink {
    settings: NatsSettings,
    connection: Option<(async_nats::Client, async_nats::jetstream::Context)>,
    subject_buf: String,
}

impl NatsSink {
    pub fn new(settings: NatsSettings) -> Self {
        NatsSink {
            settings,
            connection: None,
            subject_buf: String::new(),
        }
    }

    /// The open connection, or a new one.
    async fn connect(
        &mut self,
    ) -> Result<(async_nats::Client, async_nats::jetstream::Context), SinkError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let settings = &self.settings;
        let mut options = ConnectOptions::new()
            .name(format!("outbox-relay {}", settings.name))
            .connection_timeout(settings.timeout)
            .request_timeout(Some(settings.timeout));
        if let Some(file) = &settings.credentials_file {
            options = options.credentials_file(file).await.map_err(|e| {
                SinkError::Permanent(format!(
                    "reading sinks.{}.credentials_file {}: {e}",
                    settings.name,
                    file.display()
                ))
            })?;
        }
        if let (Some(user), Some(password)) = (&settings.username, &settings.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &settings.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca_file) = &settings.ca_file {
            options = options
                .add_root_certificates(ca_file.clone())
                .require_tls(true);
        }
        let client = options.connect(settings.url.as_str()).await.map_err(|e| {
            let context = format!("connecting to NATS at {}: {e}", settings.url);
            match e.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    SinkError::Permanent(format!(
                        "{context}: check the login (sinks.{}.credentials_file, \
                             username and password_file, or token_file)",
                        settings.name
                    ))
                }
                ConnectErrorKind::ServerParse => SinkError::Permanent(format!(
                    "{context}: sinks.{}.url must be nats://host:port (or tls://)",
                    settings.name
                )),
                _ => SinkError::Retryable(context),
            }
        })?;
        let mut jetstream = async_nats::jetstream::new(client.clone());
        jetstream.set_timeout(settings.timeout);
        tracing::info!(sink = %settings.name, "connected to NATS");
        self.connection = Some((client, jetstream));
        Ok(self.connection.clone().expect("just set"))
    }

    /// The message's headers, and about the bytes they add (names, values and framing).
    fn headers(event: &Event) -> (HeaderMap, usize) {
        let position = event.position.to_string();
        let pairs = [
            ("Nats-Msg-Id", &*event.id),
            (POSITION_HEADER, position.as_str()),
        ]
        .into_iter()
        .chain(event.traceparent.as_deref().map(|t| ("traceparent", t)))
        .chain(
            event
                .headers
                .iter()
                .map(|(name, value)| (&**name, &**value)),
        );
        let mut headers = HeaderMap::new();
        // "NATS/1.0\r\n" and the closing "\r\n", then "name: value\r\n" per header.
        let mut bytes = 12;
        for (name, value) in pairs {
            bytes += name.len() + value.len() + 4;
            headers.insert(name, value);
        }
        (headers, bytes)
    }

    /// What a failed publish or acknowledgement means for the batch.
    fn failed(&mut self, kind: PublishErrorKind, subject: &str, error: String) -> SinkError {
        match kind {
            PublishErrorKind::StreamNotFound => SinkError::Retryable(format!(
                "no JetStream stream captures subject {subject:?}: create one whose subjects \
                 match it (e.g. `nats stream add OUTBOX --subjects '{subject}'`); retrying"
            )),
            _ => {
                self.connection = None;
                SinkError::Retryable(format!("publishing to NATS: {error}"))
            }
        }
    }

    /// Problems `outbox-relay check` reports: NATS unreachable or refusing the login, no
    /// JetStream, no stream for a subject without placeholders.
    pub async fn check(mut self) -> Vec<String> {
        let name = self.settings.name.clone();
        let (client, jetstream) = match self.connect().await {
            Ok(connection) => connection,
            Err(SinkError::Retryable(e) | SinkError::Permanent(e)) => {
                return vec![format!("sink {name}: {e}")]
            }
        };
        // The account's JetStream information, as the server words it (any version).
        let info = client.request("$JS.API.INFO", "".into()).await;
        let enabled = info.as_ref().is_ok_and(|reply| {
            serde_json::from_slice::<serde_json::Value>(&reply.payload)
                .is_ok_and(|info| info.get("error").is_none())
        });
        if !enabled {
            return vec![format!(
                "sink {name}: JetStream is not enabled for this account on the server: start \
                 nats-server with JetStream (-js, or a jetstream block in its configuration)"
            )];
        }
        let Some(subject) = self.settings.subject.as_static().map(str::to_owned) else {
            return Vec::new();
        };
        match jetstream.stream_by_subject(subject.clone()).await {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!(
                "sink {name}: no JetStream stream captures subject {subject:?} ({e}): create \
                 one whose subjects match it"
            )],
        }
    }
}

#[async_trait]
impl Sink for NatsSink {
    async fn recover(&mut self) -> Result<Option<crate::Position>, SinkError> {
        self.connect().await?;
        Ok(None)
    }

    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        let (client, jetstream) = self.connect().await?;
        let max_payload = client.server_info().max_payload;
        let mut pending: VecDeque<(usize, String, PublishAckFuture)> = VecDeque::new();
        let mut outcome = Ok(());
        for (index, event) in batch.iter().enumerate() {
            if states[index].is_settled() {
                continue;
            }
            self.subject_buf.clear();
            self.settings.subject.render(event, &mut self.subject_buf);
            let mut body = Vec::new();
            format::write_line(self.settings.format, event, &mut body);
            body.pop();
            let (headers, header_bytes) = Self::headers(event);
            let size = body.len() + header_bytes;
            if size > max_payload {
                states[index] = EventState::Rejected(format!(
                    "the message is about {size} bytes, over the NATS server's max_payload \
                     ({max_payload})"
                ));
                continue;
            }
            if pending.len() >= self.settings.window {
                if let Some((done, subject, ack)) = pending.pop_front() {
                    if let Err(e) = self.settle_ack(done, &subject, ack, states).await {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            let subject = self.subject_buf.clone();
            match jetstream
                .publish_with_headers(subject.clone(), headers, body.into())
                .await
            {
                Ok(ack) => pending.push_back((index, subject, ack)),
                Err(e) => {
                    outcome = Err(self.failed(e.kind(), &subject, e.to_string()));
                    break;
                }
            }
        }
        for (index, subject, ack) in pending {
            if let Err(e) = self.settle_ack(index, &subject, ack, states).await {
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        if let Some((client, _)) = self.connection.take() {
            let _ = client.flush().await;
        }
        Ok(())
    }
}

impl NatsSink {
    /// Waits for one acknowledgement and records it in `states`.
    async fn settle_ack(
        &mut self,
        index: usize,
        subject: &str,
        ack: PublishAckFuture,
        states: &mut [EventState],
    ) -> Result<(), SinkError> {
        match ack.await {
            Ok(_) => {
                states[index] = EventState::Acked;
                Ok(())
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                states[index] = EventState::Rejected(format!("NATS refused the message: {e}"));
                Ok(())
            }
            Err(e) => Err(self.failed(e.kind(), subject, e.to_string())),
        }
    }
}
