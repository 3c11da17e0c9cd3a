//! RabbitMQ for tests: a virtual host per test (created and deleted with rabbitmqctl) on the
//! machine's shared broker or on a node of the test's own, queue draining with lapin, and
//! stream reading with the stream client.

use super::certs::KeyPair;
use super::{free_port, unique, wait_until};
use futures_util::StreamExt;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use rabbitmq_stream_client::types::OffsetSpecification;
use rabbitmq_stream_client::Environment;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Runtime;

/// How long each connection step of [`Vhost::drain`] may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

pub fn rabbitmqctl(args: &[&str]) -> String {
    ctl(None, args)
}

/// rabbitmqctl against the shared broker, or against `node` (its name and its HOME, where
/// its Erlang cookie is).
fn ctl(node: Option<&NodeAddress>, args: &[&str]) -> String {
    let mut command = match node {
        None => Command::new("rabbitmqctl"),
        Some(node) => {
            let mut command = Command::new(rabbitmq_bin("rabbitmqctl"));
            command.env("HOME", &node.home).args(["-n", &node.name]);
            command
        }
    };
    let out = command
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

/// A RabbitMQ script run directly, not through the packaged wrapper that switches to the
/// rabbitmq user (whose Erlang cookie a node of the test's own does not have).
fn rabbitmq_bin(name: &str) -> PathBuf {
    let packaged = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if packaged.exists() {
        packaged
    } else {
        PathBuf::from(name)
    }
}

/// How rabbitmqctl reaches a node of the test's own.
#[derive(Clone)]
struct NodeAddress {
    name: String,
    home: PathBuf,
}

/// A RabbitMQ node of the test's own, from the machine's rabbitmq-server with its own name,
/// ports and data directory, for what the shared broker must not suffer (being stopped) or
/// does not have (TLS listeners with a test CA). Killed on drop.
pub struct Node {
    address: NodeAddress,
    pub amqp_port: u16,
    pub stream_port: u16,
    /// With TLS: the AMQPS and the stream TLS ports.
    pub tls_ports: Option<(u16, u16)>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Node {
    pub fn start() -> Node {
        Node::start_with(None)
    }

    /// A node that also listens with TLS (AMQPS and streams), presenting `server`.
    pub fn start_with_tls(server: &KeyPair, ca: &Path) -> Node {
        Node::start_with(Some((server, ca)))
    }

    fn start_with(tls: Option<(&KeyPair, &Path)>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let (amqp_port, stream_port) = (free_port(), free_port());
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{amqp_port}\n\
             stream.listeners.tcp.1 = 127.0.0.1:{stream_port}\n\
             stream.advertised_host = 127.0.0.1\n"
        );
        let tls_ports = tls.map(|(server, ca)| {
            let ports = (free_port(), free_port());
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{}\nstream.listeners.ssl.1 = 127.0.0.1:{}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                ports.0,
                ports.1,
                ca.display(),
                server.cert.display(),
                server.key.display()
            ));
            ports
        });
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(dir.path().join("enabled_plugins"), "[rabbitmq_stream].\n").unwrap();
        let address = NodeAddress {
            name: format!("{}@localhost", unique("relaytest")),
            home: dir.path().to_owned(),
        };
        let child = Command::new(rabbitmq_bin("rabbitmq-server"))
            .env("HOME", dir.path())
            .env("RABBITMQ_NODENAME", &address.name)
            .env("RABBITMQ_CONFIG_FILE", dir.path().join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                dir.path().join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", dir.path().join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.path().join("log"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_PID_FILE", dir.path().join("pid"))
            .stdout(std::fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server is missing: run scripts/install-test-deps.sh");
        let mut node = Node {
            address,
            amqp_port,
            stream_port,
            tls_ports,
            child,
            _dir: dir,
        };
        let ports: Vec<u16> = [amqp_port, stream_port]
            .into_iter()
            .chain(tls_ports.into_iter().flat_map(|(a, b)| [a, b]))
            .collect();
        let up = wait_until(Duration::from_secs(90), || {
            node.child.try_wait().unwrap().is_some()
                || ports
                    .iter()
                    .all(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
        });
        assert!(
            up && node.child.try_wait().unwrap().is_none(),
            "the RabbitMQ node did not start:\n{}",
            std::fs::read_to_string(node._dir.path().join("stdout.log")).unwrap_or_default()
        );
        node
    }

    /// Stops the RabbitMQ application (listeners and connections go; the Erlang node and
    /// the data stay), as an operator stopping the broker would.
    pub fn stop_app(&self) {
        ctl(Some(&self.address), &["stop_app"]);
    }

    pub fn start_app(&self) {
        ctl(Some(&self.address), &["start_app"]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The whole process group: the start script, the Erlang VM and its helpers.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

/// A virtual host of the test's own on the local broker, with guest allowed; deleted on drop.
pub struct Vhost {
    pub name: String,
    node: Option<NodeAddress>,
    amqp_port: u16,
    stream_port: u16,
    rt: Runtime,
}

impl Vhost {
    /// A vhost on the machine's shared broker.
    pub fn new() -> Vhost {
        Vhost::create(None, 5672, 5552)
    }

    /// A vhost on a node of the test's own.
    pub fn on(node: &Node) -> Vhost {
        Vhost::create(Some(node.address.clone()), node.amqp_port, node.stream_port)
    }

    fn create(node: Option<NodeAddress>, amqp_port: u16, stream_port: u16) -> Vhost {
        let name = unique("outbox-test");
        ctl(node.as_ref(), &["add_vhost", &name]);
        ctl(
            node.as_ref(),
            &["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
        );
        Vhost {
            name,
            node,
            amqp_port,
            stream_port,
            rt: Runtime::new().unwrap(),
        }
    }

    pub fn amqp_url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            self.amqp_port, self.name
        )
    }

    pub fn stream_url(&self) -> String {
        format!(
            "rabbitmq-stream://guest:guest@127.0.0.1:{}/{}",
            self.stream_port, self.name
        )
    }

    /// Closes every connection of the vhost, the relay's included, as an operator would.
    pub fn close_all_connections(&self) {
        ctl(
            self.node.as_ref(),
            &["close_all_connections", "--vhost", &self.name, "test"],
        );
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
    ///
    /// Connecting, opening the channel and closing are each bounded by [`DRAIN_LIMIT`]: one
    /// that never completes ends this call (the caller's wait tries again) instead of
    /// hanging the test. The gets are not: a get cut short could take a message from the
    /// queue without handing it over, which would look like a lost event.
    pub fn drain(&self, queue: &str, into: &mut Vec<Received>) {
        use tokio::time::timeout;
        self.rt.block_on(async {
            let url = self.amqp_url();
            let connect = Connection::connect(&url, ConnectionProperties::default());
            let Ok(Ok(connection)) = timeout(DRAIN_LIMIT, connect).await else {
                return;
            };
            if let Ok(Ok(channel)) = timeout(DRAIN_LIMIT, connection.create_channel()).await {
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
            let _ = timeout(DRAIN_LIMIT, connection.close(200, "done".into())).await;
        });
    }

    /// Reads `stream` from its first offset in the background; what arrives is appended
    /// to the returned list as (message id, CloudEvents envelope).
    pub fn read_stream(&self, stream: &str) -> Arc<Mutex<Vec<(String, Value)>>> {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (vhost, stream, sink) = (self.name.clone(), stream.to_owned(), received.clone());
        let port = self.stream_port;
        self.rt.spawn(async move {
            let environment = Environment::builder()
                .host("127.0.0.1")
                .port(port)
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
        if self.node.is_none() {
            let _ = Command::new("rabbitmqctl")
                .args(["delete_vhost", &self.name])
                .output();
        }
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
