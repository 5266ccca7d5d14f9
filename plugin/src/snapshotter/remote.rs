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

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

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

    /// The labels of a lazy snapshot that must survive an `Update` (what
    /// [`LazyLayers::persist`] added).
    fn kept(&self, labels: &Labels) -> Labels;

    /// False when `existing` (a lazy snapshot's labels) names another layer than the
    /// `Prepare` labels `incoming` do: the same chain id must not stand for other bytes.
    fn same_layer(&self, incoming: &Labels, existing: &Labels) -> bool;

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

    /// Drops what is kept on disk for layers that none of the lazy snapshots `lazy` (their
    /// labels) uses any more; called once, after [`RemoteSnapshotter::restore`].
    fn retain(&self, lazy: &[&Labels]) {
        let _ = lazy;
    }
}

/// The overlayfs snapshotter plus lazily mounted layers. Cheap to clone.
#[derive(Debug)]
pub struct RemoteSnapshotter<L> {
    inner: OverlaySnapshotter,
    layers: Arc<L>,
    /// Lazy snapshots that could not be mounted again after a restart: their directories are
    /// empty, so nothing on top of them may be mounted until they are.
    unmounted: Arc<Mutex<HashSet<String>>>,
    /// One lazy `Prepare` per target at a time, so a second pull of the same layer never sees
    /// a snapshot committed but not yet mounted.
    targets: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl<L> Clone for RemoteSnapshotter<L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layers: Arc::clone(&self.layers),
            unmounted: Arc::clone(&self.unmounted),
            targets: Arc::clone(&self.targets),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`RemoteSnapshotter::restore`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub mounted: usize,
    /// Snapshots that could not be mounted, with why. They stay committed; every `Prepare`,
    /// `View` or `Mounts` that would stack on one tries to mount it again and fails with
    /// `Unavailable` while it cannot, so no container ever sees its empty directory.
    pub failed: HashMap<String, String>,
}

impl<L: LazyLayers> RemoteSnapshotter<L> {
    pub fn new(inner: OverlaySnapshotter, layers: Arc<L>) -> Self {
        Self {
            inner,
            layers,
            unmounted: Arc::default(),
            targets: Arc::default(),
        }
    }

    /// Mounts lazy snapshot `name` again, from its labels.
    async fn remount(&self, name: &str) -> Result<(), Error> {
        let info = self.inner.stat(name.to_owned()).await?;
        let dir = self.inner.fs_dir(name.to_owned()).await?;
        self.layers.unmount(name, &dir);
        let mounted = match self.layers.reopen(&info.labels).await {
            Ok(layer) => self.layers.mount(name, layer, &dir).await,
            Err(e) => Err(e),
        };
        mounted.map_err(|e| Error::Lazy {
            name: name.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Makes sure every lazy snapshot in the chain from `name` down is mounted, trying again
    /// those a restart could not mount.
    async fn ensure_mounted(&self, mut name: String) -> Result<(), Error> {
        if lock(&self.unmounted).is_empty() {
            return Ok(());
        }
        while !name.is_empty() {
            if lock(&self.unmounted).contains(&name) {
                self.remount(&name).await?;
                lock(&self.unmounted).remove(&name);
                info!(snapshot = %name, "lazy layer mounted again");
            }
            name = self.inner.stat(name).await?.parent;
        }
        Ok(())
    }

    /// Serializes lazy `Prepare`s of one target.
    async fn lock_target(&self, target: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut targets = lock(&self.targets);
            // Forget targets nobody holds any more.
            targets.retain(|_, m| Arc::strong_count(m) > 1);
            Arc::clone(targets.entry(target.to_owned()).or_default())
        };
        mutex.lock_owned().await
    }

    /// Mounts every committed lazy snapshot again. Call before serving containerd, so no
    /// container ever sees an empty lower layer.
    pub async fn restore(&self) -> Result<Restored, Error> {
        let mut restored = Restored::default();
        let committed = self.inner.list(vec!["kind==committed".to_owned()]).await?;
        for info in &committed {
            if !self.layers.is_lazy(&info.labels) {
                continue;
            }
            match self.remount(&info.name).await {
                Ok(()) => restored.mounted += 1,
                Err(e) => {
                    error!(snapshot = %info.name, error = %e, "remounting a lazy layer; containers on it cannot start until it mounts");
                    lock(&self.unmounted).insert(info.name.clone());
                    restored.failed.insert(info.name.clone(), e.to_string());
                }
            }
        }
        let lazy: Vec<&Labels> = committed
            .iter()
            .map(|info| &info.labels)
            .filter(|labels| self.layers.is_lazy(labels))
            .collect();
        self.layers.retain(&lazy);
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
        self.ensure_mounted(parent.clone()).await?;
        let Some(target) = labels.get(SNAPSHOT_REF).cloned() else {
            return self.inner.prepare(key, parent, labels).await;
        };
        let _target = self.lock_target(&target).await;
        // Another pull of the same image got here first.
        if let Ok(existing) = self.inner.stat(target.clone()).await {
            if !self.layers.same_layer(&labels, &existing.labels) {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {target:?} holds another layer than this Prepare names"
                )));
            }
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
        let (retry_key, retry_parent, retry_labels) = (key.clone(), parent.clone(), labels.clone());
        let lazy = self
            .inner
            .prepare_with(key, parent, labels, |prepared| async move {
                self.commit_lazy(target.clone(), prepared.key, commit_labels, layer)
                    .await?;
                Err(Error::AlreadyExists(target))
            })
            .await;
        match lazy {
            // The layer checked out but could not be mounted (no FUSE here, say): the commit
            // was taken back, so unpack it normally.
            Err(Error::Lazy { name, reason }) => {
                warn!(snapshot = %name, %reason, "lazy layer not mounted; unpacking it normally");
                self.inner
                    .prepare(retry_key, retry_parent, retry_labels)
                    .await
            }
            other => other,
        }
    }

    async fn view(&self, key: String, parent: String, labels: Labels) -> Result<Vec<Mount>, Error> {
        self.ensure_mounted(parent.clone()).await?;
        self.inner.view(key, parent, labels).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        if !lock(&self.unmounted).is_empty() {
            let parent = self.inner.stat(key.clone()).await?.parent;
            self.ensure_mounted(parent).await?;
        }
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
        // containerd passes on only the labels it lets snapshotters see: a replace of them all
        // must not drop what marks a snapshot lazy.
        let kept = self
            .layers
            .kept(&self.inner.stat(name.clone()).await?.labels);
        let info = self.inner.update(name.clone(), labels, paths).await?;
        let lost: Labels = kept
            .into_iter()
            .filter(|(k, v)| info.labels.get(k) != Some(v))
            .collect();
        if lost.is_empty() {
            return Ok(info);
        }
        let paths = lost.keys().map(|k| format!("labels.{k}")).collect();
        self.inner.update(name, lost, paths).await
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

#[cfg(test)]
mod tests {
    //! The remote snapshotter's own decisions, over a stand-in for the node's lazy layers that
    //! "mounts" a layer by writing a file into the snapshot's directory (the real FUSE path is
    //! tested end to end in `integration/tests/lazy.rs`).

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Layers {
        fail_mount: AtomicBool,
        fail_reopen: AtomicBool,
    }

    const LAYER: &str = "test/layer";

    impl LazyLayers for Layers {
        type Layer = String;

        async fn open(&self, labels: &Labels) -> Result<Option<String>, LazyError> {
            Ok(labels.get("test/lazy").cloned())
        }

        fn persist(&self, layer: &String) -> Labels {
            Labels::from([(LAYER.to_owned(), layer.clone())])
        }

        fn is_lazy(&self, labels: &Labels) -> bool {
            labels.contains_key(LAYER)
        }

        fn kept(&self, labels: &Labels) -> Labels {
            labels
                .iter()
                .filter(|(k, _)| *k == LAYER)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }

        fn same_layer(&self, incoming: &Labels, existing: &Labels) -> bool {
            match (incoming.get("test/lazy"), existing.get(LAYER)) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }

        async fn reopen(&self, labels: &Labels) -> Result<String, LazyError> {
            if self.fail_reopen.load(Ordering::Relaxed) {
                return Err("the registry is down".into());
            }
            Ok(labels[LAYER].clone())
        }

        async fn mount(&self, _name: &str, layer: String, dir: &Path) -> Result<(), LazyError> {
            if self.fail_mount.load(Ordering::Relaxed) {
                return Err("no /dev/fuse".into());
            }
            std::fs::write(dir.join("content"), layer)?;
            Ok(())
        }

        fn unmount(&self, _name: &str, dir: &Path) {
            let _ = std::fs::remove_file(dir.join("content"));
        }
    }

    fn lazy_labels(target: &str, layer: &str) -> Labels {
        Labels::from([
            (SNAPSHOT_REF.to_owned(), target.to_owned()),
            ("test/lazy".to_owned(), layer.to_owned()),
        ])
    }

    fn open(dir: &Path) -> anyhow::Result<(RemoteSnapshotter<Layers>, Arc<Layers>)> {
        let layers = Arc::new(Layers::default());
        let snapshotter =
            RemoteSnapshotter::new(OverlaySnapshotter::open(dir)?, Arc::clone(&layers));
        Ok((snapshotter, layers))
    }

    #[tokio::test]
    async fn a_lazy_layer_is_committed_mounted_and_keeps_its_labels() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (s, _) = open(dir.path())?;
        let err = s
            .prepare("extract-1".into(), String::new(), lazy_labels("l1", "a"))
            .await;
        assert!(
            matches!(err, Err(Error::AlreadyExists(ref t)) if t == "l1"),
            "{err:?}"
        );
        let fs = s.inner.fs_dir("l1".into()).await?;
        assert_eq!(std::fs::read_to_string(fs.join("content"))?, "a");
        // containerd replaces the labels it lets snapshotters see: ours stay.
        let info = s
            .update(
                "l1".into(),
                Labels::from([("x".into(), "y".into())]),
                vec![],
            )
            .await?;
        assert_eq!(info.labels.get(LAYER).map(String::as_str), Some("a"));
        assert_eq!(info.labels.get("x").map(String::as_str), Some("y"));
        // The same chain id for other bytes is refused, the same layer is already there.
        let other = s
            .prepare("extract-2".into(), String::new(), lazy_labels("l1", "b"))
            .await;
        assert!(matches!(other, Err(Error::InvalidArgument(_))), "{other:?}");
        let same = s
            .prepare("extract-3".into(), String::new(), lazy_labels("l1", "a"))
            .await;
        assert!(matches!(same, Err(Error::AlreadyExists(_))), "{same:?}");
        Ok(())
    }

    #[tokio::test]
    async fn a_layer_that_cannot_be_mounted_is_unpacked_normally() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (s, layers) = open(dir.path())?;
        layers.fail_mount.store(true, Ordering::Relaxed);
        let mounts = s
            .prepare("extract-1".into(), String::new(), lazy_labels("l1", "a"))
            .await?;
        assert_eq!(mounts.len(), 1, "an empty active snapshot to unpack into");
        assert_eq!(s.stat("extract-1".into()).await?.kind, Kind::Active);
        assert!(matches!(s.stat("l1".into()).await, Err(Error::NotFound(_))));
        Ok(())
    }

    #[tokio::test]
    async fn nothing_stacks_on_a_layer_a_restart_could_not_mount() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (s, _) = open(dir.path())?;
        let _ = s
            .prepare("extract-1".into(), String::new(), lazy_labels("l1", "a"))
            .await;
        drop(s);
        // The node restarts while the layer's source is unreachable.
        let (s, layers) = open(dir.path())?;
        layers.fail_reopen.store(true, Ordering::Relaxed);
        let restored = s.restore().await?;
        assert_eq!(restored.mounted, 0);
        assert!(restored.failed.contains_key("l1"), "{restored:?}");
        let child = s.prepare("c1".into(), "l1".into(), Labels::new()).await;
        assert_eq!(
            child.err().map(|e| e.code()),
            Some(tonic::Code::Unavailable),
            "a container on an empty lower layer must not start"
        );
        // The source is back: the next Prepare mounts the layer first.
        layers.fail_reopen.store(false, Ordering::Relaxed);
        s.prepare("c1".into(), "l1".into(), Labels::new()).await?;
        let fs = s.inner.fs_dir("l1".into()).await?;
        assert_eq!(std::fs::read_to_string(fs.join("content"))?, "a");
        Ok(())
    }
}
