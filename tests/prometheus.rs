//! The shipped monitoring files against a real Prometheus (Debian's, installed by
//! `scripts/check-prometheus.sh`) scraping a running relay: every alert rule evaluates
//! without error, and every alert expression (without its threshold) and every dashboard
//! query returns data. `scripts/prometheus_queries.py` lists them from
//! `deploy/prometheus/alerts.yaml` and `deploy/grafana/outbox-relay.json`.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A Prometheus server, killed when dropped (and by the kernel if the test dies).
struct Prometheus {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Scrapes the relay's `/metrics` on `relay_port` every second as job `outbox-relay`,
    /// evaluating the shipped alert rules every second.
    fn start(dir: &Path, relay_port: u16) -> Prometheus {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yaml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{relay_port}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.join("prometheus.log");
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("prometheus-data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("prometheus is installed by scripts/check-prometheus.sh");
        Prometheus { child, port, log }
    }

    /// The result of an instant query, or None when Prometheus did not answer.
    fn query(&self, promql: &str) -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        self.get(&path)
    }

    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let (status, _, body) = http_get_with(self.port, path, "")?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        (status == 200).then_some(json)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query string's value, every byte but the unreserved ones escaped.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How many series (or samples) a query's result holds.
fn result_len(answer: &serde_json::Value) -> usize {
    answer["data"]["result"].as_array().map_or(0, Vec::len)
}

/// One line of `scripts/prometheus_queries.py`.
#[derive(serde::Deserialize)]
struct Query {
    kind: String,
    name: String,
    data_expr: String,
    selectors: Vec<String>,
}

fn shipped_queries() -> Vec<Query> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("scripts/prometheus_queries.py"))
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn every_alert_and_dashboard_query_returns_data_from_a_scraped_relay() {
    let queries = shipped_queries();
    assert!(queries.iter().any(|q| q.kind == "alert"));
    assert!(queries.iter().any(|q| q.kind == "panel"));

    let port = free_port();
    let (
        Scenario {
            pg, dir, events, ..
        },
        relay,
    ) = scenario()
        .tables(&format!("[http]\nlisten = \"127.0.0.1:{port}\"\n"))
        .start();
    let prometheus = Prometheus::start(&dir, port);
    let up = wait_until(WAIT, || {
        prometheus
            .query("up{job=\"outbox-relay\"} == 1")
            .is_some_and(|answer| result_len(&answer) == 1)
    });
    assert!(up, "{}\n{}", prometheus.log(), relay.log());
    // Events over a few scrapes, so that rates and latency quantiles have samples.
    for round in 0..4 {
        pg.psql(&format!(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
             SELECT 'order', 'k' || n, 'Placed', '{{}}' FROM generate_series(1, 5) n; -- {round}"
        ));
        let delivered = (round + 1) * 5;
        assert!(wait_until(WAIT, || read_events(&events).len() == delivered));
        // Each round in its own scrape: Prometheus has seen this round's count.
        let scraped = wait_until(WAIT, || {
            prometheus
                .query("sum(outbox_relay_events_published_total)")
                .and_then(|answer| {
                    answer["data"]["result"][0]["value"][1]
                        .as_str()
                        .map(|v| v == delivered.to_string())
                })
                .unwrap_or(false)
        });
        assert!(scraped, "{}", prometheus.log());
    }
    let published = "increase(outbox_relay_events_published_total[1m]) > 0";
    assert!(
        wait_until(WAIT, || prometheus
            .query(published)
            .is_some_and(|answer| result_len(&answer) > 0)),
        "{}",
        prometheus.log()
    );

    let mut empty = Vec::new();
    for query in &queries {
        for promql in std::iter::once(&query.data_expr).chain(&query.selectors) {
            let answer = prometheus
                .query(promql)
                .unwrap_or_else(|| panic!("Prometheus refused {promql:?} ({})", query.name));
            if result_len(&answer) == 0 {
                empty.push(format!("{} {:?}: {promql}", query.kind, query.name));
            }
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );

    // Every rule was evaluated, without error, and none fires on a healthy relay.
    let rules = prometheus.get("/api/v1/rules").unwrap();
    let rules: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap())
        .collect();
    assert_eq!(
        rules.len(),
        queries.iter().filter(|q| q.kind == "alert").count()
    );
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
        assert_eq!(rule["state"], "inactive", "{rule}");
    }
}
