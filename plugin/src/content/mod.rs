//! The containerd content store: what containerd calls through `[proxy_plugins]`
//! `type = "content"` (with its built-in `io.containerd.content.v1.content` disabled) to keep
//! every manifest, config and layer blob it pulls.
//!
//! It behaves like containerd's local content store (`plugins/content/local`) and sits on the
//! node's one [`BlobStore`](shoal_p2p::store::BlobStore): a blob containerd commits is a blob the
//! swarm seeds, with no second copy, and a blob the swarm already has is one containerd does not
//! download again.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the domain types and the [`Store`] and [`Writer`] traits (containerd's `content.Store`) |
//! | `error.rs` | [`Error`] and its one mapping to gRPC codes |
//! | `meta.rs` | labels and times per digest, in a redb database |
//! | `ingest.rs` | resumable ingests: `<ingest_dir>/<sha256(ref)>/{data,ref,total,expected,started_at}` |
//! | `store.rs` | [`ContentStore`]: the [`Store`] over the blob store and, optionally, the swarm |
//! | `filter.rs` | containerd's filter language for `List` and `ListStatuses` |
//! | `service.rs` | the thin tonic adapter: [`service`] turns any [`Store`] into a `ContentServer` |
//!
//! Blobs are not namespaced here: containerd's metadata layer keeps namespaces, and prefixes
//! ingest refs with them (`default/1/layer-sha256:…`), before calling a proxy plugin.

mod error;
mod filter;
mod ingest;
mod meta;
mod service;
mod store;

use std::collections::HashMap;
use std::future::Future;
use std::time::SystemTime;

use bytes::Bytes;
use shoal_p2p::Digest;

pub use error::Error;
pub use service::{ContentService, service};
pub use store::{BlobReader, ContentConfig, ContentStore, StoreWriter};

/// Labels of a blob, as containerd sends them. An empty value means "no such label".
pub type Labels = HashMap<String, String>;

/// containerd allows at most this many bytes in one label's key and value together
/// (`pkg/labels/validate.go`).
pub const MAX_LABEL_SIZE: usize = 4096;
/// Labels one blob may carry; keeps one request from growing a record without bound.
pub const MAX_LABELS: usize = 256;
/// Longest ingest ref accepted. containerd's are `<namespace>/<n>/<kind>-<digest>`, ~100 bytes.
pub const MAX_REF_SIZE: usize = 1024;
/// `Read` answers in messages of at most this many bytes, as containerd's own service does.
pub const READ_CHUNK: usize = 1 << 20;

/// What `Info`, `Update` and `List` report about a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub digest: Digest,
    pub size: u64,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: Labels,
}

/// The state of an ingest (a blob being written), as `Status` and `ListStatuses` report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub r#ref: String,
    /// Bytes written so far: where the next write must start.
    pub offset: u64,
    /// The size announced by the writer, 0 when unknown.
    pub total: u64,
    pub expected: Option<Digest>,
    pub started: SystemTime,
    pub updated: SystemTime,
}

/// containerd's content store API (`core/content`), independent of gRPC. Errors are
/// [`Error`]s, whose kind decides the gRPC code containerd sees.
pub trait Store: Send + Sync + 'static {
    type Reader: Reader;
    type Writer: Writer;

    fn info(&self, digest: Digest) -> impl Future<Output = Result<Info, Error>> + Send;

    /// Whether the blob is on this node (never asking further, unlike `info`): what a writer
    /// checks before it bothers writing. containerd then uses the blob instead.
    fn exists(&self, digest: Digest) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Changes the labels of `digest`: all of them when `paths` is empty or holds `labels`,
    /// only the named ones for `labels.<key>` paths. Any other path is an invalid argument.
    fn update(
        &self,
        digest: Digest,
        labels: Labels,
        paths: Vec<String>,
    ) -> impl Future<Output = Result<Info, Error>> + Send;

    /// Blobs matching any of `filters` (containerd's filter syntax; none: all).
    fn list(&self, filters: Vec<String>) -> impl Future<Output = Result<Vec<Info>, Error>> + Send;

    fn delete(&self, digest: Digest) -> impl Future<Output = Result<(), Error>> + Send;

    /// Opens `digest` for reading at any offset.
    fn reader(&self, digest: Digest) -> impl Future<Output = Result<Self::Reader, Error>> + Send;

    fn status(&self, r#ref: String) -> impl Future<Output = Result<Status, Error>> + Send;

    /// Ingests whose ref matches any of `filters` (field `ref`).
    fn list_statuses(
        &self,
        filters: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Status>, Error>> + Send;

    /// Deletes the ingest `ref`, whatever its state; a writer still holding it fails later.
    fn abort(&self, r#ref: String) -> impl Future<Output = Result<(), Error>> + Send;

    /// Starts or resumes the ingest `ref` and locks it until the writer is dropped or commits.
    /// `total` (0: unknown) and `expected` describe the blob to come; if `expected` is already
    /// present the answer is [`Error::AlreadyExists`].
    fn writer(
        &self,
        r#ref: String,
        total: u64,
        expected: Option<Digest>,
    ) -> impl Future<Output = Result<Self::Writer, Error>> + Send;
}

/// Random access to one blob (containerd's `content.ReaderAt`).
pub trait Reader: Send + 'static {
    fn size(&self) -> u64;

    /// `len` bytes from `offset`; the caller keeps the range inside the blob.
    fn read_at(&self, offset: u64, len: usize)
    -> impl Future<Output = Result<Bytes, Error>> + Send;
}

/// One locked ingest (containerd's `content.Writer`). Dropping it keeps the bytes written so
/// far for a later writer to resume.
pub trait Writer: Send + 'static {
    fn status(&self) -> Status;

    /// Digest of the bytes written so far.
    fn digest(&self) -> Digest;

    /// Appends `data` at the current offset.
    fn write(&mut self, data: Bytes) -> impl Future<Output = Result<(), Error>> + Send;

    /// Starts over from offset 0 (the only truncation containerd asks for).
    fn truncate(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Makes the ingest a blob, checking its size (when `size` > 0) and digest (when
    /// `expected` is given): [`Error::SizeMismatch`] and [`Error::DigestMismatch`] leave the
    /// ingest in place; [`Error::AlreadyExists`] removes it. Returns the blob's digest.
    fn commit(
        self,
        size: u64,
        expected: Option<Digest>,
        labels: Labels,
    ) -> impl Future<Output = Result<Digest, Error>> + Send;
}

/// Checks an ingest ref. Refs never become paths (their sha256 names the directory), so only
/// emptiness, size and NUL matter.
fn validate_ref(r#ref: &str) -> Result<(), Error> {
    let reason = if r#ref.is_empty() {
        "must not be empty"
    } else if r#ref.len() > MAX_REF_SIZE {
        "is too long"
    } else if r#ref.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument(format!("ref {reason}")))
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
                "label key and value length ({} bytes) greater than maximum size \
                 ({MAX_LABEL_SIZE} bytes), key: {shown}",
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
        assert!(validate_labels(empty).is_ok_and(|l| l.is_empty()));
        let many: Labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), "v".to_owned()))
            .collect();
        assert!(validate_labels(many).is_err());
    }

    #[test]
    fn refs_are_checked() {
        assert!(validate_ref("default/1/layer-sha256:abc").is_ok());
        assert!(
            validate_ref("../../etc/passwd").is_ok(),
            "refs are never paths"
        );
        assert!(validate_ref("").is_err());
        assert!(validate_ref("a\0b").is_err());
        assert!(validate_ref(&"r".repeat(MAX_REF_SIZE + 1)).is_err());
    }
}
