//! Helpers for the mount tests: layers written as tars with the `tar` crate, converted to
//! eStargz, unpacked with GNU tar for reference, and guards that unmount whatever a test mounts.

#![allow(dead_code)]

use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use shoal_fuse::estargz::{self, Layer, WriteOptions};
use shoal_fuse::{ChunkSource, FileSource};

/// Whether this host can run the mount tests; prints why not when it cannot.
pub fn can_mount() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse is missing");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: mounting FUSE and overlayfs needs root");
        return false;
    }
    true
}

/// What a tar entry is.
#[derive(Clone, Debug)]
pub enum What {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
    Hardlink(&'static str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One tar entry.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: &'static str,
    pub what: What,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub xattrs: Vec<(&'static str, &'static [u8])>,
}

pub fn entry(path: &'static str, what: What) -> Entry {
    let mode = match what {
        What::Dir => 0o755,
        What::Symlink(_) => 0o777,
        _ => 0o644,
    };
    Entry {
        path,
        what,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        xattrs: Vec::new(),
    }
}

impl Entry {
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn xattr(mut self, name: &'static str, value: &'static [u8]) -> Self {
        self.xattrs.push((name, value));
        self
    }
}

/// A tar holding `entries`, in order, xattrs as PAX `SCHILY.xattr.*` records.
pub fn tar_of(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    use tar::{EntryType, Header};
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.xattrs.is_empty() {
            let mut records = Vec::new();
            for (name, value) in &e.xattrs {
                pax_record(&mut records, &format!("SCHILY.xattr.{name}"), value);
            }
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::XHeader);
            h.set_size(records.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "PaxHeaders/x", &records[..])?;
        }
        let mut h = Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(0);
        match &e.what {
            What::Dir => {
                h.set_entry_type(EntryType::Directory);
                b.append_data(&mut h, e.path, io::empty())?;
            }
            What::File(data) => {
                h.set_entry_type(EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, e.path, &data[..])?;
            }
            What::Symlink(target) => {
                h.set_entry_type(EntryType::Symlink);
                b.append_link(&mut h, e.path, target)?;
            }
            What::Hardlink(target) => {
                h.set_entry_type(EntryType::Link);
                b.append_link(&mut h, e.path, target)?;
            }
            What::Char(major, minor) | What::Block(major, minor) => {
                let kind = match e.what {
                    What::Char(..) => EntryType::Char,
                    _ => EntryType::Block,
                };
                h.set_entry_type(kind);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, e.path, io::empty())?;
            }
            What::Fifo => {
                h.set_entry_type(EntryType::Fifo);
                b.append_data(&mut h, e.path, io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// Appends the PAX record `"<len> key=value\n"`, whose length counts its own digits.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Unpacks `tar` into `dir` with GNU tar, as root: owners, modes, xattrs, devices.
pub fn unpack(tar: &[u8], dir: &Path) -> anyhow::Result<()> {
    let mut child = Command::new("tar")
        .args(["-x", "-f", "-", "--xattrs", "--xattrs-include=*"])
        .args([
            "--numeric-owner",
            "--same-owner",
            "--same-permissions",
            "-C",
        ])
        .arg(dir)
        .stdin(Stdio::piped())
        .spawn()
        .context("running GNU tar")?;
    child.stdin.take().context("tar stdin")?.write_all(tar)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("tar -x failed: {status}");
    }
    Ok(())
}

/// Converts `tar` to an eStargz blob in `dir`, returning its path and TOC digest.
pub fn convert(tar: &[u8], chunk_size: u64, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let path = dir.join("layer.estargz");
    let out = fs::File::create(&path)?;
    let opts = WriteOptions {
        chunk_size,
        ..WriteOptions::default()
    };
    let written = estargz::convert(tar, out, &opts)?;
    Ok((path, written.toc_digest))
}

/// A local blob whose reads can be made to fail or to return corrupted bytes.
#[derive(Debug)]
pub struct Faulty {
    inner: FileSource,
    pub fail: AtomicBool,
    pub corrupt: AtomicBool,
}

impl Faulty {
    pub fn open(path: &Path) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Faulty {
            inner: FileSource::open(path)?,
            fail: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
        }))
    }
}

impl ChunkSource for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no peer has it"));
        }
        self.inner.read_at(offset, buf)?;
        if self.corrupt.load(Ordering::SeqCst) {
            // Just past a 10-byte gzip header: the first bytes a chunk inflates to.
            if let Some(byte) = buf.get_mut(11) {
                *byte ^= 0x55;
            }
        }
        Ok(())
    }

    fn is_local(&self, range: Range<u64>) -> bool {
        self.inner.is_local(range)
    }
}

/// Opens the layer in `blob` through `source`, checking its TOC digest.
pub fn open_layer(source: Arc<dyn ChunkSource>, toc_digest: &str) -> anyhow::Result<Arc<Layer>> {
    Ok(Arc::new(Layer::open(
        source,
        Some(toc_digest),
        &estargz::Limits::default(),
    )?))
}

/// Whether `path` is a mount point now.
pub fn mounted(path: &Path) -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let path = path.to_string_lossy();
    Ok(mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(&*path)))
}

/// A read-only overlayfs over `lowers` (topmost first), unmounted on drop.
#[derive(Debug)]
pub struct Overlay {
    pub path: PathBuf,
}

impl Overlay {
    pub fn mount(lowers: &[&Path], path: &Path) -> anyhow::Result<Overlay> {
        let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let data = format!("lowerdir={}", lowers.join(":"));
        nix::mount::mount(
            Some("overlay"),
            path,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .with_context(|| format!("mounting overlay {data} at {}", path.display()))?;
        Ok(Overlay {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(errno) = nix::mount::umount2(&self.path, MntFlags::MNT_DETACH) {
            eprintln!("unmounting overlay {}: {errno}", self.path.display());
        }
    }
}

/// Turns the OCI whiteouts of an unpacked layer into overlayfs ones, as a snapshotter
/// applying the layer would: `.wh.NAME` → char device 0:0 `NAME`, `.wh..wh..opq` → the
/// directory's `trusted.overlay.opaque=y`.
pub fn overlayfs_whiteouts(dir: &Path) -> anyhow::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ".wh..wh..opq" {
            fs::remove_file(e.path())?;
            xattr::set(dir, "trusted.overlay.opaque", b"y")?;
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            fs::remove_file(e.path())?;
            nix::sys::stat::mknod(
                &dir.join(hidden),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )?;
        } else if e.file_type()?.is_dir() {
            overlayfs_whiteouts(&e.path())?;
        }
    }
    Ok(())
}

/// Every path under `root`, relative, sorted, without `root` itself.
pub fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn visit(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            out.push(e.path().strip_prefix(root)?.to_path_buf());
            if e.file_type()?.is_dir() {
                visit(root, &e.path(), out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// `path`'s xattrs, sorted.
pub fn xattrs(path: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in xattr::list(path)? {
        let value = xattr::get(path, &name)?.unwrap_or_default();
        out.push((name.to_string_lossy().into_owned(), value));
    }
    out.sort();
    Ok(out)
}

/// Bytes that differ at every offset, so a misplaced slice shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed ^ (i / 251) as u8)
        .collect()
}
