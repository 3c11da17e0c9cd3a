//! What librdkafka reports about the brokers, and how the sink sorts Kafka errors into
//! retryable and permanent ones.
//!
//! librdkafka reports connection trouble (a refused login, a refused certificate, a broker
//! that does not answer) not as the result of a call but through its error callback, while
//! the calls themselves just time out. [`BrokerErrors`] keeps those reports: they go to the
//! log, into the messages of failed batches and of `check`, and a refused login or
//! certificate stops the relay instead of being retried forever.

use crate::SinkError;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::sync::{Arc, Mutex};

/// The librdkafka client context of every client the sink creates: librdkafka's log lines
/// and error reports go to `tracing`, and the last error report is kept.
#[derive(Clone, Default)]
pub(super) struct BrokerErrors {
    last: Arc<Mutex<Option<BrokerError>>>,
}

/// An error librdkafka reported through its error callback.
#[derive(Clone, Debug)]
pub(super) struct BrokerError {
    code: Option<RDKafkaErrorCode>,
    reason: String,
}

impl BrokerError {
    /// A refused login or certificate: retrying with the same settings cannot succeed.
    fn advice_if_permanent(&self) -> Option<&'static str> {
        match self.code {
            Some(RDKafkaErrorCode::Authentication) => {
                Some("check sasl.username, sasl.password (or sasl_password_file) and sasl.mechanism")
            }
            // librdkafka reports a TLS failure twice, with the SSL code and as a transport
            // failure, in either order; only a verification failure is a refused
            // certificate rather than a broken connection.
            Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::BrokerTransportFailure)
                if self.reason.contains("certificate verify failed") =>
            {
                Some("check ssl.ca.location and that the broker's certificate names the host in brokers")
            }
            _ => None,
        }
    }

    /// The report as a clause for an error message.
    pub(super) fn describe(&self) -> String {
        match self.advice_if_permanent() {
            Some(advice) => format!(
                "the broker refused the connection: {}; {advice}",
                self.reason
            ),
            None => format!("librdkafka last reported: {}", self.reason),
        }
    }
}

impl BrokerErrors {
    pub(super) fn take(&self) -> Option<BrokerError> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    pub(super) fn peek(&self) -> Option<BrokerError> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `error` as the relay should see it: replaced by a refused login or certificate that
    /// librdkafka reported meanwhile, or with the broker's last complaint added.
    pub(super) fn with_reported(&self, error: SinkError) -> SinkError {
        let SinkError::Retryable(message) = error else {
            return error;
        };
        match self.peek() {
            Some(reported) if reported.advice_if_permanent().is_some() => {
                SinkError::Permanent(format!("{message}; {}", reported.describe()))
            }
            Some(reported) => SinkError::Retryable(format!("{message}; {}", reported.describe())),
            None => SinkError::Retryable(message),
        }
    }
}

impl ClientContext for BrokerErrors {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
        let reported = BrokerError {
            code: error.rdkafka_error_code(),
            reason: reason.to_owned(),
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the cause, not its consequence ("1/1 brokers are down" follows a refused
        // login), and a refused login or certificate over anything retryable.
        let keep = last.as_ref().is_some_and(|kept| {
            reported.code == Some(RDKafkaErrorCode::AllBrokersDown)
                || (kept.advice_if_permanent().is_some()
                    && reported.advice_if_permanent().is_none())
        });
        if !keep {
            *last = Some(reported);
        }
    }
}

impl ConsumerContext for BrokerErrors {}

/// Fatal errors (fencing) and configuration errors stop the relay; the rest are retried.
pub(super) fn classify(error: &KafkaError, context: &str) -> SinkError {
    classify_code(error.rdkafka_error_code(), &error.to_string(), context)
}

pub(super) fn classify_code(
    code: Option<RDKafkaErrorCode>,
    error: &str,
    context: &str,
) -> SinkError {
    let fenced = matches!(
        code,
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    if fenced {
        return SinkError::Permanent(format!(
            "{context}: {error}: another relay with the same transactional id took over (fenced); \
             only one relay may publish for this slot"
        ));
    }
    let permanent = matches!(
        code,
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::UnsupportedVersion
        )
    );
    if permanent {
        SinkError::Permanent(format!(
            "{context}: {error}; check the Kafka credentials and ACLs"
        ))
    } else {
        SinkError::Retryable(format!("{context}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(errors: &BrokerErrors, code: RDKafkaErrorCode, reason: &str) {
        errors.error(KafkaError::Global(code), reason);
    }

    #[test]
    fn a_refused_login_makes_a_timed_out_batch_permanent_and_outlives_its_consequences() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::Authentication,
            "SASL authentication error: refused",
        );
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "Disconnected",
        );
        match errors.with_reported(SinkError::Retryable("delivering: Message timed out".into())) {
            SinkError::Permanent(message) => {
                assert!(
                    message.contains("SASL authentication error: refused"),
                    "{message}"
                );
                assert!(message.contains("check sasl.username"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// librdkafka's transport-failure report of a refused certificate can come first, and
    /// `check` reads the first report: it is the refusal all the same.
    #[test]
    fn a_refused_certificate_reported_as_a_transport_failure_is_permanent() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "ssl://127.0.0.1:9093/bootstrap: ../ssl/statem/statem_clnt.c:1889:\
             tls_post_process_server_certificate error:0A000086:SSL routines::certificate \
             verify failed (after 3ms in state SSL_HANDSHAKE)",
        );
        match errors.with_reported(SinkError::Retryable("timed out".into())) {
            SinkError::Permanent(message) => {
                assert!(message.contains("check ssl.ca.location"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_broker_errors_stay_retryable_with_the_reason_added() {
        let errors = BrokerErrors::default();
        report(
            &errors,
            RDKafkaErrorCode::BrokerTransportFailure,
            "Connection refused",
        );
        report(
            &errors,
            RDKafkaErrorCode::AllBrokersDown,
            "1/1 brokers are down",
        );
        match errors.with_reported(SinkError::Retryable("timed out".into())) {
            SinkError::Retryable(message) => {
                assert!(
                    message.ends_with("librdkafka last reported: Connection refused"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A TLS failure that is not a verification failure is a broken connection.
        report(
            &errors,
            RDKafkaErrorCode::SSL,
            "SSL handshake failed: Disconnected",
        );
        assert!(matches!(
            errors.with_reported(SinkError::Retryable("timed out".into())),
            SinkError::Retryable(_)
        ));
        report(
            &errors,
            RDKafkaErrorCode::SSL,
            "SSL handshake failed: certificate verify failed",
        );
        assert!(matches!(
            errors.with_reported(SinkError::Retryable("timed out".into())),
            SinkError::Permanent(_)
        ));
        // A permanent error stays permanent; a batch's start forgets old reports.
        assert!(matches!(
            errors.with_reported(SinkError::Permanent("fenced".into())),
            SinkError::Permanent(m) if m == "fenced"
        ));
        errors.take();
        assert!(matches!(
            errors.with_reported(SinkError::Retryable("timed out".into())),
            SinkError::Retryable(m) if m == "timed out"
        ));
    }
}
