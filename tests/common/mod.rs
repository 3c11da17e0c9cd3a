//! Test support: a throwaway PostgreSQL cluster per test (initdb into a temp dir,
//! `wal_level=logical`, a free port, built from the server binaries on the machine), and the
//! real relay binary run as a child process, so tests exercise what users run. What every
//! test file would otherwise set up again lives here once: the relay config template
//! ([`ConfigFile`]), the scenario builder ([`scenario`]: cluster, outbox, config, `init`,
//! `run`), the one [`WAIT`] and [`dead_letters`].
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod aws;
pub mod aws_proxy;
pub mod certs;
pub mod kafka;
pub mod nats;
pub mod partition_proxy;
pub mod rabbitmq;
pub mod redis;
pub mod tls_proxy;
pub mod webhook;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The directory of PostgreSQL's server binaries: `$PG_BIN`, else the newest
/// /usr/lib/postgresql/*/bin, else `pg_config --bindir`.
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Some((_, dir)) = packaged_servers().pop() {
        return dir;
    }
    let out = Command::new("pg_config").arg("--bindir").output().expect(
        "PostgreSQL server binaries not found: install postgresql (initdb, pg_ctl) or set PG_BIN",
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The server binaries under /usr/lib/postgresql, by major version, oldest first.
fn packaged_servers() -> Vec<(u32, PathBuf)> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
}

/// Server binaries older than PostgreSQL 17, whatever `PG_BIN` says: for what only such a
/// server shows (no failover slots).
pub fn pg_bin_before_17() -> PathBuf {
    packaged_servers()
        .into_iter()
        .rfind(|(version, _)| *version < 17)
        .map(|(_, dir)| dir)
        .expect("no PostgreSQL older than 17 under /usr/lib/postgresql: install postgresql-15")
}

/// PostgreSQL 17's server binaries, for failover slots: `$PG17_BIN`, else Debian's
/// /usr/lib/postgresql/17/bin, else what `scripts/install-test-deps.sh` installs.
pub fn pg17_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG17_BIN") {
        return PathBuf::from(dir);
    }
    [
        "/usr/lib/postgresql/17/bin",
        "/opt/outbox-relay-test/postgresql-17/bin",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|dir| dir.join("initdb").exists())
    .expect(
        "PostgreSQL 17 server binaries not found: run scripts/install-test-deps.sh, \
             or set PG17_BIN",
    )
}

pub fn is_root() -> bool {
    extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

/// Runs a PostgreSQL binary from `bin` as the `postgres` user when we are root (initdb
/// refuses root). A relocatable build's own libpq goes first on the library path: its server
/// loads libpqwalreceiver, which would otherwise find the system's older libpq.
fn pg_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    let mut command = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    };
    let lib = bin.join("../lib");
    if lib.join("libpq.so.5").exists() {
        command.env("LD_LIBRARY_PATH", lib);
    }
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn check(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `pg_ctl -D data` with the binaries in `bin`, to which the caller adds the action.
fn pg_ctl(bin: &Path, data: &Path) -> Command {
    let mut command = pg_command(bin, "pg_ctl");
    command.arg("-D").arg(data);
    command
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temp dir for a cluster, owned by `postgres` when we are root (the server refuses root).
fn cluster_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("outbox-relay-pg")
        .tempdir()
        .unwrap();
    if is_root() {
        check(
            Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .output()
                .unwrap(),
            "chown",
        );
    }
    dir
}

/// Options for a throwaway cluster.
pub struct ClusterOptions {
    pub wal_level: &'static str,
    /// Lines put in front of pg_hba.conf (the rest is trust for local connections).
    pub hba: Vec<String>,
    /// The server binaries: [`pg_bin`] by default.
    pub bin: PathBuf,
    /// More postgresql.conf lines.
    pub settings: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            hba: Vec::new(),
            bin: pg_bin(),
            settings: Vec::new(),
        }
    }
}

/// A PostgreSQL cluster that lives as long as the value.
pub struct PgCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The server binaries it runs.
    pub bin: PathBuf,
}

impl PgCluster {
    pub fn start() -> Self {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(options: ClusterOptions) -> Self {
        let dir = cluster_dir();
        let data = dir.path().join("data");
        check(
            pg_command(&options.bin, "initdb")
                .args(["-D"])
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-N",
                ])
                .output()
                .unwrap(),
            "initdb",
        );
        let mut hba = options.hba.join("\n");
        hba.push_str("\nlocal all all trust\nhost all all 127.0.0.1/32 trust\nlocal replication all trust\nhost replication all 127.0.0.1/32 trust\n");
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        // fsync off is safe for process crashes (all tests need). synchronous_commit stays
        // on: with it off an immediate shutdown loses the last commits, rows and all.
        let mut settings = format!(
            "wal_level = {}\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             listen_addresses = '127.0.0.1'\nfsync = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nwal_sender_timeout = 60s\n",
            options.wal_level
        );
        for line in &options.settings {
            settings.push_str(line);
            settings.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), settings).unwrap();
        Self::start_on_a_free_port(dir, options.bin)
    }

    /// A physical streaming standby of `primary` (`pg_basebackup -R`), started on a port of
    /// its own: what a failover promotes.
    pub fn start_standby_of(primary: &PgCluster) -> Self {
        let dir = cluster_dir();
        check(
            pg_command(&primary.bin, "pg_basebackup")
                .arg("-D")
                .arg(dir.path().join("data"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
                .args(["-c", "fast", "-p", &primary.port.to_string()])
                .output()
                .unwrap(),
            "pg_basebackup",
        );
        Self::start_on_a_free_port(dir, primary.bin.clone())
    }

    /// A standby that keeps copies of the primary's failover slots (PostgreSQL 17+): it
    /// streams through the physical slot `physical_slot`, which this creates on the primary,
    /// with `hot_standby_feedback` and `sync_replication_slots` on.
    pub fn start_slot_syncing_standby_of(primary: &PgCluster, physical_slot: &str) -> Self {
        primary.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{physical_slot}')"
        ));
        let dir = cluster_dir();
        let data = dir.path().join("data");
        check(
            pg_command(&primary.bin, "pg_basebackup")
                .arg("-D")
                .arg(&data)
                // The database name in the connection string goes into primary_conninfo,
                // where the slot synchronization worker needs it.
                .arg(format!(
                    "--dbname=host=127.0.0.1 port={} user=postgres dbname=postgres",
                    primary.port
                ))
                .args(["-X", "stream", "-R", "-c", "fast", "-S", physical_slot])
                .output()
                .unwrap(),
            "pg_basebackup",
        );
        let conf = data.join("postgresql.auto.conf");
        let mut settings = std::fs::read_to_string(&conf).unwrap();
        settings.push_str("hot_standby_feedback = on\nsync_replication_slots = on\n");
        std::fs::write(&conf, settings).unwrap();
        Self::start_on_a_free_port(dir, primary.bin.clone())
    }

    /// Starts the cluster in `dir`/data on a free port, after appending the port and the
    /// socket directory to its postgresql.auto.conf (later lines win).
    fn start_on_a_free_port(dir: tempfile::TempDir, bin: PathBuf) -> Self {
        let data = dir.path().join("data");
        let conf = data.join("postgresql.auto.conf");
        let base = std::fs::read_to_string(&conf).unwrap_or_default();
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let socket_dir = dir.path().display();
            let settings =
                format!("{base}port = {port}\nunix_socket_directories = '{socket_dir}'\n");
            std::fs::write(&conf, settings).unwrap();
            let started = pg_ctl(&bin, &data)
                .args(["-w", "-t", "30", "-l"])
                .arg(dir.path().join("server.log"))
                .arg("start")
                .output()
                .unwrap();
            if started.status.success() {
                return PgCluster { dir, port, bin };
            }
            last_error = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `pg_ctl -D data` for this cluster, to which the caller adds the action.
    fn pg_ctl(&self) -> Command {
        pg_ctl(&self.bin, &self.data())
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        check(
            self.pg_ctl().args(["-w", "promote"]).output().unwrap(),
            "pg_ctl promote",
        );
    }

    /// Stops the server ("fast" or "immediate"), leaving it stopped.
    pub fn stop(&self, mode: &str) {
        check(
            self.pg_ctl()
                .args(["-w", "-m", mode, "stop"])
                .output()
                .unwrap(),
            "pg_ctl stop",
        );
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL with psql and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .unwrap();
        check(out, &format!("psql {sql}")).trim().to_owned()
    }

    /// A tokio-postgres client for writers that need concurrency or open transactions.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// Stops the server ("fast" or "immediate") and starts it again on the same port.
    pub fn restart(&self, mode: &str) {
        self.stop(mode);
        self.start_stopped();
    }

    /// Starts a server that `stop` stopped, on the same port.
    pub fn start_stopped(&self) {
        check(
            self.pg_ctl()
                .args(["-w", "-l"])
                .arg(self.dir.path().join("server.log"))
                .arg("start")
                .output()
                .unwrap(),
            "pg_ctl start",
        );
    }

    /// Creates the Debezium-layout outbox table.
    pub fn create_outbox(&self, table: &str) {
        self.psql(&debezium_outbox(table));
    }
}

/// The SQL that creates a Debezium-layout outbox table.
fn debezium_outbox(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
         aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, \
         payload jsonb NOT NULL)"
    )
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_ctl()
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The relay binary under test.
pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// How long a test waits for what must happen (an event, a dead letter, an exit) before it
/// fails: long enough for a loaded machine, never spent when things work.
pub const WAIT: Duration = Duration::from_secs(60);

/// GET `path` from the relay's HTTP endpoint on `port`: status code and body, or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_with(port, path, "").map(|(status, _, body)| (status, body))
}

/// Like [`http_get`] with extra request header lines (each ending in CRLF); also returns the
/// response's Content-Type.
pub fn http_get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let header = |wanted: &str| {
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(wanted)
                .then(|| value.trim().to_owned())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Some((status, header("content-type").unwrap_or_default(), body))
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut chunked: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size, rest) = chunked.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(rest.get(..size)?);
        chunked = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

/// A relay config as TOML text, the one template every test's config is written from: the
/// source on the test cluster with a short status interval, a short checkpoint interval, and
/// what the test adds to `[source]` and `[relay]` (a key it sets replaces the template's),
/// then its sink tables (see [`file_sink`]).
#[derive(Clone, Default)]
pub struct ConfigFile {
    source: String,
    relay: String,
    sinks: String,
}

impl ConfigFile {
    pub fn new() -> Self {
        Self::default()
    }

    /// More `[source]` lines.
    pub fn source(mut self, lines: &str) -> Self {
        self.source.push_str(lines);
        self.source.push('\n');
        self
    }

    /// More `[relay]` lines.
    pub fn relay(mut self, lines: &str) -> Self {
        self.relay.push_str(lines);
        self.relay.push('\n');
        self
    }

    /// More tables after `[relay]`: sinks (see [`file_sink`]), `[outbox.*]`, `[leader]`...
    pub fn sinks(mut self, tables: &str) -> Self {
        self.sinks.push_str(tables);
        self.sinks.push('\n');
        self
    }

    /// Writes the config for `pg` as `dir`/relay.toml and returns that path.
    pub fn write(&self, dir: &Path, pg: &PgCluster) -> PathBuf {
        let url = format!("url = \"{}\"", pg.url());
        let source = [url.as_str(), "status_interval = \"500ms\""];
        let relay = ["checkpoint_interval = \"100ms\""];
        let path = dir.join("relay.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\n{}{}\n[relay]\n{}{}\n{}",
                unless_set(&source, &self.source),
                self.source,
                unless_set(&relay, &self.relay),
                self.relay,
                self.sinks
            ),
        )
        .unwrap();
        path
    }
}

/// The template's `key = value` lines whose key `lines` do not set.
fn unless_set(template: &[&str], lines: &str) -> String {
    let key = |line: &str| line.split('=').next().unwrap_or_default().trim().to_owned();
    let set: Vec<String> = lines.lines().map(key).collect();
    template
        .iter()
        .filter(|line| !set.contains(&key(line)))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// A `[sinks.NAME]` table: a file sink writing to `path`, without fsync (tests survive
/// process crashes, which need none).
pub fn file_sink(name: &str, path: &Path) -> String {
    format!(
        "[sinks.{name}]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n",
        path.display()
    )
}

/// A cluster (no outbox) where role `app` logs in with the password "right" over
/// scram-sha-256, and a config in a temp dir beside a password file that holds a wrong one;
/// (cluster, dir, config, password file).
pub fn cluster_with_a_password() -> (PgCluster, tempfile::TempDir, PathBuf, PathBuf) {
    let pg = PgCluster::start_with(ClusterOptions {
        hba: vec!["host all app 127.0.0.1/32 scram-sha-256".into()],
        ..Default::default()
    });
    pg.psql("CREATE ROLE app LOGIN REPLICATION PASSWORD 'right'");
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "");
    let secret = dir.path().join("password");
    std::fs::write(&secret, "wrong\n").unwrap();
    (pg, dir, config, secret)
}

/// A config for one of several relays on one slot: leader election checked every
/// `interval`, the HTTP endpoint on `port` and the shared file sink at `events`; written
/// into `dir`.
pub fn sidecar_config(
    dir: &Path,
    pg: &PgCluster,
    events: &Path,
    port: u16,
    interval: &str,
) -> PathBuf {
    let tables = format!(
        "[leader]\ninterval = \"{interval}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{}",
        file_sink("file", events)
    );
    ConfigFile::new().sinks(&tables).write(dir, pg)
}

/// A config with more `[source]` lines and a file sink at `dir`/events.jsonl, written into
/// `dir`; returns (config, events).
pub fn write_config(dir: &Path, pg: &PgCluster, source: &str) -> (PathBuf, PathBuf) {
    let events = dir.join("events.jsonl");
    let config = ConfigFile::new()
        .source(source)
        .sinks(&file_sink("file", &events))
        .write(dir, pg);
    (config, events)
}

/// What most tests stand on: a cluster with a Debezium-layout outbox table, a relay config
/// (by default one file sink, at `events`) and `outbox-relay init` done. The relay's files
/// are in a directory inside the cluster's temp dir, so they live as long as the cluster:
/// a test may destructure the scenario and keep only what it uses.
pub struct Scenario {
    pub pg: PgCluster,
    /// The directory of the config (the relay writes its logs beside it).
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Where the default file sink writes (nothing is there with other sinks).
    pub events: PathBuf,
}

/// Config tables made from a scenario's directory: see [`ScenarioBuilder::sinks_in`].
type DirTables = Box<dyn FnOnce(&Path) -> String>;

/// Builds a [`Scenario`]: see [`scenario`].
pub struct ScenarioBuilder {
    cluster: ClusterOptions,
    /// The SQL that creates the outbox, then what else the test runs before `init`.
    sql: Vec<String>,
    config: ConfigFile,
    /// Tables that name files in the scenario's directory, made once it exists.
    tables_in_dir: Vec<DirTables>,
    file_sink: bool,
}

/// A scenario on a default cluster with the outbox `public.outbox` and a file sink; change
/// what the test needs, then [`ScenarioBuilder::init`] or [`ScenarioBuilder::start`].
pub fn scenario() -> ScenarioBuilder {
    ScenarioBuilder {
        cluster: ClusterOptions::default(),
        sql: vec![debezium_outbox("public.outbox")],
        config: ConfigFile::new(),
        tables_in_dir: Vec::new(),
        file_sink: true,
    }
}

impl ScenarioBuilder {
    pub fn cluster(mut self, options: ClusterOptions) -> Self {
        self.cluster = options;
        self
    }

    /// The outbox table to create (Debezium layout).
    pub fn outbox(mut self, table: &str) -> Self {
        self.sql[0] = debezium_outbox(table);
        self
    }

    /// The SQL that creates the outbox, for a layout other than Debezium's.
    pub fn outbox_sql(mut self, sql: &str) -> Self {
        self.sql[0] = sql.to_owned();
        self
    }

    /// More SQL, run after the outbox is created and before `init`.
    pub fn sql(mut self, sql: &str) -> Self {
        self.sql.push(sql.to_owned());
        self
    }

    /// More `[source]` lines.
    pub fn source(mut self, lines: &str) -> Self {
        self.config = self.config.source(lines);
        self
    }

    /// More `[relay]` lines.
    pub fn relay(mut self, lines: &str) -> Self {
        self.config = self.config.relay(lines);
        self
    }

    /// More tables after `[relay]` (`[outbox.*]`, `[leader]`...), beside the sinks.
    pub fn tables(mut self, tables: &str) -> Self {
        self.config = self.config.sinks(tables);
        self
    }

    /// Sink tables instead of the default file sink.
    pub fn sinks(mut self, tables: &str) -> Self {
        self.config = self.config.sinks(tables);
        self.file_sink = false;
        self
    }

    /// Sink tables instead of the default file sink, made from the scenario's directory
    /// (for file sinks of other names, schema directories...).
    pub fn sinks_in(mut self, tables: impl FnOnce(&Path) -> String + 'static) -> Self {
        self.tables_in_dir.push(Box::new(tables));
        self.file_sink = false;
        self
    }

    /// Starts the cluster, creates the outbox, writes the config and runs `init`.
    pub fn init(self) -> Scenario {
        let scenario = self.without_init();
        init(&scenario.config);
        scenario
    }

    /// Starts the cluster, creates the outbox and writes the config: for what the relay says
    /// before `init` (or instead of it).
    pub fn without_init(self) -> Scenario {
        let pg = PgCluster::start_with(self.cluster);
        for sql in &self.sql {
            pg.psql(sql);
        }
        let dir = pg.dir.path().join("relay");
        std::fs::create_dir(&dir).unwrap();
        let events = dir.join("events.jsonl");
        let mut config = self.config;
        if self.file_sink {
            config = config.sinks(&file_sink("file", &events));
        }
        for tables in self.tables_in_dir {
            config = config.sinks(&tables(&dir));
        }
        let config = config.write(&dir, &pg);
        Scenario {
            pg,
            dir,
            config,
            events,
        }
    }

    /// [`ScenarioBuilder::init`], then `outbox-relay run`.
    pub fn start(self) -> (Scenario, Relay) {
        self.start_with_env(&[])
    }

    /// [`ScenarioBuilder::start`] with extra environment variables for the relay.
    pub fn start_with_env(self, env: &[(&str, &str)]) -> (Scenario, Relay) {
        let scenario = self.init();
        let relay = Relay::start_with_env(&scenario.config, env);
        (scenario, relay)
    }
}

/// The dead letters in the relay's store in stream order, each as the values of `columns`
/// (SQL expressions over `outbox_relay.dead_letters`, comma-separated) joined by " | ".
pub fn dead_letters(pg: &PgCluster, columns: &str) -> Vec<String> {
    let json = pg.psql(&format!(
        "SELECT coalesce(json_agg(concat_ws(' | ', {columns}) \
         ORDER BY commit_lsn, event_index, id), '[]') FROM outbox_relay.dead_letters"
    ));
    serde_json::from_str(&json).unwrap()
}

/// A copy of the example `config/<name>` in `dir` (the relay's logs go beside its config).
pub fn copy_example(dir: &Path, name: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name),
        &config,
    )
    .unwrap();
    config
}

/// `outbox-relay check`: whether it passed, and what it printed (stdout, then stderr).
pub fn relay_check(config: &Path) -> (bool, String) {
    let out = relay_command(config, "check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `outbox-relay init`, which must succeed.
pub fn init(config: &Path) {
    let out = relay_command(config, "init");
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the relay with `args` after `--config config` (`dlq replay ID`, …).
pub fn relay_command_args(config: &Path, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs `outbox-relay dlq` with `args` and returns what it printed; fails the test, with
/// its standard error, unless it succeeds.
pub fn relay_dlq(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    let out = relay_command_args(config, &all);
    assert!(
        out.status.success(),
        "dlq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a one-shot relay command (`init`, `check`, `status`).
pub fn relay_command(config: &Path, command: &str) -> Output {
    relay_command_with_env(config, command, &[])
}

/// Like [`relay_command`], with extra environment variables (credentials, endpoints).
pub fn relay_command_with_env(config: &Path, command: &str, env: &[(&str, &str)]) -> Output {
    Command::new(relay_bin())
        .arg("--config")
        .arg(config)
        .arg(command)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `init`, then `check`, on `config` with `env`, and fails the test with their output
/// if either fails.
pub fn init_and_check(config: &Path, env: &[(&str, &str)]) {
    for command in ["init", "check"] {
        let out = relay_command_with_env(config, command, env);
        assert!(
            out.status.success(),
            "{command}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A running `outbox-relay run`.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Like [`Relay::start`], with extra environment variables (credentials, endpoints).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let run = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = config.with_extension(format!("run{run}.log"));
        // Stdout (the stdout sink's output) accumulates across restarts in one file.
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_extension("stdout.jsonl"))
            .unwrap();
        let child = Command::new(relay_bin())
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "outbox_relay=debug,info")
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Relay { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Asserts that the file sink's output at `events` holds `count` events within [`WAIT`].
    pub fn delivers(&self, events: &Path, count: usize) {
        let mut delivered = 0;
        assert!(
            wait_until(WAIT, || {
                delivered = read_events(events).len();
                delivered == count
            }),
            "{delivered} events delivered, not {count}; relay log:\n{}",
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends a signal (`-HUP`, `-STOP`...) to the relay.
    pub fn signal(&self, name: &str) {
        Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.wait(timeout)
    }

    /// Sends SIGTERM and asserts that the relay exits 0 within 10 s (drained, final
    /// checkpoint written).
    pub fn stops_cleanly(&mut self) {
        let status = self.terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "SIGTERM: {status:?}\n{}",
            self.log()
        );
    }

    /// Waits up to `timeout` for the relay to exit with a failure, as `why` says it should;
    /// returns its log. Panics, with the log, if it keeps running or exits 0.
    pub fn stops_with_failure(&mut self, timeout: Duration, why: &str) -> String {
        let status = self.wait(timeout);
        let log = self.log();
        assert!(
            status.is_some_and(|s| !s.success()),
            "run should stop ({why}), but {}\n{log}",
            match status {
                None => "it kept running".to_owned(),
                Some(s) => format!("it exited with {s}"),
            }
        );
        log
    }

    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `Relay::start` collects the stdout sink's output for `config`.
pub fn stdout_events_path(config: &Path) -> PathBuf {
    config.with_extension("stdout.jsonl")
}

/// The events in a file sink's output, parsed. Only newline-terminated lines count: a last
/// line without its newline is being written right now (or was torn by a kill -9, and the
/// sink cuts it off when it restarts).
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// The `data.seq` of every event in the file at `path`, in file order.
pub fn read_seqs(path: &Path) -> Vec<u64> {
    read_events(path)
        .iter()
        .map(|e| e["data"]["seq"].as_u64().unwrap())
        .collect()
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A server on a free 127.0.0.1 port, on a runtime of its own (the server stops when the
/// runtime is dropped): every accepted connection is handed to `handle` together with a
/// fresh connection to 127.0.0.1:`upstream`. The test proxies are built on it.
pub fn serve_forwarding<F, Fut>(upstream: u16, handle: F) -> (u16, tokio::runtime::Runtime)
where
    F: Fn(tokio::net::TcpStream, tokio::net::TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                if let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await {
                    handle(client, server).await;
                }
            });
        }
    });
    (port, runtime)
}

/// An outbox in Debezium's layout with a `headers` column, for the broker sinks' tests.
pub const OUTBOX_WITH_HEADERS: &str =
    "CREATE TABLE outbox (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
     aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, \
     payload jsonb NOT NULL, headers jsonb)";

/// Inserts `txs` transactions of 5 rows of `aggregate` into [`OUTBOX_WITH_HEADERS`], over
/// keys k0..k3, numbered from `first` (the payload's `n`), each with the header
/// `tenant: acme`.
pub fn insert_numbered(pg: &PgCluster, aggregate: &str, first: usize, txs: usize) {
    let mut sql = String::new();
    for tx in 0..txs {
        let from = first + tx * 5;
        sql.push_str(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             SELECT '{aggregate}', 'k' || (n % 4), 'Seq', jsonb_build_object('n', n), \
             '{{\"tenant\": \"acme\"}}' FROM generate_series({from}, {}) n;",
            from + 4
        ));
    }
    pg.psql(&sql);
}

/// Asserts that `events` (CloudEvents envelopes) hold `count` distinct ids, none twice, and
/// that each aggregate's `data.n` grow.
pub fn assert_once_in_order(events: &[serde_json::Value], count: usize) {
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), count);
    assert_eq!(events.len(), count, "an event arrived twice");
    let mut by_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for event in events {
        let key = format!("{}/{}", event["aggregatetype"], event["subject"]);
        by_key
            .entry(key)
            .or_default()
            .push(event["data"]["n"].as_u64().unwrap());
    }
    for (key, ns) in by_key {
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{key}: {ns:?}");
    }
}

/// `command` with the kernel told to kill it when the test's thread dies.
pub fn dies_with_the_test(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}
