//! The receiving half of a replication connection while it streams: reads the socket in
//! large chunks, frames CopyData into [`ReplicationMessage`]s without copying, and logs the
//! server's notices (a notice the walsender repeats is logged once per interval).
//!
//! Invariant: the buffer is only ever appended to and split off; events keep slices of it
//! alive, so nothing already handed out is overwritten.

use super::coalesce::CoalescingReader;
use super::replication::{message_name, Io, ServerError, SourceError, MIN_READ, READ_CHUNK};
use super::wire::{self, BackendMessage, ReplicationMessage};
use bytes::BytesMut;
use postgres_protocol::message::backend::{Message, NoticeResponseBody};
use std::io;
use std::time::{Duration, Instant};
use tokio::io::ReadHalf;

/// The receiving half while streaming.
pub struct ReplicationStream {
    reader: ReadHalf<Box<dyn Io>>,
    coalescing: CoalescingReader,
    buf: BytesMut,
    /// Socket reads and the bytes they returned, logged at debug level when the stream ends
    /// (how large reads are is what the relay's CPU per event mostly depends on).
    reads: u64,
    bytes: u64,
    notices: RepeatedNotices,
}

/// How often a notice the server repeats while streaming is logged again.
const NOTICE_REPEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The notices of a stream. A walsender that waits for something warns at every wake-up
/// (twice a second for a missing `synchronized_standby_slots` slot): the same notice is
/// logged once per [`NOTICE_REPEAT_INTERVAL`].
#[derive(Default)]
struct RepeatedNotices {
    last: Option<(String, Instant)>,
}

impl RepeatedNotices {
    /// Logs the notice unless it repeats the last one within the interval; returns whether
    /// it logged.
    fn log(&mut self, body: &NoticeResponseBody) -> bool {
        let notice = ServerError::from_fields(body.fields());
        let text = notice.to_string();
        if let Some((last, at)) = &self.last {
            if *last == text && at.elapsed() < NOTICE_REPEAT_INTERVAL {
                return false;
            }
        }
        notice.log_as_notice();
        self.last = Some((text, Instant::now()));
        true
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        tracing::debug!(
            reads = self.reads,
            bytes = self.bytes,
            bytes_per_read = self.bytes / self.reads.max(1),
            "replication stream closed"
        );
    }
}

impl ReplicationStream {
    pub(super) fn new(
        reader: ReadHalf<Box<dyn Io>>,
        coalescing: CoalescingReader,
        buf: BytesMut,
    ) -> Self {
        ReplicationStream {
            reader,
            coalescing,
            buf,
            reads: 0,
            bytes: 0,
            notices: RepeatedNotices::default(),
        }
    }

    /// The next message already received, without I/O; `None` when the buffer is drained.
    pub fn next_buffered(&mut self) -> Result<Option<ReplicationMessage>, SourceError> {
        loop {
            let Some(message) = wire::parse_backend(&mut self.buf)? else {
                return Ok(None);
            };
            match message {
                BackendMessage::CopyData(data) => {
                    return wire::parse_replication(data)
                        .map(Some)
                        .map_err(|e| SourceError::Protocol(e.to_string()))
                }
                BackendMessage::Other(Message::ErrorResponse(body)) => {
                    return Err(SourceError::Server(ServerError::parse(&body)))
                }
                BackendMessage::Other(Message::NoticeResponse(body)) => {
                    self.notices.log(&body);
                    continue;
                }
                BackendMessage::Other(Message::CopyDone | Message::CommandComplete(_)) => {
                    // A shutting-down walsender ends streaming with CommandComplete
                    // (PostgreSQL's WalSndDone) or CopyDone: reconnect later.
                    return Err(SourceError::Io(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "PostgreSQL ended replication (is it shutting down?)",
                    )));
                }
                BackendMessage::Other(other) => {
                    return Err(SourceError::Protocol(format!(
                        "unexpected {} while streaming",
                        message_name(&other)
                    )))
                }
                BackendMessage::CopyBothResponse => {
                    return Err(SourceError::Protocol(
                        "unexpected CopyBothResponse while streaming".into(),
                    ))
                }
            }
        }
    }

    /// Reads more from the socket into the buffer.
    pub async fn fill(&mut self) -> Result<(), SourceError> {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self
            .coalescing
            .read(&mut self.reader, &mut self.buf)
            .await?;
        self.reads += 1;
        self.bytes += n as u64;
        if n == 0 {
            return Err(SourceError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "PostgreSQL closed the replication connection",
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NoticeResponse as the server frames it.
    fn notice(severity: &str, message: &str) -> NoticeResponseBody {
        let mut fields = Vec::new();
        for (kind, value) in [(b'S', severity), (b'C', "22023"), (b'M', message)] {
            fields.push(kind);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut frame = BytesMut::from(&b"N"[..]);
        frame.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
        frame.extend_from_slice(&fields);
        match Message::parse(&mut frame) {
            Ok(Some(Message::NoticeResponse(body))) => body,
            _ => panic!("not a notice"),
        }
    }

    #[test]
    fn a_notice_repeated_while_streaming_is_logged_once_per_interval() {
        let mut notices = RepeatedNotices::default();
        let waiting = notice("WARNING", "replication slot \"s\" does not exist");
        assert!(notices.log(&waiting));
        assert!(!notices.log(&waiting));
        assert!(!notices.log(&waiting));
        assert!(notices.log(&notice("WARNING", "another")));
        assert!(notices.log(&waiting), "a different notice came in between");
        let (text, _) = notices.last.take().unwrap();
        notices.last = Some((text, Instant::now() - NOTICE_REPEAT_INTERVAL));
        assert!(notices.log(&waiting), "the interval has passed");
    }
}
