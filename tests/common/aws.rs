//! Amazon EventBridge and SQS on moto's server mode (installed in .venv-brokers by
//! scripts/install-test-deps.sh): the emulator, and AWS clients that set up a bus whose
//! rule feeds an SQS queue and read that queue back.

use super::{free_port, wait_until, Relay, WAIT};
use aws_sdk_eventbridge::types::Target;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};
use serde_json::Value;
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
}

impl Aws {
    pub fn new(moto: &Moto) -> Aws {
        let rt = Runtime::new().unwrap();
        let config = rt.block_on(outbox_relay_sinks::eventbridge::sdk_config(
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
                .credentials_provider(credentials)
                .build(),
        );
        Aws {
            rt,
            eventbridge,
            sqs,
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
            // Messages stay hidden once received: each is read exactly once per test.
            let queue = self
                .sqs
                .create_queue()
                .queue_name(bus)
                .attributes(QueueAttributeName::VisibilityTimeout, "43200")
                .send()
                .await
                .unwrap()
                .queue_url()
                .unwrap()
                .to_owned();
            let attributes = self
                .sqs
                .get_queue_attributes()
                .queue_url(&queue)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .unwrap();
            let arn = attributes.attributes().unwrap()[&QueueAttributeName::QueueArn].clone();
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

    /// Appends the events that arrived in `queue` since the last call, in arrival order.
    pub fn receive(&self, queue: &str, into: &mut Vec<Value>) {
        self.rt.block_on(async {
            loop {
                let out = self
                    .sqs
                    .receive_message()
                    .queue_url(queue)
                    .max_number_of_messages(10)
                    .send()
                    .await
                    .unwrap();
                let messages = out.messages();
                if messages.is_empty() {
                    return;
                }
                let mut delete = self.sqs.delete_message_batch().queue_url(queue);
                for (n, message) in messages.iter().enumerate() {
                    into.push(serde_json::from_str(message.body().unwrap()).unwrap());
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
