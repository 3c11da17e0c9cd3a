//! How the AWS batch sinks sort what went wrong with a whole request: retry it, split it
//! (one of its entries is at fault), or stop the relay with the fix. Classified from the
//! service's error code (and the HTTP status for codes not listed), never from message text.

use crate::batch::RequestError;
use crate::error_chain;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

/// Error codes of EventBridge, SQS and SNS that pass with time: throttling, internal
/// failures, expired temporary credentials.
const RETRYABLE_CODES: [&str; 13] = [
    "ThrottlingException",
    "Throttling",
    "Throttled",
    "RequestThrottled",
    "KmsThrottled",
    "InternalFailure",
    "InternalError",
    "InternalException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "ExpiredTokenException",
    "ExpiredToken",
];

/// Error codes that refuse a request because of what it holds: one of its entries is at
/// fault, so the request is split up.
const INVALID_CODES: [&str; 9] = [
    "ValidationException",
    "InvalidArgument",
    "SerializationException",
    "InvalidParameter",
    "InvalidParameterValue",
    "InvalidMessageContents",
    "BatchRequestTooLong",
    "AWS.SimpleQueueService.BatchRequestTooLong",
    "AWS.SimpleQueueService.InvalidBatchEntryId",
];

/// What to check when the service could not be asked at all.
pub(crate) const UNREACHABLE_HINT: &str = "check the network, the endpoint (endpoint_url, \
    AWS_ENDPOINT_URL) and the AWS credentials (environment, profile, web identity or instance \
    role)";

/// Sorts the failure of a whole request.
pub(crate) fn classify_request_error<E, R>(
    err: &SdkError<E, R>,
    status: Option<u16>,
) -> RequestError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let Some(code) = err.code() else {
        return RequestError::Retry(format!("{}: {UNREACHABLE_HINT}", error_chain(err)));
    };
    let message = format!("{code}: {}", err.message().unwrap_or("no message"));
    match code {
        code if RETRYABLE_CODES.contains(&code) => RequestError::Retry(message),
        code if INVALID_CODES.contains(&code) => RequestError::Invalid(message),
        _ if status.is_some_and(|s| s >= 500 || s == 429) => RequestError::Retry(message),
        code => RequestError::Fatal(code.to_owned(), message),
    }
}
