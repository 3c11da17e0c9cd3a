//! The Kafka sink (librdkafka through `rdkafka`).
//!
//! - The message key is the event key (the aggregate id by default), so the events of one
//!   aggregate go to one partition, in order. The idempotent producer is always on, so
//!   librdkafka's retries never reorder or duplicate within a producer session.
//! - Exactly-once mode (`exactly_once = true`, the default): every batch is one Kafka
//!   transaction that carries the batch's records AND this sink's checkpoint, as a
//!   transactional offset commit for a consumer group named after the relay: the position's
//!   commit LSN is the committed offset of partition 0 of the checkpoint topic, its index in
//!   the transaction the offset of partition 1 (offsets, not offset metadata, because every
//!   Kafka-protocol broker keeps offsets; Tansu drops the metadata, which carries the position
//!   as text for people). [`Sink::recover`] reads that commit back on start,
//!   and the relay confirms PostgreSQL only after the Kafka commit. The `transactional.id`
//!   is derived from the relay's identity (slot and sink), so a second or zombie relay with
//!   the same identity fences the first. `read_committed` consumers see every event once.
//! - At-least-once mode: the idempotent producer without transactions; the relay's
//!   checkpoint table decides where to resume, so a crash can repeat the events since the
//!   last checkpoint. Every event carries its stable id for consumer-side dedup.
//!
//! An event larger than `message.max.bytes` is rejected (dead-lettered), the rest go on.
//!
//! A binary payload (a `bytea` column) is the record's value as it is in `debezium`, `raw`
//! and CloudEvents binary mode (with its `content-type`), and `data_base64` in the
//! structured envelope.
//!
//! A tombstone (a NULL payload under `on_null_payload = "tombstone"`) is a record with the
//! event's key, the usual headers and a null value, in every format (a structured CloudEvents
//! envelope too): what compacted topics delete a key by.
//!
//! librdkafka reports connection trouble (a refused login, a refused certificate, a broker
//! that does not answer) not as the result of a call but through its error callback, while
//! the calls themselves just time out. [`BrokerErrors`] keeps those reports: they go to the
//! log, into the messages of failed batches and of `check`, and a refused login or
//! certificate stops the relay instead of being retried forever.

use crate::format::{self, Format};
use crate::routing::Template;
use crate::{Delivery, Event, Lsn, Payload, Position, Rejection, Sink, SinkError};
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Everything the Kafka sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Topic per event, e.g. `outbox.event.{aggregatetype}`.
    pub topic: Template,
    pub format: Format,
    /// CloudEvents binary mode: attributes as `ce_` headers, data as the value.
    pub binary: bool,
    pub exactly_once: bool,
    /// The transactional id and the checkpoint's consumer group, from the relay's identity.
    pub transactional_id: String,
    /// Topic whose offset commits carry the checkpoint (created if missing, 2 partitions:
    /// the commit LSN and the index in the transaction).
    pub checkpoint_topic: String,
    /// Create destination topics on first use, with these partitions and replication.
    pub create_topics: Option<(i32, i32)>,
    /// Events whose record is larger are dead-lettered.
    pub message_max_bytes: usize,
    /// How long one delivery or transaction step may take before the batch is retried.
    pub timeout: Duration,
    /// Any librdkafka property (TLS, SASL, tuning); wins over the sink's defaults.
    pub properties: BTreeMap<String, String>,
}

/// The librdkafka client context of every client the sink creates: librdkafka's log lines
/// and error reports go to `tracing`, and the last error report is kept.
#[derive(Clone, Default)]
struct BrokerErrors {
    last: Arc<Mutex<Option<BrokerError>>>,
}

/// An error librdkafka reported through its error callback.
#[derive(Clone, Debug)]
struct BrokerError {
    code: Option<RDKafkaErrorCode>,
    reason: String,
}

impl BrokerError {
    /// A refused login or certificate: retrying with the same settings cannot succeed.
    fn advice_if_permanent(&self) -> Option<&'static str> {
        match self.code {
            Some(RDKafkaErrorCode::Authentication) => {
                Some("check sasl.username, sasl.password (or sasl_password_file) and sasl.mechanism")
            }
            // librdkafka reports a TLS failure twice, with the SSL code and as a transport
            // failure, in either order; only a verification failure is a refused
            // certificate rather than a broken connection.
            Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::BrokerTransportFailure)
                if self.reason.contains("certificate verify failed") =>
            {
                Some("check ssl.ca.location and that the broker's certificate names the host in brokers")
            }
            _ => None,
        }
    }

    /// The report as a clause for an error message.
    fn describe(&self) -> String {
        match self.advice_if_permanent() {
            Some(advice) => format!(
                "the broker refused the connection: {}; {advice}",
                self.reason
            ),
            None => format!("librdkafka last reported: {}", self.reason),
        }
    }
}

impl BrokerErrors {
    fn take(&self) -> Option<BrokerError> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn peek(&self) -> Option<BrokerError> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `error` as the relay should see it: replaced by a refused login or certificate that
    /// librdkafka reported meanwhile, or with the broker's last complaint added.
    fn explain(&self, error: SinkError) -> SinkError {
        let SinkError::Retryable(message) = error else {
            return error;
        };
        match self.peek() {
            Some(reported) if reported.advice_if_permanent().is_some() => {
                SinkError::Permanent(format!("{message}; {}", reported.describe()))
            }
            Some(reported) => SinkError::Retryable(format!("{message}; {}", reported.describe())),
            None => SinkError::Retryable(message),
        }
    }
}

impl ClientContext for BrokerErrors {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
        let reported = BrokerError {
            code: error.rdkafka_error_code(),
            reason: reason.to_owned(),
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the cause, not its consequence ("1/1 brokers are down" follows a refused
        // login), and a refused login or certificate over anything retryable.
        let keep = last.as_ref().is_some_and(|kept| {
            reported.code == Some(RDKafkaErrorCode::AllBrokersDown)
                || (kept.advice_if_permanent().is_some()
                    && reported.advice_if_permanent().is_none())
        });
        if !keep {
            *last = Some(reported);
        }
    }
}

impl ConsumerContext for BrokerErrors {}

pub struct KafkaSink {
    settings: KafkaSettings,
    producer: Option<FutureProducer<BrokerErrors>>,
    /// Only for the consumer group metadata and the committed checkpoint.
    checkpoint_reader: Option<BaseConsumer<BrokerErrors>>,
    /// Creates topics; kept, since a new client connects and fetches metadata first
    /// (about 100 ms against a local broker).
    admin: Option<AdminClient<BrokerErrors>>,
    errors: BrokerErrors,
    known_topics: HashSet<String>,
    /// Reused per batch: rendered topic names and encoded values.
    topic_buf: String,
    value_buf: Vec<u8>,
}

impl KafkaSink {
    pub fn new(settings: KafkaSettings) -> Self {
        KafkaSink {
            settings,
            producer: None,
            checkpoint_reader: None,
            admin: None,
            errors: BrokerErrors::default(),
            known_topics: HashSet::new(),
            topic_buf: String::new(),
            value_buf: Vec::new(),
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.settings.brokers)
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random") // the Java client's: same key, same partition
            .set(
                "message.max.bytes",
                self.settings.message_max_bytes.to_string(),
            )
            .set(
                "message.timeout.ms",
                self.settings.timeout.as_millis().to_string(),
            )
            .set("linger.ms", "2");
        if self.settings.exactly_once {
            config
                .set("transactional.id", &self.settings.transactional_id)
                .set(
                    "transaction.timeout.ms",
                    (self.settings.timeout.as_millis() * 2).to_string(),
                );
        }
        for (key, value) in &self.settings.properties {
            config.set(key, value);
        }
        config
    }

    /// Creates the producer (and, in exactly-once mode, initialises transactions, which
    /// fences any earlier producer with the same transactional id).
    async fn connect(&mut self) -> Result<FutureProducer<BrokerErrors>, SinkError> {
        if let Some(producer) = &self.producer {
            return Ok(producer.clone());
        }
        let producer: FutureProducer<BrokerErrors> =
            self.create_client(&self.client_config(), "producer")?;
        if self.settings.exactly_once {
            let timeout = self.settings.timeout;
            let p = producer.clone();
            blocking(move || p.init_transactions(timeout)).await.map_err(|e| {
                classify(&e, "initialising Kafka transactions (does the broker support transactions? set exactly_once = false otherwise)")
            })?;
        }
        self.producer = Some(producer.clone());
        Ok(producer)
    }

    fn checkpoint_reader(&mut self) -> Result<&BaseConsumer<BrokerErrors>, SinkError> {
        if self.checkpoint_reader.is_none() {
            let mut config = self.client_config();
            for key in [
                "transactional.id",
                "transaction.timeout.ms",
                "enable.idempotence",
                "partitioner",
                "linger.ms",
                "message.timeout.ms",
            ] {
                config.remove(key);
            }
            config
                .set("group.id", &self.settings.transactional_id)
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed");
            self.checkpoint_reader = Some(self.create_client(&config, "checkpoint reader")?);
        }
        Ok(self.checkpoint_reader.as_ref().expect("created above"))
    }

    /// What `outbox-relay check` reports: whether the brokers answer a metadata request
    /// with these connection settings (TLS, SASL included).
    pub async fn check(&mut self) -> Vec<String> {
        let brokers = self.settings.brokers.clone();
        let timeout = self.settings.timeout.min(Duration::from_secs(10));
        let reader = match self.checkpoint_reader() {
            Ok(_) => self.checkpoint_reader.take().expect("created above"),
            Err(e) => return vec![e.to_string()],
        };
        let errors = self.errors.clone();
        let answer = blocking(move || {
            let fetched = reader.fetch_metadata(None, timeout).map(|_| ());
            if fetched.is_err() {
                // A consumer hands librdkafka's error reports to the context only when
                // polled: give the report of why the broker could not be reached (a
                // refused login or certificate) a moment to arrive.
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while errors.peek().is_none() && std::time::Instant::now() < deadline {
                    let _ = reader.poll(Duration::from_millis(100));
                }
            }
            fetched
        })
        .await;
        match answer {
            Ok(()) => Vec::new(),
            Err(e) => {
                let reported = self
                    .errors
                    .take()
                    .map(|reported| format!("; {}", reported.describe()))
                    .unwrap_or_default();
                vec![format!(
                    "cannot reach Kafka at {brokers}: {e}{reported}; check brokers and the \
                     security.* / sasl.* properties"
                )]
            }
        }
    }

    /// Creates `topic` if topic creation is configured and it was not seen yet.
    async fn ensure_topic(
        &mut self,
        topic: &str,
        partitions_replication: Option<(i32, i32)>,
    ) -> Result<(), SinkError> {
        let Some((partitions, replication)) = partitions_replication else {
            return Ok(());
        };
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new().operation_timeout(Some(self.settings.timeout));
        let results = self
            .admin()?
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| SinkError::Retryable(format!("creating Kafka topic {topic}: {e}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(SinkError::Permanent(format!(
                        "cannot create Kafka topic {name}: {code}; create it yourself or fix create_topics"
                    )))
                }
            }
        }
        self.known_topics.insert(topic.to_owned());
        Ok(())
    }

    fn headers(&self, event: &Event) -> OwnedHeaders {
        // `insert` takes the list by value; `Option::take` moves it out without making a
        // new one (`mem::take` would create and free an empty librdkafka list per header).
        let mut headers = Some(OwnedHeaders::new());
        let mut add = |key: &str, value: &str| {
            headers = headers.take().map(|list| {
                list.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        };
        add("id", &event.id);
        if self.settings.format != Format::Debezium {
            add("type", &event.event_type);
            if let Some(version) = event.schema_version {
                add("schema_version", &version.to_string());
            }
            if let Some(traceparent) = &event.traceparent {
                add("traceparent", traceparent);
            }
        }
        for (key, value) in &event.headers {
            add(key, value);
        }
        match (self.settings.format, self.settings.binary) {
            (Format::CloudEvents, true) => {
                add("content-type", event.payload.content_type());
                for (name, value) in format::attributes(event) {
                    if name != "datacontenttype" {
                        add(&format!("ce_{name}"), &value.to_string());
                    }
                }
            }
            (Format::CloudEvents, false) => add(
                "content-type",
                "application/cloudevents+json; charset=UTF-8",
            ),
            _ => {}
        }
        headers.expect("every insert puts the list back")
    }

    /// Encodes the value of `event` into `value_buf`; `false` for a tombstone, whose record
    /// has a null value in every format.
    fn encode_value(&mut self, event: &Event) -> bool {
        self.value_buf.clear();
        if event.payload == Payload::Tombstone {
            return false;
        }
        match (self.settings.format, self.settings.binary) {
            (Format::CloudEvents, false) => {
                format::write_line(Format::CloudEvents, event, &mut self.value_buf);
                self.value_buf.pop(); // the newline
            }
            _ => self.value_buf.extend_from_slice(event.payload.as_bytes()),
        }
        true
    }

    /// Hands every event of `batch` to the producer; returns the events too large for the
    /// broker as rejections, and the deliveries still to wait for.
    async fn produce_all(
        &mut self,
        producer: &FutureProducer<BrokerErrors>,
        batch: &[Event],
    ) -> Result<(Vec<Rejection>, Deliveries), SinkError> {
        let mut rejected = Vec::new();
        let mut pending: Deliveries = VecDeque::with_capacity(batch.len());
        for (index, event) in batch.iter().enumerate() {
            self.topic_buf.clear();
            self.settings.topic.render(event, &mut self.topic_buf);
            let topic = std::mem::take(&mut self.topic_buf);
            self.ensure_topic(&topic, self.settings.create_topics)
                .await?;
            let has_value = self.encode_value(event);
            let headers = self.headers(event);
            let mut record = FutureRecord::to(&topic)
                .key(event.key.as_bytes())
                .payload(&self.value_buf)
                .headers(headers);
            if !has_value {
                record.payload = None;
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back((index, delivery));
                        break;
                    }
                    Err((
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                        returned,
                    )) => {
                        let size = RecordSize::of(
                            event.key.len(),
                            self.value_buf.len(),
                            returned.headers.as_ref(),
                        );
                        rejected.push(Rejection {
                            index,
                            reason: format!(
                                "Kafka record of {size} is over message.max.bytes ({})",
                                self.settings.message_max_bytes
                            ),
                        });
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // The local queue is full: wait for the oldest delivery, then retry.
                        record = returned;
                        if let Some((oldest, delivery)) = pending.pop_front() {
                            delivery_result(oldest, delivery, batch).await?;
                        } else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    Err((e, _)) => return Err(classify(&e, "producing to Kafka")),
                }
            }
            self.topic_buf = topic;
        }
        Ok((rejected, pending))
    }
}

/// Deliveries of a batch not yet reported, with the index of their event.
type Deliveries = VecDeque<(usize, DeliveryFuture)>;

/// The size librdkafka compares with `message.max.bytes` before it takes a record
/// (`rd_kafka_msg_new0`): the key, the value, the headers as they are serialized (each name
/// and value with its length as a zigzag varint), and the most that a record's framing can
/// take. A refusal states this sum, so that its numbers agree with the limit.
struct RecordSize {
    key: usize,
    value: usize,
    headers: usize,
}

impl RecordSize {
    /// `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: the varints of the record's length, offset delta,
    /// key and value lengths and header count (5 bytes each at most), the timestamp delta's
    /// (10), and the attributes byte.
    const FRAMING: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

    fn of(key: usize, value: usize, headers: Option<&OwnedHeaders>) -> RecordSize {
        use rdkafka::message::Headers;
        let with_length = |len: usize| len + zigzag_varint_len(len);
        let headers = headers.map_or(0, |headers| {
            headers
                .iter()
                .map(|h| with_length(h.key.len()) + with_length(h.value.map_or(0, <[u8]>::len)))
                .sum()
        });
        RecordSize {
            key,
            value,
            headers,
        }
    }

    fn total(&self) -> usize {
        Self::FRAMING + self.key + self.value + self.headers
    }
}

impl std::fmt::Display for RecordSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes as librdkafka counts it (value {}, key {}, headers {}, framing {})",
            self.total(),
            self.value,
            self.key,
            self.headers,
            Self::FRAMING
        )
    }
}

/// Bytes of `len` as a zigzag-encoded varint (librdkafka's `rd_uvarint_enc_i64`).
fn zigzag_varint_len(len: usize) -> usize {
    let mut encoded = (len as u64) << 1;
    let mut bytes = 1;
    while encoded >= 0x80 {
        encoded >>= 7;
        bytes += 1;
    }
    bytes
}

/// Sends the batch's records at once and waits for every delivery report.
///
/// librdkafka holds records for `linger.ms` to fill produce requests. That suits a
/// producer that never waits, but the sink waits for the whole batch before the relay hands
/// it the next one, so the linger of the batch's last records would be idle time on every
/// batch (2 of about 6 ms per batch against a local broker). `rd_kafka_flush` makes the
/// broker threads send what they hold now, for as long as it runs; it returns when
/// librdkafka has handed every delivery report to the producer's polling thread, or
/// after `timeout`. Its outcome is not needed: the delivery reports say how each record
/// fared.
async fn deliver_now(
    producer: &FutureProducer<BrokerErrors>,
    timeout: Duration,
    pending: Deliveries,
    batch: &[Event],
) -> Result<(), SinkError> {
    if !pending.is_empty() {
        let p = producer.clone();
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let _ = tokio::task::spawn_blocking(move || {
            // SAFETY: the pointer is the producer's own handle, valid while `p` (a clone
            // that shares it) lives, which is until this call returns; librdkafka's flush
            // is thread-safe.
            unsafe { rdkafka::bindings::rd_kafka_flush(p.client().native_ptr(), timeout_ms) }
        })
        .await;
    }
    for (index, delivery) in pending {
        delivery_result(index, delivery, batch).await?;
    }
    Ok(())
}

/// Waits for one delivery report.
async fn delivery_result(
    index: usize,
    delivery: DeliveryFuture,
    batch: &[Event],
) -> Result<(), SinkError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(classify(
            &e,
            &format!("delivering event {} to Kafka", batch[index].position),
        )),
        Err(_) => Err(SinkError::Retryable(
            "the Kafka producer was closed during delivery".into(),
        )),
    }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// Fatal errors (fencing) and configuration errors stop the relay; the rest are retried.
fn classify(error: &KafkaError, context: &str) -> SinkError {
    classify_code(error.rdkafka_error_code(), &error.to_string(), context)
}

fn classify_code(code: Option<RDKafkaErrorCode>, error: &str, context: &str) -> SinkError {
    let fenced = matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    if fenced {
        return SinkError::Permanent(format!(
            "{context}: {error}: another relay with the same transactional id took over (fenced); \
             only one relay may publish for this slot"
        ));
    }
    let permanent = matches!(
        code,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::UnsupportedVersion
        )
    );
    if permanent {
        SinkError::Permanent(format!(
            "{context}: {error}; check the Kafka credentials and ACLs"
        ))
    } else {
        SinkError::Retryable(format!("{context}: {error}"))
    }
}

/// The checkpoint topic's partitions: the committed offset of one is the commit LSN of the
/// last event delivered, of the other its index in its transaction.
const CHECKPOINT_PARTITIONS: i32 = 2;
const LSN_PARTITION: i32 = 0;
const INDEX_PARTITION: i32 = 1;
/// How long a commit waits for librdkafka to let go of delivered messages (see `send_batch`).
const SETTLE: Duration = Duration::from_millis(100);
/// How long `recover` may spend preparing the producer for the first event (see `warm_up`).
const WARM_UP: Duration = Duration::from_secs(1);

#[async_trait]
impl Sink for KafkaSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        self.errors.take();
        let recovered = self.recover_checkpoint().await;
        recovered.map_err(|e| self.errors.explain(e))
    }

    async fn send(&mut self, batch: &[Event]) -> Result<Delivery, SinkError> {
        self.errors.take();
        let sent = self.send_batch(batch).await;
        sent.map_err(|e| self.errors.explain(e))
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        if let Some(producer) = self.producer.take() {
            let timeout = self.settings.timeout;
            blocking(move || producer.flush(timeout))
                .await
                .map_err(|e| classify(&e, "flushing Kafka"))?;
        }
        Ok(())
    }
}

impl KafkaSink {
    /// Connects (fencing earlier producers of this transactional id) and reads the
    /// checkpoint committed in Kafka.
    async fn recover_checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        // Connecting initialises transactions, which fences any earlier producer of this id.
        let producer = self.connect().await?;
        if tokio::time::timeout(WARM_UP, self.warm_up(&producer))
            .await
            .is_err()
        {
            tracing::debug!(
                "Kafka metadata not fetched within {WARM_UP:?}; the first batch will fetch it"
            );
        }
        if !self.settings.exactly_once {
            return Ok(None);
        }
        let topic = self.settings.checkpoint_topic.clone();
        self.ensure_topic(
            &topic,
            Some((
                CHECKPOINT_PARTITIONS,
                self.settings.create_topics.map_or(1, |(_, r)| r),
            )),
        )
        .await?;
        let timeout = self.settings.timeout;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic, LSN_PARTITION);
        partitions.add_partition(&topic, INDEX_PARTITION);
        let committed = self
            .checkpoint_reader()?
            .committed_offsets(partitions, timeout)
            .map_err(|e| classify(&e, "reading the Kafka checkpoint"))?;
        let offset = |partition| match committed
            .find_partition(&topic, partition)
            .map(|elem| elem.offset())
        {
            Some(Offset::Offset(offset)) => u64::try_from(offset).ok(),
            _ => None,
        };
        let position = match (offset(LSN_PARTITION), offset(INDEX_PARTITION)) {
            (Some(lsn), Some(index)) => Some(Position {
                commit_lsn: Lsn(lsn),
                index: u32::try_from(index).map_err(|_| {
                    SinkError::Permanent(format!(
                        "the Kafka checkpoint in topic {topic} was not written by outbox-relay \
                         (index {index}); give the sink its own checkpoint_topic"
                    ))
                })?,
            }),
            _ => None,
        };
        tracing::info!(transactional_id = %self.settings.transactional_id, position = ?position.map(|p| p.to_string()),
            "recovered the checkpoint committed in Kafka");
        Ok(position)
    }

    /// The admin client, created on first use.
    fn admin(&mut self) -> Result<&AdminClient<BrokerErrors>, SinkError> {
        if self.admin.is_none() {
            self.admin = Some(self.create_client(&self.client_config(), "admin client")?);
        }
        Ok(self.admin.as_ref().expect("created above"))
    }

    /// A librdkafka client (`what`: producer, admin client, ...) reporting to the sink's
    /// broker-error context.
    fn create_client<C>(&self, config: &ClientConfig, what: &str) -> Result<C, SinkError>
    where
        C: FromClientConfigAndContext<BrokerErrors>,
    {
        config
            .create_with_context(self.errors.clone())
            .map_err(|e| {
                SinkError::Permanent(format!(
                    "cannot create the Kafka {what}: {e}; check the [sinks] kafka settings"
                ))
            })
    }

    /// Creates the topic (when `create_topics` is set and the topic has no placeholders) and
    /// fetches its metadata, so that the producer knows the partitions' leaders and is
    /// connected to them before the first event: otherwise the session's first batch waits
    /// for all of that (about 100 ms against a local broker). Best effort: what fails here
    /// fails again, and is reported, in the first batch.
    async fn warm_up(&mut self, producer: &FutureProducer<BrokerErrors>) {
        let topic = self.settings.topic.as_static().map(str::to_owned);
        if let Some(topic) = &topic {
            if let Err(e) = self.ensure_topic(topic, self.settings.create_topics).await {
                tracing::debug!(error = %e, "Kafka topic not created before streaming");
                return;
            }
        }
        let p = producer.clone();
        let fetched = blocking(move || {
            p.client()
                .fetch_metadata(topic.as_deref(), WARM_UP)
                .map(|_| ())
        })
        .await;
        if let Err(e) = fetched {
            tracing::debug!(error = %e, "Kafka metadata not fetched before streaming");
        }
    }

    /// Produces `batch`, in one transaction with the checkpoint in exactly-once mode.
    async fn send_batch(&mut self, batch: &[Event]) -> Result<Delivery, SinkError> {
        let producer = self.connect().await?;
        if !self.settings.exactly_once {
            let (rejected, pending) = self.produce_all(&producer, batch).await?;
            deliver_now(&producer, self.settings.timeout, pending, batch).await?;
            return Ok(Delivery { rejected });
        }
        let last = batch.last().map(|e| e.position).unwrap_or_default();
        let p = producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(|e| classify(&e, "beginning a Kafka transaction"))?;
        let outcome = self.produce_and_commit(&producer, batch, last).await;
        match outcome {
            Ok(rejected) => Ok(Delivery { rejected }),
            Err(error) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    // Deliveries fail as "purged" once the producer is fenced: say why.
                    self.producer = None;
                    return Err(classify_code(
                        Some(code),
                        &reason,
                        "the Kafka producer failed",
                    ));
                }
                let timeout = self.settings.timeout;
                let p = producer.clone();
                if let Err(abort) = blocking(move || p.abort_transaction(timeout)).await {
                    // The producer is unusable: start over with a new one (and a new epoch).
                    tracing::warn!(error = %abort, "aborting the Kafka transaction failed; recreating the producer");
                    self.producer = None;
                }
                Err(error)
            }
        }
    }

    /// Produces `batch` and its checkpoint in the open transaction, then commits it.
    async fn produce_and_commit(
        &mut self,
        producer: &FutureProducer<BrokerErrors>,
        batch: &[Event],
        last: Position,
    ) -> Result<Vec<Rejection>, SinkError> {
        let (rejected, pending) = self.produce_all(producer, batch).await?;
        // The checkpoint's round trips overlap the records'.
        let timeout = self.settings.timeout;
        let (delivered, added) = tokio::join!(
            deliver_now(producer, timeout, pending, batch),
            self.add_checkpoint(producer, last)
        );
        // The checkpoint's error first: a fenced producer's deliveries only say "purged",
        // while AddOffsetsToTxn says why.
        added.and(delivered)?;
        let p = producer.clone();
        blocking(move || {
            // rdkafka's commit_transaction flushes first, and its flush polls for up to
            // 100 ms while librdkafka still counts a message as outstanding, which it does
            // for a moment after the message's delivery report: wait that moment out.
            let reported = Instant::now();
            while p.in_flight_count() > 0 && reported.elapsed() < SETTLE {
                std::thread::sleep(Duration::from_micros(50));
            }
            p.commit_transaction(timeout)
        })
        .await
        .map_err(|e| classify(&e, "committing the Kafka transaction"))?;
        Ok(rejected)
    }

    /// Adds the checkpoint to the open transaction.
    async fn add_checkpoint(
        &mut self,
        producer: &FutureProducer<BrokerErrors>,
        last: Position,
    ) -> Result<(), SinkError> {
        let topic = self.settings.checkpoint_topic.clone();
        let timeout = self.settings.timeout;
        let group = self.checkpoint_reader()?.group_metadata().ok_or_else(|| {
            SinkError::Permanent("the Kafka consumer has no group metadata".into())
        })?;
        let mut offsets = TopicPartitionList::new();
        let lsn = i64::try_from(last.commit_lsn.0).unwrap_or(i64::MAX);
        for (partition, offset) in [
            (LSN_PARTITION, lsn),
            (INDEX_PARTITION, i64::from(last.index)),
        ] {
            offsets
                .add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(|e| classify(&e, "preparing the Kafka checkpoint"))?;
        }
        if let Some(mut elem) = offsets.find_partition(&topic, LSN_PARTITION) {
            elem.set_metadata(format!("outbox-relay position {last}"));
        }
        let p = producer.clone();
        blocking(move || p.send_offsets_to_transaction(&offsets, &group, timeout))
            .await
            .map_err(|e| classify(&e, "adding the checkpoint to the Kafka transaction"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size a refusal states is the one librdkafka compared: around the limit, a record
    /// is refused exactly when that size is over `message.max.bytes`.
    #[test]
    fn a_refused_record_states_the_size_librdkafka_compared() {
        const MAX: usize = 2000;
        let producer: FutureProducer = ClientConfig::new()
            // Nothing listens there: a record is checked and queued without a broker.
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.max.bytes", MAX.to_string())
            .create()
            .unwrap();
        let headers = || {
            OwnedHeaders::new()
                .insert(Header {
                    key: "id",
                    value: Some("0123456789abcdef"),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json; charset=UTF-8"),
                })
        };
        let key = "order-17";
        for value_len in MAX - 200..MAX {
            let value = vec![b'x'; value_len];
            let record = FutureRecord::to("t")
                .key(key)
                .payload(&value)
                .headers(headers());
            let refused = matches!(
                producer.send_result(record),
                Err((
                    KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                    _
                ))
            );
            let size = RecordSize::of(key.len(), value_len, Some(&headers()));
            assert_eq!(refused, size.total() > MAX, "{size}");
        }
    }

    fn report(errors: &BrokerErrors, code: RDKafkaErrorCode, reason: &str) {
        errors.error(KafkaError::Global(code), reason);
    }

    #[test]
    fn a_refused_login_makes_a_timed_out_batch_permanent_and_outlives_its_consequences() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: refused",
        );
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "Disconnected",
        );
        match errors.explain(SinkError::Retryable("delivering: Message timed out".into())) {
            SinkError::Permanent(message) => {
                assert!(
                    message.contains("SASL authentication error: refused"),
                    "{message}"
                );
                assert!(message.contains("check sasl.username"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// librdkafka's transport-failure report of a refused certificate can come first, and
    /// `check` reads the first report: it is the refusal all the same.
    #[test]
    fn a_refused_certificate_reported_as_a_transport_failure_is_permanent() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "ssl://127.0.0.1:9093/bootstrap: ../ssl/statem/statem_clnt.c:1889:\
             tls_post_process_server_certificate error:0A000086:SSL routines::certificate \
             verify failed (after 3ms in state SSL_HANDSHAKE)",
        );
        match errors.explain(SinkError::Retryable("timed out".into())) {
            SinkError::Permanent(message) => {
                assert!(message.contains("check ssl.ca.location"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_broker_errors_stay_retryable_with_the_reason_added() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "Connection refused",
        );
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        match errors.explain(SinkError::Retryable("timed out".into())) {
            SinkError::Retryable(message) => {
                assert!(
                    message.ends_with("librdkafka last reported: Connection refused"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A TLS failure that is not a verification failure is a broken connection.
        report(
            &errors,
            RDKafkaErrorCode::SSL,
            "SSL handshake failed: Disconnected",
        );
        assert!(matches!(
            errors.explain(SinkError::Retryable("timed out".into())),
            SinkError::Retryable(_)
        ));
        report(
            &errors,
            RDKafkaErrorCode::SSL,
            "SSL handshake failed: certificate verify failed",
        );
        assert!(matches!(
            errors.explain(SinkError::Retryable("timed out".into())),
            SinkError::Permanent(_)
        ));
        // A permanent error stays permanent; a batch's start forgets old reports.
        assert!(matches!(
            errors.explain(SinkError::Permanent("fenced".into())),
            SinkError::Permanent(m) if m == "fenced"
        ));
        errors.take();
        assert!(matches!(
            errors.explain(SinkError::Retryable("timed out".into())),
            SinkError::Retryable(m) if m == "timed out"
        ));
    }
}
