//! Exchange mode's dealings with the broker outside publishing: declarations on connect,
//! what `outbox-relay check` looks at, and how a lapin error is classified.

use super::{ExchangeSettings, ExchangeSink};
use crate::rabbitmq::{permanent, retryable};
use crate::SinkError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ErrorKind};
use std::time::Duration;

/// Declares the exchange (and the queue) when configured; otherwise checks that the
/// exchange exists, on a channel of its own since a failed check closes it.
pub(super) async fn declare(
    channel: &Channel,
    settings: &ExchangeSettings,
) -> Result<(), lapin::Error> {
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

/// Sorts a lapin error into retryable (network, broker restart, resource alarms) and
/// permanent (missing exchange, refused access, bad credentials or vhost) with the fix.
pub(super) fn classify(
    context: &str,
    err: &lapin::Error,
    settings: &ExchangeSettings,
) -> SinkError {
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

pub(super) async fn close(connection: Connection, timeout: Duration) {
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
pub(super) async fn declaration_clashes(
    connection: &Connection,
    settings: &ExchangeSettings,
) -> Vec<String> {
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
