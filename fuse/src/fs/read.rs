//! File bytes: a `read` of a file with a local copy is a `pread` of the copy; otherwise it
//! becomes the chunks it overlaps, each from the [`ChunkCache`] or fetched, inflated and
//! verified through the layer, then sliced into one reply.
//!
//! Every failure is `EIO` and is logged once, with the file's path, by the reader whose fetch
//! failed; readers that were waiting on that fetch fail quietly.
//!
//! [`ChunkCache`]: crate::cache::ChunkCache

use std::ops::Range;
use std::sync::Arc;

use fuser::Errno;
use tracing::warn;

use super::copies::DIRECT_ALIGN;
use super::readahead::fetch_chunk;
use super::{BoxError, Counters, LayerFs};
use crate::cache::{ChunkKey, FetchError};
use crate::index::{Chunk, Ino, Kind};

/// The bytes of one read: a slice of a cached chunk when the read falls within one chunk (the
/// usual case: the kernel reads 128 KiB at a time, chunks are 4 MiB), so they are copied only
/// into the reply; assembled when it spans chunks.
#[derive(Debug)]
pub(super) enum ReadBytes {
    Chunk(Arc<Vec<u8>>, Range<usize>),
    Assembled(Vec<u8>),
    /// `len` bytes from `start` of this thread's read buffer, given back when dropped.
    Pooled(Vec<u8>, usize, usize),
}

/// Largest read buffer a session thread keeps between reads (the kernel asks for at most
/// 1 MiB at a time).
const POOLED_MAX: usize = 2 << 20;

thread_local! {
    /// Each session thread's buffer for reads of local copies: allocated and zeroed once, not
    /// per read.
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl ReadBytes {
    /// This thread's read buffer, at least `len` bytes long.
    fn pooled(len: usize) -> Vec<u8> {
        let mut buf = READ_BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }
}

impl Drop for ReadBytes {
    fn drop(&mut self) {
        if let ReadBytes::Pooled(buf, ..) = self
            && buf.len() <= POOLED_MAX
        {
            let buf = std::mem::take(buf);
            READ_BUFFER.with(|b| *b.borrow_mut() = buf);
        }
    }
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::Chunk(chunk, range) => &chunk[range.clone()],
            ReadBytes::Assembled(bytes) => bytes,
            ReadBytes::Pooled(buf, start, len) => &buf[*start..*start + *len],
        }
    }
}

impl LayerFs {
    /// Up to `size` bytes of file `ino` from `offset`; fewer at the end of the file.
    pub(super) fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<ReadBytes, Errno> {
        Counters::add(&self.counters.reads, 1);
        let result = self.read_range(ino, offset, size);
        match &result {
            Ok(bytes) => Counters::add(&self.counters.bytes, bytes.len() as u64),
            Err(errno) if *errno == Errno::EIO => Counters::add(&self.counters.eios, 1),
            Err(_) => {}
        }
        result
    }

    fn read_range(&self, ino: Ino, offset: u64, size: u32) -> Result<ReadBytes, Errno> {
        let node = self.node(ino)?;
        match node.kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        let end = offset.saturating_add(u64::from(size)).min(node.size);
        if offset >= end {
            return Ok(ReadBytes::Assembled(Vec::new()));
        }
        if let Some(copies) = &self.copies
            && let Some(copy) = copies.ready(ino)
        {
            // Verified when it was made: no inflating, no hashing.
            let len = (end - offset) as usize;
            let mut buf = ReadBytes::pooled(len + 2 * DIRECT_ALIGN);
            match copy.read_into(&mut buf, offset, len, node.size) {
                Ok(start) => return Ok(ReadBytes::Pooled(buf, start, len)),
                Err(err) => {
                    warn!(path = %self.path_of(ino), %err, "the local copy reads short; reading the chunks");
                    copies.discard(ino);
                }
            }
        }
        let first = node
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        if let Some(chunk) = node.chunks.get(first)
            && chunk.file_offset <= offset
            && end <= chunk.file_offset + chunk.size
        {
            let bytes = self.chunk(ino, chunk)?;
            let range = (offset - chunk.file_offset) as usize..(end - chunk.file_offset) as usize;
            if bytes.len() < range.end {
                warn!(path = %self.path_of(ino), offset, "a chunk is shorter than the TOC says");
                return Err(Errno::EIO);
            }
            if let Some(readahead) = &self.readahead {
                readahead.after_read(ino, &node.chunks, offset, end, &self.cache);
            }
            return Ok(ReadBytes::Chunk(bytes, range));
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        for chunk in node.chunks[first..]
            .iter()
            .take_while(|c| c.file_offset < end)
        {
            let bytes = self.chunk(ino, chunk)?;
            let pos = offset + out.len() as u64;
            let from = (pos - chunk.file_offset) as usize;
            let to = (end.min(chunk.file_offset + chunk.size) - chunk.file_offset) as usize;
            out.extend_from_slice(&bytes[from..to]);
        }
        if out.len() as u64 != end - offset {
            // The index guarantees chunks cover the file without gaps; this is a bug, not data.
            warn!(path = %self.path_of(ino), offset, "chunks do not cover the range read");
            return Err(Errno::EIO);
        }
        if let Some(readahead) = &self.readahead {
            readahead.after_read(ino, &node.chunks, offset, end, &self.cache);
        }
        Ok(ReadBytes::Assembled(out))
    }

    /// One chunk's verified bytes, exactly `chunk.size` of them.
    fn chunk(&self, ino: Ino, chunk: &Chunk) -> Result<Arc<Vec<u8>>, Errno> {
        let fetched = self
            .cache
            .get_or_fetch(ChunkKey::from(chunk), || fetch_chunk(&*self.data, chunk));
        fetched.map_err(|err: FetchError<BoxError>| {
            if let FetchError::Failed(err) = err {
                warn!(
                    path = %self.path_of(ino),
                    file_offset = chunk.file_offset,
                    compressed = ?chunk.compressed,
                    error = %chain(&*err),
                    "reading a chunk failed",
                );
            }
            Errno::EIO
        })
    }
}

/// An error and its sources, as one line.
pub(super) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        line.push_str(": ");
        line.push_str(&err.to_string());
        source = err.source();
    }
    line
}
