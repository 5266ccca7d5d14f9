//! One blob in the store: its file, which pieces are present, and readers waiting for bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::{BlobStore, Result, StoreError};
use crate::bitfield::Bitfield;
use crate::digest::{Digest, Hasher};
use crate::metainfo::{Layout, Metainfo, PieceHash};

/// Where a blob is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Some pieces are missing.
    Partial,
    /// Every piece is present and the whole blob matched its digest.
    Complete,
    /// The blob failed its digest check and was deleted; handles to it are dead.
    Discarded,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) digest: Digest,
    size: u64,
    /// Fixed for the blob's life; kept outside the lock so readers need not copy the metainfo.
    pub(super) layout: Layout,
    /// The data file. Stays valid across the rename from `partial/` to `blobs/`.
    pub(super) file: File,
    state: Mutex<EntryState>,
    /// Bumped whenever a piece lands or the state changes.
    pub(super) changed: watch::Sender<u64>,
    /// The whole-blob hash of the pieces present from the start on (see [`PrefixHash`]).
    prefix: Mutex<PrefixHash>,
}

/// The blob's sha256 over its first `pieces` pieces, carried on as pieces arrive, so that the
/// digest check when the last one lands reads only what lies past the first missing piece, not
/// the whole blob. Readers stream blobs in order and ask for their next pieces first, so the
/// last piece to arrive is usually the first one missing, a few pieces from the end; hashing
/// the whole blob at that moment took seconds when many nodes finished together.
#[derive(Debug, Default)]
struct PrefixHash {
    pieces: u32,
    hasher: Hasher,
}

#[derive(Debug)]
pub(super) struct EntryState {
    pub(super) meta: Metainfo,
    pub(super) have: Bitfield,
    /// Pieces a [`super::PieceWriter`] is writing: nobody else writes their bytes meanwhile.
    pub(super) writing: Bitfield,
    /// Append-only journal of durable pieces; `None` once complete.
    pub(super) journal: Option<File>,
    pub(super) status: BlobState,
}

pub(super) fn partial_dir(root: &Path, digest: &Digest) -> std::path::PathBuf {
    root.join("partial").join(digest.hex())
}

fn complete_path(root: &Path, digest: &Digest) -> std::path::PathBuf {
    root.join("blobs").join(digest.hex())
}

fn meta_path(root: &Path, digest: &Digest) -> std::path::PathBuf {
    root.join("meta").join(format!("{}.json", digest.hex()))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(StoreError::io("creating", &tmp))?;
    f.write_all(bytes)
        .map_err(StoreError::io("writing", &tmp))?;
    f.sync_all().map_err(StoreError::io("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(StoreError::io("renaming", path))?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("syncing directory", dir))
}

impl Entry {
    pub(super) fn create_partial(root: &Path, meta: &Metainfo) -> Result<Self> {
        let digest = meta.digest;
        // Build the directory under tmp/ and rename it in, so a crash never leaves a half-made
        // partial blob where `open` would find it.
        let staging = root
            .join("tmp")
            .join(format!("{}-{}", digest.hex(), rand::random::<u64>()));
        fs::create_dir(&staging).map_err(StoreError::io("creating", &staging))?;
        let layout = Metainfo::empty(digest, meta.size)?;
        let json = serde_json::to_vec(&layout).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        write_atomic(&staging.join("meta.json"), &json)?;
        let data_path = staging.join("data");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&data_path)
            .map_err(StoreError::io("creating", &data_path))?;
        file.set_len(meta.size)
            .map_err(StoreError::io("sizing", &data_path))?;
        let journal_path = staging.join("pieces");
        File::create(&journal_path).map_err(StoreError::io("creating", &journal_path))?;
        let dest = partial_dir(root, &digest);
        fs::rename(&staging, &dest).map_err(StoreError::io("renaming", &dest))?;
        sync_parent(&dest)?;
        let journal = open_journal(&dest.join("pieces"))?;
        Ok(Self::new(
            digest,
            file,
            layout.clone(),
            Bitfield::new(layout.piece_count()),
            Some(journal),
        ))
    }

    pub(super) fn load_partial(root: &Path, digest: Digest) -> Result<Self> {
        let dir = partial_dir(root, &digest);
        let meta_file = dir.join("meta.json");
        let json = fs::read(&meta_file).map_err(StoreError::io("reading", &meta_file))?;
        let meta: Metainfo =
            serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        meta.validate()?;
        if meta.digest != digest {
            return Err(StoreError::Corrupt(format!(
                "{} holds metainfo of {}",
                dir.display(),
                meta.digest
            )));
        }
        let data_path = dir.join("data");
        let (file, len) = open_existing(&data_path)?;
        if len != meta.size {
            return Err(StoreError::Corrupt(format!(
                "{} is {len} bytes, expected {}",
                data_path.display(),
                meta.size
            )));
        }
        let journal_path = dir.join("pieces");
        let mut have = Bitfield::new(meta.piece_count());
        let mut raw = Vec::new();
        File::open(&journal_path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(StoreError::io("reading", &journal_path))?;
        // A crash mid-append leaves a torn last entry: drop it, the piece is simply re-fetched.
        let whole = raw.len() / 4 * 4;
        for entry in raw[..whole].chunks_exact(4) {
            let index = u32::from_le_bytes(entry.try_into().expect("chunks of 4"));
            if index >= meta.piece_count() {
                return Err(StoreError::Corrupt(format!(
                    "journal lists piece {index} of {}",
                    meta.piece_count()
                )));
            }
            have.set(index);
        }
        let journal = open_journal(&journal_path)?;
        journal
            .set_len(whole as u64)
            .map_err(StoreError::io("truncating", &journal_path))?;
        Ok(Self::new(digest, file, meta, have, Some(journal)))
    }

    pub(super) fn load_complete(root: &Path, digest: Digest) -> Result<Self> {
        let path = complete_path(root, &digest);
        let (file, size) = open_existing(&path)?;
        let meta = match fs::read(meta_path(root, &digest)) {
            Ok(json) => serde_json::from_slice::<Metainfo>(&json).ok().filter(|m| {
                m.validate().is_ok() && m.digest == digest && m.size == size && m.is_complete()
            }),
            Err(_) => None,
        };
        let meta = match meta {
            Some(m) => m,
            None => {
                // The metainfo can always be derived again from verified content.
                let meta = hash_file(&file, digest, size, &path)?;
                let json =
                    serde_json::to_vec(&meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                write_atomic(&meta_path(root, &digest), &json)?;
                meta
            }
        };
        let have = Bitfield::full(meta.piece_count());
        let mut entry = Self::new(digest, file, meta, have, None);
        entry
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .status = BlobState::Complete;
        Ok(entry)
    }

    fn new(
        digest: Digest,
        file: File,
        meta: Metainfo,
        have: Bitfield,
        journal: Option<File>,
    ) -> Self {
        let size = meta.size;
        Self {
            digest,
            size,
            layout: meta.layout(),
            file,
            state: Mutex::new(EntryState {
                writing: Bitfield::new(meta.piece_count()),
                meta,
                have,
                journal,
                status: BlobState::Partial,
            }),
            changed: watch::channel(0).0,
            prefix: Mutex::new(PrefixHash::default()),
        }
    }

    /// Carries the prefix hash over the pieces now present after it. Skipped when another
    /// thread is at it (it goes on while there are more); what it leaves is hashed by the
    /// digest check. Blocking.
    pub(super) fn advance_prefix(&self) {
        let Ok(mut prefix) = self.prefix.try_lock() else {
            return;
        };
        let count = self.layout.pieces_for(0..self.size).end;
        while prefix.pieces < count && self.lock().have.get(prefix.pieces) {
            let range = self.layout.piece_range(prefix.pieces);
            if let Err(e) = hash_range(&self.file, range, &mut prefix.hasher) {
                // The hasher may hold part of a piece: the digest check starts over.
                debug!(digest = %self.digest, error = %e, "hashing the blob's prefix");
                *prefix = PrefixHash::default();
                return;
            }
            prefix.pieces += 1;
        }
    }

    /// The sha256 of the data file: the prefix hash carried on to its end. Blocking.
    fn file_digest(&self) -> std::io::Result<Digest> {
        let mut prefix = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
        let PrefixHash { pieces, mut hasher } = std::mem::take(&mut *prefix);
        let start = self.layout.piece_range(pieces).start.min(self.size);
        hash_range(&self.file, start..self.size, &mut hasher)?;
        Ok(hasher.finish())
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn is_complete(&self) -> bool {
        self.lock().status == BlobState::Complete
    }

    pub(super) fn have_count(&self) -> u32 {
        self.lock().have.count()
    }

    /// Forgets a partial download whose blob arrived complete by another door.
    pub(super) fn delete_partial(&self, root: &Path) {
        let mut st = self.lock();
        st.status = BlobState::Discarded;
        st.journal = None;
        drop(st);
        self.changed.send_modify(|g| *g += 1);
        let dir = partial_dir(root, &self.digest);
        if let Err(e) = fs::remove_dir_all(&dir) {
            warn!(digest = %self.digest, error = %e, "removing superseded partial blob");
        }
    }

    pub(super) fn delete_files(&self, root: &Path) -> Result<()> {
        let mut st = self.lock();
        st.status = BlobState::Discarded;
        st.journal = None;
        drop(st);
        self.changed.send_modify(|g| *g += 1);
        for path in [
            complete_path(root, &self.digest),
            meta_path(root, &self.digest),
        ] {
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Io {
                        action: "removing",
                        path,
                        source: e,
                    });
                }
                _ => {}
            }
        }
        let dir = partial_dir(root, &self.digest);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                action: "removing",
                path: dir,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn open_journal(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(StoreError::io("opening", path))
}

/// Opens an existing data file for reading and writing, with its length.
fn open_existing(path: &Path) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(StoreError::io("opening", path))?;
    let len = file
        .metadata()
        .map_err(StoreError::io("reading", path))?
        .len();
    Ok((file, len))
}

/// Bytes read at a time when hashing a whole file: pieces can be 16 MiB, and a blob completes
/// while its pieces are still being served.
const HASH_BLOCK: usize = 64 << 10;

/// Feeds bytes `range` of `file` to `hasher`, a block at a time.
fn hash_range(file: &File, range: Range<u64>, hasher: &mut Hasher) -> std::io::Result<()> {
    let mut buf = vec![0u8; (range.end - range.start).min(HASH_BLOCK as u64) as usize];
    let mut pos = range.start;
    while pos < range.end {
        let block = &mut buf[..(range.end - pos).min(HASH_BLOCK as u64) as usize];
        file.read_exact_at(block, pos)?;
        hasher.update(block);
        pos += block.len() as u64;
    }
    Ok(())
}

/// Hashes a whole file, piece by piece and as a whole, checking it against `digest`.
fn hash_file(file: &File, digest: Digest, size: u64, path: &Path) -> Result<Metainfo> {
    let meta = hash_pieces(file, size, path)?;
    if meta.digest != digest {
        return Err(StoreError::DigestMismatch {
            digest,
            actual: meta.digest,
        });
    }
    Ok(meta)
}

/// The metainfo of a file's content, whatever digest it turns out to have.
fn hash_pieces(file: &File, size: u64, path: &Path) -> Result<Metainfo> {
    // The digest is not known until the end; the layout does not depend on it.
    let mut meta = Metainfo::empty(Digest::from_bytes([0; 32]), size)?;
    let mut whole = Hasher::new();
    let mut buf = vec![0u8; HASH_BLOCK];
    for index in 0..meta.piece_count() {
        let range = meta.piece_range(index);
        let mut piece = Hasher::new();
        let mut pos = range.start;
        while pos < range.end {
            let block = &mut buf[..(range.end - pos).min(HASH_BLOCK as u64) as usize];
            file.read_exact_at(block, pos)
                .map_err(StoreError::io("reading", path))?;
            whole.update(block);
            piece.update(block);
            pos += block.len() as u64;
        }
        meta.set_hash(index, PieceHash(*piece.finish().as_bytes()))?;
    }
    meta.digest = whole.finish();
    Ok(meta)
}

impl Entry {
    /// Takes a finished file (an ingest) into the store as a complete blob, without copying:
    /// hashes it, checks it against `expected` if given, and renames it into `blobs/`.
    pub(super) fn adopt(root: &Path, path: &Path, expected: Option<Digest>) -> Result<Self> {
        let (file, size) = open_existing(path)?;
        let meta = hash_pieces(&file, size, path)?;
        if let Some(expected) = expected.filter(|e| *e != meta.digest) {
            return Err(StoreError::DigestMismatch {
                digest: expected,
                actual: meta.digest,
            });
        }
        file.sync_all().map_err(StoreError::io("syncing", path))?;
        let digest = meta.digest;
        let json = serde_json::to_vec(&meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        write_atomic(&meta_path(root, &digest), &json)?;
        let dest = complete_path(root, &digest);
        fs::rename(path, &dest).map_err(StoreError::io("renaming", &dest))?;
        sync_parent(&dest)?;
        let have = Bitfield::full(meta.piece_count());
        let mut entry = Self::new(digest, file, meta, have, None);
        entry
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .status = BlobState::Complete;
        Ok(entry)
    }

    pub(super) fn digest(&self) -> Digest {
        self.digest
    }
}

/// A handle on a blob in the store. While any handle exists the blob is not evicted.
#[derive(Clone, Debug)]
pub struct Blob {
    pub(super) entry: Arc<Entry>,
    pub(super) store: BlobStore,
}

impl Blob {
    pub(super) fn new(entry: Arc<Entry>, store: BlobStore) -> Self {
        Self { entry, store }
    }

    /// How the blob is cut into pieces.
    pub fn layout(&self) -> Layout {
        self.entry.layout
    }

    pub fn digest(&self) -> Digest {
        self.entry.digest
    }

    pub fn size(&self) -> u64 {
        self.entry.size
    }

    pub fn state(&self) -> BlobState {
        self.entry.lock().status
    }

    pub fn is_complete(&self) -> bool {
        self.state() == BlobState::Complete
    }

    /// The metainfo as this store knows it (hashes of pieces it has or has been told about).
    pub fn metainfo(&self) -> Metainfo {
        self.entry.lock().meta.clone()
    }

    /// Which pieces are present and verified.
    pub fn have(&self) -> Bitfield {
        self.entry.lock().have.clone()
    }

    pub fn has_piece(&self, index: u32) -> bool {
        self.entry.lock().have.get(index)
    }

    /// Notified (value bumped) whenever a piece lands or the blob completes or is discarded.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.entry.changed.subscribe()
    }

    /// Adopts piece hashes from a (possibly partial) metainfo of the same blob.
    pub fn learn_hashes(&self, other: &Metainfo) -> Result<usize> {
        let mut st = self.entry.lock();
        if other.digest != self.entry.digest || other.size != self.entry.size {
            return Err(StoreError::LayoutConflict {
                digest: self.entry.digest,
                have: self.entry.size,
                want: other.size,
            });
        }
        Ok(st.meta.merge(other)?)
    }

    /// Every piece but `last` is present, and `last` is written, synced and still claimed:
    /// check the whole blob against its digest, and only then make `last` visible and move the
    /// blob into `blobs/`. Until then no reader or peer can see the last piece, so nothing
    /// reads all of a blob that fails its digest.
    pub(super) fn finish(&self, last: u32) -> Result<()> {
        let digest = self.entry.digest;
        let root = self.store.root().to_owned();
        let dir = partial_dir(&root, &digest);
        let path = dir.join("data");
        let known = self.entry.lock().meta.clone();
        // Every piece's hash was checked against (or, from upstream, made from) its bytes as
        // they were written, so with the digest matching, the known hashes are the file's.
        // After a restart, the hashes of pieces journaled before it are not known: make them.
        let checked = if known.is_complete() {
            match self.entry.file_digest() {
                Ok(actual) if actual == digest => Ok(known),
                Ok(actual) => Err(StoreError::DigestMismatch { digest, actual }),
                Err(e) => Err(StoreError::io("reading", &path)(e)),
            }
        } else {
            hash_file(&self.entry.file, digest, self.entry.size, &path)
        };
        let meta = match checked {
            Ok(meta) => meta,
            Err(e) => {
                warn!(%digest, error = %e, "blob failed its digest check; discarding it");
                self.store.discarded(&digest);
                self.entry.delete_files(&root)?;
                return Err(e);
            }
        };
        let json = serde_json::to_vec(&meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        write_atomic(&meta_path(&root, &digest), &json)?;
        let dest = complete_path(&root, &digest);
        fs::rename(dir.join("data"), &dest).map_err(StoreError::io("renaming", &dest))?;
        sync_parent(&dest)?;
        fs::remove_dir_all(&dir).map_err(StoreError::io("removing", &dir))?;
        {
            let mut st = self.entry.lock();
            st.have.set(last);
            st.status = BlobState::Complete;
            st.journal = None;
            st.meta = meta;
        }
        self.store.completed(digest);
        self.entry.changed.send_modify(|g| *g += 1);
        debug!(%digest, "blob complete");
        Ok(())
    }

    /// Reads bytes that are present. Errors with `Missing` if any piece of the range is not.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let missing = || StoreError::Missing {
            digest: self.entry.digest,
            start: offset,
            end,
        };
        {
            let st = self.entry.lock();
            if end > self.entry.size {
                return Err(missing());
            }
            if st.status == BlobState::Discarded {
                return Err(StoreError::Discarded {
                    digest: self.entry.digest,
                });
            }
            if !st.meta.pieces_for(offset..end).all(|i| st.have.get(i)) {
                return Err(missing());
            }
        }
        self.entry
            .file
            .read_exact_at(buf, offset)
            .map_err(StoreError::io("reading", Path::new("<blob data>")))
    }

    /// Reads one whole piece (for serving it to a peer).
    pub fn read_piece(&self, index: u32) -> Result<Vec<u8>> {
        let range = {
            let st = self.entry.lock();
            if index >= st.meta.piece_count() {
                return Err(StoreError::Missing {
                    digest: self.entry.digest,
                    start: u64::MAX,
                    end: u64::MAX,
                });
            }
            st.meta.piece_range(index)
        };
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_at(range.start, &mut buf)?;
        Ok(buf)
    }

    /// Whether every byte of `range` is present, so reading it cannot wait.
    pub fn has_range(&self, range: Range<u64>) -> bool {
        let st = self.entry.lock();
        st.status != BlobState::Discarded && st.meta.pieces_for(range).all(|i| st.have.get(i))
    }

    /// Waits until every byte of `range` is present (or the blob is discarded).
    pub async fn wait_range(&self, range: Range<u64>) -> Result<()> {
        let mut rx = self.subscribe();
        loop {
            {
                let st = self.entry.lock();
                if st.status == BlobState::Discarded {
                    return Err(StoreError::Discarded {
                        digest: self.entry.digest,
                    });
                }
                if st.meta.pieces_for(range.clone()).all(|i| st.have.get(i)) {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Discarded {
                    digest: self.entry.digest,
                });
            }
        }
    }
}
