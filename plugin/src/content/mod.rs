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
//! | `service.rs` | the thin tonic adapter: [`service`] turns any [`Store`] into a `ContentServer` |
//!
//! What it shares with the snapshotter lives beside them: the filter language
//! ([`crate::filters`]), label checks ([`crate::labels`]), and the small gRPC and redb helpers.
//!
//! Blobs are not namespaced here: containerd's metadata layer keeps namespaces, and prefixes
//! ingest refs with them (`default/1/layer-sha256:…`), before calling a proxy plugin.

mod error;
mod ingest;
mod meta;
mod service;
mod store;

use std::borrow::Cow;
use std::future::Future;
use std::time::SystemTime;

use bytes::Bytes;
use shoal_p2p::Digest;

use crate::filters::{self, Fields};

pub use crate::labels::{Labels, MAX_LABEL_SIZE, MAX_LABELS};
pub use error::Error;
pub use service::{ContentService, service};
pub use store::{BlobReader, ContentConfig, ContentStore, StoreWriter};

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

/// A blob's fields for filters, as containerd's `AdaptInfo`: `digest` and `labels.<key>`.
impl Fields for Info {
    fn field(&self, path: &[String]) -> Option<Cow<'_, str>> {
        match path.first()?.as_str() {
            "digest" => Some(self.digest.to_string().into()),
            "labels" => filters::label(&self.labels, &path[1..]),
            _ => None,
        }
    }
}

/// An ingest's fields for filters, as containerd's `adaptStatus`: `ref`.
impl Fields for Status {
    fn field(&self, path: &[String]) -> Option<Cow<'_, str>> {
        (path.first()?.as_str() == "ref").then(|| self.r#ref.as_str().into())
    }
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

/// Checks an ingest ref. Refs never become paths (their sha256 names the directory).
fn validate_ref(r#ref: &str) -> Result<(), Error> {
    crate::labels::validate_name("ref", r#ref, MAX_REF_SIZE).map_err(Error::InvalidArgument)
}

fn validate_labels(labels: Labels) -> Result<Labels, Error> {
    crate::labels::validate(labels).map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::filters::Filter;

    fn matches(filter: &str, item: &impl Fields) -> anyhow::Result<bool> {
        Ok(Filter::parse_all(&[filter.to_owned()])?.matches(item))
    }

    #[test]
    fn filters_see_what_containerd_adapts() -> anyhow::Result<()> {
        let digest = Digest::of(b"blob");
        let info = Info {
            digest,
            size: 4,
            created: UNIX_EPOCH,
            updated: UNIX_EPOCH,
            labels: Labels::from([("containerd.io/gc.root".to_owned(), "x".to_owned())]),
        };
        assert!(matches(&format!("digest=={digest}"), &info)?);
        assert!(matches(r#"labels."containerd.io/gc.root"==x"#, &info)?);
        assert!(!matches("size", &info)?, "not a field containerd exposes");
        let status = Status {
            r#ref: "default/1/layer".to_owned(),
            offset: 0,
            total: 0,
            expected: None,
            started: UNIX_EPOCH,
            updated: UNIX_EPOCH,
        };
        assert!(matches("ref~=^default/", &status)?);
        assert!(!matches("digest", &status)?);
        Ok(())
    }
}
