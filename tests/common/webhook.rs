//! An HTTP endpoint for the webhook sink's tests, written on hyper: it records every request
//! and answers as the test's plan says: a status (with headers such as `Retry-After`), after
//! a delay, or by dropping the connection without an answer.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as the endpoint saw it, and what it answered (0: dropped).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub at: Instant,
    pub status: u16,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// How the endpoint answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
    /// Close the connection without answering.
    pub drop: bool,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
            drop: false,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(204)
    }

    pub fn dropped() -> Reply {
        Reply {
            drop: true,
            ..Reply::ok()
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// The plan: the answer to a request, given it and how many requests came before it.
pub type Plan = Box<dyn FnMut(&Recorded, usize) -> Reply + Send>;

struct State {
    requests: Mutex<Vec<Recorded>>,
    plan: Mutex<Plan>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The endpoint, on a free port of 127.0.0.1, until dropped.
pub struct Hook {
    pub port: u16,
    state: Arc<State>,
    _runtime: tokio::runtime::Runtime,
}

impl Hook {
    /// An endpoint answering 204 to everything.
    pub fn start() -> Hook {
        Hook::with_plan(Box::new(|_, _| Reply::ok()))
    }

    pub fn with_plan(plan: Plan) -> Hook {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            plan: Mutex::new(plan),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let serving = state.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(state.clone(), request));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Hook {
            port,
            state,
            _runtime: runtime,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn accepted(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// The most requests the endpoint was answering at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn answer(
    state: Arc<State>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let (head, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes().to_vec());
    let mut recorded = Recorded {
        path: head.uri.path().to_owned(),
        headers: head
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.unwrap_or_default(),
        at: Instant::now(),
        status: 0,
    };
    let reply = {
        let count = state.requests.lock().unwrap().len();
        (state.plan.lock().unwrap())(&recorded, count)
    };
    // Recorded before the delay, with its answer, so that tests see it arrive.
    recorded.status = if reply.drop { 0 } else { reply.status };
    state.requests.lock().unwrap().push(recorded);
    tokio::time::sleep(reply.delay).await;
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    if reply.drop {
        return Err(std::io::Error::other("dropped by the test's plan"));
    }
    let mut response = hyper::Response::builder().status(reply.status);
    for (name, value) in reply.headers {
        response = response.header(name, value);
    }
    Ok(response.body(Full::new(Bytes::new())).unwrap())
}
