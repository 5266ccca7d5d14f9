//! The snapshotter's errors and their one mapping to gRPC codes. containerd decides what to do
//! from the code alone (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument), so every
//! variant says which one it is, and the message carries the detail for people.

use std::io;
use std::path::PathBuf;

use super::Kind;
use crate::filters::FilterError;
use crate::grpc;
use crate::meta::db_errors;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("parent snapshot {0:?} does not exist")]
    ParentNotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("cannot remove snapshot {0:?}: other snapshots have it as their parent")]
    HasChildren(String),
    #[error("snapshot {key:?} is {kind}, {wanted}")]
    WrongKind {
        key: String,
        kind: Kind,
        /// What the operation needs, e.g. "not active".
        wanted: &'static str,
    },
    #[error("parent {parent:?} is {kind}, not committed")]
    ParentNotCommitted { parent: String, kind: Kind },
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("metadata store")]
    Db(#[source] Box<redb::Error>),
    #[error("metadata of {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("mounting lazy layer {name:?}: {reason}")]
    Lazy { name: String, reason: String },
    #[error("snapshotter task")]
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
            Error::NotFound(_) | Error::ParentNotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::HasChildren(_) | Error::WrongKind { .. } => Code::FailedPrecondition,
            // containerd's metastore answers InvalidArgument for a parent that is not committed.
            Error::ParentNotCommitted { .. } | Error::InvalidArgument(_) | Error::Filter(_) => {
                Code::InvalidArgument
            }
            Error::Corrupt { .. } => Code::DataLoss,
            Error::Lazy { .. } => Code::Unavailable,
            Error::Io { .. } | Error::Db(_) | Error::Task(_) => Code::Internal,
        }
    }
}

db_errors!(Error);

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        grpc::status(e.code(), &e)
    }
}
