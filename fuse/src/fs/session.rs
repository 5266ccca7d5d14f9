//! The kernel side of a mount: `/dev/fuse`, mount(2), the session threads, and unmounting.
//!
//! Shoal mounts by itself rather than through fuser's mount helper so that it alone decides
//! when and how the mount goes away: fuser unmounts by path when its session ends, which could
//! hit whatever a restarted node has mounted there since. Mounting directly needs
//! `CAP_SYS_ADMIN`, which the node has anyway to mount overlayfs.
//!
//! A layer may still be in use when its guard is dropped: files open on it make the unmount
//! busy, and an overlayfs using it as a lowerdir keeps the FUSE connection alive after the
//! mountpoint itself is gone. The mount is then detached from the tree and its session threads
//! keep serving those users until they let go, instead of the guard hanging or yanking bytes
//! from under a running container.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use fuser::{BackgroundSession, Config, Session, SessionACL};
use nix::mount::{MntFlags, MsFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};

use super::{Error, LayerFs};
use crate::index::ROOT;

/// How many stale mounts stacked on one path [`unmount_stale`] removes before giving up.
const MAX_STALE: usize = 16;

/// How long to wait, after unmounting, for the kernel to end the connection.
const DISCONNECT_GRACE_MS: u16 = 1000;

/// A live mount and the threads serving it.
#[derive(Debug)]
pub(super) struct Mounted {
    path: PathBuf,
    /// A duplicate of the session's `/dev/fuse` fd, polled to learn when the connection ends.
    dev: File,
    session: BackgroundSession,
}

impl Mounted {
    /// Mounts `fs` at `mountpoint` and starts `threads` threads serving it.
    pub(super) fn new(fs: LayerFs, mountpoint: &Path, threads: usize) -> Result<Self, Error> {
        let mount_err = |source| Error::Mount {
            path: mountpoint.to_path_buf(),
            source,
        };
        let path = mountpoint.canonicalize().map_err(mount_err)?;
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(mount_err)?;
        let root_mode = fs.index().node(ROOT).map_or(0o755, |root| root.mode);
        let data = format!(
            "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
            dev.as_raw_fd(),
            libc::S_IFDIR | root_mode,
            nix::unistd::getuid(),
            nix::unistd::getgid(),
        );
        // Device nodes and setuid binaries in images must work through overlayfs, so neither
        // `nodev` nor `nosuid`; the layer is immutable, so read-only.
        nix::mount::mount(
            Some("shoal"),
            &path,
            Some("fuse.shoal"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .map_err(|errno| mount_err(errno.into()))?;
        debug!(path = %path.display(), "mounted");

        let started = dev.try_clone().and_then(|watch| {
            let mut config = Config::default();
            config.n_threads = Some(threads);
            config.clone_fd = true;
            config.acl = SessionACL::All;
            let session = Session::from_fd(fs, OwnedFd::from(dev), SessionACL::All, config)?;
            Ok((watch, session.spawn()?))
        });
        match started {
            Ok((dev, session)) => Ok(Mounted { path, dev, session }),
            Err(source) => {
                if let Err(errno) = nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
                    warn!(path = %path.display(), %errno, "unmounting after a failed start");
                }
                Err(Error::Session { path, source })
            }
        }
    }

    /// Unmounts, then stops the session threads once the kernel has ended the connection.
    pub(super) fn unmount(self) {
        let path = self.path.display();
        match nix::mount::umount2(&self.path, MntFlags::empty()) {
            Ok(()) => debug!(%path, "unmounted"),
            Err(nix::errno::Errno::EBUSY) => {
                warn!(%path, "layer busy at unmount: detaching it, served until its users leave");
                if let Err(errno) = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH) {
                    warn!(%path, %errno, "detaching");
                }
            }
            // EINVAL: no longer a mount point, someone unmounted it already.
            Err(errno) => warn!(%path, %errno, "unmounting"),
        }
        if disconnected(&self.dev, PollTimeout::from(DISCONNECT_GRACE_MS)) {
            if let Err(err) = self.session.join() {
                warn!(%path, %err, "FUSE session ended with an error");
            }
        } else {
            // Dropping the handle detaches the threads; they end when the kernel ends the
            // connection, once the last user (such as an overlayfs) is gone.
            warn!(%path, "layer still in use (by an overlayfs?): its session keeps serving it");
        }
    }
}

/// Whether the FUSE connection behind `dev` has ended, waiting up to `timeout` for it.
fn disconnected(dev: &File, timeout: PollTimeout) -> bool {
    loop {
        let mut fds = [PollFd::new(dev.as_fd(), PollFlags::empty())];
        return match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => false,
            Ok(_) => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => {
                warn!(%errno, "polling /dev/fuse");
                false
            }
        };
    }
}

/// Detaches a dead FUSE mount left at `path` by a previous process (its stat fails with
/// `ENOTCONN`), so it can be mounted again; Ok if nothing is mounted there. A live mount is
/// left alone.
pub fn unmount_stale(path: &Path) -> io::Result<()> {
    for _ in 0..MAX_STALE {
        match std::fs::symlink_metadata(path) {
            Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
                warn!(path = %path.display(), "detaching a stale FUSE mount");
                nix::mount::umount2(path, MntFlags::MNT_DETACH)?;
            }
            _ => return Ok(()),
        }
    }
    Err(io::Error::other(format!(
        "more than {MAX_STALE} stale mounts stacked at {}",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FUSE mount whose server is gone: mounted with a `/dev/fuse` fd that is then closed.
    #[test]
    fn stale_mount_is_detached() -> anyhow::Result<()> {
        if !super::super::tests::can_mount() {
            return Ok(());
        }
        let dir = tempfile::tempdir()?;
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        let data = format!("fd={},rootmode=40755,user_id=0,group_id=0", dev.as_raw_fd());
        nix::mount::mount(
            Some("shoal"),
            dir.path(),
            Some("fuse.shoal"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )?;
        drop(dev);
        let err = std::fs::metadata(dir.path()).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOTCONN));

        unmount_stale(dir.path())?;
        assert!(std::fs::metadata(dir.path())?.is_dir());
        // Nothing mounted any more: a no-op.
        unmount_stale(dir.path())?;
        unmount_stale(&dir.path().join("missing"))?;
        Ok(())
    }
}
