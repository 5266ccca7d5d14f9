//! The `fuser::Filesystem` impl: a thin edge that decodes each request, calls the matching
//! `LayerFs` function and turns its `Result` into the reply. No logic lives here.
//!
//! fuser calls these from every session thread at once, so a `read` waiting on a chunk blocks
//! only the thread it arrived on.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, warn};

use super::LayerFs;
use super::inode::{BLOCK_SIZE, Xattr};
use super::passthrough::PASSTHROUGH_FH;
use crate::index::Kind;

/// Longest file name, as `statfs` reports it.
const NAME_MAX: u32 = 255;

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Directories never change: lookups in one may run in parallel, symlinks may be cached.
        let wanted = InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_CACHE_SYMLINKS;
        let _ = config.add_capabilities(wanted & config.capabilities());
        if self.passthrough.is_some() {
            // Stack depth 1: copies must sit on a plain filesystem, and overlayfs may still
            // stack on this one.
            let enabled = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !enabled {
                warn!("the kernel does not offer FUSE passthrough; reading through FUSE");
                self.passthrough = None;
            }
        }
        debug!(abi = %config.kernel_abi(), passthrough = self.passthrough.is_some(), "FUSE init");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup(parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
            Err(errno) => reply.error(errno),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Ok(attr) => reply.attr(&self.ttl, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.readlink(ino.0) {
            Ok(target) => reply.data(target),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let node = match self.node(ino.0) {
            Ok(node) if node.kind == Kind::Dir => return reply.error(Errno::EISDIR),
            Ok(node) => node,
            Err(errno) => return reply.error(errno),
        };
        let reply = match &self.passthrough {
            Some(passthrough) => match passthrough.open(self, ino.0, reply) {
                Ok(()) => return,
                Err(reply) => reply,
            },
            None => reply,
        };
        if let Some(copies) = &self.copies
            && node.kind == Kind::File
        {
            // Later reads find the copy, made in the background.
            copies.for_open(&*self.data, &self.cache, ino.0, node, false);
        }
        // The bytes never change: keep the page cache across opens. (Opening copies with
        // FOPEN_DIRECT_IO instead saves the page cache's copy of each byte: 1 MiB reads got
        // faster, but 4 KiB reads, stdio's, were 3x slower with a round trip each; BENCHMARKS.md.)
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read(ino.0, offset, size) {
            Ok(bytes) => reply.data(&bytes),
            Err(errno) => reply.error(errno),
        }
    }

    /// Nothing is ever written, so there is nothing to flush on close. `ENOSYS` (not `Ok`)
    /// tells the kernel so for good: it stops sending `FLUSH`, one round trip less per `close`.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(passthrough) = &self.passthrough {
            match fh {
                FileHandle(PASSTHROUGH_FH) => passthrough.release(ino.0),
                _ => passthrough.release_cached(ino.0),
            }
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino.0) {
            Ok(node) if node.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(errno) => reply.error(errno),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.readdir(ino.0, offset) {
            Ok(entries) => {
                for entry in entries {
                    let name = OsStr::from_bytes(entry.name);
                    if reply.add(INodeNo(entry.ino), entry.next, entry.kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stat = self.statfs();
        reply.statfs(
            stat.blocks,
            0,
            0,
            stat.files,
            0,
            BLOCK_SIZE,
            NAME_MAX,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(self.getxattr(ino.0, name.as_bytes(), size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(self.listxattr(ino.0, size), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.node(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }
}

fn reply_xattr(result: Result<Xattr, Errno>, reply: ReplyXattr) {
    match result {
        Ok(Xattr::Size(size)) => reply.size(size),
        Ok(Xattr::Data(data)) => reply.data(&data),
        Err(errno) => reply.error(errno),
    }
}
