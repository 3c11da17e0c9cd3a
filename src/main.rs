//! The `outbox-relay` command line: `run`, `check`, `init`, `status`, `dlq`, `schemas`, `catalog`, `upcast`, and the shell
//! completions and man page generated from the same definitions.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use outbox_relay::admin;
use outbox_relay::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The version with the commit and the build date (`build.rs`), as `--version`, the start-up
/// log line and `outbox_relay_build_info` report it.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OUTBOX_RELAY_COMMIT"),
    ", built ",
    env!("OUTBOX_RELAY_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version = VERSION,
    about = "Relays outbox rows from PostgreSQL logical replication to message brokers"
)]
struct Cli {
    /// TOML configuration file; every key can also be set as OUTBOX_RELAY__SECTION__KEY.
    #[arg(long, short, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream outbox events to the configured sinks until SIGINT/SIGTERM.
    Run,
    /// Validate the configuration and the database; print each problem with its fix.
    Check,
    /// Create the relay schema, the publication and the replication slot (idempotent).
    Init,
    /// Show the slot (activity, lag, invalidation), the leader, checkpoints per sink and dead
    /// letters, with a verdict. Exit codes: 0 ok, 3 slot missing, 4 slot invalidated, 5 slot
    /// inactive past --max-inactive (any inactive slot before PostgreSQL 17), 6 lag over
    /// --max-lag-bytes; 1 when the command cannot run.
    Status {
        /// Print JSON (the same fields, for scripts).
        #[arg(long)]
        json: bool,
        /// How long the slot may be inactive before the verdict says so (e.g. 30s, 5m).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        max_inactive: std::time::Duration,
        /// How far the slot may lag behind the server's WAL, in bytes.
        #[arg(long, default_value_t = 1 << 30)]
        max_lag_bytes: u64,
    },
    /// List, show and replay dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Check the schema directory: each event type's versions against the one before.
    Schemas {
        #[command(subcommand)]
        action: SchemasAction,
    },
    /// Print the AsyncAPI 3.0 document of the events the configured sinks publish (one
    /// channel per sink, one message per schema version of validation.schema_dir), or with
    /// --markdown a one-page catalog for people.
    Catalog {
        /// The Markdown page instead of the AsyncAPI document.
        #[arg(long)]
        markdown: bool,
    },
    /// Run the [upcast] chain of an event type by hand: a payload of version --from on
    /// stdin, the payload of version --to (the latest the chain reaches when left out) on
    /// stdout, validated against that version's schema when validation.schema_dir is set.
    Upcast {
        /// The event type.
        #[arg(long = "type")]
        event_type: String,
        /// The payload's version.
        #[arg(long)]
        from: i64,
        /// The version wanted.
        #[arg(long)]
        to: Option<i64>,
    },
    /// The process upcasters run in while streaming (started by the relay itself).
    #[command(name = "upcast-sandbox", hide = true)]
    UpcastSandbox {
        /// The process's data segment limit.
        #[arg(long)]
        memory_bytes: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout.
    Man,
}

#[derive(Subcommand)]
enum SchemasAction {
    /// Compare every version N+1 of each event type with version N (Confluent's JSON Schema
    /// compatibility rules); print each difference. With the configuration (no --dir), also
    /// run each [upcast] step on the `examples` of its version's schema and validate the
    /// result. Exits 1 when a step breaks the required compatibility or an upcast example
    /// fails, for application CI.
    Check {
        /// The schema directory (default: validation.schema_dir of the configuration).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What every new version must keep.
        #[arg(long, value_enum, default_value = "backward")]
        compatibility: outbox_relay::schemas::Compatibility,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// The newest dead letters of a selection, oldest first.
    List {
        #[command(flatten)]
        selection: admin::Selection,
        /// Only those not replayed yet.
        #[arg(long)]
        open: bool,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its reason and raw row, as JSON.
    Show { id: i64 },
    /// Publish dead letters again after fixing their row_data in place: the given ids, or
    /// with --all every open one of the selection. A letter a sink refused goes back to that
    /// sink only. Exits 1 when one is refused (it would fail again) unless --force.
    Replay {
        ids: Vec<i64>,
        /// Every open dead letter of the selection (needed when no id is given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        selection: admin::Selection,
        /// Replay even what would be dead-lettered again (fails validation, or its sink is
        /// gone: then every sink that takes it gets it).
        #[arg(long)]
        force: bool,
    },
    /// Delete the dead letters of a selection stored longer ago than --older-than.
    Purge {
        /// Retention: delete what was stored before this long ago (e.g. 30d).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Only those already replayed.
        #[arg(long)]
        replayed_only: bool,
        #[command(flatten)]
        selection: admin::Selection,
    },
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "outbox-relay", &mut script);
            return print_bytes(&script);
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .context("rendering the man page")?;
            return print_bytes(&page);
        }
        Command::Schemas {
            action:
                SchemasAction::Check {
                    dir: Some(ref dir),
                    compatibility,
                },
        } => {
            let files = outbox_relay::schemas::read_schema_files(dir)?;
            return check_schemas(dir, &files, compatibility);
        }
        _ => {}
    }
    let config = Config::load(cli.config.as_deref())?;
    outbox_relay::logging::init(&config.log);
    match cli.command {
        Command::Completions { .. } | Command::Man | Command::UpcastSandbox { .. } => {}
        Command::Run => {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                commit = env!("OUTBOX_RELAY_COMMIT"),
                built = env!("OUTBOX_RELAY_BUILD_DATE"),
                "outbox-relay starting"
            );
            outbox_relay::telemetry::METRICS.set_build_info(
                env!("CARGO_PKG_VERSION"),
                env!("OUTBOX_RELAY_COMMIT"),
                env!("OUTBOX_RELAY_BUILD_DATE"),
            );
            if let Some(addr) = config.http.listen {
                outbox_relay::http::serve(addr).await?;
            }
            outbox_relay::lifecycle::run(cli.config.as_deref(), config).await?;
        }
        Command::Init => {
            for line in admin::init(&config).await.context("init failed")? {
                println!("{line}");
            }
        }
        Command::Check => {
            let report = admin::check(&config).await;
            for warning in &report.warnings {
                println!("warning: {warning}");
            }
            if report.problems.is_empty() {
                println!("ok: configuration, database, publication, slot and privileges are ready");
            } else {
                for problem in &report.problems {
                    println!("error: {problem}");
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status {
            json,
            max_inactive,
            max_lag_bytes,
        } => {
            let options = admin::StatusOptions {
                max_inactive,
                max_lag_bytes,
            };
            let status = admin::status(&config, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.text());
            }
            return Ok(ExitCode::from(status.verdict.exit_code));
        }
        Command::Schemas {
            action: SchemasAction::Check { compatibility, .. },
        } => {
            let Some(dir) = &config.validation.schema_dir else {
                anyhow::bail!(
                    "no schema directory: pass --dir, or set validation.schema_dir in the \
                     configuration"
                );
            };
            let upcasters = outbox_relay::upcast::Upcasters::compile(&config.upcast)?;
            let files = outbox_relay::schemas::read_schema_files(dir)?;
            let code = check_schemas(dir, &files, compatibility)?;
            let (report, passed) = outbox_relay::schemas::check_upcasters(&files, &upcasters)?;
            print_bytes(report.as_bytes())?;
            return Ok(match passed {
                true => code,
                false => ExitCode::FAILURE,
            });
        }
        Command::Upcast {
            event_type,
            from,
            to,
        } => return upcast(&config, &event_type, from, to),
        Command::Catalog { markdown } => {
            let text = match markdown {
                true => outbox_relay::schemas::catalog::markdown(&config)?,
                false => {
                    let document = outbox_relay::schemas::catalog::asyncapi(&config)?;
                    serde_json::to_string_pretty(&document)? + "\n"
                }
            };
            return print_bytes(text.as_bytes());
        }
        Command::Dlq { action } => match action {
            DlqAction::List {
                selection,
                open,
                limit,
                json,
            } => print!(
                "{}",
                admin::dlq_list(&config, &selection, open, limit, json).await?
            ),
            DlqAction::Show { id } => print!("{}", admin::dlq_show(&config, id).await?),
            DlqAction::Replay {
                ids,
                all,
                selection,
                force,
            } => {
                if ids.is_empty() && !all {
                    anyhow::bail!(
                        "name the dead letters to replay (`dlq replay 17 18`), or pass --all \
                         with a selection (--sink, --table, --reason, --since, --until)"
                    );
                }
                let report = admin::dlq_replay(&config, &ids, &selection, force).await?;
                print!("{}", report.text());
                if !report.refused.is_empty() {
                    return Ok(ExitCode::FAILURE);
                }
            }
            DlqAction::Purge {
                older_than,
                replayed_only,
                selection,
            } => print!(
                "{}",
                admin::dlq_purge(&config, &selection, older_than, replayed_only).await?
            ),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `upcast`: the payload on stdin through the chain; the result on stdout, the version
/// reached on stderr; exit 1 (with the reason) when a step or the target schema refuses it.
fn upcast(
    config: &Config,
    event_type: &str,
    from: i64,
    to: Option<i64>,
) -> anyhow::Result<ExitCode> {
    use std::io::Read;
    let upcasters = outbox_relay::upcast::Upcasters::compile(&config.upcast)?;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the payload from stdin")?;
    let payload: serde_json::Value =
        serde_json::from_str(&text).context("the payload on stdin is not JSON")?;
    let (payload, version) = match upcasters.upcast(event_type, from, to, payload) {
        Ok(done) => done,
        Err(reason) => {
            eprintln!("error: {reason}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let output = serde_json::to_string_pretty(&payload)? + "\n";
    if let Some(dir) = &config.validation.schema_dir {
        let schemas = outbox_relay::validation::SchemaRegistry::load(dir, false)?;
        if let Err(reason) = schemas.check_payload(event_type, Some(version), Some(&output)) {
            eprintln!("error: version {version} of {event_type} does not validate: {reason}");
            return Ok(ExitCode::FAILURE);
        }
    }
    eprintln!("{event_type} version {from} -> {version}");
    print_bytes(output.as_bytes())
}

/// `schemas check`: the report on stdout; exit 1 when a step breaks `level`.
fn check_schemas(
    dir: &std::path::Path,
    files: &[outbox_relay::schemas::SchemaFile],
    level: outbox_relay::schemas::Compatibility,
) -> anyhow::Result<ExitCode> {
    let steps = outbox_relay::schemas::check_files(dir, files)?;
    print_bytes(outbox_relay::schemas::report(&steps, level).as_bytes())?;
    Ok(match steps.iter().all(|step| step.keeps(level)) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

/// Writes generated text to stdout; a reader that closed the pipe early (`| head`) is not an
/// error.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// How long the exit waits for blocking calls still running. Client libraries' calls that
/// cannot be cancelled run on blocking threads with the sink's `timeout` (librdkafka's
/// flush and transaction calls, up to 30 s by default); against a broker that does not
/// answer, one of them must not hold the exit after the session has ended.
const EXIT_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::UpcastSandbox { memory_bytes } = cli.command {
        // Before any runtime: the helper is one thread reading its pipe.
        return match outbox_relay::upcast::sandbox::serve(memory_bytes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    };
    runtime.shutdown_timeout(EXIT_GRACE);
    code
}
