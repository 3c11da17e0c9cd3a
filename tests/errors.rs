//! What users see when something is wrong: one clear line that says what to do, from `check`
//! and from `run`, never a panic or a hang.

mod common;

use common::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn wrong_password_is_named_with_the_fix() {
    let (pg, _dir, config, secret) = cluster_with_a_password();
    let url = format!(
        "postgres://app@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    let out = std::process::Command::new(relay_bin())
        .args(["--config", config.to_str().unwrap(), "check"])
        .env("OUTBOX_RELAY__SOURCE__URL", &url)
        .env("OUTBOX_RELAY__SOURCE__PASSWORD_FILE", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("password authentication failed") && text.contains("source.password_file"),
        "{text}"
    );
    assert!(!text.contains("wrong"), "the password leaked: {text}");

    // The right password over SCRAM gets through to the database checks.
    std::fs::write(&secret, "right\n").unwrap();
    let out = std::process::Command::new(relay_bin())
        .args(["--config", config.to_str().unwrap(), "check"])
        .env("OUTBOX_RELAY__SOURCE__URL", &url)
        .env("OUTBOX_RELAY__SOURCE__PASSWORD_FILE", &secret)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(!text.contains("password authentication failed"), "{text}");
    assert!(
        text.contains("outbox table public.outbox does not exist"),
        "{text}"
    );
}

#[test]
fn wal_level_replica_is_reported_by_check_and_run() {
    let Scenario {
        pg: _pg, config, ..
    } = scenario()
        .cluster(ClusterOptions {
            wal_level: "replica",
            ..Default::default()
        })
        .without_init();
    let out = relay_command(&config, "check");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("wal_level is replica: set wal_level = logical in postgresql.conf and restart PostgreSQL"),
        "{}",
        stdout(&out)
    );
    let out = relay_command(&config, "init");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wal_level"), "{}", stderr(&out));
}

#[test]
fn missing_publication_and_slot_are_explained() {
    let Scenario {
        pg: _pg, config, ..
    } = scenario().source("create_slot = false").without_init();
    let out = relay_command(&config, "check");
    assert!(!out.status.success());
    let text = stdout(&out);
    for expected in [
        "publication outbox_relay does not exist: run `outbox-relay init`",
        "replication slot outbox_relay does not exist: run `outbox-relay init`",
        "the relay's tables in schema outbox_relay do not exist: run `outbox-relay init`",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "run should exit on a permanent error");
    assert!(
        log.contains("publication outbox_relay does not exist: run `outbox-relay init`"),
        "{log}"
    );

    // After init everything checks out, and init is idempotent.
    for _ in 0..2 {
        let out = relay_command(&config, "init");
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = relay_command(&config, "check");
    assert!(out.status.success(), "{}", stdout(&out));
    // No relay streams yet: the verdict says so, in the exit code too (PostgreSQL before 17
    // does not say since when a slot is inactive).
    let out = relay_command(&config, "status");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("slot outbox_relay: inactive")
            && stdout(&out).contains("file: none yet")
            && stdout(&out).contains("verdict: slot_inactive (exit 5)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn unreachable_database_and_bad_config_fail_fast_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, "[source]\nurl = \"postgres://x@127.0.0.1:1/db?sslmode=disable\"\n[sinks.out]\ntype = \"stdout\"\n").unwrap();
    let out = relay_command(&config, "check");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("cannot connect to PostgreSQL at x@127.0.0.1:1/db"),
        "{}",
        stdout(&out)
    );

    std::fs::write(
        &config,
        "[source]\nurl = \"postgres://x@h/db\"\nslots = \"typo\"\n[sinks.out]\ntype = \"stdout\"\n",
    )
    .unwrap();
    let out = relay_command(&config, "check");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("slots"), "{}", stderr(&out));
}

/// A slot dropped under a relay that has streamed from it is not silently re-created (a new
/// slot would skip everything committed in between): `run` stops and says what to do.
#[test]
fn a_dropped_slot_with_checkpoints_is_not_silently_recreated() {
    let (
        Scenario {
            pg, config, events, ..
        },
        mut relay,
    ) = scenario().start();
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'T', '{}')");
    assert!(wait_until(WAIT, || {
        read_events(&events).len() == 1
            && pg.psql("SELECT count(*) FROM outbox_relay.checkpoints") == "1"
    }));
    relay.stops_cleanly();
    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'T', '{}')");

    let mut relay = Relay::start(&config);
    let log = relay.stops_with_failure(WAIT, "run should stop instead of re-creating the slot");
    assert!(
        log.contains("replication slot \"outbox_relay\" is gone, but the relay has checkpoints")
            && log.contains(
                "DELETE FROM \"outbox_relay\".\"checkpoints\" WHERE slot = 'outbox_relay'"
            ),
        "{log}"
    );
    // `check` reports it, and `init`, which creates missing slots, refuses too.
    let (ok, report) = relay_check(&config);
    assert!(
        !ok && report.contains("is gone, but the relay has checkpoints"),
        "{report}"
    );
    let out = relay_command(&config, "init");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is gone, but the relay has checkpoints"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "no slot was created"
    );
}

#[test]
fn check_counts_replication_granted_through_a_managed_platforms_role_and_names_each_fix() {
    let Scenario { pg, config, .. } = scenario()
        .outbox("outbox")
        // As on Amazon RDS and Aurora: REPLICATION comes with membership in rds_replication.
        .sql(
            "CREATE ROLE rds_replication WITH REPLICATION; \
             CREATE ROLE member LOGIN IN ROLE rds_replication; CREATE ROLE plain LOGIN; \
             GRANT SELECT ON outbox TO member, plain",
        )
        .init();
    let check_as = |user: &str| {
        let url = format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            pg.port
        );
        let out = relay_command_with_env(
            &config,
            "check",
            &[("OUTBOX_RELAY__SOURCE__URL", url.as_str())],
        );
        (out.status.success(), stdout(&out))
    };
    // The role check counts the membership. Vanilla PostgreSQL does not pass REPLICATION on,
    // so here the replication connection is still refused, and check says that instead.
    let (_, member) = check_as("member");
    assert!(
        member.contains("replication connection:") && !member.contains("cannot stream"),
        "{member}"
    );
    let (ok, plain) = check_as("plain");
    let line = plain
        .lines()
        .find(|l| l.contains("role plain cannot stream"))
        .unwrap_or_else(|| panic!("{plain}"));
    assert!(!ok);
    for fix in [
        "ALTER ROLE \"plain\" WITH REPLICATION",
        "on Amazon RDS or Aurora, GRANT rds_replication TO \"plain\"",
        "cloudsqlsuperuser",
        "azure_pg_admin",
    ] {
        assert!(line.contains(fix), "{fix}: {line}");
    }
}

/// `status --json` while a relay streams (its lock and checkpoint shown, exit 0), after it
/// stopped (exit 5, the slot inactive), and without the slot (exit 3).
#[test]
fn status_json_judges_the_slot_by_exit_code_and_shows_the_leader() {
    let (
        Scenario {
            pg, config, events, ..
        },
        mut relay,
    ) = scenario().start();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-1', 'Placed', '{}')",
    );
    relay.delivers(&events, 1);
    let status = |extra: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .arg("--config")
            .arg(&config)
            .args(["status", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}{}", stdout(&out), stderr(&out)));
        (out.status.code(), json)
    };
    let mut streaming = (None, serde_json::Value::Null);
    assert!(
        wait_until(WAIT, || {
            streaming = status(&[]);
            streaming.1["checkpoints"][0]["position"].is_string()
        }),
        "{:?}",
        streaming
    );
    let (code, json) = streaming;
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(json["verdict"]["state"], "ok");
    assert_eq!(json["slot"]["active"], true);
    assert!(json["leader"]["pid"].is_i64(), "{json:#}");
    assert_eq!(json["checkpoints"][0]["sink"], "file");
    assert_eq!(json["dead_letters"]["open"], 0);

    relay.stops_cleanly();
    let (code, json) = status(&["--max-inactive", "1h"]);
    assert_eq!(json["leader"], serde_json::Value::Null, "{json:#}");
    if json["slot"]["inactive_seconds"].is_null() {
        assert_eq!(code, Some(5), "{json:#}");
        assert_eq!(json["verdict"]["state"], "slot_inactive");
    } else {
        assert_eq!(code, Some(0), "{json:#}");
    }

    pg.psql("SELECT pg_drop_replication_slot('outbox_relay')");
    let (code, json) = status(&[]);
    assert_eq!(code, Some(3), "{json:#}");
    assert_eq!(json["verdict"]["state"], "slot_missing");
    assert_eq!(json["slot"]["exists"], false);
}
