//! `shoal doctor`: checks what makes or breaks Shoal on this host and says what to change.
//!
//! Every check is a function returning one [`Check`] (ok, warn or FAIL, a detail, and the fix),
//! so tests run each of them on fixture files:
//!
//! | file | checks |
//! |---|---|
//! | `host.rs` | `/dev/fuse`, FUSE passthrough (optional, Linux 6.9+), overlayfs |
//! | `containerd.rs` | containerd's version; its config file, config version, snapshot and content proxy plugins |
//! | `containerd/cri.rs` | the CRI's snapshotter, snapshot annotations and registry `config_path`; 2.x's transfer-service unpack list |
//! | `shoal.rs` | Shoal's own config, the node's socket, the tracker, disk space for the blob store |
//!
//! [`run`] runs them all; a FAIL anywhere makes `shoal doctor` exit non-zero.

mod containerd;
mod host;
mod shoal;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use self::containerd::{ContainerdConfig, ContainerdVersion};

/// containerd's config file when `--containerd-config` is not given.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One check's outcome: `{name, status, detail, fix}` in `--json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// A stable id, e.g. `snapshot-proxy`.
    pub name: String,
    pub status: Level,
    /// What was found, naming the file and key it comes from.
    pub detail: String,
    /// What to change; `None` when nothing needs to.
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &str, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            status: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            status: Level::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            status: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What `shoal doctor` was asked to look at.
#[derive(Clone, Debug, Default)]
pub struct DoctorOptions {
    /// Shoal's config file (`--config`); `None` means the built-in defaults.
    pub config: Option<PathBuf>,
    /// containerd's config file; `None` means [`DEFAULT_CONTAINERD_CONFIG`].
    pub containerd_config: Option<PathBuf>,
}

/// Runs every check, in the order a newcomer would fix things: Shoal's config, the host,
/// containerd, then the running node.
pub async fn run(opts: &DoctorOptions) -> Vec<Check> {
    let (config_check, cfg) = shoal::config(opts.config.as_deref());
    let mut checks = vec![config_check];
    checks.push(host::fuse_device(Path::new("/dev/fuse")));
    checks.push(host::fuse_passthrough_here(cfg.fuse.passthrough));
    checks.push(host::overlayfs_here());

    let (version_check, version) = containerd::version_here().await;
    checks.push(version_check);
    let path = opts
        .containerd_config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTAINERD_CONFIG));
    checks.extend(containerd::config_checks(&path, &cfg, version));

    checks.push(shoal::node_socket(&cfg.node.socket));
    checks.push(shoal::tracker(cfg.p2p.tracker.as_deref()).await);
    checks.push(shoal::disk_space(
        &cfg.node.root,
        cfg.node.store_capacity_mib,
    ));
    checks
}

/// Whether any check failed (`shoal doctor` then exits non-zero).
pub fn failed(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Level::Fail)
}

/// One line per check, then a count.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        let status = match c.status {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        let _ = write!(out, "{status:<4}  {:<width$}  {}", c.name, c.detail);
        if let Some(fix) = &c.fix {
            let _ = write!(out, "  -> fix: {fix}");
        }
        out.push('\n');
    }
    let count = |l| checks.iter().filter(|c| c.status == l).count();
    let _ = writeln!(
        out,
        "\n{} ok, {} warn, {} FAIL",
        count(Level::Ok),
        count(Level::Warn),
        count(Level::Fail)
    );
    out
}
