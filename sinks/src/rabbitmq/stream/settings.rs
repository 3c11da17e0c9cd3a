//! Stream mode's settings, and the endpoint (host, port, vhost, credentials) its URL names.

use super::*;
use crate::format::Format;
use crate::Secret;
use rabbitmq_stream_client::{ClientOptions, TlsConfiguration};
use std::path::PathBuf;
use std::time::Duration;

/// Everything stream mode needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// The sink's name, for messages.
    pub name: String,
    /// `rabbitmq-stream://host:5552/vhost` or `rabbitmq-stream+tls://host:5551/vhost`; may
    /// carry `user:password@`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM file of the CA certificates to trust; required for `rabbitmq-stream+tls://`.
    pub ca_file: Option<PathBuf>,
    pub stream: String,
    /// The producer name: the broker deduplicates per (producer name, stream).
    pub producer_name: String,
    /// Create the stream if it does not exist.
    pub declare: bool,
    pub format: Format,
    pub binary: bool,
    /// Most unconfirmed messages at once.
    pub window: usize,
    /// Connecting, each request, and waiting for confirms.
    pub timeout: Duration,
}

/// Where to connect, resolved from the URL and the credentials.
pub(super) struct Endpoint {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) vhost: String,
    pub(super) user: String,
    pub(super) password: Secret,
    pub(super) tls: bool,
}

impl StreamSettings {
    /// Checks what can be checked without a broker.
    pub fn validate(&self) -> Result<(), String> {
        let endpoint = self.endpoint()?;
        if endpoint.tls && self.ca_file.is_none() {
            return Err(
                "rabbitmq-stream+tls:// needs ca_file: the PEM file of the CA that \
                        signed the broker's certificate"
                    .into(),
            );
        }
        if !endpoint.tls && self.ca_file.is_some() {
            return Err("ca_file is set but the url is not rabbitmq-stream+tls://".into());
        }
        if self.stream.is_empty() || self.producer_name.is_empty() {
            return Err("stream and producer_name must not be empty".into());
        }
        if self.window == 0 {
            return Err("window must be at least 1".into());
        }
        Ok(())
    }

    pub(super) fn endpoint(&self) -> Result<Endpoint, String> {
        let url = url::Url::parse(&self.url).map_err(|err| {
            format!(
                "url is not a URL ({err}): use rabbitmq-stream://host:5552/vhost or \
                 rabbitmq-stream+tls://host:5551/vhost"
            )
        })?;
        let tls = match url.scheme() {
            "rabbitmq-stream" => false,
            "rabbitmq-stream+tls" => true,
            other => {
                return Err(format!(
                    "url scheme {other:?} is not rabbitmq-stream or rabbitmq-stream+tls \
                     (stream mode speaks the stream protocol, port 5552)"
                ))
            }
        };
        let host = url
            .host_str()
            .ok_or("url names no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = url.port().unwrap_or(if tls { 5551 } else { 5552 });
        let decode = |text: &str| {
            url::form_urlencoded::parse(format!("x={text}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let vhost = match url.path().trim_start_matches('/') {
            "" => "/".to_owned(),
            path => decode(path),
        };
        let user = match (&self.username, url.username()) {
            (Some(user), _) => user.clone(),
            (None, "") => "guest".to_owned(),
            (None, user) => decode(user),
        };
        let password = match (&self.password, url.password()) {
            (Some(password), _) => password.clone(),
            (None, Some(password)) => Secret::new(decode(password)),
            (None, None) => Secret::new("guest"),
        };
        Ok(Endpoint {
            host,
            port,
            vhost,
            user,
            password,
            tls,
        })
    }
}

impl Endpoint {
    pub(super) fn options(
        &self,
        host: &str,
        port: u16,
        ca_file: Option<&PathBuf>,
    ) -> ClientOptions {
        let mut builder = ClientOptions::builder()
            .host(host)
            .port(port)
            .user(&self.user)
            .password(self.password.expose())
            .v_host(&self.vhost)
            .max_frame_size(FRAME_MAX);
        if let Some(ca_file) = ca_file {
            builder = builder.tls(
                TlsConfiguration::builder()
                    .enable(true)
                    .add_root_certificates(ca_file.display().to_string())
                    .build(),
            );
        }
        builder.build()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::rabbitmq::stream) fn settings(url: &str) -> StreamSettings {
        StreamSettings {
            name: "s".into(),
            url: url.into(),
            username: None,
            password: None,
            ca_file: None,
            stream: "events".into(),
            producer_name: "outbox-relay.slot.s".into(),
            declare: false,
            format: Format::CloudEvents,
            binary: false,
            window: 100,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn urls_name_host_port_vhost_and_credentials() {
        let endpoint = settings("rabbitmq-stream://relay:p%40ss@broker:5553/prod%2Fa")
            .endpoint()
            .unwrap();
        assert_eq!(
            (
                endpoint.host.as_str(),
                endpoint.port,
                endpoint.vhost.as_str()
            ),
            ("broker", 5553, "prod/a")
        );
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.expose()),
            ("relay", "p@ss")
        );
        let endpoint = settings("rabbitmq-stream://broker").endpoint().unwrap();
        assert_eq!((endpoint.port, endpoint.vhost.as_str()), (5552, "/"));
        assert_eq!(endpoint.user, "guest");
        let endpoint = settings("rabbitmq-stream+tls://broker/%2f")
            .endpoint()
            .unwrap();
        assert_eq!(
            (endpoint.port, endpoint.vhost.as_str(), endpoint.tls),
            (5551, "/", true)
        );
        let mut overridden = settings("rabbitmq-stream://a:b@broker");
        overridden.password = Some(Secret::new("from-file"));
        assert_eq!(
            overridden.endpoint().unwrap().password.expose(),
            "from-file"
        );
        assert!(!format!("{overridden:?}").contains("from-file"));
        let err = settings("amqp://broker").validate().unwrap_err();
        assert!(err.contains("rabbitmq-stream"), "{err}");
        let err = settings("rabbitmq-stream+tls://broker")
            .validate()
            .unwrap_err();
        assert!(err.contains("ca_file"), "{err}");
    }
}
