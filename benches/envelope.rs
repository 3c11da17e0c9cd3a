//! Micro-benchmarks of the envelope encoder: one event of the benchmark's row (uuid id,
//! 256-byte jsonb payload, no headers) written as a CloudEvents line (the default format),
//! as a Debezium line, and as the CloudEvents attributes that binary mode sends as headers.
//!
//!     CARGO_TARGET_DIR=/work/target cargo bench --bench envelope

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use outbox_relay_sinks::format::{self, Format};
use outbox_relay_sinks::test_util::sample;
use outbox_relay_sinks::{Event, Text};
use std::hint::black_box;

mod common;

/// The event the relay makes of the benchmark's outbox row.
fn event(payload_len: usize) -> Event {
    Event {
        xid: 7_311,
        commit_time_micros: 1_767_323_045_123_456,
        id: Text::from(common::ID),
        key: Text::from(common::AGGREGATE_ID),
        aggregate_id: Text::from(common::AGGREGATE_ID),
        payload: Text::from(common::payload(payload_len)).into(),
        ..sample(0x1_6B37_4D48, 41)
    }
}

fn benches(c: &mut Criterion) {
    let event = event(256);
    let mut line = Vec::with_capacity(1024);
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("CloudEvents line (256 B payload)", |b| {
        b.iter(|| {
            line.clear();
            format::write_line(Format::CloudEvents, black_box(&event), &mut line);
            black_box(line.len())
        })
    });
    group.bench_function("Debezium line (256 B payload)", |b| {
        b.iter(|| {
            line.clear();
            format::write_line(Format::Debezium, black_box(&event), &mut line);
            black_box(line.len())
        })
    });
    group.bench_function("CloudEvents attributes for binary mode", |b| {
        b.iter(|| black_box(format::attributes(black_box(&event)).len()))
    });
    group.finish();
}

criterion_group!(envelope_benches, benches);
criterion_main!(envelope_benches);
