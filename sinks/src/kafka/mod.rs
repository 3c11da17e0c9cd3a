//! The Kafka sink (librdkafka through `rdkafka`).
//!
//! - The message key is the event key (the aggregate id by default), so the events of one
//!   aggregate go to one partition, in order. The idempotent producer is always on, so
//!   librdkafka's retries never reorder or duplicate within a producer session.
//! - Exactly-once mode (`exactly_once = true`, the default): every batch is one Kafka
//!   transaction that carries the batch's records AND this sink's checkpoint, as a
//!   transactional offset commit for a consumer group named after the relay: the position's
//!   commit LSN is the committed offset of partition 0 of the checkpoint topic, its index in
//!   the transaction the offset of partition 1 (the offset metadata carries the position as
//!   text for people; README, Kafka, says why two offsets). [`Sink::recover`] reads that
//!   commit back on start,
//!   and the relay confirms PostgreSQL only after the Kafka commit. The `transactional.id`
//!   is derived from the relay's identity (slot and sink), so a second or zombie relay with
//!   the same identity fences the first. The broker also fences a producer whose
//!   transaction outlived `transaction.timeout.ms`: `send_batch` tells that apart by the
//!   transaction's age and starts over; after any failed transaction, `settle` reads the
//!   checkpoint before the next one (committed after all: not sent again; moved by another
//!   relay: stop). `read_committed` consumers see every event once.
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
//! The jobs live beside this file: the configuration (`config.rs`), a record's encoding
//! (`encode.rs`), librdkafka's error reports and their classification (`errors.rs`), topic
//! creation and missing topics (`topics.rs`), and exactly-once mode's checkpoint
//! (`checkpoint.rs`).

mod checkpoint;
mod config;
mod deliver;
mod encode;
mod errors;
mod topics;

pub use config::KafkaConfig;

use crate::format::Format;
use crate::routing::Template;
use crate::{Event, EventState, Position, Rejection, Sink, SinkError};
use async_trait::async_trait;
use deliver::{deliver_now, delivery_result, Deliveries};
use errors::{classify, classify_code, BrokerErrors};
use rdkafka::admin::AdminClient;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::collections::{BTreeMap, HashSet, VecDeque};
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

pub struct KafkaSink {
    settings: KafkaSettings,
    producer: Option<FutureProducer<BrokerErrors>>,
    /// Only for the consumer group metadata and the committed checkpoint.
    checkpoint_reader: Option<BaseConsumer<BrokerErrors>>,
    /// Creates topics; kept, since a new client connects and fetches metadata first.
    admin: Option<AdminClient<BrokerErrors>>,
    errors: BrokerErrors,
    known_topics: HashSet<String>,
    /// Exactly-once mode: the checkpoint this sink last read or committed, to tell a broker
    /// that aborted its transaction from another producer that took over (see `send_batch`).
    checkpoint: Option<Position>,
    /// Exactly-once mode, after a failed transaction: the position it would have committed.
    /// Its outcome may be unknown (the broker died while it committed, or aborting it
    /// failed), or the broker fenced this producer for outliving `transaction.timeout.ms`.
    /// Before the next transaction, the checkpoint in Kafka says what happened (see
    /// `settle`).
    unsettled: Option<Position>,
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
            checkpoint: None,
            unsettled: None,
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
            .set("linger.ms", "2")
            // librdkafka's default is 100 ms. Right after a commit, Kafka answers the next
            // transaction's first AddPartitionsToTxn with CONCURRENT_TRANSACTIONS until it has
            // written the commit's markers, and librdkafka retries after this backoff (the
            // Java client after 20 ms, KAFKA-5477). Against Apache Kafka 4.4, a transaction
            // of 50 events took 103 ms at the median with 100, 39 ms with 20.
            .set("retry.backoff.ms", "20");
        if self.settings.exactly_once {
            config
                .set("transactional.id", &self.settings.transactional_id)
                .set(
                    "transaction.timeout.ms",
                    self.transaction_timeout().as_millis().to_string(),
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
            let has_value = encode::value(&self.settings, event, &mut self.value_buf);
            let headers = encode::headers(&self.settings, event);
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
                        let size = encode::RecordSize::of(
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

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// How long a commit waits for librdkafka to let go of delivered messages (see `send_batch`).
const SETTLE: Duration = Duration::from_millis(100);
/// How long `recover` may spend preparing the producer for the first event (see `warm_up`).
const WARM_UP: Duration = Duration::from_secs(1);

#[async_trait]
impl Sink for KafkaSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        self.errors.take();
        let recovered = self.recover_checkpoint().await;
        recovered.map_err(|e| self.errors.with_reported(e))
    }

    /// A batch's states change only once the whole batch went through (its transaction
    /// committed, or every delivery was reported), so a retried batch is produced whole again:
    /// in exactly-once mode the failed attempt's transaction was aborted.
    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        self.errors.take();
        let mut sent = self.send_batch(batch).await;
        if matches!(sent, Err(SinkError::Retryable(_))) {
            if let Some(missing) = self.missing_topic(batch).await {
                sent = Err(SinkError::Retryable(missing));
            }
        }
        for Rejection { index, reason } in sent.map_err(|e| self.errors.with_reported(e))? {
            states[index] = EventState::Rejected(reason);
        }
        Ok(())
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
    /// for all of that. Best effort: what fails here
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
    async fn send_batch(&mut self, batch: &[Event]) -> Result<Vec<Rejection>, SinkError> {
        let producer = self.connect().await?;
        if !self.settings.exactly_once {
            let (rejected, pending) = self.produce_all(&producer, batch).await?;
            deliver_now(&producer, self.settings.timeout, pending, batch).await?;
            return Ok(rejected);
        }
        self.settle().await?;
        // What a failed transaction did commit is not sent again.
        let done = self
            .checkpoint
            .map_or(0, |at| batch.partition_point(|e| e.position <= at));
        let Some(last) = batch
            .last()
            .map(|e| e.position)
            .filter(|_| done < batch.len())
        else {
            return Ok(Vec::new());
        };
        let began = Instant::now();
        let p = producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(|e| classify(&e, "beginning a Kafka transaction"))?;
        let deadline = self.transaction_deadline();
        let attempt = self.produce_and_commit(&producer, &batch[done..], last);
        let Ok(outcome) = tokio::time::timeout(deadline, attempt).await else {
            // librdkafka can wait past its own timeout, for ever, for a coordinator that went
            // away (send_offsets_to_transaction: librdkafka issues 5456 and 5511). The producer
            // is abandoned where it waits; the new one's initialisation fences it, aborting
            // or completing its transaction, and `settle` reads what became of it.
            self.producer = None;
            self.unsettled = Some(last);
            return Err(SinkError::Retryable(format!(
                "the Kafka transaction did not finish within {deadline:?}, although each of its \
                 steps has a {:?} timeout (librdkafka waits for a transaction coordinator that \
                 went away); starting over with a new producer",
                self.settings.timeout
            )));
        };
        let Err(error) = outcome else {
            return outcome.map(|rejected| {
                rejected
                    .into_iter()
                    .map(|r| Rejection {
                        index: r.index + done,
                        reason: r.reason,
                    })
                    .collect()
            });
        };
        if let Some((code, reason)) = producer.client().fatal_error() {
            // Deliveries fail as "purged" once the producer is fenced: say why.
            self.producer = None;
            let timeout = self.transaction_timeout();
            if code == RDKafkaErrorCode::Fenced && began.elapsed() >= timeout {
                // The broker fences a producer whose transaction outlived
                // transaction.timeout.ms as it aborts that transaction, the same fencing
                // another producer's start causes. This transaction did outlive it: start
                // over; `settle` stops the relay if another producer has committed.
                self.unsettled = Some(last);
                return Err(SinkError::Retryable(format!(
                    "the Kafka producer failed: {reason}: its transaction was open for {:?}, \
                     past transaction.timeout.ms ({timeout:?}), so the broker aborted it (was \
                     the relay paused or starved?); starting over with a new producer",
                    began.elapsed()
                )));
            }
            return Err(classify_code(
                Some(code),
                &reason,
                "the Kafka producer failed",
            ));
        }
        self.unsettled = Some(last);
        let timeout = self.settings.timeout;
        let p = producer.clone();
        if let Err(abort) = blocking(move || p.abort_transaction(timeout)).await {
            // The producer is unusable (and the transaction may have committed: the broker
            // completes a commit it had begun): start over with a new one, whose
            // initialisation waits for that.
            tracing::warn!(error = %abort, "aborting the Kafka transaction failed; recreating the producer");
            self.producer = None;
        }
        Err(error)
    }

    /// How long one transaction's produce, checkpoint and commit may take before the producer
    /// is given up: the deliveries and the checkpoint run at once and the commit after them,
    /// each bounded by `timeout`; a further `timeout` is the margin.
    fn transaction_deadline(&self) -> Duration {
        self.settings.timeout * 3
    }

    /// The producer's `transaction.timeout.ms`: the sink's default (twice `timeout`) unless
    /// the properties set it.
    fn transaction_timeout(&self) -> Duration {
        self.settings
            .properties
            .get("transaction.timeout.ms")
            .and_then(|ms| ms.parse().ok())
            .map_or(self.settings.timeout * 2, Duration::from_millis)
    }

    /// Produces `batch` and its checkpoint in the open transaction, then commits it.
    async fn produce_and_commit(
        &mut self,
        producer: &FutureProducer<BrokerErrors>,
        batch: &[Event],
        last: Position,
    ) -> Result<Vec<Rejection>, SinkError> {
        let started = Instant::now();
        let (rejected, pending) = self.produce_all(producer, batch).await?;
        // The checkpoint's round trips overlap the records'.
        let timeout = self.settings.timeout;
        let ms = |from: Instant| from.elapsed().as_secs_f64() * 1000.0;
        let (delivered, added) = tokio::join!(
            async {
                let delivered = deliver_now(producer, timeout, pending, batch).await;
                (delivered, ms(started))
            },
            async {
                let added = self.add_checkpoint(producer, last).await;
                (added, ms(started))
            }
        );
        let ((delivered, deliver_ms), (added, checkpoint_ms)) = (delivered, added);
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
        tracing::debug!(
            events = batch.len(),
            deliver_ms,
            checkpoint_ms,
            committed_ms = ms(started),
            "Kafka transaction committed (times from the first record produced)"
        );
        self.checkpoint = Some(last);
        Ok(rejected)
    }
}
