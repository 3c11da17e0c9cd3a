//! TLS and password authentication against a real PostgreSQL, for both kinds of connection the
//! relay makes: the tokio-postgres SQL connections and its own replication connection (which
//! implements TLS, cleartext and md5 itself); and Unix sockets, which go without TLS. A local
//! CA is made at test time with the `openssl` CLI, and pg_hba.conf lets the TLS role in over
//! TLS only, so "it worked" proves that TLS was used rather than leaving it to guesswork.

mod common;

use common::certs::{make_ca, make_server_cert, KeyPair};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// What `check` prints when everything is ready.
const CHECK_OK: &str = "ok: configuration, database, publication, slot and privileges are ready";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The base64 body of the first PEM certificate in `text`, without line breaks.
fn first_pem_certificate(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)? + BEGIN.len();
    let end = start + text[start..].find(END)?;
    Some(text[start..end].split_whitespace().collect())
}

/// The certificate the server on `port` presents now, as seen by `openssl s_client`.
fn presented_certificate(port: u16) -> Option<String> {
    let out = Command::new("openssl")
        .args(["s_client", "-starttls", "postgres", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    first_pem_certificate(&stdout(&out))
}

/// `sslmode` (and `sslrootcert`) keys for `[source]`.
fn tls_keys(sslmode: &str, rootcert: Option<&Path>) -> String {
    let mut keys = format!("sslmode = \"{sslmode}\"\n");
    if let Some(path) = rootcert {
        keys.push_str(&format!("sslrootcert = \"{}\"\n", path.display()));
    }
    keys
}

/// A cluster that serves TLS with certificates of a local CA, where role `tlsuser` may only
/// connect over TLS, with the outbox table, publication and slot in place.
struct TlsCluster {
    pg: PgCluster,
    ca: KeyPair,
    /// A second CA that signed nothing the server presents.
    other_ca: KeyPair,
    /// Valid for 127.0.0.1 and localhost: what the relay connects to.
    right_name: KeyPair,
    /// Signed by the same CA but valid only for db.example.com.
    wrong_name: KeyPair,
    work: tempfile::TempDir,
}

impl TlsCluster {
    fn start() -> Self {
        let pg = PgCluster::start_with(ClusterOptions {
            hba: vec![
                "hostssl all tlsuser 127.0.0.1/32 trust".into(),
                "hostnossl all tlsuser 127.0.0.1/32 reject".into(),
            ],
            ..Default::default()
        });
        let dir = pg.dir.path();
        let ca = make_ca(dir, "ca");
        let other_ca = make_ca(dir, "other-ca");
        let right_name = make_server_cert(dir, "server", &ca, "2", "IP:127.0.0.1, DNS:localhost");
        let wrong_name = make_server_cert(dir, "elsewhere", &ca, "3", "DNS:db.example.com");
        let cluster = TlsCluster {
            pg,
            ca,
            other_ca,
            right_name,
            wrong_name,
            work: tempfile::tempdir().unwrap(),
        };
        cluster.pg.psql("ALTER SYSTEM SET ssl = on");
        cluster.serve(&cluster.right_name);
        cluster
            .pg
            .psql("CREATE ROLE tlsuser LOGIN REPLICATION SUPERUSER");
        cluster.pg.create_outbox("public.outbox");
        let out = cluster.relay("init", "init", &tls_keys("require", None));
        assert!(
            out.status.success(),
            "init over TLS failed: {}{}",
            stdout(&out),
            stderr(&out)
        );
        cluster
    }

    /// Makes the server present `pair` (ssl settings are reloadable) and waits until it does.
    fn serve(&self, pair: &KeyPair) {
        self.pg.psql(&format!(
            "ALTER SYSTEM SET ssl_cert_file = '{}'",
            pair.cert.display()
        ));
        self.pg.psql(&format!(
            "ALTER SYSTEM SET ssl_key_file = '{}'",
            pair.key.display()
        ));
        self.pg.psql("SELECT pg_reload_conf()");
        let expected = first_pem_certificate(&std::fs::read_to_string(&pair.cert).unwrap());
        assert!(
            wait_until(WAIT, || presented_certificate(self.pg.port) == expected),
            "the server does not present {} after a reload; server log:\n{}",
            pair.cert.display(),
            std::fs::read_to_string(self.pg.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// The source URL for `tlsuser` (its `sslmode=disable` is overridden by `sslmode` keys).
    fn url(&self) -> String {
        format!(
            "postgres://tlsuser@127.0.0.1:{}/postgres?sslmode=disable",
            self.pg.port
        )
    }

    /// A config in its own directory named `label`, connecting as `tlsuser`.
    fn config(&self, label: &str, source_keys: &str) -> (PathBuf, PathBuf) {
        let dir = self.work.path().join(label);
        std::fs::create_dir(&dir).unwrap();
        write_config(&dir, &self.pg, source_keys)
    }

    /// Runs a relay command as `tlsuser` with the `[source]` keys `source_keys`.
    fn relay(&self, label: &str, command: &str, source_keys: &str) -> Output {
        let (config, _) = self.config(label, source_keys);
        relay_command_with_env(
            &config,
            command,
            &[("OUTBOX_RELAY__SOURCE__URL", &self.url())],
        )
    }

    /// Runs the relay with source `url`, commits one outbox row and waits for its event.
    /// Returns the event and, of the walsender that streamed it, "user client-address ssl"
    /// (`unix` for a Unix socket).
    fn stream_one_row(&self, url: &str) -> (serde_json::Value, String) {
        let (config, events) = self.config("run", "");
        let relay = Relay::start_with_env(&config, &[("OUTBOX_RELAY__SOURCE__URL", url)]);
        self.pg.psql(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             VALUES ('order', 'o-1', 'T', '{}')",
        );
        relay.delivers(&events, 1);
        let walsender = self.pg.psql(
            "SELECT r.usename || ' ' || coalesce(host(r.client_addr), 'unix') || ' ' || s.ssl \
             FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.application_name = 'outbox-relay'",
        );
        (read_events(&events).remove(0), walsender)
    }

    /// `check` as `tlsuser`: whether it passed, and what it printed.
    fn check(&self, label: &str, source_keys: &str) -> (bool, String) {
        let out = self.relay(label, "check", source_keys);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        (out.status.success(), text)
    }
}

/// The start of `check`'s line when the TLS handshake as `tlsuser` fails.
fn tls_handshake_failed(tls: &TlsCluster) -> String {
    format!(
        "error: cannot connect to PostgreSQL at tlsuser@127.0.0.1:{}/postgres: error performing TLS handshake",
        tls.pg.port
    )
}

fn assert_check_ok((passed, text): (bool, String), what: &str) {
    assert!(passed && text.contains(CHECK_OK), "{what}:\n{text}");
}

fn assert_check_fails((passed, text): (bool, String), what: &str, expected: &[&str]) {
    assert!(!passed, "{what} should fail:\n{text}");
    for needle in expected {
        assert!(
            text.contains(needle),
            "{what}: missing {needle:?} in:\n{text}"
        );
    }
}

#[test]
fn every_sslmode_against_a_server_with_a_certificate_for_its_address() {
    let tls = TlsCluster::start();
    let port = tls.pg.port;

    // Without TLS the server turns tlsuser away, so the passes below were over TLS.
    assert_check_fails(
        tls.check("disable", &tls_keys("disable", None)),
        "sslmode=disable",
        &[
            &format!("error: cannot connect to PostgreSQL at tlsuser@127.0.0.1:{port}/postgres"),
            "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"tlsuser\", database \"postgres\", no encryption",
        ],
    );

    assert_check_ok(
        tls.check("require", &tls_keys("require", None)),
        "sslmode=require",
    );
    assert_check_ok(
        tls.check("prefer", &tls_keys("prefer", None)),
        "sslmode=prefer",
    );
    assert_check_ok(
        tls.check("verify-ca", &tls_keys("verify-ca", Some(&tls.ca.cert))),
        "sslmode=verify-ca with the CA",
    );
    assert_check_ok(
        tls.check("verify-full", &tls_keys("verify-full", Some(&tls.ca.cert))),
        "sslmode=verify-full with the CA",
    );

    // The verifying modes do verify: a CA that did not sign the certificate is refused, and
    // so are the public web roots when sslrootcert is not set.
    let handshake_failed = tls_handshake_failed(&tls);
    assert_check_fails(
        tls.check(
            "verify-ca-other-ca",
            &tls_keys("verify-ca", Some(&tls.other_ca.cert)),
        ),
        "sslmode=verify-ca with another CA",
        &[&handshake_failed],
    );
    assert_check_fails(
        tls.check("verify-full-web-roots", &tls_keys("verify-full", None)),
        "sslmode=verify-full with the public web roots",
        &[&handshake_failed],
    );
}

#[test]
fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let tls = TlsCluster::start();
    let verify_full = tls_keys("verify-full", Some(&tls.ca.cert));
    let verify_ca = tls_keys("verify-ca", Some(&tls.ca.cert));
    assert_check_ok(
        tls.check("verify-full-right-name", &verify_full),
        "verify-full, right name",
    );

    tls.serve(&tls.wrong_name);
    assert_check_fails(
        tls.check("verify-full-wrong-name", &verify_full),
        "verify-full against a certificate for db.example.com",
        &[&tls_handshake_failed(&tls)],
    );
    assert_check_ok(
        tls.check("verify-ca-wrong-name", &verify_ca),
        "verify-ca against a certificate for db.example.com (chain only)",
    );
    assert_check_ok(
        tls.check("require-wrong-name", &tls_keys("require", None)),
        "require against a certificate for db.example.com",
    );

    // And back: the failure was the name, nothing else.
    tls.serve(&tls.right_name);
    assert_check_ok(
        tls.check("verify-full-right-name-again", &verify_full),
        "verify-full, right name again",
    );
}

#[test]
fn relay_streams_over_verify_full() {
    let tls = TlsCluster::start();
    // sslmode and sslrootcert in the URL this time.
    let url = format!(
        "postgres://tlsuser@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        tls.pg.port,
        tls.ca.cert.display()
    );
    let (event, walsender) = tls.stream_one_row(&url);
    assert_eq!(event["type"], "T");
    assert_eq!(event["subject"], "o-1");
    assert_eq!(event["aggregatetype"], "order");
    // The walsender that streamed it serves tlsuser over TLS.
    assert_eq!(walsender, "tlsuser 127.0.0.1 true");
}

/// PostgreSQL serves no TLS on Unix sockets, and like libpq the relay does not ask for it
/// there: beside the database, a socket-directory URL works with the default `sslmode`
/// (`prefer`) and with `require`, on a server that has TLS on, for `check` and for the
/// replication stream. Before 2026-12-01 the default failed ("error performing TLS
/// handshake": the TLS connector was asked for a server name made of the socket path).
#[test]
fn a_unix_socket_url_connects_without_tls_on_a_server_with_tls_on() {
    let tls = TlsCluster::start();
    let socket_dir = tls.pg.dir.path().display().to_string().replace('/', "%2F");
    let url = format!("postgres://postgres@{socket_dir}:{}/postgres", tls.pg.port);
    let env = [("OUTBOX_RELAY__SOURCE__URL", url.as_str())];
    for sslmode in ["prefer", "require"] {
        let (config, _) = tls.config(&format!("check-{sslmode}"), &tls_keys(sslmode, None));
        let out = relay_command_with_env(&config, "check", &env);
        assert!(
            out.status.success() && stdout(&out).contains(CHECK_OK),
            "check over the Unix socket, sslmode={sslmode}:\n{}{}",
            stdout(&out),
            stderr(&out)
        );
    }

    let (event, walsender) = tls.stream_one_row(&url);
    assert_eq!(event["subject"], "o-1");
    // The walsender that streamed it has no client address (a Unix socket), and no TLS.
    assert_eq!(walsender, "postgres unix false");
}

/// A backlog drained over TLS: the relay reads it in large, coalesced reads (the socket's
/// low-water mark lies below TLS), then must still see the tail of the burst and a lone row
/// after it (the mark is lowered when no more arrives).
#[test]
fn a_backlog_and_the_row_after_it_stream_over_tls() {
    let tls = TlsCluster::start();
    const BACKLOG: u64 = 4000;
    tls.pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'o-' || (n % 7), 'Seq', \
                jsonb_build_object('seq', n, 'pad', repeat('x', 300)) \
         FROM generate_series(0, {}) n",
        BACKLOG - 1
    ));
    let (config, events) = tls.config("backlog", &tls_keys("require", None));
    let relay = Relay::start_with_env(&config, &[("OUTBOX_RELAY__SOURCE__URL", &tls.url())]);
    assert!(
        wait_until(WAIT, || read_events(&events).len() as u64 == BACKLOG),
        "{} of {BACKLOG} events; relay log:\n{}",
        read_events(&events).len(),
        relay.log()
    );
    tls.pg.psql(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-0', 'Seq', '{{\"seq\": {BACKLOG}}}')"
    ));
    assert!(
        wait_until(WAIT, || read_events(&events).len() as u64 == BACKLOG + 1),
        "the row after the backlog did not arrive; relay log:\n{}",
        relay.log()
    );
    let seqs = read_seqs(&events);
    assert_eq!(seqs, (0..=BACKLOG).collect::<Vec<_>>());
}

/// A refused certificate is reported with the reason, so users know whether to fix
/// sslrootcert or the host name.
#[test]
fn refused_certificates_are_explained() {
    let tls = TlsCluster::start();
    let (passed, text) = tls.check("verify-full-web-roots", &tls_keys("verify-full", None));
    assert!(!passed, "{text}");
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer"),
        "verify-full with the public web roots should name the unknown issuer:\n{text}"
    );

    tls.serve(&tls.wrong_name);
    let (passed, text) = tls.check(
        "verify-full-wrong-name",
        &tls_keys("verify-full", Some(&tls.ca.cert)),
    );
    assert!(!passed, "{text}");
    assert!(
        text.contains("certificate not valid for name \"127.0.0.1\"")
            && text.contains("db.example.com"),
        "verify-full against a certificate for db.example.com should name both names:\n{text}"
    );
}

#[test]
fn require_refuses_a_server_without_tls() {
    let Scenario {
        pg, dir, config, ..
    } = scenario().without_init();
    let out = relay_command(&config, "init");
    assert!(out.status.success(), "init failed: {}", stderr(&out));
    let (config, _) = write_config(&dir, &pg, &tls_keys("require", None));
    let out = relay_command(&config, "check");
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!(
            "error: cannot connect to PostgreSQL at postgres@127.0.0.1:{}/postgres: error performing TLS handshake",
            pg.port
        )),
        "{}",
        stdout(&out)
    );
}

/// `check` as `user` with the password in `source.password_file`.
fn check_with_password(pg: &PgCluster, user: &str, password: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    std::fs::write(&secret, format!("{password}\n")).unwrap();
    let (config, _) = write_config(
        dir.path(),
        pg,
        &format!("password_file = \"{}\"", secret.display()),
    );
    let url = format!(
        "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    relay_command_with_env(&config, "check", &[("OUTBOX_RELAY__SOURCE__URL", &url)])
}

/// A cluster where `user` must authenticate with `method`, ready for the relay.
fn password_cluster(user: &str, method: &str, create_role: &str) -> PgCluster {
    let pg = PgCluster::start_with(ClusterOptions {
        hba: vec![format!("host all {user} 127.0.0.1/32 {method}")],
        ..Default::default()
    });
    pg.psql(create_role);
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), &pg, "");
    let out = relay_command(&config, "init");
    assert!(out.status.success(), "init failed: {}", stderr(&out));
    pg
}

fn assert_password_auth(pg: &PgCluster, user: &str, right: &str) {
    // The right password gets both connections in: `check` ends with IDENTIFY_SYSTEM on the
    // replication connection.
    let out = check_with_password(pg, user, right);
    let text = stdout(&out);
    assert!(!text.contains("password authentication failed"), "{text}");
    assert!(out.status.success() && text.contains(CHECK_OK), "{text}");

    let wrong = format!("Wr0ng-{user}-pa55");
    let out = check_with_password(pg, user, &wrong);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.lines().any(|line| line.starts_with("error: ")
            && line.contains(&format!(
                "password authentication failed for user \"{user}\""
            ))
            && line.contains("source.password_file")),
        "{text}"
    );
    let everything = format!("{text}{}", stderr(&out));
    assert!(
        !everything.contains(&wrong) && !everything.contains(right),
        "a password leaked: {everything}"
    );
}

#[test]
fn md5_password_authentication() {
    let pg = password_cluster(
        "md5user",
        "md5",
        "SET password_encryption = 'md5'; \
         CREATE ROLE md5user LOGIN REPLICATION SUPERUSER PASSWORD 'right-md5'",
    );
    // Stored as md5, so the md5 line really asks for md5 (not SCRAM in its place).
    assert_eq!(
        pg.psql("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5user'"),
        "md5"
    );
    assert_password_auth(&pg, "md5user", "right-md5");
}

#[test]
fn cleartext_password_authentication() {
    let pg = password_cluster(
        "pwuser",
        "password",
        "CREATE ROLE pwuser LOGIN REPLICATION SUPERUSER PASSWORD 'right-cleartext'",
    );
    assert_password_auth(&pg, "pwuser", "right-cleartext");
}
