//! The Kafka test broker and a consumer that counts by reading.
//!
//! [`Broker::start`] runs a real Apache Kafka 4.x: a single-node KRaft broker (combined broker
//! and controller) from the jars scripts/install-test-deps.sh puts in .kafka-broker/lib, with
//! its storage formatted in a temp dir and one JVM on free ports. Each `Broker` is its own
//! process, stopped when dropped (and killed by the kernel if the thread that started it
//! dies first), so tests may pause, restart or kill theirs.
//!
//! Invariants every test broker keeps:
//! - `auto.create.topics.enable=false`: a topic exists only if the relay created it (as a
//!   production cluster usually runs);
//! - transactions that time out are aborted within a second of their timeout;
//! - the broker reaches itself over an internal plaintext listener and its controller on a
//!   third port, so the client listener may require TLS or a SASL login.
//!
//! Consumers read with `isolation.level=read_committed` (what a downstream service runs)
//! unless they ask for [`Isolation::Uncommitted`], which shows aborted records too.

use super::{wait_until, WAIT};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How the client listener admits connections.
enum Listener {
    Plaintext,
    /// TLS with this certificate chain and key (PEM).
    Tls {
        cert: PathBuf,
        key: PathBuf,
    },
    /// A SASL login (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) as this user with this password.
    Sasl {
        user: String,
        password: String,
    },
}

/// A Kafka broker on a free port, stopped when dropped.
pub struct Broker {
    child: Child,
    /// Its `node.id`.
    pub node: i32,
    /// Where clients bootstrap.
    port: u16,
    /// The internal plaintext listener (no TLS, no login), for readiness probes.
    internal: u16,
    /// librdkafka properties clients need (TLS, SASL).
    pub client_properties: Vec<(String, String)>,
    /// Configuration, data and logs (format.log, broker.log).
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(super::free_port())
    }

    /// A broker on `port` (for tests that point the relay at it before it runs).
    pub fn start_on(port: u16) -> Broker {
        Broker::spawn(port, Listener::Plaintext)
    }

    /// A broker reachable only over TLS, presenting `server` (signed by `ca`).
    pub fn start_with_tls(ca: &Path, server: &super::certs::KeyPair) -> Broker {
        let mut broker = Broker::spawn(
            super::free_port(),
            Listener::Tls {
                cert: server.cert.clone(),
                key: server.key.clone(),
            },
        );
        broker.client_properties = vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), ca.display().to_string()),
        ];
        broker
    }

    /// A broker whose clients log in over SASL (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512), and
    /// which knows one user, `user` with `password`.
    pub fn start_with_sasl(user: &str, password: &str) -> Broker {
        let mut broker = Broker::spawn(
            super::free_port(),
            Listener::Sasl {
                user: user.into(),
                password: password.into(),
            },
        );
        broker.client_properties = vec![
            ("security.protocol".into(), "SASL_PLAINTEXT".into()),
            ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
            ("sasl.username".into(), user.into()),
            ("sasl.password".into(), password.into()),
        ];
        broker
    }

    /// Formats storage for a broker listening for clients on `port`, then starts it.
    fn spawn(port: u16, listener: Listener) -> Broker {
        let lib = kafka_lib();
        assert!(
            lib.join(".pom.sha256").exists(),
            "the Apache Kafka test broker is missing: run scripts/install-test-deps.sh"
        );
        let dir = tempfile::tempdir().unwrap();
        let (internal, controller) = (super::free_port(), super::free_port());
        let client_protocol = match listener {
            Listener::Plaintext => "PLAINTEXT",
            Listener::Tls { .. } => "SSL",
            Listener::Sasl { .. } => "SASL_PLAINTEXT",
        };
        let mut properties = server_properties(
            &Node {
                id: 1,
                client: port,
                internal,
                controller,
            },
            &format!("controller.quorum.bootstrap.servers=127.0.0.1:{controller}"),
            client_protocol,
            1,
            dir.path(),
        );
        let mut scram_users = Vec::new();
        match &listener {
            Listener::Plaintext => {}
            Listener::Tls { cert, key } => {
                // A PEM key store: the unencrypted PKCS#8 key, then the certificate chain.
                let store = dir.path().join("broker.pem");
                let pem =
                    std::fs::read_to_string(key).unwrap() + &std::fs::read_to_string(cert).unwrap();
                std::fs::write(&store, pem).unwrap();
                properties.push_str(&format!(
                    "listener.name.client.ssl.keystore.type=PEM\n\
                     listener.name.client.ssl.keystore.location={}\n",
                    store.display()
                ));
            }
            Listener::Sasl { user, password } => {
                properties.push_str(&format!(
                    "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512\n\
                     listener.name.client.plain.sasl.jaas.config=\
                     org.apache.kafka.common.security.plain.PlainLoginModule required user_{user}=\"{password}\";\n\
                     listener.name.client.scram-sha-256.sasl.jaas.config=\
                     org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                     listener.name.client.scram-sha-512.sasl.jaas.config=\
                     org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
                ));
                for mechanism in ["SCRAM-SHA-256", "SCRAM-SHA-512"] {
                    scram_users.push("--add-scram".to_string());
                    scram_users.push(format!("{mechanism}=[name={user},password={password}]"));
                }
            }
        }
        let config = dir.path().join("server.properties");
        std::fs::write(&config, properties).unwrap();
        format(dir.path(), &cluster_id(), true, &scram_users);
        let child = launch(dir.path());
        let mut broker = Broker {
            child,
            node: 1,
            port,
            internal,
            client_properties: Vec::new(),
            dir,
        };
        broker.wait_ready();
        broker
    }

    /// Waits until the broker serves clients: its port is open and its group coordinator
    /// answers. The coordinator comes up after the port, with the offsets topic it creates on
    /// the first request: until then, reading committed offsets (as the Kafka sink's recover
    /// does) fails with NotCoordinator. Asked over the internal listener, which needs no TLS
    /// or login.
    fn wait_ready(&mut self) {
        let port = self.port;
        let child = &mut self.child;
        let up = wait_until(WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || child.try_wait().unwrap().is_some()
        }) && child.try_wait().unwrap().is_none();
        assert!(up, "Apache Kafka did not start:\n{}", self.log());
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{}", self.internal))
            .set("group.id", "readiness")
            .create()
            .unwrap();
        let mut partition = TopicPartitionList::new();
        partition.add_partition("readiness", 0);
        assert!(
            wait_until(WAIT, || probe
                .committed_offsets(partition.clone(), Duration::from_secs(5))
                .is_ok()),
            "Apache Kafka's group coordinator did not come up:\n{}",
            self.log()
        );
    }

    /// Stops the broker (SIGTERM: a clean shutdown, as in a rolling restart) and starts it
    /// again on the same ports and data, waiting until it serves clients.
    pub fn restart(&mut self) {
        self.signal("-TERM");
        let child = &mut self.child;
        if !wait_until(WAIT, || child.try_wait().unwrap().is_some()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.start_again();
    }

    /// Kills the broker (SIGKILL: no clean shutdown), until [`Broker::start_again`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a stopped broker again on the same ports and data, waiting until it serves
    /// clients.
    pub fn start_again(&mut self) {
        self.child = launch(self.dir.path());
        self.wait_ready();
    }

    /// A cluster of `size` nodes, each a broker and a KRaft voter, with every internal topic
    /// and every created topic replicated to all of them (`min.insync.replicas` 2): as in
    /// production, a partition's leadership moves to another node when its leader dies.
    pub fn cluster(size: u16) -> Vec<Broker> {
        let nodes: Vec<Node> = (1..=size)
            .map(|id| Node {
                id,
                client: super::free_port(),
                internal: super::free_port(),
                controller: super::free_port(),
            })
            .collect();
        let voters = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = cluster_id();
        let mut brokers: Vec<Broker> = nodes
            .iter()
            .map(|node| {
                let dir = tempfile::tempdir().unwrap();
                let properties = server_properties(
                    node,
                    &format!("controller.quorum.voters={voters}"),
                    "PLAINTEXT",
                    size,
                    dir.path(),
                );
                std::fs::write(dir.path().join("server.properties"), properties).unwrap();
                format(dir.path(), &cluster, false, &[]);
                Broker {
                    child: launch(dir.path()),
                    node: i32::from(node.id),
                    port: node.client,
                    internal: node.internal,
                    client_properties: Vec::new(),
                    dir,
                }
            })
            .collect();
        for broker in &mut brokers {
            broker.wait_ready();
        }
        brokers
    }

    /// The node id of the leader of `topic`'s partition `partition`, as this broker knows it.
    pub fn leader_of(&self, topic: &str, partition: i32) -> i32 {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.address())
            .create()
            .unwrap();
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0].partitions()[partition as usize].leader()
    }

    /// What the broker logged: warnings and errors, and its start-up lines.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
    }
}

/// One node's id and ports: clients, the brokers among themselves, the KRaft controllers.
struct Node {
    id: u16,
    client: u16,
    internal: u16,
    controller: u16,
}

/// `node`'s server.properties: broker and controller in one process, `quorum` naming the
/// controllers, internal topics replicated `replicas` times, data in `dir`.
fn server_properties(
    node: &Node,
    quorum: &str,
    client_protocol: &str,
    replicas: u16,
    dir: &Path,
) -> String {
    let Node {
        id,
        client,
        internal,
        controller,
    } = node;
    let min_isr = replicas.min(2);
    format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         {quorum}\n\
         listeners=CLIENT://127.0.0.1:{client},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
         advertised.listeners=CLIENT://127.0.0.1:{client},INTERNAL://127.0.0.1:{internal}\n\
         listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=INTERNAL\n\
         log.dirs={data}\n\
         auto.create.topics.enable=false\n\
         transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n\
         num.partitions=1\n\
         default.replication.factor={replicas}\n\
         min.insync.replicas={min_isr}\n\
         offsets.topic.replication.factor={replicas}\n\
         offsets.topic.num.partitions=1\n\
         transaction.state.log.replication.factor={replicas}\n\
         transaction.state.log.min.isr={min_isr}\n\
         transaction.state.log.num.partitions=1\n\
         share.coordinator.state.topic.replication.factor={replicas}\n\
         share.coordinator.state.topic.min.isr={min_isr}\n\
         group.initial.rebalance.delay.ms=0\n\
         num.network.threads=2\n\
         num.io.threads=2\n\
         num.recovery.threads.per.data.dir=1\n",
        data = dir.join("data").display(),
    )
}

/// Formats the storage of the node configured in `dir` for cluster `cluster` (`standalone`:
/// the node is the whole quorum), with `extra` arguments (SCRAM users).
fn format(dir: &Path, cluster: &str, standalone: bool, extra: &[String]) {
    let log = std::fs::File::create(dir.join("format.log")).unwrap();
    let formatted = java(log)
        .arg("kafka.tools.StorageTool")
        .arg("format")
        .args(standalone.then_some("--standalone"))
        .args(["-t", cluster, "-c"])
        .arg(dir.join("server.properties"))
        .args(extra)
        .status()
        .unwrap();
    assert!(
        formatted.success(),
        "formatting Kafka's storage failed:\n{}",
        std::fs::read_to_string(dir.join("format.log")).unwrap_or_default()
    );
}

/// A JVM for Kafka's classes, writing to `log`: a 512 MB heap, the serial
/// collector and the C1 compiler only (start-up over peak speed on 2 cores), killed by the
/// kernel if the thread that started it dies.
fn java(log: std::fs::File) -> Command {
    let mut command = Command::new(java_binary());
    command
        .args([
            "-Xmx512m",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
        ])
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scripts/kafka/log4j2.properties")
                .display()
        ))
        .arg("-cp")
        .arg(kafka_lib().join("*"))
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

/// Starts the broker configured in `dir`, appending to its broker.log.
fn launch(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("broker.log"))
        .unwrap();
    java(log)
        .arg("kafka.Kafka")
        .arg(dir.join("server.properties"))
        .spawn()
        .unwrap()
}

/// Where scripts/install-test-deps.sh puts Apache Kafka's jars.
fn kafka_lib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".kafka-broker/lib")
}

/// `$JAVA_HOME/bin/java`, else `java` on the PATH.
fn java_binary() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|java| java.exists())
        .unwrap_or_else(|| "java".into())
}

/// A random KRaft cluster id: 16 random bytes in URL-safe base64 without padding, as
/// `kafka-storage.sh random-uuid` prints them (without starting a JVM for it). One that
/// starts with '-' would read as an option, so that one is drawn again.
fn cluster_id() -> String {
    use std::io::Read;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    loop {
        let mut bytes = [0u8; 16];
        urandom.read_exact(&mut bytes).unwrap();
        let (mut id, mut buffer, mut bits) = (String::new(), 0u32, 0);
        for byte in bytes {
            buffer = buffer << 8 | u32::from(byte);
            bits += 8;
            while bits >= 6 {
                bits -= 6;
                id.push(ALPHABET[(buffer >> bits) as usize & 63] as char);
            }
        }
        // 128 bits leave 2 over: the last character holds them and four zero bits.
        id.push(ALPHABET[(buffer << (6 - bits)) as usize & 63] as char);
        if !id.starts_with('-') {
            return id;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A consumed record: key, the `seq` of its payload, its headers.
pub struct Record {
    pub key: String,
    pub seq: u64,
    pub id: String,
    pub headers: HashMap<String, String>,
}

/// Which records a consumer sees.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Only those of committed transactions (and non-transactional ones).
    Committed,
    /// Also those of aborted and open transactions.
    Uncommitted,
}

/// Reads every partition of `topic` from the beginning until `expected` records arrived (or
/// the wait ends). Tests count by consuming: the high watermark counts commit markers too.
pub fn consume(broker: &Broker, topic: &str, expected: usize) -> Vec<Record> {
    consume_until(broker, topic, |records, _| records.len() >= expected)
}

/// Reads every partition of `topic` from the beginning until nothing more arrives for a
/// second: what the topic holds now (callers wait on a condition over it).
pub fn consume_all(broker: &Broker, topic: &str) -> Vec<Record> {
    consume_until(broker, topic, |_, quiet| quiet >= Duration::from_secs(1))
}

/// [`consume_all`] with `read_uncommitted`: the records of aborted transactions too.
pub fn consume_all_uncommitted(broker: &Broker, topic: &str) -> Vec<Record> {
    consume_as(
        broker,
        topic,
        Isolation::Uncommitted,
        Record::of,
        |_, quiet| quiet >= Duration::from_secs(1),
    )
}

/// Reads `topic` from the beginning until `done(records so far, time since the last
/// record)` or the wait ends.
pub fn consume_until(
    broker: &Broker,
    topic: &str,
    done: impl Fn(&[Record], Duration) -> bool,
) -> Vec<Record> {
    consume_as(broker, topic, Isolation::Committed, Record::of, done)
}

/// A consumed record as it is: key, value (`None`: a tombstone), headers.
pub struct RawRecord {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Reads every partition of `topic` from the beginning, as they are, until `expected`
/// records arrived (or the wait ends).
pub fn consume_raw(broker: &Broker, topic: &str, expected: usize) -> Vec<RawRecord> {
    consume_as(
        broker,
        topic,
        Isolation::Committed,
        |raw| raw,
        |records, _| records.len() >= expected,
    )
}

impl Record {
    /// A record whose value is an event with a `seq` (the payload, or its CloudEvents data).
    fn of(raw: RawRecord) -> Record {
        let payload: serde_json::Value =
            serde_json::from_slice(&raw.value.expect("a record with a value")).unwrap();
        let data = if payload.get("specversion").is_some() {
            &payload["data"]
        } else {
            &payload
        };
        Record {
            key: raw.key,
            seq: data["seq"].as_u64().unwrap(),
            id: raw.headers.get("id").cloned().unwrap_or_default(),
            headers: raw.headers,
        }
    }
}

/// Reads `topic` from the beginning with `isolation`, each record converted by `convert`,
/// until `done(records so far, time since the last record)` or the wait ends.
fn consume_as<T>(
    broker: &Broker,
    topic: &str,
    isolation: Isolation,
    convert: impl Fn(RawRecord) -> T,
    done: impl Fn(&[T], Duration) -> bool,
) -> Vec<T> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.address())
        .set("group.id", format!("test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set(
            "isolation.level",
            match isolation {
                Isolation::Committed => "read_committed",
                Isolation::Uncommitted => "read_uncommitted",
            },
        );
    for (key, value) in &broker.client_properties {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().unwrap();
    // The relay creates the topic with its first event: wait for its partitions.
    let deadline = Instant::now() + WAIT;
    let partitions = loop {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        if !partitions.is_empty() || Instant::now() > deadline {
            break partitions;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut last_record = Instant::now();
    while !done(&records, last_record.elapsed()) && Instant::now() < deadline {
        // An error here is librdkafka reporting connection trouble (a broker paused or
        // restarting); the consumer goes on by itself.
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        last_record = Instant::now();
        let headers: HashMap<String, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(convert(RawRecord {
            key: String::from_utf8_lossy(message.key().unwrap()).into_owned(),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        }));
    }
    records
}
