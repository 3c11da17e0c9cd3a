//! The broker's side of the benchmark (`bench/run.py`, brokers phase): how fast Redis takes
//! stream entries from a client alone, with no PostgreSQL and no relay. It does what the
//! Redis sink (`src/redis/`) does minus the source: one multiplexed connection, entries
//! added with `XADD` and an explicit id that grows, BATCH of them in one `MULTI`/`EXEC`
//! awaited before the next (the relay's `batch_size`, one batch in flight), ids made by the
//! sink's own `entry_id` from positions that grow, each entry with the sink's fields (`id`, `key`, `type`, `aggregatetype`, `aggregateid`, then `event`, a
//! body of the given size), one key out of 1,000.
//!
//! Usage: `redis_xadd_alone URL STREAM ENTRIES BODY_BYTES BATCH`; prints the seconds from
//! the first `MULTI` sent to the last `EXEC` answered. The stream is left for the caller.

use outbox_relay_sinks::redis::entry_id;
use outbox_relay_sinks::{Lsn, Position};
use std::error::Error;
use std::time::Instant;

/// The first entry's commit LSN (1/0): ids as long as the relay's.
const FIRST_LSN: u64 = 1 << 32;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let [url, stream, entries, body_bytes, batch] = arguments()?;
    let entries: usize = entries.parse()?;
    let batch: usize = batch.parse()?;
    let body = vec![b'x'; body_bytes.parse()?];
    let client = redis::Client::open(url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let started = Instant::now();
    let mut next = 0;
    while next < entries {
        let end = entries.min(next + batch);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for index in next..end {
            let key = format!("order-{}", index % 1000);
            pipe.cmd("XADD")
                .arg(&stream)
                .arg(entry_id(Position {
                    commit_lsn: Lsn(FIRST_LSN + index as u64),
                    index: 0,
                }))
                .arg("id")
                .arg(format!("00000000-0000-4000-8000-{index:012}"))
                .arg("key")
                .arg(&key)
                .arg("type")
                .arg("OrderCreated")
                .arg("aggregatetype")
                .arg("order")
                .arg("aggregateid")
                .arg(&key)
                .arg("event")
                .arg(&body);
        }
        let _: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        next = end;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{{\"entries\": {entries}, \"seconds\": {seconds:.4}}}");
    Ok(())
}

fn arguments() -> Result<[String; 5], Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    arguments
        .try_into()
        .map_err(|_| "usage: redis_xadd_alone URL STREAM ENTRIES BODY_BYTES BATCH".into())
}
