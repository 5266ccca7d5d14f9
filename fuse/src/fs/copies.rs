//! Verified, uncompressed copies of a layer's files, kept on local disk.
//!
//! Once a file's chunks are all local, inflating and hashing them on every read is wasted
//! work: the file is written out once, chunk by chunk from verified bytes, under a temporary
//! name renamed into place. From then on a read through FUSE is one `pread` of the copy, and
//! with passthrough ([`super::passthrough`]) the kernel reads the copy without asking us.
//!
//! The directory belongs to the layer (its TOC), not to one mount: copies outlive a mount and a
//! node restart, and every mount of the same layer shares them. They are never written with
//! `fsync`, so a copy found on disk is not trusted as is: before use, the copy thread reads it
//! back and checks every chunk's range against its `chunkDigest`, the same check as a fetched
//! chunk. A copy that does not match is written again.
//!
//! Copies are made by a helper thread, in the background: on an open of a local file, and for
//! every file once the caller says the whole layer is local ([`Materializer`]). Only a
//! passthrough open of a small file waits for its copy (see [`Copies::for_open`]).
//!
//! [`Materializer`]: super::Materializer

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::read::chain;
use super::readahead::fetch_chunk;
use super::{Counters, LayerData};
use crate::cache::{ChunkCache, ChunkKey, FetchError, lock};
use crate::index::{Ino, Node};

/// Files up to this size are copied before a passthrough open returns.
const COPY_BEFORE_OPEN: u64 = 1 << 20;
/// Files queued for the copy thread at most; more wait for a later open.
const COPY_QUEUE: usize = 64;
/// Bytes read at a time when checking a copy found on disk.
const CHECK_BLOCK: usize = 1 << 20;
/// Alignment of reads of a copy opened with `O_DIRECT`.
pub(super) const DIRECT_ALIGN: usize = 4096;
/// How far ahead of a sequential reader a copy's pages are asked of the disk.
const COPY_READ_AHEAD: u64 = 16 << 20;
/// The most read ahead in one `POSIX_FADV_WILLNEED`.
const ADVISE_STEP: u64 = 1 << 20;

/// A verified copy, open for reading.
///
/// Reads through FUSE fill the FUSE file's page cache, which keeps the bytes for every later
/// read: going through the copy's page cache as well would hold each byte twice in memory and
/// copy it once more. So the copy is read with `O_DIRECT` where the filesystem allows it: the
/// disk's bytes land in the reply buffer directly. Requests the kernel sends for cached files
/// are page-aligned; any other (and any filesystem without `O_DIRECT`) reads buffered, and then
/// a sequential reader gets a read-ahead of its own: its requests reach the copy through
/// several FUSE worker threads and one extra hop, which leaves the kernel's read-ahead on the
/// copy too little time, so the copy asks for the pages ahead (`POSIX_FADV_WILLNEED`).
#[derive(Debug)]
pub(super) struct LocalCopy {
    file: File,
    /// The same file opened with `O_DIRECT`, if the filesystem takes it.
    direct: Option<File>,
    /// Set once a direct read was refused as invalid (the device wants another alignment,
    /// or the filesystem opens with `O_DIRECT` but cannot read so): buffered from then on,
    /// instead of a failing system call before every read.
    direct_refused: AtomicBool,
    /// Where the last read ended: a read that starts there is sequential.
    next: AtomicU64,
    /// The pages before this offset have been asked for already.
    advised: AtomicU64,
}

impl LocalCopy {
    pub(super) fn new(file: File) -> Self {
        // The same inode again (the checked one, whatever the name points to now), for reads
        // around its page cache. Not every filesystem offers O_DIRECT; without it, buffered.
        let direct = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok();
        LocalCopy {
            file,
            direct,
            direct_refused: AtomicBool::new(false),
            next: AtomicU64::new(0),
            advised: AtomicU64::new(0),
        }
    }

    pub(super) fn file(&self) -> &File {
        &self.file
    }

    /// Reads `len` bytes at `offset` of the copy (whose length is `size`) into `buf`, which
    /// must be at least `len + 2 * DIRECT_ALIGN` long; returns where in `buf` they start.
    pub(super) fn read_into(
        &self,
        buf: &mut [u8],
        offset: u64,
        len: usize,
        size: u64,
    ) -> io::Result<usize> {
        if let Some(direct) = &self.direct
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && !self.direct_refused.load(Ordering::Relaxed)
        {
            match read_direct(direct, buf, offset, len) {
                Ok(start) => return Ok(start),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                // Other errors: the buffered read below says whether the copy is readable.
                Err(_) => {}
            }
        }
        self.read_exact_at(&mut buf[..len], offset, size)?;
        Ok(0)
    }

    /// Fills `buf` from `offset` of the copy, whose length is `size`.
    pub(super) fn read_exact_at(&self, buf: &mut [u8], offset: u64, size: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        if self.next.swap(end, Ordering::Relaxed) != offset {
            return Ok(());
        }
        // Sequential: claim the part of the window nobody asked for yet (threads race here).
        let until = end.saturating_add(COPY_READ_AHEAD).min(size);
        let mut from = self.advised.fetch_max(until, Ordering::Relaxed).max(end);
        while from < until {
            // In steps the kernel takes whole: it reads at most about one read-ahead window
            // (the device's `read_ahead_kb`, often 128 KiB) or one request's worth per call.
            let step = (until - from).min(ADVISE_STEP);
            // Only a hint: if the kernel does not take it, reads are just slower.
            let _ = rustix::fs::fadvise(
                &self.file,
                from,
                std::num::NonZeroU64::new(step),
                rustix::fs::Advice::WillNeed,
            );
            from += step;
        }
        Ok(())
    }
}

/// `len` bytes at `offset` (aligned) of `direct`, an `O_DIRECT` file, into an aligned part of
/// `buf`; returns where they start. Reads whole aligned blocks, so it may read past `len`.
fn read_direct(direct: &File, buf: &mut [u8], offset: u64, len: usize) -> io::Result<usize> {
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let want = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let target = buf
        .get_mut(start..start + want)
        .ok_or_else(|| io::Error::other("read buffer too small for an aligned read"))?;
    let mut got = 0;
    while got < len {
        // After a short read, `got` is a whole number of blocks unless the file ended.
        match direct.read_at(&mut target[got..], offset + got as u64)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(start)
}

/// A file for the copy thread.
#[derive(Debug)]
pub(super) struct Copy {
    pub(super) ino: Ino,
    /// Through the chunk cache (a reader is reading the file now) or around it (every file of
    /// a complete layer, which would only flush the cache).
    pub(super) share_cache: bool,
    /// Write the copy if none checks out: the file's chunks are local. Otherwise only a copy
    /// found on disk is checked (a copy is never a reason to fetch a whole file).
    pub(super) write: bool,
}

type Slots = Mutex<HashMap<Ino, Arc<Mutex<Slot>>>>;

/// One file's copy.
#[derive(Debug, Default)]
struct Slot {
    /// The verified copy, open for reading.
    copy: Option<Arc<LocalCopy>>,
    /// Making the copy failed: this file is read through its chunks for the rest of the mount.
    failed: bool,
    /// Queued for, or being handled by, the copy thread.
    copying: bool,
    /// Looked on disk for a copy an earlier mount left (done once, not on every open).
    looked: bool,
}

impl Slot {
    /// Keeps what making the copy of `ino` came to.
    fn record(&mut self, ino: Ino, made: io::Result<Option<File>>, counters: &Counters) {
        match made {
            Ok(Some(file)) => {
                self.copy = Some(Arc::new(LocalCopy::new(file)));
                Counters::add(&counters.local_copies, 1);
            }
            Ok(None) => {}
            Err(err) => {
                warn!(ino, %err, "no local copy; reading through the chunks");
                self.failed = true;
            }
        }
    }
}

#[derive(Debug)]
pub(super) struct Copies {
    dir: PathBuf,
    files: Arc<Slots>,
    /// The copy thread's queue, once started.
    copier: Option<SyncSender<Copy>>,
    counters: Arc<Counters>,
    /// Set when the filesystem goes: the copy thread and the materializer stop, so a layer
    /// that is gone holds no blob and writes no more copies.
    closed: Arc<AtomicBool>,
}

impl Drop for Copies {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl Copies {
    pub(super) fn new(dir: &Path, counters: Arc<Counters>) -> io::Result<Self> {
        // Copies of files that may be private inside the image: root only.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        remove_dead_partials(dir);
        Ok(Copies {
            dir: dir.to_path_buf(),
            files: Arc::new(Mutex::new(HashMap::new())),
            copier: None,
            counters,
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the thread that makes copies; it ends when the filesystem is dropped.
    pub(super) fn start_copier(
        &mut self,
        data: Arc<dyn LayerData>,
        cache: Arc<ChunkCache>,
    ) -> io::Result<()> {
        let (queue, files) = sync_channel::<Copy>(COPY_QUEUE);
        let (dir, slots) = (self.dir.clone(), Arc::clone(&self.files));
        let counters = Arc::clone(&self.counters);
        let closed = Arc::clone(&self.closed);
        thread::Builder::new()
            .name("shoal-copies".into())
            .spawn(move || {
                for Copy {
                    ino,
                    share_cache,
                    write,
                } in files
                {
                    if closed.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(node) = data.index().node(ino) else {
                        continue;
                    };
                    let slot = slot(&slots, ino);
                    if lock(&slot).copy.is_some() {
                        continue;
                    }
                    let cache = share_cache.then_some(&*cache);
                    let copy = make_copy(&dir, &*data, cache, ino, node, write);
                    let mut slot = lock(&slot);
                    slot.copying = false;
                    slot.record(ino, copy, &counters);
                }
            })?;
        self.copier = Some(queue);
        Ok(())
    }

    /// Something that queues a copy of every file, for [`super::LayerMount::materializer`],
    /// and the flag that says the filesystem is gone.
    pub(super) fn materializer(&self) -> Option<(SyncSender<Copy>, Arc<AtomicBool>)> {
        Some((self.copier.clone()?, Arc::clone(&self.closed)))
    }

    /// The verified copy of `ino`, if made. Cheap: called on every read.
    pub(super) fn ready(&self, ino: Ino) -> Option<Arc<LocalCopy>> {
        let slot = lock(&self.files).get(&ino).cloned()?;
        lock(&slot).copy.clone()
    }

    /// Called on each open of regular file `ino`: its copy if made. Otherwise, when its chunks
    /// are all local (or a copy may be on disk already), a copy is queued for the copy thread,
    /// or made before returning when `wait_if_small` and the file is small.
    pub(super) fn for_open(
        &self,
        data: &dyn LayerData,
        cache: &ChunkCache,
        ino: Ino,
        node: &Node,
        wait_if_small: bool,
    ) -> Option<Arc<LocalCopy>> {
        let slot = slot(&self.files, ino);
        let mut slot = lock(&slot);
        if slot.copy.is_some() || slot.failed || slot.copying || node.size == 0 {
            return slot.copy.clone();
        }
        let source = data.source();
        let local = node
            .chunks
            .iter()
            .all(|chunk| source.is_local(chunk.compressed.clone()));
        if !local {
            // Only a copy an earlier mount left can serve a file that is not local yet.
            if std::mem::replace(&mut slot.looked, true) || !self.dir.join(ino.to_string()).exists()
            {
                return None;
            }
        }
        if (wait_if_small && node.size <= COPY_BEFORE_OPEN) || self.copier.is_none() {
            let made = make_copy(&self.dir, data, Some(cache), ino, node, local);
            slot.record(ino, made, &self.counters);
            return slot.copy.clone();
        }
        if let Some(copier) = &self.copier {
            let queued = copier.try_send(Copy {
                ino,
                share_cache: true,
                write: local,
            });
            slot.copying = queued.is_ok();
        }
        None
    }

    /// A copy handed out by [`Copies::ready`] read short: the file changed under us. It is
    /// dropped, and the file read through its chunks from now on.
    pub(super) fn discard(&self, ino: Ino) {
        let slot = slot(&self.files, ino);
        let mut slot = lock(&slot);
        slot.copy = None;
        slot.failed = true;
        let _ = fs::remove_file(self.dir.join(ino.to_string()));
    }
}

/// This process's mark in the names of the temporary files it writes: not the pid alone,
/// which a node running as pid 1 in a container has after every restart.
fn writer_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{:x}{nanos:x}", std::process::id())
    })
}

/// Removes temporary files (`.<ino>.<tag>.<n>.partial`) that a process which is gone (a
/// crashed node) left half-written. Other live mounts of the layer, in this process, may be
/// writing theirs.
fn remove_dead_partials(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let parts: Vec<&str> = name.split('.').collect();
        if let ["", _ino, tag, _n, "partial"] = parts.as_slice()
            && *tag != writer_tag()
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn slot(slots: &Slots, ino: Ino) -> Arc<Mutex<Slot>> {
    lock(slots).entry(ino).or_default().clone()
}

/// The verified copy of file `ino` in `dir`: one found there if every chunk checks out,
/// otherwise, with `write`, written now; `None` if neither.
fn make_copy(
    dir: &Path,
    data: &dyn LayerData,
    cache: Option<&ChunkCache>,
    ino: Ino,
    node: &Node,
    write: bool,
) -> io::Result<Option<File>> {
    let path = dir.join(ino.to_string());
    match File::open(&path) {
        Ok(file) => match check_copy(&file, node) {
            Ok(()) => {
                debug!(ino, copy = %path.display(), "local copy found and checked");
                return Ok(Some(file));
            }
            Err(err) => {
                debug!(ino, %err, "a local copy does not check out; removing it");
                drop(file);
                match fs::remove_file(&path) {
                    // Another mount of the layer got there first.
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        },
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    if !write {
        return Ok(None);
    }
    write_copy(dir, data, cache, ino, node)?;
    File::open(&path).map(Some)
}

/// Reads `file` back and checks it against every chunk digest of `node`.
fn check_copy(file: &File, node: &Node) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len != node.size {
        return Err(io::Error::other(format!(
            "{len} bytes, the file has {}",
            node.size
        )));
    }
    let mut buf = vec![0u8; CHECK_BLOCK];
    for chunk in &node.chunks {
        let mut hash = Sha256::new();
        let mut pos = chunk.file_offset;
        let end = chunk.file_offset + chunk.size;
        while pos < end {
            let n = (end - pos).min(CHECK_BLOCK as u64) as usize;
            file.read_exact_at(&mut buf[..n], pos)?;
            hash.update(&buf[..n]);
            pos += n as u64;
        }
        if hash.finalize().as_slice() != chunk.digest {
            return Err(io::Error::other(format!(
                "the chunk at {} does not match its digest",
                chunk.file_offset
            )));
        }
    }
    Ok(())
}

/// Writes the copy of file `ino` into `dir` from its verified chunks.
fn write_copy(
    dir: &Path,
    data: &dyn LayerData,
    cache: Option<&ChunkCache>,
    ino: Ino,
    node: &Node,
) -> io::Result<()> {
    // Two writers of one file (two mounts of the layer, or an open and the copy thread) each
    // write their own temporary file; the renames then replace one verified copy with an
    // identical one.
    static WRITER: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(ino.to_string());
    let partial = dir.join(format!(
        ".{ino}.{}.{}.partial",
        writer_tag(),
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
                let failed = |err: super::BoxError| io::Error::other(chain(&*err));
                match cache {
                    Some(cache) => {
                        let bytes = cache
                            .get_or_fetch(ChunkKey::from(chunk), || fetch_chunk(data, chunk))
                            .map_err(|err| match err {
                                FetchError::Failed(err) => failed(err),
                                FetchError::FailedElsewhere => {
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
    debug!(ino, copy = %path.display(), "local copy written");
    Ok(())
}
