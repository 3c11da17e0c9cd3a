//! Signed replays: `outbox-relay dlq replay` publishes a fixed dead letter as a logical
//! message signed with the relay's key; the mapper maps a replay only when its signature
//! verifies.
//!
//! Invariant: nothing an unprivileged role can write becomes an event through this path:
//! any role may call `pg_logical_emit_message`, but only one that can read the key can sign.

use super::fields::{decode_hex, encode_hex};
use serde::Deserialize;

/// The logical-message prefix `outbox-relay dlq replay` publishes fixed dead letters with;
/// always read, whatever `source.message_prefixes` says, and mapped only when its signature
/// verifies (see [`ReplayKey`]).
pub const REPLAY_PREFIX: &str = "outbox-relay-replay";

/// The key `dlq replay` signs its messages with (HMAC-SHA256), kept in the relay's schema
/// (`replay_key`, readable by the relay's role and the schema's owner only). Any role that can
/// connect may call `pg_logical_emit_message`, so a replay message is an event only when its
/// signature proves it was written by someone who can read the key: a forged one, whatever
/// table it names, is dead-lettered.
#[derive(Clone)]
pub struct ReplayKey(ring::hmac::Key);

impl ReplayKey {
    pub fn new(secret: &[u8]) -> Self {
        ReplayKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    /// The content of a replay message: the event document and its signature.
    pub fn sign(&self, document: &serde_json::Value) -> String {
        let event = document.to_string();
        let tag = ring::hmac::sign(&self.0, event.as_bytes());
        let mac = encode_hex(tag.as_ref());
        format!("{{\"mac\":\"{mac}\",\"event\":{event}}}")
    }

    /// The signed event document inside a replay message, if the signature verifies.
    pub(super) fn verify<'a>(&self, envelope: &ReplayEnvelope<'a>) -> Option<&'a [u8]> {
        let event = envelope.event.get().as_bytes();
        let mac = decode_hex(&envelope.mac)?;
        ring::hmac::verify(&self.0, event, &mac).ok()?;
        Some(event)
    }
}

/// A replay message's content.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayEnvelope<'a> {
    mac: String,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
}

/// Whether a verified replay's event document names a slot other than `own`. Every slot
/// of a database receives every logical message, whatever its publication, and the relay
/// of each would publish a replay it can verify: the document names the slot whose dead
/// letter it is (the signature covers the name). A message that does not verify is a dead
/// letter wherever it arrives, whatever slot it names.
pub(super) fn addressed_elsewhere(document: &[u8], own: &str) -> bool {
    #[derive(Deserialize)]
    struct Addressed {
        slot: Option<String>,
    }
    serde_json::from_slice::<Addressed>(document)
        .ok()
        .and_then(|addressed| addressed.slot)
        .is_some_and(|slot| slot != own)
}
