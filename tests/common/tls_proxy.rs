//! A TLS-terminating proxy: the test brokers have no TLS listener, so the relay's TLS clients
//! (certificate and host-name verification) are tested against this proxy, which presents a
//! certificate from a test CA and forwards the plaintext to the broker.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub struct TlsProxy {
    pub port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl TlsProxy {
    /// Listens on a free port with `cert`/`key` (PEM) and forwards to 127.0.0.1:`upstream`.
    pub fn start(cert: &Path, key: &Path, upstream: u16) -> TlsProxy {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (port, runtime) = super::serve_forwarding(upstream, move |client, mut plain| {
            let acceptor = acceptor.clone();
            async move {
                if let Ok(mut tls) = acceptor.accept(client).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            }
        });
        TlsProxy {
            port,
            _runtime: runtime,
        }
    }
}
