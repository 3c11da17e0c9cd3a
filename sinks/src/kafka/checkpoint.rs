//! Exactly-once mode's checkpoint: the position of the last event of every committed
//! transaction travels in that transaction, as the offsets a consumer group named after the
//! relay commits on a checkpoint topic; `recover` reads it back, and `settle` reads it after
//! a failed transaction to learn whether that transaction committed after all.

use super::errors::{classify, BrokerErrors};
use super::{blocking, KafkaSink, WARM_UP};
use crate::{Lsn, Position, SinkError};
use rdkafka::consumer::Consumer;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// The checkpoint topic's partitions: the committed offset of one is the commit LSN of the
/// last event delivered, of the other its index in its transaction.
const CHECKPOINT_PARTITIONS: i32 = 2;
const LSN_PARTITION: i32 = 0;
const INDEX_PARTITION: i32 = 1;

impl KafkaSink {
    /// Connects (fencing earlier producers of this transactional id) and reads the
    /// checkpoint committed in Kafka.
    pub(super) async fn recover_checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
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
        let position = self.read_checkpoint().await?;
        // The relay skips through what Kafka holds: nothing is left to settle.
        self.checkpoint = position;
        self.unsettled = None;
        tracing::info!(transactional_id = %self.settings.transactional_id, position = ?position.map(|p| p.to_string()),
            "recovered the checkpoint committed in Kafka");
        Ok(position)
    }

    /// The checkpoint committed in Kafka now.
    pub(super) async fn read_checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let topic = self.settings.checkpoint_topic.clone();
        let timeout = self.settings.timeout;
        let mut partitions = TopicPartitionList::new();
        partitions.add_partition(&topic, LSN_PARTITION);
        partitions.add_partition(&topic, INDEX_PARTITION);
        let committed = self
            .checkpoint_reader()?
            .committed_offsets(partitions, timeout)
            .map_err(|e| {
                classify(
                    &e,
                    "reading the Kafka checkpoint (if this keeps failing while the broker is \
                     up, a transaction the broker did not complete may be hanging on \
                     __consumer_offsets: kafka-transactions.sh find-hanging, then abort)",
                )
            })?;
        let offset = |partition| match committed
            .find_partition(&topic, partition)
            .map(|elem| elem.offset())
        {
            Some(Offset::Offset(offset)) => u64::try_from(offset).ok(),
            _ => None,
        };
        match (offset(LSN_PARTITION), offset(INDEX_PARTITION)) {
            (Some(lsn), Some(index)) => Ok(Some(Position {
                commit_lsn: Lsn(lsn),
                index: u32::try_from(index).map_err(|_| {
                    SinkError::Permanent(format!(
                        "the Kafka checkpoint in topic {topic} was not written by outbox-relay \
                         (index {index}); give the sink its own checkpoint_topic"
                    ))
                })?,
            })),
            _ => Ok(None),
        }
    }

    /// After a failed transaction (`unsettled`), with the producer that will send the next
    /// one (whose initialisation fenced any other producer and completed or aborted what the
    /// old one left): reads the checkpoint in Kafka. Still this sink's: nothing was
    /// committed. The failed transaction's position: it committed after all, and its events
    /// are not sent again. Anything else: another relay with the same transactional id
    /// committed, and this one stops.
    pub(super) async fn settle(&mut self) -> Result<(), SinkError> {
        let Some(attempted) = self.unsettled else {
            return Ok(());
        };
        let now = self.read_checkpoint().await?;
        if now != self.checkpoint && now != Some(attempted) {
            self.producer = None;
            return Err(SinkError::Permanent(format!(
                "another relay with the same transactional id took over (fenced): Kafka's \
                 checkpoint is at {}, where this sink had committed {} and tried {attempted}; \
                 only one relay may publish for this slot",
                describe(now),
                describe(self.checkpoint)
            )));
        }
        if now == Some(attempted) {
            tracing::info!(position = %attempted, "the Kafka transaction that failed had committed; its events are not sent again");
        }
        self.checkpoint = now;
        self.unsettled = None;
        Ok(())
    }

    /// Adds the checkpoint to the open transaction.
    pub(super) async fn add_checkpoint(
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

/// A checkpoint as the fencing message names it.
fn describe(checkpoint: Option<Position>) -> String {
    checkpoint.map_or_else(|| "nothing".to_owned(), |p| p.to_string())
}
