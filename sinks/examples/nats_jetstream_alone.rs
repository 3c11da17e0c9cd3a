//! The broker's side of the benchmark (`bench/run.py`, brokers phase): how fast NATS
//! JetStream stores messages from a publisher alone, with no PostgreSQL and no relay. Like
//! the NATS sink (`src/nats/`): one connection, every message published with a
//! `Nats-Msg-Id` (JetStream's duplicate check) and an `Outbox-Relay-Position` header, at
//! most WINDOW awaiting their acknowledgement (the sink's default `window`, 256), into a
//! file-backed stream made for the run that captures SUBJECT. Unlike the sink, the window
//! slides over the whole run: the sink waits for every acknowledgement of a batch before it
//! returns it.
//!
//! Usage: `nats_jetstream_alone URL SUBJECT MESSAGES BODY_BYTES WINDOW`; SUBJECT is one token
//! and names the stream too. Prints the seconds from the first publish to the last
//! acknowledgement. The stream is left for the caller.

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use outbox_relay_sinks::nats::POSITION_HEADER;
use outbox_relay_sinks::{Lsn, Position};
use std::collections::VecDeque;
use std::error::Error;
use std::time::Instant;

/// The first message's commit LSN (1/0): positions as long as the relay's.
const FIRST_LSN: u64 = 1 << 32;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let [url, subject, messages, body_bytes, window] = arguments()?;
    let messages: usize = messages.parse()?;
    let window: usize = window.parse()?;
    let body = Bytes::from(vec![b'x'; body_bytes.parse()?]);
    let client = async_nats::connect(url.as_str()).await?;
    let jetstream = jetstream::new(client.clone());
    jetstream
        .create_stream(stream::Config {
            name: subject.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for index in 0..messages {
        let position = Position {
            commit_lsn: Lsn(FIRST_LSN + index as u64),
            index: 0,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("00000000-0000-4000-8000-{index:012}").as_str(),
        );
        headers.insert(POSITION_HEADER, position.to_string().as_str());
        if pending.len() >= window {
            if let Some(ack) = pending.pop_front() {
                ack.await?;
            }
        }
        let ack = jetstream
            .publish_with_headers(subject.clone(), headers, body.clone())
            .await?;
        pending.push_back(ack);
    }
    for ack in pending {
        ack.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    client.flush().await?;
    println!("{{\"messages\": {messages}, \"seconds\": {seconds:.4}}}");
    Ok(())
}

fn arguments() -> Result<[String; 5], Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    arguments
        .try_into()
        .map_err(|_| "usage: nats_jetstream_alone URL SUBJECT MESSAGES BODY_BYTES WINDOW".into())
}
