//! The `run` process around the relay: SIGTERM or SIGINT drain the deliveries in flight and
//! end it; SIGHUP reloads the configuration.
//!
//! A reload reads the configuration again (file and environment) and validates it. If it
//! does not load, the relay goes on with the one it has and says why. If it loads, the
//! running session drains as on SIGTERM (checkpoints written, the leader lock released) and
//! a new one starts with the new configuration: sinks, tables and every `[source]`,
//! `[relay]`, `[leader]` key take effect. `http.listen` and `[log]` are set up once per
//! process: a change to them is reported and needs a restart.

use crate::config::Config;
use crate::relay;
use anyhow::Context;
use std::path::{Path, PathBuf};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

/// What a signal asks of the process.
enum Request {
    Stop,
    Reload,
}

/// The signals `run` handles, registered before the first session starts.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Signals> {
        let register =
            |kind: SignalKind| signal(kind).context("cannot install the relay's signal handlers");
        Ok(Signals {
            terminate: register(SignalKind::terminate())?,
            interrupt: register(SignalKind::interrupt())?,
            hangup: register(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.terminate.recv() => Request::Stop,
            _ = self.interrupt.recv() => Request::Stop,
            _ = self.hangup.recv() => Request::Reload,
        }
    }
}

/// Runs the relay with `config` (loaded from `path` and the environment) until SIGTERM,
/// SIGINT or a permanent error, restarting it with the reloaded configuration on SIGHUP.
pub async fn run(path: Option<&Path>, mut config: Config) -> anyhow::Result<()> {
    let path: Option<PathBuf> = path.map(Path::to_path_buf);
    let mut signals = Signals::register()?;
    loop {
        let process_wide = (config.http.listen, config.log.clone());
        let (stop, stopped) = watch::channel(false);
        // On a worker thread rather than the main thread: the reader, the sink workers and
        // the I/O driver then share the runtime's workers, without a futex hand-off per
        // wakeup (relay CPU per event -20 to -34%, BENCHMARKS.md).
        let mut session = tokio::spawn(relay::run(config, stopped));
        let reloaded = loop {
            tokio::select! {
                finished = &mut session => {
                    return finished.context("the relay task panicked")?;
                }
                request = signals.next() => match request {
                    Request::Stop => {
                        info!("shutdown requested: draining in-flight events");
                        let _ = stop.send(true);
                        return session.await.context("the relay task panicked")?;
                    }
                    Request::Reload => match Config::load(path.as_deref()) {
                        Ok(reloaded) => break reloaded,
                        Err(err) => warn!(
                            error = %format!("{err:#}"),
                            "SIGHUP: the configuration does not load; going on with the running one"
                        ),
                    },
                },
            }
        };
        if (reloaded.http.listen, reloaded.log.clone()) != process_wide {
            warn!("SIGHUP: http.listen and [log] take effect at the next start of the process, not now");
        }
        info!(
            "SIGHUP: configuration reloaded; draining the running session, then restarting with it"
        );
        let _ = stop.send(true);
        session.await.context("the relay task panicked")??;
        config = reloaded;
    }
}
