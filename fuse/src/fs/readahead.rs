//! Read-ahead across chunks: when a file is read sequentially, the next chunk is fetched,
//! inflated and verified on a helper thread while the reader is still in this one.
//!
//! The kernel reads ahead 128 KiB at a time, well inside one 4 MiB chunk; without this, every
//! chunk boundary stalls the reader for a whole fetch + inflate + sha256. The helper fills the
//! same single-flight cache, so a reader reaching the chunk early simply joins the fetch.

use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread;

use tracing::debug;

use super::{BoxError, LayerData};
use crate::cache::{ChunkCache, ChunkKey};
use crate::index::{Chunk, Ino};

/// Chunks queued for the helper at most; more are dropped (the reader fetches them itself).
const QUEUE: usize = 4;
/// Files whose last read end is remembered.
const TRACKED_FILES: usize = 4096;

/// Sequential-read detection and the helper thread's queue.
#[derive(Debug)]
pub(super) struct ReadAhead {
    queue: SyncSender<Chunk>,
    /// Where the last read of each file ended.
    last_end: Mutex<HashMap<Ino, u64>>,
}

impl ReadAhead {
    /// Starts the helper thread; it ends when the filesystem is dropped.
    pub(super) fn start(data: Arc<dyn LayerData>, cache: Arc<ChunkCache>) -> std::io::Result<Self> {
        let (queue, chunks) = sync_channel::<Chunk>(QUEUE);
        thread::Builder::new()
            .name("shoal-readahead".into())
            .spawn(move || {
                for chunk in chunks {
                    let fetched =
                        cache.get_or_fetch(ChunkKey::from(&chunk), || fetch_chunk(&*data, &chunk));
                    if fetched.is_err() {
                        // The reader that needs it will fetch it again and report the error.
                        debug!(
                            file_offset = chunk.file_offset,
                            "read-ahead of a chunk failed"
                        );
                    }
                }
            })?;
        Ok(Self {
            queue,
            last_end: Mutex::new(HashMap::new()),
        })
    }

    /// Notes a read of `offset..end` in file `ino`; if it continues the previous one, queues
    /// the chunk after the one `end` falls in.
    pub(super) fn after_read(
        &self,
        ino: Ino,
        chunks: &[Chunk],
        offset: u64,
        end: u64,
        cache: &ChunkCache,
    ) {
        let sequential = {
            let mut last = self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            if last.len() >= TRACKED_FILES && !last.contains_key(&ino) {
                last.clear();
            }
            last.insert(ino, end) == Some(offset)
        };
        if !sequential {
            return;
        }
        let current = chunks.partition_point(|c| c.file_offset + c.size <= end.saturating_sub(1));
        let Some(next) = chunks.get(current + 1) else {
            return;
        };
        if cache.has(&ChunkKey::from(next)) {
            return;
        }
        match self.queue.try_send(next.clone()) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// One chunk's bytes through `data`, checked to be exactly as long as the TOC says.
pub(super) fn fetch_chunk(data: &dyn LayerData, chunk: &Chunk) -> Result<Vec<u8>, BoxError> {
    let bytes = data.read_chunk(chunk)?;
    if bytes.len() as u64 != chunk.size {
        return Err(format!(
            "chunk inflated to {} bytes, the TOC says {}",
            bytes.len(),
            chunk.size
        )
        .into());
    }
    Ok(bytes)
}
