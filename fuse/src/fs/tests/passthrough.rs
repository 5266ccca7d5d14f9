//! Passthrough and read-ahead on real mounts and on the shared state: the kernel reads local
//! files from verified copies, large files are copied without holding up their first open, a
//! sequential reader finds the next chunk fetched ahead.

use std::fs;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::index::ROOT;

#[test]
fn local_files_are_passed_through() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copies = tempfile::tempdir()?;
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: true,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    let root = mnt.mountpoint();
    let expected = pattern(100_000, 7);
    let first = fs::File::open(root.join("big"))?;
    let mut second = fs::File::open(root.join("etc/big-link"))?;
    let mut bytes = Vec::new();
    second.read_to_end(&mut bytes)?;
    assert_eq!(bytes, expected);
    drop((first, second));
    assert_eq!(fs::read(root.join("big"))?, expected);

    let stats = mnt.stats();
    if stats.passthrough_opens == 0 {
        eprintln!("skipping the passthrough assertions: the kernel refused passthrough");
        return Ok(());
    }
    assert_eq!(stats.passthrough_opens, 3);
    // The kernel read the copy, not us.
    assert_eq!(stats.reads, 0, "{stats:?}");
    let copy = fs::read_dir(copies.path())?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<_>>>()?;
    assert_eq!(copy.len(), 1, "{copy:?}");
    Ok(())
}

#[test]
fn a_large_file_is_copied_in_the_background_and_passed_through_next_time() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copies = tempfile::tempdir()?;
    let mut tree = Tree::new();
    let content = pattern(3 << 20, 5);
    tree.file(ROOT, "large", &content, 256 << 10);
    let (layer, _) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: true,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    let large = mnt.mountpoint().join("large");
    // The first open does not wait for a 3 MiB copy: it reads through FUSE, and stays open.
    let mut held = fs::File::open(&large)?;
    let mut bytes = Vec::new();
    held.read_to_end(&mut bytes)?;
    assert_eq!(bytes, content);
    assert_eq!(mnt.stats().passthrough_opens, 0);
    assert!(mnt.stats().reads > 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::read_dir(copies.path())?.count() == 0 {
        assert!(std::time::Instant::now() < deadline, "no copy was made");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The copy exists, but the kernel takes no passthrough open of an inode with an ordinary
    // one: this open must still work, through FUSE.
    assert_eq!(fs::read(&large)?, content);
    assert_eq!(mnt.stats().passthrough_opens, 0);
    drop(held);
    assert_eq!(fs::read(&large)?, content);
    if mnt.stats().passthrough_opens == 0 {
        eprintln!(
            "skipping: the kernel refused passthrough ({:?})",
            mnt.stats()
        );
    }
    Ok(())
}

#[test]
fn remote_files_are_not_passed_through() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copies = tempfile::tempdir()?;
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        remote: true,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: true,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    assert_eq!(fs::read(mnt.mountpoint().join("big"))?, pattern(100_000, 7));
    let stats = mnt.stats();
    assert_eq!(stats.passthrough_opens, 0);
    assert!(stats.reads > 0);
    Ok(())
}

#[test]
fn a_sequential_reader_finds_the_next_chunk_fetched_ahead() -> anyhow::Result<()> {
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let cache = Arc::new(ChunkCache::new(1 << 20));
    let data: Arc<dyn LayerData> = layer;
    let fs = LayerFs {
        readahead: Some(super::readahead::ReadAhead::start(
            Arc::clone(&data),
            Arc::clone(&cache),
        )?),
        data,
        cache: Arc::clone(&cache),
        counters: Arc::default(),
        ttl: Duration::from_secs(1),
        copies: None,
        passthrough: None,
    };
    let big = fs
        .index()
        .lookup(ROOT, b"big")
        .ok_or(anyhow::anyhow!("no big"))?;
    let chunks = fs
        .node(big)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .chunks
        .clone();
    // A random read fetches nothing ahead.
    assert_eq!(
        fs.read(big, 20_000, 100)
            .map(|b| b.to_vec())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        pattern(100_000, 7)[20_000..20_100]
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(!cache.has(&crate::cache::ChunkKey::from(&chunks[3])));
    // Two reads in a row: the chunk after the second one's is fetched by the helper.
    assert_eq!(
        fs.read(big, 0, 4096)
            .map(|b| b.to_vec())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        pattern(100_000, 7)[..4096]
    );
    assert_eq!(
        fs.read(big, 4096, 4096)
            .map(|b| b.to_vec())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        pattern(100_000, 7)[4096..8192]
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cache.has(&crate::cache::ChunkKey::from(&chunks[1])) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "chunk 1 was not fetched ahead"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let fetched = cache.stats().fetches;
    assert_eq!(
        fs.read(big, 8192, 4096)
            .map(|b| b.to_vec())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        pattern(100_000, 7)[8192..12288]
    );
    assert!(
        cache.stats().fetches <= fetched + 1,
        "chunk 1 was fetched twice"
    );
    Ok(())
}

#[test]
fn a_materialized_layer_passes_through_on_the_first_open() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copies = tempfile::tempdir()?;
    let mut tree = Tree::new();
    let content = pattern(3 << 20, 6);
    tree.file(ROOT, "large", &content, 256 << 10);
    tree.file(ROOT, "small", b"small\n", 4096);
    let (layer, _) = tree.layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let opts = FsOptions {
        copies_dir: Some(copies.path().to_path_buf()),
        passthrough: true,
        ..FsOptions::default()
    };
    let mnt = mount_fake(layer, dir.path(), opts)?;
    let materializer = mnt
        .materializer()
        .ok_or(anyhow::anyhow!("no materializer with passthrough on"))?;
    assert_eq!(materializer.run(), 2, "two regular files");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fs::read_dir(copies.path())?
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the copies were not made"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read(mnt.mountpoint().join("large"))?, content);
    let stats = mnt.stats();
    if stats.passthrough_opens == 0 {
        eprintln!("skipping: the kernel refused passthrough ({stats:?})");
        return Ok(());
    }
    assert_eq!(stats.reads, 0, "the kernel read the copy: {stats:?}");
    assert_eq!(
        stats.chunk_fetches, 0,
        "the copies did not go through the cache: {stats:?}"
    );
    Ok(())
}
