//! The image `lazystart` measures: busybox plus one big layer of many random files, and an
//! entrypoint that reads a few MB of them and prints one line.
//!
//! File sizes are log-uniform between 4 KiB and 16 MiB (seeded, so every run builds the same
//! layer): a few big files hold most of the bytes, many small ones make the tree. The files
//! the entrypoint reads are spread over the whole layer, so only prioritization (`shoal convert
//! --prioritize`) puts them at its front.

use std::fmt::Write as _;

use shoal_integration::image::FileEntry;
use shoal_integration::{ImageBuilder, random_bytes};

/// Seed of the sizes and of every file's bytes.
const SEED: u64 = 0x1a2b_5747;
const MIN_FILE: u64 = 4 << 10;
const MAX_FILE: u64 = 16 << 20;
/// Files of at least this size are the "big files" of the random-read test.
pub const BIG_FILE: u64 = 1 << 20;
/// The entrypoint, in the big layer (so it is lazy too).
pub const ENTRYPOINT: &str = "app/start.sh";
/// What the entrypoint prints before the byte count.
pub const READY: &str = "lazystart: read";

/// The layer's files and which of them the entrypoint reads.
#[derive(Debug)]
pub struct Workload {
    /// (path relative to the image root, size), in layer order.
    pub files: Vec<(String, u64)>,
    /// Indexes into `files` of what the entrypoint reads.
    pub read_set: Vec<usize>,
}

impl Workload {
    /// Files adding up to `layer_bytes`, and a read set of about `read_bytes`.
    pub fn new(layer_bytes: u64, read_bytes: u64) -> Workload {
        let mut rng = SplitMix(SEED);
        let (lo, hi) = ((MIN_FILE as f64).ln(), (MAX_FILE as f64).ln());
        let mut files = Vec::new();
        let mut total = 0;
        while total < layer_bytes {
            let unit = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            let size = ((lo + unit * (hi - lo)).exp() as u64).min(layer_bytes - total);
            let i = files.len();
            files.push((format!("data/d{:02}/f{i:05}", i % 16), size));
            total += size;
        }
        // Spread over the layer: every `stride`-th file that is not too big for the budget.
        let cap = (read_bytes / 4).max(MIN_FILE);
        let stride = (files.len() / 24).max(1);
        let mut read_set = Vec::new();
        let mut read = 0;
        'outer: for start in 0..stride {
            for i in (start..files.len()).step_by(stride) {
                if read >= read_bytes {
                    break 'outer;
                }
                if files[i].1 <= cap && !read_set.contains(&i) {
                    read_set.push(i);
                    read += files[i].1;
                }
            }
        }
        Workload { files, read_set }
    }

    pub fn layer_bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }

    pub fn read_bytes(&self) -> u64 {
        self.read_set.iter().map(|&i| self.files[i].1).sum()
    }

    /// The big files, for random reads.
    pub fn big_files(&self) -> Vec<&(String, u64)> {
        self.files.iter().filter(|(_, s)| *s >= BIG_FILE).collect()
    }

    /// `sh` script that reads the read set and prints `READY <bytes> bytes`.
    pub fn script(&self) -> String {
        let mut script = String::from("#!/bin/sh\nn=$(cat");
        for &i in &self.read_set {
            let _ = write!(script, " /{}", self.files[i].0);
        }
        let _ = writeln!(script, " | wc -c)\necho \"{READY} $n bytes\"");
        script
    }

    /// The `--prioritize` list: what the container touches, in order.
    pub fn prioritize_list(&self) -> String {
        let mut list = format!("bin/busybox\n{ENTRYPOINT}\n");
        for &i in &self.read_set {
            list.push_str(&self.files[i].0);
            list.push('\n');
        }
        list
    }

    /// busybox, and the big layer (level-1 gzip: random bytes do not shrink anyway).
    pub fn image(&self) -> ImageBuilder {
        let mut entries = vec![FileEntry::new(ENTRYPOINT, self.script().into_bytes()).mode(0o755)];
        for (i, (path, size)) in self.files.iter().enumerate() {
            entries.push(FileEntry::new(
                path.clone(),
                random_bytes(SEED ^ i as u64, *size as usize),
            ));
        }
        ImageBuilder::new()
            .busybox()
            .layer_entries(entries)
            .compression_level(1)
            .cmd(&["/bin/sh", &format!("/{ENTRYPOINT}")])
    }
}

/// SplitMix64: the harness's deterministic generator (as in `random_bytes`).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_read_set_add_up() {
        let w = Workload::new(128 << 20, 10 << 20);
        assert_eq!(w.layer_bytes(), 128 << 20);
        assert!(w.read_bytes() >= 10 << 20 && w.read_bytes() < 14 << 20);
        assert!(w.files.len() > 30, "{} files", w.files.len());
        assert!(!w.big_files().is_empty());
    }
}
