//! The sending half of a replication connection while it streams: standby status updates,
//! sent by their own task on their own timer (and whenever the server asks), so a stalled
//! pipeline never trips `wal_sender_timeout`, and promptly whenever the confirmed LSN moves.
//!
//! Invariant: the flushed position reported is only ever the pipeline's confirmed LSN, the
//! end of a transaction every sink acknowledged ([`Progress::confirmed`]); the server may
//! forget the WAL before it.

use super::replication::{Io, SourceError};
use super::wire;
use crate::pipeline::Progress;
use crate::telemetry::{gauge_value, METRICS};
use bytes::BytesMut;
use outbox_relay_sinks::Lsn;
use postgres_protocol::message::frontend;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::{watch, Notify};

/// The sending half while streaming: standby status updates.
pub struct StatusWriter {
    writer: WriteHalf<Box<dyn Io>>,
    out: BytesMut,
}

impl StatusWriter {
    pub(super) fn new(writer: WriteHalf<Box<dyn Io>>) -> Self {
        StatusWriter {
            writer,
            out: BytesMut::with_capacity(64),
        }
    }

    /// Reports `received` as written and `confirmed` as flushed and applied: the server may
    /// forget WAL up to `confirmed`.
    pub async fn send(&mut self, received: Lsn, confirmed: Lsn) -> Result<(), SourceError> {
        self.out.clear();
        wire::standby_status_update(
            received.0,
            confirmed.0,
            confirmed.0,
            wire::pg_now(),
            &mut self.out,
        );
        self.writer.write_all(&self.out).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Ends streaming and the session politely.
    pub async fn finish(mut self) -> Result<(), SourceError> {
        self.out.clear();
        frontend::copy_done(&mut self.out);
        frontend::terminate(&mut self.out);
        self.writer.write_all(&self.out).await?;
        self.writer.shutdown().await?;
        Ok(())
    }
}

/// How often the confirmed LSN is checked, and sent at once when it moved. Confirming
/// promptly keeps the slot close to what the sinks hold, so a relay restarted after a crash
/// re-reads little WAL only to skip it; a status update is a few dozen bytes.
pub const CONFIRM_CHECK: Duration = Duration::from_millis(100);

/// Sends standby status updates every `interval` and whenever the server asks, independent
/// of the reader, and within [`CONFIRM_CHECK`] of the confirmed LSN moving; on stop, a final
/// update with the last confirmed LSN, then ends streaming.
pub async fn status_updates(
    mut writer: StatusWriter,
    progress: Arc<Progress>,
    interval: Duration,
    reply_requested: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SourceError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut confirm_check = tokio::time::interval(CONFIRM_CHECK);
    confirm_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = reply_requested.notified() => {}
            _ = confirm_check.tick() => {
                if sent == Some(progress.confirmed()) {
                    continue;
                }
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let (received, confirmed) = (progress.received_lsn(), progress.confirmed());
        writer.send(received, confirmed).await?;
        sent = Some(confirmed);
        METRICS.received_lsn.set(gauge_value(received.0));
        METRICS.confirmed_lsn.set(gauge_value(confirmed.0));
        METRICS
            .replication_lag_bytes
            .set(gauge_value(received.0.saturating_sub(confirmed.0)));
    }
    writer
        .send(progress.received_lsn(), progress.confirmed())
        .await?;
    writer.finish().await
}
