//! The benchmark's outbox row, shared by the micro-benchmarks so that they measure the
//! same data as `bench/run.py`.

/// The row's event id.
pub const ID: &str = "5f0c2a4e-8b1d-4c3e-9a7f-0123456789ab";
/// The row's aggregate id, the event key.
pub const AGGREGATE_ID: &str = "order-417";

/// A jsonb payload of exactly `len` bytes, as the harness writes it.
pub fn payload(len: usize) -> String {
    let filler: String = "abcdefghijklmnopqrstuvwxyz0123456789"
        .chars()
        .cycle()
        .take(len - 9)
        .collect();
    let payload = format!("{{\"d\": \"{filler}\"}}");
    assert_eq!(payload.len(), len);
    payload
}
