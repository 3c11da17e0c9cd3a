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
        let mut properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
             listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal}\n\
             listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=INTERNAL\n\
             log.dirs={data}\n\
             auto.create.topics.enable=false\n\
             transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n\
             num.partitions=1\n\
             default.replication.factor=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             num.recovery.threads.per.data.dir=1\n",
            data = dir.path().join("data").display(),
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
        let format_log = std::fs::File::create(dir.path().join("format.log")).unwrap();
        let formatted = java(format_log)
            .arg("kafka.tools.StorageTool")
            .args(["format", "--standalone", "-t", &cluster_id(), "-c"])
            .arg(&config)
            .args(&scram_users)
            .status()
            .unwrap();
        assert!(
            formatted.success(),
            "formatting Kafka's storage failed:\n{}",
            std::fs::read_to_string(dir.path().join("format.log")).unwrap_or_default()
        );
        let child = launch(dir.path());
        let mut broker = Broker {
            child,
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
        self.child = launch(self.dir.path());
        self.wait_ready();
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
