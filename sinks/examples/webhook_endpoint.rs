//! The receiving side of the webhook benchmark (`bench/run.py`, brokers phase): an HTTP/1.1
//! endpoint that reads each request and answers `204 No Content` on the same keep-alive
//! connection, doing nothing else, so that what the webhook sink's run measures is the relay
//! and not the receiver. Python's `http.server` (ThreadingHTTPServer) took every request
//! more slowly than the client sent them (BENCHMARKS.md says by how much), hence this.
//! It understands what the sink and `webhook_post_alone` send: a head, then a body of
//! `Content-Length` bytes (no chunked bodies).
//!
//! Usage: `webhook_endpoint PORT`; listens on 127.0.0.1:PORT until killed.

use std::error::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let port: u16 = std::env::args()
        .nth(1)
        .ok_or("usage: webhook_endpoint PORT")?
        .parse()?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (connection, _) = listener.accept().await?;
        connection.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(e) = answer(connection).await {
                eprintln!("webhook_endpoint: {e}");
            }
        });
    }
}

/// Answers every request on `connection` until the client closes it.
async fn answer(mut connection: TcpStream) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(16 * 1024);
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if connection.read_buf(&mut buffer).await? == 0 {
                return Ok(());
            }
        };
        let request_end = head_end + content_length(&buffer[..head_end]);
        while buffer.len() < request_end {
            if connection.read_buf(&mut buffer).await? == 0 {
                return Ok(());
            }
        }
        buffer.drain(..request_end);
        connection.write_all(NO_CONTENT).await?;
    }
}

/// The `Content-Length` of a request head (0 without one).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}
