//! Ordinary SQL connections (tokio-postgres) with the same connection parameters and TLS
//! rules as the replication connection: used for setup, checks, checkpoints and dead letters.
//! Like the replication connection, they pin `DateStyle=ISO`, `IntervalStyle=postgres`,
//! `extra_float_digits=3` and `bytea_output=hex`, so values read as text have the forms the
//! mapper parses.

use crate::config::{ConnectParams, Host, SslMode};
use anyhow::Context;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// Opens a SQL connection and drives it on a background task.
pub async fn connect(params: &ConnectParams) -> anyhow::Result<Client> {
    let mut config = tokio_postgres::Config::new();
    match &params.host {
        Host::Tcp(host) => config.host(host),
        #[cfg(unix)]
        Host::Unix(dir) => config.host_path(dir),
        #[cfg(not(unix))]
        Host::Unix(_) => anyhow::bail!("Unix sockets need a Unix system"),
    };
    config
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .connect_timeout(params.connect_timeout)
        .keepalives(true)
        // Backfill reads values as text: the same forms as the replication connection's,
        // whatever the database or role sets.
        .options(
            "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 \
             -c bytea_output=hex",
        );
    if let Some(timeout) = params.tcp_user_timeout {
        config.tcp_user_timeout(timeout);
    }
    if let Some(password) = &params.password {
        config.password(password.expose());
    }
    let failed = || format!("cannot connect to PostgreSQL at {params}");
    // PostgreSQL offers no TLS on Unix sockets, and libpq does not ask for it there.
    let tls = match params.host {
        Host::Tcp(_) => crate::tls::client_config(params.sslmode, params.sslrootcert.as_deref())?,
        Host::Unix(_) => None,
    };
    let client = match tls {
        None => {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(explain)
                .with_context(failed)?;
            tokio::spawn(connection);
            client
        }
        Some(tls) => {
            config.ssl_mode(if params.sslmode == SslMode::Prefer {
                tokio_postgres::config::SslMode::Prefer
            } else {
                tokio_postgres::config::SslMode::Require
            });
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) = config
                .connect(connector)
                .await
                .map_err(explain)
                .with_context(failed)?;
            tokio::spawn(connection);
            client
        }
    };
    Ok(client)
}

/// A failed SQL call as one line with the server's message and our advice, keeping the
/// server's SQLSTATE so that [`crate::failure`] classifies it by code rather than by its text.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct SqlError {
    code: Option<SqlState>,
    /// The TLS handshake failed: a refused certificate, or no TLS on the server under
    /// `sslmode=require`. The configuration must change.
    tls_refused: bool,
    text: String,
}

impl SqlError {
    /// The server's SQLSTATE, when the server answered.
    pub fn code(&self) -> Option<&SqlState> {
        self.code.as_ref()
    }

    /// Whether the TLS handshake failed (see the field).
    pub fn is_tls_refusal(&self) -> bool {
        self.tls_refused
    }
}

/// Turns a tokio-postgres error into a [`SqlError`]: one line with the server's message and
/// our advice.
pub fn explain(err: tokio_postgres::Error) -> anyhow::Error {
    let Some(db) = err.as_db_error() else {
        // Keep the cause (a rustls refusal, an I/O error): "error performing TLS handshake"
        // alone does not say whether to fix sslrootcert or the host name.
        let mut text = err.to_string();
        // tokio-postgres keeps the kind of its errors private; its TLS failures (a refused
        // certificate, or a server without TLS) all read "error performing TLS handshake".
        let tls_refused = text.starts_with("error performing TLS handshake");
        let mut cause = std::error::Error::source(&err);
        while let Some(inner) = cause {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            cause = inner.source();
        }
        return SqlError {
            code: None,
            tls_refused,
            text,
        }
        .into();
    };
    let code = db.code();
    let advice = if *code == SqlState::INVALID_PASSWORD {
        " -> check the password in source.url or source.password_file"
    } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        " -> allow this user and database in pg_hba.conf, or fix the user in source.url"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        " -> fix the database name in source.url"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        " -> grant the privilege to the relay's role (see migrations/)"
    } else {
        ""
    };
    SqlError {
        code: Some(code.clone()),
        tls_refused: false,
        text: format!(
            "PostgreSQL said: {} ({}){advice}",
            db.message(),
            code.code()
        ),
    }
    .into()
}

/// Whether `table` (quoted, `schema.table`) exists: the relay's own tables may predate a
/// version, or `init` may not have run yet.
pub async fn table_exists(
    client: &impl tokio_postgres::GenericClient,
    table: &str,
) -> anyhow::Result<bool> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(explain)?
        .get(0))
}

/// Whether the server is a standby in recovery. The relay needs the primary: it writes its
/// checkpoints and dead letters there, and before PostgreSQL 16 a standby cannot decode at all.
pub async fn is_standby(client: &Client) -> anyhow::Result<bool> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(explain)?
        .get(0))
}

/// What to do about [`is_standby`].
pub const STANDBY_PROBLEM: &str = "the server is a standby in recovery: the relay streams from \
     the primary and writes its checkpoints there: point source.url at the primary";
