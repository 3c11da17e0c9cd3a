//! The Redis Streams sink: every event is one stream entry (`XADD`), whose id is the
//! event's position (`entry.rs`).
//!
//! - Exactly once into each stream: Redis refuses an entry whose id is not above the
//!   stream's last one, so an event sent again after a crash is refused, not added twice.
//!   A refused entry is looked up (`XRANGE id id`): the same event there means delivered;
//!   anything else (the stream holds entries past this position from another writer, or
//!   was reset) dead-letters the event with the reason, never a silent drop.
//! - A batch is one `MULTI`/`EXEC` on one connection: Redis runs it whole or not at all
//!   (out of memory, a read-only replica), so a retry never leaves a gap inside a key's
//!   order. The entries of a stream grow in commit order, so every key's events are in
//!   order.
//! - `recover`: with a stream name without placeholders, the stream's last generated id is
//!   the position the relay resumes after; with a template, the refusals above do the work.
//! - What "acknowledged" means is what Redis means by it: in memory, and on disk as its
//!   persistence settings say (`appendfsync always` for every write; with the default
//!   `everysec` a Redis crash can lose the last second). Redis Cluster is not supported
//!   (a batch spans streams in different slots).
//!
//! The configuration lives in `config.rs`, the entry's id and fields in `entry.rs`.

mod config;
mod entry;

pub use config::RedisConfig;
pub use entry::{entry_id, position_of};

use crate::format::Format;
use crate::routing::Template;
use crate::{Event, EventState, Position, Secret, Sink, SinkError};
use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult};
use std::path::PathBuf;
use std::time::Duration;

/// Everything the Redis sink needs, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub name: String,
    pub url: String,
    pub password: Option<Secret>,
    /// Trusted roots for `rediss://` (PEM); the Mozilla roots when `None`.
    pub ca_file: Option<PathBuf>,
    pub stream: Template,
    pub format: Format,
    pub maxlen: Option<u64>,
    pub max_entry_bytes: usize,
    pub timeout: Duration,
}

pub struct RedisSink {
    settings: RedisSettings,
    connection: Option<MultiplexedConnection>,
    stream_buf: String,
    /// The `event` field of the entry being built, reused.
    line: Vec<u8>,
}

/// An entry Redis refused with a plain error: looked up before it is judged.
struct Refused {
    index: usize,
    stream: String,
    id: String,
    reason: String,
}

impl RedisSink {
    pub fn new(settings: RedisSettings) -> Self {
        RedisSink {
            settings,
            connection: None,
            stream_buf: String::new(),
            line: Vec::new(),
        }
    }

    /// The open connection, or a new one.
    async fn connect(&mut self) -> Result<MultiplexedConnection, SinkError> {
        if let Some(connection) = &self.connection {
            return Ok(connection.clone());
        }
        let name = &self.settings.name;
        let mut info = self
            .settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| {
                SinkError::Permanent(format!("sink {name}: url is not a Redis URL: {e}"))
            })?;
        if let Some(password) = &self.settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(redis);
        }
        let client = match &self.settings.ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|err| {
                    SinkError::Permanent(format!(
                        "sink {name}: cannot read ca_file {}: {err}",
                        path.display()
                    ))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(info, certificates)
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| classify(name, &e, "opening the Redis client"))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| classify(name, &e, "connecting to Redis"))?;
        tracing::info!(sink = %name, "connected to Redis");
        self.connection = Some(connection.clone());
        Ok(connection)
    }

    /// Runs `pipe` on the connection within the sink's timeout; a failure drops the
    /// connection (the next attempt opens a new one).
    async fn run<T: redis::FromRedisValue>(
        &mut self,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<T, SinkError> {
        let mut connection = self.connect().await?;
        let ran = tokio::time::timeout(self.settings.timeout, pipe.query_async(&mut connection));
        self.settle(ran.await, what)
    }

    /// Runs one command as [`RedisSink::run`] runs a pipeline (its error keeps its code).
    async fn run_one<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
        what: &str,
    ) -> Result<T, SinkError> {
        let mut connection = self.connect().await?;
        let ran = tokio::time::timeout(self.settings.timeout, command.query_async(&mut connection));
        self.settle(ran.await, what)
    }

    /// The outcome of a command or pipeline run within the timeout.
    fn settle<T>(
        &mut self,
        ran: Result<RedisResult<T>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<T, SinkError> {
        let outcome = match ran {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => classify(&self.settings.name, &e, what),
            Err(_) => SinkError::Retryable(format!(
                "{what} took longer than sinks.{}.timeout ({:?})",
                self.settings.name, self.settings.timeout
            )),
        };
        self.connection = None;
        Err(outcome)
    }

    /// Looks up the entries Redis refused: the same event there is delivered; anything
    /// else is dead-lettered with Redis's reason.
    async fn judge_refused(
        &mut self,
        batch: &[Event],
        states: &mut [EventState],
        refused: Vec<Refused>,
    ) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        for entry in &refused {
            pipe.cmd("XRANGE")
                .arg(&entry.stream)
                .arg(&entry.id)
                .arg(&entry.id);
        }
        let found: Vec<redis::streams::StreamRangeReply> =
            self.run(&pipe, "looking up refused entries").await?;
        for (entry, reply) in refused.iter().zip(found) {
            let event = &batch[entry.index];
            let same = reply.ids.first().is_some_and(|stored| {
                stored.get::<Vec<u8>>("id").as_deref() == Some(event.id.as_bytes())
            });
            states[entry.index] = if same {
                EventState::Acked
            } else {
                EventState::Rejected(format!(
                    "Redis refused entry {} in stream {}: {}; the stream holds no entry of \
                     this event there (another writer, or a reset stream, is past this \
                     position)",
                    entry.id, entry.stream, entry.reason
                ))
            };
        }
        Ok(())
    }

    /// Problems `outbox-relay check` reports: Redis unreachable or refusing the login, a
    /// static stream key of another type, an eviction policy that may drop streams.
    pub async fn check(mut self) -> Vec<String> {
        let name = self.settings.name.clone();
        let mut problems = Vec::new();
        if let Err(e) = self.run_one::<String>(&redis::cmd("PING"), "PING").await {
            problems.push(format!("sink {name}: {}", error_text(e)));
            return problems;
        }
        if let Some(stream) = self.settings.stream.as_static().map(str::to_owned) {
            let mut command = redis::cmd("TYPE");
            command.arg(&stream);
            match self
                .run_one::<String>(&command, "reading the stream's type")
                .await
            {
                Ok(kind) if kind == "stream" || kind == "none" => {}
                Ok(kind) => problems.push(format!(
                    "sink {name}: key {stream:?} holds a {kind}, not a stream: set \
                     sinks.{name}.stream to another key, or delete that key"
                )),
                Err(e) => problems.push(format!("sink {name}: {}", error_text(e))),
            }
        }
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        // Managed services often refuse CONFIG: then there is nothing to say.
        if let Ok(setting) = self.run_one::<Vec<String>>(&command, "CONFIG GET").await {
            if let Some(policy) = setting.get(1).filter(|p| p.starts_with("allkeys")) {
                problems.push(format!(
                    "sink {name}: Redis evicts keys under memory pressure (maxmemory-policy \
                     {policy}), streams included: events would vanish. Set maxmemory-policy \
                     to noeviction (or a volatile-* policy)"
                ));
            }
        }
        problems
    }
}

fn error_text(error: SinkError) -> String {
    match error {
        SinkError::Retryable(text) | SinkError::Permanent(text) => text,
    }
}

/// A Redis error as the relay treats it, from its code (never from its text).
fn classify(sink: &str, error: &RedisError, what: &str) -> SinkError {
    let context = format!("{what}: {error}");
    if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
        return SinkError::Retryable(context);
    }
    let refused_login = error.kind() == redis::ErrorKind::AuthenticationFailed;
    match error.code() {
        _ if refused_login => wrong_login(sink, &context),
        Some("NOAUTH" | "WRONGPASS") => wrong_login(sink, &context),
        Some("NOPERM") => SinkError::Permanent(format!(
            "{context}: the Redis user needs XADD, XRANGE and XINFO on the streams (ACL)"
        )),
        Some("WRONGTYPE") => SinkError::Permanent(format!(
            "{context}: a key the stream template names holds another type: change \
             sinks.{sink}.stream or delete that key"
        )),
        Some("MOVED" | "ASK" | "CROSSSLOT" | "CLUSTERDOWN") => SinkError::Permanent(format!(
            "{context}: Redis Cluster is not supported: point url at a single Redis"
        )),
        Some("OOM") => SinkError::Retryable(format!(
            "{context}: Redis is out of memory (maxmemory): trim the streams (maxlen) or give \
             Redis memory; the batch is retried"
        )),
        _ => SinkError::Retryable(context),
    }
}

/// A login Redis refused (a wrong password or user, or none where one is needed): the
/// relay stops with the fix rather than retrying forever.
fn wrong_login(sink: &str, context: &str) -> SinkError {
    SinkError::Permanent(format!(
        "{context}: set the password (sinks.{sink}.password_file) and the user (in url)"
    ))
}

#[async_trait]
impl Sink for RedisSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        let Some(stream) = self.settings.stream.as_static().map(str::to_owned) else {
            self.connect().await?;
            return Ok(None);
        };
        let mut command = redis::cmd("EXISTS");
        command.arg(&stream);
        let exists: bool = self.run_one(&command, "looking for the stream").await?;
        if !exists {
            return Ok(None);
        }
        let mut command = redis::cmd("XINFO");
        command.arg("STREAM").arg(&stream);
        let info: redis::streams::StreamInfoStreamReply = self
            .run_one(&command, "reading the stream's last id")
            .await?;
        Ok(position_of(&info.last_generated_id))
    }

    async fn send(&mut self, batch: &[Event], states: &mut [EventState]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        let mut sent: Vec<(usize, String, String)> = Vec::new();
        for (index, event) in batch.iter().enumerate() {
            if states[index].is_settled() {
                continue;
            }
            self.stream_buf.clear();
            self.settings.stream.render(event, &mut self.stream_buf);
            let fields = entry::fields(event, self.settings.format, &mut self.line);
            let size = entry::size(&fields);
            if size > self.settings.max_entry_bytes {
                states[index] = EventState::Rejected(format!(
                    "the stream entry is {size} bytes, over sinks.{}.max_entry_bytes ({})",
                    self.settings.name, self.settings.max_entry_bytes
                ));
                continue;
            }
            let id = entry_id(event.position);
            let command = pipe.cmd("XADD").arg(&self.stream_buf);
            if let Some(maxlen) = self.settings.maxlen {
                command.arg("MAXLEN").arg("~").arg(maxlen);
            }
            command.arg(&id);
            for (name, value) in &fields {
                command.arg(name.as_ref()).arg(*value);
            }
            sent.push((index, self.stream_buf.clone(), id));
        }
        if sent.is_empty() {
            return Ok(());
        }
        let results: Vec<RedisResult<redis::Value>> =
            self.run(&pipe, "adding the batch's entries").await?;
        let mut refused = Vec::new();
        let mut failed = None;
        for ((index, stream, id), result) in sent.into_iter().zip(results) {
            match result {
                Ok(_) => states[index] = EventState::Acked,
                Err(e) if matches!(e.code(), None | Some("ERR")) => refused.push(Refused {
                    index,
                    stream,
                    id,
                    reason: e.to_string(),
                }),
                Err(e) => {
                    failed.get_or_insert_with(|| classify(&self.settings.name, &e, "XADD"));
                }
            }
        }
        if !refused.is_empty() {
            self.judge_refused(batch, states, refused).await?;
        }
        failed.map_or(Ok(()), Err)
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        self.connection = None;
        Ok(())
    }
}
