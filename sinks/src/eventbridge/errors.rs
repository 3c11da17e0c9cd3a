//! How the sink sorts what went wrong with a whole `PutEvents` request or one of its
//! entries: retry it, reject the entry, or stop the relay with the fix.

use super::EventBridgeSettings;
use aws_sdk_eventbridge::error::{ProvideErrorMetadata, SdkError};

/// Entry error codes the EventBridge API reference calls retryable, plus the 5xx ones.
const RETRYABLE_CODES: [&str; 6] = [
    "ThrottlingException",
    "InternalFailure",
    "InternalException",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
];
/// Entry error codes that are about the entry itself: it is rejected (dead-lettered).
pub(super) const REJECTED_CODES: [&str; 6] = [
    "InvalidArgument",
    "MalformedDetail",
    "RedactionFailure",
    "NotAuthorizedForSourceException",
    "NotAuthorizedForDetailTypeException",
    "ValidationException",
];
/// Entry error codes that are about the bus or the credentials: the relay stops.
pub(super) const FATAL_CODES: [&str; 3] = [
    "ResourceNotFoundException",
    "AccessDeniedException",
    "InvalidAccountIdException",
];

/// How a whole request failed.
pub(super) enum RequestError {
    /// Transient: throttling, 5xx, network, timeout, credentials not available yet.
    Retry(String),
    /// The request was refused as invalid: one of its entries is at fault.
    Invalid(String),
    /// The bus, the credentials or the permissions must be fixed by an operator: the error
    /// code and the message.
    Fatal(String, String),
}

/// An error and its sources on one line, without the SDK's debug dump.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(err) = current {
        let text = err
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

/// What to check when EventBridge could not be asked at all.
pub(super) const UNREACHABLE_HINT: &str = "check the network, the endpoint (endpoint_url, \
    AWS_ENDPOINT_URL) and the AWS credentials (environment, profile, web identity or instance \
    role)";

pub(super) fn classify_request_error<R: std::fmt::Debug + 'static>(
    err: &SdkError<aws_sdk_eventbridge::operation::put_events::PutEventsError, R>,
    status: Option<u16>,
) -> RequestError {
    let Some(code) = err.code() else {
        return RequestError::Retry(format!("{}: {UNREACHABLE_HINT}", error_chain(err)));
    };
    let message = format!("{code}: {}", err.message().unwrap_or("no message"));
    match code {
        code if RETRYABLE_CODES.contains(&code) || code == "ExpiredTokenException" => {
            RequestError::Retry(message)
        }
        "ValidationException" | "InvalidArgument" | "SerializationException" => {
            RequestError::Invalid(message)
        }
        _ if status.is_some_and(|s| s >= 500 || s == 429) => RequestError::Retry(message),
        code => RequestError::Fatal(code.to_owned(), message),
    }
}

/// Why the relay must stop, with what to do about it; `buses` are those the failed
/// request named.
pub(super) fn fatal_hint(settings: &EventBridgeSettings, code: &str, buses: &[&str]) -> String {
    let name = &settings.name;
    let create = match buses {
        [bus] => *bus,
        _ => "NAME",
    };
    let buses = buses.join(", ");
    match code {
        "ResourceNotFoundException" => format!(
            "event bus {buses} does not exist in this account and region: create it (aws \
             events create-event-bus --name {create}) or fix sinks.{name}.bus / sinks.{name}.region"
        ),
        "AccessDeniedException" | "InvalidAccountIdException" => format!(
            "the credentials may not publish to event bus {buses}: allow events:PutEvents on \
             it for the relay's role, or fix sinks.{name}.bus"
        ),
        _ => format!(
            "check the relay's AWS credentials and permissions (events:PutEvents), and \
             sinks.{name}.bus / sinks.{name}.region"
        ),
    }
}
