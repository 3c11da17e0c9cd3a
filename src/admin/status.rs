//! `outbox-relay status`: slot activity and lag, checkpoints per sink, dead letters.

use super::relay_table;
use crate::config::Config;
use crate::db;
use crate::source::slot::{self};
use anyhow::Context;

/// A human-readable report: slot activity and lag, checkpoints per sink, dead letters.
pub async fn status(config: &Config) -> anyhow::Result<String> {
    let source = &config.source;
    let client = db::connect(&source.connect_params()?).await?;
    let mut out = String::new();
    let slot = client
        .query_opt(
            &format!(
                "SELECT active, active_pid, confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, {} \
                 FROM pg_replication_slots s WHERE slot_name = $1",
                slot::SLOT_IS_FAILOVER
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?;
    match slot {
        None => out.push_str(&format!(
            "slot {}: does not exist (run `outbox-relay init`)\n",
            source.slot
        )),
        Some(row) => {
            let active: bool = row.get(0);
            let pid: Option<i32> = row.get(1);
            let confirmed: Option<String> = row.get(2);
            let current: String = row.get(3);
            let lag: Option<i64> = row.get(4);
            let failover: bool = row.get(5);
            out.push_str(&format!(
                "slot {}: {}{}\n  confirmed_flush_lsn {}\n  server wal_lsn      {}\n  lag                 {} bytes\n",
                source.slot,
                match pid {
                    Some(pid) if active => format!("active (pid {pid})"),
                    _ => "inactive".into(),
                },
                if failover { ", a failover slot" } else { "" },
                confirmed.unwrap_or_else(|| "-".into()),
                current,
                lag.map_or_else(|| "-".into(), |l| l.to_string()),
            ));
        }
    }
    let rows = client
        .query(
            &format!("SELECT sink, commit_lsn::text, event_index, updated_at::text FROM {} WHERE slot = $1 ORDER BY sink", relay_table(config, "checkpoints")),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)
        .context("reading checkpoints (run `outbox-relay init` first)")?;
    out.push_str("checkpoints:\n");
    for name in config.sinks.keys() {
        match rows.iter().find(|r| r.get::<_, String>(0) == *name) {
            Some(row) => out.push_str(&format!(
                "  {name}: {}#{} (updated {})\n",
                row.get::<_, String>(1),
                row.get::<_, i32>(2),
                row.get::<_, String>(3)
            )),
            None => out.push_str(&format!("  {name}: none yet\n")),
        }
    }
    let dead: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE slot = $1",
                relay_table(config, "dead_letters")
            ),
            &[&source.slot],
        )
        .await
        .map_err(db::explain)?
        .get(0);
    out.push_str(&format!("dead letters: {dead}\n"));
    Ok(out)
}
