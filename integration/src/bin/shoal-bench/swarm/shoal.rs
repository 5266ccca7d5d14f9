//! The Shoal run: a tracker, one `shoal node` per peer host (and a `shoal seed` with `--seed`),
//! every peer GETting the blob from its own node's registry mirror at the same moment. Besides
//! the times, it collects what the registry served and each node's peak RSS, CPU time, swarm
//! counters, and a timeline of those counters sampled during the run.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use shoal_integration::netns::{self, Host, registry};
use shoal_integration::shoal::{Node, NodeOptions, Tracker, TrackerOptions};
use shoal_integration::{http, wait_until};

use super::cpu::process_cpu_seconds;
use super::direct::fetch_all;
use super::{MIRROR_ADDR, REPO, Run, SWARM_PORT, Setup, TRACKER_PORT};

#[derive(Debug)]
pub(super) struct ShoalRun {
    pub(super) run: Run,
    pub(super) upstream_bytes: u64,
    pub(super) upstream_requests: usize,
    pub(super) nodes: Vec<NodeStats>,
}

/// A node's figures at the end of the Shoal run, before it is stopped.
#[derive(Debug)]
pub(super) struct NodeStats {
    pub(super) name: String,
    pub(super) peak_rss: u64,
    pub(super) cpu_s: f64,
    /// `shoal_swarm_*` samples from `/metrics`, without the prefix and `_total`.
    pub(super) metrics: BTreeMap<String, f64>,
    /// (seconds since the start, bytes held, of which from upstream, bytes sent to peers).
    pub(super) timeline: Vec<[f64; 4]>,
}

pub(super) fn run(s: &Setup) -> Result<ShoalRun> {
    let dir = s.dir.join("shoal");
    let tracker = Tracker::start_with(
        &dir.join("tracker"),
        &TrackerOptions {
            netns: Some(s.tracker_host.netns.clone()),
            listen: Some(s.tracker_host.addr(TRACKER_PORT)),
        },
    )?;
    let mut extra = s.args.p2p.join("\n");
    extra.push('\n');
    let options = |host: &Host| NodeOptions {
        insecure: vec![s.registry.addr().to_owned()],
        tracker: Some(tracker.url()),
        // Appended right after the `[p2p]` keys the harness writes: they land in that section.
        extra: extra.clone(),
        netns: Some(host.netns.clone()),
        listen: Some(host.addr(SWARM_PORT)),
        mirror: Some(MIRROR_ADDR.to_owned()),
        ..NodeOptions::default()
    };
    let mut seed = match s.seed_host {
        Some(host) => Some(Node::start(
            &dir,
            "seed",
            &NodeOptions {
                seed: true,
                ..options(host)
            },
        )?),
        None => None,
    };
    let mut nodes = s
        .peers
        .iter()
        .map(|host| Node::start(&dir, &host.label, &options(host)))
        .collect::<Result<Vec<_>>>()?;
    // The seed has to be known to the tracker before anyone asks, or a node back-sources.
    // Only seeds announce before they are asked for a blob.
    if seed.is_some() {
        let url = format!("{}/metrics", tracker.url());
        s.tracker_host.run(|| {
            wait_until(
                Duration::from_secs(10),
                "the seed's first heartbeat",
                || {
                    let text = http::get_text(&url)?;
                    Ok(text
                        .lines()
                        .filter_map(|l| l.strip_prefix("shoal_tracker_peers "))
                        .any(|v| v.trim().parse::<f64>().is_ok_and(|v| v >= 1.0)))
                },
            )
        })?;
    }
    let before = s.registry.requests()?.len();
    let targets = s
        .peers
        .iter()
        .map(|host| {
            let base = format!("http://{MIRROR_ADDR}");
            let url = format!(
                "{base}/v2/{REPO}/blobs/{}?ns={}",
                s.blob.digest,
                s.registry.addr()
            );
            (host.clone(), format!("{base}/v2/"), url)
        })
        .collect();
    let pids: Vec<Option<u32>> = nodes
        .iter()
        .chain(&seed)
        .map(|n| n.child.pid())
        .chain([tracker.child.pid(), s.registry.pid()])
        .collect();
    let all: Vec<&Node> = nodes.iter().chain(&seed).collect();
    let sampler = Sampler::start(&all);
    let run = fetch_all(targets, s.blob, s.timeout, &pids);
    let timelines = sampler.finish();
    let run = match run {
        Ok(run) => run,
        Err(e) => {
            // Nodes still streaming to abandoned clients would each take the whole stop grace.
            for node in nodes.iter_mut().chain(seed.iter_mut()) {
                let _ = node.child.kill();
            }
            return Err(e);
        }
    };
    let stats = all
        .iter()
        .zip(timelines)
        .map(|(node, samples)| {
            let mut stats = node_stats(node)?;
            stats.timeline = samples
                .iter()
                .filter(|x| x.at >= run.start)
                .map(|x| {
                    let t = (x.at - run.start).as_secs_f64();
                    [t, x.have, x.upstream, x.sent]
                })
                .collect();
            Ok(stats)
        })
        .collect::<Result<Vec<_>>>()?;
    let after = s.registry.requests()?;
    let served = &after[before.min(after.len())..];
    Ok(ShoalRun {
        run,
        upstream_bytes: registry::blob_bytes(served, &s.blob.digest),
        upstream_requests: served
            .iter()
            .filter(|r| r.is_blob_get(&s.blob.digest))
            .count(),
        nodes: stats,
    })
}

fn node_stats(node: &Node) -> Result<NodeStats> {
    let pid = node.child.pid().context("the node has exited")?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?
        * 1024;
    Ok(NodeStats {
        name: node.name.clone(),
        peak_rss,
        cpu_s: process_cpu_seconds(pid)?,
        metrics: swarm_metrics(&node.metrics_text()?),
        timeline: Vec::new(),
    })
}

/// The `shoal_swarm_*` samples of a `/metrics` page, named without the prefix and `_total`.
fn swarm_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| {
            let name = k.split('{').next()?.strip_prefix("shoal_swarm_")?;
            let name = name.strip_suffix("_total").unwrap_or(name);
            Some((name.to_owned(), v.trim().parse::<f64>().ok()?))
        })
        .fold(BTreeMap::new(), |mut m, (k, v)| {
            *m.entry(k).or_insert(0.0) += v;
            m
        })
}

/// One reading of a node's counters.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    have: f64,
    upstream: f64,
    sent: f64,
}

/// Reads every node's counters a few times a second while the Shoal run lasts, to show how
/// the blob spread (who was waiting on whom).
struct Sampler {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    const EVERY: Duration = Duration::from_millis(250);

    fn start(nodes: &[&Node]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = nodes
            .iter()
            .map(|node| {
                let (stop, netns) = (stop.clone(), node.netns.clone());
                let url = format!("{}/metrics", node.mirror_url());
                thread::spawn(move || {
                    let mut samples = Vec::new();
                    if let Some(ns) = netns
                        && netns::enter(&ns).is_err()
                    {
                        return samples;
                    }
                    let Ok(client) = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(5))
                        .build()
                    else {
                        return samples;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        if let Ok(text) = client.get(&url).send().and_then(|r| r.text()) {
                            let m = swarm_metrics(&text);
                            let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
                            let upstream = get("bytes_from_upstream");
                            samples.push(Sample {
                                at,
                                have: get("bytes_from_peers") + upstream,
                                upstream,
                                sent: get("bytes_to_peers"),
                            });
                        }
                        thread::sleep(Self::EVERY.saturating_sub(at.elapsed()));
                    }
                    samples
                })
            })
            .collect();
        Sampler { stop, threads }
    }

    fn finish(self) -> Vec<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap_or_default())
            .collect()
    }
}
