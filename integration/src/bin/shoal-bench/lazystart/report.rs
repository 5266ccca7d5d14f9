//! The lazystart figures: a table, or one JSON object (`--json`), with the ratios the targets
//! are stated in. Read ratios are defined so that 1.0 means "as fast as overlayfs":
//! `fuse_read_ratio` = overlayfs time / FUSE time (target >= 0.8), while
//! `random_read_ratio` = FUSE time / overlayfs time (target <= 1.5), as the targets say.
//!
//! "FUSE" is a node's steady state once it holds the layer: reads through FUSE, answered from
//! the files' verified local copies, passthrough off. "Chunks" is the same without copies
//! (every read inflates and verifies chunks of the blob), "passthrough" the default, with the
//! kernel reading the copies itself.

use serde_json::{Value, json};

use super::Served;
use super::read::Timed;

/// Lazy start at least this many times faster than overlayfs.
const SPEEDUP_TARGET: f64 = 20.0;
/// Lazy start at most this many seconds slower than a warm one.
const WARM_GAP_TARGET: f64 = 2.0;
const READ_TARGET: f64 = 0.8;
const RANDOM_TARGET: f64 = 1.5;

#[derive(Debug)]
pub struct Report {
    pub layer_bytes: u64,
    pub files: usize,
    pub read_bytes: u64,
    pub read_files: usize,
    pub big_files: usize,
    /// Passes per read measurement (the median is kept).
    pub repeat: usize,
    pub rate_mbit: f64,
    /// Building, pushing and converting the image (not measured against anything).
    pub setup_s: f64,
    pub overlay_pull_s: f64,
    pub overlay_s: f64,
    pub lazy_pull_s: f64,
    pub lazy_s: f64,
    /// Bytes the node had fetched from the registry when the container had printed.
    pub lazy_upstream_bytes: u64,
    /// From the lazy pull's start until the node held every layer whole.
    pub complete_s: f64,
    /// From then until the node had a verified local copy of every file.
    pub copies_s: f64,
    pub warm_pull_s: f64,
    pub warm_s: f64,
    pub overlay_read: Timed,
    pub chunk_read: Timed,
    pub fuse_read: Timed,
    pub passthrough_read: Timed,
    pub overlay_random: Timed,
    pub chunk_random: Timed,
    pub fuse_random: Timed,
    pub passthrough_random: Timed,
    /// What the node did during the chunk, copy and passthrough measurements.
    pub served: [Served; 3],
    pub kernel: String,
    pub cpus: usize,
    pub load: String,
}

impl Report {
    fn speedup(&self) -> f64 {
        self.overlay_s / self.lazy_s
    }

    fn warm_gap(&self) -> f64 {
        self.lazy_s - self.warm_s
    }

    fn read_ratio(&self, fuse: &Timed) -> f64 {
        self.overlay_read.secs / fuse.secs
    }

    fn random_ratio(&self, fuse: &Timed) -> f64 {
        fuse.secs / self.overlay_random.secs
    }

    fn served_json(&self) -> Value {
        let served = ["chunks", "fuse", "passthrough"].iter().zip(&self.served);
        Value::Object(
            served
                .map(|(name, s)| {
                    let counts = json!({ "fuse_reads": s.reads, "chunk_fetches": s.chunk_fetches, "passthrough_opens": s.passthrough_opens });
                    (name.to_string(), counts)
                })
                .collect(),
        )
    }

    pub fn to_json(&self) -> Value {
        let timed = |t: &Timed| json!({ "s": t.secs, "bytes": t.bytes, "ops": t.ops, "mib_per_s": t.mib_per_s(), "op_us": t.op_us() });
        json!({
            "overlay_s": self.overlay_s,
            "lazy_s": self.lazy_s,
            "warm_s": self.warm_s,
            "fuse_read_ratio": self.read_ratio(&self.fuse_read),
            "passthrough_read_ratio": self.read_ratio(&self.passthrough_read),
            "chunk_read_ratio": self.read_ratio(&self.chunk_read),
            "random_read_ratio": self.random_ratio(&self.fuse_random),
            "passthrough_random_read_ratio": self.random_ratio(&self.passthrough_random),
            "chunk_random_read_ratio": self.random_ratio(&self.chunk_random),
            "speedup": self.speedup(),
            "targets": {
                "speedup_20x": self.speedup() >= SPEEDUP_TARGET,
                "lazy_within_2s_of_warm": self.warm_gap() <= WARM_GAP_TARGET,
                "fuse_read_ratio_0_8": self.read_ratio(&self.fuse_read) >= READ_TARGET,
                "passthrough_read_ratio_0_8": self.read_ratio(&self.passthrough_read) >= READ_TARGET,
                "random_read_ratio_1_5": self.random_ratio(&self.fuse_random) <= RANDOM_TARGET,
            },
            "overlay_pull_s": self.overlay_pull_s,
            "lazy_pull_s": self.lazy_pull_s,
            "warm_pull_s": self.warm_pull_s,
            "lazy_upstream_bytes": self.lazy_upstream_bytes,
            "complete_s": self.complete_s,
            "copies_s": self.copies_s,
            "setup_s": self.setup_s,
            "reads": {
                "overlay": timed(&self.overlay_read),
                "chunks": timed(&self.chunk_read),
                "fuse": timed(&self.fuse_read),
                "passthrough": timed(&self.passthrough_read),
            },
            "random_reads": {
                "overlay": timed(&self.overlay_random),
                "chunks": timed(&self.chunk_random),
                "fuse": timed(&self.fuse_random),
                "passthrough": timed(&self.passthrough_random),
            },
            "image": {
                "layer_bytes": self.layer_bytes,
                "files": self.files,
                "read_bytes": self.read_bytes,
                "read_files": self.read_files,
                "big_files": self.big_files,
            },
            "read_repeat": self.repeat,
            "served": self.served_json(),
            "rate_mbit": self.rate_mbit,
            "machine": { "cpus": self.cpus, "load": self.load, "kernel": self.kernel },
        })
    }

    pub fn print(&self) {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        println!(
            "lazystart: {} files, {:.0} MiB in the big layer; the entrypoint reads {} files, {:.1} MiB; links {} Mbit/s",
            self.files,
            mib(self.layer_bytes),
            self.read_files,
            mib(self.read_bytes),
            self.rate_mbit
        );
        println!(
            "machine: {} CPUs, load {} at the start, kernel {}; setup (build, push, convert) {:.1} s\n",
            self.cpus, self.load, self.kernel, self.setup_s
        );
        println!("start to the printed line        pull s   total s");
        println!(
            "  overlayfs (ctr pull + run)  {:>9.2} {:>9.2}",
            self.overlay_pull_s, self.overlay_s
        );
        println!(
            "  Shoal lazy (shoal pull + run){:>8.2} {:>9.2}   ({:.1} MiB from the registry by then)",
            self.lazy_pull_s,
            self.lazy_s,
            mib(self.lazy_upstream_bytes)
        );
        println!(
            "  Shoal warm (image local)    {:>9.2} {:>9.2}",
            self.warm_pull_s, self.warm_s
        );
        println!(
            "  the node held the whole layer {:.1} s after the lazy pull began, and a local copy of every file {:.1} s later\n",
            self.complete_s, self.copies_s
        );
        println!(
            "whole layer, cold cache (median of {}; chunks: 1)   s   MiB/s   vs overlayfs",
            self.repeat
        );
        for (name, t) in [
            ("overlayfs snapshot", &self.overlay_read),
            ("FUSE, chunks (no copies)", &self.chunk_read),
            ("FUSE (local copies)", &self.fuse_read),
            ("passthrough", &self.passthrough_read),
        ] {
            println!(
                "  {name:<26} {:>7.2} {:>9.1} {:>9.2}",
                t.secs,
                t.mib_per_s(),
                self.read_ratio(t)
            );
        }
        println!(
            "\n4 KiB random reads ({} over {} big files), cold   s   us/read  time vs overlayfs",
            self.overlay_random.ops, self.big_files
        );
        for (name, t) in [
            ("overlayfs snapshot", &self.overlay_random),
            ("FUSE, chunks (no copies)", &self.chunk_random),
            ("FUSE (local copies)", &self.fuse_random),
            ("passthrough", &self.passthrough_random),
        ] {
            println!(
                "  {name:<26} {:>7.2} {:>9.0} {:>9.2}",
                t.secs,
                t.op_us(),
                self.random_ratio(t)
            );
        }
        println!("\nwhat the node served over each FUSE measurement (all passes)");
        for (name, s) in ["chunks", "local copies", "passthrough"]
            .iter()
            .zip(&self.served)
        {
            println!(
                "  {name:<26} {:>8.0} FUSE reads {:>8.0} chunks inflated {:>6.0} passthrough opens",
                s.reads, s.chunk_fetches, s.passthrough_opens
            );
        }
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        println!("\ntargets");
        println!(
            "  lazy start 20x faster than overlayfs: {:.1}x  {}",
            self.speedup(),
            met(self.speedup() >= SPEEDUP_TARGET)
        );
        println!(
            "  lazy within 2 s of warm: {:+.2} s  {}",
            self.warm_gap(),
            met(self.warm_gap() <= WARM_GAP_TARGET)
        );
        for (name, t) in [
            ("FUSE", &self.fuse_read),
            ("passthrough", &self.passthrough_read),
        ] {
            let r = self.read_ratio(t);
            println!(
                "  whole-layer reads, {name}, >= 0.8 of overlayfs: {r:.2}  {}",
                met(r >= READ_TARGET)
            );
        }
        let r = self.random_ratio(&self.fuse_random);
        println!(
            "  random reads (FUSE) within 1.5x: {r:.2}x  {}",
            met(r <= RANDOM_TARGET)
        );
    }
}
