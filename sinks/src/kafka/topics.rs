//! Topics: creating them when `create_topics` asks for it, and naming a missing one when a
//! batch fails without it. The admin client that creates them is made on first use and kept.

use super::errors::BrokerErrors;
use super::KafkaSink;
use crate::{Event, SinkError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use rdkafka::types::RDKafkaRespErr;

impl KafkaSink {
    /// Creates `topic` if topic creation is configured and it was not seen yet.
    pub(super) async fn ensure_topic(
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

    /// After a failed batch, when the sink does not create topics: the first of the batch's
    /// topics the broker says does not exist, as the reason to give. librdkafka reports such
    /// a record only as timed out, or as an unknown topic once it gives up waiting for the
    /// topic to appear, neither of which says what to do.
    pub(super) async fn missing_topic(&mut self, batch: &[Event]) -> Option<String> {
        if self.settings.create_topics.is_some() {
            return None;
        }
        let mut topics: Vec<String> = Vec::new();
        let mut topic = String::new();
        for event in batch {
            topic.clear();
            self.settings.topic.render(event, &mut topic);
            if !topics.contains(&topic) {
                topics.push(topic.clone());
            }
        }
        let producer = self.producer.clone()?;
        let timeout = self.settings.timeout;
        tokio::task::spawn_blocking(move || {
            topics.into_iter().find(|topic| {
                producer
                    .client()
                    .fetch_metadata(Some(topic), timeout)
                    .is_ok_and(|metadata| {
                        metadata.topics().iter().any(|t| {
                            t.error()
                                == Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)
                        })
                    })
            })
        })
        .await
        .ok()
        .flatten()
        .map(|topic| {
            format!(
                "Kafka topic {topic} does not exist and the broker does not create topics by \
                 itself: create it, or set create_topics = true; the batch waits for it"
            )
        })
    }

    /// The admin client, created on first use.
    fn admin(&mut self) -> Result<&AdminClient<BrokerErrors>, SinkError> {
        if self.admin.is_none() {
            self.admin = Some(self.create_client(&self.client_config(), "admin client")?);
        }
        Ok(self.admin.as_ref().expect("created above"))
    }
}
