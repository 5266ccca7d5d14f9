//! The read measurements: every file of the layer in order (like `tar -c` to /dev/null, one
//! thread, 1 MiB reads), and seeded 4 KiB random reads over the big files (one thread, `pread`;
//! the kernel sees they are not sequential and does not read ahead, on ext4 as on FUSE).
//!
//! [`measure`] repeats both and keeps the medians. Each measurement starts cold: dirty pages are written and the page cache, dentries and
//! inodes dropped (`echo 3 > /proc/sys/vm/drop_caches`), for the whole machine.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shoal_integration::proc;

use super::Args;
use super::workload::{SplitMix, Workload};

/// Size of one random read.
pub const RANDOM_READ: u64 = 4096;

/// Time and bytes of one measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timed {
    pub secs: f64,
    pub bytes: u64,
    /// Reads issued (random reads only).
    pub ops: u64,
}

impl Timed {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1 << 20) / self.secs
    }

    /// Mean latency of one op, in microseconds.
    pub fn op_us(&self) -> f64 {
        self.secs * 1e6 / self.ops.max(1) as f64
    }
}

pub fn drop_caches() -> Result<()> {
    proc::run_ok(&mut Command::new("sync"), Duration::from_secs(300))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").context("dropping the page cache")
}

/// Both measurements on `root`, each `args.repeat` times, alternating; the median of each.
pub fn measure(root: &Path, workload: &Workload, args: &Args) -> Result<(Timed, Timed)> {
    let big = workload.big_files();
    let (mut all, mut random) = (Vec::new(), Vec::new());
    for pass in 1..=args.repeat.max(1) {
        let (whole, some) = (
            read_all(root, &workload.files)?,
            random_reads(root, &big, args.random_reads)?,
        );
        // Single passes, to show how far they spread around the median.
        eprintln!(
            "   pass {pass}: whole layer {:.3} s, random reads {:.3} s ({})",
            whole.secs,
            some.secs,
            root.display()
        );
        all.push(whole);
        random.push(some);
    }
    Ok((median(all), median(random)))
}

fn median(mut runs: Vec<Timed>) -> Timed {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    runs[runs.len() / 2]
}

/// Reads every file of `files` (relative paths) under `root`, cold; checks their sizes.
pub fn read_all(root: &Path, files: &[(String, u64)]) -> Result<Timed> {
    drop_caches()?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut bytes = 0;
    for (path, size) in files {
        let path = root.join(path);
        let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut got = 0;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        ensure!(got == *size, "{}: {got} bytes, not {size}", path.display());
        bytes += got;
    }
    Ok(Timed {
        secs: start.elapsed().as_secs_f64(),
        bytes,
        ops: files.len() as u64,
    })
}

/// `count` random 4 KiB reads (the same sequence every time) over `files` under `root`, cold.
pub fn random_reads(root: &Path, files: &[&(String, u64)], count: u64) -> Result<Timed> {
    ensure!(!files.is_empty(), "no big files to read at random");
    drop_caches()?;
    let start = Instant::now();
    let open = files
        .iter()
        .map(|(path, size)| {
            let file = File::open(root.join(path))
                .with_context(|| format!("opening {}", root.join(path).display()))?;
            Ok((file, *size))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut rng = SplitMix(0x4b1d);
    let mut buf = vec![0u8; RANDOM_READ as usize];
    for _ in 0..count {
        let (file, size) = &open[(rng.next() % open.len() as u64) as usize];
        let blocks = size / RANDOM_READ;
        let offset = (rng.next() % blocks.max(1)) * RANDOM_READ;
        let len = RANDOM_READ.min(size - offset) as usize;
        file.read_exact_at(&mut buf[..len], offset)
            .context("random read")?;
    }
    Ok(Timed {
        secs: start.elapsed().as_secs_f64(),
        bytes: count * RANDOM_READ,
        ops: count,
    })
}
