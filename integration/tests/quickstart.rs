//! The README's first command, `scripts/demo.sh`, runs `shoal-bench demo`: the same code path,
//! at a small size, runs here in CI. A registry with a demo image converted to eStargz, a
//! tracker, a seed, two nodes each with its own containerd starting the container lazily, a
//! normal pull beside them, and the report.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use shoal_integration::{caps, shoal_bin};

#[test]
fn the_demo_runs_end_to_end() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"])
        .or_else(caps::missing_fuse)
    {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let shoal = shoal_bin()?;
    let bench = shoal.with_file_name("shoal-bench");
    ensure!(
        bench.exists(),
        "{} is missing: build with `cargo build --workspace --bins`",
        bench.display()
    );
    let out = Command::new(&bench)
        .args(["demo", "--layer-mib", "8"])
        .env("SHOAL_BIN", &shoal)
        .output()
        .context("running shoal-bench demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout
            .matches("hello from a lazily started container: read 1048576 bytes")
            .count()
            == 3,
        "both nodes and the normal pull print the container's line:\n{stdout}"
    );
    for row in ["node-a", "node-b", "seed", "direct"] {
        ensure!(
            stdout.lines().any(|l| l.trim_start().starts_with(row)),
            "the report has no {row} row:\n{stdout}"
        );
    }
    Ok(())
}
