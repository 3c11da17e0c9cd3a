//! Where upcasters run inside the stream: a helper process of the relay's own binary
//! (`outbox-relay upcast-sandbox`, hidden), which compiles the `[upcast]` programs and runs
//! one chain per request. jq programs can loop forever, allocate without end or recurse past
//! any stack, and jaq has no fuel: in the relay's own process a runaway program would stall
//! its sink, exhaust memory or abort the relay. In a process of its own it is bounded: the
//! relay waits `relay.upcast_timeout` per event and kills the helper past it, and the helper
//! limits its own data segment to `relay.upcast_memory_bytes` (`RLIMIT_DATA`), so an
//! allocation beyond it, like a stack overflow, ends the helper and nothing else.
//!
//! The pipe carries frames: a little-endian `u32` length, then that many bytes of JSON. The
//! first frame is the programs (`[upcast]` as a table), then one frame per job
//! (`{"type", "from", "to", "payload"}`) answered by one frame (`{"payload"}`, the payload
//! at version `to`, or `{"error"}`), in order.
//!
//! Invariants:
//! - [`Sandbox::run`] answers a prefix of its jobs, in order, ending at the first job that
//!   ran out of time or whose helper died ([`Outcome::TimedOut`], [`Outcome::Died`]); that
//!   helper is gone, and the next call starts another.
//! - The helper ends when the relay does, even while it runs a program: at the end of its
//!   input, or within half a second of the relay's death.
//! - The helper runs with an empty environment (a program cannot read the relay's secrets
//!   from `$ENV`) and its standard error discarded (a panic message could quote a payload).

use super::{Programs, Upcasters};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The hidden subcommand that runs the helper.
pub const SUBCOMMAND: &str = "upcast-sandbox";

/// A frame larger than this is refused by the helper (a payload this size is not an event).
const MAX_FRAME: u32 = 1 << 30;

/// How an event's upcast ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The payload at the job's `to` version, as JSON text.
    Upcast(String),
    /// The chain failed on this payload (no value, several, a jq error); the reason never
    /// quotes the payload.
    Failed(String),
    /// The chain ran past the time limit; the helper was killed.
    TimedOut,
    /// The helper died while running the chain (out of memory, stack overflow); how it
    /// ended.
    Died(String),
}

/// One event to upcast.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    pub event_type: &'a str,
    pub from: i64,
    pub to: i64,
    /// The payload, JSON text.
    pub payload: &'a str,
}

/// The limits of one helper process.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long one event's chain may run.
    pub time: Duration,
    /// The helper's data segment (`RLIMIT_DATA`), bytes.
    pub memory_bytes: u64,
}

/// The relay's side: starts the helper when needed and hands it jobs.
pub struct Sandbox {
    exe: PathBuf,
    /// The first frame: the programs.
    programs: Vec<u8>,
    limits: Limits,
    helper: Option<Helper>,
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A helper's answer to one job.
#[derive(Serialize, Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload: Option<Box<serde_json::value::RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A job as the helper reads it.
#[derive(Deserialize)]
struct Request {
    #[serde(rename = "type")]
    event_type: String,
    from: i64,
    to: i64,
    payload: serde_json::Value,
}

impl Sandbox {
    /// A sandbox for `programs` (`[upcast]`), running the helper from `exe` (the relay's
    /// binary).
    pub fn new(exe: PathBuf, programs: &Programs, limits: Limits) -> Self {
        Sandbox {
            exe,
            programs: serde_json::to_vec(programs).expect("programs serialize"),
            limits,
            helper: None,
        }
    }

    /// The limits each helper runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Runs `jobs` in order; the outcomes of a prefix of them, ending at the first that
    /// timed out or whose helper died (the caller decides what to run next). `Err` only when
    /// no helper can be started.
    pub async fn run(&mut self, jobs: &[Job<'_>]) -> std::io::Result<Vec<Outcome>> {
        let mut frames = Vec::new();
        for job in jobs {
            push_job(&mut frames, job);
        }
        let limit = self.limits.time;
        if let Some(helper) = &mut self.helper {
            // A helper that ended between calls (killed from outside) is not blamed on the
            // next job.
            if !matches!(helper.child.try_wait(), Ok(None)) {
                self.helper = None;
            }
        }
        let helper = match &mut self.helper {
            Some(helper) => helper,
            None => self.helper.insert(self.start().await?),
        };
        let Helper { stdin, stdout, .. } = helper;
        let write = async {
            // A helper that died makes the write fail: the read below finds out why.
            let _ = stdin.write_all(&frames).await;
            let _ = stdin.flush().await;
            std::future::pending::<()>().await
        };
        let read = async {
            let mut outcomes = Vec::with_capacity(jobs.len());
            for _ in jobs {
                match tokio::time::timeout(limit, read_frame(stdout)).await {
                    Ok(Ok(frame)) => outcomes.push(answer(&frame)),
                    Ok(Err(_)) => {
                        outcomes.push(Outcome::Died(String::new()));
                        break;
                    }
                    Err(_) => {
                        outcomes.push(Outcome::TimedOut);
                        break;
                    }
                }
            }
            outcomes
        };
        let mut outcomes = tokio::select! {
            outcomes = read => outcomes,
            () = write => unreachable!("the write never completes"),
        };
        if let Some(Outcome::TimedOut | Outcome::Died(_)) = outcomes.last() {
            let mut helper = self.helper.take().expect("the helper ran the jobs");
            let _ = helper.child.start_kill();
            let status = helper.child.wait().await;
            if let Some(Outcome::Died(how)) = outcomes.last_mut() {
                *how = match status {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("its status is unknown: {e}"),
                };
            }
        }
        Ok(outcomes)
    }

    async fn start(&self) -> std::io::Result<Helper> {
        let mut child = Command::new(&self.exe)
            .arg(SUBCOMMAND)
            .arg("--memory-bytes")
            .arg(self.limits.memory_bytes.to_string())
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut first = Vec::with_capacity(self.programs.len() + 4);
        push_frame(&mut first, &self.programs);
        stdin.write_all(&first).await?;
        Ok(Helper {
            child,
            stdin,
            stdout,
        })
    }
}

fn push_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// A job's frame: the payload goes in as the JSON text it is, not parsed here.
fn push_job(out: &mut Vec<u8>, job: &Job<'_>) {
    let head = serde_json::json!({"type": job.event_type, "from": job.from, "to": job.to});
    let mut body = serde_json::to_vec(&head).expect("a JSON object serializes");
    body.pop();
    body.extend_from_slice(b",\"payload\":");
    body.extend_from_slice(job.payload.as_bytes());
    body.push(b'}');
    push_frame(out, &body);
}

async fn read_frame(stdout: &mut BufReader<ChildStdout>) -> std::io::Result<Vec<u8>> {
    let len = stdout.read_u32_le().await?;
    let mut body = vec![0; len as usize];
    stdout.read_exact(&mut body).await?;
    Ok(body)
}

fn answer(frame: &[u8]) -> Outcome {
    match serde_json::from_slice::<Answer>(frame) {
        Ok(Answer {
            payload: Some(payload),
            ..
        }) => Outcome::Upcast(payload.get().to_owned()),
        Ok(Answer {
            error: Some(error), ..
        }) => Outcome::Failed(error),
        _ => Outcome::Failed("the upcaster process sent an answer that does not parse".into()),
    }
}

/// The helper's side (`outbox-relay upcast-sandbox`): limits its memory, reads the
/// programs, then answers jobs until its input ends. Synchronous: it runs before any async
/// runtime starts.
pub fn serve(memory_bytes: u64) -> anyhow::Result<()> {
    limit_data_segment(memory_bytes)?;
    exit_when_orphaned()?;
    let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin().lock());
    let mut output = std::io::BufWriter::new(std::io::stdout().lock());
    let Some(programs) = read_sync(&mut input)? else {
        return Ok(());
    };
    let programs: Programs = serde_json::from_slice(&programs)?;
    let upcasters = Upcasters::compile(&programs)?;
    while let Some(frame) = read_sync(&mut input)? {
        let answer = match serde_json::from_slice::<Request>(&frame) {
            Ok(request) => match upcasters.upcast(
                &request.event_type,
                request.from,
                Some(request.to),
                request.payload,
            ) {
                // The chain stops at `to` or fails: what it returns is version `to`.
                Ok((payload, _)) => Answer {
                    payload: Some(serde_json::value::to_raw_value(&payload)?),
                    error: None,
                },
                Err(error) => Answer {
                    payload: None,
                    error: Some(error),
                },
            },
            Err(_) => Answer {
                payload: None,
                error: Some(
                    "the payload cannot be upcast: it does not parse as JSON within the \
                     upcaster's nesting limit (128 levels)"
                        .into(),
                ),
            },
        };
        let body = serde_json::to_vec(&answer)?;
        output.write_all(&(body.len() as u32).to_le_bytes())?;
        output.write_all(&body)?;
        // Each answer goes out before the next job starts: the relay times every answer,
        // and a later job may never end.
        output.flush()?;
    }
    Ok(())
}

/// One frame, or `None` at the end of the input.
fn read_sync(input: &mut impl Read) -> anyhow::Result<Option<Vec<u8>>> {
    let mut len = [0; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    anyhow::ensure!(len <= MAX_FRAME, "a frame of {len} bytes is too large");
    let mut body = vec![0; len as usize];
    input.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Ends this process once its parent is gone: a relay killed with SIGKILL cannot kill its
/// helper, and a helper busy in a runaway program never reads the end of its input.
fn exit_when_orphaned() -> std::io::Result<()> {
    let parent = std::os::unix::process::parent_id();
    std::thread::Builder::new()
        .name("orphan-watch".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(1);
            }
        })?;
    Ok(())
}

/// Caps this process's data segment (heap and private mappings): an allocation beyond it
/// fails, and the process aborts.
fn limit_data_segment(bytes: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct it is given and changes only this process's limits.
    let done = unsafe { libc::setrlimit(libc::RLIMIT_DATA, &limit) };
    anyhow::ensure!(
        done == 0,
        "cannot limit the upcaster's memory: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
