//! `shoal-bench`: Shoal's benchmarks and its one-machine demo, each beside a baseline measured
//! in the same run. Figures go to BENCHMARKS.md with the command that produced them.

mod demo;
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
    /// containerd plugin: snapshot latency and content read throughput beside the built-ins.
    Plugin(plugin::Args),
    /// Swarm distribution: N peers in network namespaces fetch one blob at the same moment.
    Swarm(swarm::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
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
