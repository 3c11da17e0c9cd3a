//! Configuration: a TOML file, every key overridable by `OUTBOX_RELAY__SECTION__KEY`
//! environment variables, passwords from files so mounted secrets can rotate. Unknown keys and
//! wrong types are errors that name the key.
//! The sections live in their own files: [`source`] and [`mapping`]; the sinks' sections in
//! the sinks crate ([`SinkConfig`]).

mod mapping;
mod source;

pub use mapping::*;
pub use source::*;

use anyhow::{bail, Context};
pub use outbox_relay_sinks::format::Format;
use outbox_relay_sinks::routing::MatchRule;
use outbox_relay_sinks::table_name::names_one_of;
pub use outbox_relay_sinks::table_name::parse_table_name;
use outbox_relay_sinks::SinkContext;
pub use outbox_relay_sinks::{Secret, SinkConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Upcasters per event type and version (`[upcast.<type>.<version>]`).
    #[serde(default)]
    pub upcast: crate::upcast::Programs,
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
    /// How long one event's upcast chain may run before it is dead-lettered.
    #[serde(default = "default_upcast_timeout", with = "humantime_serde")]
    pub upcast_timeout: Duration,
    /// The memory (data segment) of the process upcasters run in.
    #[serde(default = "default_upcast_memory_bytes")]
    pub upcast_memory_bytes: u64,
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
            upcast_timeout: default_upcast_timeout(),
            upcast_memory_bytes: default_upcast_memory_bytes(),
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

#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
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

pub(super) fn default_true() -> bool {
    true
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

fn default_upcast_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_upcast_memory_bytes() -> u64 {
    256 << 20
}

impl Config {
    /// The column mapping of the configured outbox table `table` (`schema.table`).
    pub fn mapping_for(&self, table: &str) -> TableMapping {
        mapping_in(&self.outbox, table)
    }

    /// What events' `table` can be: each configured table as `schema.table` the way the
    /// catalog holds it, and `message:<prefix>` per transactional-message prefix.
    pub fn event_sources(&self) -> Vec<String> {
        let tables = self.source.tables.iter().filter_map(|table| {
            parse_table_name(table)
                .ok()
                .map(|(schema, name)| format!("{schema}.{name}"))
        });
        let prefixes = self
            .source
            .message_prefixes
            .iter()
            .map(|prefix| format!("message:{prefix}"));
        tables.chain(prefixes).collect()
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
        let mut config: Config = raw.try_deserialize().map_err(redacted)?;
        config.validate()?;
        config.name_the_shard()?;
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

    /// A relay of one shard streams through a slot and a publication of its own:
    /// `source.slot` and `source.publication` with `_<shard>_of_<shards>` added, so that the
    /// leader lock, the checkpoints, the dead letters and every name derived from the slot
    /// are the shard's.
    fn name_the_shard(&mut self) -> anyhow::Result<()> {
        if let Some(shard) = self.source.sharding() {
            self.source.slot.push_str(&shard.suffix());
            self.source.publication.push_str(&shard.suffix());
            check_identifier("source.slot with the shard's suffix", &self.source.slot)?;
            check_identifier(
                "source.publication with the shard's suffix",
                &self.source.publication,
            )?;
        }
        Ok(())
    }

    /// What key sharding (`source.shards` > 1) cannot do: split logical messages (a
    /// publication filters rows, not messages), backfill (not split by shard yet), see
    /// updates and deletes (a row filter on a column outside the replica identity would make
    /// them fail, so a shard's publication publishes inserts only), or publish to a sink
    /// whose destination orders by position.
    fn check_sharding(&self) -> anyhow::Result<()> {
        let source = &self.source;
        if !(1..=MAX_SHARDS).contains(&source.shards) || source.shard >= source.shards {
            bail!(
                "source.shards must be from 1 to {MAX_SHARDS} and source.shard from 0 to \
                 source.shards - 1 (got shard {} of {})",
                source.shard,
                source.shards
            );
        }
        if source.shards == 1 {
            return Ok(());
        }
        if !source.message_prefixes.is_empty() {
            bail!(
                "source.message_prefixes cannot be sharded: a publication's row filter splits \
                 table rows, not logical messages. Use source.shards = 1, or write the events \
                 to an outbox table"
            );
        }
        if source.backfill {
            bail!(
                "source.backfill is not supported with source.shards > 1 yet: backfill with \
                 one shard first, or start the shards without it"
            );
        }
        for table in &source.tables {
            let mapping = self.mapping_for(table);
            for (change, policy) in [
                ("on_update", mapping.on_update),
                ("on_delete", mapping.on_delete),
            ] {
                if policy != ChangePolicy::Skip {
                    let policy = match policy {
                        ChangePolicy::DeadLetter => "dead-letter",
                        _ => "fail",
                    };
                    bail!(
                        "[outbox.\"{table}\"] {change} = \"{policy}\" needs updates and deletes in \
                         the stream, but a shard's publication publishes inserts only (a row \
                         filter on the key would make UPDATE and DELETE of the table fail). Use \
                         \"skip\", or source.shards = 1"
                    );
                }
            }
        }
        for (name, sink) in &self.sinks {
            if let Some(problem) = sink.shard_problem() {
                bail!("sinks.{name}: {problem}");
            }
        }
        Ok(())
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.check_sharding()?;
        if self.sinks.is_empty() {
            bail!("no sink is configured: add a [sinks.NAME] table with a `type` (stdout, file, null)");
        }
        let upcasters = crate::upcast::Upcasters::compile(&self.upcast)?;
        for (name, sink) in &self.sinks {
            check_upcast_rule(name, sink.upcast(), &upcasters)?;
        }
        if self.relay.upcast_timeout.is_zero() || self.relay.upcast_memory_bytes < 16 << 20 {
            bail!("relay.upcast_timeout must be positive and relay.upcast_memory_bytes at least 16777216 (16 MiB)");
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

#[cfg(test)]
mod tests;

/// A sink's `upcast` rule against the configured upcasters: upcasting to the latest version
/// needs some upcaster, and a pinned version must be one an upcaster of its type reaches.
fn check_upcast_rule(
    sink: &str,
    rule: &outbox_relay_sinks::UpcastRule,
    upcasters: &crate::upcast::Upcasters,
) -> anyhow::Result<()> {
    if rule.to == outbox_relay_sinks::UpcastTarget::Latest && upcasters.steps().next().is_none() {
        bail!(
            "sinks.{sink}.upcast.to = \"latest\", but no upcaster is configured: add \
             [upcast.<type>.<version>] programs, or remove the key to publish events as stored"
        );
    }
    for (event_type, &version) in &rule.pinned {
        let reached = upcasters
            .steps()
            .any(|(step_type, _, to)| step_type == event_type && to == version);
        if !reached {
            bail!(
                "sinks.{sink}.upcast.pinned.{event_type} = {version}, but no \
                 [upcast.{event_type}.<version>] program has to = {version}: add the upcaster \
                 that produces version {version}, or pin a version one produces"
            );
        }
    }
    Ok(())
}
