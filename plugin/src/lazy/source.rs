//! [`SwarmSource`]: a lazy layer's bytes, read out of the blob store and fetched through the
//! swarm when missing.
//!
//! FUSE reads arrive on the filesystem's own threads, outside the tokio runtime; they block on
//! the runtime for the pieces they need, for at most the read timeout, so a read that cannot be
//! served becomes EIO instead of a hung process.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use shoal_fuse::ChunkSource;
use shoal_p2p::store::Blob;
use shoal_p2p::swarm::Swarm;
use shoal_p2p::upstream::BlobSource;
use tokio::runtime::Handle;

/// One layer blob, as the filesystem sees it.
#[derive(Debug)]
pub struct SwarmSource {
    pub(super) blob: Blob,
    pub(super) swarm: Arc<Swarm>,
    pub(super) upstream: Option<BlobSource>,
    pub(super) runtime: Handle,
    pub(super) timeout: Duration,
}

impl SwarmSource {
    /// Waits for `range` to be local, asking the swarm for it ahead of everything else.
    async fn wait(&self, range: Range<u64>) -> io::Result<()> {
        let digest = self.blob.digest();
        // Restarts the torrent if it ended (a failure, or a restart of the node) before the
        // blob was complete; a no-op while it runs.
        self.swarm
            .fetch(digest, self.upstream.clone())
            .await
            .map_err(io::Error::other)?;
        self.swarm.need(&digest, range.clone());
        match tokio::time::timeout(self.timeout, self.blob.wait_range(range.clone())).await {
            Ok(result) => result.map_err(io::Error::other),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "bytes {}..{} of {digest} did not arrive within {:?}",
                    range.start, range.end, self.timeout
                ),
            )),
        }
    }
}

impl ChunkSource for SwarmSource {
    fn size(&self) -> u64 {
        self.blob.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.blob.size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the blob"))?;
        if !self.blob.has_range(offset..end) {
            self.runtime.block_on(self.wait(offset..end))?;
        }
        self.blob.read_at(offset, buf).map_err(io::Error::other)
    }

    fn is_local(&self, range: Range<u64>) -> bool {
        self.blob.has_range(range)
    }

    fn prefetch(&self, range: Range<u64>) {
        self.swarm.want(&self.blob.digest(), range);
    }
}
