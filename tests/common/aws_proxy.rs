//! An HTTP proxy in front of moto that lets a test answer some AWS requests itself: what
//! moto cannot produce (throttling, 5xx, entries refused in part of a batch, a request
//! refused as invalid) is injected before the request reaches moto, as the service does:
//! a refused entry is not stored. Every answer closes its connection.

use serde_json::Value;
use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Starts the proxy on `rt` in front of 127.0.0.1:`upstream`; `respond(head, body,
/// upstream)` answers each request (forwarding it with [`forward_whole`], or not). Returns
/// the proxy's URL.
pub fn start<F, Fut>(rt: &Runtime, upstream: u16, respond: F) -> String
where
    F: Fn(String, Vec<u8>, u16) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<u8>> + Send + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let respond = std::sync::Arc::new(respond);
    rt.spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let respond = respond.clone();
            tokio::spawn(async move {
                let Some((head, body)) = read_message(&mut client, false).await else {
                    return;
                };
                let response = respond(head, body, upstream).await;
                let _ = client.write_all(&response).await;
                let _ = client.shutdown().await;
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// Forwards the request to moto and returns moto's answer as it is.
pub async fn forward_whole(head: &str, body: &[u8], upstream: u16) -> Vec<u8> {
    let (head, body) = forward(head, body, upstream).await;
    [with_length(&head, body.len()).into_bytes(), body].concat()
}

/// The name of the AWS operation a request calls (its `X-Amz-Target`, e.g.
/// `AWSEvents.PutEvents`), or "".
pub fn target(head: &str) -> &str {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-amz-target")
                .then(|| value.trim())
        })
        .unwrap_or("")
}

/// Reads one HTTP/1.1 message with a Content-Length body (or up to EOF when `to_eof`).
pub async fn read_message(
    stream: &mut tokio::net::TcpStream,
    to_eof: bool,
) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut body = buf[head_end..].to_vec();
    if to_eof {
        stream.read_to_end(&mut body).await.ok()?;
    } else {
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while body.len() < length {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some((head, body))
}

/// `head` with its Content-Length set to `length` and the connection closed after it.
pub fn with_length(head: &str, length: usize) -> String {
    let mut out: String = head
        .trim_end()
        .split("\r\n")
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
            name != "content-length" && name != "connection"
        })
        .map(|l| format!("{l}\r\n"))
        .collect();
    out.push_str(&format!(
        "Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ));
    out
}

pub async fn forward(head: &str, body: &[u8], upstream: u16) -> (String, Vec<u8>) {
    let mut moto = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
        .await
        .unwrap();
    moto.write_all(with_length(head, body.len()).as_bytes())
        .await
        .unwrap();
    moto.write_all(body).await.unwrap();
    read_message(&mut moto, true).await.unwrap()
}

/// An answer of content type `content_type` (the service's JSON protocol) with `body`.
pub fn json_response(content_type: &str, status: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    let head = with_length(
        &format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"),
        body.len(),
    );
    [head.into_bytes(), body.into_bytes()].concat()
}
