//! What the swarm benchmark prints: the tables (per run, per peer, and the Shoal run's timeline
//! with `--timeline`) or, with `--json` / `--json-file`, one JSON object of the same figures.

use serde_json::{Value, json};

use super::shoal::{NodeStats, ShoalRun};
use super::{Blob, Run};

/// Everything measured, for printing.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) peers: Vec<String>,
    pub(super) rate_mbit: f64,
    pub(super) blob: Blob,
    pub(super) ideal: f64,
    pub(super) seed: bool,
    pub(super) shoal: Option<ShoalRun>,
    pub(super) direct: Option<Run>,
    pub(super) bittorrent: Option<Run>,
    pub(super) kernel: String,
    pub(super) cpus: usize,
    /// `/proc/loadavg` before the runs: the machine may be shared.
    pub(super) load: String,
    /// Print the Shoal run's timeline.
    pub(super) timeline: bool,
}

/// p50, p99 (nearest rank) and max of some times.
#[derive(Debug, Clone, Copy)]
struct Summary {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(times: &[f64]) -> Summary {
        let mut sorted = times.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i]
        };
        Summary {
            p50: rank(0.5),
            p99: rank(0.99),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl Report {
    fn summaries(&self) -> [(&'static str, Option<(&Run, Summary)>); 3] {
        let sum = |r: &Run| Summary::of(&r.times);
        [
            ("shoal", self.shoal.as_ref().map(|s| (&s.run, sum(&s.run)))),
            ("direct", self.direct.as_ref().map(|r| (r, sum(r)))),
            ("bittorrent", self.bittorrent.as_ref().map(|r| (r, sum(r)))),
        ]
    }

    pub(super) fn to_json(&self) -> Value {
        let mut out = json!({
            "peers": self.peers.len(),
            "size": self.blob.size,
            "digest": self.blob.digest,
            "rate_mbit": self.rate_mbit,
            "ideal_s": self.ideal,
            "seed": self.seed,
            "kernel": self.kernel,
            "cpus": self.cpus,
            "loadavg_before": self.load,
            "peer_names": self.peers,
        });
        for (name, run) in self.summaries() {
            let prefix = if name == "shoal" {
                String::new()
            } else {
                format!("{name}_")
            };
            let (times, s, busy, cpu) = match run {
                Some((r, s)) => (json!(r.times), Some(s), json!(r.cpu_busy), json!(r.cpu_s)),
                None => (Value::Null, None, Value::Null, Value::Null),
            };
            out[format!("{prefix}max_s")] = json!(s.map(|s| s.max));
            out[format!("{prefix}p50_s")] = json!(s.map(|s| s.p50));
            out[format!("{prefix}p99_s")] = json!(s.map(|s| s.p99));
            out[format!("{prefix}ratio")] = json!(s.map(|s| s.max / self.ideal));
            out[format!("{prefix}times_s")] = times;
            out[format!("{prefix}cpu_busy")] = busy;
            out[format!("{prefix}cpu_s")] = cpu;
        }
        if let Some(s) = &self.shoal {
            out["upstream_bytes"] = json!(s.upstream_bytes);
            out["upstream_ratio"] = json!(s.upstream_bytes as f64 / self.blob.size as f64);
            out["upstream_requests"] = json!(s.upstream_requests);
            out["max_rss_bytes"] = json!(s.nodes.iter().map(|n| n.peak_rss).max());
            out["nodes"] = s
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name,
                        "rss_bytes": n.peak_rss,
                        "cpu_s": n.cpu_s,
                        "metrics": n.metrics,
                        "timeline": n.timeline,
                    })
                })
                .collect();
        } else {
            out["upstream_bytes"] = Value::Null;
            out["max_rss_bytes"] = Value::Null;
        }
        out
    }

    pub(super) fn print(&self) {
        const MIB: f64 = (1 << 20) as f64;
        println!(
            "{} peers, blob {} bytes ({:.1} MiB), {} Mbit/s per link each way{}; ideal {:.2} s; {} CPUs, kernel {}, load {}",
            self.peers.len(),
            self.blob.size,
            self.blob.size as f64 / MIB,
            self.rate_mbit,
            if self.seed { ", with a seed" } else { "" },
            self.ideal,
            self.cpus,
            self.kernel,
            self.load,
        );
        println!();
        println!(
            "{:<11} {:>8} {:>8} {:>8} {:>10} {:>9} {:>7}",
            "run", "p50 s", "p99 s", "max s", "max/ideal", "CPU busy", "CPU s"
        );
        for (name, run) in self.summaries() {
            if let Some((r, s)) = run {
                println!(
                    "{name:<11} {:>8.2} {:>8.2} {:>8.2} {:>10.3} {:>8.0}% {:>7.1}",
                    s.p50,
                    s.p99,
                    s.max,
                    s.max / self.ideal,
                    r.cpu_busy * 100.0,
                    r.cpu_s
                );
            }
        }
        if let Some(s) = &self.shoal {
            println!();
            println!(
                "registry served {} bytes of the blob during the Shoal run ({:.3}x its size, {} requests)",
                s.upstream_bytes,
                s.upstream_bytes as f64 / self.blob.size as f64,
                s.upstream_requests
            );
            println!(
                "peak node RSS {:.1} MiB",
                s.nodes.iter().map(|n| n.peak_rss).max().unwrap_or(0) as f64 / MIB
            );
        }
        println!();
        let time = |r: Option<&Run>, i: usize| {
            r.and_then(|r| r.times.get(i))
                .map_or("-".to_owned(), |t| format!("{t:.2}"))
        };
        println!(
            "{:<8} {:>8} {:>8} {:>8} | {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>6}",
            "peer",
            "shoal s",
            "direct s",
            "bt s",
            "peers MiB",
            "upstr MiB",
            "sent MiB",
            "wasted",
            "verfail",
            "RSS MiB",
            "CPU s"
        );
        let stats: Vec<Option<&NodeStats>> = (0..self.peers.len())
            .map(|i| self.shoal.as_ref().and_then(|s| s.nodes.get(i)))
            .collect();
        for (i, name) in self.peers.iter().enumerate() {
            print!(
                "{name:<8} {:>8} {:>8} {:>8} |",
                time(self.shoal.as_ref().map(|s| &s.run), i),
                time(self.direct.as_ref(), i),
                time(self.bittorrent.as_ref(), i),
            );
            match stats[i] {
                Some(n) => println!(" {}", node_columns(n)),
                None => println!(),
            }
        }
        if let Some(seed) = self
            .shoal
            .as_ref()
            .and_then(|s| s.nodes.get(self.peers.len()))
        {
            println!(
                "{:<8} {:>8} {:>8} {:>8} | {}",
                seed.name,
                "",
                "",
                "",
                node_columns(seed)
            );
        }
        if let Some(s) = self.shoal.as_ref().filter(|_| self.timeline) {
            print_timeline(s, self.blob.size);
        }
    }
}

/// Each node's share of the blob (%) over the Shoal run, about 25 rows; `*` marks a node
/// that fetched from upstream since the previous row.
fn print_timeline(s: &ShoalRun, size: u64) {
    let end = Summary::of(&s.run.times).max;
    let step = (end / 25.0).max(0.25);
    println!();
    print!("{:>6}", "t s");
    for n in &s.nodes {
        let short = n.name.replace("peer", "p");
        print!(" {short:>5}");
    }
    println!();
    let mut t = 0.0;
    while t < end + step {
        print!("{t:>6.1}");
        for n in &s.nodes {
            let at = |t: f64| n.timeline.iter().rev().find(|x| x[0] <= t);
            match at(t) {
                Some(x) => {
                    let fetching = at(t - step).is_some_and(|y| x[2] > y[2]);
                    let pct = x[1] / size as f64 * 100.0;
                    print!(" {pct:>4.0}{}", if fetching { '*' } else { ' ' });
                }
                None => print!(" {:>5}", "-"),
            }
        }
        println!();
        t += step;
    }
}

fn node_columns(n: &NodeStats) -> String {
    const MIB: f64 = (1 << 20) as f64;
    let m = |k: &str| n.metrics.get(k).copied().unwrap_or(0.0);
    format!(
        "{:>9.1} {:>9.1} {:>9.1} {:>7} {:>7} {:>7.1} {:>6.1}",
        m("bytes_from_peers") / MIB,
        m("bytes_from_upstream") / MIB,
        m("bytes_to_peers") / MIB,
        m("pieces_wasted"),
        m("verification_failures"),
        n.peak_rss as f64 / MIB,
        n.cpu_s
    )
}
