//! The eStargz layer format: reading a blob's TOC into an [`Index`], reading verified chunks, and
//! converting a plain tar into an eStargz blob.
//!
//! An eStargz blob (see containerd/stargz-snapshotter, `estargz/`) is a series of gzip members
//! which, inflated together, form one valid tar. Every regular file's content, and every chunk
//! of a large file, starts a new member, so a reader can inflate any chunk on its own from a
//! byte range of the blob. The blob ends with:
//!
//! ```text
//! … file members … | gzip(tar entry "stargz.index.json" + end-of-archive) | footer (51 bytes)
//! ```
//!
//! The footer is an empty gzip member whose header `FEXTRA` field holds the subfield `'S' 'G'`
//! with `%016x` of the TOC member's offset followed by `STARGZ` ([`footer`]). The TOC
//! ([`toc`]) lists every tar entry with, for file contents, the offset of the member holding it
//! and the sha256 of each chunk. The image manifest carries the sha256 of the TOC JSON
//! ([`TOC_DIGEST_ANNOTATION`]), so every chunk read is checked against a chain of digests
//! rooted in the manifest.
//!
//! | file | what |
//! |---|---|
//! | [`footer`] | the 51-byte eStargz and 47-byte legacy stargz footers |
//! | [`toc`] | the TOC JSON model, its bounded decoder, and RFC 3339 times |
//! | [`build`] | checking a TOC and turning it into an [`Index`] ([`parse_toc`]) |
//! | [`reader`] | [`Layer`]: open a blob through a [`ChunkSource`], read verified chunks |
//! | [`writer`] | [`convert`]: tar (or tar.gz) → eStargz |

mod build;
mod footer;
mod reader;
mod toc;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod toc_tests;

use std::io;

pub use build::parse_toc;
pub use reader::Layer;
pub use writer::{WriteOptions, Written, convert};

#[cfg(doc)]
use crate::{index::Index, source::ChunkSource};

/// Manifest layer annotation holding `sha256:<hex>` of the TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Manifest layer annotation holding the size of the inflated blob (the tar), in decimal.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
/// Size of the eStargz footer.
pub const FOOTER_SIZE: u64 = 51;
/// Size of the legacy (pre-eStargz) stargz footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;
/// Name of the tar entry holding the TOC JSON.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// Entries before this one are the ones a container needs first; prefetch up to its offset.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Marks a layer that should not be prefetched.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte a landmark file holds.
pub const LANDMARK_CONTENTS: u8 = 0xf;
/// The largest chunk a TOC may describe (and the writer may be asked for). Chunks are inflated
/// whole into memory; real writers use 4 MiB.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Bounds on what opening a layer may allocate, whatever the blob claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest compressed TOC member read from the blob.
    pub max_toc_compressed: u64,
    /// The largest inflated TOC JSON (a gzip bomb fails here, before anything is allocated).
    pub max_toc_json: u64,
    /// The most TOC entries decoded.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_toc_compressed: 32 << 20,
            max_toc_json: 128 << 20,
            max_entries: 1 << 21,
        }
    }
}

/// What is wrong with one TOC entry (see [`Error::Entry`], which names it).
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("empty name")]
    EmptyName,
    #[error("NUL byte in the name")]
    NulInName,
    #[error("`..` in the name")]
    DotDot,
    #[error("unknown type {0:?}")]
    UnknownType(String),
    #[error("{field} is {value}, out of range")]
    OutOfRange { field: &'static str, value: i64 },
    #[error("a duplicate of an earlier entry")]
    Duplicate,
    #[error("its parent {0:?} is not a directory")]
    ParentNotDir(String),
    #[error("the root can only be a directory")]
    RootNotDir,
    #[error("hard link to {0:?}, which is not an earlier entry")]
    DanglingLink(String),
    #[error("hard link to the directory {0:?}")]
    LinkToDir(String),
    #[error("symlink with an empty target")]
    EmptySymlink,
    #[error("modtime {0:?} is not an RFC 3339 time")]
    BadModTime(String),
    #[error("xattr {0:?} is not base64")]
    BadXattr(String),
    #[error("{field} {value:?} is not sha256:<64 hex digits>")]
    BadDigest { field: &'static str, value: String },
    #[error("device {major}:{minor} does not fit the kernel's 12:20 bits")]
    BadDevice { major: i64, minor: i64 },
    #[error("a chunk with no regular file before it")]
    OrphanChunk,
    #[error("chunk named {0:?} follows a different file")]
    ChunkNameMismatch(String),
    #[error("{size} bytes of content but no offset")]
    NoOffset { size: u64 },
    #[error("offset {offset} beyond the TOC at {toc}")]
    OffsetBeyondToc { offset: u64, toc: u64 },
    #[error("chunk at file offset {found} where {expected} was expected (gap or overlap)")]
    ChunkNotContiguous { expected: u64, found: u64 },
    #[error("chunks cover {covered} bytes of a {size}-byte file")]
    ChunksShort { covered: u64, size: u64 },
    #[error("chunk at file offset {offset} is empty")]
    EmptyChunk { offset: u64 },
    #[error("chunk of {size} bytes is larger than the {MAX_CHUNK_SIZE}-byte limit")]
    ChunkTooLarge { size: u64 },
    #[error("chunk at file offset {offset} has no chunkDigest")]
    NoChunkDigest { offset: u64 },
    #[error("a landmark that is not a regular file")]
    BadLandmark,
}

/// Everything that can go wrong reading or writing eStargz.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the layer blob")]
    Io(#[source] io::Error),
    #[error("truncated footer: the blob is only {size} bytes")]
    TruncatedFooter { size: u64 },
    #[error("bad footer: {0}")]
    BadFooter(&'static str),
    #[error("TOC offset {offset} beyond the blob's {size} bytes before the footer")]
    TocOffsetBeyondBlob { offset: u64, size: u64 },
    #[error("compressed TOC of {size} bytes exceeds the {limit}-byte limit")]
    TocTooLarge { size: u64, limit: u64 },
    #[error("TOC JSON of {size} bytes exceeds the {limit}-byte limit")]
    TocJsonTooLarge { size: u64, limit: u64 },
    #[error("TOC has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("TOC member is not a gzip'd tar")]
    TocArchive(#[source] io::Error),
    #[error("TOC member's first tar entry is {0:?}, not {TOC_TAR_NAME}")]
    TocName(String),
    #[error("TOC JSON")]
    TocJson(#[source] serde_json::Error),
    #[error("TOC version {0}, only 1 is known")]
    TocVersion(i64),
    #[error("TOC digest is {actual}, the manifest says {expected}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("{0:?} is not a sha256:<64 hex digits> digest")]
    BadDigest(String),
    #[error("TOC entry {name:?}: {problem}")]
    Entry { name: String, problem: Problem },
    #[error("inflating the chunk at blob offset {offset}")]
    Inflate {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("chunk at blob offset {offset} inflates to {got} bytes, {wanted} expected")]
    ChunkTruncated { offset: u64, wanted: u64, got: u64 },
    #[error("chunk at blob offset {offset} has sha256:{actual}, the TOC says sha256:{expected}")]
    ChunkDigest {
        offset: u64,
        expected: String,
        actual: String,
    },
    #[error("chunk range {start}..{end} is outside the {size}-byte blob")]
    ChunkRange { start: u64, end: u64, size: u64 },
    #[error("reading the input tar")]
    Input(#[source] io::Error),
    #[error("writing the eStargz blob")]
    Output(#[source] io::Error),
    #[error("spooling the input to a temporary file")]
    Spool(#[source] io::Error),
    #[error("input tar entry {name:?}: {reason}")]
    InputEntry { name: String, reason: &'static str },
    #[error("bad write options: {0}")]
    BadOptions(&'static str),
}

impl Error {
    fn entry(name: &str, problem: Problem) -> Self {
        Error::Entry {
            name: name.to_owned(),
            problem,
        }
    }
}

/// `sha256:<hex>` of `bytes`.
fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Parses `sha256:<64 hex digits>` (either case) into its 32 bytes.
fn parse_sha256(digest: &str) -> Option<[u8; 32]> {
    let hex_part = digest.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}
