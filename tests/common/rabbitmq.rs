//! The local RabbitMQ for tests: a virtual host per test (created and deleted with
//! rabbitmqctl), queue draining with lapin, and stream reading with the stream client.

use super::unique;
use futures_util::StreamExt;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rabbitmq_stream_client::types::OffsetSpecification;
use rabbitmq_stream_client::Environment;
use serde_json::Value;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Runtime;

pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl is missing: run scripts/install-test-deps.sh");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A virtual host of the test's own on the local broker, with guest allowed; deleted on drop.
pub struct Vhost {
    pub name: String,
    rt: Runtime,
}

impl Vhost {
    pub fn new() -> Vhost {
        let name = unique("outbox-test");
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Vhost {
            name,
            rt: Runtime::new().unwrap(),
        }
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    pub fn stream_url(&self) -> String {
        format!("rabbitmq-stream://guest:guest@127.0.0.1:5552/{}", self.name)
    }

    /// Closes every connection of the vhost, the relay's included, as an operator would.
    pub fn close_all_connections(&self) {
        rabbitmqctl(&["close_all_connections", "--vhost", &self.name, "test"]);
    }

    pub fn connect(&self) -> Connection {
        self.rt
            .block_on(Connection::connect(
                &self.amqp_url(),
                ConnectionProperties::default(),
            ))
            .unwrap()
    }

    /// Declares a durable topic exchange and a durable queue with `arguments` bound to it.
    pub fn declare_queue(&self, exchange: &str, queue: &str, binding: &str, arguments: FieldTable) {
        let connection = self.connect();
        self.rt.block_on(async {
            let channel = connection.create_channel().await.unwrap();
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    arguments,
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            connection.close(200, "done".into()).await.unwrap();
        });
    }

    /// Takes every message now in `queue` (auto-ack) and appends it to `into`. Connects
    /// anew each time: the tests close connections under the relay's feet. A queue that
    /// does not exist yet (the relay declares it) yields nothing.
    pub fn drain(&self, queue: &str, into: &mut Vec<Received>) {
        self.rt.block_on(async {
            let Ok(connection) =
                Connection::connect(&self.amqp_url(), ConnectionProperties::default()).await
            else {
                return;
            };
            if let Ok(channel) = connection.create_channel().await {
                while let Ok(Some(message)) = channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                    .await
                {
                    into.push(Received {
                        routing_key: message.delivery.routing_key.to_string(),
                        properties: message.delivery.properties.clone(),
                        body: message.delivery.data.clone(),
                    });
                }
            }
            let _ = connection.close(200, "done".into()).await;
        });
    }

    /// Reads `stream` from its first offset in the background; what arrives is appended
    /// to the returned list as (message id, CloudEvents envelope).
    pub fn read_stream(&self, stream: &str) -> Arc<Mutex<Vec<(String, Value)>>> {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (vhost, stream, sink) = (self.name.clone(), stream.to_owned(), received.clone());
        self.rt.spawn(async move {
            let environment = Environment::builder()
                .host("127.0.0.1")
                .port(5552)
                .virtual_host(&vhost)
                .build()
                .await
                .unwrap();
            let mut consumer = loop {
                match environment
                    .consumer()
                    .offset(OffsetSpecification::First)
                    .build(&stream)
                    .await
                {
                    Ok(consumer) => break consumer,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            while let Some(Ok(delivery)) = consumer.next().await {
                let message = delivery.message();
                // The message id is an AMQP 1.0 string: `String("...")` in debug form.
                let id = message
                    .properties()
                    .and_then(|p| p.message_id.as_ref())
                    .map(|id| format!("{id:?}"))
                    .unwrap_or_default()
                    .trim_start_matches("String(\"")
                    .trim_end_matches("\")")
                    .to_owned();
                let body = serde_json::from_slice(message.data().unwrap_or_default()).unwrap();
                sink.lock().unwrap().push((id, body));
            }
        });
        received
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

/// A message taken from a queue.
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(text) => Some(text.to_string()),
            AMQPValue::LongLongInt(number) => Some(number.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn id(&self) -> String {
        self.properties.message_id().as_ref().unwrap().to_string()
    }

    /// (key, sequence) in CloudEvents binary mode.
    pub fn key_and_sequence(&self) -> (String, String) {
        (
            self.header("cloudEvents_subject").unwrap(),
            self.header("cloudEvents_sequence").unwrap(),
        )
    }
}
