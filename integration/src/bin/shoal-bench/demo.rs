//! `shoal-bench demo`: Shoal's main job on one machine. A registry with a demo image, a tracker,
//! a seed and two nodes, each node with its own containerd pulling through it at the same moment;
//! then the same pull straight from the registry for comparison, and a report of where the bytes
//! came from. Everything lives in a temporary directory and is stopped on exit.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_integration::shoal::{Node, NodeOptions, Tracker};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, hosts_dir, random_bytes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Size of the demo image's data layer, in MiB.
    #[arg(long, default_value_t = 128)]
    layer_mib: usize,
}

pub fn run(args: Args) -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        anyhow::bail!(
            "cannot run the demo: {why} (scripts/install-deps.sh installs what is missing)"
        );
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    step("starting a registry and pushing a demo image");
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/payload", random_bytes(42, args.layer_mib << 20))])
        .cmd(&[
            "/bin/sh",
            "-c",
            "echo hello from a Shoal-pulled container: $(wc -c < /data/payload) bytes of payload",
        ])
        .compression_level(0)
        .build(&dir.join("image"))?
        .push(&registry.addr(), "demo/app:latest")?;
    let total: u64 = image.layers.iter().map(|(_, s)| s).sum();

    step("starting the tracker, a seed and two nodes");
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
        .map(|n| Containerd::start(&dir.join(format!("containerd-{}", n.name)), ""))
        .collect::<Result<Vec<_>>>()?;

    step("both nodes pull the image through Shoal at the same moment");
    let times = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .zip(&containerds)
            .map(|(node, ctrd)| {
                let (reference, registry) = (&image.reference, registry.addr());
                s.spawn(move || -> Result<Duration> {
                    let hosts =
                        hosts_dir(&ctrd.dir().join("hosts"), &registry, &node.mirror_url())?;
                    let start = Instant::now();
                    ctrd.ctr_ok(&[
                        "image",
                        "pull",
                        "--hosts-dir",
                        &hosts.display().to_string(),
                        reference,
                    ])?;
                    Ok(start.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("pull thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })?;
    for (node, ctrd) in nodes.iter().zip(&containerds) {
        let out = ctrd.run(&image.reference, &format!("demo-{}", node.name), &[])?;
        println!("  {}: {}", node.name, out.trim());
    }
    let served_shoal: u64 = image
        .layers
        .iter()
        .map(|(d, _)| registry.blob_bytes_served(d))
        .sum::<Result<u64>>()?;

    step("for comparison, a third containerd pulls straight from the registry");
    let direct = Containerd::start(&dir.join("containerd-direct"), "")?;
    let start = Instant::now();
    direct.ctr_ok(&["image", "pull", "--plain-http", &image.reference])?;
    let direct_time = start.elapsed();

    println!(
        "\nReport ({} MiB of layers, one machine, loopback: times show overhead, not network gains)",
        total >> 20
    );
    for (node, t) in nodes.iter().zip(&times) {
        let peers = node.metric("shoal_swarm_bytes_from_peers_total")? as u64;
        let upstream = node.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
        println!(
            "  {:<7} pull {:>6.2} s   from peers {:>5} MiB   from the registry {:>5} MiB",
            node.name,
            t.as_secs_f64(),
            peers >> 20,
            upstream >> 20
        );
    }
    let seed_upstream = seed.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
    println!(
        "  seed    fetched {} MiB from the registry and served it to the nodes",
        seed_upstream >> 20
    );
    println!(
        "  direct  pull {:>6.2} s   (containerd alone, from the registry)",
        direct_time.as_secs_f64()
    );
    println!(
        "  the registry served {} MiB of layers for two Shoal nodes: {:.2}x the image",
        served_shoal >> 20,
        served_shoal as f64 / total as f64
    );
    ensure!(
        served_shoal < total * 2,
        "the registry served every node: the swarm did not work"
    );
    drop(tracker);
    Ok(())
}

fn step(what: &str) {
    println!("==> {what}");
}
