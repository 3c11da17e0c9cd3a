//! The operators' HTTP endpoint: `/healthz` (the process and its event loop answer),
//! `/readyz` (streaming as the leader, or a healthy standby) and `/metrics` (Prometheus text).
//! Served by hyper on the relay's own runtime, so a blocked runtime fails `/healthz`.

use crate::telemetry::{Role, METRICS};
use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tracing::{debug, info};

/// Binds `addr` (an error says so at once) and serves on a background task.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on http.listen = {addr}: choose a free port or another address")
    })?;
    info!(%addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let served = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(respond))
                    .await;
                if let Err(err) = served {
                    debug!(error = %err, "HTTP connection ended with an error");
                }
            });
        }
    });
    Ok(())
}

async fn respond(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match request.uri().path() {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let role = METRICS.role();
            let status = match role {
                Role::Streaming | Role::Standby => StatusCode::OK,
                Role::Connecting => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, "text/plain", format!("{}\n", role.name()))
        }
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            METRICS.encode(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz, /readyz or /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}
