//! Shoal's own daemons as child processes: a tracker, seeds and nodes, each with a config file
//! and a log in the test's directory, all on loopback ports picked at start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::proc::{Child, free_port, wait_for_tcp};
use crate::shoal_bin;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `shoal tracker`.
#[derive(Debug)]
pub struct Tracker {
    pub child: Child,
    pub addr: String,
}

impl Tracker {
    pub fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("tracker.toml");
        std::fs::write(&config, format!("[tracker]\nlisten = \"{addr}\"\n"))?;
        let mut cmd = Command::new(shoal_bin()?);
        cmd.arg("tracker").arg("--config").arg(&config);
        let child = Child::spawn("tracker", cmd, dir)?;
        wait_for_tcp(&addr, START_TIMEOUT).context("waiting for the tracker")?;
        Ok(Self { child, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Options for a node or seed beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub seed: bool,
    /// Registries reached over plain HTTP.
    pub insecure: Vec<String>,
    pub tracker: Option<String>,
    /// Test hook: corrupt every piece served.
    pub corrupt_uploads: bool,
    /// Extra TOML appended to the config (whole sections).
    pub extra: String,
}

/// A running `shoal node` or `shoal seed`.
#[derive(Debug)]
pub struct Node {
    pub child: Child,
    pub name: String,
    pub root: PathBuf,
    pub mirror: String,
    pub swarm: String,
}

impl Node {
    pub fn start(dir: &Path, name: &str, opts: &NodeOptions) -> Result<Self> {
        let home = dir.join(name);
        std::fs::create_dir_all(&home)?;
        let root = home.join("root");
        let mirror = format!("127.0.0.1:{}", free_port()?);
        let swarm = format!("127.0.0.1:{}", free_port()?);
        let insecure: Vec<String> = opts.insecure.iter().map(|h| format!("{h:?}")).collect();
        let mut config = format!(
            "[node]\nroot = {root:?}\n\n[mirror]\nlisten = \"{mirror}\"\n\n[registry]\ninsecure = [{}]\n\n[p2p]\nlisten = \"{swarm}\"\ncorrupt_uploads = {}\n",
            insecure.join(", "),
            opts.corrupt_uploads,
        );
        if let Some(t) = &opts.tracker {
            config.push_str(&format!("tracker = \"{t}\"\n"));
        }
        config.push_str(&opts.extra);
        let config_path = home.join("shoal.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(shoal_bin()?);
        cmd.arg(if opts.seed { "seed" } else { "node" })
            .arg("--config")
            .arg(&config_path);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let child = Child::spawn(name, cmd, &home)?;
        wait_for_tcp(&mirror, START_TIMEOUT)
            .with_context(|| format!("waiting for {name}'s mirror"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
            root,
            mirror,
            swarm,
        })
    }

    pub fn mirror_url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    /// One Prometheus sample from the node's `/metrics` (summing all label sets), 0 if absent.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = crate::http::get_text(&format!("{}/metrics", self.mirror_url()))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .sum())
    }
}
