//! `shoal`: the command line. Parses arguments and calls the library; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_plugin::config::Config;
use tokio_util::sync::CancellationToken;
use tracing::error;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Lazy, peer-to-peer container image distribution for containerd"
)]
struct Cli {
    /// Config file (TOML); the embedded defaults are used without one.
    #[arg(long, short, global = true, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: blob store, swarm peer and registry mirror for this host's containerd.
    Node,
    /// Run a seed: a node without containerd that fetches blobs upstream once and serves them.
    Seed,
    /// Run the tracker.
    Tracker,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match cli.command {
        Command::Node => shoal_plugin::node::run(cfg, false, shutdown).await?,
        Command::Seed => shoal_plugin::node::run(cfg, true, shutdown).await?,
        Command::Tracker => {
            let listener = tokio::net::TcpListener::bind(&cfg.tracker.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("binding the tracker on {}: {e}", cfg.tracker.listen)
                })?;
            tracing::info!(addr = %listener.local_addr()?, "tracker listening");
            shoal_p2p::tracker::run(listener, cfg.tracker, shutdown).await?;
        }
    }
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
