//! `batchrouterd`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use batchrouter_config::{load, render_effective, OsEnv};
use batchrouter_destinations::REGISTRY;
use batchrouterd::{app, enqueue, logging};
use clap::{Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  batchrouterd demo
      Run every destination type against local stand-ins and print a summary.
  batchrouterd --config /etc/batchrouter/batchrouter.toml
      Run the daemon (`run` is the default command).
  batchrouterd check-config --config batchrouter.toml
      Validate a config and print it with secrets redacted.
  batchrouterd enqueue --config batchrouter.toml --destination crm events.ndjson
      Put one job per NDJSON line into the store.
  RSERVER_BATCH_ROUTER_HTTP_MAX_RETRIES=5 batchrouterd run --config batchrouter.toml
      Override a router key from the environment (RudderStack names work).";

/// Moves jobs from a job store into bulk and asynchronous destinations and
/// reports every record's outcome.
#[derive(Parser)]
#[command(name = "batchrouterd", version, about, after_help = EXAMPLES)]
struct Cli {
    /// Config file (TOML; .yaml/.yml/.json also accepted).
    #[arg(
        short,
        long,
        global = true,
        env = "BATCHROUTER_CONFIG",
        default_value = "config/batchrouter.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or Ctrl-C (the default).
    Run,
    /// Validate the config, print it with secrets redacted, exit 1 listing every problem.
    CheckConfig,
    /// Put jobs (one JSON object per line) into the store.
    Enqueue {
        /// Destination id the jobs are for.
        #[arg(long)]
        destination: String,
        /// Use this payload field as the job's message id (idempotent re-runs).
        #[arg(long)]
        message_id_field: Option<String>,
        /// NDJSON file, or `-` for stdin.
        file: Option<PathBuf>,
    },
    /// Run the quick start: local stand-ins, sample jobs, live progress, a summary.
    #[cfg(feature = "demo")]
    Demo {
        /// Keep the demo's store and staging directory instead of deleting them.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result =
        runtime.block_on(async move {
            match cli.command.unwrap_or(Command::Run) {
                Command::Run => run(&cli.config).await,
                Command::CheckConfig => check_config(&cli.config),
                Command::Enqueue {
                    destination,
                    message_id_field,
                    file,
                } => {
                    let cfg = load(&cli.config, Arc::new(OsEnv), &REGISTRY)?;
                    let r = enqueue::run(
                        &cfg,
                        &destination,
                        file.as_deref(),
                        message_id_field.as_deref(),
                    )
                    .await?;
                    println!(
                    "enqueued {} job(s) for `{destination}` ({} duplicate message id(s) skipped){}",
                    r.inserted,
                    r.duplicates,
                    if r.via_api { " through the running daemon" } else { "" }
                );
                    Ok(ExitCode::SUCCESS)
                }
                #[cfg(feature = "demo")]
                Command::Demo { keep } => {
                    batchrouterd::demo::run(batchrouterd::demo::DemoOptions { keep }).await
                }
            }
        });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    match load(path, Arc::new(OsEnv), &REGISTRY) {
        Ok(cfg) => {
            println!(
                "# {} is valid. Effective configuration (secrets redacted):\n",
                path.display()
            );
            print!("{}", render_effective(&cfg));
            for w in &cfg.ignored {
                eprintln!("warning: {w}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cfg = load(path, Arc::new(OsEnv), &REGISTRY)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    logging::init(&cfg.logging);
    let app = app::start(&cfg).await?;
    println!("batchrouterd listening on http://{}", app.addr());
    wait_for_signal()
        .await
        .context("cannot install signal handlers")?;
    let report = app.shutdown().await;
    if report.clean {
        tracing::info!("Stopped cleanly.");
        Ok(ExitCode::SUCCESS)
    } else {
        tracing::warn!(
            "Stopped after the shutdown timeout; unfinished work resumes at the next start."
        );
        Ok(ExitCode::SUCCESS)
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received."),
        _ = int.recv() => tracing::info!("SIGINT received."),
    }
    Ok(())
}
