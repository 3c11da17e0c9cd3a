//! Fewer, larger reads of the replication socket while PostgreSQL sends faster than the relay
//! reads.
//!
//! The walsender writes one pgoutput message (a few hundred bytes) per `send()`. A reader that
//! keeps up is woken for nearly every one of them: over TCP, each wake-up costs the walsender a
//! `sock_def_readable` and the relay a `recv`, an epoll round and a thread hand-off, which made
//! the relay's CPU per event mostly socket overhead. Once a read shows a backlog, the socket's
//! receive low-water mark (`SO_RCVLOWAT`) is raised so that the kernel wakes the relay only
//! when [`BURST_LOW_WATER_MARK`] bytes have arrived. When that much does not arrive within
//! [`BURST_IDLE`] (the end of a burst, a lone keepalive), the mark goes back to one byte and the
//! read completes with what is there, so the last event of a burst waits 1–2 ms longer
//! (tokio's timer has millisecond resolution). At low rates the reads stay as they were.
//!
//! Linux only: there, lowering the mark wakes a waiting reader when enough data is already
//! queued (`tcp_set_rcvlowat`, since Linux 4.20). Elsewhere, and on Unix sockets (whose poll
//! ignores the mark), reads are not coalesced. Over TLS the mark works on the socket below
//! it, and the reads of decrypted data reach [`BURST_READ`] as well (BENCHMARKS.md).

use bytes::BytesMut;
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// A read at least this large means the server is ahead of the relay: start coalescing. A
/// relay that keeps up seldom reads this much at once (a lower trigger delays events at
/// moderate rates: BENCHMARKS.md); draining a backlog, reads reach it within moments.
const BURST_READ: usize = 32 * 1024;

/// While coalescing, the kernel wakes the relay once this much is queued.
const BURST_LOW_WATER_MARK: i32 = 64 * 1024;

/// While coalescing, how long a read waits for the low-water mark before it takes what is there
/// and stops coalescing.
const BURST_IDLE: Duration = Duration::from_millis(1);

/// Reads from the replication socket, coalescing them while the server streams a backlog.
pub struct CoalescingReader {
    socket: Option<LowWaterMark>,
    coalescing: bool,
}

impl CoalescingReader {
    /// Plain reads, for sockets whose low-water mark cannot be used (Unix sockets).
    pub fn plain() -> Self {
        CoalescingReader {
            socket: None,
            coalescing: false,
        }
    }

    /// Coalesced reads on this TCP connection, TLS or not (the mark applies below TLS).
    pub fn for_tcp(stream: &TcpStream) -> Self {
        CoalescingReader {
            socket: LowWaterMark::for_socket(stream),
            coalescing: false,
        }
    }

    /// Reads into `buf` from `reader`, the stream over the socket this was made for. Cancel
    /// safe, as `read_buf` is.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        buf: &mut BytesMut,
    ) -> io::Result<usize> {
        let Some(socket) = &self.socket else {
            return reader.read_buf(buf).await;
        };
        let n = if self.coalescing {
            let read = reader.read_buf(buf);
            tokio::pin!(read);
            match tokio::time::timeout(BURST_IDLE, &mut read).await {
                Ok(n) => n?,
                Err(_) => {
                    self.coalescing = false;
                    // Wakes the pending read at once if anything is queued.
                    socket.set(1)?;
                    read.await?
                }
            }
        } else {
            reader.read_buf(buf).await?
        };
        if !self.coalescing && n >= BURST_READ {
            socket.set(BURST_LOW_WATER_MARK)?;
            self.coalescing = true;
        }
        Ok(n)
    }
}

/// The socket's `SO_RCVLOWAT`, set through a duplicate of its descriptor: the duplicate is
/// owned here, so it stays valid however the stream's halves are dropped.
#[cfg(target_os = "linux")]
struct LowWaterMark(std::os::fd::OwnedFd);

#[cfg(target_os = "linux")]
impl LowWaterMark {
    fn for_socket(stream: &TcpStream) -> Option<Self> {
        use std::os::fd::AsFd;
        match stream.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(LowWaterMark(fd)),
            Err(e) => {
                tracing::debug!(error = %e, "replication reads not coalesced: cannot duplicate the socket");
                None
            }
        }
    }

    fn set(&self, bytes: libc::c_int) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open while `self` lives, and setsockopt reads exactly
        // `size_of::<c_int>()` bytes from `bytes`, which outlives the call.
        let result = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// No low-water mark outside Linux: an uninhabited type, so reads are never coalesced there.
#[cfg(not(target_os = "linux"))]
enum LowWaterMark {}

#[cfg(not(target_os = "linux"))]
impl LowWaterMark {
    fn for_socket(_: &TcpStream) -> Option<Self> {
        None
    }

    fn set(&self, _: i32) -> io::Result<()> {
        match *self {}
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    fn low_water_mark(stream: &TcpStream) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the socket is open; `value` and `len` are valid for writes of their size.
        let result = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(result, 0, "{}", io::Error::last_os_error());
        value
    }

    fn already_coalescing(relay: &TcpStream) -> CoalescingReader {
        let mut coalescing = CoalescingReader::for_tcp(relay);
        let socket = coalescing.socket.as_ref().unwrap();
        socket.set(BURST_LOW_WATER_MARK).unwrap();
        coalescing.coalescing = true;
        coalescing
    }

    async fn read_with_deadline(
        coalescing: &mut CoalescingReader,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
    ) -> usize {
        tokio::time::timeout(Duration::from_secs(10), coalescing.read(stream, buf))
            .await
            .expect("a read waited for more than 10 s: the low-water mark was not lowered")
            .unwrap()
    }

    #[tokio::test]
    async fn a_backlog_raises_the_low_water_mark() {
        let (mut relay, mut server) = connected().await;
        let mut coalescing = CoalescingReader::for_tcp(&relay);
        server.write_all(&vec![b'x'; 4 * BURST_READ]).await.unwrap();
        // Wait until the backlog is queued, so the next read is a large one.
        let mut peeked = [0; BURST_READ];
        while relay.peek(&mut peeked).await.unwrap() < BURST_READ {
            tokio::task::yield_now().await;
        }
        let mut buf = BytesMut::with_capacity(8 * BURST_READ);
        let n = read_with_deadline(&mut coalescing, &mut relay, &mut buf).await;
        assert!(n >= BURST_READ, "read {n} bytes");
        assert!(coalescing.coalescing);
        assert_eq!(low_water_mark(&relay), BURST_LOW_WATER_MARK);
    }

    #[tokio::test]
    async fn a_short_tail_is_read_after_a_burst_and_coalescing_stops() {
        let (mut relay, mut server) = connected().await;
        let mut coalescing = already_coalescing(&relay);
        server.write_all(b"keepalive").await.unwrap();
        let mut buf = BytesMut::with_capacity(1024);
        let n = read_with_deadline(&mut coalescing, &mut relay, &mut buf).await;
        assert_eq!(&buf[..n], b"keepalive");
        assert!(!coalescing.coalescing);
        assert_eq!(low_water_mark(&relay), 1);
    }

    #[tokio::test]
    async fn small_reads_leave_the_socket_alone() {
        let (mut relay, mut server) = connected().await;
        let mut coalescing = CoalescingReader::for_tcp(&relay);
        for message in [&b"begin"[..], b"insert", b"commit"] {
            server.write_all(message).await.unwrap();
            let mut buf = BytesMut::with_capacity(1024);
            let n = read_with_deadline(&mut coalescing, &mut relay, &mut buf).await;
            assert_eq!(&buf[..n], message);
        }
        assert!(!coalescing.coalescing);
        assert_eq!(low_water_mark(&relay), 1);
    }

    #[tokio::test]
    async fn end_of_stream_while_coalescing_is_reported() {
        let (mut relay, server) = connected().await;
        let mut coalescing = already_coalescing(&relay);
        drop(server);
        let mut buf = BytesMut::with_capacity(1024);
        assert_eq!(
            read_with_deadline(&mut coalescing, &mut relay, &mut buf).await,
            0
        );
    }
}
