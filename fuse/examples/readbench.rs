//! A quick read benchmark of one layer mount, for working on the read path (the numbers that
//! count come from `shoal-bench lazystart`, which measures the same reads inside a full pull).
//!
//! Writes `MIB` MiB of random files (sizes log-uniform 4 KiB–16 MiB) to a directory on the
//! current filesystem, converts their tar to eStargz, mounts it through FUSE from the local
//! blob, waits for the local copy of every file, then reads every file cold (page cache
//! dropped) from the directory and from the mount, `--passes` times each, alternating.
//!
//! ```sh
//! cargo run --release -p shoal-fuse --example readbench -- 512 [--chunks] [--passthrough] [--threads N]
//! ```
//! Needs root (mount, `drop_caches`). `READ_AHEAD_KB=N` tries another FUSE read-ahead window;
//! `READ_KB=N` reads N KiB at a time (default 1024); `WARM=1` keeps the page cache between
//! passes; `FUSE_ONLY=1` skips the plain passes (for profiling the FUSE ones).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_fuse::estargz::{Limits, WriteOptions, convert};
use shoal_fuse::{FileSource, FsOptions, Layer};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: u64 = args.first().map_or(Ok(256), |a| a.parse())?;
    let chunks = args.iter().any(|a| a == "--chunks");
    let passthrough = args.iter().any(|a| a == "--passthrough");
    let passes = 3;
    let threads = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(FsOptions::default().threads), |n| n.parse())?;

    let work = tempfile::tempdir_in(".")?;
    let tree = work.path().join("tree");
    let files = write_tree(&tree, mib << 20)?;
    let tar = work.path().join("layer.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()?;
    ensure!(ok.success(), "tar failed");
    let blob = work.path().join("layer.esgz");
    let written = convert(
        File::open(&tar)?,
        File::create(&blob)?,
        &WriteOptions {
            level: 1,
            ..WriteOptions::default()
        },
    )?;
    let source = Arc::new(FileSource::open(&blob)?);
    let layer = Layer::open(source, Some(&written.toc_digest), &Limits::default())?;
    let at = work.path().join("mnt");
    fs::create_dir(&at)?;
    let opts = FsOptions {
        copies_dir: (!chunks).then(|| work.path().join("copies")),
        passthrough,
        threads,
        ..FsOptions::default()
    };
    let mnt = shoal_fuse::fs::mount(Arc::new(layer), &at, opts)?;
    if let Ok(kb) = std::env::var("READ_AHEAD_KB") {
        // Try another read-ahead window than the mount's.
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(&at)?.dev();
        let (major, minor) = (
            ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
            (dev & 0xff) | ((dev >> 12) & !0xff),
        );
        fs::write(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"), kb)?;
    }
    if let Some(materializer) = mnt.materializer() {
        let queued = materializer.run() as u64;
        let started = Instant::now();
        while mnt.stats().local_copies < queued {
            ensure!(started.elapsed() < Duration::from_secs(600), "copies");
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "{queued} copies made in {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
    let (mut plain, mut fuse) = (Vec::new(), Vec::new());
    let fuse_only = std::env::var_os("FUSE_ONLY").is_some();
    for _ in 0..passes {
        plain.push(if fuse_only {
            f64::NAN
        } else {
            read_all(&tree, &files)?
        });
        fuse.push(read_all(&at, &files)?);
    }
    plain.sort_by(f64::total_cmp);
    fuse.sort_by(f64::total_cmp);
    let (p, f) = (plain[passes / 2], fuse[passes / 2]);
    let stats = mnt.stats();
    println!(
        "{} files, {mib} MiB: plain {p:.3} s, FUSE {f:.3} s, ratio {:.2}; {} reads, {:.0} KiB per read",
        files.len(),
        p / f,
        stats.reads,
        stats.bytes as f64 / stats.reads.max(1) as f64 / 1024.0
    );
    drop(mnt);
    Ok(())
}

fn write_tree(dir: &Path, total: u64) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut seed = 0x5eed_u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (mut files, mut written) = (Vec::new(), 0);
    while written < total {
        // log-uniform between 4 KiB (2^12) and 16 MiB (2^24)
        let exp = 12.0 + (next() % 12_000) as f64 / 1000.0;
        let size = (2f64.powf(exp) as u64).min(total - written).max(1);
        let mut bytes = vec![0u8; size as usize];
        for chunk in bytes.chunks_mut(8) {
            let n = chunk.len();
            chunk.copy_from_slice(&next().to_le_bytes()[..n]);
        }
        let name = PathBuf::from(format!("d{}/f{}", files.len() % 16, files.len()));
        fs::create_dir_all(dir.join(&name).parent().context("parent")?)?;
        fs::write(dir.join(&name), &bytes)?;
        files.push(name);
        written += size;
    }
    Ok(files)
}

fn read_all(root: &Path, files: &[PathBuf]) -> Result<f64> {
    let ok = Command::new("sync").status()?;
    ensure!(ok.success(), "sync");
    if std::env::var_os("WARM").is_none() {
        fs::write("/proc/sys/vm/drop_caches", "3\n")?;
    }
    let read_kb: usize = std::env::var("READ_KB").map_or(Ok(1024), |v| v.parse())?;
    let mut buf = vec![0u8; read_kb << 10];
    let started = Instant::now();
    for name in files {
        let mut file = File::open(root.join(name))?;
        while file.read(&mut buf)? > 0 {}
    }
    Ok(started.elapsed().as_secs_f64())
}
