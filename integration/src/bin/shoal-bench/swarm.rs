//! `shoal-bench swarm` (being written).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("shoal-bench swarm is not written yet")
}
