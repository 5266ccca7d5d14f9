//! Writing one piece of a partial blob: its bytes go straight into the data file as they arrive,
//! hashed on the way, and become visible only once the hash matches and they are durable.
//!
//! A [`PieceWriter`] claims its piece: while it lives nobody else writes those bytes, so the
//! hash it computed is the hash of what the file holds. Until [`PieceWriter::commit`] adds the
//! piece, readers cannot see it ([`Blob::read_at`] checks which pieces are present), and after a
//! crash it is simply missing (only committed pieces are in the journal). So a piece never has
//! to be held in memory whole, and no unverified byte is ever visible.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::blob::partial_dir;
use super::{Blob, BlobState, Result, StoreError};
use crate::digest::Hasher;
use crate::metainfo::{MetainfoError, PieceHash};

/// What [`PieceWriter::commit`] (or [`Blob::write_piece`]) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceWrite {
    /// The piece is new and now visible.
    Added,
    /// The piece was already present, or another writer holds it (endgame duplicates land
    /// here).
    Duplicate,
    /// The piece's hash is not known yet, so it cannot be checked: the writer keeps its claim
    /// and its bytes, and the caller commits again once the metainfo has the hash.
    HashUnknown,
}

/// One piece being written; see the module docs. Dropping it before a successful commit
/// releases the piece, and whatever bytes it wrote stay invisible until a later writer
/// overwrites them.
#[derive(Debug)]
pub struct PieceWriter {
    blob: Blob,
    index: u32,
    offset: u64,
    len: usize,
    written: usize,
    hasher: Hasher,
    /// Set once every byte is written.
    hash: Option<PieceHash>,
    /// The claim is still ours (not yet released by a commit).
    claimed: bool,
}

impl Blob {
    /// Claims piece `index` for writing. `None` if the piece is present (or the blob complete)
    /// or another writer holds it.
    pub fn piece_writer(&self, index: u32) -> Result<Option<PieceWriter>> {
        let digest = self.entry.digest;
        let mut st = self.entry.lock();
        match st.status {
            BlobState::Complete => return Ok(None),
            BlobState::Discarded => return Err(StoreError::Discarded { digest }),
            BlobState::Partial => {}
        }
        let count = st.meta.piece_count();
        if index >= count {
            return Err(MetainfoError::PieceIndex {
                digest,
                index,
                count,
            }
            .into());
        }
        if st.have.get(index) || !st.writing.set(index) {
            return Ok(None);
        }
        let range = self.entry.layout.piece_range(index);
        Ok(Some(PieceWriter {
            blob: self.clone(),
            index,
            offset: range.start,
            len: (range.end - range.start) as usize,
            written: 0,
            hasher: Hasher::new(),
            hash: None,
            claimed: true,
        }))
    }

    /// Writes a whole piece held in memory and commits it (see [`PieceWriter::commit`]).
    /// `Duplicate` if the piece is present or being written.
    ///
    /// Blocking: call from `spawn_blocking` in async code.
    pub fn write_piece(&self, index: u32, data: &[u8], from_upstream: bool) -> Result<PieceWrite> {
        let Some(mut piece) = self.piece_writer(index)? else {
            return Ok(PieceWrite::Duplicate);
        };
        piece.write(data)?;
        piece.commit(from_upstream)
    }
}

impl PieceWriter {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The piece's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of the bytes written, once all of them are.
    pub fn hash(&self) -> Option<PieceHash> {
        self.hash
    }

    /// Appends the next bytes of the piece to the data file. More bytes than the piece has is
    /// an error (and the piece stays unwritten).
    ///
    /// Blocking: call from `spawn_blocking` in async code.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if !self.claimed || self.written + data.len() > self.len {
            return Err(StoreError::PieceLength {
                digest: self.blob.entry.digest,
                index: self.index,
                got: self.written + data.len(),
                expected: self.len,
            });
        }
        self.blob
            .entry
            .file
            .write_all_at(data, self.offset + self.written as u64)
            .map_err(StoreError::io("writing piece to", Path::new("<blob data>")))?;
        self.hasher.update(data);
        self.written += data.len();
        if self.written == self.len {
            let hasher = std::mem::take(&mut self.hasher);
            self.hash = Some(PieceHash(*hasher.finish().as_bytes()));
        }
        Ok(())
    }

    /// Starts the piece over (a retried download): what was written is forgotten.
    pub fn restart(&mut self) {
        self.written = 0;
        self.hasher = Hasher::new();
        self.hash = None;
    }

    /// Checks the written bytes against the piece's hash and, if they match, makes them durable
    /// and visible. `from_upstream` pieces with no known hash define it (they came from the
    /// registry; the whole-blob digest check at the end still covers them). Every outcome but
    /// [`PieceWrite::HashUnknown`] releases the piece.
    ///
    /// Blocking: call from `spawn_blocking` in async code. Completing the last piece hashes the
    /// whole blob.
    pub fn commit(&mut self, from_upstream: bool) -> Result<PieceWrite> {
        let entry = &self.blob.entry;
        let (digest, index) = (entry.digest, self.index);
        if !self.claimed {
            return Ok(PieceWrite::Duplicate);
        }
        let Some(hash) = self.hash.filter(|_| self.written == self.len) else {
            self.release();
            return Err(StoreError::PieceLength {
                digest,
                index,
                got: self.written,
                expected: self.len,
            });
        };
        {
            let mut st = entry.lock();
            let verdict: Result<Option<PieceWrite>> = match st.status {
                BlobState::Complete => Ok(Some(PieceWrite::Duplicate)),
                BlobState::Discarded => Err(StoreError::Discarded { digest }),
                BlobState::Partial => match st.meta.pieces[index as usize] {
                    Some(known) if known == hash => Ok(None),
                    Some(_) => Err(StoreError::PieceMismatch { digest, index }),
                    None if from_upstream => st
                        .meta
                        .set_hash(index, hash)
                        .map(|_| None)
                        .map_err(StoreError::from),
                    // The claim stays: nobody may change these bytes before they are checked.
                    None => return Ok(PieceWrite::HashUnknown),
                },
            };
            match verdict {
                Ok(None) => {}
                Ok(Some(done)) => {
                    st.writing.clear(index);
                    self.claimed = false;
                    return Ok(done);
                }
                Err(e) => {
                    st.writing.clear(index);
                    self.claimed = false;
                    return Err(e);
                }
            }
        }
        let synced = entry
            .file
            .sync_data()
            .map_err(StoreError::io("syncing", Path::new("<blob data>")));
        let mut st = entry.lock();
        if let Err(e) = synced {
            st.writing.clear(index);
            self.claimed = false;
            return Err(e);
        }
        if st.status != BlobState::Partial || st.have.get(index) {
            st.writing.clear(index);
            self.claimed = false;
            return Ok(PieceWrite::Duplicate);
        }
        if st.have.count() + 1 == st.have.len() {
            // The last piece: it stays claimed and unseen until the whole blob has matched its
            // digest. Piece hashes of bytes fetched upstream were computed from those bytes, so
            // only the digest vouches for them, and a stream of the blob (the mirror's) must
            // never complete with bytes that fail it.
            drop(st);
            let finished = self.blob.finish(index);
            self.release();
            return finished.map(|()| PieceWrite::Added);
        }
        st.writing.clear(index);
        self.claimed = false;
        st.have.set(index);
        if let Some(journal) = st.journal.as_mut() {
            let res = journal
                .write_all(&index.to_le_bytes())
                .and_then(|()| journal.sync_data());
            if let Err(source) = res {
                st.have.clear(index);
                return Err(StoreError::Io {
                    action: "journaling piece in",
                    path: partial_dir(self.blob.store.root(), &digest),
                    source,
                });
            }
        }
        drop(st);
        entry.changed.send_modify(|g| *g += 1);
        entry.advance_prefix();
        Ok(PieceWrite::Added)
    }

    fn release(&mut self) {
        if std::mem::take(&mut self.claimed) {
            self.blob.entry.lock().writing.clear(self.index);
        }
    }
}

impl Drop for PieceWriter {
    fn drop(&mut self) {
        self.release();
    }
}
