//! FUSE passthrough: a file with a verified local copy ([`super::copies`]) is registered with
//! the kernel as the backing file of its opens, and from then on `read`, `mmap` and `splice` on
//! it go straight to the copy's filesystem, without a request to us.
//!
//! A small file's copy is made before its first open returns; a larger one is copied by the
//! copy thread while this open reads through FUSE, so no reader waits for a whole file to be
//! copied, and a later open passes through. One backing id per inode is shared by all of its
//! open handles (the kernel requires it) and closed when the last one is released.
//!
//! Any refusal falls back to ordinary reads. A kernel refusal (no passthrough support, no
//! `CAP_SYS_ADMIN`, a copy on a stacked filesystem) is remembered for the whole mount.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use tracing::warn;

use super::{Counters, LayerFs};
use crate::cache::lock;
use crate::index::{Ino, Kind};

/// The file handle of passthrough opens (ordinary opens use 0), so `release` knows which is
/// which.
pub(super) const PASSTHROUGH_FH: u64 = 1;

#[derive(Debug, Default)]
pub(super) struct Passthrough {
    refused: AtomicBool,
    files: Mutex<HashMap<Ino, Arc<Mutex<Opens>>>>,
}

/// One file's open handles.
#[derive(Debug, Default)]
struct Opens {
    /// Registered with the kernel while the file has passthrough opens.
    backing: Option<BackingId>,
    /// Passthrough opens not yet released.
    passthrough: u32,
    /// Ordinary (cached) opens not yet released: while there are any, no passthrough.
    cached: u32,
}

impl Passthrough {
    /// Opens file `ino` with passthrough if it can: `Ok` once replied, else the reply back for
    /// an ordinary open (counted as one: `release_cached` must follow).
    pub(super) fn open(&self, fs: &LayerFs, ino: Ino, reply: ReplyOpen) -> Result<(), ReplyOpen> {
        let slot = lock(&self.files).entry(ino).or_default().clone();
        // The kernel refuses a passthrough open of an inode that has ordinary (cached) opens,
        // and the reverse: every open of a file is decided, and counted, under its slot's lock.
        let mut opens = lock(&slot);
        let cached = |mut opens: std::sync::MutexGuard<'_, Opens>, reply| {
            opens.cached += 1;
            Err(reply)
        };
        if self.refused.load(Ordering::Relaxed) {
            return cached(opens, reply);
        }
        let (Ok(node), Some(copies)) = (fs.node(ino), &fs.copies) else {
            return cached(opens, reply);
        };
        if node.kind != Kind::File || node.size == 0 {
            return cached(opens, reply);
        }
        if opens.backing.is_none() {
            if opens.cached > 0 {
                return cached(opens, reply);
            }
            let Some(copy) = copies.for_open(&*fs.data, &fs.cache, ino, node, true) else {
                return cached(opens, reply);
            };
            match reply.open_backing(copy.file()) {
                Ok(id) => opens.backing = Some(id),
                Err(err) => {
                    if !self.refused.swap(true, Ordering::Relaxed) {
                        warn!(%err, "the kernel refused a passthrough backing file; reading through FUSE from now on");
                    }
                    return cached(opens, reply);
                }
            }
        }
        let Some(backing) = &opens.backing else {
            return cached(opens, reply);
        };
        // Counted before replying: once the kernel has the reply, the caller may look.
        Counters::add(&fs.counters.passthrough_opens, 1);
        reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), backing);
        opens.passthrough += 1;
        Ok(())
    }

    /// An ordinary handle of `ino` was closed.
    pub(super) fn release_cached(&self, ino: Ino) {
        if let Some(slot) = lock(&self.files).get(&ino).cloned() {
            let mut opens = lock(&slot);
            opens.cached = opens.cached.saturating_sub(1);
        }
    }

    /// A passthrough handle of `ino` was closed.
    pub(super) fn release(&self, ino: Ino) {
        let Some(slot) = lock(&self.files).get(&ino).cloned() else {
            return;
        };
        let mut opens = lock(&slot);
        opens.passthrough = opens.passthrough.saturating_sub(1);
        if opens.passthrough == 0 {
            opens.backing = None;
        }
    }
}
