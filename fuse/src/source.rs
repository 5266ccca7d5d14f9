//! [`ChunkSource`]: where a lazy layer's compressed bytes come from.
//!
//! The filesystem never knows about pieces, peers or registries. It asks a `ChunkSource` for a
//! byte range of the layer blob; the node implements it over the blob store and the swarm
//! (fetching the pieces under that range ahead of everything else), tests over a local file.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The bytes of one layer blob (compressed, as stored in the registry).
///
/// Called from FUSE worker threads: implementations block, for a bounded time, and fail with an
/// `io::Error` (which the filesystem turns into `EIO`) rather than hang.
pub trait ChunkSource: Send + Sync + std::fmt::Debug + 'static {
    /// The blob's size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the blob's bytes at `offset`, fetching what is missing first.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Whether `range` is already local, so reading it cannot wait on the network.
    fn is_local(&self, range: Range<u64>) -> bool;

    /// A hint that `range` will be read soon (prefetch); the default ignores it.
    fn prefetch(&self, _range: Range<u64>) {}
}

/// A blob in a local file: for tests, `shoal convert`'s self-check and fully local layers.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok(FileSource { file, size })
    }
}

impl ChunkSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn is_local(&self, _range: Range<u64>) -> bool {
        true
    }
}
