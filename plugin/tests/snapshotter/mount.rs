//! Mounts what the snapshotter returns, with mount(2), as containerd would: files written into
//! an active snapshot land in its layer, children see them through overlayfs, views are
//! read-only. Needs root and overlayfs; every mount is undone by a guard, even on failure.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use containerd_client::types::Mount;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::harness::{Labels, Server};

/// A mounted target, unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = umount2(&self.0, MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", self.0.display());
        }
    }
}

/// Performs `mounts` (one, as the overlay snapshotter returns) on `target`.
fn mount_all(mounts: &[Mount], target: &Path) -> anyhow::Result<Mounted> {
    let [m] = mounts else {
        anyhow::bail!("expected one mount, got {mounts:?}");
    };
    let none = None::<&str>;
    match m.r#type.as_str() {
        "bind" => {
            mount(
                Some(m.source.as_str()),
                target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )?;
            let mounted = Mounted(target.to_path_buf());
            if m.options.iter().any(|o| o == "ro") {
                let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                mount(none, target, none, flags, none)?;
            }
            Ok(mounted)
        }
        "overlay" => {
            let data = m.options.join(",");
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )?;
            Ok(Mounted(target.to_path_buf()))
        }
        other => anyhow::bail!("unexpected mount type {other}"),
    }
}

fn why_not_mountable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("mounting needs root".to_owned());
    }
    match fs::read_to_string("/proc/filesystems") {
        Ok(fss) if fss.lines().any(|l| l.ends_with("\toverlay")) => None,
        Ok(_) => Some("the kernel has no overlayfs".to_owned()),
        Err(e) => Some(format!("reading /proc/filesystems: {e}")),
    }
}

fn assert_read_only(dir: &Path) -> anyhow::Result<()> {
    match fs::write(dir.join("new-file"), b"x") {
        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => Ok(()),
        Err(e) => anyhow::bail!("writing to a view failed, but not with EROFS: {e}"),
        Ok(()) => anyhow::bail!("a view at {} is writable", dir.display()),
    }
}

#[tokio::test]
async fn returned_mounts_really_mount() -> anyhow::Result<()> {
    if let Some(reason) = why_not_mountable() {
        eprintln!("skipping returned_mounts_really_mount: {reason}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (s, mut c) = Server::start(dir.path()).await?;
    let target = dir.path().join("mnt");
    fs::create_dir(&target)?;

    // Base layer: a bind mount of its fs dir.
    let m = c.prepare("base-a", "", Labels::new()).await?;
    {
        let _mounted = mount_all(&m, &target)?;
        fs::write(target.join("foo"), "foo\n")?;
        fs::create_dir_all(target.join("a/b/c"))?;
    }
    assert_eq!(fs::read_to_string(s.dir(1).join("fs/foo"))?, "foo\n");
    c.commit("base", "base-a", Labels::new()).await?;

    // A child sees the base through overlayfs; its changes land in its own upper dir.
    let m = c.prepare("next-a", "base", Labels::new()).await?;
    {
        let _mounted = mount_all(&m, &target)?;
        assert_eq!(fs::read_to_string(target.join("foo"))?, "foo\n");
        assert!(target.join("a/b/c").is_dir());
        fs::write(target.join("bar"), "bar\n")?;
        fs::write(target.join("foo"), "changed\n")?;
        fs::remove_dir_all(target.join("a/b"))?;
    }
    assert_eq!(fs::read_to_string(s.dir(2).join("fs/bar"))?, "bar\n");
    assert_eq!(fs::read_to_string(s.dir(2).join("fs/foo"))?, "changed\n");
    assert_eq!(
        fs::read_to_string(s.dir(1).join("fs/foo"))?,
        "foo\n",
        "the parent is untouched"
    );
    c.commit("next", "next-a", Labels::new()).await?;

    // A view of both layers: the merged tree, read-only.
    let m = c.view("top", "next", Labels::new()).await?;
    {
        let _mounted = mount_all(&m, &target)?;
        assert_eq!(fs::read_to_string(target.join("foo"))?, "changed\n");
        assert_eq!(fs::read_to_string(target.join("bar"))?, "bar\n");
        assert!(target.join("a").is_dir());
        assert_eq!(
            fs::metadata(target.join("a/b")).map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::NotFound)
        );
        assert_read_only(&target)?;
    }

    // A view of one layer: a read-only bind mount.
    let m = c.view("base-view", "base", Labels::new()).await?;
    {
        let _mounted = mount_all(&m, &target)?;
        assert_eq!(fs::read_to_string(target.join("foo"))?, "foo\n");
        assert_read_only(&target)?;
    }
    // Every mount was undone.
    assert_eq!(fs::read_dir(&target)?.count(), 0);
    s.stop(c).await
}
