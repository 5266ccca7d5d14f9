//! Remote snapshots: layers that are mounted, not unpacked.
//!
//! containerd's unpacker calls `Prepare(key, parent)` with the label
//! `containerd.io/snapshot.ref = <chain id>` and every `containerd.io/snapshot/*` annotation of
//! the layer's descriptor (the CRI adds `cri.image-ref`, `cri.layer-digest`; an eStargz layer
//! carries `stargz/toc.digest`). If the snapshotter answers `ALREADY_EXISTS`, containerd takes the
//! layer as unpacked and never downloads it, exactly as stargz-snapshotter works.
//!
//! [`RemoteSnapshotter`] wraps the [`OverlaySnapshotter`]: when the labels name a layer that
//! [`LazyLayers`] can present (an eStargz blob whose TOC was fetched and verified), it commits the
//! snapshot under the ref's name, mounts the layer on that snapshot's `fs/` directory and answers
//! `ALREADY_EXISTS`; anything else, including a layer refused as malformed, takes the normal
//! unpack path. The committed snapshot keeps the labels [`LazyLayers::persist`] returns, which
//! is all [`RemoteSnapshotter::restore`] needs to mount it again after a restart.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::{Error, Info, Kind, Labels, Mount, OverlaySnapshotter, Snapshotter, Usage};

/// containerd's label naming the committed snapshot a `Prepare` is unpacking into.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// A boxed error from the lazy-layer side; the snapshotter only logs it or reports it.
pub type LazyError = Box<dyn StdError + Send + Sync>;

/// What remote snapshots need from the node: opening a lazy layer, mounting it, and letting go.
pub trait LazyLayers: Send + Sync + 'static {
    /// A layer whose TOC is fetched and verified, ready to mount.
    type Layer: Send + 'static;

    /// Opens the lazy layer `labels` describe; `Ok(None)` when they describe none (the layer is
    /// unpacked normally), an error when the layer is refused (also unpacked normally).
    fn open(
        &self,
        labels: &Labels,
    ) -> impl Future<Output = Result<Option<Self::Layer>, LazyError>> + Send;

    /// Labels for the committed snapshot that mark it lazy and let [`LazyLayers::reopen`] find
    /// the layer again.
    fn persist(&self, layer: &Self::Layer) -> Labels;

    /// Whether a snapshot with these labels is lazily mounted.
    fn is_lazy(&self, labels: &Labels) -> bool;

    /// Opens the layer of a lazy snapshot again from its persisted labels (after a restart).
    fn reopen(
        &self,
        labels: &Labels,
    ) -> impl Future<Output = Result<Self::Layer, LazyError>> + Send;

    /// Mounts `layer` on `dir` as snapshot `name`.
    fn mount(
        &self,
        name: &str,
        layer: Self::Layer,
        dir: &Path,
    ) -> impl Future<Output = Result<(), LazyError>> + Send;

    /// Unmounts snapshot `name` from `dir` (also a dead mount left by a previous process).
    fn unmount(&self, name: &str, dir: &Path);
}

/// The overlayfs snapshotter plus lazily mounted layers. Cheap to clone.
#[derive(Debug)]
pub struct RemoteSnapshotter<L> {
    inner: OverlaySnapshotter,
    layers: Arc<L>,
}

impl<L> Clone for RemoteSnapshotter<L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layers: Arc::clone(&self.layers),
        }
    }
}

/// What [`RemoteSnapshotter::restore`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub mounted: usize,
    /// Snapshots that could not be mounted, with why. They stay committed but empty until the
    /// next restart, so each one is logged as an error.
    pub failed: HashMap<String, String>,
}

impl<L: LazyLayers> RemoteSnapshotter<L> {
    pub fn new(inner: OverlaySnapshotter, layers: Arc<L>) -> Self {
        Self { inner, layers }
    }

    /// Mounts every committed lazy snapshot again. Call before serving containerd, so no
    /// container ever sees an empty lower layer.
    pub async fn restore(&self) -> Result<Restored, Error> {
        let mut restored = Restored::default();
        for info in self.inner.list(vec!["kind==committed".to_owned()]).await? {
            if !self.layers.is_lazy(&info.labels) {
                continue;
            }
            let dir = self.inner.fs_dir(info.name.clone()).await?;
            self.layers.unmount(&info.name, &dir);
            let mounted = match self.layers.reopen(&info.labels).await {
                Ok(layer) => self.layers.mount(&info.name, layer, &dir).await,
                Err(e) => Err(e),
            };
            match mounted {
                Ok(()) => restored.mounted += 1,
                Err(e) => {
                    error!(snapshot = %info.name, error = %e, "remounting a lazy layer");
                    restored.failed.insert(info.name, e.to_string());
                }
            }
        }
        Ok(restored)
    }

    /// Commits the active snapshot `key` as `target`, then mounts `layer` on it. A mount that
    /// fails takes the commit back, so no empty layer is ever left committed.
    async fn commit_lazy(
        &self,
        target: String,
        key: String,
        mut labels: Labels,
        layer: L::Layer,
    ) -> Result<(), Error> {
        labels.extend(self.layers.persist(&layer));
        self.inner.commit(target.clone(), key, labels).await?;
        let dir = self.inner.fs_dir(target.clone()).await?;
        if let Err(e) = self.layers.mount(&target, layer, &dir).await {
            if let Err(rm) = self.inner.remove(target.clone()).await {
                warn!(snapshot = %target, error = %rm, "removing a lazy snapshot that failed to mount");
            }
            return Err(Error::Lazy {
                name: target,
                reason: e.to_string(),
            });
        }
        info!(snapshot = %target, dir = %dir.display(), "lazy layer mounted");
        Ok(())
    }
}

impl<L: LazyLayers> Snapshotter for RemoteSnapshotter<L> {
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> Result<Vec<Mount>, Error> {
        let Some(target) = labels.get(SNAPSHOT_REF).cloned() else {
            return self.inner.prepare(key, parent, labels).await;
        };
        // Another pull of the same image got here first.
        if self.inner.stat(target.clone()).await.is_ok() {
            return Err(Error::AlreadyExists(target));
        }
        let layer = match self.layers.open(&labels).await {
            Ok(Some(layer)) => layer,
            Ok(None) => return self.inner.prepare(key, parent, labels).await,
            Err(e) => {
                warn!(snapshot = %target, error = %e, "lazy layer refused; unpacking it normally");
                return self.inner.prepare(key, parent, labels).await;
            }
        };
        let commit_labels = labels.clone();
        self.inner
            .prepare_with(key, parent, labels, |prepared| async move {
                self.commit_lazy(target.clone(), prepared.key, commit_labels, layer)
                    .await?;
                Err(Error::AlreadyExists(target))
            })
            .await
    }

    async fn view(&self, key: String, parent: String, labels: Labels) -> Result<Vec<Mount>, Error> {
        self.inner.view(key, parent, labels).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.inner.mounts(key).await
    }

    async fn commit(&self, name: String, key: String, labels: Labels) -> Result<(), Error> {
        self.inner.commit(name, key, labels).await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        let info = self.inner.stat(key.clone()).await?;
        if info.kind != Kind::Committed || !self.layers.is_lazy(&info.labels) {
            return self.inner.remove(key).await;
        }
        let layers = Arc::clone(&self.layers);
        let name = key.clone();
        self.inner
            .remove_with(key, move |dir| layers.unmount(&name, dir))
            .await
    }

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.inner.stat(key).await
    }

    async fn update(
        &self,
        name: String,
        labels: Labels,
        paths: Vec<String>,
    ) -> Result<Info, Error> {
        self.inner.update(name, labels, paths).await
    }

    async fn list(&self, filters: Vec<String>) -> Result<Vec<Info>, Error> {
        self.inner.list(filters).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        self.inner.usage(key).await
    }

    async fn cleanup(&self) -> Result<(), Error> {
        self.inner.cleanup().await
    }
}
