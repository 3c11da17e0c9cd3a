//! The file sink: appends one event per line to a file, fsyncs each batch, and (in the
//! CloudEvents format, whose lines carry their position) recovers its position from the
//! file's last complete line. Because the file itself records how far it got, a restart
//! after a crash neither repeats nor loses events (exactly-once into the file). In the
//! debezium and raw formats lines carry no position, so the relay's checkpoint table
//! decides (at-least-once after a crash). A torn last line from a crash mid-write is cut
//! off before appending.
//!
//! A batch is written, and with `fsync` synced, by blocking `std::fs` calls on the blocking
//! pool, and acknowledged only once they returned: an error (a full disk above all) fails
//! that batch, never a later one. `tokio::fs::File` would hand the write to a background
//! task and report its failure only on the next call, after the batch was acknowledged. A
//! full disk is retried (the operator frees space, the batch goes in), and the torn part of
//! the failed batch is cut off first.

use crate::format::{self, Format};
use crate::kind::{default_true, Channel, ConfigError, SinkContext, SinkKind};
use crate::routing::MatchRule;
use crate::upcast_rule::UpcastRule;
use crate::{Event, EventState, Position, Sink, SinkError};
use async_trait::async_trait;
use serde::Deserialize;
use std::io::{SeekFrom, Write};
use std::path::PathBuf;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// `type = "file"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: PathBuf,
    /// fsync every batch before acknowledging it.
    #[serde(default = "default_true")]
    pub fsync: bool,
    #[serde(default)]
    pub format: Format,
    #[serde(default, rename = "match")]
    pub filter: MatchRule,
    #[serde(default)]
    pub upcast: UpcastRule,
}

impl SinkKind for FileConfig {
    fn build(&self, _ctx: &SinkContext<'_>) -> Result<Box<dyn Sink>, ConfigError> {
        Ok(Box::new(FileSink::new(&self.path, self.format, self.fsync)))
    }

    fn filter(&self) -> &MatchRule {
        &self.filter
    }

    fn upcast(&self) -> &UpcastRule {
        &self.upcast
    }

    fn channel(&self) -> Channel {
        Channel {
            protocol: "file",
            address: self.path.display().to_string(),
            route: None,
            format: self.format,
            guarantee: "commit order; exactly once in the cloudevents format",
        }
    }
}

pub struct FileSink {
    path: PathBuf,
    format: Format,
    fsync: bool,
    /// The open file and its length after the last acknowledged batch. A failed append is
    /// cut back to that length before the retry, so a torn batch never stays in the file.
    open: Option<(std::fs::File, u64)>,
    buf: Vec<u8>,
}

impl FileSink {
    /// A sink appending to `path`; with `fsync`, a batch is acknowledged only once it is on
    /// disk.
    pub fn new(path: impl Into<PathBuf>, format: Format, fsync: bool) -> Self {
        FileSink {
            path: path.into(),
            format,
            fsync,
            open: None,
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    fn io_error(&self, action: &str, err: std::io::Error) -> SinkError {
        let context = format!("{action} {}", self.path.display());
        match err.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                SinkError::Retryable(format!(
                    "{context}: {err}: free space on its file system; the batch is retried"
                ))
            }
            _ => SinkError::from_io(&context, err),
        }
    }

    /// Opens the file and cuts it back to its last complete line; returns that line.
    async fn open(&mut self) -> Result<Option<Vec<u8>>, SinkError> {
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| self.io_error("creating the directory of", e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
            .await
            .map_err(|e| self.io_error("opening", e))?;
        let (complete_len, last_line) = last_complete_line(&mut file)
            .await
            .map_err(|e| self.io_error("reading", e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| self.io_error("reading", e))?
            .len();
        if len > complete_len {
            tracing::warn!(path = %self.path.display(), bytes = len - complete_len,
                "cutting off a torn last line left by an interrupted write");
            file.set_len(complete_len)
                .await
                .map_err(|e| self.io_error("truncating", e))?;
        }
        self.open = Some((file.into_std().await, complete_len));
        Ok(last_line)
    }

    /// Appends `buf` (and syncs it, with `fsync`) on the blocking pool; returns the buffer
    /// for reuse. Once this returned `Ok`, the bytes are in the file (on disk, with `fsync`).
    /// On an error the file is cut back to its last acknowledged length and closed: the
    /// next attempt reopens it (and cuts again, should this cut have failed).
    async fn append(&mut self, buf: Vec<u8>) -> (Vec<u8>, Result<(), SinkError>) {
        let Some((mut file, len)) = self.open.take() else {
            return (
                buf,
                Err(SinkError::Retryable("the file is not open".into())),
            );
        };
        let fsync = self.fsync;
        let written = tokio::task::spawn_blocking(move || {
            let result =
                file.write_all(&buf)
                    .and_then(|()| if fsync { file.sync_data() } else { Ok(()) });
            if result.is_err() {
                let _ = file.set_len(len);
            }
            (file, buf, result)
        })
        .await;
        match written {
            Ok((file, buf, Ok(()))) => {
                self.open = Some((file, len + buf.len() as u64));
                (buf, Ok(()))
            }
            Ok((_, buf, Err(err))) => (buf, Err(self.io_error("appending to", err))),
            Err(join) => (
                Vec::new(),
                Err(SinkError::Retryable(format!(
                    "appending to {}: the write task failed: {join}",
                    self.path.display()
                ))),
            ),
        }
    }
}

/// Returns the offset of the last `byte` strictly before `end`, reading backwards in chunks.
async fn rfind_byte(file: &mut File, end: u64, byte: u8) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = end;
    let mut chunk = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        chunk.resize((end - start) as usize, 0);
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(&mut chunk).await?;
        if let Some(i) = chunk.iter().rposition(|&b| b == byte) {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

/// The length of `file` up to its last newline, and the last complete line (without it).
async fn last_complete_line(file: &mut File) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    let len = file.metadata().await?.len();
    let Some(last_newline) = rfind_byte(file, len, b'\n').await? else {
        return Ok((0, None));
    };
    let line_start = rfind_byte(file, last_newline, b'\n')
        .await?
        .map_or(0, |p| p + 1);
    let mut line = vec![0; (last_newline - line_start) as usize];
    file.seek(SeekFrom::Start(line_start)).await?;
    file.read_exact(&mut line).await?;
    Ok((last_newline + 1, Some(line)))
}

#[async_trait]
impl Sink for FileSink {
    async fn recover(&mut self) -> Result<Option<Position>, SinkError> {
        let Some(line) = self.open().await? else {
            return Ok(None);
        };
        if self.format != Format::CloudEvents {
            return Ok(None);
        }
        format::position_of_line(&line).map(Some).ok_or_else(|| {
            SinkError::Permanent(format!(
                "the last line of {} is not an outbox-relay event: point the file sink at a new \
                 file or at one this relay wrote",
                self.path.display()
            ))
        })
    }

    async fn send(&mut self, batch: &[Event], _states: &mut [EventState]) -> Result<(), SinkError> {
        if self.open.is_none() {
            self.open().await?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for event in batch {
            format::write_line(self.format, event, &mut buf);
        }
        let (buf, appended) = self.append(buf).await;
        self.buf = buf;
        appended
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        if let Some((file, _)) = self.open.take() {
            tokio::task::spawn_blocking(move || file.sync_all())
                .await
                .map_err(|e| SinkError::Retryable(format!("syncing: {e}")))?
                .map_err(|e| self.io_error("syncing", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    fn event(lsn: u64, index: u32) -> Event {
        crate::format::tests::sample(lsn, index)
    }

    #[tokio::test]
    async fn recovers_last_position_and_cuts_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("file-sink-{}", std::process::id()));
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_dir_all(&dir);

        let mut sink = FileSink::new(&path, Format::CloudEvents, false);
        assert_eq!(sink.recover().await.unwrap(), None);
        let batch = [event(100, 0), event(100, 1), event(200, 0)];
        sink.send(
            &batch,
            &mut [
                EventState::Pending,
                EventState::Pending,
                EventState::Pending,
            ],
        )
        .await
        .unwrap();
        sink.close().await.unwrap();

        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"{\"id\":\"half");
        std::fs::write(&path, &torn).unwrap();

        let mut sink = FileSink::new(&path, Format::CloudEvents, false);
        assert_eq!(
            sink.recover().await.unwrap(),
            Some(Position {
                commit_lsn: Lsn(200),
                index: 0
            })
        );
        sink.send(&[event(300, 0)], &mut [EventState::Pending])
            .await
            .unwrap();
        sink.close().await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// /dev/full fails every write with ENOSPC: the batch that hit it fails, and is retried.
    #[tokio::test]
    async fn a_full_disk_fails_the_batch_that_hit_it() {
        if !std::path::Path::new("/dev/full").exists() {
            eprintln!("SKIPPED: no /dev/full on this system");
            return;
        }
        let mut sink = FileSink::new("/dev/full", Format::CloudEvents, false);
        match sink
            .send(&[event(100, 0)], &mut [EventState::Pending])
            .await
        {
            Err(SinkError::Retryable(reason)) => {
                assert!(reason.contains("free space"), "{reason}")
            }
            other => panic!("expected a retryable error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn refuses_a_foreign_file() {
        let dir = std::env::temp_dir().join(format!("file-sink-foreign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notes.txt");
        std::fs::write(&path, "shopping list\n").unwrap();
        let err = FileSink::new(&path, Format::CloudEvents, false)
            .recover()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("not an outbox-relay event"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
