#![doc = include_str!("../README.md")]

pub mod caps;
pub mod containerd;
pub mod hosts;
pub mod http;
pub mod image;
pub mod netns;
pub mod proc;
pub mod registry;
pub mod shoal;

use std::env;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

pub use containerd::Containerd;
pub use hosts::hosts_dir;
pub use image::{ImageBuilder, OciImage, PushedImage, random_bytes};
pub use proc::{Child, free_port, wait_for_tcp, wait_until};
pub use registry::Registry;

/// The `shoal` binary under test: `$SHOAL_BIN` if set, else `target/<profile>/shoal` beside
/// the running test executable (`target/<profile>/deps/<test>`).
pub fn shoal_bin() -> Result<PathBuf> {
    if let Some(path) = env::var_os("SHOAL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = env::current_exe().context("locating the test executable")?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("shoal"))
        .collect::<Vec<_>>();
    match candidates.iter().find(|p| p.is_file()) {
        Some(path) => Ok(path.clone()),
        None => bail!(
            "no shoal binary at {candidates:?}: run `cargo build -p shoal-plugin` first or set SHOAL_BIN"
        ),
    }
}
