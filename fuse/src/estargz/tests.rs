//! Round trips through [`convert`] and [`Layer`]: every tar entry type in, a checked index and
//! verified chunks out, and a blob that still extracts to the input; then broken blobs.

use std::io::{Read as _, Write as _};
use std::sync::Arc;

use anyhow::{Context as _, Result, ensure};
use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::index::{Index, Kind, Node, ROOT};
use crate::source::FileSource;

const LONG_DIR: &str =
    "a-directory-name-long-enough-that-with-its-file-the-path-passes-the-ustar-limit";
const MTIME: u64 = 1_600_000_000;

fn content(len: usize, seed: u8) -> Vec<u8> {
    // Not too compressible, so members have real sizes.
    (0..len)
        .map(|i| ((i * 7919 + usize::from(seed) * 31) % 251) as u8)
        .collect()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(MTIME);
    h.set_uid(1000);
    h.set_gid(100);
    h
}

/// A tar with every entry type: the files and their contents.
/// A file's path and content.
type File = (String, Vec<u8>);

fn sample_tar() -> Result<(Vec<u8>, Vec<File>)> {
    let mut b = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode| {
        b.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            path,
            &[][..],
        )
    };
    dir(&mut b, "./", 0o755)?;
    dir(&mut b, "dir/", 0o750)?;
    for (path, data, mode) in [
        ("dir/empty", Vec::new(), 0o644),
        ("dir/small", b"hello".to_vec(), 0o644),
        ("dir/big", content(3_500, 1), 0o755),
        ("dir/exact", content(2_000, 2), 0o600),
        ("suid", content(10, 3), 0o4755),
        (
            &*format!("{LONG_DIR}/and-a-file-with-a-long-name-too"),
            content(100, 4),
            0o644,
        ),
        ("dir/.wh.gone", Vec::new(), 0o644),
        ("opq/.wh..wh..opq", Vec::new(), 0o644),
    ] {
        b.append_data(
            &mut header(tar::EntryType::Regular, mode, data.len() as u64),
            path,
            &data[..],
        )?;
        files.push((path.to_owned(), data));
    }
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "dir/sym", "small")?;
    let long_target = format!("../{LONG_DIR}/and-a-file-with-a-long-name-too");
    b.append_link(&mut h, "dir/longsym", &long_target)?;
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut h, "dir/hard", "dir/small")?;
    for (path, kind, major, minor) in [
        ("dev/null", tar::EntryType::Char, 1, 3),
        ("dev/sda", tar::EntryType::Block, 8, 0),
        ("fifo", tar::EntryType::Fifo, 0, 0),
    ] {
        let mut h = header(kind, 0o666, 0);
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
        b.append_data(&mut h, path, &[][..])?;
    }
    b.append_pax_extensions([
        ("SCHILY.xattr.user.comment", &b"hi"[..]),
        ("SCHILY.xattr.security.capability", &[1, 0, 0, 2, 0xff][..]),
    ])?;
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o644, 3),
        "xattrs",
        &b"abc"[..],
    )?;
    files.push(("xattrs".to_owned(), b"abc".to_vec()));
    Ok((b.into_inner()?, files))
}

struct Converted {
    _dir: tempfile::TempDir,
    written: Written,
    blob: Vec<u8>,
    layer: Layer,
}

fn convert_and_open(input: &[u8], opts: &WriteOptions) -> Result<Converted> {
    let mut blob = Vec::new();
    let written = convert(input, &mut blob, opts)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("blob");
    std::fs::write(&path, &blob)?;
    let source = Arc::new(FileSource::open(&path)?);
    let layer = Layer::open(source, Some(&written.toc_digest), &Limits::default())?;
    Ok(Converted {
        _dir: dir,
        written,
        blob,
        layer,
    })
}

fn node<'a>(index: &'a Index, path: &str) -> Result<&'a Node> {
    let mut names = path.split('/').filter(|n| !n.is_empty());
    let ino = names.try_fold(ROOT, |dir, name| index.lookup(dir, name.as_bytes()));
    ino.and_then(|ino| index.node(ino))
        .with_context(|| format!("{path} is missing"))
}

fn read_file(layer: &Layer, node: &Node) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for chunk in &node.chunks {
        ensure!(chunk.file_offset == out.len() as u64);
        out.extend(layer.read_chunk(chunk)?);
    }
    Ok(out)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn inflate(blob: &[u8]) -> Result<Vec<u8>> {
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(blob).read_to_end(&mut tar)?;
    Ok(tar)
}

#[test]
fn round_trip_every_entry_type() -> Result<()> {
    let (input, files) = sample_tar()?;
    let opts = WriteOptions {
        chunk_size: 1_000,
        ..WriteOptions::default()
    };
    let c = convert_and_open(&input, &opts)?;
    let index = c.layer.index();

    // What the manifest will say.
    assert_eq!(c.written.size, c.blob.len() as u64);
    assert_eq!(c.written.digest, sha256(&c.blob));
    let tar = inflate(&c.blob)?;
    assert_eq!(
        (c.written.uncompressed_size, &c.written.diff_id),
        (tar.len() as u64, &sha256(&tar))
    );
    assert_eq!(c.layer.toc_digest(), c.written.toc_digest);

    for (path, data) in &files {
        if path.contains(".wh.") {
            continue;
        }
        let n = node(index, path)?;
        assert_eq!((n.kind, n.size), (Kind::File, data.len() as u64), "{path}");
        assert_eq!(&read_file(&c.layer, n)?, data, "{path}");
    }
    let big = node(index, "dir/big")?;
    let sizes: Vec<u64> = big.chunks.iter().map(|c| c.size).collect();
    assert_eq!(sizes, [1_000, 1_000, 1_000, 500]);
    assert_eq!(node(index, "dir/exact")?.chunks.len(), 2);
    assert!(node(index, "dir/empty")?.chunks.is_empty());

    let root = node(index, "")?;
    assert_eq!(
        (root.mode, root.uid, root.nlink),
        (0o755, 1000, 2 + 4),
        "dir, opq, dev, long dir"
    );
    let dir = node(index, "dir")?;
    assert_eq!((dir.mode, dir.gid, dir.nlink), (0o750, 100, 2));
    assert_eq!(
        dir.mtime,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(MTIME)
    );
    assert_eq!(node(index, "suid")?.mode, 0o4755);

    let small = index.lookup(index.lookup(ROOT, b"dir").unwrap_or(0), b"small");
    assert_eq!(
        small,
        index.lookup(index.lookup(ROOT, b"dir").unwrap_or(0), b"hard")
    );
    assert_eq!(node(index, "dir/small")?.nlink, 2);
    assert_eq!(node(index, "dir/sym")?.target, b"small");
    let longsym = node(index, "dir/longsym")?;
    assert_eq!(longsym.size, longsym.target.len() as u64);
    assert!(longsym.target.len() > 100);

    let null = node(index, "dev/null")?;
    assert_eq!(
        (null.kind, null.rdev, null.mode),
        (Kind::CharDevice, 0x103, 0o666)
    );
    assert_eq!(
        (node(index, "dev/sda")?.kind, node(index, "dev/sda")?.rdev),
        (Kind::BlockDevice, 0x800)
    );
    assert_eq!(node(index, "fifo")?.kind, Kind::Fifo);
    let xattrs = &node(index, "xattrs")?.xattrs;
    assert_eq!(
        xattrs,
        &[
            (b"security.capability".to_vec(), vec![1, 0, 0, 2, 0xff]),
            (b"user.comment".to_vec(), b"hi".to_vec())
        ]
    );

    let gone = node(index, "dir/gone")?;
    assert_eq!((gone.kind, gone.rdev, gone.mode), (Kind::CharDevice, 0, 0));
    assert!(node(index, "dir/.wh.gone").is_err());
    let opq = node(index, "opq")?;
    assert!(opq.children.is_empty());
    assert!(
        opq.xattrs
            .contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec()))
    );
    assert!(node(index, NO_PREFETCH_LANDMARK).is_err());
    assert_eq!(index.prefetch, None);
    Ok(())
}

/// The inflated blob, minus the landmark and TOC entries, is the input tar entry for entry:
/// `tar -x` of either gives the same tree.
#[test]
fn blob_extracts_like_the_input() -> Result<()> {
    let (input, _) = sample_tar()?;
    let c = convert_and_open(
        &input,
        &WriteOptions {
            chunk_size: 700,
            ..WriteOptions::default()
        },
    )?;
    let output = inflate(&c.blob)?;
    let dump = |tar: &[u8]| -> Result<Vec<_>> {
        let mut archive = tar::Archive::new(tar);
        let mut out = Vec::new();
        for entry in archive.entries()? {
            let mut e = entry?;
            let path = e.path_bytes().into_owned();
            if [TOC_TAR_NAME.as_bytes(), NO_PREFETCH_LANDMARK.as_bytes()].contains(&&path[..]) {
                continue;
            }
            let h = e.header().clone();
            let link = e.link_name_bytes().map(|l| l.into_owned());
            let pax: Vec<(Vec<u8>, Vec<u8>)> = match e.pax_extensions()? {
                Some(pax) => pax
                    .map(|p| p.map(|p| (p.key_bytes().to_vec(), p.value_bytes().to_vec())))
                    .collect::<Result<_, _>>()?,
                None => Vec::new(),
            };
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            out.push((path, link, h.as_bytes().to_vec(), pax, data));
        }
        Ok(out)
    };
    let (want, got) = (dump(&input)?, dump(&output)?);
    assert_eq!(want.len(), 17);
    assert_eq!(got, want);
    // And the first entry is the landmark, as the reference writer puts it.
    let mut archive = tar::Archive::new(&output[..]);
    let first = archive.entries()?.next().context("empty")??;
    assert_eq!(&*first.path_bytes(), NO_PREFETCH_LANDMARK.as_bytes());
    Ok(())
}

#[test]
fn gzip_input_converts_the_same() -> Result<()> {
    let (input, _) = sample_tar()?;
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&input)?;
    let gz = gz.finish()?;
    let (mut plain, mut from_gz) = (Vec::new(), Vec::new());
    let a = convert(&input[..], &mut plain, &WriteOptions::default())?;
    let b = convert(&gz[..], &mut from_gz, &WriteOptions::default())?;
    assert_eq!((a, plain), (b, from_gz));
    Ok(())
}

#[test]
fn prioritized_files_come_first_and_prefetch_covers_them() -> Result<()> {
    let (input, files) = sample_tar()?;
    let opts = WriteOptions {
        chunk_size: 1_000,
        prioritized: vec!["/dir/hard".into(), "suid".into(), "not/there".into()],
        level: 9,
    };
    let c = convert_and_open(&input, &opts)?;
    let output = inflate(&c.blob)?;
    let mut archive = tar::Archive::new(&output[..]);
    let names: Vec<String> = archive
        .entries()?
        .map(|e| Ok(String::from_utf8_lossy(&e?.path_bytes()).into_owned()))
        .collect::<Result<_>>()?;
    // Root and parent first, the link's target before the link.
    assert_eq!(
        names[..6],
        [
            "./",
            "dir/",
            "dir/small",
            "dir/hard",
            "suid",
            PREFETCH_LANDMARK
        ]
    );
    assert_eq!(
        names.len(),
        19,
        "every entry once, plus landmark and TOC: {names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some(TOC_TAR_NAME));

    let index = c.layer.index();
    let prefetch = index.prefetch.clone().context("no prefetch range")?;
    for (path, inside) in [
        ("dir/small", true),
        ("suid", true),
        ("dir/big", false),
        ("xattrs", false),
    ] {
        let chunk = &node(index, path)?.chunks[0];
        assert_eq!(chunk.compressed.end <= prefetch.end, inside, "{path}");
    }
    // Reordering changed nothing a reader sees.
    for (path, data) in files.iter().filter(|(p, _)| !p.contains(".wh.")) {
        assert_eq!(&read_file(&c.layer, node(index, path)?)?, data);
    }
    Ok(())
}

#[test]
fn toc_digest_must_match() -> Result<()> {
    let (input, _) = sample_tar()?;
    let c = convert_and_open(&input, &WriteOptions::default())?;
    let source = c.layer.source().clone();
    let other = sha256(b"something else");
    let err = Layer::open(source.clone(), Some(&other), &Limits::default()).err();
    assert!(
        matches!(err, Some(Error::TocDigestMismatch { .. })),
        "{err:?}"
    );
    let err = Layer::open(source.clone(), Some("sha256:nothex"), &Limits::default()).err();
    assert!(matches!(err, Some(Error::BadDigest(_))), "{err:?}");
    assert!(Layer::open(source, None, &Limits::default()).is_ok());
    Ok(())
}

#[test]
fn corrupt_chunks_are_refused() -> Result<()> {
    let (input, files) = sample_tar()?;
    // Stored (level 0) members: a flipped byte is a content change, not a deflate error.
    let opts = WriteOptions {
        chunk_size: 1_000,
        level: 0,
        ..WriteOptions::default()
    };
    let c = convert_and_open(&input, &opts)?;
    let chunk = node(c.layer.index(), "dir/big")?.chunks[3].clone();
    let mut blob = c.blob.clone();
    let at = usize::try_from(chunk.compressed.start)? + 10 + 5 + 100;
    blob[at] ^= 0x55;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("blob"), &blob)?;
    let source = Arc::new(FileSource::open(&dir.path().join("blob"))?);
    let layer = Layer::open(source, Some(&c.written.toc_digest), &Limits::default())?;
    let err = layer.read_chunk(&chunk).err();
    assert!(matches!(err, Some(Error::ChunkDigest { .. })), "{err:?}");

    // A chunk claiming bytes its member does not have, or lying outside the blob.
    let small = node(c.layer.index(), "dir/small")?.chunks[0].clone();
    let long = crate::index::Chunk {
        size: 1 << 20,
        ..small.clone()
    };
    assert!(matches!(
        c.layer.read_chunk(&long),
        Err(Error::ChunkTruncated { .. }) | Err(Error::Inflate { .. })
    ));
    let outside = crate::index::Chunk {
        compressed: 0..u64::MAX,
        ..small.clone()
    };
    assert!(matches!(
        c.layer.read_chunk(&outside),
        Err(Error::ChunkRange { .. })
    ));
    assert_eq!(c.layer.read_chunk(&small)?, files[1].1);
    Ok(())
}

/// A blob of `body` followed by a TOC member holding `json` (under `name`) and a footer.
fn blob_with_toc(body: &[u8], name: &str, json: &[u8]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    tar.append_data(&mut h, name, json)?;
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar.into_inner()?)?;
    let mut blob = body.to_vec();
    blob.extend(gz.finish()?);
    blob.extend(footer::encode(body.len() as u64));
    Ok(blob)
}

fn open_bytes(blob: &[u8], limits: &Limits) -> Result<Layer, Error> {
    let dir = tempfile::tempdir().map_err(Error::Io)?;
    std::fs::write(dir.path().join("blob"), blob).map_err(Error::Io)?;
    let source = FileSource::open(&dir.path().join("blob")).map_err(Error::Io)?;
    Layer::open(Arc::new(source), None, limits)
}

#[test]
fn broken_blobs_are_refused() -> Result<()> {
    let limits = Limits::default();
    let good = blob_with_toc(b"xx", TOC_TAR_NAME, br#"{"version":1,"entries":[]}"#)?;
    assert!(open_bytes(&good, &limits).is_ok());

    let err = open_bytes(&good[..30], &limits)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("truncated footer: the blob is only 30 bytes")
    );

    let mut bad_magic = good.clone();
    let len = bad_magic.len();
    bad_magic[len - 14] = b'X';
    assert!(matches!(
        open_bytes(&bad_magic, &limits),
        Err(Error::BadFooter(_))
    ));

    let mut beyond = good[..good.len() - 51].to_vec();
    beyond.extend(footer::encode(1 << 40));
    assert!(matches!(
        open_bytes(&beyond, &limits),
        Err(Error::TocOffsetBeyondBlob { .. })
    ));

    let wrong_name = blob_with_toc(b"", "other.json", b"{}")?;
    assert!(
        matches!(open_bytes(&wrong_name, &limits), Err(Error::TocName(n)) if n == "other.json")
    );

    let small = Limits {
        max_toc_compressed: 10,
        ..Limits::default()
    };
    assert!(matches!(
        open_bytes(&good, &small),
        Err(Error::TocTooLarge { .. })
    ));

    let bad_entry = blob_with_toc(
        b"",
        TOC_TAR_NAME,
        br#"{"version":1,"entries":[{"name":"../x","type":"dir"}]}"#,
    )?;
    let err = open_bytes(&bad_entry, &limits).err().map(|e| e.to_string());
    assert_eq!(err.as_deref(), Some("TOC entry \"../x\": `..` in the name"));
    Ok(())
}

/// A TOC member that inflates far beyond the limit fails from its tar header, before any of it
/// is held: 64 MiB of zeros compress to 64 KiB.
#[test]
fn toc_gzip_bomb_is_refused_without_inflating_it() -> Result<()> {
    let mut tar = tar::Header::new_ustar();
    tar.set_path(TOC_TAR_NAME)?;
    tar.set_size(64 << 20);
    tar.set_cksum();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(tar.as_bytes())?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        gz.write_all(&zeros)?;
    }
    let mut blob = gz.finish()?;
    ensure!(blob.len() < 1 << 20);
    blob.extend(footer::encode(0));
    let limits = Limits {
        max_toc_json: 1 << 20,
        ..Limits::default()
    };
    let err = open_bytes(&blob, &limits).err();
    assert!(
        matches!(
            err,
            Some(Error::TocJsonTooLarge {
                size: 67_108_864,
                limit: 1_048_576
            })
        ),
        "{err:?}"
    );
    // A 1 GB claim against the default limit, with only a header behind it.
    let mut tar = tar::Header::new_ustar();
    tar.set_path(TOC_TAR_NAME)?;
    tar.set_size(1 << 30);
    tar.set_cksum();
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(tar.as_bytes())?;
    let mut blob = gz.finish()?;
    blob.extend(footer::encode(0));
    let err = open_bytes(&blob, &Limits::default()).err();
    assert!(
        matches!(err, Some(Error::TocJsonTooLarge { .. })),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn refuses_bad_options_and_unsafe_input() -> Result<()> {
    let (input, _) = sample_tar()?;
    let zero = WriteOptions {
        chunk_size: 0,
        ..WriteOptions::default()
    };
    assert!(matches!(
        convert(&input[..], std::io::sink(), &zero),
        Err(Error::BadOptions(_))
    ));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, 0o644, 1);
    // `append_data` refuses `..`; write the name into the header directly.
    h.as_old_mut().name[..7].copy_from_slice(b"../evil");
    h.set_cksum();
    b.append(&h, &b"x"[..])?;
    let evil = b.into_inner()?;
    let err = convert(&evil[..], std::io::sink(), &WriteOptions::default()).err();
    assert!(matches!(err, Some(Error::InputEntry { .. })), "{err:?}");
    Ok(())
}

/// A blob made by stargz-snapshotter's own `estargz.Build` (see `testdata/reference.go`):
/// chunked file, implicit directory, hard link, whiteout, device, xattr, prefetch landmark.
#[test]
fn reads_a_blob_made_by_the_reference_writer() -> Result<()> {
    const TOC_DIGEST: &str =
        "sha256:782d746952ff502a457369074e2805a7d05cbf715688a7e9825f54bd7c7fbb3a";
    const DIFF_ID: &str = "sha256:0d3b77d8d169b96fe20871193c66b9afd2517519ee314b4c1f825fcc5b1542f0";
    let blob = include_bytes!("testdata/reference.stargz");
    assert_eq!(sha256(&inflate(blob)?), DIFF_ID);
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("blob"), blob)?;
    let source = Arc::new(FileSource::open(&dir.path().join("blob"))?);
    let layer = Layer::open(source, Some(TOC_DIGEST), &Limits::default())?;
    let index = layer.index();

    let hello = node(index, "etc/hello")?;
    assert_eq!(read_file(&layer, hello)?, b"hello, world\n");
    assert_eq!(
        (hello.uid, hello.gid, hello.nlink, hello.mode),
        (1, 2, 2, 0o644)
    );
    let big = node(index, "bin/big")?;
    let want: Vec<u8> = (0..3000usize).map(|i| (i * 7 + i / 13) as u8).collect();
    assert_eq!(read_file(&layer, big)?, want);
    assert_eq!(
        big.chunks.iter().map(|c| c.size).collect::<Vec<_>>(),
        [1024, 1024, 952]
    );
    assert_eq!(big.mode, 0o4755);
    assert_eq!(node(index, "bin")?.mode, 0o755, "implicit directory");
    assert_eq!(node(index, "bin/link")?.target, b"big");
    assert_eq!(node(index, "etc/gone")?.kind, Kind::CharDevice);
    assert_eq!(node(index, "dev/null")?.rdev, 0x103);
    assert_eq!(
        node(index, "x")?.xattrs,
        [(b"user.k".to_vec(), b"v".to_vec())]
    );
    assert_eq!(read_file(&layer, node(index, "x")?)?, b"xattr file");
    let prefetch = index.prefetch.clone().context("prefetch landmark")?;
    assert!(hello.chunks[0].compressed.end <= prefetch.end);
    assert!(big.chunks[0].compressed.start >= prefetch.end);
    Ok(())
}

/// A cheap stand-in for the fuzzer: every byte of a real TOC, changed, must parse or fail
/// cleanly, and what parses must keep the index's promises.
#[test]
fn mutated_tocs_never_panic() -> Result<()> {
    let blob = include_bytes!("testdata/reference.stargz");
    let tar = inflate(blob)?;
    let mut archive = tar::Archive::new(&tar[..]);
    let mut json = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if &*entry.path_bytes() == TOC_TAR_NAME.as_bytes() {
            entry.read_to_end(&mut json)?;
        }
    }
    ensure!(!json.is_empty());
    let limits = Limits::default();
    for i in 0..json.len() {
        for b in [b'0', b'9', b'-', b'"', b'/', b'.', 0] {
            let mut m = json.clone();
            m[i] = b;
            if let Ok(index) = parse_toc(&m, 2_700, &limits) {
                for n in &index.nodes {
                    let covered: u64 = n.chunks.iter().map(|c| c.size).sum();
                    assert!(n.chunks.is_empty() || covered == n.size);
                    assert!(n.chunks.iter().all(|c| c.compressed.end <= 2_700));
                }
            }
        }
    }
    Ok(())
}
