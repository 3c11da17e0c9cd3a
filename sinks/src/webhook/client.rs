//! The HTTP(S) client of the webhook sink: HTTP/1.1 with keep-alive (hyper), TLS on rustls +
//! ring with the platform's roots or the configured CA file, and one request sent with a
//! deadline covering the answer's head and (a bounded part of) its body.
//!
//! Invariant: nothing here logs or returns a request's body or headers: errors name the URL
//! without user information and the transport's reason only.

use super::request::Request;
use crate::error_chain;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, USER_AGENT};
use hyper::StatusCode;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How much of an answer's body is read (then dropped) so that the connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The roots TLS trusts: the certificates of `ca_file`, or the platform's.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| format!("cannot read ca_file {}: {err}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|err| format!("ca_file {}: {err}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    Ok(store)
}

/// A connector opening TCP connections, with TLS for `https` URLs.
fn connector(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS setup: {err}"))?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}

/// A client with keep-alive connections, over TLS for `https` URLs.
pub fn client(ca_file: Option<&Path>, connect_timeout: Duration) -> Result<HttpClient, String> {
    let connector = connector(ca_file, connect_timeout)?;
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// What an endpoint answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// POSTs `request` with `extra` headers; the answer's head, once its body is read (up to a
/// bound) or dropped, within `timeout`.
pub async fn post(
    client: &HttpClient,
    request: Request,
    extra: impl IntoIterator<Item = (hyper::header::HeaderName, hyper::header::HeaderValue)>,
    timeout: Duration,
) -> Result<Answer, String> {
    let shown = request.shown_url.clone();
    let mut builder = hyper::Request::post(request.url)
        .header(
            USER_AGENT,
            concat!("outbox-relay/", env!("CARGO_PKG_VERSION")),
        )
        .header("idempotency-key", request.id);
    for (name, value) in request.headers.into_iter().chain(extra) {
        builder = builder.header(name, value);
    }
    let http_request = builder
        .body(Full::new(request.body))
        .map_err(|err| format!("POST {shown}: cannot build the request: {err}"))?;
    let exchange = async {
        let response = client
            .request(http_request)
            .await
            .map_err(|err| format!("POST {shown} failed: {}", error_chain(&err)))?;
        let (head, body) = response.into_parts();
        // Read what fits so the connection can be reused; a larger body closes it.
        let _ = Limited::new(body, MAX_ANSWER_BYTES).collect().await;
        Ok(Answer {
            status: head.status,
            headers: head.headers,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("POST {shown} timed out after {timeout:?}")))
}

/// Whether a TCP (and for `https`, TLS) connection to `uri`'s host can be opened: what
/// `outbox-relay check` tries, without sending a request.
pub async fn connect(
    ca_file: Option<&Path>,
    uri: hyper::Uri,
    timeout: Duration,
) -> Result<(), String> {
    use tower_service::Service;
    let shown = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.host()).unwrap_or_default()
    );
    let mut connector = connector(ca_file, timeout)?;
    match tokio::time::timeout(timeout, connector.call(uri)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!(
            "cannot connect to {shown}: {}",
            error_chain(err.as_ref())
        )),
        Err(_) => Err(format!("connecting to {shown} timed out after {timeout:?}")),
    }
}
