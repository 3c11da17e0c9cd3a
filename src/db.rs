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

/// A failed SQL call as one line with the server's message and our advice, keeping the
/// server's SQLSTATE so that callers classify it by code rather than by its text.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct SqlError {
    code: Option<SqlState>,
    text: String,
}

impl SqlError {
    /// Whether the server refused for a reason that retrying cannot fix: authentication, a
    /// database or schema that does not exist, a missing privilege or table.
    pub fn is_permanent(&self) -> bool {
        self.code.as_ref().is_some_and(|code| {
            [
                SqlState::INVALID_PASSWORD,
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                SqlState::INVALID_CATALOG_NAME,
                SqlState::INSUFFICIENT_PRIVILEGE,
                SqlState::UNDEFINED_TABLE,
                SqlState::INVALID_SCHEMA_NAME,
            ]
            .contains(code)
        })
    }
}

/// Whether `err` (through any context) is a SQL failure that retrying cannot fix.
pub fn is_permanent(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<SqlError>()
            .is_some_and(SqlError::is_permanent)
    })
}

/// Turns a tokio-postgres error into a [`SqlError`]: one line with the server's message and
/// our advice.
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
        return SqlError { code: None, text }.into();
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

/// Whether the row `s` of `pg_replication_slots` is a failover slot, as SQL. Read through
/// JSON: the `failover` column exists only from PostgreSQL 17 on.
pub const SLOT_IS_FAILOVER: &str = "coalesce((to_jsonb(s) ->> 'failover')::bool, false)";

/// Four columns of the row `s` of `pg_replication_slots`, as SQL, that say whether the relay
/// can use the slot: its plugin, its database, the current database, and why it can no
/// longer stream (NULL while it can; read through JSON: `wal_status` exists from PostgreSQL
/// 13, `conflicting` from 16 and `invalidation_reason` from 17 on). [`slot_refusal`] reads
/// them.
pub const SLOT_USABILITY: &str = "plugin::text, database::text, current_database()::text, \
     coalesce(to_jsonb(s) ->> 'invalidation_reason', \
     CASE WHEN to_jsonb(s) ->> 'wal_status' = 'lost' THEN 'wal_removed' \
     WHEN (to_jsonb(s) ->> 'conflicting')::bool THEN 'conflict with recovery' END)";

/// Why the relay cannot use an existing slot whose [`SLOT_USABILITY`] columns start at
/// `first` in `row`: it belongs to something else, or it is invalidated. `None` if it can.
pub fn slot_refusal(
    row: &tokio_postgres::Row,
    first: usize,
    slot: &str,
    schema: &str,
) -> Option<String> {
    let plugin: Option<String> = row.get(first);
    let database: Option<String> = row.get(first + 1);
    let current: String = row.get(first + 2);
    let invalidation: Option<String> = row.get(first + 3);
    foreign_slot_problem(slot, plugin.as_deref(), database.as_deref(), &current)
        .or_else(|| invalidation.map(|reason| invalidated_slot_problem(slot, &reason, schema)))
}

/// What to do about a slot that can no longer stream.
fn invalidated_slot_problem(slot: &str, reason: &str, schema: &str) -> String {
    format!(
        "replication slot {slot:?} is invalidated ({reason}): PostgreSQL removed WAL it still \
         needed (max_slot_wal_keep_size) or it conflicted with recovery, and it can never \
         stream again; the events in the WAL it lost are gone from the stream. Drop it (SELECT \
         pg_drop_replication_slot({literal})) and publish them another way: source.backfill = \
         true creates a new slot and first publishes the rows still in the outbox tables. Or, \
         to accept the gap, drop it, delete the relay's record of it ({forget}) and run \
         `outbox-relay init`",
        literal = crate::sql::literal(slot),
        forget = crate::origin::forget_slot_sql(schema, slot),
    )
}

/// What is wrong with an existing slot of the relay's name that is not the relay's kind: a
/// physical slot, another output plugin, or another database. `None` if it is a pgoutput slot
/// of `current_database`.
fn foreign_slot_problem(
    slot: &str,
    plugin: Option<&str>,
    database: Option<&str>,
    current_database: &str,
) -> Option<String> {
    let owner = match (plugin, database) {
        (Some("pgoutput"), Some(database)) if database == current_database => return None,
        (None, _) | (_, None) => "a physical slot".to_owned(),
        (Some(plugin), Some(database)) => {
            format!("a slot of database {database:?} with output plugin {plugin}")
        }
    };
    Some(format!(
        "replication slot {slot:?} already exists as {owner}, and the relay needs a pgoutput \
         slot of database {current_database:?}: it belongs to something else; choose another \
         source.slot"
    ))
}

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
