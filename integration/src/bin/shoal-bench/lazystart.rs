//! `shoal-bench lazystart`: how soon a container whose image has one big layer prints its
//! first line, pulled whole onto overlayfs versus mounted lazily by Shoal; then how fast the
//! lazy layer reads once it is all local, beside the same files on overlayfs.
//!
//! Two hosts (network namespaces on one bridge, `10.78.0.0/24`), every link shaped with
//! `tc tbf` to `--rate` both ways: the registry (`.1`) and the client (`.2`), which runs the
//! node and two containerds. The image ([`workload`]) is pushed and converted on the registry
//! host itself (over its loopback, unshaped), so only the pulls cross the shaped link.
//!
//! 1. **overlay**: a plain containerd; `ctr image pull --plain-http` of the plain image, then
//!    `ctr run` until the entrypoint has printed.
//! 2. **lazy**: a fresh node (no blobs) and a containerd using it (`shoal_proxy_config`);
//!    `shoal pull` of the eStargz image, converted with `--prioritize` listing the files the
//!    entrypoint reads, then `ctr run --snapshotter shoal`.
//! 3. **warm**: once the node holds every blob (`shoal_swarm_blobs_completed_total`) and has
//!    made a local copy of every file (`shoal_fuse_local_copies_total`), the same pull and run
//!    again.
//! 4. **reads**, each after dropping the page cache: every file of the layer in order, and
//!    4 KiB random reads over its big files ([`read`]), on the overlayfs snapshot of the plain
//!    image and on the node's FUSE mount of the lazy layer. The node is restarted three times,
//!    to read through the chunks (no copies: `passthrough = false`, `materialize = false`),
//!    from the local copies through FUSE (`passthrough = false`), and with passthrough (the
//!    defaults); before the last two, it has checked its copies again (a restart trusts none).
//!
//! Everything (namespaces, processes, mounts, the temporary directory) is gone when it returns,
//! failed or interrupted; [`report`] prints a table or one JSON object.

mod read;
mod report;
mod workload;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shoal_integration::containerd::{Options, shoal_proxy_config};
use shoal_integration::netns::registry::HostRegistry;
use shoal_integration::netns::{self, Host, Network, Shaping};
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{Containerd, caps, proc, shoal_bin, wait_for_tcp, wait_until};

use self::report::Report;
use self::workload::{READY, Workload};
use crate::swarm::{check_interrupted, watch_signals};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the big layer (the sum of its files), in MiB.
    #[arg(long, default_value_t = 1024)]
    layer_mib: u64,
    /// What the entrypoint reads, in MiB (about: whole files).
    #[arg(long, default_value_t = 10)]
    read_mib: u64,
    /// Rate of both links, each way, in Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// 4 KiB random reads per random-read measurement.
    #[arg(long, default_value_t = 4096)]
    random_reads: u64,
    /// Each read measurement (but those through the chunks, the slowest) is repeated this many
    /// times, each from a cold cache, and the median kept: single passes on a shared VM move
    /// by tens of percent.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "PATH")]
    json_file: Option<PathBuf>,
    /// Keep configs, logs and data in this directory instead of a temporary one.
    #[arg(long)]
    workdir: Option<PathBuf>,
}

const NS_BASE: &str = "shoal-lazystart";
const SUBNET: [u8; 3] = [10, 78, 0];
const REGISTRY_PORT: u16 = 5000;
const SWARM_PORT: u16 = 7071;
const MIRROR_ADDR: &str = "127.0.0.1:7072";
const PLAIN: &str = "bench/lazystart:plain";
const ESGZ: &str = "bench/lazystart:esgz";
/// Layers of the image: busybox and the big one.
const LAYERS: f64 = 2.0;
const CMD_TIMEOUT: Duration = Duration::from_secs(1800);

pub fn run(args: Args) -> Result<()> {
    let tools = [
        "ip",
        "tc",
        "nsenter",
        "docker-registry",
        "skopeo",
        "containerd",
        "ctr",
        "runc",
    ];
    if let Some(why) = caps::missing(&tools).or_else(caps::missing_fuse) {
        bail!("cannot run the lazystart benchmark: {why}");
    }
    ensure!(
        args.layer_mib >= 16 && args.read_mib >= 1 && args.read_mib * 4 <= args.layer_mib,
        "--layer-mib must be at least 16 and 4x --read-mib"
    );
    ensure!(args.rate > 0.0, "--rate must be above 0");
    watch_signals()?;
    for ns in netns::remove_stale(NS_BASE)? {
        eprintln!("removed network namespace {ns}, left by an earlier run");
    }
    let prefix = format!("{NS_BASE}-{}", std::process::id());
    let result = bench(&args, &prefix);
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

/// The whole benchmark; everything it starts is stopped, unmounted and deleted on return.
fn bench(args: &Args, prefix: &str) -> Result<Report> {
    let tmp = tempfile::Builder::new()
        .prefix("shoal-lazystart")
        .tempdir()?;
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
    let client = net.add_host("client", 2)?;

    let workload = Workload::new(args.layer_mib << 20, args.read_mib << 20);
    progress(
        args,
        &format!(
            "image: {} files, {} MiB, the entrypoint reads {} files, {:.1} MiB",
            workload.files.len(),
            workload.layer_bytes() >> 20,
            workload.read_set.len(),
            workload.read_bytes() as f64 / f64::from(1 << 20)
        ),
    );
    let registry = HostRegistry::start(&dir.join("registry"), &registry_host, REGISTRY_PORT)?;
    let (plain, esgz, setup_s) = publish(args, &dir, &workload, &registry)?;
    client
        .run(|| wait_for_tcp(registry.addr(), Duration::from_secs(10)))
        .context("the client cannot reach the registry")?;
    check_interrupted()?;

    progress(args, "overlay: ctr image pull + ctr run");
    let overlay_ctrd = containerd(&dir.join("containerd-overlay"), "", &client)?;
    let started = Instant::now();
    overlay_ctrd.ctr_ok(&["image", "pull", "--plain-http", &plain])?;
    let overlay_pull_s = started.elapsed().as_secs_f64();
    let out = overlay_ctrd.run(&plain, "overlay-1", &[])?;
    let overlay_s = started.elapsed().as_secs_f64();
    check_printed(&out, &workload)?;
    check_interrupted()?;

    progress(args, "lazy: shoal pull + ctr run --snapshotter shoal");
    let mut node = start_node(&dir, &registry, &client, Reads::Passthrough)?;
    let lazy_ctrd = containerd(
        &dir.join("containerd-shoal"),
        &shoal_proxy_config(&node.socket),
        &client,
    )?;
    let lazy = start_lazy(&node, &lazy_ctrd, &esgz, "lazy-1", &workload)?;
    let lazy_upstream = node.metric("shoal_swarm_bytes_from_upstream_total")?;
    let layers = lazy.summary["layers"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    ensure!(
        layers.len() == LAYERS as usize && layers.iter().all(|l| l["outcome"] == "lazy"),
        "every layer should be lazy: {}",
        lazy.summary
    );
    check_interrupted()?;

    progress(args, "waiting for the node to hold the whole layer");
    let ideal = workload.layer_bytes() as f64 * 8.0 / (args.rate * 1e6);
    wait_until(
        Duration::from_secs_f64(120.0 + 4.0 * ideal),
        "the node to hold every layer",
        || {
            check_interrupted()?;
            Ok(node.metric("shoal_swarm_blobs_completed_total")? >= LAYERS)
        },
    )?;
    let complete_s = lazy.started.elapsed().as_secs_f64();
    progress(args, "waiting for the node's local copies of every file");
    let copies_s = wait_for_copies(&node, &workload)?;

    progress(args, "warm: the same pull and run, the image local");
    let warm = start_lazy(&node, &lazy_ctrd, &esgz, "warm-1", &workload)?;
    check_interrupted()?;

    progress(args, "reads: overlayfs snapshot");
    let overlay_dir = overlay_snapshot(&overlay_ctrd)?;
    let big = workload.big_files();
    let (overlay_read, overlay_random) = read::measure(&overlay_dir, &workload, args)?;
    check_interrupted()?;

    progress(
        args,
        "reads: FUSE through the chunks (no copies, no passthrough)",
    );
    node.child.stop()?;
    node = start_node(&dir, &registry, &client, Reads::Chunks)?;
    let chunk_dir = fuse_mount(&node)?;
    let before = Served::of(&node)?;
    let chunk_read = read::read_all(&chunk_dir, &workload.files)?;
    let chunk_random = read::random_reads(&chunk_dir, &big, args.random_reads)?;
    let chunk_served = Served::of(&node)?.since(before);
    check_interrupted()?;

    progress(args, "reads: FUSE from the local copies, passthrough off");
    node.child.stop()?;
    node = start_node(&dir, &registry, &client, Reads::Copies)?;
    let fuse_dir = fuse_mount(&node)?;
    wait_for_copies(&node, &workload)?;
    let before = Served::of(&node)?;
    let (fuse_read, fuse_random) = read::measure(&fuse_dir, &workload, args)?;
    let fuse_served = Served::of(&node)?.since(before);
    check_interrupted()?;

    progress(args, "reads: FUSE, passthrough on");
    node.child.stop()?;
    node = start_node(&dir, &registry, &client, Reads::Passthrough)?;
    let pt_dir = fuse_mount(&node)?;
    wait_for_copies(&node, &workload)?;
    let before = Served::of(&node)?;
    let (pt_read, pt_random) = read::measure(&pt_dir, &workload, args)?;
    let pt_served = Served::of(&node)?.since(before);

    // containerds before the node: their mounts sit on its FUSE layers.
    drop(lazy_ctrd);
    drop(overlay_ctrd);
    drop(node);
    Ok(Report {
        layer_bytes: workload.layer_bytes(),
        files: workload.files.len(),
        read_bytes: workload.read_bytes(),
        read_files: workload.read_set.len(),
        big_files: big.len(),
        repeat: args.repeat.max(1),
        rate_mbit: args.rate,
        setup_s,
        overlay_pull_s,
        overlay_s,
        lazy_pull_s: lazy.pull_s,
        lazy_s: lazy.total_s,
        lazy_upstream_bytes: lazy_upstream as u64,
        complete_s,
        copies_s,
        warm_pull_s: warm.pull_s,
        warm_s: warm.total_s,
        overlay_read,
        chunk_read,
        fuse_read,
        passthrough_read: pt_read,
        overlay_random,
        chunk_random,
        fuse_random,
        passthrough_random: pt_random,
        served: [chunk_served, fuse_served, pt_served],
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
    })
}

/// Builds the image, pushes it and converts it on the registry host; returns the plain and
/// eStargz references and how long that took.
fn publish(
    args: &Args,
    dir: &Path,
    workload: &Workload,
    registry: &HostRegistry,
) -> Result<(String, String, f64)> {
    let started = Instant::now();
    progress(args, "building and pushing the plain image");
    let image = workload.image().build(&dir.join("image"))?;
    let host = registry.host();
    let pushed = host.run(|| image.push(registry.addr(), PLAIN))?;
    drop(image);
    check_interrupted()?;

    progress(args, "shoal convert --prioritize");
    let list = dir.join("prioritize.txt");
    fs::write(&list, workload.prioritize_list())?;
    let config = dir.join("convert.toml");
    fs::write(
        &config,
        format!("[registry]\ninsecure = [{:?}]\n", registry.addr()),
    )?;
    let work = dir.join("convert-work");
    fs::create_dir_all(&work)?;
    let esgz = format!("{}/{ESGZ}", registry.addr());
    let mut cmd = host.command(shoal_bin()?);
    cmd.arg("--config")
        .arg(&config)
        .arg("convert")
        .arg("--prioritize")
        .arg(&list)
        .arg("--work-dir")
        .arg(&work)
        .arg(&pushed.reference)
        .arg(&esgz);
    proc::run_ok(&mut cmd, CMD_TIMEOUT).context("shoal convert")?;
    Ok((pushed.reference, esgz, started.elapsed().as_secs_f64()))
}

fn containerd(dir: &Path, extra: &str, host: &Host) -> Result<Containerd> {
    Containerd::start_with(
        dir,
        Options {
            extra_config: extra.to_owned(),
            netns: Some(host.netns.clone()),
            ctr_timeout: CMD_TIMEOUT,
            ..Options::default()
        },
    )
}

/// How a node's FUSE layers serve reads of local files.
#[derive(Clone, Copy, Debug)]
enum Reads {
    /// Inflating and verifying chunks of the blob: `passthrough = false`, `materialize = false`.
    Chunks,
    /// `pread` of each file's local copy: `passthrough = false` (and `materialize`, the default).
    Copies,
    /// The kernel reads the copies: the defaults.
    Passthrough,
}

/// The node on the client host (same root every time: a restart keeps its blobs, mounts and
/// local copies).
fn start_node(dir: &Path, registry: &HostRegistry, client: &Host, reads: Reads) -> Result<Node> {
    let (passthrough, materialize) = match reads {
        Reads::Chunks => (false, false),
        Reads::Copies => (false, true),
        Reads::Passthrough => (true, true),
    };
    let opts = NodeOptions {
        insecure: vec![registry.addr().to_owned()],
        extra: format!("\n[fuse]\npassthrough = {passthrough}\nmaterialize = {materialize}\n"),
        netns: Some(client.netns.clone()),
        listen: Some(client.addr(SWARM_PORT)),
        mirror: Some(MIRROR_ADDR.to_owned()),
        ..NodeOptions::default()
    };
    Node::start(dir, "node", &opts)
}

/// What the node's FUSE layers did, from its `/metrics`: shows which path the reads took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    /// `read` requests that reached the node.
    pub reads: f64,
    /// Chunks inflated and verified.
    pub chunk_fetches: f64,
    /// Opens handed to the kernel with a backing file.
    pub passthrough_opens: f64,
}

impl Served {
    fn of(node: &Node) -> Result<Self> {
        Ok(Served {
            reads: node.metric("shoal_fuse_reads_total")?,
            chunk_fetches: node.metric("shoal_fuse_chunk_fetches_total")?,
            passthrough_opens: node.metric("shoal_fuse_passthrough_opens_total")?,
        })
    }

    fn since(self, before: Served) -> Served {
        Served {
            reads: self.reads - before.reads,
            chunk_fetches: self.chunk_fetches - before.chunk_fetches,
            passthrough_opens: self.passthrough_opens - before.passthrough_opens,
        }
    }
}

/// Waits until the node has a checked local copy of every file of the layer (its count covers
/// the big layer's files and has stopped growing for 2 s); returns how long that took.
fn wait_for_copies(node: &Node, workload: &Workload) -> Result<f64> {
    let started = Instant::now();
    let mut last = (0.0, Instant::now());
    wait_until(
        Duration::from_secs(600),
        "local copies of every file",
        || {
            check_interrupted()?;
            let copies = node.metric("shoal_fuse_local_copies_total")?;
            if copies != last.0 {
                last = (copies, Instant::now());
            }
            Ok(copies >= workload.files.len() as f64 && last.1.elapsed() >= Duration::from_secs(2))
        },
    )?;
    Ok(last.1.duration_since(started).as_secs_f64())
}

/// One lazy start: `shoal pull`, then `ctr run` to the printed line.
struct Started {
    started: Instant,
    pull_s: f64,
    total_s: f64,
    /// What `shoal pull --json` said.
    summary: serde_json::Value,
}

fn start_lazy(
    node: &Node,
    ctrd: &Containerd,
    image: &str,
    id: &str,
    workload: &Workload,
) -> Result<Started> {
    let config = node.root.parent().context("node home")?.join("shoal.toml");
    let mut cmd: Command = ctrd.command(shoal_bin()?);
    cmd.arg("--config")
        .arg(&config)
        .args(["pull", "--json", "--address"])
        .arg(ctrd.address())
        .args(["--namespace", ctrd.namespace(), "--node"])
        .arg(node.mirror_url())
        .arg(image);
    let started = Instant::now();
    let out = proc::run_ok(&mut cmd, CMD_TIMEOUT).context("shoal pull")?;
    let pull_s = started.elapsed().as_secs_f64();
    let ran = ctrd.run_with(&["--rm", "--snapshotter", "shoal"], image, id, &[])?;
    let total_s = started.elapsed().as_secs_f64();
    check_printed(&ran, workload)?;
    let summary = serde_json::from_str(&out).context("shoal pull --json")?;
    Ok(Started {
        started,
        pull_s,
        total_s,
        summary,
    })
}

fn check_printed(out: &str, workload: &Workload) -> Result<()> {
    let want = format!("{READY} {} bytes", workload.read_bytes());
    ensure!(
        out.trim() == want,
        "the container printed {out:?}, not {want:?}"
    );
    Ok(())
}

/// The overlayfs snapshot directory holding the big layer.
fn overlay_snapshot(ctrd: &Containerd) -> Result<PathBuf> {
    let snapshots = ctrd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    for entry in fs::read_dir(&snapshots)? {
        let fs_dir = entry?.path().join("fs");
        if fs_dir.join(workload::ENTRYPOINT).is_file() {
            return Ok(fs_dir);
        }
    }
    bail!(
        "no overlayfs snapshot under {} has the layer",
        snapshots.display()
    )
}

/// The node's FUSE mount of the big layer.
fn fuse_mount(node: &Node) -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(' ');
            let point = fields.nth(1)?;
            let kind = fields.next()?;
            kind.starts_with("fuse").then(|| PathBuf::from(point))
        })
        .find(|p| p.starts_with(&node.root) && p.join(workload::ENTRYPOINT).is_file())
        .with_context(|| format!("no FUSE mount of the layer under {}", node.root.display()))
}

fn progress(args: &Args, what: &str) {
    if !args.json {
        eprintln!("== {what}");
    }
}
