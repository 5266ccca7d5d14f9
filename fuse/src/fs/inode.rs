//! Metadata operations: everything answered from the in-memory [`Index`](crate::Index), so
//! none of it waits on the network.
//!
//! Each returns `Result<_, Errno>`; `ops.rs` only turns results into replies.

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::LayerFs;
use crate::index::{Ino, Kind, Node};

/// The block size reported by `stat` and `statfs`.
pub(super) const BLOCK_SIZE: u32 = 4096;

/// One directory entry as `readdir` returns it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct DirEntry<'a> {
    pub ino: Ino,
    /// The offset of the entry after this one: where the next `readdir` resumes.
    pub next: u64,
    pub kind: FileType,
    pub name: &'a [u8],
}

/// The answer to `getxattr` and `listxattr`.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Xattr {
    /// The caller asked for the size only (a buffer of size 0).
    Size(u32),
    Data(Vec<u8>),
}

/// Filesystem totals for `statfs`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct StatFs {
    pub blocks: u64,
    pub files: u64,
}

impl LayerFs {
    pub(super) fn node(&self, ino: Ino) -> Result<&Node, Errno> {
        self.index().node(ino).ok_or(Errno::ENOENT)
    }

    pub(super) fn attr(&self, ino: Ino) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        // A directory is one block, as on the disk filesystems overlayfs usually sits on, so
        // `stat` in a container cannot tell a lazy layer from an unpacked one.
        let size = match node.kind {
            Kind::Dir => u64::from(BLOCK_SIZE),
            _ => node.size,
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: file_type(node.kind),
            perm: (node.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }

    pub(super) fn lookup(&self, parent: Ino, name: &[u8]) -> Result<FileAttr, Errno> {
        let dir = self.node(parent)?;
        if dir.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let ino = self.index().lookup(parent, name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    /// Directory `ino`'s entries from `offset` on: `.` at 0, `..` at 1, then the children in
    /// name order, so an offset stays valid for as long as the (immutable) layer is mounted.
    pub(super) fn readdir(
        &self,
        ino: Ino,
        offset: u64,
    ) -> Result<impl Iterator<Item = DirEntry<'_>>, Errno> {
        let dir = self.node(ino)?;
        if dir.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(&b"."[..], ino), (&b".."[..], dir.parent)];
        let children = dir
            .children
            .iter()
            .map(|(name, ino)| (name.as_slice(), *ino));
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(skip)
            .map(|(i, (name, ino))| DirEntry {
                ino,
                next: i as u64 + 1,
                kind: self
                    .index()
                    .node(ino)
                    .map_or(FileType::RegularFile, |n| file_type(n.kind)),
                name,
            }))
    }

    pub(super) fn readlink(&self, ino: Ino) -> Result<&[u8], Errno> {
        let node = self.node(ino)?;
        if node.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        Ok(&node.target)
    }

    pub(super) fn getxattr(&self, ino: Ino, name: &[u8], size: u32) -> Result<Xattr, Errno> {
        let node = self.node(ino)?;
        let value = node
            .xattrs
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .map(|i| &node.xattrs[i].1)
            .map_err(|_| Errno::NO_XATTR)?;
        sized(value.clone(), size)
    }

    /// The names of `ino`'s xattrs, each followed by a NUL.
    pub(super) fn listxattr(&self, ino: Ino, size: u32) -> Result<Xattr, Errno> {
        let node = self.node(ino)?;
        let mut names = Vec::new();
        for (name, _) in &node.xattrs {
            names.extend_from_slice(name);
            names.push(0);
        }
        sized(names, size)
    }

    pub(super) fn statfs(&self) -> StatFs {
        let nodes = &self.index().nodes;
        let bytes: u64 = nodes
            .iter()
            .filter(|n| n.kind == Kind::File)
            .map(|n| n.size)
            .sum();
        StatFs {
            blocks: bytes.div_ceil(u64::from(BLOCK_SIZE)),
            files: nodes.len() as u64,
        }
    }

    /// A path for `ino`, for logs: the first name of each inode up to the root.
    pub(super) fn path_of(&self, ino: Ino) -> String {
        let index = self.index();
        let mut names = Vec::new();
        let mut at = ino;
        // A bound on depth, in case of a loop; the index has none, but logs must not hang.
        for _ in 0..4096 {
            let Some(node) = index.node(at) else { break };
            if node.parent == at {
                break;
            }
            let Some(parent) = index.node(node.parent) else {
                break;
            };
            match parent.children.iter().find(|(_, child)| *child == at) {
                Some((name, _)) => names.push(String::from_utf8_lossy(name).into_owned()),
                None => names.push(format!("<inode {at}>")),
            }
            at = node.parent;
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }
}

/// The xattr size protocol: size 0 asks for the length, a buffer too small is `ERANGE`.
fn sized(value: Vec<u8>, size: u32) -> Result<Xattr, Errno> {
    let len = u32::try_from(value.len()).map_err(|_| Errno::E2BIG)?;
    if size == 0 {
        Ok(Xattr::Size(len))
    } else if len > size {
        Err(Errno::ERANGE)
    } else {
        Ok(Xattr::Data(value))
    }
}

pub(super) fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}
