//! The broker's side of the benchmark (`bench/run.py`, brokers phase): how fast the Kafka
//! broker takes records from an idempotent producer alone, with no PostgreSQL and no relay.
//! Every record is handed to librdkafka at once, then every delivery report is awaited, so
//! nothing waits between batches. Records are shaped like the relay's: one key out of 1,000
//! and a value of the given size, to a new topic of 3 partitions.
//!
//! Usage: `kafka_producer_alone BROKERS TOPIC RECORDS VALUE_BYTES`; prints the seconds from
//! the first record produced to the last delivery report.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::error::Error;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let [brokers, topic, records, value_bytes] = arguments()?;
    let records: usize = records.parse()?;
    let value = vec![b'x'; value_bytes.parse()?];
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let topics = [NewTopic::new(&topic, 3, TopicReplication::Fixed(1))];
    for created in admin.create_topics(&topics, &AdminOptions::new()).await? {
        created.map_err(|(topic, code)| format!("creating topic {topic}: {code}"))?;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .create()?;
    // The first record waits for the topic's metadata; it is not counted.
    producer
        .send(
            FutureRecord::to(&topic).key("warm-up").payload(&value),
            TIMEOUT,
        )
        .await
        .map_err(|(error, _)| error)?;
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(records);
    let mut key = String::new();
    for index in 0..records {
        key.clear();
        key.push_str("order-");
        key.push_str(&(index % 1000).to_string());
        let mut record = FutureRecord::to(&topic).key(&key).payload(&value);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(error, _)| error)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    producer.flush(TIMEOUT)?;
    println!("{{\"records\": {records}, \"seconds\": {seconds:.4}}}");
    Ok(())
}

fn arguments() -> Result<[String; 4], Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    arguments
        .try_into()
        .map_err(|_| "usage: kafka_producer_alone BROKERS TOPIC RECORDS VALUE_BYTES".into())
}
