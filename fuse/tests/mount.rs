//! Real mounts of converted layers: what a container would see through Shoal, compared with
//! the same tar unpacked by GNU tar, alone and as overlayfs lowerdirs; and what it sees when
//! the bytes are corrupt or missing (`EIO`, never wrong bytes).
//!
//! Every test skips, saying why, without `/dev/fuse` or root. Mounts are held by guards, so
//! they go even when an assertion fails.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, ensure};
use common::{Entry, Faulty, Overlay, What, entry, pattern};
use shoal_fuse::fs::{FsOptions, LayerMount, mount};
use shoal_fuse::{ChunkSource, FileSource};

/// Small chunks, so files span several.
const CHUNK: u64 = 64 << 10;

/// Every kind of tar entry, with owners, modes, xattrs and both kinds of whiteout. Each
/// directory's entries are contiguous: GNU tar sets a directory's mtime when it leaves it.
fn every_kind() -> Vec<Entry> {
    vec![
        entry("bin", What::Dir),
        entry("bin/big", What::File(pattern(300_000, 1))).mode(0o755),
        entry("bin/suid", What::File(b"#!/bin/sh\n".to_vec())).mode(0o4755),
        entry("bin/sgid", What::File(b"x".to_vec()))
            .mode(0o2711)
            .owner(0, 50),
        entry("bin/hard", What::Hardlink("bin/big")),
        entry("bin/link", What::Symlink("big")),
        entry("bin/dangling", What::Symlink("../nowhere/at/all")),
        entry("dev", What::Dir),
        entry("dev/null", What::Char(1, 3)).mode(0o666),
        entry("dev/loop0", What::Block(7, 0))
            .mode(0o660)
            .owner(0, 6),
        entry("dev/big-minor", What::Char(240, 70_000)),
        entry("dev/fifo", What::Fifo).mode(0o600),
        entry("etc", What::Dir),
        entry("etc/hostname", What::File(b"shoal\n".to_vec())),
        entry("etc/empty", What::File(Vec::new())),
        entry("etc/exact", What::File(pattern(2 * CHUNK as usize, 2))),
        entry("etc/attrs", What::File(b"attrs".to_vec()))
            .xattr("user.one", b"1")
            .xattr("user.binary", b"\x00\xff\x10"),
        entry("etc/.wh.passwd", What::File(Vec::new())),
        entry("home", What::Dir).mode(0o1777),
        entry("home/user", What::Dir).mode(0o700).owner(1234, 5678),
        entry("home/user/notes", What::File(pattern(70_000, 3)))
            .mode(0o600)
            .owner(1234, 5678),
        entry(".wh.gone", What::File(Vec::new())),
        entry("opq", What::Dir).xattr("user.kept", b"yes"),
        entry("opq/.wh..wh..opq", What::File(Vec::new())),
        entry("opq/keep", What::File(b"kept".to_vec())),
    ]
}

/// A converted layer: the blob and its TOC digest, in a tempdir kept alive with it.
struct Blob {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    toc_digest: String,
}

fn blob(entries: &[Entry]) -> anyhow::Result<Blob> {
    let dir = tempfile::tempdir()?;
    let tar = common::tar_of(entries)?;
    let (path, toc_digest) = common::convert(&tar, CHUNK, dir.path())?;
    Ok(Blob {
        _dir: dir,
        path,
        toc_digest,
    })
}

fn mount_blob(
    blob: &Blob,
    source: Arc<dyn ChunkSource>,
    at: &Path,
    opts: FsOptions,
) -> anyhow::Result<LayerMount> {
    let layer = common::open_layer(source, &blob.toc_digest)?;
    Ok(mount(layer, at, opts)?)
}

fn local(blob: &Blob) -> anyhow::Result<Arc<dyn ChunkSource>> {
    Ok(Arc::new(FileSource::open(&blob.path)?))
}

#[test]
fn layer_matches_tar_x() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let entries = every_kind();
    let reference = tempfile::tempdir()?;
    common::unpack(&common::tar_of(&entries)?, reference.path())?;
    let blob = blob(&entries)?;
    let at = tempfile::tempdir()?;
    let mnt = mount_blob(&blob, local(&blob)?, at.path(), FsOptions::default())?;
    compare_with_unpacked(reference.path(), mnt.mountpoint())?;
    assert_eq!(mnt.stats().eios, 0);

    let path = mnt.mountpoint().to_path_buf();
    drop(mnt);
    ensure!(!common::mounted(&path)?, "still mounted after drop");
    Ok(())
}

/// Compares every entry of the GNU-tar-unpacked `reference` with the mount at `mnt`, where
/// whiteouts must be overlayfs whiteouts instead of `.wh.` files.
fn compare_with_unpacked(reference: &Path, mnt: &Path) -> anyhow::Result<()> {
    let mut expected = Vec::new();
    let mut first_name: HashMap<u64, std::path::PathBuf> = HashMap::new();
    for rel in common::walk(reference)? {
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = rel.parent().unwrap_or(Path::new(""));
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                let opaque = xattr::get(mnt.join(parent), "trusted.overlay.opaque")?;
                ensure!(opaque.as_deref() == Some(b"y"), "{parent:?} is not opaque");
                continue;
            }
            Some(name) if name.starts_with(".wh.") => {
                let hidden = parent.join(&name[4..]);
                let meta = fs::symlink_metadata(mnt.join(&hidden))?;
                ensure!(
                    meta.file_type().is_char_device() && meta.rdev() == 0,
                    "{hidden:?} is not a whiteout"
                );
                expected.push(hidden);
                continue;
            }
            _ => {}
        }
        let (want, got) = (reference.join(&rel), mnt.join(&rel));
        let (w, g) = (fs::symlink_metadata(&want)?, fs::symlink_metadata(&got)?);
        let fields =
            |m: &fs::Metadata| (m.mode(), m.uid(), m.gid(), m.nlink(), m.rdev(), m.mtime());
        ensure!(
            fields(&w) == fields(&g),
            "{rel:?}: {:?} != {:?}",
            fields(&w),
            fields(&g)
        );
        if !w.is_dir() {
            ensure!(
                w.size() == g.size(),
                "{rel:?}: size {} != {}",
                w.size(),
                g.size()
            );
        }
        let mut want_xattrs = common::xattrs(&want)?;
        if w.is_dir() && want.join(".wh..wh..opq").exists() {
            want_xattrs.push(("trusted.overlay.opaque".into(), b"y".to_vec()));
            want_xattrs.push(("user.overlay.opaque".into(), b"y".to_vec()));
            want_xattrs.sort();
        }
        ensure!(
            common::xattrs(&got)? == want_xattrs,
            "{rel:?}: xattrs differ"
        );
        if w.file_type().is_symlink() {
            ensure!(
                fs::read_link(&want)? == fs::read_link(&got)?,
                "{rel:?}: target"
            );
        }
        if w.is_file() {
            ensure!(fs::read(&want)? == fs::read(&got)?, "{rel:?}: bytes differ");
        }
        // Hard links: the same inode in the mount exactly where the same inode in the reference.
        match first_name.get(&w.ino()) {
            Some(first) => {
                let first = fs::symlink_metadata(mnt.join(first))?;
                ensure!(first.ino() == g.ino(), "{rel:?}: hard link broken");
            }
            None => {
                first_name.insert(w.ino(), rel.clone());
            }
        }
        expected.push(rel);
    }
    expected.sort();
    let found = common::walk(mnt)?;
    ensure!(
        found == expected,
        "mount lists {found:?}, expected {expected:?}"
    );
    Ok(())
}

#[test]
fn overlay_over_layers_matches_overlay_over_unpacked() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let lower = vec![
        entry("a", What::Dir),
        entry("a/keep", What::File(b"keep".to_vec())),
        entry("a/gone-file", What::File(b"gone".to_vec())),
        entry("a/gone-dir", What::Dir),
        entry("a/gone-dir/inner", What::File(b"inner".to_vec())),
        entry("opq", What::Dir),
        entry("opq/old", What::File(b"old".to_vec())),
        entry("x", What::File(pattern(150_000, 4))),
    ];
    let upper = vec![
        entry("a", What::Dir),
        entry("a/.wh.gone-file", What::File(Vec::new())),
        entry("a/.wh.gone-dir", What::File(Vec::new())),
        entry("opq", What::Dir),
        entry("opq/.wh..wh..opq", What::File(Vec::new())),
        entry("opq/new", What::File(b"new".to_vec())),
        entry("y", What::Symlink("x")),
    ];

    // Reference: each tar unpacked, whiteouts applied the overlayfs way, stacked.
    let root = tempfile::tempdir()?;
    let dirs = ["ref-lower", "ref-upper", "ref", "lower", "upper", "merged"];
    for d in dirs {
        fs::create_dir(root.path().join(d))?;
    }
    let p = |d: &str| root.path().join(d);
    for (entries, dir) in [(&lower, "ref-lower"), (&upper, "ref-upper")] {
        common::unpack(&common::tar_of(entries)?, &p(dir))?;
        common::overlayfs_whiteouts(&p(dir))?;
    }
    let reference = Overlay::mount(&[&p("ref-upper"), &p("ref-lower")], &p("ref"))?;

    let (lower_blob, upper_blob) = (blob(&lower)?, blob(&upper)?);
    // The lower layer with passthrough: overlayfs must stack on it all the same.
    let passthrough = FsOptions {
        copies_dir: Some(p("copies")),
        passthrough: true,
        ..FsOptions::default()
    };
    let lower_mnt = mount_blob(&lower_blob, local(&lower_blob)?, &p("lower"), passthrough)?;
    let upper_mnt = mount_blob(
        &upper_blob,
        local(&upper_blob)?,
        &p("upper"),
        FsOptions::default(),
    )?;
    let merged = Overlay::mount(
        &[upper_mnt.mountpoint(), lower_mnt.mountpoint()],
        &p("merged"),
    )?;

    let (want, got) = (common::walk(&reference.path)?, common::walk(&merged.path)?);
    ensure!(
        want == got,
        "merged view lists {got:?}, overlay over unpacked lists {want:?}"
    );
    for hidden in ["a/gone-file", "a/gone-dir", "opq/old"] {
        ensure!(!merged.path.join(hidden).exists(), "{hidden} shows through");
    }
    for rel in &want {
        let (w, g) = (reference.path.join(rel), merged.path.join(rel));
        let (wm, gm) = (fs::symlink_metadata(&w)?, fs::symlink_metadata(&g)?);
        ensure!(
            (wm.mode(), wm.uid(), wm.gid()) == (gm.mode(), gm.uid(), gm.gid()),
            "{rel:?}: metadata differs"
        );
        if wm.is_file() {
            ensure!(fs::read(&w)? == fs::read(&g)?, "{rel:?}: bytes differ");
        }
    }
    // `x` was read through overlayfs from the passthrough copy (unless the kernel refuses).
    let lower_stats = lower_mnt.stats();
    if lower_stats.passthrough_opens == 0 {
        eprintln!("passthrough refused by the kernel: {lower_stats:?}");
    } else {
        ensure!(lower_stats.reads == 0, "{lower_stats:?}");
    }
    // Overlays first: a FUSE layer under a live overlay cannot go.
    drop((merged, reference));
    drop((upper_mnt, lower_mnt));
    for d in ["ref", "lower", "upper", "merged"] {
        ensure!(!common::mounted(&p(d))?, "{d} still mounted");
    }
    Ok(())
}

#[test]
fn corrupt_bytes_are_eio_never_wrong_bytes() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let blob = blob(&every_kind())?;
    let source = Faulty::open(&blob.path)?;
    let at = tempfile::tempdir()?;
    let mnt = mount_blob(&blob, source.clone(), at.path(), FsOptions::default())?;
    source.corrupt.store(true, Ordering::SeqCst);
    for file in ["bin/big", "etc/hostname", "home/user/notes"] {
        let read = fs::read(mnt.mountpoint().join(file));
        let errno = read.err().and_then(|e| e.raw_os_error());
        ensure!(errno == Some(libc::EIO), "{file}: {errno:?}, expected EIO");
    }
    ensure!(mnt.stats().eios >= 3, "{:?}", mnt.stats());
    // Nothing bad was cached: the same files read correctly once the bytes are good.
    source.corrupt.store(false, Ordering::SeqCst);
    ensure!(fs::read(mnt.mountpoint().join("bin/big"))? == pattern(300_000, 1));
    Ok(())
}

#[test]
fn unreachable_bytes_are_eio() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let blob = blob(&every_kind())?;
    let source = Faulty::open(&blob.path)?;
    let at = tempfile::tempdir()?;
    let mnt = mount_blob(&blob, source.clone(), at.path(), FsOptions::default())?;
    source.fail.store(true, Ordering::SeqCst);
    let read = fs::read(mnt.mountpoint().join("home/user/notes"));
    ensure!(read.err().and_then(|e| e.raw_os_error()) == Some(libc::EIO));
    // Metadata is in memory and unaffected.
    ensure!(fs::metadata(mnt.mountpoint().join("bin/big"))?.len() == 300_000);
    source.fail.store(false, Ordering::SeqCst);
    ensure!(fs::read(mnt.mountpoint().join("home/user/notes"))? == pattern(70_000, 3));
    Ok(())
}

#[test]
fn concurrent_readers_get_the_right_bytes() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let blob = blob(&every_kind())?;
    let at = tempfile::tempdir()?;
    // A cache smaller than the files, so chunks are evicted and fetched again meanwhile.
    let opts = FsOptions {
        cache_bytes: 3 * CHUNK,
        ..FsOptions::default()
    };
    let mnt = mount_blob(&blob, local(&blob)?, at.path(), opts)?;
    let root = mnt.mountpoint();
    let files = [
        ("bin/big", pattern(300_000, 1)),
        ("bin/hard", pattern(300_000, 1)),
        ("etc/exact", pattern(2 * CHUNK as usize, 2)),
        ("home/user/notes", pattern(70_000, 3)),
    ];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let files = &files;
                s.spawn(move || -> anyhow::Result<()> {
                    for round in 0..5 {
                        let (name, want) = &files[(i + round) % files.len()];
                        // Small reads at scattered offsets, through one open file.
                        let mut file = fs::File::open(root.join(name))?;
                        let mut got = Vec::new();
                        let mut buf = vec![0; 4096 + i * 1000];
                        loop {
                            let n = file.read(&mut buf)?;
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        ensure!(&got == want, "{name} differs (reader {i})");
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("reader panicked"))?)
    })?;
    ensure!(mnt.stats().eios == 0);
    Ok(())
}

#[test]
fn local_layer_is_passed_through() -> anyhow::Result<()> {
    if !common::can_mount() {
        return Ok(());
    }
    let blob = blob(&every_kind())?;
    let at = tempfile::tempdir()?;
    let copies = tempfile::tempdir()?;
    let opts = FsOptions {
        copies_dir: Some(copies.path().join("pt")),
        passthrough: true,
        ..FsOptions::default()
    };
    let mnt = mount_blob(&blob, local(&blob)?, at.path(), opts)?;
    let big = fs::read(mnt.mountpoint().join("bin/big")).context("reading bin/big")?;
    ensure!(big == pattern(300_000, 1));
    ensure!(fs::read(mnt.mountpoint().join("etc/hostname"))? == b"shoal\n");
    let stats = mnt.stats();
    if stats.passthrough_opens == 0 {
        eprintln!("skipping the passthrough checks: the kernel refused FUSE passthrough");
        return Ok(());
    }
    ensure!(stats.passthrough_opens == 2, "{stats:?}");
    ensure!(
        stats.reads == 0,
        "the kernel should read the copies: {stats:?}"
    );
    Ok(())
}
