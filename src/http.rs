//! The operators' HTTP endpoint: `/healthz` (the process and its event loop answer),
//! `/readyz` and `/metrics`. Served by hyper on the relay's own runtime, so a blocked runtime
//! fails `/healthz`.
//!
//! Ready (200) means doing the job or able to take it over: `standby`, or `streaming` with
//! every sink's latest recovery or delivery succeeding. Not ready (503): `connecting` (to
//! PostgreSQL, or waiting to reconnect after an error), or `streaming` while a sink fails
//! (`streaming; failing sinks: <names>`), until its next delivery succeeds.
//!
//! `/metrics` answers in OpenMetrics when the scraper's `Accept` asks for it, else in the
//! Prometheus text format 0.0.4.

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
            let (ready, body) = readiness(METRICS.role(), &METRICS.failing_sinks());
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "text/plain", body)
        }
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get_all(hyper::header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|accept| accept.contains("application/openmetrics-text"));
            if openmetrics {
                (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    METRICS.encode(),
                )
            } else {
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus_text(&METRICS.encode()),
                )
            }
        }
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

/// Whether the relay is ready in `role` with `failing` sinks, and what `/readyz` says.
fn readiness(role: Role, failing: &[String]) -> (bool, String) {
    match role {
        Role::Standby => (true, "standby\n".to_owned()),
        Role::Streaming if failing.is_empty() => (true, "streaming\n".to_owned()),
        Role::Streaming => (
            false,
            format!("streaming; failing sinks: {}\n", failing.join(", ")),
        ),
        Role::Connecting => (false, "connecting\n".to_owned()),
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's `TYPE` and `HELP` name
/// its `_total` samples, and the lines that format lacks (`# UNIT`, `# EOF`) go.
fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# TYPE ", "# HELP "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_standby_or_streaming_with_every_sink_up() {
        assert_eq!(readiness(Role::Standby, &[]), (true, "standby\n".into()));
        assert_eq!(
            readiness(Role::Streaming, &[]),
            (true, "streaming\n".into())
        );
        assert_eq!(
            readiness(Role::Streaming, &["rmq".into()]),
            (false, "streaming; failing sinks: rmq\n".into())
        );
        assert!(!readiness(Role::Connecting, &[]).0);
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_drops_the_eof() {
        let open = "# HELP x_events Events.\n# TYPE x_events counter\nx_events_total 3\n\
                    # HELP x_lag_bytes Lag.\n# TYPE x_lag_bytes gauge\n# UNIT x_lag_bytes bytes\n\
                    x_lag_bytes 7\n# EOF\n";
        assert_eq!(
            prometheus_text(open),
            "# HELP x_events_total Events.\n# TYPE x_events_total counter\nx_events_total 3\n\
             # HELP x_lag_bytes Lag.\n# TYPE x_lag_bytes gauge\nx_lag_bytes 7\n"
        );
    }
}
