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
//! | `filter.rs` | containerd's filter language (`labels."k"==v,kind==active`) for `List` |
//! | `overlay.rs` | [`OverlaySnapshotter`]: directories, mounts, crash-safe ordering, cleanup |
//! | `service.rs` | the thin tonic adapter: [`service`] turns any [`Snapshotter`] into a `SnapshotsServer` |
//!
//! Keys are not namespaced here: containerd's metadata layer already prefixes them with the
//! namespace (`default/3/sha256:…`) before calling a proxy plugin, exactly as it does for its
//! built-in snapshotters, and the `snapshotter` field of every request (the proxy plugin's name
//! in containerd's config) is ignored for the same reason.
//!
//! Remote snapshots (a later issue) hook into `Prepare`: when the labels carry
//! `containerd.io/snapshot.ref`, a hook will get to make and commit the snapshot itself (with
//! [`OverlaySnapshotter::prepare_with`]) and answer `AlreadyExists`.

mod error;
mod filter;
mod meta;
mod overlay;
mod service;

use std::collections::HashMap;
use std::future::Future;
use std::time::SystemTime;

pub use error::Error;
pub use overlay::{OverlaySnapshotter, PreparedSnapshot};
pub use service::{SnapshotsService, service};

/// Snapshot labels, as containerd sends them. An empty value means "no such label".
pub type Labels = HashMap<String, String>;

/// containerd allows at most this many bytes in one label's key and value together
/// (`pkg/labels/validate.go`).
pub const MAX_LABEL_SIZE: usize = 4096;
/// Labels one snapshot may carry. containerd sets a handful; the cap keeps one request from
/// growing a metadata record without bound.
pub const MAX_LABELS: usize = 256;
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
    let reason = if key.is_empty() {
        "must not be empty"
    } else if key.len() > MAX_KEY_SIZE {
        "is too long"
    } else if key.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument(format!("{what} {reason}")))
}

/// Checks labels as containerd does, plus a cap on their number, and drops empty values (an
/// empty value removes a label in containerd's stores).
fn validate_labels(mut labels: Labels) -> Result<Labels, Error> {
    labels.retain(|_, v| !v.is_empty());
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "{} labels, at most {MAX_LABELS} allowed",
            labels.len()
        )));
    }
    for (k, v) in &labels {
        if k.len() + v.len() > MAX_LABEL_SIZE {
            let shown: String = k.chars().take(64).collect();
            return Err(Error::InvalidArgument(format!(
                "label {shown:?}: key and value are {} bytes, at most {MAX_LABEL_SIZE} allowed",
                k.len() + v.len()
            )));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_like_containerd() {
        let ok = Labels::from([("a".to_owned(), "x".repeat(4095))]);
        assert!(validate_labels(ok).is_ok());
        let big = Labels::from([("ab".to_owned(), "x".repeat(4095))]);
        assert!(matches!(
            validate_labels(big),
            Err(Error::InvalidArgument(_))
        ));
        let empty = Labels::from([("gone".to_owned(), String::new())]);
        assert!(
            validate_labels(empty)
                .map(|l| l.is_empty())
                .unwrap_or(false)
        );
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), "v".to_owned()))
            .collect();
        assert!(validate_labels(many).is_err());
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("key", "default/1/sha256:abc").is_ok());
        assert!(
            validate_key("key", "../../etc").is_ok(),
            "keys are never paths"
        );
        assert!(validate_key("key", "").is_err());
        assert!(validate_key("key", "a\0b").is_err());
        assert!(validate_key("key", &"k".repeat(MAX_KEY_SIZE + 1)).is_err());
    }
}
