//! `shoal`: the command line. Parses arguments and calls the library; nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_plugin::config::Config;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Lazy, peer-to-peer container image distribution for containerd"
)]
struct Cli {
    /// Config file (TOML); the embedded defaults are used without one.
    #[arg(long, short, global = true, env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: blob store, swarm peer and registry mirror for this host's containerd.
    Node,
    /// Run a seed: a node without containerd that fetches blobs upstream once and serves them.
    Seed,
    /// Run the tracker.
    Tracker,
    /// Pull an image into containerd, mounting eStargz layers lazily (like `ctr-remote rpull`).
    Pull(PullArgs),
    /// Convert every layer of an image to eStargz, for lazy pulling; the result is still a
    /// valid image for any runtime. SRC and DST are `host[:port]/repo[:tag|@digest]` or
    /// `oci:DIR[:TAG]` (an OCI image layout).
    Convert(ConvertArgs),
    /// Check this host, containerd's config and the node for what makes or breaks Shoal, one
    /// line per check with the fix; exits non-zero when a check fails.
    Doctor(DoctorArgs),
    /// Show what the node holds and does: blobs, lazy mounts, peers, throughput.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// containerd's config file.
    #[arg(long, value_name = "PATH", default_value = shoal_plugin::doctor::DEFAULT_CONTAINERD_CONFIG)]
    containerd_config: PathBuf,
    /// Print the checks as a JSON array of `{name, status, detail, fix}`.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The node's mirror/metrics address; default `http://<mirror.listen>` from the config.
    #[arg(long, value_name = "URL")]
    node: Option<String>,
    /// containerd's socket, for the images it has (the node does not know image names).
    #[arg(long, short, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ConvertArgs {
    /// The image to convert.
    src: String,
    /// Where to write the converted image (a tag, not a digest).
    dst: String,
    /// A file of paths (one per line, as in the image: `bin/sh`) that containers read first;
    /// every layer that has them puts them first and is prefetched up to them.
    #[arg(long, value_name = "FILE", conflicts_with = "no_prefetch")]
    prioritize: Option<PathBuf>,
    /// Mark every layer as not worth prefetching (the default without --prioritize).
    #[arg(long)]
    no_prefetch: bool,
    /// Uncompressed bytes per eStargz chunk, the unit of lazy fetching.
    #[arg(long, default_value_t = 4 << 20)]
    chunk_size: u64,
    /// Convert only this platform of a multi-platform image (`linux/arm64`; repeatable);
    /// default: every Linux one.
    #[arg(long)]
    platform: Vec<String>,
    /// Where layers are staged while converting (default: the system's temp dir).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct PullArgs {
    /// The image, e.g. `registry.example.com/app:v1`.
    image: String,
    /// containerd's socket.
    #[arg(long, short, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    #[arg(long, short, default_value = "default", env = "CONTAINERD_NAMESPACE")]
    namespace: String,
    /// The name of Shoal's snapshotter in containerd's `proxy_plugins`.
    #[arg(long, default_value = "shoal")]
    snapshotter: String,
    /// The platform to pick from a multi-platform image.
    #[arg(long, default_value_t = host_platform())]
    platform: String,
    /// The node's mirror (layers that are not lazy come through it, from the swarm);
    /// default: `mirror.listen` from the config. `none` fetches from the registry directly.
    #[arg(long)]
    node: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // The doctor reports a broken config as one of its checks rather than stopping at it.
    if let Command::Doctor(args) = &cli.command {
        return doctor(cli.config.clone(), args).await;
    }
    let cfg = Config::load(cli.config.as_deref())?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match cli.command {
        Command::Node => shoal_plugin::node::run(cfg, false, shutdown).await?,
        Command::Seed => shoal_plugin::node::run(cfg, true, shutdown).await?,
        Command::Tracker => {
            let listener = tokio::net::TcpListener::bind(&cfg.tracker.listen)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("binding the tracker on {}: {e}", cfg.tracker.listen)
                })?;
            tracing::info!(addr = %listener.local_addr()?, "tracker listening");
            shoal_p2p::tracker::run(listener, cfg.tracker, shutdown).await?;
        }
        Command::Pull(args) => pull(cfg, args).await?,
        Command::Doctor(args) => return doctor(cli.config, &args).await,
        Command::Status(args) => status(cfg, args).await?,
        Command::Convert(args) => {
            tokio::select! {
                result = convert(cfg, args) => result?,
                () = shutdown.cancelled() => anyhow::bail!("interrupted"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn doctor(config: Option<PathBuf>, args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    use shoal_plugin::doctor::{self, DoctorOptions};

    let opts = DoctorOptions {
        config,
        containerd_config: Some(args.containerd_config.clone()),
    };
    let checks = doctor::run(&opts).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", doctor::render(&checks));
    }
    Ok(if doctor::failed(&checks) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn status(cfg: Config, args: StatusArgs) -> anyhow::Result<()> {
    use shoal_plugin::status::client;

    let node = args
        .node
        .unwrap_or_else(|| format!("http://{}", cfg.mirror.listen));
    let mut report = client::sample(&node, std::time::Duration::from_secs(1)).await?;
    match shoal_plugin::status::images::list(&args.address, &report.status).await {
        Ok(images) => report.images = Some(images),
        Err(e) => report.images_error = Some(format!("{e:#}")),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", client::render(&report));
    }
    Ok(())
}

async fn pull(cfg: Config, args: PullArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;

    use shoal_plugin::pull::{self, Outcome, Progress, PullOptions};

    let node = match args.node.as_deref() {
        Some("none") => None,
        Some(url) => Some(url.trim_end_matches('/').to_owned()),
        None => Some(format!("http://{}", cfg.mirror.listen)),
    };
    let opts = PullOptions {
        image: args.image,
        address: args.address,
        namespace: args.namespace,
        snapshotter: args.snapshotter,
        platform: args.platform,
        node,
    };
    let upstream = shoal_p2p::upstream::Upstream::new(&cfg.registry)?;
    let progress = Progress::new(!args.json && std::io::stderr().is_terminal());
    let summary = pull::pull(&upstream, &opts, &progress).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let count = |o| summary.layers.iter().filter(|l| l.outcome == o).count();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("{} ({})", summary.image, summary.manifest);
    println!(
        "layers: {} lazy ({:.1} MiB left to fetch on demand), {} unpacked, {} already present",
        count(Outcome::Lazy),
        mib(summary.lazy_bytes()),
        count(Outcome::Unpacked),
        count(Outcome::Present),
    );
    match (summary.from_peers, summary.from_upstream) {
        (Some(peers), Some(upstream)) => println!(
            "fetched by the node during the pull: {:.1} MiB from peers, {:.1} MiB from the registry",
            mib(peers),
            mib(upstream)
        ),
        _ => println!("fetched: node metrics unavailable"),
    }
    Ok(())
}

async fn convert(cfg: Config, args: ConvertArgs) -> anyhow::Result<()> {
    use shoal_plugin::convert::{self, ConvertOptions, ImageRef, Progress};

    let src: ImageRef = args.src.parse()?;
    let dst: ImageRef = args.dst.parse()?;
    let prioritized = match &args.prioritize {
        Some(path) if !args.no_prefetch => convert::read_path_list(path)?,
        _ => Vec::new(),
    };
    let opts = ConvertOptions {
        chunk_size: args.chunk_size,
        prioritized,
        platforms: args.platform,
        work_dir: args.work_dir,
        ..ConvertOptions::default()
    };
    let upstream = shoal_p2p::upstream::Upstream::new(&cfg.registry)?;
    let converted = convert::convert(&upstream, &src, &dst, &opts, &Progress::stderr()).await?;
    println!("{converted}");
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}
