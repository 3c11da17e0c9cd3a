//! Ordinary SQL connections (tokio-postgres) with the same connection parameters and TLS
//! rules as the replication connection: used for setup, checks, checkpoints and dead letters.
//! Like the replication connection, they pin `DateStyle=ISO`, `IntervalStyle=postgres` and
//! `extra_float_digits=3`, so values read as text have the forms the mapper parses.

use crate::config::{ConnectParams, Host, SslMode};
use anyhow::Context;
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
        .options("-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3");
    if let Some(timeout) = params.tcp_user_timeout {
        config.tcp_user_timeout(timeout);
    }
    if let Some(password) = &params.password {
        config.password(password.expose());
    }
    let failed = || format!("cannot connect to PostgreSQL at {params}");
    // PostgreSQL offers no TLS on Unix sockets, and libpq does not ask for it there.
    let tls = match params.host {
        Host::Tcp(_) => {
            crate::source::tls::client_config(params.sslmode, params.sslrootcert.as_deref())?
        }
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

/// Turns a tokio-postgres error into one line with the server's message and our advice.
pub fn explain(err: tokio_postgres::Error) -> anyhow::Error {
    let Some(db) = err.as_db_error() else {
        // Keep the cause (a rustls refusal, an I/O error): "error performing TLS handshake"
        // alone does not say whether to fix sslrootcert or the host name.
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(&err);
        while let Some(inner) = cause {
            text.push_str(": ");
            text.push_str(&inner.to_string());
            cause = inner.source();
        }
        return anyhow::anyhow!(text);
    };
    let advice = match db.code().code() {
        "28P01" => " -> check the password in source.url or source.password_file",
        "28000" => " -> allow this user and database in pg_hba.conf, or fix the user in source.url",
        "3D000" => " -> fix the database name in source.url",
        "42501" => " -> grant the privilege to the relay's role (see migrations/)",
        _ => "",
    };
    anyhow::anyhow!(
        "PostgreSQL said: {} ({}){advice}",
        db.message(),
        db.code().code()
    )
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

/// Whether the row `s` of `pg_replication_slots` is a failover slot, as SQL. Read through
/// JSON: the `failover` column exists only from PostgreSQL 17 on.
pub const SLOT_IS_FAILOVER: &str = "coalesce((to_jsonb(s) ->> 'failover')::bool, false)";

/// The call that creates the relay's slot (`$1` its name): a failover slot if asked for.
pub fn create_slot_call(failover: bool) -> &'static str {
    if failover {
        "pg_create_logical_replication_slot($1, 'pgoutput', failover => true)"
    } else {
        "pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// Why `source.failover_slot` cannot work on this server (before PostgreSQL 17 there are no
/// failover slots), if it cannot.
pub async fn failover_slot_problem(client: &Client) -> anyhow::Result<Option<String>> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version')",
            &[],
        )
        .await
        .map_err(explain)?;
    let (number, version): (i32, String) = (row.get(0), row.get(1));
    Ok((number < 170_000).then(|| {
        format!(
            "source.failover_slot needs PostgreSQL 17 or later, and this server is {version}: \
             upgrade it, or set source.failover_slot = false"
        )
    }))
}

/// What is wrong with the slots `synchronized_standby_slots` names: one that does not exist
/// here, or whose standby is not connected. The server holds a failover slot's changes back
/// until every one exists and has caught up, so the relay then receives nothing.
pub async fn standby_slot_problems(client: &Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT name, s.active FROM unnest(string_to_array(\
                 coalesce(current_setting('synchronized_standby_slots', true), ''), ',')) AS listed \
             CROSS JOIN btrim(listed, ' \"') AS name \
             LEFT JOIN pg_replication_slots s ON s.slot_name = name \
             WHERE name <> '' AND s.active IS DISTINCT FROM true",
            &[],
        )
        .await
        .map_err(explain)?;
    Ok(rows
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            match row.get::<_, Option<bool>>(1) {
                None => format!(
                    "synchronized_standby_slots names slot {name:?}, which does not exist on this \
                     server: it holds the relay's changes back until it does (a promoted standby \
                     keeps its old primary's setting); create the physical slot of a standby, or \
                     remove {name:?} from synchronized_standby_slots and reload"
                ),
                Some(_) => format!(
                    "synchronized_standby_slots names slot {name:?}, whose standby is not \
                     connected: the server holds the relay's changes back until it is; start \
                     that standby, or remove {name:?} from synchronized_standby_slots and reload"
                ),
            }
        })
        .collect())
}

/// What may keep a failover slot from working: an empty `synchronized_standby_slots` (the
/// relay can then publish WAL no standby has received), and [`standby_slot_problems`].
pub async fn failover_slot_warnings(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::from_iter(unprotected_failover_warning(client).await?);
    warnings.extend(standby_slot_problems(client).await?);
    Ok(warnings)
}

/// Why a failover slot may not be safe to fail over to, if it may not: without
/// `synchronized_standby_slots` the relay can publish WAL no standby has received.
async fn unprotected_failover_warning(client: &Client) -> anyhow::Result<Option<String>> {
    let standbys: String = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(explain)?
        .get(0);
    Ok(standbys.trim().is_empty().then(|| {
        "synchronized_standby_slots is empty: the relay may publish events from WAL that no \
         standby has received, which a promoted standby then lacks; list the standbys' physical \
         slots in synchronized_standby_slots on the primary (README, \"Failover slots\")"
            .to_owned()
    }))
}
