//! The swarm end to end, as separate processes on loopback: `docker-registry` with a pushed
//! image, a tracker, a seed and five nodes, each node fetching a 64 MiB layer through its
//! registry mirror, the way containerd would.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sha2::{Digest as _, Sha256};
use shoal_integration::shoal::{Node, NodeOptions, Tracker};
use shoal_integration::{ImageBuilder, PushedImage, Registry, caps, http, random_bytes};

const LAYER_SIZE: usize = 64 << 20;
const NODES: usize = 5;

struct Setup {
    _tmp: tempfile::TempDir,
    registry: Registry,
    image: PushedImage,
    tracker: Tracker,
    dir: std::path::PathBuf,
}

fn setup() -> Result<Option<Setup>> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo"]) {
        eprintln!("skipping: {why}");
        return Ok(None);
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/big", random_bytes(7, LAYER_SIZE))])
        .compression_level(0)
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/swarm:latest")?;
    let tracker = Tracker::start(&dir.join("tracker"))?;
    Ok(Some(Setup {
        _tmp: tmp,
        registry,
        image,
        tracker,
        dir,
    }))
}

fn big_layer(image: &PushedImage) -> Result<(String, u64)> {
    image
        .layers
        .iter()
        .max_by_key(|(_, size)| *size)
        .cloned()
        .context("image has no layers")
}

/// Fetches the layer through every node's mirror at once; returns each body's sha256.
fn fetch_everywhere(nodes: &[&Node], registry: &str, digest: &str) -> Result<Vec<String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                let url = format!(
                    "{}/v2/test/swarm/blobs/{digest}?ns={registry}",
                    node.mirror_url()
                );
                s.spawn(move || -> Result<String> {
                    let resp = http::get(&url, None, Duration::from_secs(120))?;
                    ensure!(
                        resp.status == 200,
                        "{}: HTTP {} from {url}",
                        node.name,
                        resp.status
                    );
                    Ok(format!(
                        "sha256:{}",
                        hex::encode(Sha256::digest(&resp.body))
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("fetch thread panicked"))?
            })
            .collect()
    })
}

fn start_swarm(s: &Setup, corrupt_first: bool) -> Result<(Node, Vec<Node>)> {
    let opts = NodeOptions {
        insecure: vec![s.registry.addr()],
        tracker: Some(s.tracker.url()),
        ..NodeOptions::default()
    };
    let seed = Node::start(
        &s.dir,
        "seed",
        &NodeOptions {
            seed: true,
            ..opts.clone()
        },
    )?;
    let nodes = (0..NODES)
        .map(|i| {
            let corrupt = corrupt_first && i == 0;
            Node::start(
                &s.dir,
                &format!("node{i}"),
                &NodeOptions {
                    corrupt_uploads: corrupt,
                    ..opts.clone()
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((seed, nodes))
}

#[test]
fn five_nodes_fetch_a_layer_that_upstream_serves_once() -> Result<()> {
    let Some(s) = setup()? else { return Ok(()) };
    let (layer, size) = big_layer(&s.image)?;
    let (seed, nodes) = start_swarm(&s, false)?;
    let refs: Vec<&Node> = nodes.iter().collect();
    for (node, got) in nodes
        .iter()
        .zip(fetch_everywhere(&refs, &s.registry.addr(), &layer)?)
    {
        ensure!(got == layer, "{} served {got}, expected {layer}", node.name);
    }
    let served = s.registry.blob_bytes_served(&layer)?;
    ensure!(
        served >= size && served * 10 <= size * 11,
        "registry served {served} bytes of a {size} byte layer"
    );
    let from_upstream: f64 = nodes
        .iter()
        .map(|n| n.metric("shoal_swarm_bytes_from_upstream_total"))
        .sum::<Result<f64>>()?;
    ensure!(
        from_upstream == 0.0,
        "nodes fetched {from_upstream} bytes upstream although a seed was there"
    );
    ensure!(
        seed.metric("shoal_swarm_bytes_from_upstream_total")? as u64 == size,
        "the seed did not back-source the layer"
    );
    let from_peers: f64 = nodes
        .iter()
        .map(|n| n.metric("shoal_swarm_bytes_from_peers_total"))
        .sum::<Result<f64>>()?;
    ensure!(
        from_peers as u64 == size * NODES as u64,
        "nodes got {from_peers} bytes from peers"
    );
    Ok(())
}

#[test]
fn a_node_corrupting_every_piece_it_serves_harms_nobody() -> Result<()> {
    let Some(s) = setup()? else { return Ok(()) };
    let (layer, _) = big_layer(&s.image)?;
    let (_seed, nodes) = start_swarm(&s, true)?;
    // The corrupt node gets the layer first, so the others find it complete and ask it.
    let first = fetch_everywhere(&[&nodes[0]], &s.registry.addr(), &layer)?;
    ensure!(first[0] == layer, "the corrupt node's own copy is wrong");
    let rest: Vec<&Node> = nodes[1..].iter().collect();
    for (node, got) in rest
        .iter()
        .zip(fetch_everywhere(&rest, &s.registry.addr(), &layer)?)
    {
        ensure!(got == layer, "{} served {got}, expected {layer}", node.name);
    }
    let caught: f64 = rest
        .iter()
        .map(|n| n.metric("shoal_swarm_verification_failures_total"))
        .sum::<Result<f64>>()?;
    ensure!(
        caught > 0.0,
        "no node ever received a corrupt piece: the test proved nothing"
    );
    Ok(())
}
