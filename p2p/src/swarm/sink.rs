//! A piece arriving in chunks (from a peer or from the registry) written into the store as it
//! comes: each block is written and hashed on the blocking pool by the piece's
//! [`PieceWriter`], so a piece in flight costs one block of memory, not the whole piece.
//! Committing the piece (checking its hash, making it durable and visible) is the torrent's
//! job once the sink is finished.

use std::io;

use bytes::Bytes;

use crate::store::{PieceWriter, StoreError};
use crate::upstream::RangeSink;
use crate::wire::PIECE_CHUNK;

/// Most bytes handed to the store at a time: a chunk of a peer's piece frame passes as it is,
/// smaller chunks (an HTTP body's) are gathered up to this, larger ones cut down to it. Under
/// glibc's default mmap threshold (128 KiB), so these buffers never raise it.
const BLOCK: usize = PIECE_CHUNK;

#[derive(Debug)]
pub(super) struct PieceSink {
    /// `None` only while a block is being written on the blocking pool (or if that panicked).
    piece: Option<PieceWriter>,
    /// Small chunks gathered until they make a block; reused from block to block.
    gathered: Vec<u8>,
}

impl PieceSink {
    pub fn new(piece: PieceWriter) -> Self {
        Self {
            piece: Some(piece),
            gathered: Vec::new(),
        }
    }

    /// Takes the next bytes of the piece.
    pub async fn append(&mut self, mut chunk: Bytes) -> Result<(), StoreError> {
        while !chunk.is_empty() {
            if self.gathered.is_empty() && chunk.len() >= BLOCK / 2 {
                let block = chunk.split_to(chunk.len().min(BLOCK));
                self.write_block(block).await?;
                continue;
            }
            if self.gathered.capacity() == 0 {
                self.gathered.reserve_exact(BLOCK);
            }
            let part = chunk.split_to(chunk.len().min(BLOCK - self.gathered.len()));
            self.gathered.extend_from_slice(&part);
            if self.gathered.len() == BLOCK {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Writes what is gathered; the piece is then ready to commit.
    pub async fn finish(mut self) -> Result<PieceWriter, StoreError> {
        self.flush().await?;
        self.piece.take().ok_or_else(lost)
    }

    /// Starts the piece over.
    pub fn restart(&mut self) {
        self.gathered.clear();
        if let Some(piece) = &mut self.piece {
            piece.restart();
        }
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if self.gathered.is_empty() {
            return Ok(());
        }
        let block = std::mem::take(&mut self.gathered);
        self.gathered = self.write_block(block).await?;
        self.gathered.clear();
        Ok(())
    }

    /// Writes `block` on the blocking pool and gives it back.
    async fn write_block<B>(&mut self, block: B) -> Result<B, StoreError>
    where
        B: AsRef<[u8]> + Send + 'static,
    {
        let mut piece = self.piece.take().ok_or_else(lost)?;
        let (piece, block, result) = tokio::task::spawn_blocking(move || {
            let result = piece.write(block.as_ref());
            (piece, block, result)
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("piece writer panicked: {e}")))?;
        self.piece = Some(piece);
        result.map(|()| block)
    }
}

fn lost() -> StoreError {
    StoreError::Corrupt("piece writer lost to a panic".into())
}

impl RangeSink for PieceSink {
    fn restart(&mut self) {
        PieceSink::restart(self);
    }

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.append(chunk).await.map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;
    use crate::metainfo::Metainfo;
    use crate::store::{BlobStore, PieceWrite, StoreConfig};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_of_any_size_make_the_piece() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = BlobStore::open(&StoreConfig {
            root: dir.path().to_owned(),
            capacity: u64::MAX,
        })?;
        let data: Vec<u8> = (0..(1 << 20) + 5).map(|i| (i * 7 % 253) as u8).collect();
        let meta = Metainfo::of_bytes(Digest::of(&data), &data)?;
        let blob = store.open_blob(&meta)?;
        let piece = blob
            .piece_writer(0)?
            .ok_or_else(|| anyhow::anyhow!("piece 0 not free"))?;
        let mut sink = PieceSink::new(piece);
        // A false start, then small, odd, and larger-than-a-block chunks.
        sink.append(Bytes::from_static(&[1; 5000])).await?;
        sink.restart();
        let first = &data[..1 << 20];
        let mut pos = 0;
        for len in [1, 1000, 70_000, 3 * BLOCK + 17, BLOCK, 12_345]
            .into_iter()
            .cycle()
        {
            let end = (pos + len).min(first.len());
            sink.append(Bytes::copy_from_slice(&first[pos..end]))
                .await?;
            pos = end;
            if pos == first.len() {
                break;
            }
        }
        let mut piece = sink.finish().await?;
        let committed = tokio::task::spawn_blocking(move || piece.commit(false)).await??;
        assert_eq!(committed, PieceWrite::Added);
        let mut buf = vec![0u8; first.len()];
        blob.read_at(0, &mut buf)?;
        assert!(buf == first);
        Ok(())
    }
}
