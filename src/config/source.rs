//! `[source]`: which server, slot, publication and tables the relay reads, and how it
//! connects (the URL or key-value DSN, TLS parameters inside it, the password file).
//!
//! Invariant: the password never reaches a `Display` or `Debug` of these types.

use super::default_true;
use anyhow::{bail, Context};
use outbox_relay_sinks::Secret;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `postgres://user[:password]@host[:port]/dbname[?sslmode=...]` or libpq `key=value` form.
    pub url: String,
    /// A file whose first line is the password; read at every connect so rotation works.
    pub password_file: Option<PathBuf>,
    /// Overrides the URL's `sslmode`.
    pub sslmode: Option<SslMode>,
    /// PEM file of the CA(s) trusted for verify-ca / verify-full; default: public web roots.
    pub sslrootcert: Option<PathBuf>,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Outbox tables as `schema.table`; column mappings per table go in `[outbox."schema.table"]`.
    #[serde(default = "default_tables")]
    pub tables: Vec<String>,
    /// Whether `run` may create a missing slot (`init` always may).
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Make the slot a failover slot (PostgreSQL 17+): created with `failover => true`, or
    /// switched on by `run` for an existing slot, so that standbys with
    /// `sync_replication_slots = on` keep a copy that a promoted standby streams from.
    #[serde(default)]
    pub failover_slot: bool,
    /// How often a standby status update is sent, whatever the pipeline is doing. Keep it well
    /// under the server's `wal_sender_timeout` (60 s by default).
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// How long data sent to PostgreSQL may stay unacknowledged before the connection counts
    /// as dead (TCP_USER_TIMEOUT, Linux). A path that silently drops packets (a partition, a
    /// failover that leaves the old primary's address unanswered) then ends the session after
    /// this, not after the kernel's ~15 minutes of retransmissions. "0s" keeps the system's.
    #[serde(default = "default_tcp_user_timeout", with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// When set, emit a `pg_logical_emit_message` this often so the slot advances even when
    /// all other write traffic is in other databases.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// How often `run` checks that the publication still covers every outbox table (a table
    /// dropped and re-created leaves it, and its rows then never reach the relay).
    #[serde(
        default = "default_publication_check_interval",
        with = "humantime_serde"
    )]
    pub publication_check_interval: Duration,
    #[serde(default = "default_application_name")]
    pub application_name: String,
    /// Prefixes of transactional `pg_logical_emit_message` calls that carry outbox events
    /// (a JSON document with the outbox fields): an outbox without a table.
    #[serde(default)]
    pub message_prefixes: Vec<String>,
    /// On first start (the slot does not exist yet), publish the rows already in the outbox
    /// tables before streaming, consistently with the slot's snapshot.
    #[serde(default)]
    pub backfill: bool,
    /// Key sharding: the number of shards the outbox tables' rows are split into by the hash
    /// of their key, each streamed through a slot and publication of its own.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Which shard this relay streams, from 0.
    #[serde(default)]
    pub shard: u32,
}

/// One shard of a key-sharded outbox: the rows whose key hashes to `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// What `init` writes as the comment of the shard's publication, and what the relay
    /// expects there: the row filters of a publication with this comment are the relay's.
    pub fn comment(&self) -> String {
        format!(
            "outbox-relay shard {} of {}: rows whose key hashes to {} modulo {}",
            self.index, self.count, self.index, self.count
        )
    }

    /// The suffix of the shard's slot and publication names.
    pub fn suffix(&self) -> String {
        format!("_{}_of_{}", self.index, self.count)
    }
}

/// The most shards: one walsender and slot each.
pub const MAX_SHARDS: u32 = 64;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

fn default_shards() -> u32 {
    1
}

fn default_slot() -> String {
    "outbox_relay".into()
}

fn default_publication() -> String {
    "outbox_relay".into()
}

fn default_tables() -> Vec<String> {
    vec!["public.outbox".into()]
}

fn default_tcp_user_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_status_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_application_name() -> String {
    "outbox-relay".into()
}

fn default_publication_check_interval() -> Duration {
    Duration::from_secs(30)
}

/// Where and how to connect, resolved from `SourceConfig` (URL, password file, TLS keys).
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    pub connect_timeout: Duration,
    /// TCP_USER_TIMEOUT for TCP connections; `None` keeps the system's.
    pub tcp_user_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for ConnectParams {
    /// Where we connect, without the password: for error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Tcp(h) => write!(f, "{}@{}:{}/{}", self.user, h, self.port, self.dbname),
            Host::Unix(p) => write!(
                f,
                "{}@{}:{}/{}",
                self.user,
                p.display(),
                self.port,
                self.dbname
            ),
        }
    }
}

impl SourceConfig {
    /// The shard this relay streams, when the outbox is key-sharded (`shards` > 1).
    pub fn sharding(&self) -> Option<Shard> {
        (self.shards > 1).then_some(Shard {
            index: self.shard,
            count: self.shards,
        })
    }

    /// Resolves the URL, the password file and TLS options; reads the password file now.
    pub fn connect_params(&self) -> anyhow::Result<ConnectParams> {
        let (url, url_sslmode, url_rootcert) = split_tls_params(&self.url);
        let pg: tokio_postgres::Config = url.parse().map_err(|e| {
            anyhow::anyhow!(
                "source.url is not a valid PostgreSQL connection string ({e}): use \
                 postgres://user@host:5432/dbname"
            )
        })?;
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => Host::Tcp(h.clone()),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => Host::Unix(p.clone()),
            None => Host::Tcp("localhost".into()),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .context("source.url names no user: use postgres://USER@host/dbname")?;
        let dbname = pg
            .get_dbname()
            .map(str::to_owned)
            .unwrap_or_else(|| user.clone());
        let mut password = pg
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()));
        if let Some(file) = &self.password_file {
            password = Some(Secret::from_file(file, "source.password_file")?);
        }
        let sslmode = match (self.sslmode, url_sslmode) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text.parse().context("in source.url")?,
            (None, None) => SslMode::Prefer,
        };
        Ok(ConnectParams {
            host,
            port,
            user,
            dbname,
            password,
            sslmode,
            sslrootcert: self.sslrootcert.clone().or(url_rootcert.map(PathBuf::from)),
            application_name: self.application_name.clone(),
            connect_timeout: pg
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10)),
            tcp_user_timeout: Some(self.tcp_user_timeout).filter(|t| !t.is_zero()),
        })
    }
}

/// Removes `sslmode` and `sslrootcert` from a connection string (tokio-postgres rejects the
/// verify modes) and returns them: from a URL's query, or from a `key=value` string.
fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url_tls_params(url)
    } else {
        split_key_value_tls_params(url)
    }
}

fn split_url_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None, None);
    };
    let (mut mode, mut rootcert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => rootcert = Some(v.to_owned()),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (url, mode, rootcert)
}

/// The `key=value` form (`host=db user=relay sslmode=verify-full`), with libpq's quoting:
/// a value may be in single quotes, with `\'` and `\\` escapes.
fn split_key_value_tls_params(dsn: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut rootcert) = (None, None);
    let mut kept = String::with_capacity(dsn.len());
    let mut rest = dsn;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let Some(eq) = rest.find('=') else {
            // Not key=value: leave it for tokio-postgres to report.
            kept.push_str(rest);
            break;
        };
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start();
        let (value, end) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, rest.len() - quoted.len() + end)
        } else {
            let len = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..len].to_owned(), rest.len() - after.len() + len)
        };
        match key {
            "sslmode" => mode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            _ => {
                if !kept.is_empty() {
                    kept.push(' ');
                }
                kept.push_str(&rest[..end]);
            }
        }
        rest = &rest[end..];
    }
    (kept, mode, rootcert)
}
