//! The publication watch: while the relay streams, checks every
//! `source.publication_check_interval` that the publication still delivers every outbox
//! table's inserts. Rows a publication holds back never reach the relay at all, so this is
//! the only place they can be noticed.
//!
//! Invariant: it reports (error log, `outbox_relay_unpublished_tables`); it never ends the
//! session, since the stream itself stays correct for what it carries.

use crate::config::{ConnectParams, Shard};
use crate::db;
use crate::tables;
use crate::telemetry::METRICS;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

/// What the publication watch needs.
pub struct PublicationWatch {
    pub params: ConnectParams,
    pub publication: String,
    pub tables: Vec<String>,
    /// The shard the relay streams, when the outbox is key-sharded.
    pub shard: Option<Shard>,
    pub interval: Duration,
}

/// Checks every `interval` that the publication still delivers every outbox table's inserts,
/// and says loudly (error log, `outbox_relay_unpublished_tables`) when it does not: a table
/// dropped and re-created leaves the publication, a changed `publish` or a row filter keeps
/// rows back, and those rows then never reach the relay at all.
pub async fn watch_publication(watch: PublicationWatch, mut stop: watch::Receiver<bool>) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut reported: Vec<tables::PublicationProblem> = Vec::new();
    let mut ticker = tokio::time::interval(watch.interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = db::connect(&watch.params).await.ok();
        }
        let Some(sql) = &client else { continue };
        let problems = match tables::publication_problems(
            sql,
            &watch.publication,
            &watch.tables,
            watch.shard,
        )
        .await
        {
            Ok(problems) => problems,
            Err(err) => {
                debug!(error = %format!("{err:#}"), "checking the publication failed; trying again later");
                continue;
            }
        };
        let hidden = problems.iter().filter(|p| !p.is_warning()).count();
        METRICS.unpublished_tables.set(hidden as i64);
        if problems != reported {
            if problems.is_empty() {
                info!(publication = %watch.publication, "the publication delivers every outbox table's inserts again");
            }
            for problem in problems.iter().filter(|p| !reported.contains(p)) {
                if problem.is_warning() {
                    warn!(publication = %watch.publication, "{problem}");
                } else {
                    error!(publication = %watch.publication, "{problem}");
                }
            }
            reported = problems;
        }
    }
}
