//! Any bytes into the pgoutput decoder: it must return a message or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_relay::source::pgoutput;

fuzz_target!(|data: &[u8]| {
    let _ = pgoutput::decode(data);
});
