//! Sidecar operation: several relays on one slot elect one leader through PostgreSQL, a
//! standby takes over when the leader dies, and each reports its state on /readyz and its
//! figures on /metrics.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// One relay per port, each with its own config directory under `dir`, all on one slot and
/// one file sink; the first runs `init`.
fn start_sidecars(dir: &Path, pg: &PgCluster, events: &Path, ports: &[u16]) -> Vec<Relay> {
    let mut relays = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let relay_dir = dir.join(format!("relay{i}"));
        std::fs::create_dir(&relay_dir).unwrap();
        let config = sidecar_config(&relay_dir, pg, events, *port, "500ms");
        if i == 0 {
            init(&config);
        }
        relays.push(Relay::start(&config));
    }
    relays
}

fn readiness(port: u16) -> Option<(u16, String)> {
    http_get(port, "/readyz").map(|(status, body)| (status, body.trim().to_owned()))
}

/// Parses Prometheus text (what `/metrics` answers a scraper that does not ask for
/// OpenMetrics): every sample line is `name{labels} value`, and every name belongs to a
/// declared family. Returns samples by `name{labels}`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut families = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            families.push(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line: series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "{name} has no # TYPE line"
        );
        if series.contains('{') {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
        }
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[test]
fn one_leader_among_three_and_a_standby_takes_over_when_it_dies() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let ports = [free_port(), free_port(), free_port()];
    let mut relays = start_sidecars(dir.path(), &pg, &events, &ports);
    // Exactly one streams; the others are ready standbys.
    let states = || -> Vec<String> {
        ports
            .iter()
            .map(|port| readiness(*port).map_or("down".into(), |(_, body)| body))
            .collect()
    };
    assert!(
        wait_until(WAIT, || {
            let states = states();
            states.iter().filter(|s| *s == "streaming").count() == 1
                && states.iter().filter(|s| *s == "standby").count() == 2
        }),
        "states: {:?}\n{}",
        states(),
        relays.iter().map(Relay::log).collect::<Vec<_>>().join("\n")
    );
    for port in ports {
        assert_eq!(readiness(port).unwrap().0, 200);
        assert_eq!(http_get(port, "/healthz"), Some((200, "ok\n".into())));
    }
    let leader = states().iter().position(|s| s == "streaming").unwrap();
    assert!(relays[leader]
        .log()
        .contains("leader: holding the slot's lock"));
    for (i, relay) in relays.iter().enumerate() {
        if i != leader {
            assert!(
                relay
                    .log()
                    .contains("standby: another relay holds this slot's leader lock"),
                "{}",
                relay.log()
            );
        }
    }

    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k' || (n % 3), 'Seq', jsonb_build_object('n', n) FROM generate_series(0, 9) n",
    );
    assert!(wait_until(WAIT, || read_events(&events).len() == 10));

    // The leader's metrics: valid text, and the counters match what was delivered.
    let metrics = |port| parse_metrics(&http_get(port, "/metrics").expect("metrics answer").1);
    let leader_port = ports[leader];
    assert!(wait_until(WAIT, || {
        metrics(leader_port)
            .get("outbox_relay_sink_checkpoint_lsn_bytes{sink=\"file\"}")
            .is_some_and(|lsn| *lsn > 0.0)
    }));
    let samples = metrics(leader_port);
    assert_eq!(
        samples.get("outbox_relay_events_published_total{sink=\"file\",table=\"public.outbox\"}"),
        Some(&10.0),
        "{samples:#?}"
    );
    assert_eq!(samples.get("outbox_relay_leader"), Some(&1.0));
    assert_eq!(
        samples.get("outbox_relay_in_flight_events{sink=\"file\"}"),
        Some(&0.0)
    );
    assert_eq!(
        samples.get("outbox_relay_publish_latency_seconds_count{sink=\"file\"}"),
        Some(&10.0)
    );
    assert!(samples.contains_key("outbox_relay_replication_lag_bytes"));
    assert_eq!(
        samples.get("outbox_relay_sink_up{sink=\"file\"}"),
        Some(&1.0)
    );
    assert_eq!(
        samples.get("outbox_relay_role{role=\"streaming\"}"),
        Some(&1.0)
    );
    let standby_port = ports[(leader + 1) % 3];
    let standby = metrics(standby_port);
    assert_eq!(standby.get("outbox_relay_leader"), Some(&0.0));
    // A standby exposes every series an alert asks about, at 0, before any event.
    for series in [
        "outbox_relay_events_published_total{sink=\"file\",table=\"public.outbox\"}",
        "outbox_relay_dead_letters_total{sink=\"file\"}",
        "outbox_relay_dead_letters_total{sink=\"\"}",
        "outbox_relay_sink_retries_total{sink=\"file\"}",
        "outbox_relay_reconnects_total{component=\"replication\"}",
        "outbox_relay_oldest_unacked_event_age_seconds{sink=\"file\"}",
        "outbox_relay_sink_up{sink=\"file\"}",
        "outbox_relay_role{role=\"streaming\"}",
    ] {
        assert_eq!(standby.get(series), Some(&0.0), "{series}: {standby:#?}");
    }
    assert_eq!(
        standby.get("outbox_relay_role{role=\"standby\"}"),
        Some(&1.0)
    );
    assert!(
        standby
            .keys()
            .any(|series| series.starts_with("outbox_relay_build_info{version=\"")),
        "{standby:#?}"
    );
    // The format follows the scraper's Accept header.
    let (_, plain_type, plain) = http_get_with(leader_port, "/metrics", "").unwrap();
    assert!(
        plain_type.starts_with("text/plain; version=0.0.4"),
        "{plain_type}"
    );
    assert!(plain.contains("# TYPE outbox_relay_dead_letters_total counter"));
    assert!(!plain.contains("# EOF"));
    let (_, open_type, open) = http_get_with(
        leader_port,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    )
    .unwrap();
    assert!(
        open_type.starts_with("application/openmetrics-text"),
        "{open_type}"
    );
    assert!(open.ends_with("# EOF\n"));

    // kill -9 the leader: a standby takes over within the bound, and nothing is lost.
    relays[leader].kill9();
    let killed = Instant::now();
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k' || (n % 3), 'Seq', jsonb_build_object('n', n) FROM generate_series(10, 19) n",
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            ports.iter().enumerate().any(|(i, port)| {
                i != leader && readiness(*port).is_some_and(|(_, s)| s == "streaming")
            })
        }),
        "no takeover within 10 s:\n{}",
        relays.iter().map(Relay::log).collect::<Vec<_>>().join("\n")
    );
    let takeover = killed.elapsed();
    assert!(wait_until(WAIT, || read_events(&events).len() >= 20));
    let mut seen: Vec<u64> = read_events(&events)
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "nothing lost");
    eprintln!("takeover after {takeover:?}");

    // SIGTERM: every survivor exits 0 within the grace period.
    for (i, relay) in relays.iter_mut().enumerate() {
        if i != leader {
            let status = relay.terminate(Duration::from_secs(10));
            assert!(status.is_some_and(|s| s.success()), "{}", relay.log());
        }
    }
}

/// The relay.toml inside each example of deploy/kubernetes/ is a valid configuration.
#[test]
fn the_kubernetes_example_configs_load() {
    for example in ["standalone.yaml", "sidecar.yaml"] {
        let manifest = std::fs::read_to_string(format!(
            "{}/deploy/kubernetes/{example}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let block: String = manifest
            .lines()
            .skip_while(|line| !line.contains("relay.toml: |"))
            .skip(1)
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, &block).unwrap();
        let config = outbox_relay::config::Config::load(Some(&path))
            .unwrap_or_else(|e| panic!("{example}: {e:#}\n{block}"));
        assert!(config.leader.enabled, "{example}");
        assert_eq!(
            config.http.listen,
            Some("0.0.0.0:9187".parse().unwrap()),
            "{example}"
        );
    }
}

/// migrations/003_relay_role.sql: the role it creates can init and run the relay, and
/// cannot read the application's other tables.
#[test]
fn the_least_privilege_role_runs_the_relay_and_reads_nothing_else() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    pg.psql("CREATE TABLE customers (name text); INSERT INTO customers VALUES ('secret')");
    pg.psql(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/003_relay_role.sql"
        ))
        .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let url = pg
        .url()
        .replace("postgres://postgres@", "postgres://outbox_relay@");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{url}\"\n[relay]\ncheckpoint_interval = \"100ms\"\n\
             [sinks.file]\ntype = \"file\"\nfsync = false\npath = \"{}\"\n",
            events.display()
        ),
    )
    .unwrap();
    init(&config);
    let (passed, text) = relay_check(&config);
    assert!(passed, "{text}");
    let relay = Relay::start(&config);
    pg.psql("INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-1', 'Created', '{}')");
    relay.delivers(&events, 1);
    let denied = std::process::Command::new(pg_bin().join("psql"))
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-U",
            "outbox_relay",
            "-d",
            "postgres",
        ])
        .args(["-p", &pg.port.to_string(), "-c", "SELECT * FROM customers"])
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("permission denied for table customers"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
}

/// A leader whose lock connection is cut stops streaming and stands by; the lock goes to
/// whichever relay asks first, and delivery goes on without loss.
#[test]
fn a_leader_that_loses_its_lock_stops_and_another_takes_over() {
    let pg = PgCluster::start();
    pg.create_outbox("public.outbox");
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let ports = [free_port(), free_port()];
    let relays = start_sidecars(dir.path(), &pg, &events, &ports);
    let streaming = || {
        ports
            .iter()
            .filter(|port| readiness(**port).is_some_and(|(_, s)| s == "streaming"))
            .count()
    };
    assert!(wait_until(WAIT, || streaming() == 1));
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k', 'Seq', jsonb_build_object('n', n) FROM generate_series(0, 4) n",
    );
    assert!(wait_until(WAIT, || read_events(&events).len() == 5));

    // Cut the lock holder's connection, as a network failure or an admin would.
    pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    );
    assert!(
        wait_until(WAIT, || relays
            .iter()
            .any(|r| r.log().contains("leadership lost"))),
        "{}",
        relays.iter().map(Relay::log).collect::<Vec<_>>().join("\n")
    );
    assert!(wait_until(WAIT, || streaming() == 1));
    pg.psql(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k', 'Seq', jsonb_build_object('n', n) FROM generate_series(5, 9) n",
    );
    assert!(
        wait_until(WAIT, || read_events(&events).len() >= 10),
        "{}",
        relays.iter().map(Relay::log).collect::<Vec<_>>().join("\n")
    );
    let seen: Vec<u64> = read_events(&events)
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seen,
        (0..10).collect::<Vec<_>>(),
        "nothing lost or repeated, in order"
    );
}
