//! Local copies on real mounts: reads of a copied file neither fetch nor inflate chunks, and
//! copies outlive their mount but are checked before a later mount uses them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::fs::copies::{DIRECT_ALIGN, LocalCopy};
use crate::index::ROOT;

/// Waits until the mount has given `n` files their copy.
fn wait_for_copies(mnt: &LayerMount, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mnt.stats().local_copies < n {
        anyhow::ensure!(Instant::now() < deadline, "copies made: {:?}", mnt.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn two_files() -> (Tree, Vec<u8>, Ino, Ino) {
    let mut tree = Tree::new();
    let large = pattern(3 << 20, 6);
    let large_ino = tree.file(ROOT, "large", &large, 256 << 10);
    let small_ino = tree.file(ROOT, "small", b"small\n", 4096);
    (tree, large, large_ino, small_ino)
}

#[test]
fn reads_of_a_copied_file_neither_fetch_nor_inflate() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let (dir, copies) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (tree, large, ..) = two_files();
    let (layer, source) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: false,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    let materializer = mnt
        .materializer()
        .ok_or(anyhow::anyhow!("no materializer with a copies directory"))?;
    assert_eq!(materializer.run(), 2);
    wait_for_copies(&mnt, 2)?;
    let before = mnt.stats();
    // The source is gone: only the copies can answer.
    source.fail.store(true, Ordering::SeqCst);
    assert_eq!(fs::read(mnt.mountpoint().join("large"))?, large);
    assert_eq!(fs::read(mnt.mountpoint().join("small"))?, b"small\n");
    let after = mnt.stats();
    assert!(after.reads > before.reads, "read through FUSE: {after:?}");
    assert_eq!(after.chunk_fetches, before.chunk_fetches, "{after:?}");
    assert_eq!(after.passthrough_opens, 0);
    assert_eq!(after.eios, 0);
    Ok(())
}

#[test]
fn copies_outlive_the_mount_and_are_checked_before_reuse() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let (dir, copies) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: false,
        ..FsOptions::default()
    };
    let (tree, large, large_ino, small_ino) = two_files();
    let (layer, _) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let first = mount_fake(layer, dir.path(), opts.clone())?;
    first
        .materializer()
        .ok_or(anyhow::anyhow!("no materializer"))?
        .run();
    wait_for_copies(&first, 2)?;
    drop(first);

    // A crash left one copy with a wrong byte (copies are written without fsync).
    let (large_copy, small_copy) = (
        copies.path().join(large_ino.to_string()),
        copies.path().join(small_ino.to_string()),
    );
    fs::write(&small_copy, b"smell\n")?;
    // A rewritten copy is a new file (renamed into place): the good one keeps its inode.
    let large_inode = fs::metadata(&large_copy)?.ino();

    let (tree, ..) = two_files();
    let (layer, source) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let second = mount_fake(layer, dir.path(), opts)?;
    second
        .materializer()
        .ok_or(anyhow::anyhow!("no materializer"))?
        .run();
    wait_for_copies(&second, 2)?;
    assert_eq!(
        fs::metadata(&large_copy)?.ino(),
        large_inode,
        "the good copy is kept"
    );
    assert_eq!(
        fs::read(&small_copy)?,
        b"small\n",
        "the bad copy is replaced"
    );
    source.fail.store(true, Ordering::SeqCst);
    assert_eq!(fs::read(second.mountpoint().join("large"))?, large);
    assert_eq!(fs::read(second.mountpoint().join("small"))?, b"small\n");
    assert_eq!(second.stats().eios, 0);
    Ok(())
}

#[test]
fn an_open_of_a_local_file_makes_its_copy_for_later_reads() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let (dir, copies) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (tree, large, large_ino, _) = two_files();
    let (layer, _) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: false,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    assert_eq!(
        mnt.stats().local_copies,
        0,
        "nothing is copied before an open"
    );
    assert_eq!(fs::read(mnt.mountpoint().join("large"))?, large);
    wait_for_copies(&mnt, 1)?;
    let copy = copies.path().join(large_ino.to_string());
    assert_eq!(fs::read(copy)?, large);
    Ok(())
}

#[test]
fn a_bad_copy_of_a_remote_file_is_dropped_not_fetched_whole() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let (dir, copies) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (tree, large, large_ino, _) = two_files();
    // Left by an earlier mount, then damaged; the blob is no longer local.
    let copy = copies.path().join(large_ino.to_string());
    fs::write(&copy, &large[..large.len() / 2])?;
    let (layer, _) = tree.layer(|blob| MemSource {
        blob,
        remote: true,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: false,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    let mut file = fs::File::open(mnt.mountpoint().join("large"))?;
    let mut head = vec![0; 4096];
    std::io::Read::read_exact(&mut file, &mut head)?;
    assert_eq!(head, large[..4096]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while copy.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the bad copy was kept");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = mnt.stats();
    assert_eq!(stats.local_copies, 0, "{stats:?}");
    // Only what was read was fetched: 4 KiB needs one 256 KiB chunk (the kernel may read
    // ahead a few more), not the file's twelve.
    assert!(stats.chunk_fetches < 12, "{stats:?}");
    Ok(())
}

/// Bytes of `path` in the page cache, from util-linux's `fincore` (None without it).
fn resident(path: &std::path::Path) -> Option<u64> {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

#[test]
fn a_sequential_reader_of_a_copy_gets_read_ahead_and_a_random_one_does_not() -> anyhow::Result<()> {
    // On the disk the copies live on (not a tmpfs, where every page is always cached).
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let path = dir.path().join("copy");
    let size = 64 << 20;
    let bytes = pattern(size, 3);
    fs::write(&path, &bytes)?;
    let file = fs::File::open(&path)?;
    file.sync_all()?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    let Some(0) = resident(&path) else {
        eprintln!("skipping: no fincore, or the page cache of a synced file cannot be dropped");
        return Ok(());
    };
    let copy = LocalCopy::new(fs::File::open(&path)?);
    let mut buf = vec![0u8; 1 << 20];
    // From the start: sequential. The kernel itself reads a few MiB ahead of a 1 MiB read;
    // the copy asks for 16 MiB.
    copy.read_exact_at(&mut buf, 0, size as u64)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while resident(&path).unwrap_or(0) < 16 << 20 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not read ahead of a sequential reader: {:?} bytes cached",
            resident(&path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A jump: only what the kernel reads for the request itself.
    std::thread::sleep(Duration::from_millis(200));
    let before = resident(&path).unwrap_or(0);
    copy.read_exact_at(&mut buf, 40 << 20, size as u64)?;
    std::thread::sleep(Duration::from_millis(200));
    let grown = resident(&path).unwrap_or(0) - before;
    assert!(
        grown < 8 << 20,
        "a random read was read ahead: {grown} bytes"
    );
    assert_eq!(buf, bytes[40 << 20..41 << 20]);
    Ok(())
}

#[test]
fn a_copy_is_read_around_its_page_cache_with_the_same_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR"))?;
    let path = dir.path().join("copy");
    // Not a whole number of pages: the last read ends inside a block.
    let size = (3 << 20) + 123;
    let bytes = pattern(size, 9);
    fs::write(&path, &bytes)?;
    let file = fs::File::open(&path)?;
    file.sync_all()?;
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
    let copy = LocalCopy::new(file);
    let mut buf = vec![0u8; (1 << 20) + 2 * DIRECT_ALIGN];
    let mut read = |offset: usize, len: usize| -> anyhow::Result<Vec<u8>> {
        let start = copy.read_into(&mut buf, offset as u64, len, size as u64)?;
        Ok(buf[start..start + len].to_vec())
    };
    // Page-aligned, as the kernel asks for cached files; the tail; and an unaligned read.
    for (offset, len) in [
        (0, 1 << 20),
        (1 << 20, 128 << 10),
        (3 << 20, 123),
        (4097, 5000),
    ] {
        assert_eq!(
            read(offset, len)?,
            bytes[offset..offset + len],
            "{offset}+{len}"
        );
    }
    // The aligned reads went around the copy's page cache (where the filesystem allows it):
    // only the unaligned one, a page or two, was cached.
    if let Some(cached) = resident(&path) {
        assert!(cached <= 3 << 12, "{cached} bytes of the copy cached");
    }
    Ok(())
}
