//! [`Index`]: a layer's file tree, built from its TOC and checked once, so the filesystem can
//! answer lookups and reads without ever re-validating input.
//!
//! Inode numbers are positions in one vector (`ROOT` is 1). Hard links share an inode. Whiteouts
//! are already translated the way overlayfs expects of a lower layer: `.wh.NAME` becomes a
//! character device 0:0 named `NAME`, and `.wh..wh..opq` becomes the xattr
//! `trusted.overlay.opaque = y` (and `user.overlay.opaque = y`) on its directory.

use std::time::SystemTime;

/// An inode number, as FUSE sees it.
pub type Ino = u64;

/// The root directory's inode.
pub const ROOT: Ino = 1;

/// What kind of file a [`Node`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One inode.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits, with setuid/setgid/sticky (`0o7777`); the file type is `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// File size; symlink target length for symlinks; 0 otherwise.
    pub size: u64,
    pub mtime: SystemTime,
    /// Names pointing at this inode (plus subdirectories' `..` for directories).
    pub nlink: u32,
    /// Device number (`makedev(major, minor)`) for device nodes.
    pub rdev: u32,
    /// A symlink's target.
    pub target: Vec<u8>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The directory holding this inode's first name (the root is its own parent).
    pub parent: Ino,
    /// A directory's entries, sorted by name (without `.` and `..`).
    pub children: Vec<(Vec<u8>, Ino)>,
    /// A regular file's content, in order, covering `0..size` without gaps.
    pub chunks: Vec<Chunk>,
}

/// One compressed chunk of a regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in the file.
    pub file_offset: u64,
    /// Its uncompressed length.
    pub size: u64,
    /// The blob range holding the gzip member the chunk starts in: from the member's first byte
    /// to the next member that starts later (or the TOC). Reading and inflating this range, then
    /// skipping `inner_offset` bytes, yields the chunk.
    pub compressed: std::ops::Range<u64>,
    /// Bytes to skip in the inflated member before the chunk begins (0 for most eStargz).
    pub inner_offset: u64,
    /// sha256 of the uncompressed chunk (`chunkDigest`).
    pub digest: [u8; 32],
}

/// A layer's checked file tree.
#[derive(Clone, Debug)]
pub struct Index {
    /// `nodes[ino - 1]`.
    pub nodes: Vec<Node>,
    /// Where the TOC's gzip member starts in the blob.
    pub toc_offset: u64,
    /// The blob range to prefetch at mount: `0..landmark` when there is a `.prefetch.landmark`,
    /// `None` with `.no.prefetch.landmark` or no landmark.
    pub prefetch: Option<std::ops::Range<u64>>,
}

impl Index {
    /// The inode `ino`, if it exists.
    pub fn node(&self, ino: Ino) -> Option<&Node> {
        usize::try_from(ino)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.nodes.get(i))
    }

    /// The inode named `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let dir = self.node(parent)?;
        dir.children
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| dir.children[i].1)
    }
}
