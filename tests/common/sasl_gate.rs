//! A SASL/PLAIN gate in front of the Kafka test broker. Tansu can require SCRAM logins but
//! cannot be given a user a test could log in as (it creates users only over a logged-in
//! connection and keeps them in memory), so the broker's side of a login that succeeds is
//! played here: the gate answers SaslHandshake and SaslAuthenticate (v0/v1) itself, checks
//! the PLAIN credentials, and then forwards the connection to the broker untouched.
//! ApiVersions is forwarded before the login (Tansu lists both SASL requests).

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const API_VERSIONS: i16 = 18;
const SASL_HANDSHAKE: i16 = 17;
const SASL_AUTHENTICATE: i16 = 36;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const SASL_AUTHENTICATION_FAILED: i16 = 58;

pub struct SaslGate {
    pub port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl SaslGate {
    /// Listens on a free port, admits `user` with `password` over SASL/PLAIN, and forwards
    /// to 127.0.0.1:`upstream`.
    pub fn start(user: &str, password: &str, upstream: u16) -> SaslGate {
        let expected: Arc<[u8]> = format!("\0{user}\0{password}").into_bytes().into();
        let (port, runtime) = super::serve_forwarding(upstream, move |mut client, mut broker| {
            let expected = expected.clone();
            async move {
                if log_in(&mut client, &mut broker, &expected).await == Some(true) {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                }
            }
        });
        SaslGate {
            port,
            _runtime: runtime,
        }
    }
}

/// Plays the broker's side of the login; `Some(true)` once the client is logged in,
/// `Some(false)` when it was refused, `None` on anything else (the connection is dropped).
async fn log_in(client: &mut TcpStream, broker: &mut TcpStream, expected: &[u8]) -> Option<bool> {
    loop {
        let request = read_frame(client).await?;
        let mut body = Reader(&request);
        let (api_key, api_version, correlation_id) = (body.i16()?, body.i16()?, body.i32()?);
        body.string()?; // client id
        match api_key {
            API_VERSIONS => {
                write_frame(broker, &request).await?;
                let response = read_frame(broker).await?;
                write_frame(client, &response).await?;
            }
            SASL_HANDSHAKE => {
                let error = if body.string()? == b"PLAIN" {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                let mut response = correlation_id.to_be_bytes().to_vec();
                response.extend(error.to_be_bytes());
                response.extend(1i32.to_be_bytes());
                response.extend(5i16.to_be_bytes());
                response.extend(b"PLAIN");
                write_frame(client, &response).await?;
            }
            SASL_AUTHENTICATE if api_version <= 1 => {
                let accepted = body.bytes()? == expected;
                let mut response = correlation_id.to_be_bytes().to_vec();
                if accepted {
                    response.extend(0i16.to_be_bytes());
                    response.extend((-1i16).to_be_bytes());
                } else {
                    let message = b"Authentication failed: invalid username or password";
                    response.extend(SASL_AUTHENTICATION_FAILED.to_be_bytes());
                    response.extend((message.len() as i16).to_be_bytes());
                    response.extend(message);
                }
                response.extend(0i32.to_be_bytes()); // no auth bytes
                if api_version == 1 {
                    response.extend(0i64.to_be_bytes()); // session lifetime: unlimited
                }
                write_frame(client, &response).await?;
                return Some(accepted);
            }
            _ => return None,
        }
    }
}

async fn read_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let len = stream.read_i32().await.ok()?;
    let mut frame = vec![0; usize::try_from(len).ok()?];
    stream.read_exact(&mut frame).await.ok()?;
    Some(frame)
}

async fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> Option<()> {
    let len = i32::try_from(frame.len()).ok()?;
    stream.write_all(&len.to_be_bytes()).await.ok()?;
    stream.write_all(frame).await.ok()
}

/// Big-endian reads of the Kafka protocol's non-flexible types.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A (nullable) string with an i16 length; null reads as empty.
    fn string(&mut self) -> Option<&'a [u8]> {
        match self.i16()? {
            -1 => Some(&[]),
            len => self.take(usize::try_from(len).ok()?),
        }
    }

    /// Bytes with an i32 length.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.i32()?;
        self.take(usize::try_from(len).ok()?)
    }
}
