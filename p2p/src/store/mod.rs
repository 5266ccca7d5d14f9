//! The blob store: content-addressed, piece-granular, on local disk.
//!
//! Every door of a node (swarm, registry mirror, containerd's content service, FUSE) reads and
//! writes this one store. Layout under the root:
//!
//! ```text
//! blobs/<hex>            complete blobs, checked against their digest
//! meta/<hex>.json        their metainfo (piece layout and hashes)
//! partial/<hex>/data     a blob being downloaded: a sparse file of its final size
//! partial/<hex>/meta.json  its layout
//! partial/<hex>/pieces   journal of pieces that are verified and durable (u32 LE each)
//! ```
//!
//! A piece's bytes are written into the data file as they arrive (`piece.rs`), checked against
//! its hash and `fdatasync`ed before its index is appended to the journal, and the journal is
//! synced before the piece becomes visible, so after a crash a partial blob resumes from exactly
//! the pieces it had. When the last piece lands the whole file is hashed against the
//! blob digest and renamed into `blobs/`; on mismatch it is discarded. Complete blobs nobody holds
//! a handle on are evicted least-recently-used first when the store is over its size cap.

mod blob;
mod piece;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tracing::{info, warn};

pub use blob::{Blob, BlobState};
pub use piece::{PieceWrite, PieceWriter};

use crate::digest::Digest;
use crate::metainfo::{Metainfo, MetainfoError};

/// Errors of the blob store. Each names the blob and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Metainfo(#[from] MetainfoError),
    #[error("piece {index} of {digest} does not match its hash")]
    PieceMismatch { digest: Digest, index: u32 },
    #[error("piece {index} of {digest} has {got} bytes, expected {expected}")]
    PieceLength {
        digest: Digest,
        index: u32,
        got: usize,
        expected: usize,
    },
    #[error("blob {digest} hashes to {actual}: discarded")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("blob {digest} has a different layout than requested (size {have} vs {want})")]
    LayoutConflict {
        digest: Digest,
        have: u64,
        want: u64,
    },
    #[error("bytes {start}..{end} of {digest} are not in the store")]
    Missing {
        digest: Digest,
        start: u64,
        end: u64,
    },
    #[error("blob {digest} was discarded while being read")]
    Discarded { digest: Digest },
    #[error("reading blob store state: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub(crate) fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> StoreError + 'a {
        move |source| StoreError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Store configuration: where it lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Size cap in bytes; complete blobs not in use are evicted to stay under it.
    pub capacity: u64,
}

/// Handle to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    capacity: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    blobs: HashMap<Digest, Arc<blob::Entry>>,
    /// Complete blobs in least-recently-used order (eviction candidates).
    lru: LruCache<Digest, ()>,
}

impl BlobStore {
    /// Opens (or creates) the store at `config.root`, loading complete blobs and resuming
    /// partial ones from their journals.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let root = config.root.clone();
        for dir in ["blobs", "meta", "partial", "tmp", "ingest"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(StoreError::io("creating", &path))?;
        }
        // Half-made partial directories from a crash; nothing refers to them.
        let tmp = root.join("tmp");
        fs::remove_dir_all(&tmp).map_err(StoreError::io("clearing", &tmp))?;
        fs::create_dir_all(&tmp).map_err(StoreError::io("creating", &tmp))?;

        let mut state = State {
            blobs: HashMap::new(),
            lru: LruCache::unbounded(),
        };
        for (digest, path) in list_hex_names(&root.join("blobs"))? {
            match blob::Entry::load_complete(&root, digest) {
                Ok(entry) => {
                    state.lru.put(digest, ());
                    state.blobs.insert(digest, Arc::new(entry));
                }
                Err(e) => {
                    warn!(%digest, error = %e, "dropping unreadable complete blob");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        for (digest, path) in list_hex_names(&root.join("partial"))? {
            match blob::Entry::load_partial(&root, digest) {
                Ok(entry) => {
                    info!(%digest, pieces = entry.have_count(), "resuming partial blob");
                    state.blobs.insert(digest, Arc::new(entry));
                }
                Err(e) => {
                    warn!(%digest, error = %e, "dropping unreadable partial blob");
                    let _ = fs::remove_dir_all(&path);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                capacity: config.capacity,
                state: Mutex::new(state),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blob if the store has it, complete or partial.
    pub fn get(&self, digest: &Digest) -> Option<Blob> {
        let mut state = self.lock();
        let entry = state.blobs.get(digest)?.clone();
        state.lru.get(digest);
        Some(Blob::new(entry, self.clone()))
    }

    /// The blob, creating an empty partial one with `meta`'s layout if the store lacks it.
    pub fn open_blob(&self, meta: &Metainfo) -> Result<Blob> {
        meta.validate()?;
        if let Some(blob) = self.get(&meta.digest) {
            if blob.size() != meta.size {
                return Err(StoreError::LayoutConflict {
                    digest: meta.digest,
                    have: blob.size(),
                    want: meta.size,
                });
            }
            blob.learn_hashes(meta)?;
            return Ok(blob);
        }
        self.make_room(meta.size);
        let entry = Arc::new(blob::Entry::create_partial(&self.inner.root, meta)?);
        let mut state = self.lock();
        // Another task may have created it meanwhile; keep the first.
        let entry = state.blobs.entry(meta.digest).or_insert(entry).clone();
        drop(state);
        let blob = Blob::new(entry, self.clone());
        blob.learn_hashes(meta)?;
        Ok(blob)
    }

    /// Moves the finished file at `path` (which must be on the store's filesystem, e.g. under
    /// [`BlobStore::ingest_dir`]) into the store as a complete blob, checking it against
    /// `expected` if given. If the store already has the blob complete, the file is removed and
    /// the existing blob returned: content is stored once.
    pub fn adopt(&self, path: &Path, expected: Option<Digest>) -> Result<Blob> {
        if let Some(blob) = expected
            .and_then(|d| self.get(&d))
            .filter(Blob::is_complete)
        {
            fs::remove_file(path).map_err(StoreError::io("removing", path))?;
            return Ok(blob);
        }
        let size = fs::metadata(path)
            .map_err(StoreError::io("reading", path))?
            .len();
        self.make_room(size);
        let entry = blob::Entry::adopt(&self.inner.root, path, expected)?;
        let digest = entry.digest();
        let mut state = self.lock();
        if let Some(old) = state.blobs.get(&digest).filter(|e| !e.is_complete()) {
            // A partial download of the same blob is now pointless: the bytes are here.
            let old = old.clone();
            drop(state);
            old.delete_partial(&self.inner.root);
            state = self.lock();
        }
        let entry = Arc::new(entry);
        state.blobs.insert(digest, entry.clone());
        state.lru.put(digest, ());
        drop(state);
        Ok(Blob::new(entry, self.clone()))
    }

    /// Where ingests (content being written by containerd) live: on the store's filesystem, so
    /// [`BlobStore::adopt`] is a rename.
    pub fn ingest_dir(&self) -> PathBuf {
        self.inner.root.join("ingest")
    }

    /// Digests of complete blobs.
    pub fn complete_blobs(&self) -> Vec<Digest> {
        let state = self.lock();
        state
            .blobs
            .iter()
            .filter(|(_, e)| e.is_complete())
            .map(|(d, _)| *d)
            .collect()
    }

    /// Every blob the store holds, complete or partial, sorted by digest: what a node reports
    /// in `shoal status`. Unlike [`BlobStore::get`] this does not count as a use for eviction
    /// order; the handles hold eviction off only while they live, so drop them soon.
    pub fn list(&self) -> Vec<Blob> {
        let mut entries: Vec<_> = self.lock().blobs.values().cloned().collect();
        entries.sort_by_key(|e| e.digest());
        entries
            .into_iter()
            .map(|entry| Blob::new(entry, self.clone()))
            .collect()
    }

    /// Bytes on disk: complete blobs plus the full size of partial ones (their files are sparse
    /// but will fill up).
    pub fn used_bytes(&self) -> u64 {
        self.lock().blobs.values().map(|e| e.size()).sum()
    }

    /// Removes a blob (complete or partial) unless someone is using it. Returns whether it went.
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let mut state = self.lock();
        let Some(entry) = state.blobs.get(digest) else {
            return Ok(false);
        };
        if Arc::strong_count(entry) > 1 {
            return Ok(false);
        }
        let entry = state.blobs.remove(digest).expect("checked above");
        state.lru.pop(digest);
        drop(state);
        entry.delete_files(&self.inner.root)?;
        Ok(true)
    }

    /// Evicts unused complete blobs, oldest first, until `incoming` more bytes fit.
    fn make_room(&self, incoming: u64) {
        let mut state = self.lock();
        let mut used: u64 = state.blobs.values().map(|e| e.size()).sum();
        let mut skipped = Vec::new();
        while used + incoming > self.inner.capacity {
            let Some((digest, ())) = state.lru.pop_lru() else {
                break;
            };
            let entry = &state.blobs[&digest];
            if Arc::strong_count(entry) > 1 {
                skipped.push(digest);
                continue;
            }
            let entry = state.blobs.remove(&digest).expect("listed in lru");
            used -= entry.size();
            info!(%digest, size = entry.size(), "evicting blob to stay under the store cap");
            if let Err(e) = entry.delete_files(&self.inner.root) {
                warn!(%digest, error = %e, "evicting blob");
            }
        }
        for digest in skipped.into_iter().rev() {
            state.lru.put(digest, ());
            state.lru.demote(&digest);
        }
        if used + incoming > self.inner.capacity {
            warn!(
                used,
                incoming,
                capacity = self.inner.capacity,
                "blob store over its cap: every blob is in use"
            );
        }
    }

    /// Called by a blob when it becomes complete.
    fn completed(&self, digest: Digest) {
        self.lock().lru.put(digest, ());
        // Blobs that were in use when this one was started may be free by now.
        self.make_room(0);
    }

    /// Called by a blob whose content failed its digest check: forget it so a fresh download
    /// starts from nothing.
    fn discarded(&self, digest: &Digest) {
        let mut state = self.lock();
        state.blobs.remove(digest);
        state.lru.pop(digest);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a pair of maps updated in single statements: a panic elsewhere cannot
        // leave it inconsistent, so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Entries of `dir` whose names are 64-hex digests; anything else is ignored (with a warning).
fn list_hex_names(dir: &Path) -> Result<Vec<(Digest, PathBuf)>> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).map_err(StoreError::io("listing", dir))? {
        let item = item.map_err(StoreError::io("listing", dir))?;
        let name = item.file_name();
        match name.to_str().map(Digest::from_hex) {
            Some(Ok(d)) => out.push((d, item.path())),
            _ => warn!(path = %item.path().display(), "ignoring stray file in blob store"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
