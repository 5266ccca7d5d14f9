//! What can go wrong talking to an upstream registry, with enough context (registry, repository,
//! and the blob or manifest asked for) that a log line alone says what failed and where.
//!
//! Callers decide by kind, never by message: [`Error::is_not_found`] lets the content service and
//! the mirror answer "not found" so containerd falls back, [`Error::is_retryable`] is what the
//! retry loop in `http.rs` uses and what a caller may use to try another source later.

use std::io;
use std::path::PathBuf;

/// An upstream registry request that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registry, repository, reference or range that cannot be sent as asked; found before any
    /// request is made.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    #[error("invalid [registry] config: {0}")]
    Config(String),

    #[error("reading docker config {path}")]
    DockerConfigRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("docker config {path}: {reason}")]
    DockerConfigInvalid { path: PathBuf, reason: String },

    /// Reading a blob to upload, or writing one downloaded.
    #[error("local blob file {path}")]
    LocalFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The caller could not keep the bytes of a range (its store failed): not the registry's
    /// fault, and not retried.
    #[error("storing {what} from {registry}/{repository}")]
    Sink {
        registry: String,
        repository: String,
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("building the HTTP client for upstream registries")]
    Client(#[source] reqwest::Error),

    /// The registry refused us even after the auth handshake (or no credentials fit it).
    #[error(
        "not authorized to read {what} from {registry}/{repository} (check docker config credentials)"
    )]
    Unauthorized {
        registry: String,
        repository: String,
        what: String,
    },

    #[error("{what} not found in {registry}/{repository}")]
    NotFound {
        registry: String,
        repository: String,
        what: String,
    },

    /// Any other unexpected HTTP status (429 and 5xx are retried before they end up here).
    #[error("HTTP {status} from {registry}/{repository} for {what}")]
    Status {
        registry: String,
        repository: String,
        what: String,
        status: u16,
    },

    /// Connecting, sending, timing out, or the connection breaking while reading the body.
    #[error("requesting {what} from {registry}/{repository}")]
    Request {
        registry: String,
        repository: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },

    /// The server answered a range request with the whole blob; reading it to find our range could
    /// mean gigabytes, so we stop at the headers.
    #[error(
        "{registry}/{repository} ignored the Range header for {what} and answered HTTP {status} \
         with Content-Length {content_length:?}"
    )]
    RangeIgnored {
        registry: String,
        repository: String,
        what: String,
        status: u16,
        content_length: Option<u64>,
    },

    /// The body ended before the promised length: a dropped connection, worth another try.
    #[error("{registry}/{repository} sent {got} of {expected} bytes of {what}")]
    ShortBody {
        registry: String,
        repository: String,
        what: String,
        expected: u64,
        got: u64,
    },

    #[error("{what} from {registry}/{repository} is larger than the {limit} byte limit")]
    TooLarge {
        registry: String,
        repository: String,
        what: String,
        limit: u64,
    },

    /// An answer that breaks the distribution protocol: wrong range, wrong digest, a challenge
    /// we cannot follow, a token response that is not JSON.
    #[error("unexpected answer from {registry}/{repository} for {what}: {reason}")]
    BadResponse {
        registry: String,
        repository: String,
        what: String,
        reason: String,
    },
}

impl Error {
    /// The registry says the blob, manifest or repository does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// A transient failure: the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status == 429 || (500..=599).contains(status),
            Error::Request { source, .. } => {
                source.is_timeout()
                    || source.is_connect()
                    || source.is_request()
                    || source.is_body()
            }
            Error::ShortBody { .. } => true,
            _ => false,
        }
    }
}
