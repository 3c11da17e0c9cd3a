//! A redis-server per test (Debian's, installed by scripts/install-test-deps.sh) on a free
//! port, in its own directory, with every write fsynced to its append-only file so that a
//! restart keeps what it acknowledged; killed by the kernel if the test dies.

use super::{free_port, wait_until, WAIT};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Redis {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// One stream entry: its id and its fields.
pub struct Entry {
    pub id: String,
    pub fields: std::collections::HashMap<String, Vec<u8>>,
}

impl Entry {
    pub fn text(&self, field: &str) -> String {
        String::from_utf8_lossy(&self.fields[field]).into_owned()
    }

    /// The `event` field as JSON (the CloudEvents envelope by default).
    pub fn event(&self) -> serde_json::Value {
        serde_json::from_slice(&self.fields["event"]).unwrap()
    }
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = launch(dir.path(), port, "");
        let redis = Redis { child, port, dir };
        redis.wait_ready();
        redis
    }

    /// Stops it (SIGTERM, it saves and exits) and starts it again on the same port and files.
    pub fn restart(&mut self) {
        self.signal("-TERM");
        self.child.wait().unwrap();
        self.child = launch(self.dir.path(), self.port, "");
        self.wait_ready();
    }

    /// Stops it and starts it again with `config` (redis.conf lines) added.
    pub fn restart_with(&mut self, config: &str) {
        self.signal("-TERM");
        self.child.wait().unwrap();
        self.child = launch(self.dir.path(), self.port, config);
        self.wait_ready();
    }

    pub fn signal(&self, name: &str) {
        Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn wait_ready(&self) {
        let ready = wait_until(WAIT, || {
            redis::Client::open(self.url())
                .and_then(|client| client.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        assert!(ready, "redis-server did not start:\n{}", self.log());
    }

    /// Every entry of `stream`, in order (none when it does not exist).
    pub fn entries(&self, stream: &str) -> Vec<Entry> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.connection())
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|entry| Entry {
                id: entry.id.clone(),
                fields: entry
                    .map
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.clone(),
                            redis::from_redis_value_ref::<Vec<u8>>(value).unwrap(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    /// Runs one command, for a test's own writes and settings.
    pub fn command(&self, args: &[&str]) -> redis::Value {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query(&mut self.connection()).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(dir: &Path, port: u16, config: &str) -> Child {
    let conf = dir.join("redis.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\nappendonly yes\n\
             appendfsync always\nsave \"\"\ndaemonize no\n{config}\n",
            dir.display(),
            dir.join("redis.log").display()
        ),
    )
    .unwrap();
    let mut command = Command::new("redis-server");
    command
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::dies_with_the_test(&mut command)
        .spawn()
        .expect("redis-server is installed by scripts/install-test-deps.sh")
}
