//! Hand-written TOCs through [`parse_toc`]: the index's semantics and every refusal, each
//! naming the entry at fault. Also the fuzz target's entry point on garbage.

use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::index::{Index, Kind, ROOT};

const D0: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

fn parse(entries: &str) -> Result<Index, Error> {
    let json = format!(r#"{{"version":1,"entries":[{entries}]}}"#);
    parse_toc(json.as_bytes(), 10_000, &Limits::default())
}

fn path(index: &Index, path: &str) -> Option<u64> {
    path.split('/')
        .try_fold(ROOT, |dir, name| index.lookup(dir, name.as_bytes()))
}

/// The error message of parsing `entries`, which must fail.
fn refusal(entries: &str) -> String {
    match parse(entries) {
        Ok(index) => panic!("accepted {entries}: {index:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn normalizes_names_and_creates_parents() -> anyhow::Result<()> {
    let index = parse(
        r#"{"name":"./","type":"dir","mode":448,"uid":5,"modtime":"2020-01-01T00:00:00Z"},
           {"name":"/abs//x/./y/","type":"dir","mode":16877},
           {"name":"abs/x/y/f","type":"reg","mode":35309,"uid":7,"gid":8}"#,
    )?;
    let root = index.node(ROOT).ok_or_else(|| anyhow::anyhow!("no root"))?;
    assert_eq!((root.mode, root.uid), (0o700, 5));
    assert_eq!(root.mtime, UNIX_EPOCH + Duration::from_secs(1_577_836_800));
    let x = path(&index, "abs/x").ok_or_else(|| anyhow::anyhow!("abs/x missing"))?;
    let x = index.node(x).ok_or_else(|| anyhow::anyhow!("bad ino"))?;
    assert_eq!(
        (x.kind, x.mode, x.nlink),
        (Kind::Dir, 0o755, 3),
        "implicit parent"
    );
    let f = path(&index, "abs/x/y/f").and_then(|i| index.node(i));
    let f = f.ok_or_else(|| anyhow::anyhow!("file missing"))?;
    assert_eq!(
        (f.kind, f.mode, f.uid, f.gid, f.nlink),
        (Kind::File, 0o4755, 7, 8, 1)
    );
    assert_eq!(root.nlink, 3);
    Ok(())
}

#[test]
fn refuses_bad_names() {
    for (name, want) in [
        ("../x", "`..`"),
        ("a/../../x", "`..`"),
        ("a/..", "`..`"),
        ("a\\u0000b", "NUL"),
        ("", "empty name"),
        ("d/.wh.", "empty name"),
    ] {
        let err = refusal(&format!(r#"{{"name":"{name}","type":"reg"}}"#));
        assert!(err.contains(want), "{name:?}: {err}");
    }
    assert!(refusal(r#"{"name":"/","type":"reg"}"#).contains("root can only be a directory"));
}

#[test]
fn hard_links_share_inodes_and_must_point_back() -> anyhow::Result<()> {
    let index = parse(
        r#"{"name":"a","type":"reg","size":3,"offset":100,"chunkDigest":"DIGEST"},
           {"name":"d/b","type":"hardlink","linkName":"./a"},
           {"name":"c","type":"hardlink","linkName":"d/b"}"#
            .replace("DIGEST", D0)
            .as_str(),
    )?;
    let a = path(&index, "a");
    assert_eq!(a, path(&index, "d/b"));
    assert_eq!(a, path(&index, "c"));
    let node = a
        .and_then(|a| index.node(a))
        .ok_or_else(|| anyhow::anyhow!("a"))?;
    assert_eq!((node.nlink, node.size, node.chunks.len()), (3, 3, 1));

    for (entries, want) in [
        (
            r#"{"name":"b","type":"hardlink","linkName":"nope"}"#,
            "not an earlier entry",
        ),
        (
            r#"{"name":"b","type":"hardlink","linkName":"b"}"#,
            "not an earlier entry",
        ),
        (
            r#"{"name":"a","type":"hardlink","linkName":"b"},{"name":"b","type":"hardlink","linkName":"a"}"#,
            "not an earlier entry",
        ),
        (
            r#"{"name":"d","type":"dir"},{"name":"b","type":"hardlink","linkName":"d"}"#,
            "directory",
        ),
        (
            r#"{"name":"b","type":"hardlink","linkName":"../etc/passwd"}"#,
            "`..`",
        ),
    ] {
        let err = refusal(entries);
        assert!(
            err.contains(want) && err.contains("TOC entry"),
            "{entries}: {err}"
        );
    }
    Ok(())
}

#[test]
fn whiteouts_opaque_dirs_and_devices() -> anyhow::Result<()> {
    let index = parse(
        r#"{"name":"d/.wh.gone","type":"reg","uid":3},
           {"name":"o/.wh..wh..opq","type":"reg"},
           {"name":"o/","type":"dir","mode":493,"xattrs":{"user.k":"dg=="}},
           {"name":"null","type":"char","mode":438,"devMajor":1,"devMinor":3},
           {"name":"big","type":"block","devMajor":259,"devMinor":65536},
           {"name":"p","type":"fifo","mode":420},
           {"name":"s","type":"symlink","linkName":"../target"}"#,
    )?;
    let node = |p: &str| path(&index, p).and_then(|i| index.node(i).cloned());
    let gone = node("d/gone").ok_or_else(|| anyhow::anyhow!("whiteout"))?;
    assert_eq!(
        (gone.kind, gone.mode, gone.rdev, gone.uid),
        (Kind::CharDevice, 0, 0, 3)
    );
    assert!(node("d/.wh.gone").is_none() && node("o/.wh..wh..opq").is_none());
    let o = node("o").ok_or_else(|| anyhow::anyhow!("o"))?;
    let names: Vec<&[u8]> = o.xattrs.iter().map(|(n, _)| n.as_slice()).collect();
    assert_eq!(
        names,
        [
            &b"trusted.overlay.opaque"[..],
            b"user.k",
            b"user.overlay.opaque"
        ]
    );
    assert!(
        o.xattrs
            .iter()
            .all(|(n, v)| n == b"user.k" && v == b"v" || v == b"y")
    );
    assert_eq!(node("null").map(|n| (n.rdev, n.mode)), Some((0x103, 0o666)));
    assert_eq!(
        node("big").map(|n| n.rdev),
        Some((259 << 8) | (65536 << 12))
    );
    assert_eq!(node("p").map(|n| n.kind), Some(Kind::Fifo));
    let s = node("s").ok_or_else(|| anyhow::anyhow!("s"))?;
    assert_eq!(
        (s.kind, s.size, s.target.as_slice()),
        (Kind::Symlink, 9, &b"../target"[..])
    );
    assert!(refusal(r#"{"name":"c","type":"char","devMajor":4096}"#).contains("12:20"));
    Ok(())
}

#[test]
fn chunks_and_compressed_ranges() -> anyhow::Result<()> {
    // Two files share the member at 200 (innerOffset); `big` has three chunks, the last one
    // implied "to the end" by a zero chunkSize; a legacy file has only the whole-file digest.
    let index = parse(
        &r#"{"name":"a","type":"reg","size":10,"offset":200,"chunkDigest":"D0"},
            {"name":"b","type":"reg","size":5,"offset":200,"innerOffset":512,"chunkDigest":"D1"},
            {"name":"big","type":"reg","size":25,"offset":300,"chunkSize":10,"chunkDigest":"D0"},
            {"name":"big","type":"chunk","offset":400,"chunkOffset":10,"chunkSize":10,"chunkDigest":"D1"},
            {"type":"chunk","offset":500,"chunkOffset":20,"chunkDigest":"D0"},
            {"name":"legacy","type":"reg","size":4,"offset":600,"digest":"D1"},
            {"name":"empty","type":"reg"}"#
            .replace("D0", D0)
            .replace("D1", D1),
    )?;
    let chunks = |p: &str| {
        path(&index, p)
            .and_then(|i| index.node(i))
            .map(|n| n.chunks.clone())
    };
    let b = chunks("b").unwrap_or_default();
    assert_eq!(
        (b[0].compressed.clone(), b[0].inner_offset, b[0].size),
        (200..300, 512, 5)
    );
    let big = chunks("big").unwrap_or_default();
    let shape: Vec<_> = big
        .iter()
        .map(|c| (c.file_offset, c.size, c.compressed.clone()))
        .collect();
    assert_eq!(
        shape,
        [(0, 10, 300..400), (10, 10, 400..500), (20, 5, 500..600)]
    );
    let legacy = chunks("legacy").unwrap_or_default();
    assert_eq!(
        (legacy[0].compressed.clone(), legacy[0].digest),
        (600..10_000, [0x11; 32])
    );
    assert_eq!(chunks("empty").map(|c| c.len()), Some(0));
    Ok(())
}

#[test]
fn refuses_bad_chunks() {
    let reg = |size: u64, extra: &str| {
        format!(
            r#"{{"name":"f","type":"reg","size":{size},"offset":100,"chunkSize":10,"chunkDigest":"{D0}"}}{extra}"#
        )
    };
    let chunk = |offset: u64, at: u64, size: u64| {
        format!(
            r#",{{"name":"f","type":"chunk","offset":{offset},"chunkOffset":{at},"chunkSize":{size},"chunkDigest":"{D0}"}}"#
        )
    };
    for (entries, want) in [
        (
            reg(20, &chunk(20_000, 10, 10)),
            "offset 20000 beyond the TOC at 10000",
        ),
        (reg(20, &chunk(200, 5, 15)), "where 10 was expected"),
        (reg(30, &chunk(200, 15, 15)), "where 10 was expected"),
        (
            reg(30, &chunk(200, 10, 10)),
            "cover 20 bytes of a 30-byte file",
        ),
        (
            reg(15, &chunk(200, 10, 10)),
            "cover 20 bytes of a 15-byte file",
        ),
        (reg(20, &chunk(0, 10, 10)), "no offset"),
        (
            reg(20, &(chunk(200, 10, 10).replace(D0, "sha256:xyz"))),
            "not sha256",
        ),
        (
            reg(
                20,
                &(chunk(200, 10, 10).replace(&format!(r#","chunkDigest":"{D0}""#), "")),
            ),
            "no chunkDigest",
        ),
        (
            reg(
                20,
                &chunk(200, 10, 10).replace(r#""name":"f""#, r#""name":"g""#),
            ),
            "follows a different file",
        ),
        (
            chunk(200, 0, 10)[1..].to_owned(),
            "no regular file before it",
        ),
        (
            r#"{"name":"f","type":"reg","size":5}"#.to_owned(),
            "5 bytes of content but no offset",
        ),
        (
            r#"{"name":"f","type":"reg","size":-5}"#.to_owned(),
            "size is -5",
        ),
        (
            reg(u64::MAX >> 1, "").replace(r#""chunkSize":10,"#, ""),
            "larger than",
        ),
    ] {
        let err = refusal(&entries);
        assert!(
            err.contains(want) && err.contains("TOC entry \"f\""),
            "{entries}\n{err}"
        );
    }
}

#[test]
fn refuses_other_bad_entries() {
    for (entries, want) in [
        (r#"{"name":"f","type":"door"}"#, "unknown type"),
        (
            r#"{"name":"f","type":"fifo"},{"name":"f","type":"fifo"}"#,
            "duplicate",
        ),
        (
            r#"{"name":"f","type":"fifo"},{"name":"f/g","type":"fifo"}"#,
            "parent \"f\" is not a directory",
        ),
        (
            r#"{"name":"f","type":"fifo","modtime":"yesterday"}"#,
            "RFC 3339",
        ),
        (r#"{"name":"f","type":"fifo","uid":-1}"#, "uid is -1"),
        (
            r#"{"name":"f","type":"fifo","xattrs":{"user.x":"!!"}}"#,
            "not base64",
        ),
        (r#"{"name":"f","type":"symlink"}"#, "empty target"),
        (r#"{"name":".prefetch.landmark","type":"dir"}"#, "landmark"),
    ] {
        let err = refusal(entries);
        assert!(
            err.contains(want) && err.contains("TOC entry \""),
            "{entries}\n{err}"
        );
    }
    // A directory entry after its implicit creation updates it.
    assert!(parse(r#"{"name":"d/f","type":"fifo"},{"name":"d","type":"dir"}"#).is_ok());
    let v2 = parse_toc(br#"{"version":2,"entries":[]}"#, 10, &Limits::default());
    assert!(matches!(v2, Err(Error::TocVersion(2))));
}

#[test]
fn landmarks_set_prefetch_and_stay_hidden() -> anyhow::Result<()> {
    let landmark = |name: &str| {
        format!(
            r#"{{"name":"{name}","type":"reg","size":1,"offset":700,"chunkDigest":"{D0}"}},{{"name":"z","type":"fifo"}}"#
        )
    };
    let index = parse(&landmark(PREFETCH_LANDMARK))?;
    assert_eq!(index.prefetch, Some(0..700));
    assert!(path(&index, PREFETCH_LANDMARK).is_none());
    let index = parse(&landmark(NO_PREFETCH_LANDMARK))?;
    assert_eq!(index.prefetch, None);
    assert_eq!(index.node(ROOT).map(|r| r.children.len()), Some(1));
    Ok(())
}

#[test]
fn bounds_nodes_including_implicit_directories() {
    let deep = vec!["d"; 100].join("/");
    let json = format!(r#"{{"version":1,"entries":[{{"name":"{deep}","type":"fifo"}}]}}"#);
    let limits = Limits {
        max_entries: 50,
        ..Limits::default()
    };
    let result = parse_toc(json.as_bytes(), 10, &limits);
    assert!(
        matches!(result, Err(Error::TooManyEntries { limit: 50 })),
        "{result:?}"
    );
}

/// What the fuzz target does, on inputs a fuzzer finds first.
#[test]
fn garbage_is_an_error_not_a_panic() {
    let deep = "[".repeat(100_000);
    let inputs: [&[u8]; 8] = [
        b"",
        b"\x00\xff\xfe",
        deep.as_bytes(),
        br#"{"version":1,"entries":[{"name":"a","type":"chunk"}]}"#,
        br#"{"version":1,"entries":[{"name":"a","type":"reg","size":9223372036854775807,"offset":1,"chunkSize":9223372036854775807}]}"#,
        br#"{"version":1,"entries":[{"name":"a","type":"reg","size":2,"offset":1,"chunkOffset":9223372036854775807,"chunkSize":9223372036854775807}]}"#,
        br#"{"version":1,"entries":[{"name":"a","type":"char","devMajor":-1,"devMinor":-1}]}"#,
        br#"{"version":1,"entries":[{"name":"a","type":"reg","modtime":"9999-12-31T23:59:60+23:59"}]}"#,
    ];
    for input in inputs {
        let _ = parse_toc(input, 5, &Limits::default());
    }
    assert!(parse_toc(deep.as_bytes(), 5, &Limits::default()).is_err());
}
