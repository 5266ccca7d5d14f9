//! [`OverlaySnapshotter`]: the overlayfs snapshotter, on disk exactly like containerd's
//! (`plugins/snapshots/overlay/overlay.go`):
//!
//! ```text
//! <root>/metadata.redb          snapshot records (see meta.rs)
//! <root>/snapshots/<id>/fs      the layer's files; the overlay upper dir of an active snapshot
//! <root>/snapshots/<id>/work    the overlay work dir (active snapshots only)
//! ```
//!
//! Ids are numbers from the metadata sequence, never keys, so no key can name a path.
//!
//! Crash safety: a snapshot directory is made as `snapshots/new-*` and renamed to its id inside
//! the metadata write transaction, before that transaction commits. A crash at any point leaves
//! either a complete snapshot with its record, or a directory no record refers to, which
//! [`Snapshotter::cleanup`] deletes. Removal is the other way round: the record goes first, then
//! the directory.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::meta::{MetaStore, Snapshot};
use super::{Error, Info, Kind, Labels, Mount, Snapshotter, Usage, validate_key, validate_labels};
use crate::filters::Filter;

/// The overlayfs snapshotter. Cheap to clone; clones share one metadata store.
#[derive(Clone, Debug)]
pub struct OverlaySnapshotter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    snapshots: PathBuf,
    meta: MetaStore,
    /// Appended to every overlay mount, as containerd does (`index=off` where supported).
    overlay_options: Vec<String>,
}

impl OverlaySnapshotter {
    /// Opens (or creates) a snapshotter in `root`, which only it may use.
    pub fn open(root: &Path) -> Result<Self, Error> {
        let mkdir = |path: &Path| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(path)
                .map_err(Error::io("creating", path))
        };
        mkdir(root)?;
        let snapshots = root.join("snapshots");
        mkdir(&snapshots)?;
        let meta = MetaStore::open(&root.join("metadata.redb"))?;
        let mut overlay_options = Vec::new();
        if Path::new("/sys/module/overlay/parameters/index").exists() {
            overlay_options.push("index=off".to_owned());
        }
        Ok(OverlaySnapshotter {
            inner: Arc::new(Inner {
                snapshots,
                meta,
                overlay_options,
            }),
        })
    }

    /// `Prepare`, with `hook` run on the new, still empty active snapshot before its mounts are
    /// returned. This is where remote snapshots (`containerd.io/snapshot.ref`) will plug in: the
    /// hook can fill `fs/`, commit the snapshot under the ref's name and answer
    /// [`Error::AlreadyExists`], which containerd takes as "the layer is already there".
    pub async fn prepare_with<F, Fut>(
        &self,
        key: String,
        parent: String,
        labels: Labels,
        hook: F,
    ) -> Result<Vec<Mount>, Error>
    where
        F: FnOnce(PreparedSnapshot) -> Fut + Send,
        Fut: Future<Output = Result<(), Error>> + Send,
    {
        let labels_for_hook = labels.clone();
        let key_for_hook = key.clone();
        let (snapshot, mounts) = self
            .blocking(move |i| i.create(Kind::Active, &key, &parent, labels))
            .await?;
        hook(PreparedSnapshot {
            key: key_for_hook,
            fs: self.inner.fs_dir(snapshot.id),
            labels: labels_for_hook,
        })
        .await?;
        Ok(mounts)
    }

    /// `Remove`, with `before_delete` called on the snapshot's `fs/` directory once its record
    /// is gone and before the directory is deleted: where a remote snapshot is unmounted.
    pub async fn remove_with<F>(&self, key: String, before_delete: F) -> Result<(), Error>
    where
        F: FnOnce(&Path) + Send + 'static,
    {
        self.blocking(move |i| i.remove(&key, before_delete)).await
    }

    /// The `fs/` directory of snapshot `key` (any kind), where a remote snapshot is mounted.
    pub async fn fs_dir(&self, key: String) -> Result<PathBuf, Error> {
        self.blocking(move |i| Ok(i.fs_dir(i.meta.read()?.get(&key)?.id)))
            .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner)).await?
    }
}

/// What a [`OverlaySnapshotter::prepare_with`] hook learns about the snapshot just made.
#[derive(Clone, Debug)]
pub struct PreparedSnapshot {
    pub key: String,
    /// Its `fs/` directory.
    pub fs: PathBuf,
    pub labels: Labels,
}

impl Inner {
    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: Labels,
    ) -> Result<(Snapshot, Vec<Mount>), Error> {
        validate_key("key", key)?;
        if !parent.is_empty() {
            validate_key("parent", parent)?;
        }
        let labels = validate_labels(labels)?;

        // The write transaction is held from here on, so cleanup (which also takes it) never
        // sees the temporary directory half-made.
        let txn = self.meta.write()?;
        let temp = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&self.snapshots)
            .map_err(Error::io("creating a directory in", &self.snapshots))?;
        let mkdir = |name: &str, mode: u32| {
            let path = temp.path().join(name);
            fs::DirBuilder::new()
                .mode(mode)
                .create(&path)
                .map_err(Error::io("creating", path))
        };
        // The root of a container's filesystem: 0755 like containerd's.
        mkdir("fs", 0o755)?;
        if kind == Kind::Active {
            mkdir("work", 0o711)?;
        }

        let snapshot = txn.create(kind, key, parent, labels)?;
        if let Some(&pid) = snapshot.parent_ids.first() {
            // A child's root belongs to whoever owns its parent's root.
            let owner =
                fs::metadata(self.fs_dir(pid)).map_err(Error::io("reading", self.fs_dir(pid)))?;
            let fs_path = temp.path().join("fs");
            std::os::unix::fs::lchown(&fs_path, Some(owner.uid()), Some(owner.gid()))
                .map_err(Error::io("changing the owner of", fs_path))?;
        }

        let dir = self.dir(snapshot.id);
        // Ids are never reused once committed, so a directory already there is what a crash left
        // between rename and commit: garbage.
        remove_all(&dir)?;
        let temp = temp.keep();
        if let Err(e) = fs::rename(&temp, &dir) {
            let _ = fs::remove_dir_all(&temp);
            return Err(Error::io("renaming", &temp)(e));
        }
        let committed = fs::File::open(&self.snapshots)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("syncing", &self.snapshots))
            .and_then(|()| txn.commit());
        if let Err(e) = committed {
            if let Err(rm) = remove_all(&dir) {
                warn!(error = %rm, "removing the directory of a snapshot that failed to commit");
            }
            return Err(e);
        }
        let mounts = self.mounts(&snapshot);
        Ok((snapshot, mounts))
    }

    /// The mounts containerd's overlay snapshotter would return for `s`.
    fn mounts(&self, s: &Snapshot) -> Vec<Mount> {
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let bind = |id: u64, mode: &str| Mount {
            kind: "bind".to_owned(),
            source: path(self.fs_dir(id)),
            options: vec![mode.to_owned(), "rbind".to_owned()],
        };
        let mut options = Vec::new();
        match (s.kind, s.parent_ids.as_slice()) {
            (Kind::View, []) => return vec![bind(s.id, "ro")],
            (_, []) => return vec![bind(s.id, "rw")],
            (Kind::Active, _) => {
                options.push(format!("workdir={}", path(self.work_dir(s.id))));
                options.push(format!("upperdir={}", path(self.fs_dir(s.id))));
            }
            (_, [parent]) => return vec![bind(*parent, "ro")],
            (_, _) => {}
        }
        let lower: Vec<String> = s
            .parent_ids
            .iter()
            .map(|&id| path(self.fs_dir(id)))
            .collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        options.extend(self.overlay_options.iter().cloned());
        vec![Mount {
            kind: "overlay".to_owned(),
            source: "overlay".to_owned(),
            options,
        }]
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<(), Error> {
        validate_key("name", name)?;
        let labels = validate_labels(labels)?;
        let txn = self.meta.write()?;
        // Measured inside the transaction, like containerd, so the recorded usage is the
        // committed content's.
        txn.commit_active(key, name, labels, |id| disk_usage(&self.fs_dir(id)))?;
        txn.commit()
    }

    fn remove(&self, key: &str, before_delete: impl FnOnce(&Path)) -> Result<(), Error> {
        let txn = self.meta.write()?;
        let id = txn.remove(key)?;
        txn.commit()?;
        before_delete(&self.fs_dir(id));
        // The record is gone and committed: failing here only leaves garbage for cleanup.
        if let Err(e) = remove_all(&self.dir(id)) {
            warn!(error = %e, key, "removing a snapshot directory; cleanup will retry");
        }
        Ok(())
    }

    fn usage(&self, key: &str) -> Result<Usage, Error> {
        let record = self.meta.read()?.get(key)?;
        match record.kind {
            Kind::Active => disk_usage(&self.fs_dir(record.id)),
            _ => Ok(record.usage()),
        }
    }

    fn cleanup(&self) -> Result<(), Error> {
        // Holding the write transaction keeps snapshots from being made meanwhile.
        let txn = self.meta.write()?;
        let ids: HashSet<String> = txn.ids()?.iter().map(u64::to_string).collect();
        let entries =
            fs::read_dir(&self.snapshots).map_err(Error::io("listing", &self.snapshots))?;
        let mut garbage = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io("listing", &self.snapshots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if ids.contains(&name) {
                continue;
            }
            if name.bytes().all(|b| b.is_ascii_digit()) {
                // An id the sequence may hand out again (a crash undid its record): move it out
                // of the way before letting go of the transaction.
                let moved = self.snapshots.join(format!("rm-{name}"));
                remove_all(&moved)?;
                fs::rename(entry.path(), &moved).map_err(Error::io("renaming", entry.path()))?;
                garbage.push(moved);
            } else {
                garbage.push(entry.path());
            }
        }
        drop(txn);
        for path in garbage {
            remove_all(&path)?;
        }
        Ok(())
    }
}

/// Removes a directory tree; one that is already gone is fine.
fn remove_all(path: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("reading", path)(e)),
        Ok(m) if m.is_dir() => match fs::remove_dir_all(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("removing", path)(e)),
            _ => Ok(()),
        },
        Ok(_) => fs::remove_file(path).map_err(Error::io("removing", path)),
    }
}

/// Disk use of a tree as containerd's `fs.DiskUsage` counts it: allocated blocks and distinct
/// inodes (hard links count once), the root included, symlinks not followed.
fn disk_usage(root: &Path) -> Result<Usage, Error> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(Error::io("measuring", &path))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(meta.blocks().saturating_mul(512)).unwrap_or(i64::MAX);
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(Error::io("measuring", &path))? {
                stack.push(entry.map_err(Error::io("measuring", &path))?.path());
            }
        }
    }
    Ok(usage)
}

impl Snapshotter for OverlaySnapshotter {
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> Result<Vec<Mount>, Error> {
        self.prepare_with(key, parent, labels, |_| async { Ok(()) })
            .await
    }

    async fn view(&self, key: String, parent: String, labels: Labels) -> Result<Vec<Mount>, Error> {
        self.blocking(move |i| Ok(i.create(Kind::View, &key, &parent, labels)?.1))
            .await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Error> {
        self.blocking(move |i| Ok(i.mounts(&i.meta.read()?.snapshot(&key)?)))
            .await
    }

    async fn commit(&self, name: String, key: String, labels: Labels) -> Result<(), Error> {
        self.blocking(move |i| i.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: String) -> Result<(), Error> {
        self.blocking(move |i| i.remove(&key, |_| {})).await
    }

    async fn stat(&self, key: String) -> Result<Info, Error> {
        self.blocking(move |i| Ok(i.meta.read()?.get(&key)?.info(&key)))
            .await
    }

    async fn update(
        &self,
        name: String,
        labels: Labels,
        paths: Vec<String>,
    ) -> Result<Info, Error> {
        self.blocking(move |i| {
            let txn = i.meta.write()?;
            let info = txn.update(&name, labels, &paths)?;
            txn.commit()?;
            Ok(info)
        })
        .await
    }

    async fn list(&self, filters: Vec<String>) -> Result<Vec<Info>, Error> {
        let filter = Filter::parse_all(&filters)?;
        self.blocking(move |i| i.meta.read()?.list(&filter)).await
    }

    async fn usage(&self, key: String) -> Result<Usage, Error> {
        self.blocking(move |i| i.usage(&key)).await
    }

    async fn cleanup(&self) -> Result<(), Error> {
        self.blocking(Inner::cleanup).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seam remote snapshots will use: the hook fills the new snapshot, commits it under
    /// the ref's name and answers AlreadyExists, as stargz-snapshotter does.
    #[tokio::test]
    async fn a_prepare_hook_can_commit_in_place() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let snapshotter = OverlaySnapshotter::open(dir.path())?;
        let labels = Labels::from([(
            "containerd.io/snapshot.ref".to_owned(),
            "sha256:l".to_owned(),
        )]);
        let result = snapshotter
            .prepare_with("extract-1".to_owned(), String::new(), labels, |prepared| {
                let snapshotter = snapshotter.clone();
                async move {
                    fs::write(prepared.fs.join("file"), b"from the swarm")
                        .map_err(Error::io("writing", &prepared.fs))?;
                    let name = prepared.labels["containerd.io/snapshot.ref"].clone();
                    snapshotter
                        .commit(name.clone(), prepared.key, prepared.labels)
                        .await?;
                    Err(Error::AlreadyExists(name))
                }
            })
            .await;
        assert_eq!(
            result.err().map(|e| e.code()),
            Some(tonic::Code::AlreadyExists)
        );
        let info = snapshotter.stat("sha256:l".to_owned()).await?;
        assert_eq!(info.kind, Kind::Committed);
        assert!(matches!(
            snapshotter.stat("extract-1".to_owned()).await,
            Err(Error::NotFound(_))
        ));
        assert_eq!(
            fs::read(dir.path().join("snapshots/1/fs/file"))?,
            b"from the swarm"
        );
        Ok(())
    }
}
