//! Waiting for a batch's delivery reports: the records are flushed at once (no linger on a
//! batch the relay waits for), and each report says how its record fared.
//!
//! Invariant: a batch is delivered only when every record's report says so; the first
//! failed report fails the batch.

use super::errors::{classify, BrokerErrors};
use crate::{Event, SinkError};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use std::collections::VecDeque;
use std::time::Duration;

/// Deliveries of a batch not yet reported, with the index of their event.
pub(super) type Deliveries = VecDeque<(usize, DeliveryFuture)>;

/// Sends the batch's records at once and waits for every delivery report.
///
/// librdkafka holds records for `linger.ms` to fill produce requests. That suits a
/// producer that never waits, but the sink waits for the whole batch before the relay hands
/// it the next one, so the linger of the batch's last records would be idle time on every
/// batch. `rd_kafka_flush` makes the broker threads send what they hold now, for as long
/// as it runs; it returns when librdkafka has handed every delivery report to the
/// producer's polling thread, or after `timeout`. Its outcome is not needed: the delivery
/// reports say how each record fared.
pub(super) async fn deliver_now(
    producer: &FutureProducer<BrokerErrors>,
    timeout: Duration,
    pending: Deliveries,
    batch: &[Event],
) -> Result<(), SinkError> {
    if !pending.is_empty() {
        let p = producer.clone();
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let _ = tokio::task::spawn_blocking(move || {
            // Why not the safe `Producer::flush`: rdkafka's calls `rd_kafka_flush` with a zero
            // timeout in a loop and polls the producer's event queue from this thread, a
            // queue the producer's own polling thread already serves; one call with the
            // whole timeout lets librdkafka wait for the delivery reports itself.
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
pub(super) async fn delivery_result(
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
