//! Connecting in stream mode: to a node, to the stream's leader, the producer declared and
//! its last stored publishing id read; how the broker's refusals are worded; and what
//! `outbox-relay check` looks at.

use super::settings::Endpoint;
use super::*;
use crate::rabbitmq::{permanent, retryable};
use crate::SinkError;
use rabbitmq_stream_client::types::{MessageResult, ResponseCode, ResponseKind};
use rabbitmq_stream_client::Client;
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tracing::info;

impl StreamSink {
    /// Connects to a node, finds (or creates) the stream and its leader, connects there and
    /// declares the producer.
    pub(super) async fn connect(&self) -> Result<Link, SinkError> {
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

    pub(super) async fn open(
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
    pub(super) async fn leader(&self, client: &Client) -> Result<(String, u16), SinkError> {
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

    pub(super) async fn declare_producer(
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
}

/// The error for a request the broker answered with `code`.
pub(super) fn refused(context: &str, what: &str, code: &ResponseCode) -> SinkError {
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

pub(super) fn refused_at_connect(
    context: &str,
    code: &ResponseCode,
    endpoint: &Endpoint,
) -> SinkError {
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
