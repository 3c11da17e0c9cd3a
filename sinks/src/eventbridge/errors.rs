//! Which `PutEvents` entry errors reject the event and which stop the relay, and what to
//! do about the latter. Whole-request errors are sorted by [`crate::aws`].

use super::EventBridgeSettings;

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
