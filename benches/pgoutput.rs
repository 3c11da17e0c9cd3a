//! Micro-benchmarks of the source hot path: the pgoutput decoder on one Insert of the
//! benchmark's row (Debezium outbox layout, 256-byte jsonb payload) and on Begin/Commit taken
//! from the captured fixture, and the replication framing (CopyData → XLogData) over a
//! receive buffer holding a whole 100-row transaction.
//!
//!     CARGO_TARGET_DIR=/work/target cargo bench --bench pgoutput

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use outbox_relay::source::pgoutput::{self, Message};
use outbox_relay::source::wire::{self, BackendMessage, ReplicationMessage};
use std::hint::black_box;

mod common;

/// The captured fixture's messages, in order.
fn fixture() -> Vec<Vec<u8>> {
    include_str!("../src/source/testdata/pgoutput-v1.hex")
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

/// An Insert as the walsender sends it for the benchmark's outbox row: id uuid,
/// aggregatetype, aggregateid, type, payload jsonb of `payload_len` bytes, created_at.
fn insert_message(payload_len: usize) -> Vec<u8> {
    let payload = common::payload(payload_len);
    let columns: [&[u8]; 6] = [
        common::ID.as_bytes(),
        b"order",
        common::AGGREGATE_ID.as_bytes(),
        b"OrderCreated",
        payload.as_bytes(),
        b"2026-01-02 03:04:05.123456+00",
    ];
    let mut m = vec![b'I'];
    m.extend_from_slice(&16_389u32.to_be_bytes());
    m.push(b'N');
    m.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for value in columns {
        m.push(b't');
        m.extend_from_slice(&(value.len() as i32).to_be_bytes());
        m.extend_from_slice(value);
    }
    m
}

/// CopyData('w' XLogData(message)) framing, as it arrives on the socket.
fn frame(message: &[u8], lsn: u64, out: &mut BytesMut) {
    out.put_u8(b'd');
    out.put_u32((4 + 25 + message.len()) as u32);
    out.put_u8(b'w');
    out.put_u64(lsn);
    out.put_u64(lsn);
    out.put_i64(0);
    out.put_slice(message);
}

fn benches(c: &mut Criterion) {
    let fixture = fixture();
    let begin = fixture
        .iter()
        .find(|m| m[0] == b'B')
        .expect("a Begin")
        .clone();
    let commit = fixture
        .iter()
        .find(|m| m[0] == b'C')
        .expect("a Commit")
        .clone();
    let insert = insert_message(256);
    assert!(matches!(pgoutput::decode(&insert), Ok(Message::Insert(_))));

    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode Insert (6 columns, 256 B payload)", |b| {
        b.iter(|| pgoutput::decode(black_box(&insert)).map(|m| black_box(m).kind()))
    });
    group.bench_function("decode Begin", |b| {
        b.iter(|| pgoutput::decode(black_box(&begin)).map(|m| black_box(m).kind()))
    });
    group.bench_function("decode Commit", |b| {
        b.iter(|| pgoutput::decode(black_box(&commit)).map(|m| black_box(m).kind()))
    });
    group.finish();

    // One 100-row transaction as received: Begin, 100 Inserts, Commit, each in its own
    // CopyData/XLogData frame; split every frame off the buffer and decode it.
    let mut received = BytesMut::new();
    frame(&begin, 1, &mut received);
    for i in 0..100 {
        frame(&insert, 2 + i, &mut received);
    }
    frame(&commit, 200, &mut received);
    let received = received.freeze();
    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Elements(102));
    group.bench_function("frame + decode a 100-row transaction", |b| {
        b.iter_batched(
            || BytesMut::from(&received[..]),
            |mut buf| {
                let mut messages = 0;
                while let Some(BackendMessage::CopyData(data)) =
                    wire::parse_backend(&mut buf).expect("frame")
                {
                    if let ReplicationMessage::XLogData { data, .. } =
                        wire::parse_replication(data).expect("xlogdata")
                    {
                        let data: Bytes = data;
                        black_box(pgoutput::decode(&data).expect("decode").kind());
                        messages += 1;
                    }
                }
                messages
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(pgoutput_benches, benches);
criterion_main!(pgoutput_benches);
