//! What the AWS sinks (EventBridge, SQS, SNS) share: the SDK configuration (standard
//! credentials chain, rustls + ring, the SDK's own retries off: the batch sink,
//! [`crate::batch`], retries entries itself) and how a failed request is sorted. Their
//! batch APIs all take 10 entries per request and answer per entry.

mod errors;

pub(crate) use errors::{classify_request_error, UNREACHABLE_HINT};

use aws_config::{retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use std::time::Duration;

/// The limit on entries per request of `PutEvents`, `SendMessageBatch` and `PublishBatch`.
pub(crate) const MAX_ENTRIES_PER_REQUEST: usize = 10;

/// Loads the AWS configuration the standard way (environment, profile, web identity, IMDS),
/// with an HTTPS client on rustls + ring and the SDK's own retries off: the sinks retry
/// entries themselves, because only they know which entries of a request failed.
pub async fn sdk_config(
    region: Option<&str>,
    endpoint_url: Option<&str>,
    timeout: Duration,
) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(timeout)
                .build(),
        );
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// The SDK configuration of sink `name`, refused when no region is known.
pub(crate) async fn sdk_config_of(
    name: &str,
    region: Option<&str>,
    endpoint_url: Option<&str>,
    timeout: Duration,
) -> Result<SdkConfig, crate::SinkError> {
    let config = sdk_config(region, endpoint_url, timeout).await;
    if config.region().is_none() {
        return Err(crate::SinkError::Permanent(format!(
            "sink {name}: no AWS region: set sinks.{name}.region or AWS_REGION"
        )));
    }
    Ok(config)
}
