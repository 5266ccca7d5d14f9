//! [`convert`]: a tar layer (plain or gzip'd) into an eStargz blob.
//!
//! The input is first spooled, inflated, to an anonymous temporary file: one pass indexes its
//! entries, a second writes them out in eStargz order (prioritized files first) by copying
//! byte ranges of the spool, so memory holds one copy buffer and the TOC, never a file.
//!
//! Each entry's tar headers (PAX and GNU long-name extensions included) are copied verbatim, so
//! long names, xattrs and every other record survive exactly. Gzip members follow the reference
//! writer's layout: a regular file's content, and each further `chunk_size` piece of it, starts
//! a new member; the padding and the headers of the entries after it share that member.
//!
//! Differences from the input, all of which `tar -x` ignores: entries named like the TOC or a
//! landmark are dropped (re-converting an eStargz layer works); when a name appears twice, only
//! the last entry is kept, at its own position (as stargz-snapshotter's builder does); the
//! landmark and the TOC entry are added; the end-of-archive blocks are written anew.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek as _, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt as _;

use base64::Engine as _;
use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};

use super::build::normalize;
use super::toc::{Toc, TocEntry, format_rfc3339};
use super::{
    Error, LANDMARK_CONTENTS, MAX_CHUNK_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
    TOC_TAR_NAME, footer,
};

const BLOCK: u64 = 512;
const COPY_BUFFER: usize = 64 << 10;
const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";
/// 9999-12-31T23:59:59Z.
const MAX_RFC3339_SECS: i64 = 253_402_300_799;

/// How to write the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Files are split into chunks of this many bytes, each its own gzip member (default 4 MiB,
    /// at most [`MAX_CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// Paths in the layer a container reads first, in that order. If any, they (with their
    /// parent directories and hard link targets) go first, followed by `.prefetch.landmark`;
    /// if none, `.no.prefetch.landmark` goes first. Paths missing from the layer are skipped
    /// with a warning.
    pub prioritized: Vec<String>,
    /// Gzip level, 0–9 (default 6).
    pub level: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            chunk_size: 4 << 20,
            prioritized: Vec::new(),
            level: 6,
        }
    }
}

/// What [`convert`] wrote: the values an image manifest and config need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// The blob's size.
    pub size: u64,
    /// `sha256:<hex>` of the tar the blob inflates to (the image config's diff ID).
    pub diff_id: String,
    /// That tar's size ([`UNCOMPRESSED_SIZE_ANNOTATION`](super::UNCOMPRESSED_SIZE_ANNOTATION)).
    pub uncompressed_size: u64,
    /// `sha256:<hex>` of the TOC JSON ([`TOC_DIGEST_ANNOTATION`](super::TOC_DIGEST_ANNOTATION)).
    pub toc_digest: String,
}

/// Converts an uncompressed or gzip-compressed tar (told apart by the gzip magic) into an
/// eStargz blob written to `out`.
pub fn convert<R: Read, W: Write>(tar: R, out: W, opts: &WriteOptions) -> Result<Written, Error> {
    if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_SIZE {
        return Err(Error::BadOptions(
            "chunk_size must be between 1 byte and MAX_CHUNK_SIZE",
        ));
    }
    if opts.level > 9 {
        return Err(Error::BadOptions("gzip level must be 0 to 9"));
    }
    let spool = spool(tar)?;
    let entries = scan(&spool)?;
    let order = order(&entries, &opts.prioritized);

    let mut blob = Blob::new(BufWriter::new(out), Compression::new(opts.level));
    let mut toc = Toc {
        version: 1,
        entries: Vec::new(),
    };
    let mut buf = vec![0u8; COPY_BUFFER];
    for item in order {
        match item {
            Item::Landmark(name) => write_landmark(&mut blob, &mut toc, name)?,
            Item::Entry(i) => {
                let e = &entries[i];
                copy(&spool, e.headers.clone(), &mut buf, |b| blob.write(b))?;
                match &e.toc {
                    Some(template) if template.kind == "reg" && e.size > 0 => {
                        write_chunks(&mut blob, &mut toc, &spool, e, template, opts, &mut buf)?;
                        copy(&spool, e.data.end..e.end, &mut buf, |b| blob.write(b))?;
                    }
                    Some(template) => {
                        let mut entry = template.clone();
                        if entry.kind == "reg" {
                            entry.digest = format!("sha256:{}", hex::encode(Sha256::digest([])));
                        }
                        toc.entries.push(entry);
                        copy(&spool, e.data.start..e.end, &mut buf, |b| blob.write(b))?;
                    }
                    None => copy(&spool, e.data.start..e.end, &mut buf, |b| blob.write(b))?,
                }
            }
        }
    }

    // The TOC member: the TOC's own tar entry and the end of the archive, then the footer.
    let toc_offset = blob.new_member()?;
    let json = serde_json::to_vec_pretty(&toc).map_err(|e| Error::Output(e.into()))?;
    let toc_digest = super::sha256_digest(&json);
    blob.write(&header(TOC_TAR_NAME, json.len() as u64)?)?;
    blob.write(&json)?;
    blob.write(&[0u8; (3 * BLOCK) as usize][..(padding(json.len() as u64) + 2 * BLOCK) as usize])?;
    blob.end_member()?;
    blob.write_raw(&footer::encode(toc_offset))?;
    blob.finish(toc_digest)
}

/// One logical input entry, as byte ranges of the spool.
struct InEntry {
    /// The entry's normalized name, `None` for a PAX global header (copied, not listed).
    key: Option<String>,
    /// Its header blocks, extension headers included.
    headers: Range<u64>,
    data: Range<u64>,
    /// The end of its padding.
    end: u64,
    size: u64,
    /// The TOC entry, without offsets and digests.
    toc: Option<TocEntry>,
}

enum Item {
    Entry(usize),
    Landmark(&'static str),
}

fn spool<R: Read>(input: R) -> Result<File, Error> {
    let mut file = tempfile::tempfile().map_err(Error::Spool)?;
    let mut input = input;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        match input.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Input(e)),
        }
    }
    let input = (&magic[..got]).chain(input);
    if magic == [0x1f, 0x8b] {
        copy_stream(flate2::read::MultiGzDecoder::new(input), &mut file)?;
    } else {
        copy_stream(input, &mut file)?;
    }
    file.seek(SeekFrom::Start(0)).map_err(Error::Spool)?;
    Ok(file)
}

fn copy_stream(mut from: impl Read, to: &mut File) -> Result<(), Error> {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Input(e)),
        };
        to.write_all(&buf[..n]).map_err(Error::Spool)?;
    }
}

/// Indexes the spooled tar.
fn scan(spool: &File) -> Result<Vec<InEntry>, Error> {
    let mut archive = tar::Archive::new(spool);
    let mut out = Vec::new();
    let mut prev_end = 0u64;
    for entry in archive.entries_with_seek().map_err(Error::Input)? {
        let mut entry = entry.map_err(Error::Input)?;
        let start = entry.raw_file_position();
        let size = entry.size();
        let end = start
            .checked_add(size)
            .and_then(|e| e.checked_add(padding(size)))
            .ok_or_else(|| Error::Input(io::Error::other("entry size overflows")))?;
        let mut e = InEntry {
            key: None,
            headers: prev_end..start,
            data: start..start + size,
            end,
            size,
            toc: None,
        };
        prev_end = end;
        if entry.header().entry_type().is_pax_global_extensions() {
            out.push(e);
            continue;
        }
        let name = String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| {
            let name = String::from_utf8_lossy(e.as_bytes()).into_owned();
            Error::InputEntry {
                name,
                reason: "the name is not UTF-8",
            }
        })?;
        let key = normalize(&name).map_err(|_| Error::InputEntry {
            name: name.clone(),
            reason: "the name is empty, has NUL or `..`",
        })?;
        if [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&key.as_str()) {
            continue;
        }
        e.toc = Some(toc_entry(&mut entry, &name)?);
        e.key = Some(key);
        out.push(e);
    }
    Ok(out)
}

/// The TOC entry for a tar entry, minus offsets and digests.
fn toc_entry(entry: &mut tar::Entry<'_, &File>, name: &str) -> Result<TocEntry, Error> {
    let bad = |reason| Error::InputEntry {
        name: name.to_owned(),
        reason,
    };
    let h = entry.header();
    let kind = match h.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => "reg",
        tar::EntryType::Link => "hardlink",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Directory => "dir",
        tar::EntryType::Char => "char",
        tar::EntryType::Block => "block",
        tar::EntryType::Fifo => "fifo",
        _ => return Err(bad("unsupported entry type (sparse or unknown)")),
    };
    let num = |r: io::Result<u64>| {
        r.ok()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or(bad("bad number"))
    };
    let dev = |r: io::Result<Option<u32>>| {
        r.map(|d| i64::from(d.unwrap_or(0)))
            .map_err(|_| bad("bad device"))
    };
    let mut toc = TocEntry {
        name: name.to_owned(),
        kind: kind.to_owned(),
        size: if kind == "reg" {
            num(Ok(entry.size()))?
        } else {
            0
        },
        mode: num(h.mode().map(u64::from))?,
        uid: num(h.uid())?,
        gid: num(h.gid())?,
        user_name: String::from_utf8_lossy(h.username_bytes().unwrap_or_default()).into_owned(),
        group_name: String::from_utf8_lossy(h.groupname_bytes().unwrap_or_default()).into_owned(),
        ..TocEntry::default()
    };
    let mut mtime = num(h.mtime())?;
    if matches!(kind, "char" | "block") {
        toc.dev_major = dev(h.device_major())?;
        toc.dev_minor = dev(h.device_minor())?;
    }
    if matches!(kind, "hardlink" | "symlink") {
        let link = entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        toc.link_name = String::from_utf8(link).map_err(|_| bad("the link name is not UTF-8"))?;
    }
    if let Some(pax) = entry.pax_extensions().map_err(Error::Input)? {
        let b64 = base64::engine::general_purpose::STANDARD;
        for ext in pax {
            let ext = ext.map_err(Error::Input)?;
            let Ok(key) = ext.key() else { continue };
            let text = || String::from_utf8_lossy(ext.value_bytes()).into_owned();
            if let Some(xattr) = key.strip_prefix(XATTR_PAX_PREFIX) {
                toc.xattrs
                    .insert(xattr.to_owned(), b64.encode(ext.value_bytes()));
            } else if key == "uname" {
                toc.user_name = text();
            } else if key == "gname" {
                toc.group_name = text();
            } else if key == "mtime" {
                // Seconds with an optional fraction; rounded like Go's Round(time.Second).
                mtime = text()
                    .parse::<f64>()
                    .map(|t| t.round() as i64)
                    .map_err(|_| bad("bad PAX mtime"))?;
            }
        }
    }
    // Zero means "unknown" to readers; RFC 3339 has four-digit years.
    if mtime != 0 && mtime <= MAX_RFC3339_SECS {
        toc.mod_time = format_rfc3339(mtime);
    }
    Ok(toc)
}

/// The output order: prioritized entries (parents and link targets first), the landmark, then
/// everything else in input order, keeping only the last entry of each name.
fn order(entries: &[InEntry], prioritized: &[String]) -> Vec<Item> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Some(key) = &e.key {
            last.insert(key, i);
        }
    }
    let mut picked = vec![false; entries.len()];
    let mut out = Vec::new();
    for path in prioritized {
        match normalize(path) {
            Ok(key) if last.contains_key(key.as_str()) => {
                pick(entries, &last, &key, &mut picked, &mut out, 0);
            }
            _ => tracing::warn!(path, "prioritized path is not in the layer; skipped"),
        }
    }
    out.push(Item::Landmark(if prioritized.is_empty() {
        NO_PREFETCH_LANDMARK
    } else {
        PREFETCH_LANDMARK
    }));
    for (i, e) in entries.iter().enumerate() {
        let latest = e.key.as_deref().is_none_or(|k| last.get(k) == Some(&i));
        if latest && !picked[i] {
            out.push(Item::Entry(i));
        }
    }
    out
}

/// Puts `key`'s entry in `out` after its ancestors and, for a hard link, its target.
fn pick(
    entries: &[InEntry],
    last: &HashMap<&str, usize>,
    key: &str,
    picked: &mut [bool],
    out: &mut Vec<Item>,
    depth: usize,
) {
    // Link chains in a sane layer are one step; a cycle in a broken one must not recurse forever.
    if depth > 16 {
        return;
    }
    let mut ancestors: Vec<&str> = vec![""];
    ancestors.extend(key.match_indices('/').map(|(i, _)| &key[..i]));
    for dir in ancestors {
        if let Some(&i) = last.get(dir).filter(|&&i| !picked[i]) {
            picked[i] = true;
            out.push(Item::Entry(i));
        }
    }
    let Some(&i) = last.get(key) else { return };
    if picked[i] {
        return;
    }
    if let Some(toc) = entries[i].toc.as_ref().filter(|t| t.kind == "hardlink")
        && let Ok(target) = normalize(&toc.link_name)
    {
        pick(entries, last, &target, picked, out, depth + 1);
    }
    if !picked[i] {
        picked[i] = true;
        out.push(Item::Entry(i));
    }
}

/// A regular file's content, one member per chunk, with a TOC entry per chunk.
fn write_chunks<W: Write>(
    blob: &mut Blob<W>,
    toc: &mut Toc,
    spool: &File,
    e: &InEntry,
    template: &TocEntry,
    opts: &WriteOptions,
    buf: &mut [u8],
) -> Result<(), Error> {
    let first = toc.entries.len();
    let mut file_sha = Sha256::new();
    let mut written = 0u64;
    while written < e.size {
        let len = opts.chunk_size.min(e.size - written);
        let mut entry = if written == 0 {
            template.clone()
        } else {
            TocEntry {
                name: template.name.clone(),
                kind: "chunk".into(),
                ..TocEntry::default()
            }
        };
        entry.offset = as_i64(blob.new_member()?)?;
        entry.chunk_offset = as_i64(written)?;
        // As the reference writer: the last chunk's size is implied ("to the end").
        if e.size - written >= opts.chunk_size {
            entry.chunk_size = as_i64(opts.chunk_size)?;
        }
        let mut chunk_sha = Sha256::new();
        let start = e.data.start + written;
        copy(spool, start..start + len, buf, |b| {
            chunk_sha.update(b);
            file_sha.update(b);
            blob.write(b)
        })?;
        entry.chunk_digest = format!("sha256:{}", hex::encode(chunk_sha.finalize()));
        toc.entries.push(entry);
        written += len;
    }
    toc.entries[first].digest = format!("sha256:{}", hex::encode(file_sha.finalize()));
    Ok(())
}

fn write_landmark<W: Write>(blob: &mut Blob<W>, toc: &mut Toc, name: &str) -> Result<(), Error> {
    blob.write(&header(name, 1)?)?;
    let offset = as_i64(blob.new_member()?)?;
    blob.write(&[LANDMARK_CONTENTS])?;
    blob.write(&[0u8; BLOCK as usize - 1])?;
    let digest = format!(
        "sha256:{}",
        hex::encode(Sha256::digest([LANDMARK_CONTENTS]))
    );
    toc.entries.push(TocEntry {
        name: name.to_owned(),
        kind: "reg".into(),
        size: 1,
        mode: 0o644,
        offset,
        digest: digest.clone(),
        chunk_digest: digest,
        ..TocEntry::default()
    });
    Ok(())
}

/// A ustar header for a file we add (landmark, TOC).
fn header(name: &str, size: u64) -> Result<[u8; BLOCK as usize], Error> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(Error::Output)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = [0u8; BLOCK as usize];
    out.copy_from_slice(h.as_bytes());
    Ok(out)
}

fn copy(
    spool: &File,
    range: Range<u64>,
    buf: &mut [u8],
    mut to: impl FnMut(&[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut pos = range.start;
    while pos < range.end {
        let n = (range.end - pos).min(buf.len() as u64) as usize;
        spool
            .read_exact_at(&mut buf[..n], pos)
            .map_err(Error::Spool)?;
        to(&buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

fn as_i64(n: u64) -> Result<i64, Error> {
    i64::try_from(n).map_err(|_| Error::Output(io::Error::other("offset beyond i64")))
}

/// The output: a series of gzip members, with the compressed and uncompressed streams counted
/// and hashed.
struct Blob<W: Write> {
    /// The output while no member is open.
    idle: Option<Hashed<W>>,
    member: Option<GzEncoder<Hashed<W>>>,
    level: Compression,
    tar_sha: Sha256,
    tar_size: u64,
}

struct Hashed<W> {
    inner: W,
    sha: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Blob<W> {
    fn new(out: W, level: Compression) -> Self {
        let out = Hashed {
            inner: out,
            sha: Sha256::new(),
            size: 0,
        };
        Blob {
            idle: Some(out),
            member: None,
            level,
            tar_sha: Sha256::new(),
            tar_size: 0,
        }
    }

    /// Closes the open member, if any.
    fn end_member(&mut self) -> Result<&mut Hashed<W>, Error> {
        if let Some(member) = self.member.take() {
            self.idle = Some(member.finish().map_err(Error::Output)?);
        }
        self.idle
            .as_mut()
            .ok_or_else(|| Error::Output(io::Error::other("blob writer failed earlier")))
    }

    /// Closes the open member and starts another; returns its offset in the blob.
    fn new_member(&mut self) -> Result<u64, Error> {
        let offset = self.end_member()?.size;
        if let Some(out) = self.idle.take() {
            self.member = Some(GzEncoder::new(out, self.level));
        }
        Ok(offset)
    }

    /// Writes tar bytes into the open member (starting one if none is).
    fn write(&mut self, buf: &[u8]) -> Result<(), Error> {
        if self.member.is_none() {
            self.new_member()?;
        }
        let member = self
            .member
            .as_mut()
            .ok_or_else(|| Error::Output(io::Error::other("no member")))?;
        member.write_all(buf).map_err(Error::Output)?;
        self.tar_sha.update(buf);
        self.tar_size += buf.len() as u64;
        Ok(())
    }

    /// Writes bytes outside any member (the footer).
    fn write_raw(&mut self, buf: &[u8]) -> Result<(), Error> {
        self.end_member()?.write_all(buf).map_err(Error::Output)
    }

    fn finish(mut self, toc_digest: String) -> Result<Written, Error> {
        let out = self.end_member()?;
        out.flush().map_err(Error::Output)?;
        Ok(Written {
            digest: format!("sha256:{}", hex::encode(out.sha.clone().finalize())),
            size: out.size,
            diff_id: format!("sha256:{}", hex::encode(self.tar_sha.finalize())),
            uncompressed_size: self.tar_size,
            toc_digest,
        })
    }
}
