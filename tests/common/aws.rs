//! Amazon EventBridge, SQS and SNS on moto's server mode (installed in .venv-brokers by
//! scripts/install-test-deps.sh): the emulator, and AWS clients that set up a bus whose
//! rule feeds an SQS queue, queues, topics feeding a queue, and read queues back.

use super::{free_port, wait_until, Relay, WAIT};
use aws_sdk_eventbridge::types::Target;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::runtime::Runtime;

pub const REGION: &str = "us-east-1";
/// Dummy credentials for the emulator, and no instance-metadata lookups.
pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_REGION", REGION),
];

/// A `[sinks.NAME]` table: an EventBridge sink putting to `bus` at `endpoint` (the emulator,
/// or a proxy in front of it), with more keys in `extra`.
pub fn eventbridge_sink(name: &str, bus: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"eventbridge\"\nbus = \"{bus}\"\nendpoint_url = \"{endpoint}\"\n{extra}\n"
    )
}

/// A moto server on a free port, killed when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-brokers/bin/moto_server");
        assert!(
            binary.exists(),
            "the moto EventBridge emulator is missing: run scripts/install-test-deps.sh"
        );
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let up = wait_until(Duration::from_secs(30), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || child.try_wait().unwrap().is_some()
            });
            if up && child.try_wait().unwrap().is_none() {
                return Moto { child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// AWS clients on the emulator, for setting up buses and reading queues.
pub struct Aws {
    pub rt: Runtime,
    pub eventbridge: aws_sdk_eventbridge::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sns: aws_sdk_sns::Client,
}

/// One message read from a queue.
#[derive(Debug, Clone)]
pub struct Received {
    /// The body, parsed as JSON (`Value::String` when it is not JSON).
    pub body: Value,
    /// The message attributes (string values).
    pub attributes: BTreeMap<String, String>,
    /// The FIFO group id.
    pub group: Option<String>,
}

impl Aws {
    pub fn new(moto: &Moto) -> Aws {
        let rt = Runtime::new().unwrap();
        let config = rt.block_on(outbox_relay_sinks::aws::sdk_config(
            Some(REGION),
            Some(&moto.url()),
            Duration::from_secs(10),
        ));
        let credentials =
            aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "tests");
        let eventbridge = aws_sdk_eventbridge::Client::from_conf(
            aws_sdk_eventbridge::config::Builder::from(&config)
                .credentials_provider(credentials.clone())
                .build(),
        );
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&config)
                .credentials_provider(credentials.clone())
                .build(),
        );
        let sns = aws_sdk_sns::Client::from_conf(
            aws_sdk_sns::config::Builder::from(&config)
                .credentials_provider(credentials)
                .build(),
        );
        Aws {
            rt,
            eventbridge,
            sqs,
            sns,
        }
    }

    /// Creates `bus` with a rule sending every `outbox.*` event to a new SQS queue; returns
    /// the queue's URL.
    pub fn bus_into_queue(&self, bus: &str) -> String {
        self.rt.block_on(async {
            self.eventbridge
                .create_event_bus()
                .name(bus)
                .send()
                .await
                .unwrap();
            let queue = self.create_queue(bus, false).await;
            let arn = self.queue_arn(&queue).await;
            let rule = format!("{bus}-all");
            self.eventbridge
                .put_rule()
                .name(&rule)
                .event_bus_name(bus)
                .event_pattern(r#"{"source": [{"prefix": "outbox."}]}"#)
                .send()
                .await
                .unwrap();
            self.eventbridge
                .put_targets()
                .rule(&rule)
                .event_bus_name(bus)
                .targets(Target::builder().id("queue").arn(arn).build().unwrap())
                .send()
                .await
                .unwrap();
            queue
        })
    }

    /// Creates queue `name` (`name.fifo`, a FIFO queue, when `fifo`); returns its URL.
    /// Messages stay hidden once received: each is read exactly once per test.
    async fn create_queue(&self, name: &str, fifo: bool) -> String {
        let mut create = self
            .sqs
            .create_queue()
            .queue_name(if fifo {
                format!("{name}.fifo")
            } else {
                name.to_owned()
            })
            .attributes(QueueAttributeName::VisibilityTimeout, "43200");
        if fifo {
            create = create.attributes(QueueAttributeName::FifoQueue, "true");
        }
        let created = create.send().await.unwrap();
        created.queue_url().unwrap().to_owned()
    }

    async fn queue_arn(&self, queue: &str) -> String {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap();
        attributes.attributes().unwrap()[&QueueAttributeName::QueueArn].clone()
    }

    /// Creates queue `name` (FIFO when `fifo`); returns its URL.
    pub fn queue(&self, name: &str, fifo: bool) -> String {
        self.rt.block_on(self.create_queue(name, fifo))
    }

    /// Creates topic `name` (FIFO when `fifo`) with a queue of the same kind subscribed
    /// with raw message delivery; returns the topic's ARN and the queue's URL.
    pub fn topic_into_queue(&self, name: &str, fifo: bool) -> (String, String) {
        self.rt.block_on(async {
            let mut create = self.sns.create_topic().name(if fifo {
                format!("{name}.fifo")
            } else {
                name.to_owned()
            });
            if fifo {
                create = create.attributes("FifoTopic", "true");
            }
            let topic = create.send().await.unwrap().topic_arn().unwrap().to_owned();
            let queue = self.create_queue(name, fifo).await;
            self.sns
                .subscribe()
                .topic_arn(&topic)
                .protocol("sqs")
                .endpoint(self.queue_arn(&queue).await)
                .attributes("RawMessageDelivery", "true")
                .send()
                .await
                .unwrap();
            (topic, queue)
        })
    }

    /// Appends the events that arrived in `queue` since the last call, in arrival order.
    pub fn receive(&self, queue: &str, into: &mut Vec<Value>) {
        let mut messages = Vec::new();
        self.receive_messages(queue, &mut messages);
        into.extend(messages.into_iter().map(|m| m.body));
    }

    /// Appends the messages that arrived in `queue` since the last call, in arrival order.
    pub fn receive_messages(&self, queue: &str, into: &mut Vec<Received>) {
        self.rt.block_on(async {
            loop {
                let out = self
                    .sqs
                    .receive_message()
                    .queue_url(queue)
                    .max_number_of_messages(10)
                    .message_attribute_names("All")
                    .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
                    .send()
                    .await
                    .unwrap();
                let messages = out.messages();
                if messages.is_empty() {
                    return;
                }
                let mut delete = self.sqs.delete_message_batch().queue_url(queue);
                for (n, message) in messages.iter().enumerate() {
                    let body = message.body().unwrap();
                    let attributes = message
                        .message_attributes()
                        .into_iter()
                        .flatten()
                        .map(|(name, value)| {
                            (
                                name.clone(),
                                value.string_value().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    let group = message
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
                        .cloned();
                    into.push(Received {
                        body: serde_json::from_str(body)
                            .unwrap_or_else(|_| Value::String(body.to_owned())),
                        attributes,
                        group,
                    });
                    delete = delete.entries(
                        DeleteMessageBatchRequestEntry::builder()
                            .id(n.to_string())
                            .receipt_handle(message.receipt_handle().unwrap())
                            .build()
                            .unwrap(),
                    );
                }
                // Read messages go: moto scans the whole queue on every receive.
                delete.send().await.unwrap();
            }
        })
    }

    /// Waits until `queue` has received `count` events; returns them in arrival order.
    pub fn wait_for(&self, queue: &str, count: usize, relay: &Relay) -> Vec<Value> {
        let mut events = Vec::new();
        let arrived = wait_until(WAIT, || {
            self.receive(queue, &mut events);
            events.len() >= count
        });
        assert!(
            arrived,
            "{} of {count} events arrived; relay log:\n{}",
            events.len(),
            relay.log()
        );
        events
    }
}
