//! Metainfo: what a blob is made of, piece by piece.
//!
//! A blob of `size` bytes is cut into pieces of `piece_size` bytes (the last one shorter). The
//! metainfo lists the sha256 of every piece, so a node can check each piece the moment it arrives
//! instead of waiting for the whole blob. It is made by whoever back-sources the blob from the
//! registry and kept by the tracker. Because that back-sourcing is itself piece by piece, piece
//! hashes become known one at a time: a metainfo may be *partial* (`None` for pieces not yet
//! fetched upstream), and pieces become verifiable as their hash is published. The piece size is
//! a pure function of the blob size, so every node agrees on the layout before any hash exists.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// Largest blob the swarm accepts (1 TiB): above this a size field is treated as garbage.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Most pieces a blob may have; bounds every per-blob allocation (bitfields, hash lists).
pub const MAX_PIECES: u32 = 1 << 18;
/// Smallest and largest piece sizes [`piece_size_for`] picks.
pub const MIN_PIECE_SIZE: u32 = 1 << 20;
pub const MAX_PIECE_SIZE: u32 = 16 << 20;

/// The piece size for a blob of `size` bytes: 1 MiB, doubled until the blob has at most 4096
/// pieces. Small pieces spread fast through a swarm and keep buffers small; the cap on the count
/// keeps metainfo and bitfields small for multi-GiB blobs.
pub fn piece_size_for(size: u64) -> u32 {
    let mut piece = MIN_PIECE_SIZE;
    while piece < MAX_PIECE_SIZE && size.div_ceil(u64::from(piece)) > 4096 {
        piece *= 2;
    }
    piece
}

/// Why a metainfo cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetainfoError {
    #[error("blob size {size} is over the {MAX_BLOB_SIZE} byte limit")]
    TooLarge { size: u64 },
    #[error("piece size {piece_size} is not a power of two in {MIN_PIECE_SIZE}..={MAX_PIECE_SIZE}")]
    PieceSize { piece_size: u32 },
    #[error(
        "blob of {size} bytes with {piece_size}-byte pieces has {expected} pieces, metainfo lists {listed}"
    )]
    PieceCount {
        size: u64,
        piece_size: u32,
        expected: u64,
        listed: usize,
    },
    #[error("piece {index} of {digest} already has hash {known}, refusing {offered}")]
    HashConflict {
        digest: Digest,
        index: u32,
        known: String,
        offered: String,
    },
    #[error("piece index {index} is out of range for {digest} ({count} pieces)")]
    PieceIndex {
        digest: Digest,
        index: u32,
        count: u32,
    },
}

/// How a blob of `size` bytes is cut into pieces: cheap to copy, unlike a whole [`Metainfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub piece_size: u32,
}

impl Layout {
    /// Byte range of piece `index` within the blob.
    pub fn piece_range(&self, index: u32) -> std::ops::Range<u64> {
        let start = u64::from(index) * u64::from(self.piece_size);
        start..(start + u64::from(self.piece_size)).min(self.size)
    }

    pub fn piece_len(&self, index: u32) -> usize {
        let r = self.piece_range(index);
        (r.end - r.start) as usize
    }

    /// Pieces overlapping the byte range `range` (clamped to the blob).
    pub fn pieces_for(&self, range: std::ops::Range<u64>) -> std::ops::Range<u32> {
        let end = range.end.min(self.size);
        if range.start >= end {
            return 0..0;
        }
        let ps = u64::from(self.piece_size);
        (range.start / ps) as u32..end.div_ceil(ps) as u32
    }
}

/// The layout and piece hashes of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metainfo {
    pub digest: Digest,
    pub size: u64,
    pub piece_size: u32,
    /// Hex sha256 of each piece, `None` until someone who fetched it upstream publishes it.
    pub pieces: Vec<Option<PieceHash>>,
}

/// The sha256 of one piece.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PieceHash(pub [u8; 32]);

impl PieceHash {
    pub fn of(data: &[u8]) -> Self {
        Self(*Digest::of(data).as_bytes())
    }
}

impl std::fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &hex::encode(self.0)[..12])
    }
}

impl std::fmt::Display for PieceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for PieceHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PieceHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Self(out))
    }
}

impl Metainfo {
    /// A metainfo with the layout for `size` bytes and no piece hash known yet.
    pub fn empty(digest: Digest, size: u64) -> Result<Self, MetainfoError> {
        if size > MAX_BLOB_SIZE {
            return Err(MetainfoError::TooLarge { size });
        }
        let piece_size = piece_size_for(size);
        let count = size.div_ceil(u64::from(piece_size)) as usize;
        Ok(Self {
            digest,
            size,
            piece_size,
            pieces: vec![None; count],
        })
    }

    /// The complete metainfo of `data`, hashing every piece.
    pub fn of_bytes(digest: Digest, data: &[u8]) -> Result<Self, MetainfoError> {
        let mut info = Self::empty(digest, data.len() as u64)?;
        for (slot, chunk) in info
            .pieces
            .iter_mut()
            .zip(data.chunks(info.piece_size as usize))
        {
            *slot = Some(PieceHash::of(chunk));
        }
        Ok(info)
    }

    /// Checks that the fields agree with each other. Every metainfo read from the network or disk
    /// goes through this before use, so the rest of the code can index without checks.
    pub fn validate(&self) -> Result<(), MetainfoError> {
        if self.size > MAX_BLOB_SIZE {
            return Err(MetainfoError::TooLarge { size: self.size });
        }
        let ps = self.piece_size;
        if !ps.is_power_of_two() || !(MIN_PIECE_SIZE..=MAX_PIECE_SIZE).contains(&ps) {
            return Err(MetainfoError::PieceSize { piece_size: ps });
        }
        let expected = self.size.div_ceil(u64::from(ps));
        if expected > u64::from(MAX_PIECES) || expected != self.pieces.len() as u64 {
            return Err(MetainfoError::PieceCount {
                size: self.size,
                piece_size: ps,
                expected,
                listed: self.pieces.len(),
            });
        }
        Ok(())
    }

    pub fn piece_count(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// The blob's piece layout, without the hashes.
    pub fn layout(&self) -> Layout {
        Layout {
            size: self.size,
            piece_size: self.piece_size,
        }
    }

    /// Byte range of piece `index` within the blob.
    pub fn piece_range(&self, index: u32) -> std::ops::Range<u64> {
        self.layout().piece_range(index)
    }

    pub fn piece_len(&self, index: u32) -> usize {
        self.layout().piece_len(index)
    }

    /// Pieces overlapping the byte range `range` (clamped to the blob).
    pub fn pieces_for(&self, range: std::ops::Range<u64>) -> std::ops::Range<u32> {
        self.layout().pieces_for(range)
    }

    pub fn is_complete(&self) -> bool {
        self.pieces.iter().all(Option::is_some)
    }

    pub fn known_hashes(&self) -> usize {
        self.pieces.iter().filter(|p| p.is_some()).count()
    }

    /// Records the hash of piece `index`. A hash, once known, never changes: a different one is
    /// a conflict (upstream changed under us, or someone lies) and is refused.
    pub fn set_hash(&mut self, index: u32, hash: PieceHash) -> Result<bool, MetainfoError> {
        let count = self.piece_count();
        let slot = self
            .pieces
            .get_mut(index as usize)
            .ok_or(MetainfoError::PieceIndex {
                digest: self.digest,
                index,
                count,
            })?;
        match slot {
            Some(known) if *known == hash => Ok(false),
            Some(known) => Err(MetainfoError::HashConflict {
                digest: self.digest,
                index,
                known: known.to_string(),
                offered: hash.to_string(),
            }),
            None => {
                *slot = Some(hash);
                Ok(true)
            }
        }
    }

    /// Adopts every hash `other` knows that `self` does not. Both must describe the same blob.
    pub fn merge(&mut self, other: &Metainfo) -> Result<usize, MetainfoError> {
        let mut added = 0;
        for (index, hash) in other.pieces.iter().enumerate() {
            if let Some(hash) = hash {
                added += usize::from(self.set_hash(index as u32, *hash)?);
            }
        }
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_size_grows_with_blob_size() {
        assert_eq!(piece_size_for(0), MIN_PIECE_SIZE);
        assert_eq!(piece_size_for(64 << 20), 1 << 20);
        assert_eq!(piece_size_for(4 << 30), 1 << 20);
        assert_eq!(piece_size_for((4 << 30) + 1), 2 << 20);
        assert_eq!(piece_size_for(MAX_BLOB_SIZE), MAX_PIECE_SIZE);
    }

    #[test]
    fn layout_covers_the_blob_exactly() -> anyhow::Result<()> {
        let data = vec![7u8; (3 << 20) + 5];
        let info = Metainfo::of_bytes(Digest::of(&data), &data)?;
        info.validate()?;
        assert_eq!(info.piece_count(), 4);
        assert_eq!(info.piece_range(3), (3 << 20)..((3 << 20) + 5));
        assert_eq!(info.pieces_for(0..1), 0..1);
        assert_eq!(info.pieces_for((1 << 20) - 1..(1 << 20) + 1), 0..2);
        assert_eq!(info.pieces_for(10..10), 0..0);
        assert_eq!(info.pieces_for(0..u64::MAX), 0..4);
        assert!(info.is_complete());
        let empty = Metainfo::of_bytes(Digest::of(b""), b"")?;
        empty.validate()?;
        assert_eq!(empty.piece_count(), 0);
        Ok(())
    }

    #[test]
    fn rejects_inconsistent_or_absurd_metainfo() -> anyhow::Result<()> {
        let mut info = Metainfo::empty(Digest::of(b"x"), 10 << 20)?;
        info.pieces.pop();
        assert!(matches!(
            info.validate(),
            Err(MetainfoError::PieceCount { .. })
        ));
        let mut info = Metainfo::empty(Digest::of(b"x"), 10 << 20)?;
        info.piece_size = 3 << 20;
        assert!(matches!(
            info.validate(),
            Err(MetainfoError::PieceSize { .. })
        ));
        info.piece_size = 1;
        assert!(matches!(
            info.validate(),
            Err(MetainfoError::PieceSize { .. })
        ));
        assert!(Metainfo::empty(Digest::of(b"x"), u64::MAX).is_err());
        let absurd = Metainfo {
            digest: Digest::of(b"x"),
            size: MAX_BLOB_SIZE,
            piece_size: MIN_PIECE_SIZE,
            pieces: Vec::new(),
        };
        assert!(absurd.validate().is_err());
        Ok(())
    }

    #[test]
    fn hashes_are_set_once() -> anyhow::Result<()> {
        let mut info = Metainfo::empty(Digest::of(b"x"), 3 << 20)?;
        let h = PieceHash::of(b"a");
        assert!(info.set_hash(1, h)?);
        assert!(!info.set_hash(1, h)?);
        assert!(matches!(
            info.set_hash(1, PieceHash::of(b"b")),
            Err(MetainfoError::HashConflict { .. })
        ));
        assert!(matches!(
            info.set_hash(3, h),
            Err(MetainfoError::PieceIndex { .. })
        ));
        let mut other = Metainfo::empty(Digest::of(b"x"), 3 << 20)?;
        assert_eq!(other.merge(&info)?, 1);
        assert_eq!(other.known_hashes(), 1);
        let json = serde_json::to_string(&other)?;
        let back: Metainfo = serde_json::from_str(&json)?;
        assert_eq!(back, other);
        Ok(())
    }
}
