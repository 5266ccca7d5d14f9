//! The containerd snapshotter: what containerd calls through `[proxy_plugins]` `type = "snapshot"`
//! to get a root filesystem for every image layer and container.
//!
//! It behaves like containerd's own overlayfs snapshotter (`plugins/snapshots/overlay`), so
//! containerd cannot tell the difference:
//!
//! - every snapshot is a directory `<root>/snapshots/<id>/` holding `fs/` (the layer's files, the
//!   overlay upper dir) and, for active snapshots, `work/` (the overlay work dir);
//! - `Prepare` makes an *active* (writable) snapshot, `View` a read-only *view*, `Commit` turns an
//!   active snapshot into a *committed* one that children can use as their parent;
//! - the mounts handed back are a bind mount of `fs/` when there is no parent (or one parent, for
//!   a view), otherwise an `overlay` whose `lowerdir=` lists the parents nearest first;
//! - metadata (kind, parent, labels, timestamps, usage) lives in a [redb] database next to the
//!   directories, so it survives `kill -9`.
//!
//! Layers:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the domain types and the [`Snapshotter`] trait |
//! | `error.rs` | [`Error`] and its one mapping to gRPC codes |
//! | `meta.rs` | the metadata store: records, parent links, id sequence, all in redb transactions |
//! | `overlay.rs` | [`OverlaySnapshotter`]: directories, mounts, crash-safe ordering, cleanup |
//! | `remote.rs` | [`RemoteSnapshotter`]: lazily mounted layers (remote snapshots) over the overlay one |
//! | `service.rs` | the thin tonic adapter: [`service`] turns any [`Snapshotter`] into a `SnapshotsServer` |
//!
//! What it shares with the content store lives beside them: the filter language
//! (`labels."k"==v,kind==active`, [`crate::filters`]), label checks ([`crate::labels`]), and
//! the small gRPC and redb helpers.
//!
//! Keys are not namespaced here: containerd's metadata layer already prefixes them with the
//! namespace (`default/3/sha256:…`) before calling a proxy plugin, exactly as it does for its
//! built-in snapshotters, and the `snapshotter` field of every request (the proxy plugin's name
//! in containerd's config) is ignored for the same reason.
//!
//! Remote snapshots hook into `Prepare`: when the labels carry `containerd.io/snapshot.ref` and
//! name a lazy layer, [`RemoteSnapshotter`] commits the snapshot itself, mounts the layer there
//! and answers `AlreadyExists` (see `remote.rs`).

mod error;
mod meta;
mod overlay;
mod remote;
mod service;

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use crate::filters::{self, Fields};

pub use crate::labels::{Labels, MAX_LABEL_SIZE, MAX_LABELS};
pub use error::Error;
pub use overlay::{OverlaySnapshotter, PreparedSnapshot};
pub use remote::{LazyError, LazyLayers, RemoteSnapshotter, Restored, SNAPSHOT_REF};
pub use service::{SnapshotsService, service};

/// Longest key or name accepted when creating a snapshot.
pub const MAX_KEY_SIZE: usize = 4096;

/// What a snapshot is for. Only active snapshots can be written to and committed; only committed
/// snapshots can be parents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The spelling containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `Stat`, `Update` and `List` report about a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// The key of an active snapshot or view, the name of a committed one.
    pub name: String,
    /// Name of the committed parent, empty when there is none.
    pub parent: String,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: Labels,
}

/// A snapshot's fields for filters, as containerd's `adaptSnapshot`: `kind` (`active`, `view`,
/// `committed`), `name`, `parent` and `labels.<key>`.
impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<Cow<'_, str>> {
        match path.first()?.as_str() {
            "kind" => Some(self.kind.as_str().into()),
            "name" => Some(self.name.as_str().into()),
            "parent" => Some(self.parent.as_str().into()),
            "labels" => filters::label(&self.labels, &path[1..]),
            _ => None,
        }
    }
}

/// Disk use of a snapshot's own layer (not its parents').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of allocated blocks.
    pub size: i64,
    /// Distinct inodes, the `fs/` directory itself included.
    pub inodes: i64,
}

/// One mount for containerd to perform, as in `containerd.types.Mount`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The snapshotter API containerd relies on, independent of gRPC. Errors are [`Error`]s, whose
/// kind decides the gRPC code containerd sees.
pub trait Snapshotter: Send + Sync + 'static {
    /// Makes an active snapshot `key` on top of the committed `parent` (empty: none).
    fn prepare(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>, Error>> + Send;

    /// Makes a read-only view `key` of the committed `parent` (empty: an empty directory).
    fn view(
        &self,
        key: String,
        parent: String,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>, Error>> + Send;

    /// The mounts of an active snapshot or view, again.
    fn mounts(&self, key: String) -> impl Future<Output = Result<Vec<Mount>, Error>> + Send;

    /// Turns the active snapshot `key` into the committed snapshot `name`, with `labels`
    /// replacing its labels. `key` is gone afterwards.
    fn commit(
        &self,
        name: String,
        key: String,
        labels: Labels,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes a snapshot that no other snapshot has as its parent.
    fn remove(&self, key: String) -> impl Future<Output = Result<(), Error>> + Send;

    fn stat(&self, key: String) -> impl Future<Output = Result<Info, Error>> + Send;

    /// Changes the labels of `name`: all of them when `paths` is empty or holds `labels`, only
    /// the named ones for `labels.<key>` paths. Any other path is an invalid argument.
    fn update(
        &self,
        name: String,
        labels: Labels,
        paths: Vec<String>,
    ) -> impl Future<Output = Result<Info, Error>> + Send;

    /// Snapshots matching any of `filters` (containerd's filter syntax; none: all).
    fn list(&self, filters: Vec<String>) -> impl Future<Output = Result<Vec<Info>, Error>> + Send;

    fn usage(&self, key: String) -> impl Future<Output = Result<Usage, Error>> + Send;

    /// Deletes whatever is on disk that no snapshot refers to.
    fn cleanup(&self) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Checks a key or name for a snapshot about to be made.
fn validate_key(what: &'static str, key: &str) -> Result<(), Error> {
    crate::labels::validate_name(what, key, MAX_KEY_SIZE).map_err(Error::InvalidArgument)
}

fn validate_labels(labels: Labels) -> Result<Labels, Error> {
    crate::labels::validate(labels).map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::filters::Filter;

    #[test]
    fn filters_see_what_containerd_adapts() -> anyhow::Result<()> {
        let info = Info {
            name: "a-wl".to_owned(),
            parent: "p-wl".to_owned(),
            kind: Kind::Active,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
            labels: Labels::from([("containerd.io/gc.root".to_owned(), "walk".to_owned())]),
        };
        let matches = |f: &str| Filter::parse_all(&[f.to_owned()]).map(|f| f.matches(&info));
        assert!(matches("kind==active,name==a-wl,parent==p-wl")?);
        assert!(matches(r#"labels."containerd.io/gc.root"==walk"#)?);
        assert!(!matches("kind==view")?);
        assert!(!matches("id")?, "not a field containerd exposes");
        Ok(())
    }
}
