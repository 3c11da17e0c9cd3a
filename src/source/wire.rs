//! Framing for our replication connection: splits backend messages off the receive buffer
//! (handing the ordinary ones to `postgres-protocol`, which lacks CopyBothResponse), and
//! encodes/decodes the streaming-replication messages carried inside CopyData. No I/O here.

#![forbid(unsafe_code)]

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend;
use std::io;

/// A backend message, with the replication hot path (CopyData) kept zero-copy.
pub enum BackendMessage {
    /// Payload of a CopyData message, sharing the receive buffer.
    CopyData(Bytes),
    /// The server entered CopyBoth mode: replication streaming has started.
    CopyBothResponse,
    /// Anything else, parsed by `postgres-protocol`.
    Other(backend::Message),
}

const COPY_DATA: u8 = b'd';
const COPY_BOTH_RESPONSE: u8 = b'W';

/// Splits one complete message off the front of `buf`, or returns `None` if more bytes are
/// needed.
pub fn parse_backend(buf: &mut BytesMut) -> io::Result<Option<BackendMessage>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "backend message {:?} declares length {len} (< 4)",
                tag as char
            ),
        ));
    }
    match tag {
        COPY_DATA | COPY_BOTH_RESPONSE => {
            if buf.len() < len + 1 {
                buf.reserve(len + 1 - buf.len());
                return Ok(None);
            }
            let mut frame = buf.split_to(len + 1);
            if tag == COPY_BOTH_RESPONSE {
                return Ok(Some(BackendMessage::CopyBothResponse));
            }
            frame.advance(5);
            Ok(Some(BackendMessage::CopyData(frame.freeze())))
        }
        _ => Ok(backend::Message::parse(buf)?.map(BackendMessage::Other)),
    }
}

/// A message from the walsender inside CopyData.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: here, one pgoutput message starting at `wal_start`.
    XLogData {
        wal_start: u64,
        wal_end: u64,
        server_time: i64,
        data: Bytes,
    },
    /// The server's position, and whether it wants a status update right away.
    PrimaryKeepalive {
        wal_end: u64,
        server_time: i64,
        reply_requested: bool,
    },
}

/// A malformed CopyData payload.
#[derive(Debug, thiserror::Error)]
#[error("malformed replication message: {0}")]
pub struct FrameError(pub String);

/// Decodes the payload of a CopyData message received while streaming.
pub fn parse_replication(mut data: Bytes) -> Result<ReplicationMessage, FrameError> {
    let Some(&tag) = data.first() else {
        return Err(FrameError("empty CopyData".into()));
    };
    match tag {
        b'w' => {
            if data.len() < 25 {
                return Err(FrameError(format!(
                    "XLogData of {} bytes (header is 25)",
                    data.len()
                )));
            }
            data.advance(1);
            let wal_start = data.get_u64();
            let wal_end = data.get_u64();
            let server_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            })
        }
        b'k' => {
            if data.len() != 18 {
                return Err(FrameError(format!(
                    "keepalive of {} bytes (expected 18)",
                    data.len()
                )));
            }
            data.advance(1);
            let wal_end = data.get_u64();
            let server_time = data.get_i64();
            let reply_requested = data.get_u8() == 1;
            Ok(ReplicationMessage::PrimaryKeepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        other => Err(FrameError(format!(
            "unknown message type {:?}",
            other as char
        ))),
    }
}

/// Encodes a Standby Status Update ('r') wrapped in CopyData into `out`.
pub fn standby_status_update(write: u64, flush: u64, apply: u64, now: i64, out: &mut BytesMut) {
    out.put_u8(COPY_DATA);
    out.put_u32(4 + 34);
    out.put_u8(b'r');
    out.put_u64(write);
    out.put_u64(flush);
    out.put_u64(apply);
    out.put_i64(now);
    out.put_u8(0);
}

/// PostgreSQL's epoch (2000-01-01) in microseconds since the Unix epoch. Times cross the
/// protocol in PostgreSQL's epoch and leave the source side in the Unix epoch.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Microseconds since PostgreSQL's epoch, for status updates.
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    unix.as_micros() as i64 - PG_EPOCH_UNIX_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_data(payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u8(b'd');
        buf.put_u32(4 + payload.len() as u32);
        buf.put_slice(payload);
        buf
    }

    #[test]
    fn splits_copy_data_and_waits_for_partial_frames() {
        let mut xlog = vec![b'w'];
        xlog.extend_from_slice(&1u64.to_be_bytes());
        xlog.extend_from_slice(&2u64.to_be_bytes());
        xlog.extend_from_slice(&3i64.to_be_bytes());
        xlog.extend_from_slice(b"BODY");
        let full = copy_data(&xlog);
        let mut partial = BytesMut::from(&full[..full.len() - 1]);
        assert!(parse_backend(&mut partial).unwrap().is_none());
        partial.extend_from_slice(&full[full.len() - 1..]);
        let Some(BackendMessage::CopyData(data)) = parse_backend(&mut partial).unwrap() else {
            panic!("expected CopyData");
        };
        assert!(partial.is_empty());
        assert_eq!(
            parse_replication(data).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: 1,
                wal_end: 2,
                server_time: 3,
                data: Bytes::from_static(b"BODY")
            }
        );
    }

    #[test]
    fn keepalive_and_garbage() {
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_replication(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::PrimaryKeepalive {
                wal_end: 9,
                server_time: 0,
                reply_requested: true
            }
        );
        for bad in [&b""[..], b"w123", b"k1", b"z", &k[..17]] {
            assert!(parse_replication(Bytes::copy_from_slice(bad)).is_err());
        }
        let mut short_len = BytesMut::from(&[b'd', 0, 0, 0, 2][..]);
        assert!(parse_backend(&mut short_len).is_err());
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        standby_status_update(1, 2, 3, 4, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &1u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
    }
}
