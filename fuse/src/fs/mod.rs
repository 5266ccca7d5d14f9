//! The FUSE filesystem presenting one lazy layer, read-only, as a lower directory for overlayfs.
//!
//! [`mount`] mounts a layer and returns a [`LayerMount`] guard; dropping the guard unmounts it.
//! Metadata comes from the layer's [`Index`], which is in memory, so lookups, `stat`, `readdir`
//! and xattrs never wait. File bytes come chunk by chunk through the layer (fetched from its
//! [`ChunkSource`], inflated, checked against the TOC's `chunkDigest`) and are kept in a bounded
//! [`ChunkCache`]; once a file's chunks are all local, from its verified uncompressed copy on
//! disk (`copies.rs`), or, with passthrough, by the kernel from that copy. A chunk that cannot be fetched or does not verify fails the read with `EIO`:
//! never wrong bytes, never a hang (sources bound their own time).
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the public API, the shared state [`LayerFs`] and the mount guard |
//! | `inode.rs` | metadata: attributes, lookup, directories, symlinks, xattrs, statfs |
//! | `read.rs` | file bytes, from a local copy or through the chunk cache |
//! | `readahead.rs` | the next chunk of a file read sequentially, fetched on a helper thread |
//! | `copies.rs` | verified uncompressed copies of local files, kept across mounts |
//! | `passthrough.rs` | files with a copy, served by the kernel from it |
//! | `ops.rs` | the `fuser::Filesystem` impl: a thin edge mapping requests to the above |
//! | `session.rs` | `/dev/fuse`, mount(2), unmount, and detaching stale mounts |
//!
//! Requests are served by `threads` session threads, each with its own cloned `/dev/fuse` fd,
//! so a read waiting on the network holds up only its own thread.

mod copies;
mod inode;
mod ops;
mod passthrough;
mod read;
mod readahead;
mod session;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use session::unmount_stale;

use crate::cache::ChunkCache;
use crate::index::{Chunk, Index, Ino};
use crate::source::ChunkSource;
use copies::Copies;
use passthrough::Passthrough;
use readahead::ReadAhead;

/// How a layer is mounted.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Budget of the cache of inflated chunks, in bytes.
    pub cache_bytes: u64,
    /// Threads serving FUSE requests: this many reads can wait on the network at once.
    pub threads: usize,
    /// Where to keep verified, uncompressed copies of files whose chunks are all local, which
    /// reads then use instead of inflating chunks. The directory belongs to the layer: mounts
    /// of the same layer (the same TOC) may share it, at once or one after another, and copies
    /// found in it are checked before use. `None`: no copies, and so no passthrough.
    pub copies_dir: Option<PathBuf>,
    /// Let the kernel read files with a copy directly (FUSE passthrough, kernel 6.9+, needs
    /// `CAP_SYS_ADMIN`); falls back to reads through FUSE where refused.
    pub passthrough: bool,
    /// How long the kernel may cache attributes and lookups; layers never change.
    pub ttl: Duration,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            cache_bytes: 64 << 20,
            threads: 4,
            copies_dir: None,
            passthrough: false,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// What a mount has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// `read` requests answered (successfully or not).
    pub reads: u64,
    /// Bytes returned by `read`.
    pub bytes: u64,
    /// Chunks fetched and inflated (cache misses, failed fetches included).
    pub chunk_fetches: u64,
    /// Chunk lookups answered from the cache, or by joining a fetch already under way.
    pub cache_hits: u64,
    /// Opens answered with a passthrough backing file.
    pub passthrough_opens: u64,
    /// Files given a verified local copy (written, or found from an earlier mount and checked).
    pub local_copies: u64,
    /// Requests answered with `EIO`.
    pub eios: u64,
}

/// Why a layer could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount options: {0}")]
    Options(&'static str),
    #[error("preparing the directory of local copies {path}")]
    CopiesDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting FUSE at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the FUSE session at {path}")]
    Session {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A layer as the filesystem needs it: its tree, its blob, and verified chunk bytes.
///
/// `estargz::Layer` is the one real implementation; tests build others by hand.
pub(crate) trait LayerData: Send + Sync + fmt::Debug + 'static {
    fn index(&self) -> &Index;
    fn source(&self) -> &Arc<dyn ChunkSource>;
    /// The chunk's uncompressed bytes, verified against its digest.
    fn read_chunk(&self, chunk: &Chunk) -> Result<Vec<u8>, BoxError>;
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Mounts `layer` read-only at `mountpoint`, serving it until the returned guard is dropped.
pub fn mount(
    layer: Arc<crate::estargz::Layer>,
    mountpoint: &Path,
    opts: FsOptions,
) -> Result<LayerMount, Error> {
    mount_data(layer, mountpoint, opts)
}

impl LayerData for crate::estargz::Layer {
    fn index(&self) -> &Index {
        crate::estargz::Layer::index(self)
    }

    fn source(&self) -> &Arc<dyn ChunkSource> {
        crate::estargz::Layer::source(self)
    }

    fn read_chunk(&self, chunk: &Chunk) -> Result<Vec<u8>, BoxError> {
        Ok(crate::estargz::Layer::read_chunk(self, chunk)?)
    }
}

pub(crate) fn mount_data(
    data: Arc<dyn LayerData>,
    mountpoint: &Path,
    opts: FsOptions,
) -> Result<LayerMount, Error> {
    if opts.threads == 0 {
        return Err(Error::Options("threads must be at least 1"));
    }
    let counters = Arc::new(Counters::default());
    let mut copies =
        match &opts.copies_dir {
            Some(dir) => Some(Copies::new(dir, Arc::clone(&counters)).map_err(|source| {
                Error::CopiesDir {
                    path: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
    let passthrough = (opts.passthrough && copies.is_some()).then(Passthrough::default);
    // Prefetching the landmark's range is the caller's choice (`Index::prefetch`).
    let cache = Arc::new(ChunkCache::new(opts.cache_bytes));
    if let Some(copies) = &mut copies
        && let Err(e) = copies.start_copier(Arc::clone(&data), Arc::clone(&cache))
    {
        // Every file is then copied before its first open returns.
        tracing::warn!(error = %e, "no copy thread");
    }
    // Without the helper thread reads still work, one chunk at a time.
    let readahead = ReadAhead::start(Arc::clone(&data), Arc::clone(&cache))
        .inspect_err(|e| tracing::warn!(error = %e, "no read-ahead thread"))
        .ok();
    let fs = LayerFs {
        data,
        readahead,
        cache: cache.clone(),
        counters: counters.clone(),
        ttl: opts.ttl,
        copies,
        passthrough,
    };
    let materializer = fs
        .copies
        .as_ref()
        .and_then(Copies::materializer)
        .map(|(queue, closed)| Materializer {
            queue,
            closed,
            data: Arc::clone(&fs.data),
        });
    let session = session::Mounted::new(fs, mountpoint, opts.threads)?;
    raise_read_ahead(mountpoint);
    Ok(LayerMount {
        materializer,
        mountpoint: mountpoint.to_path_buf(),
        cache,
        counters,
        session: Some(session),
    })
}

/// The kernel reads ahead at most 128 KiB on a FUSE mount unless told otherwise; layers are
/// read-only and mostly read whole, so a larger window keeps several 1 MiB reads in flight,
/// one per session thread. Best effort: without it reads are only slower.
const READ_AHEAD_KB: u32 = 8192;

fn raise_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata(mountpoint).map(|m| m.dev()) else {
        return;
    };
    // glibc's major()/minor() encoding of a dev_t.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        tracing::debug!(%knob, error = %e, "could not raise the read-ahead window");
    }
}

/// A mounted layer. Dropping it unmounts the layer and stops its session threads.
pub struct LayerMount {
    /// Queues copies of every file; `None` without copies.
    materializer: Option<Materializer>,
    mountpoint: PathBuf,
    cache: Arc<ChunkCache>,
    counters: Arc<Counters>,
    session: Option<session::Mounted>,
}

/// Queues a local copy of every file of a layer; see [`LayerMount::materializer`].
#[derive(Clone)]
pub struct Materializer {
    queue: std::sync::mpsc::SyncSender<copies::Copy>,
    /// Set once the filesystem is gone: stop queueing.
    closed: Arc<std::sync::atomic::AtomicBool>,
    data: Arc<dyn LayerData>,
}

impl fmt::Debug for Materializer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Materializer").finish_non_exhaustive()
    }
}

impl Materializer {
    /// Queues every regular file for its verified copy, blocking while the copy thread's queue
    /// is full; returns how many were queued. Call it once the whole blob is local: reads then
    /// find the copies made (and with passthrough the kernel reads them directly). Copies left
    /// by an earlier mount of the layer are checked instead of written again.
    pub fn run(&self) -> usize {
        let mut queued = 0;
        for (i, node) in self.data.index().nodes.iter().enumerate() {
            if node.kind != crate::index::Kind::File || node.size == 0 {
                continue;
            }
            let copy = copies::Copy {
                ino: i as Ino + 1,
                share_cache: false,
                write: true,
            };
            // Unmounted meanwhile: the copy thread has stopped, or is about to.
            if self.closed.load(Ordering::Relaxed) || self.queue.send(copy).is_err() {
                break;
            }
            queued += 1;
        }
        queued
    }
}

impl LayerMount {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What makes local copies of every file ahead of any open (`None` without a copies
    /// directory). Dropping the mount stops the copies.
    pub fn materializer(&self) -> Option<Materializer> {
        self.materializer.clone()
    }

    pub fn stats(&self) -> FsStats {
        let cache = self.cache.stats();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FsStats {
            reads: load(&self.counters.reads),
            bytes: load(&self.counters.bytes),
            chunk_fetches: cache.fetches,
            cache_hits: cache.hits + cache.joined,
            passthrough_opens: load(&self.counters.passthrough_opens),
            local_copies: load(&self.counters.local_copies),
            eios: load(&self.counters.eios),
        }
    }
}

impl fmt::Debug for LayerMount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerMount")
            .field("mountpoint", &self.mountpoint)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            session.unmount();
        }
    }
}

/// Counters shared by the session threads and the guard.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    bytes: AtomicU64,
    passthrough_opens: AtomicU64,
    local_copies: AtomicU64,
    eios: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The filesystem's state, shared by every session thread.
#[derive(Debug)]
pub(crate) struct LayerFs {
    data: Arc<dyn LayerData>,
    /// Fetches the next chunk of a file being read sequentially.
    readahead: Option<ReadAhead>,
    cache: Arc<ChunkCache>,
    counters: Arc<Counters>,
    ttl: Duration,
    /// Verified copies of local files, when a directory for them is given.
    copies: Option<Copies>,
    /// `Some` while passthrough is wanted and possible; `init` clears it when the kernel
    /// cannot do it.
    passthrough: Option<Passthrough>,
}

impl LayerFs {
    fn index(&self) -> &Index {
        self.data.index()
    }
}

#[cfg(test)]
mod tests;
