//! `shoal-bench swarm`: N peers fetch one blob at the same moment, each on its own host (a
//! network namespace) whose link is shaped to the same rate both ways, and the same blob is
//! then distributed two other ways under the same shaping for comparison:
//!
//! 1. **Shoal**: a tracker host, one `shoal node` per peer host (and a `shoal seed` host with
//!    `--seed`); every peer GETs the blob from its own node's registry mirror.
//! 2. **direct**: every peer GETs the blob from the registry itself.
//! 3. **BitTorrent**: opentracker on the tracker host, the first aria2c seeder on the registry
//!    host, an aria2c leecher per peer host.
//!
//! Only the distribution is timed: from the moment every peer asks (a barrier releases all
//! requests at once, on connections opened beforehand) to each peer's last byte; every copy is
//! then checked against the blob's digest. The figures are compared with the ideal, the blob's
//! size divided by the link rate, which no peer can beat since its download is capped at that
//! rate. For Shoal, it also reports what the registry served (its request log), and each node's
//! peak RSS, CPU time and swarm counters (`/metrics`).
//!
//! Layout on `10.77.0.0/24`: registry `.1`, tracker `.2`, seed `.3`, peers from `.10`.
//! Namespaces are named `shoal-bench-<pid>-<host>` and deleted however the run ends;
//! SIGINT / SIGTERM end it cleanly too.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use shoal_integration::netns::bittorrent::{Leecher, OpenTracker, Seeder, Torrent};
use shoal_integration::netns::registry::{self, HostRegistry};
use shoal_integration::netns::{self, Host, Network, Shaping};
use shoal_integration::shoal::{Node, NodeOptions, Tracker, TrackerOptions};
use shoal_integration::{ImageBuilder, caps, http, random_bytes, wait_for_tcp, wait_until};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Peers: hosts that each fetch the blob.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Blob size in bytes (random data, stored uncompressed: the layer is this big plus a few
    /// hundred bytes of tar and gzip framing).
    #[arg(long, default_value_t = 64 << 20)]
    size: usize,
    /// Rate of every host link, each way, in Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "PATH")]
    json_file: Option<PathBuf>,
    /// Add a `shoal seed` host (without one, one node back-sources the blob).
    #[arg(long)]
    seed: bool,
    /// Skip the Shoal run.
    #[arg(long)]
    no_shoal: bool,
    /// Skip the direct-from-registry baseline.
    #[arg(long)]
    no_direct: bool,
    /// Skip the BitTorrent baseline.
    #[arg(long)]
    no_bittorrent: bool,
    /// Give up on a run after this many seconds [default: 60 + 3 x peers x ideal].
    #[arg(long)]
    timeout: Option<f64>,
    /// Extra `[p2p]` setting for every node and seed, as TOML `key = value` (repeatable).
    #[arg(long = "p2p", value_name = "KEY=VALUE")]
    p2p: Vec<String>,
    /// Also print how the blob spread: each node's share of it, every few seconds.
    #[arg(long)]
    timeline: bool,
    /// Keep configs, logs and data in this directory instead of a temporary one.
    #[arg(long)]
    workdir: Option<PathBuf>,
}

const NS_BASE: &str = "shoal-bench";
const SUBNET: [u8; 3] = [10, 77, 0];
const REGISTRY_PORT: u16 = 5000;
const TRACKER_PORT: u16 = 7070;
const OPENTRACKER_PORT: u16 = 6969;
const SWARM_PORT: u16 = 7071;
const MIRROR_ADDR: &str = "127.0.0.1:7072";
const REPO: &str = "bench/blob";
/// Seed of the blob's bytes: the same blob every run.
const DATA_SEED: u64 = 0x054f_414c;
/// Linux reports process CPU times in these ticks per second (USER_HZ).
const USER_HZ: f64 = 100.0;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(args: Args) -> Result<()> {
    let tools = [
        "ip",
        "tc",
        "nsenter",
        "docker-registry",
        "skopeo",
        "opentracker",
        "mktorrent",
        "aria2c",
    ];
    if let Some(why) = caps::missing(&tools) {
        bail!("cannot run the swarm benchmark: {why}");
    }
    ensure!((1..=240).contains(&args.peers), "--peers must be 1..=240");
    ensure!(
        args.size > 0 && args.rate > 0.0,
        "--size and --rate must be above 0"
    );
    for kv in &args.p2p {
        ensure!(kv.contains('='), "--p2p {kv:?} is not key=value");
    }
    watch_signals()?;
    for ns in netns::remove_stale(NS_BASE)? {
        eprintln!("removed network namespace {ns}, left by an earlier run");
    }
    let prefix = format!("{NS_BASE}-{}", std::process::id());
    let result = bench(&args, &prefix);
    // Everything is dropped by now: check that no namespace of ours survived.
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|ns| ns.starts_with(&format!("{prefix}-")))
        .collect();
    let report = result?;
    ensure!(left.is_empty(), "network namespaces left behind: {left:?}");
    let json = serde_json::to_string_pretty(&report.to_json())?;
    if let Some(path) = &args.json_file {
        fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        report.print();
    }
    Ok(())
}

/// The whole benchmark; every process and namespace it makes is gone when it returns.
fn bench(args: &Args, prefix: &str) -> Result<Report> {
    let tmp = tempfile::tempdir()?;
    let dir = match &args.workdir {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.canonicalize()?
        }
        None => tmp.path().to_owned(),
    };
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();

    progress(args, "network namespaces");
    let mut net = Network::new(prefix, SUBNET, Some(Shaping::rate(args.rate)))?;
    let registry_host = net.add_host("registry", 1)?;
    let tracker_host = net.add_host("tracker", 2)?;
    let seed_host = if args.seed {
        Some(net.add_host("seed", 3)?)
    } else {
        None
    };
    let peers = (0..args.peers)
        .map(|i| net.add_host(&format!("peer{i}"), 10 + i as u8))
        .collect::<Result<Vec<_>>>()?;

    progress(args, "registry and a one-layer image");
    let registry = HostRegistry::start(&dir.join("registry"), &registry_host, REGISTRY_PORT)?;
    let image = ImageBuilder::new()
        .layer([("blob", random_bytes(DATA_SEED, args.size))])
        .compression_level(0)
        .build(&dir.join("image"))?;
    let pushed = registry_host.run(|| image.push(registry.addr(), &format!("{REPO}:latest")))?;
    let (digest, blob_size) = pushed
        .layers
        .first()
        .cloned()
        .context("the image has no layer")?;
    let blob_file = image
        .layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    for peer in &peers {
        peer.run(|| wait_for_tcp(registry.addr(), Duration::from_secs(10)))
            .with_context(|| format!("{} cannot reach the registry", peer.label))?;
    }
    let blob = Blob {
        digest,
        size: blob_size,
    };
    let ideal = blob.size as f64 * 8.0 / (args.rate * 1e6);
    let timeout = Duration::from_secs_f64(
        args.timeout
            .unwrap_or(60.0 + 3.0 * args.peers as f64 * ideal),
    );
    let setup = Setup {
        args,
        dir: &dir,
        registry: &registry,
        tracker_host: &tracker_host,
        seed_host: seed_host.as_ref(),
        peers: &peers,
        blob: &blob,
        timeout,
    };

    let shoal = if args.no_shoal {
        None
    } else {
        progress(args, "Shoal run");
        Some(shoal_run(&setup)?)
    };
    let direct = if args.no_direct {
        None
    } else {
        progress(args, "direct run");
        let targets = peers
            .iter()
            .map(|p| {
                let url = format!("http://{}/v2/{REPO}/blobs/{}", registry.addr(), blob.digest);
                (p.clone(), format!("http://{}/v2/", registry.addr()), url)
            })
            .collect();
        Some(fetch_all(targets, &blob, timeout, &[registry.pid()])?)
    };
    let bittorrent = if args.no_bittorrent {
        None
    } else {
        progress(args, "BitTorrent run");
        Some(bittorrent_run(&setup, &registry_host, &blob_file)?)
    };
    Ok(Report {
        peers: peers.iter().map(|p| p.label.clone()).collect(),
        rate_mbit: args.rate,
        blob,
        ideal,
        seed: args.seed,
        shoal,
        direct,
        bittorrent,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: thread::available_parallelism().map_or(0, |n| n.get()),
        load: load
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        timeline: args.timeline,
    })
}

/// What the runs share.
struct Setup<'a> {
    args: &'a Args,
    dir: &'a Path,
    registry: &'a HostRegistry,
    tracker_host: &'a Host,
    seed_host: Option<&'a Host>,
    peers: &'a [Host],
    blob: &'a Blob,
    timeout: Duration,
}

#[derive(Clone, Debug)]
struct Blob {
    digest: String,
    size: u64,
}

/// One way of distributing the blob, measured.
#[derive(Debug)]
struct Run {
    /// When every peer asked.
    start: Instant,
    /// Seconds from the common start to each peer's last byte, in peer order.
    times: Vec<f64>,
    /// Share of all CPUs busy during the run (1.0: CPU-bound), whoever kept them busy.
    cpu_busy: f64,
    /// CPU seconds the run's own processes used (this one's clients included).
    cpu_s: f64,
}

#[derive(Debug)]
struct ShoalRun {
    run: Run,
    upstream_bytes: u64,
    upstream_requests: usize,
    nodes: Vec<NodeStats>,
}

/// A node's figures at the end of the Shoal run, before it is stopped.
#[derive(Debug)]
struct NodeStats {
    name: String,
    peak_rss: u64,
    cpu_s: f64,
    /// `shoal_swarm_*` samples from `/metrics`, without the prefix and `_total`.
    metrics: BTreeMap<String, f64>,
    /// (seconds since the start, bytes held, of which from upstream, bytes sent to peers).
    timeline: Vec<[f64; 4]>,
}

fn shoal_run(s: &Setup) -> Result<ShoalRun> {
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

/// GETs a blob on every host at the same moment: `(host, warm-up URL, blob URL)`. Each client
/// opens its connection with the warm-up request, waits at a barrier, then streams the blob
/// through sha256. Returns each peer's completion time.
fn fetch_all(
    targets: Vec<(Host, String, String)>,
    blob: &Blob,
    timeout: Duration,
    servers: &[Option<u32>],
) -> Result<Run> {
    let n = targets.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let (tx, rx) = mpsc::channel();
    for (i, (host, warm, url)) in targets.into_iter().enumerate() {
        let (barrier, tx, blob) = (barrier.clone(), tx.clone(), blob.clone());
        thread::spawn(move || {
            // Every thread reaches the barrier, ready or not, so a failure cannot hang the rest.
            let client = netns::enter(&host.netns).and_then(|()| {
                let client = reqwest::blocking::Client::builder()
                    .timeout(timeout)
                    .build()?;
                client.get(&warm).send()?.error_for_status()?.bytes()?;
                Ok(client)
            });
            barrier.wait();
            let result = client
                .and_then(|c| fetch_and_check(&c, &url, &blob))
                .with_context(|| format!("{}: GET {url}", host.label));
            let _ = tx.send((i, result));
        });
    }
    drop(tx);
    barrier.wait();
    let start = Instant::now();
    let cpu = CpuMeter::start(servers)?;
    let mut ends = vec![None; n];
    let mut left = n;
    while left > 0 {
        check_interrupted()?;
        ensure!(
            start.elapsed() < timeout,
            "{left} of {n} peers still fetching after {timeout:?}"
        );
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((i, result)) => {
                ends[i] = Some(result?);
                left -= 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("a fetch thread died"),
        }
    }
    let (cpu_busy, cpu_s) = cpu.finish(&[])?;
    let times = ends
        .into_iter()
        .map(|e| e.map_or(f64::NAN, |end| (end - start).as_secs_f64()))
        .collect();
    Ok(Run {
        start,
        times,
        cpu_busy,
        cpu_s,
    })
}

/// Streams `url` through sha256; the instant its last byte arrived, if it is the blob.
fn fetch_and_check(client: &reqwest::blocking::Client, url: &str, blob: &Blob) -> Result<Instant> {
    let mut response = client.get(url).send()?;
    ensure!(response.status().is_success(), "HTTP {}", response.status());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = response.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let end = Instant::now();
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    ensure!(
        got == blob.digest && len == blob.size,
        "got {len} bytes with digest {got}, expected {} bytes of {}",
        blob.size,
        blob.digest
    );
    Ok(end)
}

fn bittorrent_run(s: &Setup, seed_host: &Host, blob_file: &Path) -> Result<Run> {
    let dir = s.dir.join("bittorrent");
    let seed_data = dir.join("seed-data");
    fs::create_dir_all(&seed_data)?;
    let data = seed_data.join("blob");
    if fs::hard_link(blob_file, &data).is_err() {
        fs::copy(blob_file, &data)?;
    }
    let announce = format!("http://{}/announce", s.tracker_host.addr(OPENTRACKER_PORT));
    let torrent = Torrent::make(&data, &announce, &dir.join("blob.torrent"))?;
    let tracker = OpenTracker::start(
        &dir.join("opentracker"),
        s.tracker_host,
        OPENTRACKER_PORT,
        &[&torrent.info_hash],
    )?;
    let seeder = Seeder::start(&dir.join("seeder"), seed_host, &torrent, &seed_data)?;
    wait_until(
        Duration::from_secs(120),
        "the BitTorrent seeder to register",
        || {
            check_interrupted()?;
            Ok(tracker.seeders(&torrent.info_hash)? >= 1)
        },
    )?;

    let start = SystemTime::now();
    let started = Instant::now();
    let cpu = CpuMeter::start(&[seeder.pid(), tracker.pid()])?;
    let mut leechers = s
        .peers
        .iter()
        .map(|host| Leecher::start(&dir.join(&host.label), host, &torrent))
        .collect::<Result<Vec<_>>>()?;
    let mut done: Vec<Option<SystemTime>> = vec![None; leechers.len()];
    while done.iter().any(Option::is_none) {
        check_interrupted()?;
        let left = done.iter().filter(|d| d.is_none()).count();
        ensure!(
            started.elapsed() < s.timeout,
            "{left} BitTorrent leechers still downloading after {:?}",
            s.timeout
        );
        for (leecher, d) in leechers.iter_mut().zip(&mut done) {
            if d.is_none() {
                *d = leecher.finished_at()?;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let leecher_pids: Vec<Option<u32>> = leechers.iter().map(Leecher::pid).collect();
    let (cpu_busy, cpu_s) = cpu.finish(&leecher_pids)?;
    let files: Vec<PathBuf> = leechers.iter().map(Leecher::file).collect();
    drop(leechers);
    for (file, host) in files.iter().zip(s.peers) {
        let got = sha256_file(file)?;
        ensure!(
            got == s.blob.digest,
            "{}'s BitTorrent copy has digest {got}, expected {}",
            host.label,
            s.blob.digest
        );
    }
    let times = done
        .into_iter()
        .map(|d| {
            d.and_then(|t| t.duration_since(start).ok())
                .map_or(f64::NAN, |t| t.as_secs_f64())
        })
        .collect();
    Ok(Run {
        start: started,
        times,
        cpu_busy,
        cpu_s,
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// CPU seconds of this process and `pids` (0 for any that has gone).
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .chain([&std::process::id()])
        .filter_map(|&pid| process_cpu_seconds(pid).ok())
        .sum()
}

/// Utime + stime of a process, from `/proc/PID/stat`.
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').context("odd /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / USER_HZ)
}

/// CPU use during a run: system-wide (`/proc/stat`), and by the run's processes.
struct CpuMeter {
    busy: u64,
    total: u64,
    pids: Vec<u32>,
    procs: f64,
}

impl CpuMeter {
    /// Starts measuring; `pids` (and this process) are the run's processes so far.
    fn start(pids: &[Option<u32>]) -> Result<CpuMeter> {
        let (busy, total) = Self::read()?;
        let pids: Vec<u32> = pids.iter().flatten().copied().collect();
        Ok(CpuMeter {
            busy,
            total,
            procs: cpu_seconds(&pids),
            pids,
        })
    }

    /// (share of all CPUs busy, CPU seconds of the run's processes) since `start`; `new_pids`
    /// are processes started since, counted whole.
    fn finish(&self, new_pids: &[Option<u32>]) -> Result<(f64, f64)> {
        let (busy, total) = Self::read()?;
        let new: Vec<u32> = new_pids.iter().flatten().copied().collect();
        let procs = cpu_seconds(&self.pids) - self.procs + cpu_seconds(&new);
        Ok((
            (busy - self.busy) as f64 / (total - self.total).max(1) as f64,
            procs,
        ))
    }

    fn read() -> Result<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat")?;
        let line = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        ensure!(v.len() >= 5, "odd /proc/stat: {line}");
        // user nice system idle iowait irq softirq steal ...; idle and iowait are not busy.
        let total: u64 = v.iter().take(8).sum();
        Ok((total - v[3] - v[4], total))
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into [`check_interrupted`] errors, so that the run unwinds
/// through its guards (stopping processes, deleting namespaces) instead of dying on the spot.
fn watch_signals() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term, mut hup) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        INTERRUPTED.store(true, Ordering::SeqCst);
        eprintln!("shoal-bench: interrupted, cleaning up");
    });
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn progress(args: &Args, what: &str) {
    if !args.json {
        eprintln!("== {what}");
    }
}

/// Everything measured, for printing.
#[derive(Debug)]
struct Report {
    peers: Vec<String>,
    rate_mbit: f64,
    blob: Blob,
    ideal: f64,
    seed: bool,
    shoal: Option<ShoalRun>,
    direct: Option<Run>,
    bittorrent: Option<Run>,
    kernel: String,
    cpus: usize,
    /// `/proc/loadavg` before the runs: the machine may be shared.
    load: String,
    /// Print the Shoal run's timeline.
    timeline: bool,
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

    fn to_json(&self) -> Value {
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

    fn print(&self) {
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
