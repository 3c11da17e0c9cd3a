//! Our own replication connection (released tokio-postgres cannot speak the replication
//! protocol): TCP or Unix socket, optional TLS, trust / cleartext / md5 / SCRAM-SHA-256
//! authentication, simple queries, and START_REPLICATION. Streaming splits the connection in
//! two: a [`ReplicationStream`] that the reader drains and a [`StatusWriter`] that sends
//! standby status updates on its own timer, so a stalled reader never trips
//! `wal_sender_timeout`.

use super::coalesce::CoalescingReader;
use super::status::StatusWriter;
use super::stream::ReplicationStream;
use super::wire::{self, BackendMessage};
use crate::config::{ConnectParams, Host, SslMode};
use crate::sql;
use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{
    ErrorFields, ErrorResponseBody, Message, NoticeResponseBody,
};
use postgres_protocol::message::frontend;
use sinks::Lsn;
use std::fmt;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{info, warn};

use outbox_relay_sinks as sinks;

/// How much the receive buffer grows by when it runs short: large reads, few syscalls.
pub(super) const READ_CHUNK: usize = 256 * 1024;

/// The receive buffer grows only when less than this is free. Events keep slices of the
/// buffer alive, so `BytesMut::reserve` cannot reuse it and allocates a fresh one: reserving
/// `READ_CHUNK` before every read allocated 256 KiB per read, and a relay that keeps up with
/// the server reads a few KiB at a time. Now one allocation serves many reads.
pub(super) const MIN_READ: usize = 64 * 1024;

/// A failure on the replication connection, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to PostgreSQL at {target}: {source}; check source.url and that the server is running and reachable")]
    Connect { target: String, source: io::Error },
    #[error("{0}")]
    Server(ServerError),
    #[error("the connection to PostgreSQL failed: {0}")]
    Io(#[from] io::Error),
    #[error("TLS with PostgreSQL failed: {0}")]
    Tls(String),
    #[error("unexpected message from PostgreSQL: {0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
}

impl SourceError {
    /// Whether the server could not find the publication while decoding: it reads each
    /// change with the publication as it was at that change's position.
    pub fn is_missing_publication(&self) -> bool {
        matches!(self, SourceError::Server(e) if e.code == "42704" && e.message.contains("publication"))
    }
}

/// An ErrorResponse from the server.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    pub(super) fn parse(body: &ErrorResponseBody) -> ServerError {
        Self::from_fields(body.fields())
    }

    pub(super) fn from_fields(mut fields: ErrorFields) -> ServerError {
        use fallible_iterator::FallibleIterator;
        let mut err = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'S' => err.severity = value,
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        err
    }

    /// Logs a notice the server sent: never dropped unseen.
    fn log_notice(body: &NoticeResponseBody) {
        Self::from_fields(body.fields()).log_as_notice();
    }

    pub(super) fn log_as_notice(&self) {
        if self.severity == "WARNING" {
            warn!(code = %self.code, "{self}");
        } else {
            info!(code = %self.code, "{self}");
        }
    }

    /// Our advice for the errors users meet when setting up a relay.
    fn advice(&self) -> Option<&'static str> {
        let m = self.message.as_str();
        Some(match self.code.as_str() {
            "28P01" => "check the password in source.url or source.password_file",
            "28000" => "allow this user and database in pg_hba.conf, or fix the user in source.url",
            "42501" if m.contains("replication") || m.contains("walsender") => {
                "grant the role REPLICATION (ALTER ROLE ... WITH REPLICATION; see migrations/; on Amazon \
                 RDS or Aurora, GRANT rds_replication TO the role; on Google Cloud SQL or Azure \
                 flexible server, ALTER ROLE ... WITH REPLICATION as a member of cloudsqlsuperuser \
                 or azure_pg_admin)"
            }
            "55000" if m.contains("wal_level") => {
                "set wal_level = logical in postgresql.conf and restart PostgreSQL"
            }
            "42704" if m.contains("publication") => {
                "create it with `outbox-relay init`, or fix source.publication"
            }
            "42704" if m.contains("slot") => {
                "create it with `outbox-relay init`, or set source.create_slot = true"
            }
            "55006" => "another relay is streaming from this slot; only one may stream at a time",
            "53400" => "raise max_replication_slots / max_wal_senders in postgresql.conf",
            "3D000" => "fix the database name in source.url",
            _ => return None,
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL said: {} ({} {})",
            self.message, self.severity, self.code
        )?;
        if let Some(detail) = &self.detail {
            write!(f, "; {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        if let Some(advice) = self.advice() {
            write!(f, " -> {advice}")?;
        }
        Ok(())
    }
}

pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An authenticated connection in `replication=database` mode, before streaming.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    /// How the stream reads once replication starts.
    coalescing: CoalescingReader,
    buf: BytesMut,
    out: BytesMut,
}

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub wal_position: Lsn,
}

impl ReplicationConnection {
    pub async fn connect(params: &ConnectParams) -> Result<Self, SourceError> {
        let target = params.to_string();
        let connect_error = |source| SourceError::Connect {
            target: target.clone(),
            source,
        };
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "timed out");
        let (io, coalescing): (Box<dyn Io>, _) = match &params.host {
            #[cfg(unix)]
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", params.port));
                let stream = tokio::time::timeout(
                    params.connect_timeout,
                    tokio::net::UnixStream::connect(path),
                )
                .await
                .map_err(|_| connect_error(timed_out()))?
                .map_err(connect_error)?;
                (Box::new(stream), CoalescingReader::plain())
            }
            #[cfg(not(unix))]
            Host::Unix(_) => {
                return Err(SourceError::Config(
                    "Unix sockets need a Unix system".into(),
                ))
            }
            Host::Tcp(host) => {
                let stream = tokio::time::timeout(
                    params.connect_timeout,
                    TcpStream::connect((host.as_str(), params.port)),
                )
                .await
                .map_err(|_| connect_error(timed_out()))?
                .map_err(connect_error)?;
                stream.set_nodelay(true)?;
                #[cfg(target_os = "linux")]
                if let Some(timeout) = params.tcp_user_timeout {
                    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(timeout))?;
                }
                let coalescing = CoalescingReader::for_tcp(&stream);
                (negotiate_tls(stream, host, params).await?, coalescing)
            }
        };
        let mut conn = ReplicationConnection {
            io,
            coalescing,
            buf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::new(),
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), SourceError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            // pgoutput text values are converted to the client encoding: ask for UTF-8.
            ("client_encoding", "UTF8"),
            // Values are rendered by the server's output functions, which follow these
            // settings: pin the forms the mapper parses, whatever the database or role sets
            // (as PostgreSQL's own replication client does).
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            // A bytea payload arrives as `\x` and hex digits, the form the mapper decodes.
            ("bytea_output", "hex"),
        ];
        frontend::startup_message(startup.iter().copied(), &mut self.out)?;
        self.flush().await?;
        self.authenticate(params).await?;
        let mut sql_ascii = false;
        loop {
            match self.read_message().await? {
                BackendMessage::Other(Message::ParameterStatus(status))
                    if status.name().ok() == Some("server_encoding") =>
                {
                    sql_ascii = status.value().ok() == Some("SQL_ASCII");
                }
                BackendMessage::Other(Message::ReadyForQuery(_)) => break,
                BackendMessage::Other(Message::ErrorResponse(body)) => {
                    return Err(SourceError::Server(ServerError::parse(&body)))
                }
                _ => {}
            }
        }
        // A SQL_ASCII database holds bytes in no known encoding, which the server refuses to
        // convert to UTF-8: the walsender would fail on the first non-ASCII byte, on every
        // reconnect. Take them as they are; the mapper dead-letters a value that is not
        // UTF-8, with its exact bytes.
        if sql_ascii {
            self.simple_query("SET client_encoding = 'SQL_ASCII'")
                .await?;
        }
        Ok(())
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), SourceError> {
        let password = || {
            params
                .password
                .as_ref()
                .map(|p| p.expose().as_bytes().to_vec())
                .ok_or_else(|| {
                    SourceError::Config(format!(
                    "PostgreSQL at {params} asks for a password but none is configured: put it \
                     in source.url or source.password_file"
                ))
                })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                BackendMessage::Other(message) => match message {
                    Message::AuthenticationOk => return Ok(()),
                    Message::AuthenticationCleartextPassword => {
                        frontend::password_message(&password()?, &mut self.out)?;
                    }
                    Message::AuthenticationMd5Password(body) => {
                        let hash = postgres_protocol::authentication::md5_hash(
                            params.user.as_bytes(),
                            &password()?,
                            body.salt(),
                        );
                        frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    }
                    Message::AuthenticationSasl(body) => {
                        use fallible_iterator::FallibleIterator;
                        let mechanisms: Vec<String> =
                            body.mechanisms().map(|m| Ok(m.to_owned())).collect().map_err(SourceError::Io)?;
                        if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(SourceError::Config(format!(
                                "PostgreSQL offers only SASL mechanisms {mechanisms:?}; outbox-relay supports SCRAM-SHA-256"
                            )));
                        }
                        let client = ScramSha256::new(&password()?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, client.message(), &mut self.out)?;
                        scram = Some(client);
                    }
                    Message::AuthenticationSaslContinue(body) => {
                        let client = scram.as_mut().ok_or_else(|| SourceError::Protocol("SASL continue before SASL start".into()))?;
                        client.update(body.data()).map_err(|e| SourceError::Protocol(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(client.message(), &mut self.out)?;
                    }
                    Message::AuthenticationSaslFinal(body) => {
                        let client = scram.as_mut().ok_or_else(|| SourceError::Protocol("SASL final before SASL start".into()))?;
                        client.finish(body.data()).map_err(|e| {
                            SourceError::Protocol(format!("SCRAM server signature did not verify: {e}"))
                        })?;
                        continue;
                    }
                    Message::ErrorResponse(body) => return Err(SourceError::Server(ServerError::parse(&body))),
                    Message::NoticeResponse(body) => {
                        ServerError::log_notice(&body);
                        continue;
                    }
                    Message::ParameterStatus(_) => continue,
                    _ => {
                        return Err(SourceError::Config(
                            "PostgreSQL asks for an authentication method outbox-relay does not support \
                             (GSSAPI/SSPI/Kerberos): use scram-sha-256, md5, password or trust in pg_hba.conf"
                                .into(),
                        ))
                    }
                },
                _ => return Err(SourceError::Protocol("CopyData during authentication".into())),
            }
            self.flush().await?;
        }
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        self.out.clear();
        Ok(())
    }

    async fn read_message(&mut self) -> Result<BackendMessage, SourceError> {
        loop {
            if let Some(message) = wire::parse_backend(&mut self.buf)? {
                return Ok(message);
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(SourceError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs one simple-protocol command and returns its rows as text.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                BackendMessage::Other(Message::DataRow(row)) => {
                    use fallible_iterator::FallibleIterator;
                    let buffer = row.buffer();
                    let values = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())))
                        .collect()
                        .map_err(SourceError::Io)?;
                    rows.push(values);
                }
                BackendMessage::Other(Message::ErrorResponse(body)) => {
                    error = Some(ServerError::parse(&body));
                }
                BackendMessage::Other(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(SourceError::Server(e)),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// Creates a pgoutput slot (a failover slot if asked, PostgreSQL 17+) and exports its
    /// snapshot: the snapshot sees exactly what committed before the slot's consistent point.
    /// It stays usable (with `SET TRANSACTION SNAPSHOT`) until this connection runs another
    /// command or closes.
    pub async fn create_slot_exporting_snapshot(
        &mut self,
        slot: &str,
        failover: bool,
    ) -> Result<(Lsn, String), SourceError> {
        // The option list is PostgreSQL 15+ syntax; the keyword form works on every version.
        let options = if failover {
            "(SNAPSHOT 'export', FAILOVER true)"
        } else {
            "EXPORT_SNAPSHOT"
        };
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {options}",
                sql::ident(slot)
            ))
            .await?;
        let row = rows.first().ok_or_else(|| {
            SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = field(1).parse().map_err(SourceError::Protocol)?;
        Ok((consistent_point, field(2)))
    }

    /// Makes an existing slot a failover slot (PostgreSQL 17+), which standbys with
    /// `sync_replication_slots = on` then copy.
    pub async fn enable_failover(&mut self, slot: &str) -> Result<(), SourceError> {
        self.simple_query(&format!(
            "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
            sql::ident(slot)
        ))
        .await
        .map(drop)
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, SourceError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemInfo {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or_default(),
            wal_position: field(2).parse().map_err(SourceError::Protocol)?,
        })
    }

    /// Starts pgoutput streaming from the slot's confirmed position and splits the connection.
    pub async fn start_replication(
        mut self,
        slot: &str,
        publication: &str,
    ) -> Result<(ReplicationStream, StatusWriter), SourceError> {
        // publication_names is a string holding a list of identifiers.
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', \
             publication_names {}, messages 'true')",
            sql::ident(slot),
            sql::literal(&sql::ident(publication))
        );
        frontend::query(&command, &mut self.out)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                BackendMessage::CopyBothResponse => break,
                BackendMessage::Other(Message::ErrorResponse(body)) => {
                    return Err(SourceError::Server(ServerError::parse(&body)))
                }
                BackendMessage::Other(Message::NoticeResponse(body)) => {
                    ServerError::log_notice(&body)
                }
                _ => return Err(SourceError::Protocol("expected CopyBothResponse".into())),
            }
        }
        let (reader, writer) = tokio::io::split(self.io);
        Ok((
            ReplicationStream::new(reader, self.coalescing, self.buf),
            StatusWriter::new(writer),
        ))
    }
}

async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    params: &ConnectParams,
) -> Result<Box<dyn Io>, SourceError> {
    let Some(config) = crate::tls::client_config(params.sslmode, params.sslrootcert.as_deref())
        .map_err(|e| SourceError::Config(format!("{e:#}")))?
    else {
        return Ok(Box::new(tcp));
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(host).map_err(|e| SourceError::Config(format!("{e:#}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    SourceError::Tls(format!(
                        "{e} (sslmode={}): check sslrootcert and that the server certificate matches the host",
                        sslmode_name(params.sslmode)
                    ))
                })?;
            Ok(Box::new(tls))
        }
        b'N' if params.sslmode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(SourceError::Tls(format!(
            "the server does not accept TLS but sslmode={}: enable ssl on the server or use sslmode=prefer",
            sslmode_name(params.sslmode)
        ))),
        other => Err(SourceError::Protocol(format!("unexpected answer {other:?} to SSLRequest"))),
    }
}

fn sslmode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// The name of a backend message, for errors.
pub(super) fn message_name(message: &Message) -> &'static str {
    match message {
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::RowDescription(_) => "RowDescription",
        Message::DataRow(_) => "DataRow",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        _ => "backend message",
    }
}
