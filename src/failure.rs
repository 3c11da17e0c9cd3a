//! What a failure leads to, decided in one place from typed causes: the SQLSTATE the server
//! sent (over a SQL connection or the replication connection alike), the kind of a
//! replication-protocol failure, a sink's verdict or configuration, or a refusal of the relay
//! itself. Other modules return errors; only this one says retry, stand by or stop.
//!
//! Invariant: a failure with no recognised cause is retried (connections drop, servers
//! restart, and that heals); only a cause known to be permanent stops the relay, and it stops
//! with the error's own advice.

use crate::db::SqlError;
use crate::problem::Problem;
use crate::source::replication::SourceError;
use outbox_relay_sinks::{ConfigError, SinkError};
use tokio_postgres::error::SqlState;

/// How a replication session ended, and so what the relay does next.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was requested and everything was drained and checkpointed.
    Shutdown,
    /// Something that may heal (network, server restart): try again with backoff.
    Retry(anyhow::Error),
    /// Another relay streams from the slot: wait as a standby and try again shortly.
    SlotInUse(anyhow::Error),
    /// Something an operator must fix.
    Fatal(anyhow::Error),
}

impl SessionEnd {
    /// The end a failure leads to, by the first typed cause in its chain.
    pub fn of(err: anyhow::Error) -> SessionEnd {
        match verdict(&err) {
            Verdict::Retry => SessionEnd::Retry(err),
            Verdict::SlotInUse => SessionEnd::SlotInUse(err),
            Verdict::Fatal => SessionEnd::Fatal(err),
        }
    }
}

impl From<SourceError> for SessionEnd {
    fn from(err: SourceError) -> Self {
        SessionEnd::of(err.into())
    }
}

/// Whether retrying cannot fix `err`: the relay (or the leader election) stops on it.
pub fn is_permanent(err: &anyhow::Error) -> bool {
    matches!(verdict(err), Verdict::Fatal)
}

enum Verdict {
    Retry,
    SlotInUse,
    Fatal,
}

fn verdict(err: &anyhow::Error) -> Verdict {
    for cause in err.chain() {
        if let Some(source) = cause.downcast_ref::<SourceError>() {
            return source_verdict(source);
        }
        if let Some(sql) = cause.downcast_ref::<SqlError>() {
            if sql.is_tls_refusal() || sql.code().is_some_and(is_permanent_code) {
                return Verdict::Fatal;
            }
            return Verdict::Retry;
        }
        if let Some(sink) = cause.downcast_ref::<SinkError>() {
            return match sink {
                SinkError::Retryable(_) => Verdict::Retry,
                SinkError::Permanent(_) => Verdict::Fatal,
            };
        }
        if cause.is::<Problem>() || cause.is::<ConfigError>() {
            return Verdict::Fatal;
        }
    }
    Verdict::Retry
}

fn source_verdict(err: &SourceError) -> Verdict {
    match err {
        SourceError::Connect { .. } | SourceError::Io(_) => Verdict::Retry,
        SourceError::Server(server) => {
            let code = SqlState::from_code(&server.code);
            if code == SqlState::OBJECT_IN_USE {
                Verdict::SlotInUse
            } else if is_permanent_code(&code) {
                Verdict::Fatal
            } else {
                Verdict::Retry
            }
        }
        SourceError::Tls(_) | SourceError::Protocol(_) | SourceError::Config(_) => Verdict::Fatal,
    }
}

/// SQLSTATEs that retrying cannot fix: authentication and authorization, a database,
/// schema, table or object (slot, publication) that does not exist, a server not set up for
/// logical decoding, and requests the server does not support or understand.
fn is_permanent_code(code: &SqlState) -> bool {
    [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INSUFFICIENT_PRIVILEGE,
        SqlState::UNDEFINED_TABLE,
        SqlState::INVALID_SCHEMA_NAME,
        SqlState::UNDEFINED_OBJECT,
        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        SqlState::FEATURE_NOT_SUPPORTED,
        SqlState::SYNTAX_ERROR,
    ]
    .contains(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::replication::ServerError;

    fn server(code: &str) -> anyhow::Error {
        SourceError::Server(ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            detail: None,
            hint: None,
        })
        .into()
    }

    #[test]
    fn the_replication_and_sql_paths_share_one_list_of_permanent_codes() {
        assert!(matches!(
            SessionEnd::of(server("28P01")),
            SessionEnd::Fatal(_)
        ));
        assert!(matches!(
            SessionEnd::of(server("42P01")),
            SessionEnd::Fatal(_)
        ));
        assert!(matches!(
            SessionEnd::of(server("55006")),
            SessionEnd::SlotInUse(_)
        ));
        assert!(matches!(
            SessionEnd::of(server("57P01")),
            SessionEnd::Retry(_)
        ));
        assert!(matches!(
            SessionEnd::of(anyhow::anyhow!("a dropped connection")),
            SessionEnd::Retry(_)
        ));
        let wrapped = server("3D000").context("starting the session");
        assert!(is_permanent(&wrapped));
    }
}
