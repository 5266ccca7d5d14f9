//! Resumable ingests: blobs containerd is writing, kept on the blob store's filesystem so that
//! committing one is a rename into the store.
//!
//! ```text
//! <ingest_dir>/<sha256(ref) hex>/data        the bytes so far; its length is the offset
//!                               /ref         the ref, to tell refs apart and list them
//!                               /total       the announced size (absent when unknown)
//!                               /expected    the announced digest (absent when unknown)
//!                               /started_at  nanoseconds since the Unix epoch
//! ```
//!
//! The directory name is a hash, so no ref (`../..`, `/`, anything) can name a path outside the
//! ingest directory. A new ingest is made complete in `<hex>.new` and renamed into place, so a
//! crash never leaves one half-made; an aborted one is renamed to `<hex>.<n>.abort` before it is
//! deleted. Leftovers of both are removed by [`Ingests::open`]. The last update time is the data
//! file's mtime, which every write moves.
//!
//! Only one writer may hold a ref at a time ([`Ingests::lock`]), as in containerd's local store;
//! the lock lives in memory and ends with the writer, so a restart frees every ref.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_p2p::Digest;
use shoal_p2p::digest::Hasher;
use tracing::{info, warn};

use super::{Error, Status};

/// The ingest directory and the refs locked by live writers.
#[derive(Debug)]
pub(crate) struct Ingests {
    dir: PathBuf,
    locks: Mutex<HashMap<String, Instant>>,
    /// Makes abort names unique within this process.
    aborts: AtomicU64,
}

/// A ref held by one writer; dropping it lets the next writer in.
#[derive(Debug)]
pub(crate) struct RefLock {
    ingests: Arc<Ingests>,
    r#ref: String,
}

impl Drop for RefLock {
    fn drop(&mut self) {
        self.ingests.locks().remove(&self.r#ref);
    }
}

/// An open, locked ingest. Its methods block: call them from `spawn_blocking` in async code.
#[derive(Debug)]
pub(crate) struct Ingest {
    lock: RefLock,
    dir: PathBuf,
    file: File,
    offset: u64,
    hasher: Hasher,
    total: u64,
    expected: Option<Digest>,
    started: SystemTime,
    updated: SystemTime,
}

fn nanos(t: SystemTime) -> u64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes a small file durably.
fn write_file(path: &Path, contents: &str) -> Result<(), Error> {
    let mut f = File::create(path).map_err(Error::io("creating", path))?;
    std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(Error::io("writing", path))?;
    f.sync_all().map_err(Error::io("syncing", path))
}

/// A small file's contents, `None` if it does not exist.
fn read_file(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", path)(e)),
    }
}

fn sync_dir(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("syncing", path))
}

fn remove_dir(path: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io("removing", path)(e)),
        _ => Ok(()),
    }
}

impl Ingests {
    /// Uses `dir` (the blob store's ingest directory) and clears what a crash left half-done.
    pub fn open(dir: PathBuf) -> Result<Arc<Self>, Error> {
        fs::create_dir_all(&dir).map_err(Error::io("creating", &dir))?;
        for item in fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
            let item = item.map_err(Error::io("listing", &dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            let hex = name.split('.').next().unwrap_or_default();
            if Digest::from_hex(hex).is_err() {
                continue; // not ours
            }
            let path = item.path();
            let leftover = name.ends_with(".new") || name.ends_with(".abort");
            // A committed ingest whose directory was not removed yet: its data is in the store.
            let emptied = name == hex && !path.join("data").exists();
            if leftover || emptied {
                info!(path = %path.display(), "removing leftover ingest");
                remove_dir(&path)?;
            }
        }
        Ok(Arc::new(Ingests {
            dir,
            locks: Mutex::new(HashMap::new()),
            aborts: AtomicU64::new(0),
        }))
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // One map updated in single statements: a poisoned lock is still consistent.
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, r#ref: &str) -> PathBuf {
        self.dir.join(Digest::of(r#ref.as_bytes()).hex())
    }

    /// Takes `ref` for one writer, or says since when another writer has it.
    pub fn lock(self: &Arc<Self>, r#ref: &str) -> Result<RefLock, Error> {
        let mut locks = self.locks();
        if let Some(since) = locks.get(r#ref) {
            return Err(Error::Locked {
                ingest_ref: r#ref.to_owned(),
                held: since.elapsed(),
            });
        }
        locks.insert(r#ref.to_owned(), Instant::now());
        Ok(RefLock {
            ingests: self.clone(),
            r#ref: r#ref.to_owned(),
        })
    }

    pub fn status(&self, r#ref: &str) -> Result<Status, Error> {
        read_status(&self.path(r#ref))?
            .filter(|s| s.r#ref == r#ref)
            .ok_or_else(|| Error::IngestNotFound(r#ref.to_owned()))
    }

    /// Every ingest on disk, in no particular order.
    pub fn list(&self) -> Result<Vec<Status>, Error> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(Error::io("listing", &self.dir))? {
            let item = item.map_err(Error::io("listing", &self.dir))?;
            let is_ingest = item
                .file_name()
                .to_str()
                .is_some_and(|n| Digest::from_hex(n).is_ok());
            // An ingest committed or aborted meanwhile simply is not there any more.
            if let Some(status) = is_ingest.then(|| read_status(&item.path())).transpose()? {
                out.extend(status);
            }
        }
        Ok(out)
    }

    /// Deletes the ingest `ref`. A writer holding it notices when it commits.
    pub fn abort(&self, r#ref: &str) -> Result<(), Error> {
        let path = self.path(r#ref);
        let n = self.aborts.fetch_add(1, Ordering::Relaxed);
        let doomed = path.with_extension(format!("{n}.abort"));
        match fs::rename(&path, &doomed) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::IngestNotFound(r#ref.to_owned()));
            }
            result => result.map_err(Error::io("renaming", &path))?,
        }
        remove_dir(&doomed)
    }

    /// Resumes the ingest of `lock`'s ref, or starts it anew when there is none, it belongs to
    /// another ref (a hash collision or damage) or it announced a different `total` (as
    /// containerd's local store does).
    pub fn open_ingest(
        &self,
        lock: RefLock,
        total: u64,
        expected: Option<Digest>,
    ) -> Result<Ingest, Error> {
        let dir = self.path(&lock.r#ref);
        if let Some(status) = read_status(&dir)? {
            let same_total = total == 0 || status.total == 0 || total == status.total;
            if status.r#ref == lock.r#ref && same_total {
                return Ingest::resume(lock, dir, status);
            }
            warn!(r#ref = %lock.r#ref, "ingest cannot be resumed; starting it over");
        }
        remove_dir(&dir)?;
        let new = dir.with_extension("new");
        remove_dir(&new)?;
        fs::create_dir(&new).map_err(Error::io("creating", &new))?;
        let started = SystemTime::now();
        write_file(&new.join("ref"), &lock.r#ref)?;
        write_file(&new.join("started_at"), &nanos(started).to_string())?;
        if total > 0 {
            write_file(&new.join("total"), &total.to_string())?;
        }
        if let Some(expected) = expected {
            write_file(&new.join("expected"), &expected.to_string())?;
        }
        write_file(&new.join("data"), "")?;
        sync_dir(&new)?;
        fs::rename(&new, &dir).map_err(Error::io("renaming", &new))?;
        sync_dir(&self.dir)?;
        let file = open_data(&dir)?;
        Ok(Ingest {
            lock,
            dir,
            file,
            offset: 0,
            hasher: Hasher::new(),
            total,
            expected,
            started,
            updated: started,
        })
    }
}

fn open_data(dir: &Path) -> Result<File, Error> {
    let path = dir.join("data");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(Error::io("opening", &path))
}

/// The status of the ingest in `dir`, `None` if there is no (complete) ingest there.
fn read_status(dir: &Path) -> Result<Option<Status>, Error> {
    let data = dir.join("data");
    let meta = match fs::metadata(&data) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &data)(e)),
    };
    let Some(r#ref) = read_file(&dir.join("ref"))? else {
        return Ok(None);
    };
    let number = |name: &str| -> Result<u64, Error> {
        Ok(read_file(&dir.join(name))?
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0))
    };
    let expected = read_file(&dir.join("expected"))?.and_then(|s| s.trim().parse().ok());
    let started = UNIX_EPOCH + Duration::from_nanos(number("started_at")?);
    Ok(Some(Status {
        r#ref,
        offset: meta.len(),
        total: number("total")?,
        expected,
        started,
        updated: meta.modified().unwrap_or(started),
    }))
}

impl Ingest {
    fn resume(lock: RefLock, dir: PathBuf, status: Status) -> Result<Self, Error> {
        let mut file = open_data(&dir)?;
        // The digest so far is needed for every answer; re-reading is what containerd does too.
        let mut hasher = Hasher::new();
        let mut buf = vec![0u8; super::READ_CHUNK];
        let mut offset = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(Error::io("reading", dir.join("data")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        info!(r#ref = %lock.r#ref, offset, "resuming ingest");
        Ok(Ingest {
            lock,
            dir,
            file,
            offset,
            hasher,
            total: status.total,
            expected: status.expected,
            started: status.started,
            updated: status.updated,
        })
    }

    pub fn r#ref(&self) -> &str {
        &self.lock.r#ref
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn status(&self) -> Status {
        Status {
            r#ref: self.lock.r#ref.clone(),
            offset: self.offset,
            total: self.total,
            expected: self.expected,
            started: self.started,
            updated: self.updated,
        }
    }

    pub fn digest(&self) -> Digest {
        self.hasher.clone().finish()
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.file
            .write_all_at(data, self.offset)
            .map_err(Error::io("writing", self.dir.join("data")))?;
        self.hasher.update(data);
        self.offset += data.len() as u64;
        self.updated = SystemTime::now();
        Ok(())
    }

    pub fn truncate(&mut self) -> Result<(), Error> {
        self.file
            .set_len(0)
            .map_err(Error::io("truncating", self.dir.join("data")))?;
        self.hasher = Hasher::new();
        self.offset = 0;
        self.updated = SystemTime::now();
        Ok(())
    }

    /// Makes the bytes durable and returns the data file's path, for the blob store to adopt.
    /// Fails if the ingest was aborted meanwhile.
    pub fn finish(&self) -> Result<PathBuf, Error> {
        let data = self.dir.join("data");
        if !data.exists() {
            return Err(Error::IngestNotFound(self.lock.r#ref.clone()));
        }
        self.file.sync_all().map_err(Error::io("syncing", &data))?;
        Ok(data)
    }

    /// Removes what is left of the directory once its data is adopted (or not wanted).
    pub fn remove(self) -> Result<(), Error> {
        remove_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingests_resume_and_lock() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let ingests = Ingests::open(dir.path().join("ingest"))?;
        let lock = ingests.lock("default/1/../../etc")?;
        assert!(matches!(
            ingests.lock("default/1/../../etc"),
            Err(Error::Locked { .. })
        ));
        let mut ingest = ingests.open_ingest(lock, 10, None)?;
        ingest.write(b"hello")?;
        let digest = ingest.digest();
        drop(ingest);

        let status = ingests.status("default/1/../../etc")?;
        assert_eq!((status.offset, status.total), (5, 10));
        assert_eq!(ingests.list()?, vec![status]);

        let again = Ingests::open(dir.path().join("ingest"))?;
        let ingest = again.open_ingest(again.lock("default/1/../../etc")?, 0, None)?;
        assert_eq!((ingest.offset(), ingest.digest()), (5, digest));
        drop(ingest);

        let restarted = again.open_ingest(again.lock("default/1/../../etc")?, 11, None)?;
        assert_eq!(restarted.offset(), 0, "a different total starts over");
        drop(restarted);

        again.abort("default/1/../../etc")?;
        assert!(matches!(
            again.status("default/1/../../etc"),
            Err(Error::IngestNotFound(_))
        ));
        assert!(matches!(again.abort("nope"), Err(Error::IngestNotFound(_))));
        assert_eq!(fs::read_dir(dir.path().join("ingest"))?.count(), 0);
        Ok(())
    }
}
