//! The content store's errors and their one mapping to gRPC codes. containerd decides what to do
//! from the code alone (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
//! OutOfRange, Unavailable), so every variant says which one it is, and the message carries the
//! detail for people.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use shoal_p2p::Digest;
use shoal_p2p::store::StoreError;
use shoal_p2p::swarm::SwarmError;

use crate::filters::FilterError;
use crate::grpc;
use crate::meta::db_errors;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("content {0}: not found")]
    NotFound(Digest),
    #[error("ingest ref {0:?}: not found")]
    IngestNotFound(String),
    #[error("content {0}: already exists")]
    AlreadyExists(Digest),
    #[error("ref {ingest_ref} locked for {held:?}")]
    Locked { ingest_ref: String, held: Duration },
    #[error("write @{requested} must occur at current offset {current}")]
    WriteOffset { requested: i64, current: u64 },
    #[error("read past object length {size} bytes (offset {offset})")]
    ReadOffset { offset: i64, size: u64 },
    #[error("unexpected commit size {actual}, expected {expected}")]
    SizeMismatch { actual: u64, expected: u64 },
    #[error("unexpected commit digest {actual}, expected {expected}")]
    DigestMismatch { actual: Digest, expected: Digest },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("bytes {start}..{end} of {digest} did not arrive within {waited:?}")]
    NotArrived {
        digest: Digest,
        start: u64,
        end: u64,
        waited: Duration,
    },
    #[error("bytes {start}..{end} of {digest} are not on this node and there is no swarm")]
    Missing {
        digest: Digest,
        start: u64,
        end: u64,
    },
    #[error("swarm")]
    Swarm(#[from] SwarmError),
    #[error("blob store")]
    Store(#[from] StoreError),
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata store")]
    Db(#[source] Box<redb::Error>),
    #[error("metadata of {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("content store task")]
    Task(#[from] tokio::task::JoinError),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// The gRPC code containerd expects for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) | Error::IngestNotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            // containerd's local store: `ErrUnavailable` for a ref another writer holds.
            Error::Locked { .. } | Error::NotArrived { .. } | Error::Missing { .. } => {
                Code::Unavailable
            }
            Error::Swarm(_) => Code::Unavailable,
            Error::WriteOffset { .. } | Error::ReadOffset { .. } => Code::OutOfRange,
            Error::SizeMismatch { .. } | Error::DigestMismatch { .. } => Code::FailedPrecondition,
            Error::InvalidArgument(_) | Error::Filter(_) => Code::InvalidArgument,
            Error::Corrupt { .. } => Code::DataLoss,
            Error::Store(_) | Error::Io { .. } | Error::Db(_) | Error::Task(_) => Code::Internal,
        }
    }
}

db_errors!(Error);

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        grpc::status(e.code(), &e)
    }
}
