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
//!
//! This module sets the hosts up and runs the benchmark; each run lives beside it: [`shoal`],
//! [`direct`] (whose concurrent, timed GETs the Shoal run reuses) and [`bittorrent`], with
//! [`cpu`] metering what they cost and [`report`] printing the tables or the JSON object.

mod bittorrent;
mod cpu;
mod direct;
mod report;
mod shoal;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shoal_integration::netns::registry::HostRegistry;
use shoal_integration::netns::{self, Host, Network, Shaping};
use shoal_integration::{ImageBuilder, caps, random_bytes, wait_for_tcp};

use report::Report;

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
        Some(shoal::run(&setup)?)
    };
    let direct = if args.no_direct {
        None
    } else {
        progress(args, "direct run");
        Some(direct::run(&setup)?)
    };
    let bittorrent = if args.no_bittorrent {
        None
    } else {
        progress(args, "BitTorrent run");
        Some(bittorrent::run(&setup, &registry_host, &blob_file)?)
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

/// Turns SIGINT, SIGTERM and SIGHUP into [`check_interrupted`] errors, so that the run unwinds
/// through its guards (stopping processes, deleting namespaces) instead of dying on the spot.
pub(crate) fn watch_signals() -> Result<()> {
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

pub(crate) fn check_interrupted() -> Result<()> {
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
