//! The receiver's side of the benchmark (`bench/run.py`, brokers phase): how fast an HTTP
//! endpoint takes webhook requests from a client alone, with no PostgreSQL and no relay.
//! Like the webhook sink (`src/webhook/`): hyper-util's legacy client with keep-alive
//! connections (TCP_NODELAY on), one `POST` per message with the sink's headers
//! (`User-Agent`, `Idempotency-Key`, the structured mode's `Content-Type`) and a body of the
//! given size, at most CONCURRENCY requests in flight (the sink's default `concurrency`,
//! 16). Unlike the sink, which keeps one request per key in flight and returns a batch
//! once every request of it is answered, the requests here never wait for one another.
//!
//! Usage: `webhook_post_alone URL MESSAGES BODY_BYTES CONCURRENCY`; prints the seconds from
//! the first request to the last answer.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outbox_relay_sinks::webhook::request::STRUCTURED_CONTENT_TYPE;
use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let [url, messages, body_bytes, concurrency] = arguments()?;
    let url: hyper::Uri = url.parse()?;
    let messages: usize = messages.parse()?;
    let concurrency: usize = concurrency.parse()?;
    let body = Bytes::from(vec![b'x'; body_bytes.parse()?]);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, body, next) = (client.clone(), url.clone(), body.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= messages {
                    return Ok::<(), String>(());
                }
                post(&client, &url, index, body.clone()).await?;
            }
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{{\"messages\": {messages}, \"seconds\": {seconds:.4}}}");
    Ok(())
}

/// One request, answered 2xx (its body, if any, read so that the connection is reused).
async fn post(
    client: &HttpClient,
    url: &hyper::Uri,
    index: usize,
    body: Bytes,
) -> Result<(), String> {
    use http_body_util::BodyExt;
    let request = hyper::Request::post(url.clone())
        .header(hyper::header::USER_AGENT, "outbox-relay-bench")
        .header(
            "idempotency-key",
            format!("00000000-0000-4000-8000-{index:012}"),
        )
        .header(hyper::header::CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("the endpoint answered {status}"));
    }
    Ok(())
}

fn arguments() -> Result<[String; 4], Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    arguments
        .try_into()
        .map_err(|_| "usage: webhook_post_alone URL MESSAGES BODY_BYTES CONCURRENCY".into())
}
