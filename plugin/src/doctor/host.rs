//! Checks of the host itself: the FUSE device, FUSE passthrough and overlayfs.
//!
//! Each check is a pure function of what it reads (a path, `/proc` text), so tests run them on
//! made-up input; the `*_here` wrappers read this host.

use std::path::Path;

use super::Check;

/// `/dev/fuse` exists and this process may open it: lazy layers are FUSE mounts.
pub fn fuse_device(path: &Path) -> Check {
    const NAME: &str = "fuse-device";
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::ok(NAME, format!("{} is present and openable", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::fail(
            NAME,
            format!(
                "{} does not exist: lazy layers cannot be mounted",
                path.display()
            ),
            "load the module (`modprobe fuse`); in a container, pass the device (`--device /dev/fuse`); \
             or set `[fuse] enabled = false` to unpack every layer",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check::fail(
            NAME,
            format!("{} exists but cannot be opened: {e}", path.display()),
            "run `shoal node` (and this check) as root",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("opening {}: {e}", path.display()),
            "check that the fuse module is loaded (`modprobe fuse`)",
        ),
    }
}

/// `major.minor` of a kernel release string such as `6.9.0-1-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// FUSE passthrough (Linux 6.9+) lets the kernel read files whose bytes are all local directly;
/// it is an optimisation, never a requirement.
pub fn fuse_passthrough(kernel_release: &str, enabled: bool) -> Check {
    const NAME: &str = "fuse-passthrough";
    let release = kernel_release.trim();
    if !enabled {
        return Check::ok(
            NAME,
            "disabled by `[fuse] passthrough = false` (optional: local files are read through FUSE)",
        );
    }
    match kernel_version(release) {
        Some(v) if v >= (6, 9) => Check::ok(
            NAME,
            format!(
                "kernel {release} supports FUSE passthrough (optional; the node falls back to FUSE reads where the kernel refuses)"
            ),
        ),
        Some(_) => Check::warn(
            NAME,
            format!(
                "kernel {release} is older than 6.9: no FUSE passthrough, fully fetched files are still read through FUSE (optional, slower)"
            ),
            "upgrade to Linux 6.9+ for passthrough, or set `[fuse] passthrough = false` to silence this",
        ),
        None => Check::warn(
            NAME,
            format!(
                "cannot tell the kernel version from {release:?}; passthrough needs Linux 6.9+ (optional)"
            ),
            "none needed: the node falls back to FUSE reads",
        ),
    }
}

/// Reads this host's kernel release for [`fuse_passthrough`].
pub fn fuse_passthrough_here(enabled: bool) -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    fuse_passthrough(&release, enabled)
}

/// The kernel has overlayfs (`/proc/filesystems` lists it, or the module is loaded): every
/// container's root is an overlay over its layers, lazy or not.
pub fn overlayfs(proc_filesystems: &str, module_loaded: bool) -> Check {
    const NAME: &str = "overlayfs";
    let listed = proc_filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"));
    if listed || module_loaded {
        Check::ok(NAME, "the kernel supports overlayfs")
    } else {
        Check::fail(
            NAME,
            "overlay is not in /proc/filesystems and /sys/module/overlay does not exist: \
             the snapshotter cannot mount container roots",
            "load the module (`modprobe overlay`; add `overlay` to /etc/modules-load.d/ to keep it)",
        )
    }
}

pub fn overlayfs_here() -> Check {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    overlayfs(&filesystems, Path::new("/sys/module/overlay").exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("6.9.0-1-amd64"), Some((6, 9)));
        assert_eq!(kernel_version("5.15"), Some((5, 15)));
        assert_eq!(kernel_version("weird"), None);
    }

    #[test]
    fn passthrough_is_optional_and_needs_6_9() {
        assert_eq!(fuse_passthrough("6.9.1", true).status, Level::Ok);
        let old = fuse_passthrough("6.1.0-18-amd64", true);
        assert_eq!(old.status, Level::Warn);
        assert!(old.detail.contains("optional"), "{}", old.detail);
        assert_eq!(fuse_passthrough("5.4", false).status, Level::Ok);
    }

    #[test]
    fn overlayfs_is_found_in_proc_filesystems() {
        assert_eq!(
            overlayfs("nodev\tproc\nnodev\toverlay\n", false).status,
            Level::Ok
        );
        assert_eq!(overlayfs("nodev\tproc\n", true).status, Level::Ok);
        let missing = overlayfs("nodev\tproc\n\text4\n", false);
        assert_eq!(missing.status, Level::Fail);
        assert!(
            missing
                .fix
                .as_deref()
                .unwrap_or("")
                .contains("modprobe overlay")
        );
    }

    #[test]
    fn a_missing_fuse_device_fails_with_a_fix() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let check = fuse_device(&dir.path().join("fuse"));
        assert_eq!(check.status, Level::Fail);
        assert!(check.fix.as_deref().unwrap_or("").contains("modprobe fuse"));
        Ok(())
    }
}
