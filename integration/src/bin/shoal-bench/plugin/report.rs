//! What `shoal-bench plugin` measured, and how it is shown: a table for people, one JSON
//! object for scripts. Percentiles are nearest-rank; throughput is in MB/s (10^6 bytes/s).

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Latencies of one snapshotter, in operation order, and the names it committed.
#[derive(Default)]
pub(super) struct Ops {
    pub prepare: Vec<Duration>,
    pub mounts: Vec<Duration>,
    pub commit: Vec<Duration>,
    pub total: Vec<Duration>,
    pub names: Vec<String>,
}

/// What the machine is, for the record.
pub(super) struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    containerd: String,
    /// `/proc/loadavg`'s 1, 5 and 15 minute figures when the benchmark started and ended.
    load_before: String,
    pub load_after: String,
}

pub(super) fn load_average() -> Result<String> {
    let text = std::fs::read_to_string("/proc/loadavg")?;
    Ok(text
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

impl Machine {
    pub fn probe() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default();
        let version = std::process::Command::new("containerd")
            .arg("--version")
            .output()
            .context("running containerd --version")?;
        Ok(Machine {
            cores: std::thread::available_parallelism()?.get(),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            containerd: String::from_utf8_lossy(&version.stdout).trim().to_owned(),
            load_before: load_average()?,
            load_after: String::new(),
        })
    }
}

/// Everything measured.
pub(super) struct Report {
    pub machine: Machine,
    pub snapshots: usize,
    pub chain_depth: usize,
    pub blob_bytes: usize,
    /// Shoal's, then the built-in's (so in every pair below).
    pub snaps: [Ops; 2],
    /// CPU seconds during the timed snapshot phase: [containerd, shoal node] per side.
    pub snapshot_cpu: [[f64; 2]; 2],
    pub writes: Vec<Duration>,
    pub reads: [Vec<Duration>; 2],
    /// CPU seconds during all timed reads: [containerd, shoal node] per side.
    pub read_cpu: [[f64; 2]; 2],
    /// Single reads of the blob by other paths, for finding where the time goes.
    pub diagnostics: Vec<(&'static str, Duration)>,
}

/// The `p`-th percentile (nearest rank) in milliseconds.
fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

impl Report {
    fn ops(&self) -> [(&'static str, [&[Duration]; 2]); 4] {
        let [s, b] = &self.snaps;
        [
            ("Prepare", [&s.prepare, &b.prepare]),
            ("Mounts", [&s.mounts, &b.mounts]),
            ("Commit", [&s.commit, &b.commit]),
            ("Prepare+Mounts+Commit", [&s.total, &b.total]),
        ]
    }

    fn read_mbps(&self, side: usize) -> Vec<f64> {
        self.reads[side]
            .iter()
            .map(|d| mb_per_s(self.blob_bytes, *d))
            .collect()
    }

    fn ratio(&self, p: f64) -> f64 {
        let [s, b] = &self.snaps;
        percentile_ms(&s.total, p) / percentile_ms(&b.total, p)
    }

    fn content_ratio(&self) -> f64 {
        median(self.read_mbps(0)) / median(self.read_mbps(1))
    }

    pub fn to_json(&self) -> Value {
        let stats = |d: &[Duration]| {
            let mean = d.iter().sum::<Duration>().as_secs_f64() * 1e3 / d.len() as f64;
            json!({
                "p50_ms": round(percentile_ms(d, 50.0), 4),
                "p99_ms": round(percentile_ms(d, 99.0), 4),
                "mean_ms": round(mean, 4),
                "max_ms": round(percentile_ms(d, 100.0), 4),
            })
        };
        let mut snapshot = serde_json::Map::new();
        for (i, side) in ["shoal", "builtin"].into_iter().enumerate() {
            let mut ops = serde_json::Map::new();
            for (name, samples) in self.ops() {
                ops.insert(name.to_lowercase(), stats(samples[i]));
            }
            let [containerd, shoal] = self.snapshot_cpu[i];
            ops.insert(
                "cpu_seconds".into(),
                json!({"containerd": round(containerd, 2), "shoal": round(shoal, 2)}),
            );
            snapshot.insert(side.into(), ops.into());
        }
        let content = |i: usize| {
            let [containerd, shoal] = self.read_cpu[i];
            let reads = self.reads[i].len() as f64;
            let mbps = self.read_mbps(i);
            json!({
                "read_mbps": mbps.iter().map(|v| round(*v, 1)).collect::<Vec<_>>(),
                "read_median_mbps": round(median(mbps), 1),
                "write_mbps": round(mb_per_s(self.blob_bytes, self.writes[i]), 1),
                "read_cpu_seconds_per_read": {
                    "containerd": round(containerd / reads, 2),
                    "shoal": round(shoal / reads, 2),
                },
            })
        };
        let diagnostics: serde_json::Map<String, Value> = self
            .diagnostics
            .iter()
            .map(|(what, d)| {
                let mbps = round(mb_per_s(self.blob_bytes, *d), 1);
                ((*what).to_owned(), json!(mbps))
            })
            .collect();
        json!({
            "machine": {
                "cores": self.machine.cores,
                "cpu": self.machine.cpu,
                "kernel": self.machine.kernel,
                "containerd": self.machine.containerd,
                "load_average_before": self.machine.load_before,
                "load_average_after": self.machine.load_after,
            },
            "snapshots": self.snapshots,
            "chain_depth": self.chain_depth,
            "snapshot_p50_ratio": round(self.ratio(50.0), 3),
            "snapshot_p99_ratio": round(self.ratio(99.0), 3),
            "snapshot": snapshot,
            "blob_bytes": self.blob_bytes,
            "page_cache": "warm: one untimed read of the blob per store before the timed reads",
            "content_read_ratio": round(self.content_ratio(), 3),
            "content": {
                "shoal": content(0),
                "builtin": content(1),
                "diagnostics_mbps": diagnostics,
            },
        })
    }

    pub fn print(&self) {
        let m = &self.machine;
        println!(
            "\nmachine: {} cores ({}), kernel {}, {}\nload average before {}, after {}",
            m.cores, m.cpu, m.kernel, m.containerd, m.load_before, m.load_after
        );
        println!(
            "\nSnapshots: {} per snapshotter in chains of {}, through containerd's gRPC API (ms)",
            self.snapshots, self.chain_depth
        );
        println!(
            "{:<24} {:>9} {:>9} {:>6}   {:>9} {:>9} {:>6}",
            "operation", "p50 shoal", "p50 ovl", "ratio", "p99 shoal", "p99 ovl", "ratio"
        );
        for (name, [s, b]) in self.ops() {
            let (s50, b50) = (percentile_ms(s, 50.0), percentile_ms(b, 50.0));
            let (s99, b99) = (percentile_ms(s, 99.0), percentile_ms(b, 99.0));
            println!(
                "{name:<24} {s50:>9.3} {b50:>9.3} {:>6.2}   {s99:>9.3} {b99:>9.3} {:>6.2}",
                s50 / b50,
                s99 / b99
            );
        }
        let [[sc, ss], [bc, _]] = self.snapshot_cpu;
        println!(
            "CPU for the timed snapshots: shoal side {sc:.2} s containerd + {ss:.2} s shoal node; \
             built-in {bc:.2} s containerd"
        );
        println!(
            "\nContent: Read of a {} MiB blob through containerd's socket, page cache warm \
             (one untimed read first), {} reads each (MB/s = 10^6 B/s)",
            self.blob_bytes >> 20,
            self.reads[0].len()
        );
        println!(
            "{:<22} {:>10} {:>8} {:>8} {:>11} {:>15}",
            "store", "median", "min", "max", "write MB/s", "CPU s per read"
        );
        for (i, name) in ["shoal (proxy)", "built-in local"].into_iter().enumerate() {
            let mbps = self.read_mbps(i);
            let min = mbps.iter().copied().fold(f64::INFINITY, f64::min);
            let max = mbps.iter().copied().fold(0.0, f64::max);
            let [c, s] = self.read_cpu[i];
            let n = self.reads[i].len() as f64;
            let cpu = if i == 0 {
                format!("{:.2}+{:.2}", c / n, s / n)
            } else {
                format!("{:.2}", c / n)
            };
            println!(
                "{name:<22} {:>10.0} {min:>8.0} {max:>8.0} {:>11.0} {cpu:>15}",
                median(mbps.clone()),
                mb_per_s(self.blob_bytes, self.writes[i])
            );
        }
        println!(
            "content_read_ratio (shoal / built-in): {:.2}",
            self.content_ratio()
        );
        println!("diagnostics (one read each, MB/s):");
        for (what, d) in &self.diagnostics {
            println!("  {what:<60} {:>8.0}", mb_per_s(self.blob_bytes, *d));
        }
        println!(
            "\nsnapshot_p50_ratio {:.2}  snapshot_p99_ratio {:.2}  content_read_ratio {:.2}",
            self.ratio(50.0),
            self.ratio(99.0),
            self.content_ratio()
        );
    }
}
