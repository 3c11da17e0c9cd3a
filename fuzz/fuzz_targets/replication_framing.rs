//! Any bytes as received on the replication connection: split into backend messages, parse
//! CopyData as replication messages and XLogData payloads as pgoutput, the way the reader
//! does. Errors are fine; panics and endless loops are not.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use outbox_relay::source::pgoutput;
use outbox_relay::source::wire::{self, BackendMessage, ReplicationMessage};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(message)) = wire::parse_backend(&mut buf) {
        if let BackendMessage::CopyData(copy) = message {
            if let Ok(ReplicationMessage::XLogData { data, .. }) = wire::parse_replication(copy) {
                let _ = pgoutput::decode(&data);
            }
        }
    }
});
