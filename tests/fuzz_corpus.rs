//! Every input in the fuzzing corpus (fuzz/corpus/, from captured streams plus what
//! libFuzzer found; see scripts/fuzz.sh) through the decoder and the framing, as the fuzz
//! targets do: no input may panic. Inputs that once crashed stay here as regression tests.

use bytes::BytesMut;
use outbox_relay::source::pgoutput;
use outbox_relay::source::wire::{self, BackendMessage, ReplicationMessage};
use std::path::Path;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(!inputs.is_empty(), "{} is empty", dir.display());
    inputs
}

#[test]
fn the_decoder_corpus_never_panics() {
    for input in corpus("pgoutput_decode") {
        let _ = pgoutput::decode(&input);
    }
}

#[test]
fn the_framing_corpus_never_panics() {
    for input in corpus("replication_framing") {
        let mut buf = BytesMut::from(&input[..]);
        while let Ok(Some(message)) = wire::parse_backend(&mut buf) {
            if let BackendMessage::CopyData(copy) = message {
                if let Ok(ReplicationMessage::XLogData { data, .. }) = wire::parse_replication(copy)
                {
                    let _ = pgoutput::decode(&data);
                }
            }
        }
    }
}
