//! Mounts of hand-built layers: the filesystem's behaviour on a real FUSE mount, independent of
//! the eStargz format. The fake layer stores chunks uncompressed in a blob and verifies them
//! with sha256 exactly as the real one does, over a [`MemSource`] that can fail, corrupt, or
//! hold a read back until a test lets it go.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::*;
use crate::index::{Ino, Kind, Node, ROOT};

/// Whether this host can mount FUSE; prints why not when it cannot.
pub(crate) fn can_mount() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: mounting FUSE needs root");
        return false;
    }
    true
}

/// A blob in memory.
#[derive(Debug, Default)]
struct MemSource {
    blob: Vec<u8>,
    remote: bool,
    fail: AtomicBool,
    corrupt: AtomicBool,
    /// Reads of this offset wait until the gate opens.
    gated: Option<u64>,
    gate: (Mutex<bool>, Condvar),
}

impl MemSource {
    fn open_gate(&self) {
        *crate::cache::lock(&self.gate.0) = true;
        self.gate.1.notify_all();
    }
}

impl ChunkSource for MemSource {
    fn size(&self) -> u64 {
        self.blob.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.gated == Some(offset) {
            let mut open = crate::cache::lock(&self.gate.0);
            while !*open {
                open = self.gate.1.wait(open).map_err(|_| io::ErrorKind::Other)?;
            }
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no peer has it"));
        }
        let start = offset as usize;
        buf.copy_from_slice(&self.blob[start..start + buf.len()]);
        if self.corrupt.load(Ordering::SeqCst) {
            buf[0] ^= 0xff;
        }
        Ok(())
    }

    fn is_local(&self, _range: Range<u64>) -> bool {
        !self.remote
    }
}

#[derive(Debug)]
struct FakeLayer {
    index: Index,
    source: Arc<dyn ChunkSource>,
}

impl LayerData for FakeLayer {
    fn index(&self) -> &Index {
        &self.index
    }

    fn source(&self) -> &Arc<dyn ChunkSource> {
        &self.source
    }

    fn read_chunk(&self, chunk: &Chunk) -> Result<Vec<u8>, BoxError> {
        let mut bytes = vec![0; (chunk.compressed.end - chunk.compressed.start) as usize];
        self.source.read_at(chunk.compressed.start, &mut bytes)?;
        if <[u8; 32]>::from(Sha256::digest(&bytes)) != chunk.digest {
            return Err("chunk digest mismatch".into());
        }
        Ok(bytes)
    }
}

/// Builds an [`Index`] and its blob.
struct Tree {
    nodes: Vec<Node>,
    blob: Vec<u8>,
}

impl Tree {
    fn new() -> Self {
        let mut tree = Tree {
            nodes: Vec::new(),
            blob: Vec::new(),
        };
        tree.push(Kind::Dir, 0o755);
        tree.nodes[0].parent = ROOT;
        tree.nodes[0].nlink = 2;
        tree
    }

    fn push(&mut self, kind: Kind, mode: u32) -> Ino {
        self.nodes.push(Node {
            kind,
            mode,
            uid: 1000,
            gid: 100,
            size: 0,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            nlink: 0,
            rdev: 0,
            target: Vec::new(),
            xattrs: Vec::new(),
            parent: ROOT,
            children: Vec::new(),
            chunks: Vec::new(),
        });
        self.nodes.len() as Ino
    }

    fn node(&mut self, ino: Ino) -> &mut Node {
        &mut self.nodes[ino as usize - 1]
    }

    fn link(&mut self, parent: Ino, name: &str, ino: Ino) -> Ino {
        let dir = self.node(parent);
        dir.children.push((name.as_bytes().to_vec(), ino));
        dir.children.sort();
        if self.node(ino).nlink == 0 {
            self.node(ino).parent = parent;
        }
        self.node(ino).nlink += 1;
        ino
    }

    fn add(&mut self, parent: Ino, name: &str, kind: Kind, mode: u32) -> Ino {
        let ino = self.push(kind, mode);
        if kind == Kind::Dir {
            self.node(ino).nlink = 1;
            self.node(parent).nlink += 1;
        }
        self.link(parent, name, ino)
    }

    fn file(&mut self, parent: Ino, name: &str, content: &[u8], chunk_size: usize) -> Ino {
        let ino = self.add(parent, name, Kind::File, 0o644);
        let mut chunks = Vec::new();
        for (i, piece) in content.chunks(chunk_size).enumerate() {
            let start = self.blob.len() as u64;
            self.blob.extend_from_slice(piece);
            chunks.push(Chunk {
                file_offset: (i * chunk_size) as u64,
                size: piece.len() as u64,
                compressed: start..self.blob.len() as u64,
                inner_offset: 0,
                digest: Sha256::digest(piece).into(),
            });
        }
        let node = self.node(ino);
        node.size = content.len() as u64;
        node.chunks = chunks;
        ino
    }

    fn layer(self, source: impl FnOnce(Vec<u8>) -> MemSource) -> (Arc<FakeLayer>, Arc<MemSource>) {
        let source = Arc::new(source(self.blob));
        let layer = FakeLayer {
            index: Index {
                nodes: self.nodes,
                toc_offset: 0,
                prefetch: None,
            },
            source: source.clone(),
        };
        (Arc::new(layer), source)
    }
}

/// Bytes that differ at every offset, so a misplaced slice shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed ^ (i / 251) as u8)
        .collect()
}

/// The sample tree: three files (one of several chunks), a directory, a symlink, a hardlink,
/// a device, a fifo, xattrs.
fn sample() -> Tree {
    let mut tree = Tree::new();
    let etc = tree.add(ROOT, "etc", Kind::Dir, 0o755);
    tree.file(etc, "hostname", b"shoal\n", 4096);
    let big = tree.file(ROOT, "big", &pattern(100_000, 7), 8192);
    tree.link(etc, "big-link", big);
    tree.file(ROOT, "empty", b"", 4096);
    tree.file(ROOT, "other", &pattern(5000, 9), 4096);
    let link = tree.add(ROOT, "link", Kind::Symlink, 0o777);
    tree.node(link).target = b"etc/hostname".to_vec();
    tree.node(link).size = 12;
    let null = tree.add(ROOT, "null", Kind::CharDevice, 0o666);
    tree.node(null).rdev = nix::sys::stat::makedev(1, 3) as u32;
    tree.add(ROOT, "fifo", Kind::Fifo, 0o600);
    tree.node(etc).xattrs = vec![
        (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
        (b"user.note".to_vec(), b"hello".to_vec()),
    ];
    tree
}

fn mount_fake(layer: Arc<FakeLayer>, dir: &Path, opts: FsOptions) -> anyhow::Result<LayerMount> {
    Ok(mount_data(layer, dir, opts)?)
}

fn is_mounted(path: &Path) -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let path = path.to_string_lossy();
    Ok(mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(&*path)))
}

#[test]
fn metadata_matches_the_index() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let mnt = mount_fake(layer, dir.path(), FsOptions::default())?;
    let root = mnt.mountpoint();

    let names: Vec<String> = fs::read_dir(root)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<_>>()?;
    assert_eq!(
        names,
        ["big", "empty", "etc", "fifo", "link", "null", "other"]
    );

    let big = fs::symlink_metadata(root.join("big"))?;
    assert_eq!(big.mode(), libc::S_IFREG | 0o644);
    assert_eq!(
        (big.uid(), big.gid(), big.size(), big.nlink()),
        (1000, 100, 100_000, 2)
    );
    assert_eq!(big.mtime(), 1_700_000_000);
    assert_eq!(big.ino(), fs::metadata(root.join("etc/big-link"))?.ino());

    let etc = fs::symlink_metadata(root.join("etc"))?;
    assert_eq!((etc.mode(), etc.nlink()), (libc::S_IFDIR | 0o755, 2));
    assert_eq!(fs::symlink_metadata(root)?.nlink(), 3);

    let null = fs::symlink_metadata(root.join("null"))?;
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), nix::sys::stat::makedev(1, 3));
    assert!(
        fs::symlink_metadata(root.join("fifo"))?
            .file_type()
            .is_fifo()
    );
    assert_eq!(fs::read_link(root.join("link"))?, Path::new("etc/hostname"));
    assert_eq!(fs::read(root.join("link"))?, b"shoal\n");

    let etc = root.join("etc");
    let mut names: Vec<_> = xattr::list(&etc)?.collect();
    names.sort();
    assert_eq!(names, ["trusted.overlay.opaque", "user.note"]);
    assert_eq!(xattr::get(&etc, "user.note")?, Some(b"hello".to_vec()));
    assert_eq!(xattr::get(&etc, "user.absent")?, None);
    assert_eq!(xattr::list(root.join("big"))?.count(), 0);

    let err = fs::OpenOptions::new().write(true).open(root.join("big"));
    assert_eq!(err.err().and_then(|e| e.raw_os_error()), Some(libc::EROFS));
    assert!(fs::metadata(root.join("missing")).is_err());

    let path = dir.path().to_path_buf();
    assert!(is_mounted(&path)?);
    drop(mnt);
    assert!(!is_mounted(&path)?);
    Ok(())
}

#[test]
fn reads_span_chunks_and_stop_at_eof() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let mnt = mount_fake(layer, dir.path(), FsOptions::default())?;
    let root = mnt.mountpoint();
    let expected = pattern(100_000, 7);
    assert_eq!(fs::read(root.join("big"))?, expected);
    assert_eq!(fs::read(root.join("empty"))?, b"");

    let mut file = fs::File::open(root.join("etc/big-link"))?;
    for (offset, len) in [
        (8190, 10),
        (0, 1),
        (99_990, 100),
        (50_000, 30_000),
        (200_000, 5),
    ] {
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len];
        let n = read_full(&mut file, &mut buf)?;
        let from = (offset as usize).min(expected.len());
        let to = (from + len).min(expected.len());
        assert_eq!(&buf[..n], &expected[from..to], "at {offset}+{len}");
    }
    let stats = mnt.stats();
    assert!(stats.reads > 0 && stats.bytes >= 100_000, "{stats:?}");
    assert_eq!(stats.chunk_fetches, 100_000_u64.div_ceil(8192));
    assert_eq!(stats.eios, 0);
    Ok(())
}

fn read_full(file: &mut fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            got => n += got,
        }
    }
    Ok(n)
}

fn errno_of(result: io::Result<Vec<u8>>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

#[test]
fn corrupt_or_missing_chunks_fail_with_eio() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (layer, source) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let mnt = mount_fake(layer, dir.path(), FsOptions::default())?;
    let root = mnt.mountpoint();

    source.corrupt.store(true, Ordering::SeqCst);
    assert_eq!(errno_of(fs::read(root.join("big"))), Some(libc::EIO));
    source.corrupt.store(false, Ordering::SeqCst);
    source.fail.store(true, Ordering::SeqCst);
    assert_eq!(errno_of(fs::read(root.join("other"))), Some(libc::EIO));
    assert!(mnt.stats().eios >= 2);

    // Failures are not cached: once the source recovers, the same files read correctly.
    source.fail.store(false, Ordering::SeqCst);
    assert_eq!(fs::read(root.join("big"))?, pattern(100_000, 7));
    assert_eq!(fs::read(root.join("other"))?, pattern(5000, 9));
    Ok(())
}

#[test]
fn a_slow_chunk_holds_up_only_its_own_reader() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let tree = sample();
    // "other" is the last file written to the blob: its first chunk is at 100_000 + 6.
    let (layer, source) = tree.layer(|blob| MemSource {
        blob,
        gated: Some(100_006),
        ..MemSource::default()
    });
    let mnt = mount_fake(layer, dir.path(), FsOptions::default())?;
    let root = mnt.mountpoint().to_path_buf();

    let (done, finished) = mpsc::channel();
    let slow = {
        let root = root.clone();
        thread::spawn(move || {
            let read = fs::read(root.join("other"));
            let _ = done.send(());
            read
        })
    };
    // Several readers of other files, from several threads, while that read waits.
    thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                assert_eq!(fs::read(root.join("big")).ok(), Some(pattern(100_000, 7)));
                assert_eq!(
                    fs::read(root.join("etc/hostname")).ok(),
                    Some(b"shoal\n".to_vec())
                );
            });
        }
    });
    assert!(
        finished.try_recv().is_err(),
        "the gated read finished early"
    );
    source.open_gate();
    finished.recv_timeout(Duration::from_secs(30))?;
    let read = slow
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    assert_eq!(read, pattern(5000, 9));
    Ok(())
}

#[test]
fn dropping_a_busy_mount_detaches_it() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let mnt = mount_fake(layer, dir.path(), FsOptions::default())?;
    let mut open = fs::File::open(mnt.mountpoint().join("other"))?;
    drop(mnt);
    assert!(!is_mounted(dir.path())?);
    // The open file is still served by the detached session.
    let mut bytes = Vec::new();
    open.read_to_end(&mut bytes)?;
    assert_eq!(bytes, pattern(5000, 9));
    Ok(())
}

#[test]
fn xattr_size_protocol() -> anyhow::Result<()> {
    let (layer, _) = sample().layer(|blob| MemSource {
        blob,
        ..MemSource::default()
    });
    let fs = LayerFs {
        data: layer,
        readahead: None,
        cache: Arc::new(ChunkCache::new(1 << 20)),
        counters: Arc::default(),
        ttl: Duration::from_secs(1),
        copies: None,
        passthrough: None,
    };
    let etc = fs
        .index()
        .lookup(ROOT, b"etc")
        .ok_or(anyhow::anyhow!("no etc"))?;
    use super::inode::Xattr;
    assert_eq!(fs.getxattr(etc, b"user.note", 0), Ok(Xattr::Size(5)));
    assert_eq!(fs.getxattr(etc, b"user.note", 4), Err(fuser::Errno::ERANGE));
    assert_eq!(
        fs.getxattr(etc, b"user.note", 5),
        Ok(Xattr::Data(b"hello".to_vec()))
    );
    assert_eq!(
        fs.getxattr(etc, b"user.nope", 0),
        Err(fuser::Errno::NO_XATTR)
    );
    let names = b"trusted.overlay.opaque\0user.note\0".to_vec();
    assert_eq!(fs.listxattr(etc, 0), Ok(Xattr::Size(names.len() as u32)));
    assert_eq!(fs.listxattr(etc, 10), Err(fuser::Errno::ERANGE));
    assert_eq!(fs.listxattr(etc, 100), Ok(Xattr::Data(names)));

    let names: Vec<_> = fs
        .readdir(ROOT, 0)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .map(|e| String::from_utf8_lossy(e.name).into_owned())
        .collect();
    assert_eq!(names[..3], [".", "..", "big"]);
    let resumed: Vec<_> = fs
        .readdir(ROOT, 3)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .map(|e| e.next)
        .collect();
    assert_eq!(resumed, (4..=names.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        fs.path_of(fs.index().lookup(etc, b"hostname").unwrap_or(0)),
        "/etc/hostname"
    );
    Ok(())
}

mod copies;
mod passthrough;
