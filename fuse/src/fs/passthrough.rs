//! FUSE passthrough: once every chunk of a file is local, the kernel can read it without us.
//!
//! On such a file's first open, its chunks are read through the layer (so each is verified
//! against its `chunkDigest`) into `passthrough_dir/<ino>`, written under a temporary name and
//! renamed into place. The copy is registered with the kernel as the open's backing file, and
//! from then on `read`, `mmap` and `splice` on it go straight to the copy's filesystem.
//!
//! Copies are made once per mount and never trusted across mounts: the directory belongs to
//! one mount, and a leftover file is simply overwritten. One backing id per inode is shared by
//! all of its open handles (the kernel requires it) and closed when the last one is released.
//!
//! Any refusal falls back to ordinary reads. A kernel refusal (no passthrough support, no
//! `CAP_SYS_ADMIN`, a copy on a stacked filesystem) is remembered for the whole mount; a failed
//! copy is remembered for its file.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};
use tracing::{debug, warn};

use super::read::chain;
use super::{Counters, LayerFs};
use crate::cache::lock;
use crate::index::{Ino, Kind};

/// The file handle of passthrough opens (ordinary opens use 0), so `release` knows which is
/// which.
pub(super) const PASSTHROUGH_FH: u64 = 1;

#[derive(Debug)]
pub(super) struct Passthrough {
    dir: PathBuf,
    refused: AtomicBool,
    files: Mutex<HashMap<Ino, Arc<Mutex<Slot>>>>,
}

/// One file's passthrough state.
#[derive(Debug, Default)]
struct Slot {
    /// The verified copy, once written.
    copy: Option<PathBuf>,
    /// Copying failed: this file is read through FUSE for the rest of the mount.
    failed: bool,
    /// Registered with the kernel while the file has passthrough opens.
    backing: Option<BackingId>,
    opens: u32,
}

impl Passthrough {
    pub(super) fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Passthrough {
            dir: dir.to_path_buf(),
            refused: AtomicBool::new(false),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// Opens file `ino` with passthrough if it can: `Ok` once replied, else the reply back for
    /// an ordinary open.
    pub(super) fn open(&self, fs: &LayerFs, ino: Ino, reply: ReplyOpen) -> Result<(), ReplyOpen> {
        if self.refused.load(Ordering::Relaxed) {
            return Err(reply);
        }
        let Ok(node) = fs.node(ino) else {
            return Err(reply);
        };
        let source = fs.data.source();
        let local = node
            .chunks
            .iter()
            .all(|chunk| source.is_local(chunk.compressed.clone()));
        if node.kind != Kind::File || node.size == 0 || !local {
            return Err(reply);
        }

        let slot = lock(&self.files).entry(ino).or_default().clone();
        let mut slot = lock(&slot);
        if slot.failed {
            return Err(reply);
        }
        if slot.backing.is_none() {
            let copy = match &slot.copy {
                Some(copy) => Ok(copy.clone()),
                None => self.copy(fs, ino),
            };
            let file = match copy.and_then(|copy| Ok((File::open(&copy)?, copy))) {
                Ok((file, copy)) => {
                    slot.copy = Some(copy);
                    file
                }
                Err(err) => {
                    warn!(path = %fs.path_of(ino), %err, "no passthrough copy; reading through FUSE");
                    slot.failed = true;
                    return Err(reply);
                }
            };
            match reply.open_backing(&file) {
                Ok(id) => slot.backing = Some(id),
                Err(err) => {
                    if !self.refused.swap(true, Ordering::Relaxed) {
                        warn!(%err, "the kernel refused a passthrough backing file; reading through FUSE from now on");
                    }
                    return Err(reply);
                }
            }
        }
        let Some(backing) = &slot.backing else {
            return Err(reply);
        };
        // Counted before replying: once the kernel has the reply, the caller may look.
        Counters::add(&fs.counters.passthrough_opens, 1);
        reply.opened_passthrough(FileHandle(PASSTHROUGH_FH), FopenFlags::empty(), backing);
        slot.opens += 1;
        Ok(())
    }

    /// A passthrough handle of `ino` was closed.
    pub(super) fn release(&self, ino: Ino) {
        let Some(slot) = lock(&self.files).get(&ino).cloned() else {
            return;
        };
        let mut slot = lock(&slot);
        slot.opens = slot.opens.saturating_sub(1);
        if slot.opens == 0 {
            slot.backing = None;
        }
    }

    /// Writes the verified copy of file `ino`, returning its path.
    fn copy(&self, fs: &LayerFs, ino: Ino) -> io::Result<PathBuf> {
        let node = fs.node(ino).map_err(|_| io::ErrorKind::NotFound)?;
        let path = self.dir.join(ino.to_string());
        let partial = self.dir.join(format!(".{ino}.partial"));
        let written = File::create(&partial).and_then(|mut out| {
            for chunk in &node.chunks {
                let bytes = fs
                    .data
                    .read_chunk(chunk)
                    .map_err(|err| io::Error::other(chain(&*err)))?;
                if bytes.len() as u64 != chunk.size {
                    return Err(io::Error::other("chunk size differs from the TOC"));
                }
                out.write_all(&bytes)?;
            }
            Ok(())
        });
        if let Err(err) = written {
            let _ = fs::remove_file(&partial);
            return Err(err);
        }
        fs::rename(&partial, &path)?;
        debug!(path = %fs.path_of(ino), copy = %path.display(), "passthrough copy written");
        Ok(path)
    }
}
