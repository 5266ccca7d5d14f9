//! `shoal-bench demo`: Shoal's main job on one machine, with embedded defaults.
//!
//! A registry with a demo image (built here, then converted to eStargz with `shoal convert`), a
//! tracker, a seed and two nodes, each node with its own containerd using Shoal as snapshotter and
//! content store. Each node starts the container lazily (`shoal pull` + `ctr run --snapshotter
//! shoal`): the second one reads from the first and the seed instead of the registry. A third
//! containerd pulls and runs the plain image the usual way for comparison. The report gives
//! start times and where the bytes came from. Everything lives in a temporary directory and is
//! stopped on exit.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_integration::containerd::shoal_proxy_config;
use shoal_integration::shoal::{Node, NodeOptions, Tracker, convert};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, random_bytes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the demo image's data layer, in MiB.
    #[arg(long, default_value_t = 128)]
    layer_mib: usize,
}

/// What the demo container does: read one small file and the first MiB of a big one.
const ENTRYPOINT: &str =
    "echo hello from $(cat /data/greeting): read $(head -c 1048576 /data/payload | wc -c) bytes";

pub fn run(args: Args) -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"])
        .or_else(caps::missing_fuse)
    {
        anyhow::bail!(
            "cannot run the demo: {why} (scripts/install-deps.sh installs what is missing)"
        );
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    step("starting a registry; building a demo image and converting it to eStargz");
    let registry = Registry::start(&dir.join("registry"))?;
    let plain = ImageBuilder::new()
        .busybox()
        .layer([
            ("data/greeting", b"a lazily started container".to_vec()),
            ("data/payload", random_bytes(42, args.layer_mib << 20)),
        ])
        .cmd(&["/bin/sh", "-c", ENTRYPOINT])
        .compression_level(1)
        .build(&dir.join("image"))?
        .push(&registry.addr(), "demo/app:plain")?;
    let lazy = format!("{}/demo/app:estargz", registry.addr());
    convert(
        dir,
        &registry.addr(),
        &plain.reference,
        &lazy,
        &["data/greeting"],
    )?;
    let total: u64 = plain.layers.iter().map(|(_, s)| s).sum();

    step("starting the tracker, a seed and two nodes, each node with its own containerd");
    let tracker = Tracker::start(&dir.join("tracker"))?;
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        tracker: Some(tracker.url()),
        ..NodeOptions::default()
    };
    let seed = Node::start(
        dir,
        "seed",
        &NodeOptions {
            seed: true,
            ..opts.clone()
        },
    )?;
    let nodes = [
        Node::start(dir, "node-a", &opts)?,
        Node::start(dir, "node-b", &opts)?,
    ];
    let containerds = nodes
        .iter()
        .map(|n| {
            Containerd::start(
                &dir.join(format!("containerd-{}", n.name)),
                &shoal_proxy_config(&n.socket),
            )
        })
        .collect::<Result<Vec<_>>>()?;

    let mut lazy_times = Vec::new();
    for (node, containerd) in nodes.iter().zip(&containerds) {
        step(&format!(
            "{}: shoal pull {lazy}, then ctr run --snapshotter shoal",
            node.name
        ));
        let start = Instant::now();
        let summary = node.pull(containerd, &lazy)?;
        let pulled = start.elapsed();
        let out = containerd.run_with(
            &["--rm", "--snapshotter", "shoal"],
            &lazy,
            &format!("demo-{}", node.name),
            &[],
        )?;
        let started = start.elapsed();
        println!("  {}", out.trim());
        println!(
            "  pull {:.2} s (layers left lazy: {}), container output after {:.2} s",
            pulled.as_secs_f64(),
            summary["layers"]
                .as_array()
                .map_or(0, |l| l.iter().filter(|l| l["outcome"] == "lazy").count()),
            started.as_secs_f64()
        );
        lazy_times.push(started);
        // Let the background fetch finish, so the next node finds a complete copy here.
        shoal_integration::wait_until(
            Duration::from_secs(120),
            &format!("{} to hold the whole image", node.name),
            || Ok(node.metric("shoal_swarm_blobs_completed_total")? >= plain.layers.len() as f64),
        )?;
    }

    step("for comparison, a third containerd pulls and runs the plain image the usual way");
    let direct = Containerd::start(&dir.join("containerd-direct"), "")?;
    let start = Instant::now();
    direct.ctr_ok(&["image", "pull", "--plain-http", &plain.reference])?;
    let out = direct.run(&plain.reference, "demo-direct", &[])?;
    let direct_time = start.elapsed();
    println!("  {}", out.trim());

    println!(
        "\nReport ({} MiB image, one machine over loopback: the registry is as fast as a peer \
         here, so these times show overhead, not network gains; see BENCHMARKS.md)",
        total >> 20
    );
    println!(
        "  {:<7} {:>14} {:>16} {:>20}",
        "", "start (s)", "from peers MiB", "from registry MiB"
    );
    for (node, t) in nodes.iter().zip(&lazy_times) {
        let peers = node.metric("shoal_swarm_bytes_from_peers_total")? as u64;
        let upstream = node.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
        println!(
            "  {:<7} {:>14.2} {:>16} {:>20}",
            node.name,
            t.as_secs_f64(),
            peers >> 20,
            upstream >> 20
        );
    }
    let seed_upstream = seed.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
    println!(
        "  {:<7} {:>14} {:>16} {:>20}",
        "seed",
        "-",
        0,
        seed_upstream >> 20
    );
    println!(
        "  {:<7} {:>14.2} {:>16} {:>20}   (containerd alone: pull, unpack, run)",
        "direct",
        direct_time.as_secs_f64(),
        0,
        total >> 20
    );
    let b_upstream = nodes[1].metric("shoal_swarm_bytes_from_upstream_total")?;
    ensure!(
        b_upstream == 0.0,
        "node-b fetched from the registry although node-a and the seed had the image"
    );
    drop(tracker);
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}
