//! The broker's side of the benchmark (`bench/run.py`, brokers phase): how fast RabbitMQ
//! takes persistent messages with publisher confirms from a publisher alone, with no
//! PostgreSQL and no relay. Messages go to a durable queue through the default exchange,
//! with at most WINDOW unconfirmed at once (the relay sink's `window`, 1,024 by default),
//! and with a message id, as the relay's do.
//!
//! Usage: `rabbitmq_publisher_alone URL QUEUE MESSAGES BODY_BYTES WINDOW`; prints the seconds
//! from the first publish to the last confirm. The queue is left for the caller to delete.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::VecDeque;
use std::error::Error;
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let [url, queue, messages, body_bytes, window] = arguments()?;
    let messages: usize = messages.parse()?;
    let window: usize = window.parse()?;
    let body = vec![b'x'; body_bytes.parse()?];
    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await?;
    let started = Instant::now();
    let mut unconfirmed = VecDeque::with_capacity(window);
    for index in 0..messages {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(index.to_string().into());
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        unconfirmed.push_back(confirm);
        while unconfirmed.len() >= window {
            if let Some(confirm) = unconfirmed.pop_front() {
                confirm.await?;
            }
        }
    }
    for confirm in unconfirmed {
        confirm.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    connection.close(200, "done".into()).await?;
    println!("{{\"messages\": {messages}, \"seconds\": {seconds:.4}}}");
    Ok(())
}

fn arguments() -> Result<[String; 5], Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    arguments
        .try_into()
        .map_err(|_| "usage: rabbitmq_publisher_alone URL QUEUE MESSAGES BODY_BYTES WINDOW".into())
}
