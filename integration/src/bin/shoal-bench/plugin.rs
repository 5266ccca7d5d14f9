//! `shoal-bench plugin`: Shoal's containerd plugin beside containerd's built-in equivalents,
//! measured in the same run, always through containerd's own gRPC socket so that both paths pay
//! for containerd's metadata layer (its bolt database) and only the backend differs.
//!
//! Two private containerd 1.6 daemons run side by side: one with Shoal (`shoal node`) as proxy
//! snapshotter *and* content store (`io.containerd.content.v1.content` disabled), one with the
//! defaults (the `overlayfs` snapshotter and the local content store).
//!
//! 1. **Snapshots**: `--snapshots` snapshots per snapshotter, each a `Prepare` + `Mounts` +
//!    `Commit`, made the way containerd unpacks images: in parent chains of `--chain-depth`
//!    layers (key `extract-… <chainID>`, committed as the chain ID, labelled
//!    `containerd.io/snapshot.ref`), under a lease as `ctr` and the CRI use. Chains alternate
//!    between the two containerds so that drift on the machine hits both alike. Each operation's
//!    latency is taken at the client; a warm-up chain per snapshotter is not counted. The
//!    snapshots are removed afterwards and the lease is deleted with a synchronous garbage
//!    collection, which removes them from the backends too (checked on Shoal's socket).
//! 2. **Content**: a seeded random blob of `--blob-mib` MiB is written into each content store
//!    through containerd's `Write` (STAT, 1 MiB WRITEs, COMMIT), the page cache is flushed to
//!    disk (`sync`) and the blob is read once, untimed, from each store, which checks its digest
//!    and leaves it in the page cache. Then `--reads` timed reads of the whole blob through
//!    containerd's `Read` alternate between the stores; the median throughput is reported.
//!    As diagnostics it also reads Shoal's socket directly, once as one stream and once as
//!    containerd's proxy does (one `Read` call per 1 MiB), and both blob files from disk.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateRequest, DeleteContentRequest, DeleteRequest, ReadContentRequest, WriteAction,
    WriteContentRequest,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{Containerd, caps, random_bytes};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshots made (Prepare + Mounts + Commit) in each snapshotter.
    #[arg(long, default_value_t = 1000)]
    snapshots: usize,
    /// Layers per image: snapshots are made in parent chains this long, as containerd unpacks
    /// an image's layers (overlay cannot mount much more than 100 lower dirs in practice).
    #[arg(long, default_value_t = 10)]
    chain_depth: usize,
    /// Size of the blob read from each content store, in MiB.
    #[arg(long, default_value_t = 1024)]
    blob_mib: usize,
    /// Timed reads of the whole blob from each content store.
    #[arg(long, default_value_t = 5)]
    reads: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// containerd namespace and lease every request of the benchmark uses.
const NAMESPACE: &str = "shoal-bench";
const LEASE: &str = "shoal-bench";
/// Seed of the blob's bytes: the same blob every run.
const BLOB_SEED: u64 = 0x5_4f41_4c;
/// containerd's proxy writer and its own `Read` both move content in 1 MiB messages.
const CHUNK: usize = 1 << 20;
const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Linux reports process CPU times in these ticks per second (USER_HZ).
const USER_HZ: f64 = 100.0;

pub fn run(args: Args) -> Result<()> {
    if let Some(why) = caps::missing(&["containerd", "ctr"]) {
        bail!("cannot run the plugin benchmark: {why}");
    }
    ensure!(
        args.snapshots > 0 && args.chain_depth > 0,
        "--snapshots and --chain-depth must be above 0"
    );
    ensure!(
        args.blob_mib > 0 && args.reads > 0,
        "--blob-mib and --reads must be above 0"
    );
    // Declared first, dropped last: after the daemons that live in it are stopped.
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    progress(&args, "starting shoal node and two private containerd 1.6");
    let node = Node::start(dir, "shoal", &NodeOptions::default())?;
    let with_shoal = Containerd::start(&dir.join("containerd-shoal"), &proxy_config(&node))?;
    let builtin = Containerd::start(&dir.join("containerd-builtin"), "")?;
    let daemons = Daemons {
        shoal: pid(&node.child)?,
        containerd_shoal: containerd_pid(&with_shoal)?,
        containerd_builtin: containerd_pid(&builtin)?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        tokio::select! {
            report = bench(&args, &node, &with_shoal, &builtin, &daemons) => report,
            signal = interrupted() => signal.and_then(|()| bail!("interrupted")),
        }
    });
    drop(rt);
    // Stopped in this order whatever happened: containerds first, then the node they use.
    drop((builtin, with_shoal, node));
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.print();
    }
    Ok(())
}

/// Shoal as both snapshotter and content store, the built-in content store disabled.
fn proxy_config(node: &Node) -> String {
    let socket = node.socket.display();
    format!(
        "disabled_plugins = [\"io.containerd.content.v1.content\"]\n\n\
         [proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{socket}\"\n\n\
         [proxy_plugins.shoal-content]\n  type = \"content\"\n  address = \"{socket}\"\n"
    )
}

async fn bench(
    args: &Args,
    node: &Node,
    with_shoal: &Containerd,
    builtin: &Containerd,
    daemons: &Daemons,
) -> Result<Report> {
    let shoal = Side::connect("shoal", "shoal", with_shoal.address()).await?;
    let overlay = Side::connect("built-in", "overlayfs", builtin.address()).await?;
    let machine = Machine::probe()?;

    progress(args, "snapshots: Prepare + Mounts + Commit");
    let mut snaps = [Ops::default(), Ops::default()];
    for (side, ops) in [&shoal, &overlay].into_iter().zip(&mut snaps) {
        // Untimed: containerd dials the proxy lazily, and both warm their databases.
        let warm = side.chain("warmup", args.chain_depth, None).await?;
        side.remove_snapshots(&warm).await?;
        ops.names.reserve(args.snapshots);
    }
    let (cpu_shoal, cpu_builtin) = (daemons.shoal_cpu()?, daemons.builtin_cpu()?);
    for chain in 0..args.snapshots.div_ceil(args.chain_depth) {
        let depth = args.chain_depth.min(args.snapshots - chain * args.chain_depth);
        for (side, ops) in [&shoal, &overlay].into_iter().zip(&mut snaps) {
            let names = side.chain(&chain.to_string(), depth, Some(ops)).await?;
            ops.names.extend(names);
        }
    }
    let snapshot_cpu = [
        since(daemons.shoal_cpu()?, cpu_shoal),
        since(daemons.builtin_cpu()?, cpu_builtin),
    ];
    for (side, ops) in [&shoal, &overlay].into_iter().zip(&snaps) {
        side.remove_snapshots(&ops.names).await?;
    }

    progress(args, &format!("content: writing a {} MiB blob", args.blob_mib));
    let data = random_bytes(BLOB_SEED, args.blob_mib << 20);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    let mut writes = Vec::new();
    for side in [&shoal, &overlay] {
        writes.push(side.write_blob(&digest, &data).await?);
    }
    let size = data.len();
    drop(data);
    // Dirty pages are written back now rather than during the timed reads.
    let synced = std::process::Command::new("sync").status()?;
    ensure!(synced.success(), "sync failed: {synced}");
    progress(args, "content: one warm-up read per store (checks the digest)");
    for side in [&shoal, &overlay] {
        side.read_blob(&digest, size, true).await?;
    }
    progress(args, &format!("content: {} timed reads per store", args.reads));
    let mut reads = [Vec::new(), Vec::new()];
    let (cpu_shoal, cpu_builtin) = (daemons.shoal_cpu()?, daemons.builtin_cpu()?);
    for _ in 0..args.reads {
        for (side, times) in [&shoal, &overlay].into_iter().zip(&mut reads) {
            times.push(side.read_blob(&digest, size, false).await?);
        }
    }
    let read_cpu = [
        since(daemons.shoal_cpu()?, cpu_shoal),
        since(daemons.builtin_cpu()?, cpu_builtin),
    ];

    progress(args, "content: diagnostics (Shoal's socket directly, blob files)");
    let direct = Side::direct(&node.socket).await?;
    let blob_file = |root: &Path| root.join(digest.trim_start_matches("sha256:"));
    let diagnostics = vec![
        (
            "shoal socket, one Read stream",
            direct.read_blob(&digest, size, false).await?,
        ),
        (
            "shoal socket, one Read per MiB (as containerd's proxy)",
            direct.read_in_calls(&digest, size).await?,
        ),
        (
            "shoal blob file",
            read_file(&blob_file(&node.root.join("store/blobs")))?,
        ),
        (
            "built-in blob file",
            read_file(&blob_file(
                &builtin
                    .root()
                    .join("io.containerd.content.v1.content/blobs/sha256"),
            ))?,
        ),
    ];

    progress(args, "cleaning up: content, lease, garbage collection");
    for side in [&shoal, &overlay] {
        side.delete_blob(&digest).await?;
        side.delete_lease().await?;
    }
    let left = direct.backend_snapshots().await?;
    ensure!(
        left.is_empty(),
        "snapshots left in Shoal after containerd's garbage collection: {left:?}"
    );

    Ok(Report {
        machine,
        snapshots: args.snapshots,
        chain_depth: args.chain_depth,
        blob_bytes: size,
        snaps,
        snapshot_cpu,
        writes,
        reads,
        read_cpu,
        diagnostics,
    })
}

/// One containerd (or, for diagnostics, Shoal's socket itself) and the snapshotter used in it.
struct Side {
    label: &'static str,
    snapshotter: &'static str,
    channel: Channel,
    /// Whether requests go through containerd (namespace and lease) or straight to Shoal.
    containerd: bool,
}

/// Latencies of one snapshotter, in operation order, and the names it committed.
#[derive(Default)]
struct Ops {
    prepare: Vec<Duration>,
    mounts: Vec<Duration>,
    commit: Vec<Duration>,
    total: Vec<Duration>,
    names: Vec<String>,
}

impl Side {
    async fn connect(label: &'static str, snapshotter: &'static str, socket: &Path) -> Result<Self> {
        let side = Side {
            label,
            snapshotter,
            channel: containerd_client::connect(socket)
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?,
            containerd: true,
        };
        let lease = CreateRequest {
            id: LEASE.to_owned(),
            labels: HashMap::new(),
        };
        LeasesClient::new(side.channel.clone())
            .create(side.request(lease))
            .await
            .with_context(|| format!("creating a lease in {label}'s containerd"))?;
        Ok(side)
    }

    async fn direct(socket: &Path) -> Result<Self> {
        Ok(Side {
            label: "shoal (direct)",
            snapshotter: "shoal",
            channel: containerd_client::connect(socket).await?,
            containerd: false,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if self.containerd {
            let md = request.metadata_mut();
            md.insert("containerd-namespace", MetadataValue::from_static(NAMESPACE));
            md.insert("containerd-lease", MetadataValue::from_static(LEASE));
        }
        request
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone()).max_decoding_message_size(2 * CHUNK)
    }

    /// Unpacks an image of `depth` empty layers, as containerd's unpacker calls the
    /// snapshotter, plus the `Mounts` a container start asks for; returns the committed names.
    async fn chain(&self, id: &str, depth: usize, mut ops: Option<&mut Ops>) -> Result<Vec<String>> {
        let mut client = self.snapshots();
        let mut parent = String::new();
        let mut names = Vec::with_capacity(depth);
        for layer in 0..depth {
            let name = format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("chain {id} layer {layer}")))
            );
            let key = format!("extract-{id}-{layer} {name}");
            let labels = HashMap::from([(SNAPSHOT_REF.to_owned(), name.clone())]);
            let what = || format!("{} snapshot {key:?}", self.label);
            let start = Instant::now();
            let prepared = client
                .prepare(self.request(PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: labels.clone(),
                }))
                .await
                .with_context(|| format!("preparing {}", what()))?;
            let prepared_at = Instant::now();
            let mounts = client
                .mounts(self.request(MountsRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key: key.clone(),
                }))
                .await
                .with_context(|| format!("mounts of {}", what()))?;
            let mounted_at = Instant::now();
            client
                .commit(self.request(CommitSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    name: name.clone(),
                    key: key.clone(),
                    labels,
                    ..Default::default()
                }))
                .await
                .with_context(|| format!("committing {}", what()))?;
            let committed_at = Instant::now();
            let mounts = mounts.into_inner().mounts;
            ensure!(
                !mounts.is_empty() && mounts == prepared.into_inner().mounts,
                "{}: Mounts differs from what Prepare returned: {mounts:?}",
                what()
            );
            if let Some(ops) = ops.as_deref_mut() {
                ops.prepare.push(prepared_at - start);
                ops.mounts.push(mounted_at - prepared_at);
                ops.commit.push(committed_at - mounted_at);
                ops.total.push(committed_at - start);
            }
            names.push(name.clone());
            parent = name;
        }
        Ok(names)
    }

    /// Removes `names` through containerd, children first.
    async fn remove_snapshots(&self, names: &[String]) -> Result<()> {
        let mut client = self.snapshots();
        for name in names.iter().rev() {
            client
                .remove(self.request(RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.to_owned(),
                    key: name.clone(),
                }))
                .await
                .with_context(|| format!("removing {} snapshot {name}", self.label))?;
        }
        Ok(())
    }

    /// Names of the snapshots the backend still has (asked of Shoal's socket directly).
    async fn backend_snapshots(&self) -> Result<Vec<String>> {
        let request = ListSnapshotsRequest {
            snapshotter: self.snapshotter.to_owned(),
            ..Default::default()
        };
        let mut stream = self.snapshots().list(self.request(request)).await?.into_inner();
        let mut names = Vec::new();
        while let Some(batch) = stream.message().await? {
            names.extend(batch.info.into_iter().map(|i| i.name));
        }
        Ok(names)
    }

    /// Writes and commits `data`, one answered message at a time as containerd's proxy writer
    /// does; returns how long it took.
    async fn write_blob(&self, digest: &str, data: &[u8]) -> Result<Duration> {
        let r#ref = format!("shoal-bench-{digest}");
        let start = Instant::now();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let stat = WriteContentRequest {
            action: WriteAction::Stat.into(),
            r#ref: r#ref.clone(),
            total: data.len() as i64,
            expected: digest.to_owned(),
            ..Default::default()
        };
        tx.send(stat).await?;
        let mut answers = self
            .content()
            .write(self.request(ReceiverStream::new(rx)))
            .await
            .with_context(|| format!("opening a write to {}", self.label))?
            .into_inner();
        answers.message().await?.context("no answer to STAT")?;
        let mut offset = 0;
        for chunk in data.chunks(CHUNK) {
            tx.send(WriteContentRequest {
                action: WriteAction::Write.into(),
                offset: offset as i64,
                data: chunk.to_vec(),
                ..Default::default()
            })
            .await?;
            let answer = answers.message().await?.context("write stream ended")?;
            offset += chunk.len();
            ensure!(answer.offset == offset as i64, "{} lost a write", self.label);
        }
        tx.send(WriteContentRequest {
            action: WriteAction::Commit.into(),
            offset: offset as i64,
            total: data.len() as i64,
            expected: digest.to_owned(),
            ..Default::default()
        })
        .await?;
        let answer = answers.message().await?.context("no answer to COMMIT")?;
        ensure!(answer.digest == digest, "{} committed {}", self.label, answer.digest);
        Ok(start.elapsed())
    }

    /// Reads the whole blob in one `Read` call; returns how long it took.
    async fn read_blob(&self, digest: &str, size: usize, verify: bool) -> Result<Duration> {
        let start = Instant::now();
        let request = ReadContentRequest {
            digest: digest.to_owned(),
            offset: 0,
            size: 0,
        };
        let mut stream = self.content().read(self.request(request)).await?.into_inner();
        let mut hasher = verify.then(Sha256::new);
        let mut read = 0;
        while let Some(chunk) = stream.message().await? {
            ensure!(chunk.offset == read as i64, "{} skipped bytes", self.label);
            read += chunk.data.len();
            if let Some(h) = &mut hasher {
                h.update(&chunk.data);
            }
        }
        let elapsed = start.elapsed();
        ensure!(read == size, "{} read {read} of {size} bytes", self.label);
        if let Some(h) = hasher {
            let got = format!("sha256:{}", hex::encode(h.finalize()));
            ensure!(got == digest, "{} returned {got} for {digest}", self.label);
        }
        Ok(elapsed)
    }

    /// Reads the blob as containerd's proxy content store does (`remoteReaderAt`): one `Read`
    /// call per 1 MiB.
    async fn read_in_calls(&self, digest: &str, size: usize) -> Result<Duration> {
        let mut client = self.content();
        let start = Instant::now();
        let mut read = 0;
        while read < size {
            let request = ReadContentRequest {
                digest: digest.to_owned(),
                offset: read as i64,
                size: CHUNK.min(size - read) as i64,
            };
            let mut stream = client.read(self.request(request)).await?.into_inner();
            while let Some(chunk) = stream.message().await? {
                read += chunk.data.len();
            }
        }
        Ok(start.elapsed())
    }

    async fn delete_blob(&self, digest: &str) -> Result<()> {
        let request = DeleteContentRequest {
            digest: digest.to_owned(),
        };
        self.content().delete(self.request(request)).await?;
        Ok(())
    }

    /// Deletes the lease and waits for the garbage collection that removes what it held.
    async fn delete_lease(&self) -> Result<()> {
        let request = DeleteRequest {
            id: LEASE.to_owned(),
            sync: true,
        };
        LeasesClient::new(self.channel.clone())
            .delete(self.request(request))
            .await
            .with_context(|| format!("deleting the lease in {}'s containerd", self.label))?;
        Ok(())
    }
}

/// Reads a file through the page cache in 1 MiB reads.
fn read_file(path: &Path) -> Result<Duration> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    while file.read(&mut buf)? > 0 {}
    Ok(start.elapsed())
}

/// Processes whose CPU time the report shows.
struct Daemons {
    shoal: i32,
    containerd_shoal: i32,
    containerd_builtin: i32,
}

impl Daemons {
    /// CPU time of Shoal's side: its containerd and `shoal node`.
    fn shoal_cpu(&self) -> Result<[f64; 2]> {
        Ok([cpu_seconds(self.containerd_shoal)?, cpu_seconds(self.shoal)?])
    }

    fn builtin_cpu(&self) -> Result<[f64; 2]> {
        Ok([cpu_seconds(self.containerd_builtin)?, 0.0])
    }
}

fn since(now: [f64; 2], before: [f64; 2]) -> [f64; 2] {
    [now[0] - before[0], now[1] - before[1]]
}

fn pid(child: &shoal_integration::Child) -> Result<i32> {
    Ok(child.pid().context("the node has exited")? as i32)
}

/// containerd's pid, found by its config file on its command line.
fn containerd_pid(containerd: &Containerd) -> Result<i32> {
    let config = containerd.config_path().as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let is_containerd = args
            .next()
            .is_some_and(|a| a.ends_with(b"containerd") || a == b"containerd");
        if is_containerd && args.any(|a| a == config) {
            return Ok(pid);
        }
    }
    bail!("no containerd process with {:?}", containerd.config_path())
}

/// User + system CPU seconds of `pid` so far.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / USER_HZ)
}

async fn interrupted() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
    eprintln!("shoal-bench: interrupted, cleaning up");
    Ok(())
}

fn progress(args: &Args, what: &str) {
    if !args.json {
        eprintln!("== {what}");
    }
}

/// What the machine is, for the record.
struct Machine {
    cores: usize,
    cpu: String,
    kernel: String,
    containerd: String,
}

impl Machine {
    fn probe() -> Result<Self> {
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
        })
    }
}

/// Everything measured.
struct Report {
    machine: Machine,
    snapshots: usize,
    chain_depth: usize,
    blob_bytes: usize,
    /// Shoal's, then the built-in's.
    snaps: [Ops; 2],
    /// CPU seconds during the timed snapshot phase: [containerd, shoal node] per side.
    snapshot_cpu: [[f64; 2]; 2],
    writes: Vec<Duration>,
    reads: [Vec<Duration>; 2],
    read_cpu: [[f64; 2]; 2],
    diagnostics: Vec<(&'static str, Duration)>,
}

/// The `p`-th percentile (nearest rank) in milliseconds.
fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
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

    fn to_json(&self) -> Value {
        let stats = |d: &[Duration]| {
            let mean = d.iter().sum::<Duration>().as_secs_f64() * 1e3 / d.len() as f64;
            json!({
                "p50_ms": percentile_ms(d, 50.0),
                "p99_ms": percentile_ms(d, 99.0),
                "mean_ms": mean,
                "max_ms": percentile_ms(d, 100.0),
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
                json!({"containerd": containerd, "shoal": shoal}),
            );
            snapshot.insert(side.into(), ops.into());
        }
        let content = |i: usize| {
            let [containerd, shoal] = self.read_cpu[i];
            json!({
                "read_mbps": self.read_mbps(i),
                "read_median_mbps": median(self.read_mbps(i)),
                "write_mbps": mb_per_s(self.blob_bytes, self.writes[i]),
                "read_cpu_seconds_per_read": {
                    "containerd": containerd / self.reads[i].len() as f64,
                    "shoal": shoal / self.reads[i].len() as f64,
                },
            })
        };
        let diagnostics: serde_json::Map<String, Value> = self
            .diagnostics
            .iter()
            .map(|(what, d)| ((*what).to_owned(), json!(mb_per_s(self.blob_bytes, *d))))
            .collect();
        json!({
            "machine": {
                "cores": self.machine.cores,
                "cpu": self.machine.cpu,
                "kernel": self.machine.kernel,
                "containerd": self.machine.containerd,
            },
            "snapshots": self.snapshots,
            "chain_depth": self.chain_depth,
            "snapshot_p50_ratio": self.ratio(50.0),
            "snapshot_p99_ratio": self.ratio(99.0),
            "snapshot": snapshot,
            "blob_bytes": self.blob_bytes,
            "page_cache": "warm: one untimed read of the blob per store before the timed reads",
            "content_read_ratio": self.content_ratio(),
            "content": {
                "shoal": content(0),
                "builtin": content(1),
                "diagnostics_mbps": diagnostics,
            },
        })
    }

    fn print(&self) {
        let m = &self.machine;
        println!(
            "\nmachine: {} cores ({}), kernel {}, {}",
            m.cores, m.cpu, m.kernel, m.containerd
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
        println!("content_read_ratio (shoal / built-in): {:.2}", self.content_ratio());
        println!("diagnostics (one read each, MB/s):");
        for (what, d) in &self.diagnostics {
            println!("  {what:<56} {:>8.0}", mb_per_s(self.blob_bytes, *d));
        }
        println!(
            "\nsnapshot_p50_ratio {:.2}  snapshot_p99_ratio {:.2}  content_read_ratio {:.2}",
            self.ratio(50.0),
            self.ratio(99.0),
            self.content_ratio()
        );
    }
}
