//! `outbox-relay status`: the slot (activity, lag, invalidation), the leader, checkpoints per
//! sink and dead letters, as text or JSON, with a verdict scripts can act on through the exit
//! code.
//!
//! The verdict is the first that applies, in this order (exit code in brackets):
//! slot missing (3), slot invalidated by PostgreSQL (4), slot inactive for longer than
//! `max_inactive` (5; before PostgreSQL 17 the server does not say since when, so any
//! inactive slot counts), lag over `max_lag_bytes` (6), else ok (0). Exit code 1 is left to
//! a command that could not run (no database, bad configuration), 2 to a usage error.

use super::relay_table;
use crate::config::Config;
use crate::db;
use crate::source::slot;
use anyhow::Context;
use serde::Serialize;
use std::fmt::Write;
use std::time::Duration;

/// The thresholds of the verdict.
pub struct StatusOptions {
    pub max_inactive: Duration,
    pub max_lag_bytes: u64,
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: SlotStatus,
    /// The relay holding the slot's leader lock, if any (leader election on).
    pub leader: Option<LeaderStatus>,
    pub checkpoints: Vec<CheckpointStatus>,
    pub dead_letters: DeadLetterCounts,
    pub verdict: Verdict,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub failover: bool,
    /// `reserved`, `extended`, `unreserved` or `lost` (pg_replication_slots.wal_status).
    pub wal_status: Option<String>,
    /// Why PostgreSQL invalidated the slot (PostgreSQL 17 and later; `lost` WAL before).
    pub invalidation_reason: Option<String>,
    /// Seconds since the slot was last active (PostgreSQL 17 and later).
    pub inactive_seconds: Option<f64>,
    pub confirmed_flush_lsn: Option<String>,
    pub server_wal_lsn: Option<String>,
    /// The server's WAL position minus the slot's confirmed position.
    pub lag_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct LeaderStatus {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointStatus {
    pub sink: String,
    /// `commit_lsn#index`, or None before the sink's first checkpoint.
    pub position: Option<String>,
    pub updated_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterCounts {
    /// Not replayed yet.
    pub open: i64,
    pub replayed: i64,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Verdict {
    /// `ok`, `slot_missing`, `slot_invalidated`, `slot_inactive` or `lagging`.
    pub state: &'static str,
    /// The process's exit code for it.
    pub exit_code: u8,
    pub message: String,
}

/// Reads the slot, the leader, the checkpoints and the dead letters, and judges them.
pub async fn status(config: &Config, options: &StatusOptions) -> anyhow::Result<Status> {
    let source = &config.source;
    let client = db::connect(&source.connect_params()?).await?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(db::explain)?
        .get(0);
    let since_17 = if version >= 170_000 {
        "extract(epoch FROM now() - inactive_since)::float8, invalidation_reason"
    } else {
        "NULL::float8, NULL::text"
    };
    let row = client
        .query_opt(
            &format!(
                "SELECT active, active_pid, confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, {}, \
                 wal_status, {since_17} \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                slot::SLOT_IS_FAILOVER
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    let slot = match row {
        None => SlotStatus {
            name: source.slot.clone(),
            exists: false,
            active: false,
            active_pid: None,
            failover: false,
            wal_status: None,
            invalidation_reason: None,
            inactive_seconds: None,
            confirmed_flush_lsn: None,
            server_wal_lsn: None,
            lag_bytes: None,
        },
        Some(row) => SlotStatus {
            name: source.slot.clone(),
            exists: true,
            active: row.get(0),
            active_pid: row.get(1),
            confirmed_flush_lsn: row.get(2),
            server_wal_lsn: row.get(3),
            lag_bytes: row.get(4),
            failover: row.get(5),
            wal_status: row.get(6),
            inactive_seconds: row.get(7),
            invalidation_reason: row.get(8),
        },
    };
    let leader = client
        .query_opt(
            &format!(
                "SELECT a.pid, a.application_name, a.client_addr::text FROM pg_stat_activity a \
                 WHERE a.pid = (SELECT l.pid FROM {} LIMIT 1)",
                crate::leader::granted_lock_sql()
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?
        .map(|row| LeaderStatus {
            pid: row.get(0),
            application_name: row.get(1),
            client_addr: row.get(2),
        });
    let rows = client
        .query(
            &format!(
                "SELECT sink, commit_lsn::text || '#' || event_index, updated_at::text \
                 FROM {} WHERE slot = $1",
                relay_table(config, "checkpoints")
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)
        .context("reading checkpoints (run `outbox-relay init` first)")?;
    let checkpoints = config
        .sinks
        .keys()
        .map(|name| {
            let row = rows.iter().find(|r| r.get::<_, String>(0) == *name);
            CheckpointStatus {
                sink: name.clone(),
                position: row.map(|r| r.get(1)),
                updated_at: row.map(|r| r.get(2)),
            }
        })
        .collect();
    let counts = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE replayed_at IS NULL), \
                 count(*) FILTER (WHERE replayed_at IS NOT NULL) FROM {} WHERE slot = $1",
                relay_table(config, "dead_letters")
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    let verdict = judge(&slot, options);
    Ok(Status {
        slot,
        leader,
        checkpoints,
        dead_letters: DeadLetterCounts {
            open: counts.get(0),
            replayed: counts.get(1),
        },
        verdict,
    })
}

/// The verdict on `slot` (see the module's documentation).
fn judge(slot: &SlotStatus, options: &StatusOptions) -> Verdict {
    let verdict = |state, exit_code, message: String| Verdict {
        state,
        exit_code,
        message,
    };
    if !slot.exists {
        return verdict(
            "slot_missing",
            3,
            format!("slot {} does not exist: run `outbox-relay init`", slot.name),
        );
    }
    let lost = slot.wal_status.as_deref() == Some("lost");
    if lost || slot.invalidation_reason.is_some() {
        return verdict(
            "slot_invalidated",
            4,
            format!(
                "PostgreSQL invalidated slot {} ({}): events after its position are gone from \
                 the WAL; drop it and backfill on a new one (docs/postgres.md, PostgreSQL failover)",
                slot.name,
                slot.invalidation_reason.as_deref().unwrap_or("wal_status lost")
            ),
        );
    }
    if !slot.active {
        let limit = options.max_inactive.as_secs_f64();
        match slot.inactive_seconds {
            Some(seconds) if seconds <= limit => {}
            Some(seconds) => {
                return verdict(
                    "slot_inactive",
                    5,
                    format!(
                    "no relay has streamed from slot {} for {seconds:.0} s (over {limit:.0} s): \
                         is the relay running, and can it reach PostgreSQL?",
                    slot.name
                ),
                )
            }
            None => {
                return verdict(
                    "slot_inactive",
                    5,
                    format!(
                        "no relay streams from slot {}: is the relay running, and can it reach \
                         PostgreSQL? (PostgreSQL before 17 does not say since when)",
                        slot.name
                    ),
                )
            }
        }
    }
    match slot.lag_bytes {
        Some(lag) if lag > i64::try_from(options.max_lag_bytes).unwrap_or(i64::MAX) => verdict(
            "lagging",
            6,
            format!(
                "slot {} is {lag} bytes behind the server's WAL (over {}): the relay is slow or \
                 a sink is failing; PostgreSQL keeps that WAL until it catches up",
                slot.name, options.max_lag_bytes
            ),
        ),
        _ => verdict("ok", 0, "ok".to_owned()),
    }
}

impl Status {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let slot = &self.slot;
        if slot.exists {
            let _ = writeln!(
                out,
                "slot {}: {}{}",
                slot.name,
                match slot.active_pid {
                    Some(pid) if slot.active => format!("active (pid {pid})"),
                    _ => match slot.inactive_seconds {
                        Some(seconds) => format!("inactive for {seconds:.0} s"),
                        None => "inactive".into(),
                    },
                },
                if slot.failover {
                    ", a failover slot"
                } else {
                    ""
                },
            );
            let dash = || "-".to_owned();
            let _ = writeln!(
                out,
                "  confirmed_flush_lsn {}\n  server wal_lsn      {}\n  lag                 {} bytes\n  wal_status          {}",
                slot.confirmed_flush_lsn.clone().unwrap_or_else(dash),
                slot.server_wal_lsn.clone().unwrap_or_else(dash),
                slot.lag_bytes.map_or_else(dash, |l| l.to_string()),
                slot.wal_status.clone().unwrap_or_else(dash),
            );
        } else {
            let _ = writeln!(
                out,
                "slot {}: does not exist (run `outbox-relay init`)",
                slot.name
            );
        }
        let _ = match &self.leader {
            Some(leader) => writeln!(
                out,
                "leader: pid {} ({}{})",
                leader.pid,
                leader.application_name.as_deref().unwrap_or("-"),
                leader
                    .client_addr
                    .as_deref()
                    .map_or_else(String::new, |addr| format!(" from {addr}"))
            ),
            None => writeln!(out, "leader: none holds the lock"),
        };
        out.push_str("checkpoints:\n");
        for checkpoint in &self.checkpoints {
            let _ = match (&checkpoint.position, &checkpoint.updated_at) {
                (Some(position), Some(updated)) => {
                    writeln!(out, "  {}: {position} (updated {updated})", checkpoint.sink)
                }
                _ => writeln!(out, "  {}: none yet", checkpoint.sink),
            };
        }
        let _ = writeln!(
            out,
            "dead letters: {} open, {} replayed",
            self.dead_letters.open, self.dead_letters.replayed
        );
        let _ = writeln!(
            out,
            "verdict: {} (exit {}): {}",
            self.verdict.state, self.verdict.exit_code, self.verdict.message
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> SlotStatus {
        SlotStatus {
            name: "s".into(),
            exists: true,
            active: true,
            active_pid: Some(7),
            failover: false,
            wal_status: Some("reserved".into()),
            invalidation_reason: None,
            inactive_seconds: None,
            confirmed_flush_lsn: Some("0/10".into()),
            server_wal_lsn: Some("0/20".into()),
            lag_bytes: Some(16),
        }
    }

    const OPTIONS: StatusOptions = StatusOptions {
        max_inactive: Duration::from_secs(300),
        max_lag_bytes: 100,
    };

    #[test]
    fn the_first_verdict_that_applies_decides_the_exit_code() {
        let code = |slot: &SlotStatus| {
            let verdict = judge(slot, &OPTIONS);
            (verdict.state, verdict.exit_code)
        };
        assert_eq!(code(&slot()), ("ok", 0));
        let lagging = SlotStatus {
            lag_bytes: Some(101),
            ..slot()
        };
        assert_eq!(code(&lagging), ("lagging", 6));
        let briefly_inactive = SlotStatus {
            active: false,
            inactive_seconds: Some(10.0),
            ..slot()
        };
        assert_eq!(code(&briefly_inactive), ("ok", 0));
        let inactive = SlotStatus {
            active: false,
            inactive_seconds: Some(301.0),
            lag_bytes: Some(101),
            ..slot()
        };
        assert_eq!(code(&inactive), ("slot_inactive", 5));
        let inactive_before_17 = SlotStatus {
            active: false,
            ..slot()
        };
        assert_eq!(code(&inactive_before_17), ("slot_inactive", 5));
        let lost = SlotStatus {
            active: false,
            wal_status: Some("lost".into()),
            ..slot()
        };
        assert_eq!(code(&lost), ("slot_invalidated", 4));
        let invalidated = SlotStatus {
            invalidation_reason: Some("wal_removed".into()),
            ..slot()
        };
        assert_eq!(code(&invalidated), ("slot_invalidated", 4));
        let missing = SlotStatus {
            exists: false,
            ..slot()
        };
        assert_eq!(code(&missing), ("slot_missing", 3));
    }
}
