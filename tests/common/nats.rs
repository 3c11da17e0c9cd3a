//! A nats-server with JetStream per test (Debian's, installed by
//! scripts/install-test-deps.sh) on a free port, storing in its own directory so that a
//! restart keeps its streams; killed by the kernel if the test dies.

use super::{free_port, wait_until, WAIT};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Nats {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    config: String,
    runtime: tokio::runtime::Runtime,
    /// How the test's own client logs in and trusts the server.
    access: Access,
}

/// How the test's own client connects: a user and password or a token, and a CA for TLS.
#[derive(Default, Clone)]
pub struct Access {
    pub user: Option<(String, String)>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// One stored message: its subject, headers and body.
pub struct Message {
    pub subject: String,
    pub headers: std::collections::HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Message {
    /// The body as JSON (the CloudEvents envelope by default).
    pub fn event(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Nats {
    pub fn start() -> Nats {
        Nats::start_with("")
    }

    /// With `config` (nats-server configuration lines, e.g. `max_payload: 4096`).
    pub fn start_with(config: &str) -> Nats {
        Nats::start_secured(config, Access::default())
    }

    /// With `config` asking for a login or TLS, which the test's client meets with `access`.
    pub fn start_secured(config: &str, access: Access) -> Nats {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = launch(dir.path(), port, config);
        let nats = Nats {
            child,
            port,
            dir,
            config: config.to_owned(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            access,
        };
        nats.wait_ready();
        nats
    }

    /// Stops it (SIGTERM) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.signal("-TERM");
        self.child.wait().unwrap();
        self.child = launch(self.dir.path(), self.port, &self.config);
        self.wait_ready();
    }

    pub fn signal(&self, name: &str) {
        Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The test's own client.
    async fn client(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some((user, password)) = &self.access.user {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.access.token {
            options = options.token(token.clone());
        }
        if let Some(ca_file) = &self.access.ca_file {
            options = options
                .add_root_certificates(ca_file.clone())
                .require_tls(true);
        }
        options.connect(self.url()).await
    }

    fn jetstream(&self) -> async_nats::jetstream::Context {
        self.runtime.block_on(async {
            let client = self.client().await.unwrap();
            async_nats::jetstream::new(client)
        })
    }

    fn wait_ready(&self) {
        let ready = wait_until(WAIT, || {
            self.runtime
                .block_on(async {
                    let client = self.client().await.ok()?;
                    client.request("$JS.API.INFO", "".into()).await.ok()
                })
                .is_some()
        });
        assert!(ready, "nats-server did not start:\n{}", self.log());
    }

    /// Creates the stream `name` capturing `subjects`, with the default duplicate window.
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        self.create_stream_with_window(name, subjects, std::time::Duration::ZERO);
    }

    /// Creates the stream `name` capturing `subjects` with duplicate window `window` (zero:
    /// the server's default, two minutes).
    pub fn create_stream_with_window(
        &self,
        name: &str,
        subjects: &[&str],
        window: std::time::Duration,
    ) {
        let jetstream = self.jetstream();
        self.runtime.block_on(async {
            jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.to_owned(),
                    subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
                    duplicate_window: window,
                    ..Default::default()
                })
                .await
                .unwrap();
        });
    }

    /// Every message of stream `name`, in order.
    pub fn messages(&self, name: &str) -> Vec<Message> {
        let jetstream = self.jetstream();
        self.runtime.block_on(async {
            let mut stream = jetstream.get_stream(name).await.unwrap();
            let last = stream.info().await.unwrap().state.last_sequence;
            let mut messages = Vec::new();
            for sequence in 1..=last {
                let Ok(message) = stream.get_raw_message(sequence).await else {
                    continue;
                };
                messages.push(Message {
                    subject: message.subject.to_string(),
                    headers: message
                        .headers
                        .iter()
                        .map(|(name, values)| (name.to_string(), values[0].as_str().to_owned()))
                        .collect(),
                    body: message.payload.to_vec(),
                });
            }
            messages
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch(dir: &Path, port: u16, config: &str) -> Child {
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\nlog_file: \"{}\"\n{config}\n",
            dir.join("store").display(),
            dir.join("nats.log").display()
        ),
    )
    .unwrap();
    let binary = if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    };
    let mut command = Command::new(binary);
    command
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    super::dies_with_the_test(&mut command)
        .spawn()
        .expect("nats-server is installed by scripts/install-test-deps.sh")
}
