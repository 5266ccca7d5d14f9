//! `shoal-bench`: Shoal's benchmarks and its one-machine demo, each beside a baseline measured
//! in the same run. Figures go to BENCHMARKS.md with the command that produced them.

mod demo;
mod lazystart;
mod plugin;
mod swarm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "shoal-bench", about = "Shoal benchmarks and demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The quickstart: registry, tracker, seed, two nodes with their own containerd.
    Demo(demo::Args),
    /// Lazy start: a container on a 1 GiB layer, overlayfs vs Shoal lazy vs warm; FUSE reads.
    Lazystart(lazystart::Args),
    /// containerd plugin: snapshot latency and content read throughput beside the built-ins.
    Plugin(plugin::Args),
    /// Swarm distribution: N peers in network namespaces fetch one blob at the same moment.
    Swarm(swarm::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Lazystart(args) => lazystart::run(args),
        Command::Plugin(args) => plugin::run(args),
        Command::Swarm(args) => swarm::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
