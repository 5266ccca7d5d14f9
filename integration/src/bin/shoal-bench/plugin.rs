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
//!    collection, which removes them from the backends too (checked on Shoal's socket and in
//!    both snapshot directories).
//! 2. **Content**: a seeded random blob of `--blob-mib` MiB is written into each content store
//!    through containerd's `Write` (STAT, 1 MiB WRITEs, COMMIT), dirty pages are written back
//!    (`sync`) and the blob is read once, untimed, from each store, which checks its digest and
//!    leaves it in the page cache. Then `--reads` timed reads of the whole blob through
//!    containerd's `Read` alternate between the stores; the median throughput is reported.
//!    As diagnostics it also reads Shoal's socket directly, as one stream and in the calls
//!    containerd's proxy makes (one `Read` per 1 MiB when serving `Read`, one per 32 KiB when
//!    unpacking a layer), and both blob files through the page cache.
//!
//! The machine's load average is recorded before and after: on a small machine anything else
//! running skews both sides, the ratios less than the absolute figures.

mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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
use sha2::{Digest as _, Sha256};
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{Containerd, caps, random_bytes};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use self::report::{Machine, Ops, Report, load_average};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Snapshots made (Prepare + Mounts + Commit) in each snapshotter.
    #[arg(long, default_value_t = 1000)]
    snapshots: usize,
    /// Layers per image: snapshots are made in parent chains this long, as containerd unpacks
    /// an image's layers (each `Prepare` and `Mounts` walks the chain in both snapshotters).
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
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "PATH")]
    json_file: Option<PathBuf>,
}

/// containerd namespace and lease every request of the benchmark uses.
const NAMESPACE: &str = "shoal-bench";
const LEASE: &str = "shoal-bench";
/// Seed of the blob's bytes: the same blob every run.
const BLOB_SEED: u64 = 0x054f_414c;
/// containerd's proxy writer and its own `Read` both move content in 1 MiB messages.
const CHUNK: usize = 1 << 20;
/// containerd's diff applier reads a layer through a 32 KiB `bufio.Reader`
/// (`archive/compression`): one proxy `Read` call per 32 KiB.
const UNPACK_READ: usize = 32 << 10;
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Watched from now on, so that an interrupt during start-up also ends in a clean stop.
    let signals = {
        let _rt = rt.enter();
        Signals::new()?
    };
    // Declared before the daemons that live in it, so dropped after they are stopped.
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
    let report = rt.block_on(async {
        tokio::select! {
            report = bench(&args, &node, &with_shoal, &builtin, &daemons) => report,
            () = signals.recv() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    drop(rt);
    // Stopped in this order whatever happened: containerds first, then the node they use.
    drop((builtin, with_shoal, node));
    let report = report?;
    let json = serde_json::to_string_pretty(&report.to_json())?;
    if let Some(path) = &args.json_file {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
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
    let mut machine = Machine::probe()?;

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
        let depth = args
            .chain_depth
            .min(args.snapshots - chain * args.chain_depth);
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

    progress(
        args,
        &format!("content: writing a {} MiB blob", args.blob_mib),
    );
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
    progress(
        args,
        "content: one warm-up read per store (checks the digest)",
    );
    for side in [&shoal, &overlay] {
        side.read_blob(&digest, size, true).await?;
    }
    progress(
        args,
        &format!("content: {} timed reads per store", args.reads),
    );
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

    progress(
        args,
        "content: diagnostics (Shoal's socket directly, blob files)",
    );
    let direct = Side::direct(&node.socket).await?;
    let blob_file = |root: &Path| root.join(digest.trim_start_matches("sha256:"));
    let diagnostics = vec![
        (
            "shoal socket, one Read stream",
            direct.read_blob(&digest, size, false).await?,
        ),
        (
            "shoal socket, one Read per MiB (containerd's Read service)",
            direct.read_in_calls(&digest, size, CHUNK).await?,
        ),
        (
            "shoal socket, one Read per 32 KiB (containerd's unpack)",
            direct.read_in_calls(&digest, size, UNPACK_READ).await?,
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
    for snapshots in [
        node.root.join("snapshotter/snapshots"),
        builtin
            .root()
            .join("io.containerd.snapshotter.v1.overlayfs/snapshots"),
    ] {
        let left = std::fs::read_dir(&snapshots)?.count();
        ensure!(
            left == 0,
            "{left} directories left in {}",
            snapshots.display()
        );
    }
    machine.load_after = load_average()?;

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

impl Side {
    async fn connect(
        label: &'static str,
        snapshotter: &'static str,
        socket: &Path,
    ) -> Result<Self> {
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
            md.insert(
                "containerd-namespace",
                MetadataValue::from_static(NAMESPACE),
            );
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
    async fn chain(
        &self,
        id: &str,
        depth: usize,
        mut ops: Option<&mut Ops>,
    ) -> Result<Vec<String>> {
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
        let mut stream = self
            .snapshots()
            .list(self.request(request))
            .await?
            .into_inner();
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
            ensure!(
                answer.offset == offset as i64,
                "{} lost a write",
                self.label
            );
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
        ensure!(
            answer.digest == digest,
            "{} committed {}",
            self.label,
            answer.digest
        );
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
        let mut stream = self
            .content()
            .read(self.request(request))
            .await?
            .into_inner();
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

    /// Reads the blob as containerd's proxy content store (`remoteReaderAt`) does for each
    /// `ReadAt`: one `Read` call per `call` bytes.
    async fn read_in_calls(&self, digest: &str, size: usize, call: usize) -> Result<Duration> {
        let mut client = self.content();
        let start = Instant::now();
        let mut read = 0;
        while read < size {
            let request = ReadContentRequest {
                digest: digest.to_owned(),
                offset: read as i64,
                size: call.min(size - read) as i64,
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
        Ok([
            cpu_seconds(self.containerd_shoal)?,
            cpu_seconds(self.shoal)?,
        ])
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

/// SIGINT, SIGTERM and SIGHUP, which end the benchmark with everything stopped and removed.
struct Signals([tokio::signal::unix::Signal; 3]);

impl Signals {
    /// Starts catching the signals; needs a tokio runtime context.
    fn new() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals([
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ]))
    }

    async fn recv(mut self) {
        let [int, term, hup] = &mut self.0;
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        eprintln!("shoal-bench: interrupted, cleaning up");
    }
}

fn progress(args: &Args, what: &str) {
    if !args.json {
        eprintln!("== {what}");
    }
}
