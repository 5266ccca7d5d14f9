//! [`ContentStore`]: containerd's content store on the node's blob store.
//!
//! Which blobs containerd sees:
//! - `Info` and `Read` answer for every complete blob in the blob store, however it got there
//!   (containerd wrote it, the swarm or the registry mirror fetched it), and, with
//!   `remote_content`, for every blob the swarm can find: its bytes arrive on demand.
//! - A blob containerd committed, or was told about by `Info`, is *owned*: it has a metadata
//!   record (labels, times), it is listed by `List`, and a handle on it is held so the blob
//!   store never evicts it. `Delete` ends that and removes the bytes unless another door (a
//!   seeding torrent, a FUSE mount) still uses them; then they stay, unowned, until the blob
//!   store evicts them.
//! - `List` shows owned blobs only, because containerd's garbage collector deletes whatever
//!   `List` shows that no image references: it must never see what the swarm and FUSE keep
//!   for themselves.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shoal_p2p::Digest;
use shoal_p2p::store::{Blob, BlobState, BlobStore, StoreError};
use shoal_p2p::swarm::Swarm;
use tracing::{debug, info, warn};

use super::ingest::{Ingest, Ingests};
use super::meta::{MetaStore, Record};
use super::{Error, Info, Labels, Reader, Status, Store, Writer, validate_labels, validate_ref};
use crate::filters::Filter;
use crate::labels::LabelUpdate;
use crate::meta;

/// How the content store uses the swarm.
#[derive(Clone, Debug)]
pub struct ContentConfig {
    /// `Info` answers for blobs the swarm can fetch, and `Read` fetches missing pieces.
    pub remote_content: bool,
    /// How long `Info` waits for the swarm to learn a blob's size before answering NotFound.
    pub info_timeout: Duration,
    /// How long `Read` waits for missing pieces of one chunk before failing.
    pub read_timeout: Duration,
}

impl Default for ContentConfig {
    fn default() -> Self {
        ContentConfig {
            remote_content: false,
            info_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// containerd's content store over a [`BlobStore`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct ContentStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: BlobStore,
    meta: MetaStore,
    ingests: Arc<Ingests>,
    swarm: Option<Arc<Swarm>>,
    config: ContentConfig,
    /// Handles on owned blobs: a handle keeps the blob store from evicting its blob.
    pinned: Mutex<HashMap<Digest, Blob>>,
    /// Serializes changes of ownership (record and pin together).
    owning: Mutex<()>,
}

impl ContentStore {
    /// Opens the content store on `store`, with its metadata in the redb file `meta_path`.
    /// Records of blobs the store no longer has are dropped; interrupted ingests are kept for
    /// containerd to resume. Call it before the swarm starts seeding, so blobs deleted but
    /// still held by a torrent when the node stopped are removed for good.
    pub fn open(
        store: BlobStore,
        meta_path: &Path,
        swarm: Option<Arc<Swarm>>,
        config: ContentConfig,
    ) -> Result<Self, Error> {
        let meta = MetaStore::open(meta_path)?;
        let ingests = Ingests::open(store.ingest_dir())?;
        let mut pinned = HashMap::new();
        let mut stale = Vec::new();
        for (digest, _) in meta.all()? {
            match store
                .get(&digest)
                .filter(|b| b.state() != BlobState::Discarded)
            {
                Some(blob) => drop(pinned.insert(digest, blob)),
                None => stale.push(digest),
            }
        }
        if !stale.is_empty() {
            warn!(
                count = stale.len(),
                "forgetting content the blob store no longer has"
            );
            meta.remove(&stale)?;
        }
        info!(blobs = pinned.len(), "content store open");
        Ok(ContentStore {
            inner: Arc::new(Inner {
                store,
                meta,
                ingests,
                swarm,
                config,
                pinned: Mutex::new(pinned),
                owning: Mutex::new(()),
            }),
        })
    }

    /// Runs blocking work (files, hashing, redb commits) off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }

    /// The blob from this node, or with `remote_content` from the swarm.
    async fn find(&self, digest: Digest) -> Option<Blob> {
        if let Some(blob) = self.inner.local(&digest) {
            return Some(blob);
        }
        let swarm = self
            .inner
            .swarm
            .as_ref()
            .filter(|_| self.inner.config.remote_content)?;
        let timeout = self.inner.config.info_timeout;
        match tokio::time::timeout(timeout, swarm.fetch(digest, None)).await {
            Ok(Ok(blob)) => Some(blob),
            Ok(Err(e)) => {
                debug!(%digest, error = %e, "swarm does not have the blob");
                None
            }
            Err(_) => {
                debug!(%digest, ?timeout, "swarm did not find the blob in time");
                None
            }
        }
    }
}

impl Inner {
    fn pinned(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Blob>> {
        // One map updated in single statements: a poisoned lock is still consistent.
        self.pinned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owning(&self) -> std::sync::MutexGuard<'_, ()> {
        self.owning.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An owned blob (complete, or arriving from the swarm), or any complete one.
    fn local(&self, digest: &Digest) -> Option<Blob> {
        let owned = self.pinned().get(digest).cloned();
        owned
            .filter(|b| b.state() != BlobState::Discarded)
            .or_else(|| self.store.get(digest).filter(Blob::is_complete))
    }

    /// Makes `blob` owned (keeping any record it has) and returns its record.
    fn own(&self, blob: Blob, labels: Labels) -> Result<Record, Error> {
        let digest = blob.digest();
        let live = |b: &Blob| b.state() != BlobState::Discarded;
        if self.pinned().get(&digest).is_some_and(live) {
            // Already owned: a read transaction is enough.
            if let Some(record) = self.meta.get(&digest)? {
                return Ok(record);
            }
        }
        let _owning = self.owning();
        let (record, _) = self.meta.get_or_insert(&digest, labels)?;
        self.pinned().insert(digest, blob);
        Ok(record)
    }
}

impl Store for ContentStore {
    type Reader = BlobReader;
    type Writer = StoreWriter;

    async fn info(&self, digest: Digest) -> Result<Info, Error> {
        let blob = self.find(digest).await.ok_or(Error::NotFound(digest))?;
        let size = blob.size();
        let record = self
            .blocking(move |inner| inner.own(blob, Labels::new()))
            .await?;
        Ok(record.info(digest, size))
    }

    async fn exists(&self, digest: Digest) -> Result<bool, Error> {
        let Some(blob) = self.inner.local(&digest) else {
            return Ok(false);
        };
        self.blocking(move |inner| inner.own(blob, Labels::new()))
            .await?;
        Ok(true)
    }

    async fn update(
        &self,
        digest: Digest,
        labels: Labels,
        paths: Vec<String>,
    ) -> Result<Info, Error> {
        let update = LabelUpdate::parse(&paths).map_err(|path| {
            Error::InvalidArgument(format!(
                "cannot update {path:?} field on content info {digest}"
            ))
        })?;
        let blob = self.inner.local(&digest).ok_or(Error::NotFound(digest))?;
        let size = blob.size();
        let record = self
            .blocking(move |inner| {
                let _owning = inner.owning();
                let record = inner.meta.modify(&digest, |record| {
                    let new = update.apply(std::mem::take(&mut record.labels), &labels);
                    record.labels = validate_labels(new)?;
                    record.updated = meta::now();
                    Ok(())
                })?;
                inner.pinned().insert(digest, blob);
                Ok(record)
            })
            .await?;
        Ok(record.info(digest, size))
    }

    async fn list(&self, filters: Vec<String>) -> Result<Vec<Info>, Error> {
        let filter = Filter::parse_all(&filters)?;
        self.blocking(move |inner| {
            let records = inner.meta.all()?;
            let pinned = inner.pinned();
            Ok(records
                .into_iter()
                .filter_map(|(digest, record)| {
                    let blob = pinned.get(&digest)?;
                    (blob.state() != BlobState::Discarded).then(|| record.info(digest, blob.size()))
                })
                .filter(|info| filter.matches(info))
                .collect())
        })
        .await
    }

    async fn delete(&self, digest: Digest) -> Result<(), Error> {
        self.blocking(move |inner| {
            let _owning = inner.owning();
            let owned = inner.meta.remove(&[digest])? > 0;
            let unpinned = inner.pinned().remove(&digest);
            let complete = unpinned.is_some_and(|b| b.is_complete())
                || inner.store.get(&digest).is_some_and(|b| b.is_complete());
            if !owned && !complete {
                return Err(Error::NotFound(digest));
            }
            if !inner.store.remove(&digest)? {
                debug!(%digest, "deleted blob is still in use elsewhere; its bytes stay for now");
            }
            Ok(())
        })
        .await
    }

    async fn reader(&self, digest: Digest) -> Result<BlobReader, Error> {
        let blob = self.find(digest).await.ok_or(Error::NotFound(digest))?;
        let swarm = self
            .inner
            .swarm
            .clone()
            .filter(|_| self.inner.config.remote_content);
        Ok(BlobReader {
            blob,
            swarm,
            timeout: self.inner.config.read_timeout,
        })
    }

    async fn status(&self, r#ref: String) -> Result<Status, Error> {
        validate_ref(&r#ref)?;
        self.blocking(move |inner| inner.ingests.status(&r#ref))
            .await
    }

    async fn list_statuses(&self, filters: Vec<String>) -> Result<Vec<Status>, Error> {
        let filter = Filter::parse_all(&filters)?;
        let mut all = self.blocking(|inner| inner.ingests.list()).await?;
        all.retain(|s| filter.matches(s));
        all.sort_by(|a, b| a.r#ref.cmp(&b.r#ref));
        Ok(all)
    }

    async fn abort(&self, r#ref: String) -> Result<(), Error> {
        validate_ref(&r#ref)?;
        self.blocking(move |inner| inner.ingests.abort(&r#ref))
            .await
    }

    async fn writer(
        &self,
        r#ref: String,
        total: u64,
        expected: Option<Digest>,
    ) -> Result<StoreWriter, Error> {
        validate_ref(&r#ref)?;
        let lock = self.inner.ingests.lock(&r#ref)?;
        if let Some(digest) = expected
            && self.exists(digest).await?
        {
            return Err(Error::AlreadyExists(digest));
        }
        let ingest = self
            .blocking(move |inner| inner.ingests.open_ingest(lock, total, expected))
            .await?;
        Ok(StoreWriter {
            store: self.clone(),
            status: ingest.status(),
            digest: ingest.digest(),
            ingest: Some(ingest),
        })
    }
}

/// Reads one blob, waiting for missing pieces from the swarm when there is one.
#[derive(Debug)]
pub struct BlobReader {
    blob: Blob,
    swarm: Option<Arc<Swarm>>,
    timeout: Duration,
}

/// Reads up to this size are done on the calling task: a `pread` of 256 KiB from the page cache
/// costs less than handing it to a blocking thread and back, and containerd's diff applier reads
/// layers 32 KiB at a time.
const INLINE_READ_MAX: usize = 256 << 10;

impl BlobReader {
    async fn read_now(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        if len <= INLINE_READ_MAX {
            let mut buf = vec![0u8; len];
            return self
                .blob
                .read_at(offset, &mut buf)
                .map(|()| Bytes::from(buf));
        }
        let blob = self.blob.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            blob.read_at(offset, &mut buf).map(|()| Bytes::from(buf))
        });
        read.await
            .unwrap_or_else(|e| Err(StoreError::Corrupt(format!("read task: {e}"))))
    }
}

impl Reader for BlobReader {
    fn size(&self) -> u64 {
        self.blob.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, Error> {
        let (digest, range) = (self.blob.digest(), offset..offset + len as u64);
        match self.read_now(offset, len).await {
            Err(StoreError::Missing { .. }) => {}
            other => return Ok(other?),
        }
        let Some(swarm) = &self.swarm else {
            return Err(Error::Missing {
                digest,
                start: range.start,
                end: range.end,
            });
        };
        let wait = async {
            // Makes sure a torrent is running for the blob (after a restart there may be none).
            swarm.fetch(digest, None).await?;
            swarm.want(&digest, range.clone());
            Ok::<_, Error>(self.blob.wait_range(range.clone()).await?)
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::NotArrived {
                    digest,
                    start: range.start,
                    end: range.end,
                    waited: self.timeout,
                });
            }
        }
        Ok(self.read_now(offset, len).await?)
    }
}

/// One locked ingest of a [`ContentStore`].
#[derive(Debug)]
pub struct StoreWriter {
    store: ContentStore,
    /// `None` only while a blocking task has it, or after that task panicked.
    ingest: Option<Ingest>,
    status: Status,
    digest: Digest,
}

impl StoreWriter {
    async fn with_ingest(
        &mut self,
        f: impl FnOnce(&mut Ingest) -> Result<(), Error> + Send + 'static,
    ) -> Result<(), Error> {
        let mut ingest = self.ingest.take().ok_or_else(|| {
            Error::InvalidArgument(format!("writer of {:?} failed earlier", self.status.r#ref))
        })?;
        let (ingest, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut ingest);
            (ingest, result)
        })
        .await?;
        self.status = ingest.status();
        self.digest = ingest.digest();
        self.ingest = Some(ingest);
        result
    }
}

impl Writer for StoreWriter {
    fn status(&self) -> Status {
        self.status.clone()
    }

    fn digest(&self) -> Digest {
        self.digest
    }

    async fn write(&mut self, data: Bytes) -> Result<(), Error> {
        self.with_ingest(move |ingest| ingest.write(&data)).await
    }

    async fn truncate(&mut self) -> Result<(), Error> {
        self.with_ingest(Ingest::truncate).await
    }

    async fn commit(
        mut self,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> Result<Digest, Error> {
        let labels = validate_labels(labels)?;
        let ingest = self.ingest.take().ok_or_else(|| {
            Error::InvalidArgument(format!("writer of {:?} failed earlier", self.status.r#ref))
        })?;
        let committed = self
            .store
            .blocking(move |inner| {
                let path = ingest.finish()?;
                let (actual_size, actual) = (ingest.offset(), ingest.digest());
                if size > 0 && size != actual_size {
                    return Err(Error::SizeMismatch {
                        actual: actual_size,
                        expected: size,
                    });
                }
                if let Some(expected) = expected.filter(|e| *e != actual) {
                    return Err(Error::DigestMismatch { actual, expected });
                }
                if let Some(blob) = inner.local(&actual).filter(Blob::is_complete) {
                    // containerd's local store: the ingest goes, the caller shares the blob.
                    ingest.remove()?;
                    inner.own(blob, Labels::new())?;
                    return Err(Error::AlreadyExists(actual));
                }
                let blob = inner.store.adopt(&path, Some(actual))?;
                {
                    let _owning = inner.owning();
                    inner.meta.modify(&actual, |record| {
                        if !labels.is_empty() {
                            record.labels = labels;
                            record.updated = meta::now();
                        }
                        Ok(())
                    })?;
                    inner.pinned().insert(actual, blob);
                }
                debug!(r#ref = ingest.r#ref(), %actual, size = actual_size, "committed");
                // The blob is in: what is left of the ingest is litter that `open` sweeps.
                if let Err(e) = ingest.remove() {
                    warn!(%actual, error = %e, "removing a committed ingest");
                }
                Ok(actual)
            })
            .await;
        // Whatever containerd has, the node seeds (also when it turned out to be here already).
        if let (Ok(digest) | Err(Error::AlreadyExists(digest)), Some(swarm)) =
            (&committed, &self.store.inner.swarm)
        {
            swarm.seed(*digest);
        }
        committed
    }
}
