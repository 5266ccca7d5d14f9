//! FUSE passthrough: once every chunk of a file is local, the kernel can read it without us.
//!
//! On such a file's first open, its chunks are read through the chunk cache (so each is verified
//! against its `chunkDigest`, and a reader and the copy never inflate a chunk twice) into
//! `passthrough_dir/<ino>`, written under a temporary name and renamed into place. A small file
//! is copied before the open returns; a larger one is copied by a helper thread while this open
//! reads through FUSE, so no reader waits for a whole file to be copied. The copy is registered
//! with the kernel as the backing file of later opens, and from then on `read`, `mmap` and
//! `splice` on it go straight to the copy's filesystem.
//!
//! Copies are made once per mount and never trusted across mounts: the directory belongs to
//! one mount, and a leftover file is simply overwritten. One backing id per inode is shared by
//! all of its open handles (the kernel requires it) and closed when the last one is released.
//!
//! Any refusal falls back to ordinary reads. A kernel refusal (no passthrough support, no
//! `CAP_SYS_ADMIN`, a copy on a stacked filesystem) is remembered for the whole mount; a failed
//! copy is remembered for its file.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use tracing::{debug, warn};

use super::read::chain;
use super::readahead::fetch_chunk;
use super::{Counters, LayerData, LayerFs};
use crate::cache::{ChunkCache, ChunkKey, lock};
use crate::index::{Ino, Kind, Node};

/// Files up to this size are copied before their first open returns.
const COPY_BEFORE_OPEN: u64 = 1 << 20;
/// Files queued for the copy thread at most; more wait for a later open.
const COPY_QUEUE: usize = 64;

/// A file for the copy thread.
#[derive(Debug)]
pub(super) struct Copy {
    pub(super) ino: Ino,
    /// Through the chunk cache (a reader is reading the file now) or around it (every file of
    /// a complete layer, which would only flush the cache).
    pub(super) share_cache: bool,
}

type Slots = Mutex<HashMap<Ino, Arc<Mutex<Slot>>>>;

/// The file handle of passthrough opens (ordinary opens use 0), so `release` knows which is
/// which.
pub(super) const PASSTHROUGH_FH: u64 = 1;

#[derive(Debug)]
pub(super) struct Passthrough {
    dir: PathBuf,
    refused: AtomicBool,
    files: Arc<Slots>,
    /// The copy thread's queue, once started.
    copier: Option<SyncSender<Copy>>,
}

/// One file's passthrough state.
#[derive(Debug, Default)]
struct Slot {
    /// The verified copy, once written.
    copy: Option<PathBuf>,
    /// Copying failed: this file is read through FUSE for the rest of the mount.
    failed: bool,
    /// Queued for, or being written by, the copy thread.
    copying: bool,
    /// Registered with the kernel while the file has passthrough opens.
    backing: Option<BackingId>,
    /// Passthrough opens not yet released.
    opens: u32,
    /// Ordinary (cached) opens not yet released: while there are any, no passthrough.
    cached_opens: u32,
}

impl Passthrough {
    pub(super) fn new(dir: &Path) -> io::Result<Self> {
        // Copies of files that may be private inside the image: root only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Passthrough {
            dir: dir.to_path_buf(),
            refused: AtomicBool::new(false),
            files: Arc::new(Mutex::new(HashMap::new())),
            copier: None,
        })
    }

    /// Starts the thread that copies larger files; it ends when the filesystem is dropped.
    pub(super) fn start_copier(
        &mut self,
        data: Arc<dyn LayerData>,
        cache: Arc<ChunkCache>,
    ) -> io::Result<()> {
        let (queue, files) = sync_channel::<Copy>(COPY_QUEUE);
        let (dir, slots) = (self.dir.clone(), Arc::clone(&self.files));
        thread::Builder::new()
            .name("shoal-passthrough".into())
            .spawn(move || {
                for Copy { ino, share_cache } in files {
                    let Some(node) = data.index().node(ino) else {
                        continue;
                    };
                    let slot = lock(&slots).entry(ino).or_default().clone();
                    if lock(&slot).copy.is_some() {
                        continue;
                    }
                    let cache = share_cache.then_some(&*cache);
                    let copy = write_copy(&dir, &*data, cache, ino, node);
                    let mut slot = lock(&slot);
                    slot.copying = false;
                    match copy {
                        Ok(path) => slot.copy = Some(path),
                        Err(err) => {
                            warn!(ino, %err, "no passthrough copy; reading through FUSE");
                            slot.failed = true;
                        }
                    }
                }
            })?;
        self.copier = Some(queue);
        Ok(())
    }

    /// Something that queues copies of every file, for [`super::LayerMount::materialize`];
    /// `None` without a copy thread.
    pub(super) fn materializer(&self) -> Option<SyncSender<Copy>> {
        self.copier.clone()
    }

    /// Opens file `ino` with passthrough if it can: `Ok` once replied, else the reply back for
    /// an ordinary open.
    pub(super) fn open(&self, fs: &LayerFs, ino: Ino, reply: ReplyOpen) -> Result<(), ReplyOpen> {
        if self.refused.load(Ordering::Relaxed) {
            return Err(reply);
        }
        let Ok(node) = fs.node(ino) else {
            return Err(reply);
        };
        if node.kind != Kind::File || node.size == 0 {
            return Err(reply);
        }
        // The kernel refuses a passthrough open of an inode that has ordinary (cached) opens, and
        // the reverse: every open of a file is decided, and counted, under its slot's lock.
        let slot = lock(&self.files).entry(ino).or_default().clone();
        let mut slot = lock(&slot);
        let cached = |mut slot: std::sync::MutexGuard<'_, Slot>, reply| {
            slot.cached_opens += 1;
            Err(reply)
        };
        if slot.backing.is_none() {
            let source = fs.data.source();
            let local = node
                .chunks
                .iter()
                .all(|chunk| source.is_local(chunk.compressed.clone()));
            if slot.failed || slot.cached_opens > 0 || !local {
                return cached(slot, reply);
            }
            let copy = match &slot.copy {
                Some(copy) => Ok(copy.clone()),
                None if node.size <= COPY_BEFORE_OPEN || self.copier.is_none() => {
                    write_copy(&self.dir, &*fs.data, Some(&fs.cache), ino, node)
                }
                None => {
                    // Read through FUSE this time; a later open finds the copy.
                    if !slot.copying
                        && let Some(copier) = &self.copier
                        && copier
                            .try_send(Copy {
                                ino,
                                share_cache: true,
                            })
                            .is_ok()
                    {
                        slot.copying = true;
                    }
                    return cached(slot, reply);
                }
            };
            let file = match copy.and_then(|copy| Ok((File::open(&copy)?, copy))) {
                Ok((file, copy)) => {
                    slot.copy = Some(copy);
                    file
                }
                Err(err) => {
                    warn!(path = %fs.path_of(ino), %err, "no passthrough copy; reading through FUSE");
                    slot.failed = true;
                    return cached(slot, reply);
                }
            };
            match reply.open_backing(&file) {
                Ok(id) => slot.backing = Some(id),
                Err(err) => {
                    if !self.refused.swap(true, Ordering::Relaxed) {
                        warn!(%err, "the kernel refused a passthrough backing file; reading through FUSE from now on");
                    }
                    return cached(slot, reply);
                }
            }
        }
        let Some(backing) = &slot.backing else {
            return cached(slot, reply);
        };
        // Counted before replying: once the kernel has the reply, the caller may look.
        Counters::add(&fs.counters.passthrough_opens, 1);
        reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), backing);
        slot.opens += 1;
        Ok(())
    }

    /// An ordinary handle of `ino` was closed.
    pub(super) fn release_cached(&self, ino: Ino) {
        if let Some(slot) = lock(&self.files).get(&ino).cloned() {
            let mut slot = lock(&slot);
            slot.cached_opens = slot.cached_opens.saturating_sub(1);
        }
    }

    /// A passthrough handle of `ino` was closed.
    pub(super) fn release(&self, ino: Ino) {
        let Some(slot) = lock(&self.files).get(&ino).cloned() else {
            return;
        };
        let mut slot = lock(&slot);
        slot.opens = slot.opens.saturating_sub(1);
        if slot.opens == 0 {
            slot.backing = None;
        }
    }
}

/// Writes the verified copy of file `ino` into `dir`, returning its path.
fn write_copy(
    dir: &Path,
    data: &dyn LayerData,
    cache: Option<&ChunkCache>,
    ino: Ino,
    node: &Node,
) -> io::Result<PathBuf> {
    // Two writers of one file (an open and the copy thread) each write their own temporary
    // file; the renames then replace one verified copy with an identical one.
    static WRITER: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(ino.to_string());
    let partial = dir.join(format!(
        ".{ino}.{}.partial",
        WRITER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut out| {
            for chunk in &node.chunks {
                let failed = |err: crate::fs::BoxError| io::Error::other(chain(&*err));
                match cache {
                    Some(cache) => {
                        let bytes = cache
                            .get_or_fetch(ChunkKey::from(chunk), || fetch_chunk(data, chunk))
                            .map_err(|err| match err {
                                crate::cache::FetchError::Failed(err) => failed(err),
                                crate::cache::FetchError::FailedElsewhere => {
                                    io::Error::other("a chunk failed to verify")
                                }
                            })?;
                        out.write_all(&bytes)?;
                    }
                    None => out.write_all(&fetch_chunk(data, chunk).map_err(failed)?)?,
                }
            }
            Ok(())
        });
    if let Err(err) = written {
        let _ = fs::remove_file(&partial);
        return Err(err);
    }
    if let Err(err) = fs::rename(&partial, &path) {
        let _ = fs::remove_file(&partial);
        return Err(err);
    }
    debug!(ino, copy = %path.display(), "passthrough copy written");
    Ok(path)
}
