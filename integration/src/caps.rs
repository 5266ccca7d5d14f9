//! What the host must offer for an end-to-end test, and a reason to print when it does not.
//!
//! Tests skip only when the machine truly lacks a capability (not root, no `/dev/fuse`, a tool
//! not installed), and say so:
//!
//! ```no_run
//! # fn t() -> anyhow::Result<()> {
//! if let Some(why) = shoal_integration::caps::missing(&["containerd", "ctr"]) {
//!     eprintln!("skipping: {why}");
//!     return Ok(());
//! }
//! # Ok(()) }
//! ```

use std::env;
use std::path::{Path, PathBuf};

/// Why a test needing root and `tools` cannot run here, or `None` if it can.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("end-to-end tests must run as root".to_owned());
    }
    let absent: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    (!absent.is_empty()).then(|| format!("not installed: {}", absent.join(", ")))
}

/// Why FUSE mounts are impossible here, or `None`.
pub fn missing_fuse() -> Option<String> {
    (!Path::new("/dev/fuse").exists()).then(|| "/dev/fuse does not exist".to_owned())
}

/// The first executable called `tool` on `PATH` (plus the sbin directories, which a non-login
/// root shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
