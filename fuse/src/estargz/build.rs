//! Checking a TOC and turning it into an [`Index`]: the one place where untrusted TOC entries
//! become a file tree, so everything the filesystem relies on is established here.
//!
//! Decisions, where the format leaves room:
//! - Names are normalized (`./a//b/` → `a/b`; `.` components dropped); `..` components, NUL
//!   bytes and the empty string are refused. `./` and `/` name the root, which must be a dir.
//! - A missing parent directory is created implicitly (mode 0755, owned by root), with the
//!   time the index is built as its mtime, as `tar -x` gives it the time of extraction.
//! - A second entry for a name already seen is refused, except a directory over a directory,
//!   which updates its metadata (as `tar -x` does). Converters (ours, stargz-snapshotter's)
//!   never emit other duplicates, and replacing inodes would leave hard links dangling.
//! - A hard link must name an earlier non-directory entry: no dangling, self or looping links.
//! - `.wh.NAME` becomes a character device 0:0 named `NAME` with mode 0; `.wh..wh..opq` marks
//!   its directory opaque; the landmark files only set [`Index::prefetch`]. None of them appears.
//! - `rdev` is the kernel's 32-bit `new_encode_dev(major, minor)`
//!   (`minor & 0xff | major << 8 | (minor & !0xff) << 12`), what FUSE hands to the kernel;
//!   devices beyond 12-bit majors or 20-bit minors are refused.
//! - Chunks of a file must cover `0..size` in order, without gaps or overlaps. A chunk's
//!   compressed range runs from its member's offset to the next larger offset of any entry
//!   (or the TOC), the same bound as the reference reader's `NextOffset`.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use super::toc::{self, TocEntry};
use super::{
    Error, Limits, MAX_CHUNK_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Problem, parse_sha256,
};
use crate::index::{Chunk, Index, Ino, Kind, Node, ROOT};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// An extended attribute: name, value.
type Xattr = (Vec<u8>, Vec<u8>);

const OPAQUE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];

/// Decodes TOC JSON and builds the layer's [`Index`]. `toc_offset` is where the TOC member
/// starts in the blob: every content offset must lie before it.
///
/// This is the whole trust boundary for TOC content (and the fuzz target's entry point).
pub fn parse_toc(json: &[u8], toc_offset: u64, limits: &Limits) -> Result<Index, Error> {
    let toc = toc::decode(json, limits)?;
    if toc.version != 1 {
        return Err(Error::TocVersion(toc.version));
    }
    build_index(&toc.entries, toc_offset, limits)
}

/// A chunk as the TOC states it, before the file's chunks are checked together.
struct PendingChunk {
    file_offset: u64,
    /// 0: to the end of the file.
    size: u64,
    offset: u64,
    inner_offset: u64,
    digest: Option<[u8; 32]>,
}

/// The regular file whose chunks are being collected.
struct OpenFile {
    name: String,
    /// `None` for a landmark, whose content is not part of the tree.
    ino: Option<Ino>,
    size: u64,
    digest: Option<[u8; 32]>,
    chunks: Vec<PendingChunk>,
}

struct Builder {
    nodes: Vec<Node>,
    max_nodes: usize,
    /// `(directory, name)` → inode: walking a path costs its length, however deep it is.
    names: HashMap<(Ino, String), Ino>,
    opaque: HashSet<Ino>,
    /// Every distinct member offset named by an entry, sorted.
    offsets: Vec<u64>,
    toc_offset: u64,
    prefetch_landmark: Option<u64>,
    open: Option<OpenFile>,
}

fn build_index(entries: &[TocEntry], toc_offset: u64, limits: &Limits) -> Result<Index, Error> {
    let mut offsets = Vec::new();
    for e in entries {
        if e.offset != 0 {
            let offset = non_negative(&e.name, "offset", e.offset)?;
            if offset >= toc_offset {
                return Err(Error::entry(
                    &e.name,
                    Problem::OffsetBeyondToc {
                        offset,
                        toc: toc_offset,
                    },
                ));
            }
            offsets.push(offset);
        }
    }
    offsets.sort_unstable();
    offsets.dedup();

    let mut b = Builder {
        nodes: vec![new_node(Kind::Dir, 0o755, ROOT)],
        // Implicit directories count too: a few bytes of TOC can name a deep path.
        max_nodes: limits.max_entries,
        names: HashMap::new(),
        opaque: HashSet::new(),
        offsets,
        toc_offset,
        prefetch_landmark: None,
        open: None,
    };
    for e in entries {
        if e.kind == "chunk" {
            b.add_chunk(e)?;
        } else {
            b.finish_file()?;
            b.add_entry(e)?;
        }
    }
    b.finish_file()?;
    Ok(b.finish())
}

impl Builder {
    fn add_entry(&mut self, e: &TocEntry) -> Result<(), Error> {
        let path = normalize(&e.name).map_err(|p| Error::entry(&e.name, p))?;
        let kind = match e.kind.as_str() {
            "dir" => Kind::Dir,
            "reg" | "hardlink" => Kind::File,
            "symlink" => Kind::Symlink,
            "char" => Kind::CharDevice,
            "block" => Kind::BlockDevice,
            "fifo" => Kind::Fifo,
            other => {
                return Err(Error::entry(
                    &e.name,
                    Problem::UnknownType(other.to_owned()),
                ));
            }
        };
        if path.is_empty() {
            if kind != Kind::Dir || e.kind != "dir" {
                return Err(Error::entry(&e.name, Problem::RootNotDir));
            }
            return self.set_dir_metadata(ROOT, e);
        }
        let (dir, base) = path.rsplit_once('/').unwrap_or(("", path.as_str()));

        if dir.is_empty() && (base == PREFETCH_LANDMARK || base == NO_PREFETCH_LANDMARK) {
            if e.kind != "reg" {
                return Err(Error::entry(&e.name, Problem::BadLandmark));
            }
            return self.open_file(e, None, base == PREFETCH_LANDMARK);
        }
        let parent = self.dir(dir, &e.name)?;
        if base == OPAQUE_WHITEOUT {
            self.opaque.insert(parent);
            return Ok(());
        }
        let (base, whiteout) = match base.strip_prefix(WHITEOUT_PREFIX) {
            Some("") => return Err(Error::entry(&e.name, Problem::EmptyName)),
            Some(hidden) => (hidden, true),
            None => (base, false),
        };

        if let Some(existing) = self.names.get(&(parent, base.to_owned())).copied() {
            let is_dir = self.nodes[ino_index(existing)].kind == Kind::Dir;
            if is_dir && e.kind == "dir" && !whiteout {
                return self.set_dir_metadata(existing, e);
            }
            return Err(Error::entry(&e.name, Problem::Duplicate));
        }

        if e.kind == "hardlink" && !whiteout {
            let target = normalize(&e.link_name).map_err(|p| Error::entry(&e.name, p))?;
            let Some(ino) = self.resolve(&target) else {
                return Err(Error::entry(
                    &e.name,
                    Problem::DanglingLink(e.link_name.clone()),
                ));
            };
            let node = &mut self.nodes[ino_index(ino)];
            if node.kind == Kind::Dir {
                return Err(Error::entry(
                    &e.name,
                    Problem::LinkToDir(e.link_name.clone()),
                ));
            }
            node.nlink = node.nlink.saturating_add(1);
            self.link(parent, base, ino);
            return Ok(());
        }

        let mut node = new_node(kind, 0, parent);
        node.nlink = 1;
        node.uid = id(&e.name, "uid", e.uid)?;
        node.gid = id(&e.name, "gid", e.gid)?;
        node.mtime = mtime(e)?;
        node.xattrs = xattrs(e)?;
        if whiteout {
            // What overlayfs expects of a lower layer's whiteout.
            node.kind = Kind::CharDevice;
            node.xattrs.clear();
        } else {
            node.mode = mode(e)?;
            match kind {
                Kind::Symlink => {
                    if e.link_name.is_empty() {
                        return Err(Error::entry(&e.name, Problem::EmptySymlink));
                    }
                    node.target = e.link_name.as_bytes().to_vec();
                    node.size = node.target.len() as u64;
                }
                Kind::CharDevice | Kind::BlockDevice => node.rdev = rdev(e)?,
                Kind::Dir | Kind::File | Kind::Fifo => {}
            }
        }
        let ino = self.push(node)?;
        self.link(parent, base, ino);
        if kind == Kind::File && !whiteout {
            self.open_file(e, Some(ino), false)?;
        }
        Ok(())
    }

    /// Starts collecting a regular file's chunks, from its own entry's fields.
    fn open_file(&mut self, e: &TocEntry, ino: Option<Ino>, prefetch: bool) -> Result<(), Error> {
        let size = non_negative(&e.name, "size", e.size)?;
        let digest = optional_digest(&e.name, "digest", &e.digest)?;
        let mut file = OpenFile {
            name: e.name.clone(),
            ino,
            size,
            digest,
            chunks: Vec::new(),
        };
        if size > 0 {
            if e.offset == 0 {
                return Err(Error::entry(&e.name, Problem::NoOffset { size }));
            }
            file.chunks.push(pending_chunk(e)?);
        }
        if prefetch {
            self.prefetch_landmark = Some(non_negative(&e.name, "offset", e.offset)?);
        }
        self.open = Some(file);
        Ok(())
    }

    fn add_chunk(&mut self, e: &TocEntry) -> Result<(), Error> {
        let Some(file) = &mut self.open else {
            return Err(Error::entry(&e.name, Problem::OrphanChunk));
        };
        if !e.name.is_empty() && normalize(&e.name).ok() != normalize(&file.name).ok() {
            return Err(Error::entry(
                &file.name,
                Problem::ChunkNameMismatch(e.name.clone()),
            ));
        }
        if e.offset == 0 {
            let size = file.size;
            return Err(Error::entry(&file.name, Problem::NoOffset { size }));
        }
        let chunk = pending_chunk(e).map_err(|err| match err {
            Error::Entry { problem, .. } => Error::entry(&file.name, problem),
            other => other,
        })?;
        file.chunks.push(chunk);
        Ok(())
    }

    /// Checks the open file's chunks together and stores them on its inode.
    fn finish_file(&mut self) -> Result<(), Error> {
        let Some(file) = self.open.take() else {
            return Ok(());
        };
        let single = file.chunks.len() == 1;
        let mut chunks = Vec::with_capacity(file.chunks.len());
        let mut expected = 0u64;
        for c in file.chunks {
            let fail = |problem| Error::entry(&file.name, problem);
            if c.file_offset != expected {
                return Err(fail(Problem::ChunkNotContiguous {
                    expected,
                    found: c.file_offset,
                }));
            }
            let size = match c.size {
                0 => file.size.saturating_sub(c.file_offset),
                n => n,
            };
            if size == 0 {
                return Err(fail(Problem::EmptyChunk {
                    offset: c.file_offset,
                }));
            }
            if size > MAX_CHUNK_SIZE {
                return Err(fail(Problem::ChunkTooLarge { size }));
            }
            expected = c
                .file_offset
                .checked_add(size)
                .ok_or(fail(Problem::ChunksShort {
                    covered: u64::MAX,
                    size: file.size,
                }))?;
            if expected > file.size {
                return Err(fail(Problem::ChunksShort {
                    covered: expected,
                    size: file.size,
                }));
            }
            // Without chunkDigest, an unchunked file's whole-file digest is its chunk's.
            let digest = match (c.digest, single) {
                (Some(d), _) => d,
                (None, true) => file
                    .digest
                    .ok_or(fail(Problem::NoChunkDigest { offset: 0 }))?,
                (None, false) => {
                    return Err(fail(Problem::NoChunkDigest {
                        offset: c.file_offset,
                    }));
                }
            };
            chunks.push(Chunk {
                file_offset: c.file_offset,
                size,
                compressed: c.offset..self.next_offset(c.offset),
                inner_offset: c.inner_offset,
                digest,
            });
        }
        if expected != file.size {
            let problem = Problem::ChunksShort {
                covered: expected,
                size: file.size,
            };
            return Err(Error::entry(&file.name, problem));
        }
        if let Some(ino) = file.ino {
            let node = &mut self.nodes[ino_index(ino)];
            node.size = file.size;
            node.chunks = chunks;
        }
        Ok(())
    }

    /// The start of the first member after the one at `offset`, or the TOC.
    fn next_offset(&self, offset: u64) -> u64 {
        let i = self.offsets.partition_point(|&o| o <= offset);
        self.offsets.get(i).copied().unwrap_or(self.toc_offset)
    }

    /// The inode at the normalized `path`, if there is one.
    fn resolve(&self, path: &str) -> Option<Ino> {
        if path.is_empty() {
            return Some(ROOT);
        }
        path.split('/').try_fold(ROOT, |dir, part| {
            self.names.get(&(dir, part.to_owned())).copied()
        })
    }

    /// The directory at the normalized `path`, created with its missing ancestors if the TOC
    /// has not named it.
    fn dir(&mut self, path: &str, entry: &str) -> Result<Ino, Error> {
        let mut dir = ROOT;
        if path.is_empty() {
            return Ok(dir);
        }
        let mut end = 0;
        for part in path.split('/') {
            end += part.len();
            dir = match self.names.get(&(dir, part.to_owned())).copied() {
                Some(ino) if self.nodes[ino_index(ino)].kind == Kind::Dir => ino,
                Some(_) => {
                    return Err(Error::entry(
                        entry,
                        Problem::ParentNotDir(path[..end].to_owned()),
                    ));
                }
                None => {
                    let ino = self.push(new_node(Kind::Dir, 0o755, dir))?;
                    self.link(dir, part, ino);
                    ino
                }
            };
            end += 1;
        }
        Ok(dir)
    }

    fn push(&mut self, node: Node) -> Result<Ino, Error> {
        if self.nodes.len() >= self.max_nodes {
            return Err(Error::TooManyEntries {
                limit: self.max_nodes,
            });
        }
        self.nodes.push(node);
        Ok(self.nodes.len() as Ino)
    }

    fn link(&mut self, parent: Ino, base: &str, ino: Ino) {
        let dir = &mut self.nodes[ino_index(parent)];
        dir.children.push((base.as_bytes().to_vec(), ino));
        self.names.insert((parent, base.to_owned()), ino);
    }

    fn set_dir_metadata(&mut self, ino: Ino, e: &TocEntry) -> Result<(), Error> {
        let (mode, uid, gid) = (
            mode(e)?,
            id(&e.name, "uid", e.uid)?,
            id(&e.name, "gid", e.gid)?,
        );
        let (mtime, xattrs) = (mtime(e)?, xattrs(e)?);
        let node = &mut self.nodes[ino_index(ino)];
        (node.mode, node.uid, node.gid, node.mtime, node.xattrs) = (mode, uid, gid, mtime, xattrs);
        Ok(())
    }

    fn finish(mut self) -> Index {
        for ino in &self.opaque {
            let xattrs = &mut self.nodes[ino_index(*ino)].xattrs;
            xattrs.retain(|(name, _)| !OPAQUE_XATTRS.contains(&name.as_slice()));
            xattrs.extend(OPAQUE_XATTRS.iter().map(|n| (n.to_vec(), b"y".to_vec())));
            xattrs.sort();
        }
        let subdirs: Vec<u32> = (self.nodes.iter())
            .map(|n| {
                let dirs = n.children.iter().filter(|(_, c)| {
                    self.nodes
                        .get(ino_index(*c))
                        .is_some_and(|c| c.kind == Kind::Dir)
                });
                u32::try_from(dirs.count()).unwrap_or(u32::MAX)
            })
            .collect();
        for (node, subdirs) in self.nodes.iter_mut().zip(subdirs) {
            node.children.sort();
            if node.kind == Kind::Dir {
                node.nlink = subdirs.saturating_add(2);
            }
        }
        Index {
            nodes: self.nodes,
            toc_offset: self.toc_offset,
            prefetch: self.prefetch_landmark.map(|end| 0..end),
        }
    }
}

fn ino_index(ino: Ino) -> usize {
    // Inodes are only ever made as `nodes.len() + 1`, so this cannot wrap.
    (ino - 1) as usize
}

fn new_node(kind: Kind, mode: u32, parent: Ino) -> Node {
    Node {
        kind,
        mode,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: SystemTime::now(),
        nlink: 0,
        rdev: 0,
        target: Vec::new(),
        xattrs: Vec::new(),
        parent,
        children: Vec::new(),
        chunks: Vec::new(),
    }
}

/// `./a//b/./c/` → `a/b/c`; `./` → `` (the root).
pub(super) fn normalize(name: &str) -> Result<String, Problem> {
    if name.is_empty() {
        return Err(Problem::EmptyName);
    }
    if name.contains('\0') {
        return Err(Problem::NulInName);
    }
    let mut out = String::with_capacity(name.len());
    for part in name.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(Problem::DotDot);
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(part);
    }
    Ok(out)
}

fn non_negative(name: &str, field: &'static str, value: i64) -> Result<u64, Error> {
    u64::try_from(value).map_err(|_| Error::entry(name, Problem::OutOfRange { field, value }))
}

fn id(name: &str, field: &'static str, value: i64) -> Result<u32, Error> {
    u32::try_from(value).map_err(|_| Error::entry(name, Problem::OutOfRange { field, value }))
}

fn mode(e: &TocEntry) -> Result<u32, Error> {
    let mode = non_negative(&e.name, "mode", e.mode)?;
    Ok((mode & 0o7777) as u32)
}

fn mtime(e: &TocEntry) -> Result<std::time::SystemTime, Error> {
    if e.mod_time.is_empty() {
        return Ok(UNIX_EPOCH);
    }
    toc::parse_rfc3339(&e.mod_time)
        .ok_or_else(|| Error::entry(&e.name, Problem::BadModTime(e.mod_time.clone())))
}

fn xattrs(e: &TocEntry) -> Result<Vec<Xattr>, Error> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // A BTreeMap: already sorted by name.
    (e.xattrs.iter())
        .map(|(name, value)| match b64.decode(value) {
            Ok(value) => Ok((name.as_bytes().to_vec(), value)),
            Err(_) => Err(Error::entry(&e.name, Problem::BadXattr(name.clone()))),
        })
        .collect()
}

fn rdev(e: &TocEntry) -> Result<u32, Error> {
    let bad = || {
        Error::entry(
            &e.name,
            Problem::BadDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
        )
    };
    let major = u32::try_from(e.dev_major)
        .ok()
        .filter(|m| *m < 1 << 12)
        .ok_or_else(bad)?;
    let minor = u32::try_from(e.dev_minor)
        .ok()
        .filter(|m| *m < 1 << 20)
        .ok_or_else(bad)?;
    Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

fn optional_digest(
    name: &str,
    field: &'static str,
    value: &str,
) -> Result<Option<[u8; 32]>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    parse_sha256(value).map(Some).ok_or_else(|| {
        Error::entry(
            name,
            Problem::BadDigest {
                field,
                value: value.to_owned(),
            },
        )
    })
}

fn pending_chunk(e: &TocEntry) -> Result<PendingChunk, Error> {
    Ok(PendingChunk {
        file_offset: non_negative(&e.name, "chunkOffset", e.chunk_offset)?,
        size: non_negative(&e.name, "chunkSize", e.chunk_size)?,
        offset: non_negative(&e.name, "offset", e.offset)?,
        inner_offset: non_negative(&e.name, "innerOffset", e.inner_offset)?,
        digest: optional_digest(&e.name, "chunkDigest", &e.chunk_digest)?,
    })
}
