//! Configuration: a TOML file, every key overridable by `OUTBOX_RELAY__SECTION__KEY`
//! environment variables, passwords from files so mounted secrets can rotate. Unknown keys and
//! wrong types are errors that name the key.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use outbox_relay_sinks::format::Format;
use outbox_relay_sinks::routing::MatchRule;
use outbox_relay_sinks::table_name::names_one_of;
pub use outbox_relay_sinks::table_name::parse_table_name;
use outbox_relay_sinks::SinkContext;
pub use outbox_relay_sinks::{Secret, SinkConfig};

/// The environment variable prefix; `__` separates the section from the key.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub leader: LeaderConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// Column mappings per outbox table (`[outbox."schema.table"]`); tables of
    /// `source.tables` without an entry use Debezium's column names.
    #[serde(default)]
    pub outbox: BTreeMap<String, TableMapping>,
    #[serde(default)]
    pub validation: ValidationConfig,
    pub sinks: BTreeMap<String, SinkConfig>,
}

/// Optional JSON Schema validation of payloads.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Directory of `<type>.v<version>.json` / `<type>.json` schema files; off when unset.
    pub schema_dir: Option<PathBuf>,
    /// Dead-letter events whose type has no schema (default: let them through).
    #[serde(default)]
    pub required: bool,
}

/// How the columns of one outbox table become an event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapping {
    #[serde(default = "column_id")]
    pub id: String,
    #[serde(default = "column_aggregate_type")]
    pub aggregate_type: String,
    #[serde(default = "column_aggregate_id")]
    pub aggregate_id: String,
    #[serde(default = "column_type", rename = "type")]
    pub event_type: String,
    #[serde(default = "column_payload")]
    pub payload: String,
    /// The message key (what per-key order means); default: the aggregate id column.
    pub key: Option<String>,
    /// Optional columns: used when the table has them. Naming one here that the table lacks
    /// dead-letters its rows with that reason.
    pub schema_version: Option<String>,
    pub headers: Option<String>,
    pub occurred_at: Option<String>,
    pub traceparent: Option<String>,
    /// Further columns to carry, as Debezium's `table.fields.additional.placement`.
    #[serde(default)]
    pub additional: Vec<AdditionalColumn>,
    /// CloudEvents `source` template, e.g. "/orders/{aggregatetype}"; default "/{table}".
    #[serde(default = "default_ce_source")]
    pub source: String,
    /// What an UPDATE of an outbox row does.
    #[serde(default)]
    pub on_update: ChangePolicy,
    /// What a DELETE of an outbox row does (the default fits "insert then delete").
    #[serde(default)]
    pub on_delete: ChangePolicy,
    /// What an inserted row whose payload column is NULL becomes.
    #[serde(default)]
    pub on_null_payload: NullPayloadPolicy,
    /// The CloudEvents `datacontenttype` of a `bytea` payload (e.g. "application/avro");
    /// JSON payloads are always "application/json".
    #[serde(default = "default_binary_content_type")]
    pub content_type: String,
}

impl Default for TableMapping {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every mapping field has a default")
    }
}

/// A column an outbox table's mapping reads.
pub struct MappedColumn<'a> {
    pub name: &'a str,
    /// What the mapping reads it as (`id`, `payload`, …).
    pub role: &'static str,
    /// Whether a row without it is dead-lettered; the optional columns under their default
    /// names are used only when the table has them.
    pub required: bool,
}

impl TableMapping {
    /// Every column the mapping reads, with its role.
    pub fn columns(&self) -> Vec<MappedColumn<'_>> {
        let required = |name, role| MappedColumn {
            name,
            role,
            required: true,
        };
        let mut columns = vec![
            required(&self.id, "id"),
            required(&self.aggregate_type, "aggregate_type"),
            required(&self.aggregate_id, "aggregate_id"),
            required(&self.event_type, "type"),
            required(&self.payload, "payload"),
        ];
        if let Some(key) = &self.key {
            columns.push(required(key, "key"));
        }
        for (configured, default, role) in [
            (&self.schema_version, "schema_version", "schema_version"),
            (&self.headers, "headers", "headers"),
            (&self.occurred_at, "occurred_at", "occurred_at"),
            (&self.traceparent, "traceparent", "traceparent"),
        ] {
            columns.push(MappedColumn {
                name: configured.as_deref().unwrap_or(default),
                role,
                required: configured.is_some(),
            });
        }
        for extra in &self.additional {
            columns.push(required(&extra.column, "additional"));
        }
        columns
    }
}

/// A column carried along with the event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdditionalColumn {
    pub column: String,
    pub placement: Placement,
    /// The header or attribute name; default: the column name.
    #[serde(rename = "as")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// A message header.
    Header,
    /// An attribute of the envelope (a CloudEvents extension attribute).
    Envelope,
}

/// What to do with an UPDATE or DELETE on an outbox table (Debezium's
/// `table.op.invalid.behavior`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ChangePolicy {
    /// Count it and go on.
    #[default]
    Skip,
    /// Store it in the dead-letter table with the row.
    DeadLetter,
    /// Stop the relay with an error.
    Fail,
}

/// What an inserted row with a NULL payload becomes.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NullPayloadPolicy {
    /// A dead letter with the reason `column "payload" is NULL`.
    #[default]
    DeadLetter,
    /// Nothing: counted in the session summary, logged at debug level.
    Skip,
    /// An event without a payload: a Kafka record with the event's key and a null value
    /// (Debezium's `route.tombstone.on.empty.payload`). Only Kafka sinks may take the table.
    Tombstone,
}

fn column_id() -> String {
    "id".into()
}
fn column_aggregate_type() -> String {
    "aggregatetype".into()
}
fn column_aggregate_id() -> String {
    "aggregateid".into()
}
fn column_type() -> String {
    "type".into()
}
fn column_payload() -> String {
    "payload".into()
}
fn default_binary_content_type() -> String {
    "application/octet-stream".into()
}
fn default_ce_source() -> String {
    "/{table}".into()
}

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Schema holding the relay's checkpoint and dead-letter tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Most events per sink batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// A batch closes once its events hold this many bytes (`Event::size_bytes`), so that
    /// memory stays bounded for large rows as well.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    /// Batches queued per sink before reading the replication stream pauses (backpressure).
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// How often acknowledged positions are written to the checkpoint table.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How long a graceful shutdown may spend draining in-flight deliveries.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            schema: default_schema(),
            batch_size: default_batch_size(),
            batch_bytes: default_batch_bytes(),
            queue_depth: default_queue_depth(),
            checkpoint_interval: default_checkpoint_interval(),
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

/// Leader election among relays sharing a slot (sidecars of one app's replicas).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderConfig {
    /// Only the holder of a PostgreSQL advisory lock keyed on the slot streams.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often a standby tries to take the lock, and the leader checks it still holds it:
    /// a takeover happens within about this long after the leader's connection is gone.
    #[serde(default = "default_leader_interval", with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            enabled: true,
            interval: default_leader_interval(),
        }
    }
}

fn default_publication_check_interval() -> Duration {
    Duration::from_secs(30)
}

fn default_leader_interval() -> Duration {
    Duration::from_secs(2)
}

/// The health and metrics endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/healthz`, `/readyz` and `/metrics`, e.g. "0.0.0.0:9187"; off when unset.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `outbox_relay=debug`; `RUST_LOG` wins when set.
    pub level: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

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

fn default_slot() -> String {
    "outbox_relay".into()
}
fn default_publication() -> String {
    "outbox_relay".into()
}
fn default_tables() -> Vec<String> {
    vec!["public.outbox".into()]
}
fn default_true() -> bool {
    true
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
fn default_schema() -> String {
    "outbox_relay".into()
}
fn default_batch_size() -> usize {
    1000
}
fn default_batch_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_queue_depth() -> usize {
    4
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Config {
    /// The column mapping of the configured outbox table `table` (`schema.table`).
    pub fn mapping_for(&self, table: &str) -> TableMapping {
        mapping_in(&self.outbox, table)
    }

    /// Reads `path` (if given) and the `OUTBOX_RELAY__*` environment, then validates.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], with an explicit environment (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> anyhow::Result<Config> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            if !path.exists() {
                bail!(
                    "config file {} does not exist: pass --config with the path of a TOML file \
                     (examples are in config/)",
                    path.display()
                );
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("source.tables")
            .try_parsing(true)
            .source(env);
        let raw = builder.add_source(environment).build().map_err(redacted)?;
        let config: Config = raw.try_deserialize().map_err(redacted)?;
        config.validate()?;
        Ok(config)
    }

    /// Every table a sink's match rule names must be an outbox table (or a configured message
    /// prefix): a rule that names no table events carry matches nothing, and the sink would
    /// skip every event without a word.
    fn check_match_tables(&self, sink: &str, rule: &MatchRule) -> anyhow::Result<()> {
        for table in &rule.tables {
            let known = match table.strip_prefix("message:") {
                Some(prefix) => self.source.message_prefixes.iter().any(|p| p == prefix),
                None => parse_table_name(table)
                    .is_ok_and(|names| names_one_of(&self.source.tables, &names)),
            };
            if !known {
                bail!(
                    "sinks.{sink}.match.tables names {table:?}, which is neither in source.tables \
                     nor message:PREFIX of a source.message_prefixes entry: no event would match \
                     it. Fix the name (\"schema.table\"), or list the table in source.tables"
                );
            }
        }
        Ok(())
    }

    /// A tombstone is a Kafka record with a null value; no other sink has such a thing, so
    /// every sink whose `match.tables` takes `table` must be a Kafka sink.
    fn check_tombstone_sinks(&self, table: &str, names: &(String, String)) -> anyhow::Result<()> {
        let refusing = self
            .sinks
            .iter()
            .find(|(_, sink)| !sink.takes_tombstones() && sink.filter().takes_table(names));
        match refusing {
            Some((sink, _)) => bail!(
                "[outbox.\"{table}\"] has on_null_payload = \"tombstone\", but sink {sink:?} \
                 takes the table's events and is not a Kafka sink: only Kafka has tombstones \
                 (a record with a null value). Keep the table from that sink with \
                 sinks.{sink}.match.tables, or use on_null_payload = \"skip\" or \"dead-letter\""
            ),
            None => Ok(()),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.sinks.is_empty() {
            bail!("no sink is configured: add a [sinks.NAME] table with a `type` (stdout, file, null)");
        }
        for name in self.sinks.keys() {
            check_identifier("sink name", name)?;
        }
        check_identifier("source.slot", &self.source.slot)?;
        check_identifier("source.publication", &self.source.publication)?;
        check_identifier("relay.schema", &self.relay.schema)?;
        if self.source.tables.is_empty() {
            bail!("source.tables is empty: list the outbox tables as \"schema.table\"");
        }
        for table in &self.source.tables {
            parse_table_name(table)?;
        }
        for (table, mapping) in &self.outbox {
            let names = parse_table_name(table)?;
            if !names_one_of(&self.source.tables, &names) {
                bail!(
                    "[outbox.\"{table}\"] maps a table that is not in source.tables: add it there"
                );
            }
            outbox_relay_sinks::routing::Template::parse(&mapping.source)
                .with_context(|| format!("outbox.\"{table}\".source"))?;
            if mapping.on_null_payload == NullPayloadPolicy::Tombstone {
                self.check_tombstone_sinks(table, &names)?;
            }
        }
        for (name, sink) in &self.sinks {
            self.check_match_tables(name, sink.filter())?;
            sink.validate(&SinkContext {
                name,
                slot: &self.source.slot,
            })?;
        }
        for prefix in &self.source.message_prefixes {
            if prefix.is_empty() {
                bail!("source.message_prefixes must not contain an empty prefix");
            }
        }
        if self.relay.batch_size == 0 || self.relay.batch_bytes == 0 || self.relay.queue_depth == 0
        {
            bail!("relay.batch_size, relay.batch_bytes and relay.queue_depth must be at least 1");
        }
        if self.source.status_interval.is_zero() {
            bail!("source.status_interval must be positive (for example \"10s\")");
        }
        Ok(())
    }
}

/// The mapping `mappings` (`[outbox."schema.table"]`) has for `table`, or the default one.
pub fn mapping_in(mappings: &BTreeMap<String, TableMapping>, table: &str) -> TableMapping {
    let names = parse_table_name(table).ok();
    mappings
        .iter()
        .find(|(t, _)| names.is_some() && parse_table_name(t).ok() == names)
        .map(|(_, m)| m.clone())
        .unwrap_or_default()
}

/// Names the relay puts into SQL must be plain identifiers: lower-case letters, digits, `_`.
fn check_identifier(what: &str, value: &str) -> anyhow::Result<()> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!(
            "{what} {value:?} must be 1–63 characters of a–z, 0–9 and _, not starting with a digit"
        );
    }
    Ok(())
}

fn redacted(err: config::ConfigError) -> anyhow::Error {
    anyhow::anyhow!(
        "invalid configuration: {}; see config/ for examples of every key",
        redact_config_error(&err.to_string())
    )
}

/// A configuration error without the configuration's values: the TOML parser quotes the
/// offending line, and serde the offending value, either of which can be a password (a
/// `source.url` with a stray backslash or quote). Kept: where (line, column, key) and what
/// is wrong. Dropped: the quoted source lines (`3 | url = "…"`, `  |   ^`); masked: every
/// double-quoted value.
fn redact_config_error(text: &str) -> String {
    let mut kept = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let source_line = trimmed.starts_with('|')
            || trimmed
                .split_once('|')
                .is_some_and(|(number, _)| number.trim().chars().all(|c| c.is_ascii_digit()));
        if source_line || trimmed.is_empty() {
            continue;
        }
        kept.push(mask_quoted(trimmed));
    }
    kept.join(": ")
}

/// Replaces the contents of every quoted value in `line` with `…`: serde writes a value as
/// `string "…"` (or `char "…"`); key names, also quoted, stay.
fn mask_quoted(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut inside = false;
    let mut escaped = false;
    for c in line.chars() {
        if inside {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                inside = false;
                out.push_str("…\"");
            }
            continue;
        }
        inside = c == '"' && (out.ends_with("string ") || out.ends_with("char "));
        out.push(c);
    }
    if inside {
        out.push('…');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Write;

    fn load(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<Config> {
        let mut file = tempfile::NamedTempFile::with_suffix(".toml").unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(Some(file.path()), Some(env))
    }

    const MINIMAL: &str =
        "[source]\nurl = \"postgres://app@db/app\"\n[sinks.out]\ntype = \"stdout\"\n";

    #[test]
    fn tombstones_are_refused_for_every_non_kafka_sink_that_takes_the_table() {
        let config = |sinks: &str| {
            load(
                &format!(
                    "[source]\nurl = \"postgres://app@db/app\"\n\
                     tables = [\"public.outbox\", \"billing.events\"]\n\
                     [outbox.\"public.outbox\"]\non_null_payload = \"tombstone\"\n\
                     [sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\n{sinks}"
                ),
                &[],
            )
            .map(|config| config.mapping_for("public.outbox").on_null_payload)
            .map_err(|e| e.to_string())
        };
        assert_eq!(config(""), Ok(NullPayloadPolicy::Tombstone));
        assert_eq!(
            config("[sinks.audit]\ntype = \"stdout\"\n[sinks.audit.match]\ntables = [\"billing.events\"]\n"),
            Ok(NullPayloadPolicy::Tombstone),
            "a sink whose match.tables leaves the table out never sees a tombstone"
        );
        for sink in [
            "[sinks.audit]\ntype = \"stdout\"\n",
            "[sinks.audit]\ntype = \"null\"\n[sinks.audit.match]\ntables = [\"public.outbox\"]\n",
            "[sinks.audit]\ntype = \"eventbridge\"\n[sinks.audit.match]\naggregate_types = [\"order\"]\n",
        ] {
            let err = config(sink).unwrap_err();
            assert!(
                err.contains("[outbox.\"public.outbox\"] has on_null_payload = \"tombstone\", but sink \"audit\"")
                    && err.contains("sinks.audit.match.tables"),
                "{err}"
            );
        }
        assert_eq!(
            load(MINIMAL, &[])
                .unwrap()
                .mapping_for("public.outbox")
                .on_null_payload,
            NullPayloadPolicy::DeadLetter
        );
    }

    #[test]
    fn match_tables_are_named_as_events_name_them_and_must_be_outbox_tables() {
        let sink = |tables: &str| {
            format!(
                "[source]\nurl = \"postgres://app@db/app\"\nmessage_prefixes = [\"outbox\"]\n\
                 [sinks.out]\ntype = \"stdout\"\n[sinks.out.match]\ntables = [{tables}]\n"
            )
        };
        let config = load(&sink("\"outbox\", \"message:outbox\""), &[]).unwrap();
        assert_eq!(
            config.sinks["out"].filter().event_tables(),
            ["public.outbox", "message:outbox"]
        );
        for unknown in ["\"public.outbx\"", "\"message:other\""] {
            let err = format!("{:#}", load(&sink(unknown), &[]).unwrap_err());
            assert!(err.contains("sinks.out.match.tables names"), "{err}");
        }
    }

    #[test]
    fn a_config_error_never_shows_the_values_of_the_file() {
        let cases = [
            // A backslash in the password: an invalid escape.
            "[source]\nurl = \"postgres://app:s3cr\\qet@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
            // A quote in the password ends the string early.
            "[source]\nurl = \"postgres://app:s3cr\"et@db/app\"\n[sinks.out]\ntype = \"stdout\"\n",
            // A missing closing quote.
            "[source]\nurl = \"postgres://app:s3cret@db/app\n[sinks.out]\ntype = \"stdout\"\n",
            // A value of the wrong type, echoed by serde.
            "[source]\nurl = \"postgres://app@db/app\"\ntables = \"s3cret\"\n[sinks.out]\ntype = \"stdout\"\n",
            "[source]\nurl = \"postgres://app@db/app\"\n[relay]\nbatch_size = \"s3cret\"\n[sinks.out]\ntype = \"stdout\"\n",
        ];
        for toml in cases {
            let err = format!("{:#}", load(toml, &[]).unwrap_err());
            assert!(!err.contains("s3cr"), "{err}");
            assert!(err.starts_with("invalid configuration"), "{err}");
        }
        let err = format!("{:#}", load(cases[0], &[]).unwrap_err());
        assert!(err.contains("line 2"), "where the error is stays: {err}");
    }

    #[test]
    fn tls_settings_in_a_key_value_connection_string_are_honoured() {
        let toml = MINIMAL.replace(
            "postgres://app@db/app",
            "host=db user=relay password='p w' sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' dbname=shop",
        );
        let params = load(&toml, &[]).unwrap().source.connect_params().unwrap();
        assert_eq!(params.sslmode, SslMode::VerifyFull);
        assert_eq!(
            params.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca dir/ca.pem"))
        );
        assert_eq!(
            (params.user.as_str(), params.dbname.as_str()),
            ("relay", "shop")
        );
        let require = MINIMAL.replace(
            "postgres://app@db/app",
            "host=db user=relay sslmode=require",
        );
        let params = load(&require, &[])
            .unwrap()
            .source
            .connect_params()
            .unwrap();
        assert_eq!(params.sslmode, SslMode::Require);
    }

    #[test]
    fn defaults_and_env_overrides() {
        let config = load(
            MINIMAL,
            &[
                (
                    "OUTBOX_RELAY__SOURCE__URL",
                    "postgres://relay@other:6543/shop?sslmode=verify-full",
                ),
                ("OUTBOX_RELAY__SOURCE__STATUS_INTERVAL", "2s"),
                (
                    "OUTBOX_RELAY__SOURCE__TABLES",
                    "public.outbox,billing.outbox",
                ),
                ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "10"),
            ],
        )
        .unwrap();
        assert_eq!(config.source.slot, "outbox_relay");
        assert_eq!(config.source.status_interval, Duration::from_secs(2));
        assert_eq!(config.source.tables, ["public.outbox", "billing.outbox"]);
        assert_eq!(config.relay.batch_size, 10);
        let params = config.source.connect_params().unwrap();
        assert_eq!(params.host, Host::Tcp("other".into()));
        assert_eq!(
            (params.port, params.user.as_str(), params.dbname.as_str()),
            (6543, "relay", "shop")
        );
        assert_eq!(params.sslmode, SslMode::VerifyFull);
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_key() {
        let err = load(&format!("{MINIMAL}[relay]\nbatch_sise = 3\n"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("batch_sise"), "{err:#}");
        let err = load(&format!("{MINIMAL}[relay]\nbatch_size = \"many\"\n"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("batch_size"), "{err:#}");
        let err = load(MINIMAL, &[("OUTBOX_RELAY__SINKS__OUT__COLOR", "red")]).unwrap_err();
        assert!(format!("{err:#}").contains("color"), "{err:#}");
        let err = load(
            "[source]\nurl = \"postgres://a@b/c\"\n[sinks.out]\ntype = \"kafak\"\n",
            &[],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("kafak"), "{err:#}");
    }

    #[test]
    fn password_file_wins_and_is_redacted() {
        let mut secret = tempfile::NamedTempFile::new().unwrap();
        writeln!(secret, "s3cret-from-file").unwrap();
        let config = load(
            MINIMAL,
            &[
                ("OUTBOX_RELAY__SOURCE__URL", "postgres://app:inline@db/app"),
                (
                    "OUTBOX_RELAY__SOURCE__PASSWORD_FILE",
                    secret.path().to_str().unwrap(),
                ),
            ],
        )
        .unwrap();
        let params = config.source.connect_params().unwrap();
        assert_eq!(
            params.password.as_ref().unwrap().expose(),
            "s3cret-from-file"
        );
        let shown = format!("{params:?} {params}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("inline"),
            "{shown}"
        );
    }

    #[test]
    fn missing_file_and_bad_names_say_what_to_do() {
        let err = Config::load(Some(Path::new("/nonexistent/relay.toml"))).unwrap_err();
        assert!(err.to_string().contains("--config"), "{err}");
        let err = load(MINIMAL, &[("OUTBOX_RELAY__SOURCE__SLOT", "Bad-Slot")]).unwrap_err();
        assert!(err.to_string().contains("source.slot"), "{err}");
    }
}
