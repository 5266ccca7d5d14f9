//! Lazy layers on a node: eStargz blobs mounted through FUSE, their bytes fetched piece by
//! piece through the swarm as containers read them.
//!
//! [`Lazy`] is the node's [`LazyLayers`]: it reads the labels containerd passes on `Prepare`
//! (the layer digest and image from the CRI or `shoal pull`, the TOC digest from the layer's
//! `containerd.io/snapshot/stargz/toc.digest` annotation), starts the blob's torrent, reads and
//! verifies its TOC, and mounts it with `shoal-fuse`. The verification chain: the manifest's
//! digest covers the TOC digest, the TOC digest covers every chunk digest, and every chunk is
//! checked as it is inflated; pieces are checked against the metainfo before that.
//!
//! Fetch policy: a read wants the pieces under its chunk ahead of everything else
//! ([`SwarmSource`]); at mount the prioritized files (up to `.prefetch.landmark`) are wanted next;
//! the torrent fetches the rest of the blob in the background, so the node becomes a full seeder.

mod metrics;
mod source;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use shoal_fuse::FsStats;
use shoal_fuse::estargz::{self, Layer, Limits};
use shoal_fuse::fs::{self as lazyfs, FsOptions, LayerMount};
use shoal_p2p::Digest;
use shoal_p2p::swarm::Swarm;
use shoal_p2p::upstream::BlobSource;
use tokio::runtime::Handle;
use tracing::{info, warn};

pub use self::source::SwarmSource;
use crate::config::FuseConfig;
use crate::reference::Reference;
use crate::snapshotter::{Labels, LazyError, LazyLayers};

/// The TOC digest, from the layer descriptor's annotation (containerd passes every
/// `containerd.io/snapshot/` annotation on as a label).
pub const TOC_DIGEST_LABEL: &str = estargz::TOC_DIGEST_ANNOTATION;
/// The layer's digest and its image, as the CRI labels them.
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The same, as stargz-snapshotter's `rpull` and BuildKit label them.
const STARGZ_LAYER_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
const STARGZ_IMAGE_REF: &str = "containerd.io/snapshot/remote/stargz.reference";

/// Labels Shoal keeps on a lazily mounted snapshot, to mount it again after a restart.
pub const LAZY_LAYER: &str = "shoal.dev/lazy.layer";
pub const LAZY_TOC: &str = "shoal.dev/lazy.toc";
pub const LAZY_SOURCE: &str = "shoal.dev/lazy.source";

/// The node's lazy layers: opening, mounting, unmounting.
#[derive(Debug)]
pub struct Lazy {
    swarm: Arc<Swarm>,
    cfg: FuseConfig,
    /// Per-layer directories of verified, uncompressed copies of files (see
    /// [`Lazy::copies_dir`]).
    copies_root: PathBuf,
    /// Mounts using (or being made with) each copies directory: one in use is never removed.
    copies_users: Mutex<HashMap<PathBuf, usize>>,
    /// Where copies were kept per snapshot before they were kept per layer; removed.
    legacy_passthrough: PathBuf,
    runtime: Handle,
    mounts: Mutex<HashMap<String, Mounted>>,
    /// The counters of layers unmounted since the node started.
    retired: Mutex<FsStats>,
}

/// A mounted layer and the blob it reads.
#[derive(Debug)]
struct Mounted {
    mount: LayerMount,
    layer: Digest,
    /// Its copies directory, shared with other mounts of the same layer (none when copies are
    /// off).
    copies: Option<PathBuf>,
    /// Ends the wait for the whole blob (before the passthrough copies) when unmounted, so an
    /// unmounted layer holds no blob in the store.
    _unmounted: tokio_util::sync::DropGuard,
}

/// One lazily mounted layer, as `shoal status` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// containerd's snapshot key.
    pub snapshot: String,
    /// The layer blob's digest.
    pub layer: Digest,
    /// Where the FUSE filesystem is mounted (an overlayfs lowerdir).
    pub dir: PathBuf,
}

/// A layer whose TOC is read and verified.
#[derive(Debug)]
pub struct OpenLayer {
    layer: Arc<Layer>,
    digest: Digest,
    source: Option<BlobSource>,
}

#[derive(Debug, thiserror::Error)]
enum LazyLabelError {
    #[error("label {label}: {value:?} is not a sha256 digest")]
    Digest { label: &'static str, value: String },
    #[error("label {label}: {source}")]
    Reference {
        label: &'static str,
        #[source]
        source: crate::reference::ReferenceError,
    },
    #[error("label {0} is missing")]
    Missing(&'static str),
}

impl Lazy {
    /// Must be called inside the tokio runtime that will serve the swarm.
    pub fn new(swarm: Arc<Swarm>, cfg: FuseConfig, root: &Path) -> Self {
        Self {
            swarm,
            cfg,
            copies_root: root.join("copies"),
            copies_users: Mutex::new(HashMap::new()),
            legacy_passthrough: root.join("passthrough"),
            runtime: Handle::current(),
            mounts: Mutex::new(HashMap::new()),
            retired: Mutex::new(FsStats::default()),
        }
    }

    /// Unmounts every layer (at shutdown).
    pub fn unmount_all(&self) {
        let mounts: Vec<_> = self.lock().drain().collect();
        for (_, mounted) in mounts {
            self.retire(mounted);
        }
    }

    /// Unmounts a layer, keeping its counters.
    fn retire(&self, mounted: Mounted) {
        let stats = mounted.mount.stats();
        drop(mounted);
        metrics::add(
            &mut self.retired.lock().unwrap_or_else(|p| p.into_inner()),
            stats,
        );
    }

    /// FUSE counters over every layer mounted since the start, and how many are mounted now.
    pub fn stats(&self) -> (FsStats, usize) {
        let mut total = *self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let mounts = self.lock();
        for mounted in mounts.values() {
            metrics::add(&mut total, mounted.mount.stats());
        }
        (total, mounts.len())
    }

    /// The layers mounted now, sorted by snapshot key (a read-only view for `shoal status`).
    pub fn mounts(&self) -> Vec<MountInfo> {
        let mut mounts: Vec<MountInfo> = self
            .lock()
            .iter()
            .map(|(name, m)| MountInfo {
                snapshot: name.clone(),
                layer: m.layer,
                dir: m.mount.mountpoint().to_owned(),
            })
            .collect();
        mounts.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
        mounts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mounted>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory of local copies of the layer with TOC digest `toc`: one per layer, so
    /// copies outlive a mount (a node restart) and are shared by every snapshot of the layer.
    /// Named by a hash, so no label can steer it outside `copies_root`.
    fn copies_dir(&self, toc: &str) -> PathBuf {
        let hash = Sha256::digest(toc.as_bytes());
        self.copies_root.join(hex::encode(&hash[..16]))
    }

    fn copies_users(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, usize>> {
        self.copies_users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A mount is about to use `dir`: until [`Lazy::release_copies`], nothing removes it.
    fn use_copies(&self, dir: &Path) {
        *self.copies_users().entry(dir.to_owned()).or_default() += 1;
    }

    /// A mount no longer uses `dir`; the last one removes it.
    fn release_copies(&self, dir: &Path) {
        let mut users = self.copies_users();
        if let Some(n) = users.get_mut(dir) {
            *n = n.saturating_sub(1);
            if *n > 0 {
                return;
            }
            users.remove(dir);
        }
        // Under the lock: a mount of the same layer starting now waits, then makes it again.
        remove_dir(dir);
    }

    async fn open_blob(
        &self,
        digest: Digest,
        source: Option<BlobSource>,
        toc: String,
    ) -> Result<OpenLayer, LazyError> {
        let blob = self.swarm.fetch(digest, source.clone()).await?;
        let chunks = SwarmSource {
            blob,
            swarm: Arc::clone(&self.swarm),
            upstream: source.clone(),
            runtime: self.runtime.clone(),
            timeout: Duration::from_millis(self.cfg.read_timeout_ms),
        };
        // Reading the footer and TOC blocks on the runtime: off its worker threads.
        let layer = tokio::task::spawn_blocking(move || {
            Layer::open(Arc::new(chunks), Some(&toc), &Limits::default())
        })
        .await??;
        Ok(OpenLayer {
            layer: Arc::new(layer),
            digest,
            source,
        })
    }
}

fn digest_label(labels: &Labels, names: &[&'static str]) -> Result<Option<Digest>, LazyError> {
    for &label in names {
        if let Some(value) = labels.get(label) {
            return value.parse().map(Some).map_err(|_| {
                LazyLabelError::Digest {
                    label,
                    value: value.chars().take(100).collect(),
                }
                .into()
            });
        }
    }
    Ok(None)
}

fn source_label(labels: &Labels, names: &[&'static str]) -> Result<Option<BlobSource>, LazyError> {
    for &label in names {
        if let Some(value) = labels.get(label) {
            let reference: Reference = value
                .parse()
                .map_err(|source| LazyLabelError::Reference { label, source })?;
            return Ok(Some(reference.source()));
        }
    }
    Ok(None)
}

impl LazyLayers for Lazy {
    type Layer = OpenLayer;

    async fn open(&self, labels: &Labels) -> Result<Option<OpenLayer>, LazyError> {
        if !self.cfg.enabled {
            return Ok(None);
        }
        let Some(toc) = labels.get(TOC_DIGEST_LABEL) else {
            return Ok(None);
        };
        let Some(digest) = digest_label(labels, &[CRI_LAYER_DIGEST, STARGZ_LAYER_DIGEST])? else {
            return Ok(None);
        };
        let source = source_label(labels, &[CRI_IMAGE_REF, STARGZ_IMAGE_REF])?;
        self.open_blob(digest, source, toc.clone()).await.map(Some)
    }

    fn persist(&self, layer: &OpenLayer) -> Labels {
        let mut labels = Labels::from([
            (LAZY_LAYER.to_owned(), layer.digest.to_string()),
            (LAZY_TOC.to_owned(), layer.layer.toc_digest().to_owned()),
        ]);
        if let Some(source) = &layer.source {
            labels.insert(LAZY_SOURCE.to_owned(), source.to_string());
        }
        labels
    }

    fn is_lazy(&self, labels: &Labels) -> bool {
        labels.contains_key(LAZY_LAYER)
    }

    fn kept(&self, labels: &Labels) -> Labels {
        labels
            .iter()
            .filter(|(k, _)| [LAZY_LAYER, LAZY_TOC, LAZY_SOURCE].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn same_layer(&self, incoming: &Labels, existing: &Labels) -> bool {
        let Some(layer) = existing.get(LAZY_LAYER) else {
            return true;
        };
        let named = [CRI_LAYER_DIGEST, STARGZ_LAYER_DIGEST]
            .iter()
            .find_map(|l| incoming.get(*l));
        let same_digest = named.is_none_or(|d| d == layer);
        let same_toc = match (incoming.get(TOC_DIGEST_LABEL), existing.get(LAZY_TOC)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        same_digest && same_toc
    }

    async fn reopen(&self, labels: &Labels) -> Result<OpenLayer, LazyError> {
        let digest =
            digest_label(labels, &[LAZY_LAYER])?.ok_or(LazyLabelError::Missing(LAZY_LAYER))?;
        let toc = labels
            .get(LAZY_TOC)
            .ok_or(LazyLabelError::Missing(LAZY_TOC))?;
        let source = source_label(labels, &[LAZY_SOURCE])?;
        self.open_blob(digest, source, toc.clone()).await
    }

    async fn mount(&self, name: &str, layer: OpenLayer, dir: &Path) -> Result<(), LazyError> {
        if self.lock().contains_key(name) {
            return Err(format!("snapshot {name:?} is mounted already").into());
        }
        let copies = if self.cfg.passthrough || self.cfg.materialize {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.copies_root)?;
            let copies = self.copies_dir(layer.layer.toc_digest());
            self.use_copies(&copies);
            Some(copies)
        } else {
            None
        };
        let opts = FsOptions {
            cache_bytes: self.cfg.cache_mib.saturating_mul(1 << 20),
            threads: self.cfg.threads,
            copies_dir: copies.clone(),
            passthrough: self.cfg.passthrough,
            ..FsOptions::default()
        };
        let fs_layer = Arc::clone(&layer.layer);
        let at = dir.to_owned();
        let mounted =
            match tokio::task::spawn_blocking(move || lazyfs::mount(fs_layer, &at, opts)).await {
                Ok(mounted) => mounted.map_err(LazyError::from),
                Err(e) => Err(e.into()),
            };
        let mount = match mounted {
            Ok(mount) => mount,
            Err(e) => {
                if let Some(copies) = &copies {
                    self.release_copies(copies);
                }
                return Err(e);
            }
        };
        if self.cfg.prefetch
            && let Some(range) = layer.layer.index().prefetch.clone()
        {
            info!(
                snapshot = name,
                bytes = range.end,
                "prefetching the prioritized files"
            );
            self.swarm.want(&layer.digest, range);
        }
        let materializer = mount.materializer().filter(|_| self.cfg.materialize);
        let unmounted = tokio_util::sync::CancellationToken::new();
        let gone = unmounted.clone();
        self.lock().insert(
            name.to_owned(),
            Mounted {
                mount,
                layer: layer.digest,
                copies,
                _unmounted: unmounted.drop_guard(),
            },
        );
        if let (Some(materializer), Some(blob)) =
            (materializer, self.swarm.store().get(&layer.digest))
        {
            // Once the whole blob is local, copy every file, so reads no longer inflate and
            // hash chunks (and, with passthrough, no longer go through FUSE at all). Dropping
            // the mount ends the copies.
            let snapshot = name.to_owned();
            tokio::spawn(async move {
                tokio::select! {
                    local = blob.wait_range(0..blob.size()) => {
                        if local.is_err() {
                            return;
                        }
                    }
                    () = gone.cancelled() => return,
                }
                let queued = tokio::task::spawn_blocking(move || materializer.run()).await;
                info!(
                    snapshot,
                    files = queued.unwrap_or(0),
                    "layer local: every file queued for its local copy"
                );
            });
        }
        Ok(())
    }

    fn unmount(&self, name: &str, dir: &Path) {
        let mount = self.lock().remove(name);
        let copies = mount.as_ref().and_then(|m| m.copies.clone());
        if let Some(mounted) = mount {
            self.retire(mounted);
        }
        if let Err(e) = lazyfs::unmount_stale(dir) {
            warn!(snapshot = name, dir = %dir.display(), error = %e, "unmounting a lazy layer");
        }
        if let Some(copies) = copies {
            self.release_copies(&copies);
        }
    }

    fn retain(&self, lazy: &[&Labels]) {
        let kept: HashSet<PathBuf> = lazy
            .iter()
            .filter_map(|labels| labels.get(LAZY_TOC))
            .map(|toc| self.copies_dir(toc))
            .collect();
        let dirs = match std::fs::read_dir(&self.copies_root) {
            Ok(dirs) => dirs.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                warn!(dir = %self.copies_root.display(), error = %e, "listing local copies");
                Vec::new()
            }
        };
        let users = self.copies_users();
        for dir in dirs
            .iter()
            .filter(|dir| !kept.contains(*dir) && !users.contains_key(*dir))
        {
            info!(dir = %dir.display(), "removing the local copies of a layer no snapshot uses");
            remove_dir(dir);
        }
        drop(users);
        if let Err(e) = std::fs::remove_dir_all(&self.legacy_passthrough)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(dir = %self.legacy_passthrough.display(), error = %e, "removing old passthrough copies");
        }
    }
}

/// Removes a layer's copies directory (gone already is fine).
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), error = %e, "removing a layer's local copies");
    }
}
