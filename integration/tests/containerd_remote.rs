//! Remote content: a node whose containerd already has an image makes it available to the
//! cluster. Another node, with `remote_content = true`, pulls the image by digest while the
//! registry is down: the manifest comes through its mirror out of the swarm, containerd's content
//! Info answers for the other blobs, and the layers stream from the first node as it unpacks.

use anyhow::{Result, ensure};
use shoal_integration::containerd::shoal_proxy_config;
use shoal_integration::shoal::{Node, NodeOptions, Tracker};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, hosts_dir, random_bytes};

#[test]
fn a_node_pulls_from_the_swarm_while_the_registry_is_down() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/blob", random_bytes(11, 6 << 20))])
        // The pause after printing: `ctr run` can lose the output of a task that exits at
        // once (a containerd I/O race; seen once here, in a full parallel test run, as an exit
        // status 0 with nothing printed).
        .cmd(&["/bin/sh", "-c", "wc -c < /data/blob && sleep 0.5"])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/remote:latest")?;
    let tracker = Tracker::start(&dir.join("tracker"))?;
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        tracker: Some(tracker.url()),
        ..NodeOptions::default()
    };
    let has_it = Node::start(dir, "has-it", &opts)?;
    let containerd_b = Containerd::start(
        &dir.join("containerd-b"),
        &shoal_proxy_config(&has_it.socket),
    )?;
    containerd_b.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "shoal",
        &image.reference,
    ])?;

    let remote = NodeOptions {
        extra: "\n[content]\nremote_content = true\n".into(),
        ..opts
    };
    let wants_it = Node::start(dir, "wants-it", &remote)?;
    let containerd_a = Containerd::start(
        &dir.join("containerd-a"),
        &shoal_proxy_config(&wants_it.socket),
    )?;
    registry.stop();

    let by_digest = format!("{}/test/remote@{}", registry.addr(), image.manifest_digest);
    let hosts = hosts_dir(&dir.join("hosts"), &registry.addr(), &wants_it.mirror_url())?;
    containerd_a.ctr_ok(&[
        "image",
        "pull",
        "--hosts-dir",
        &hosts.display().to_string(),
        "--snapshotter",
        "shoal",
        &by_digest,
    ])?;
    let out = containerd_a.run_with(
        &["--rm", "--snapshotter", "shoal"],
        &by_digest,
        "remote-run",
        &[],
    )?;
    ensure!(
        out.trim() == (6 << 20).to_string(),
        "container printed {out:?}"
    );

    let layers: u64 = image.layers.iter().map(|(_, size)| size).sum();
    let from_peers = wants_it.metric("shoal_swarm_bytes_from_peers_total")? as u64;
    let from_upstream = wants_it.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
    ensure!(
        from_upstream == 0,
        "{from_upstream} bytes came from the (stopped) registry"
    );
    ensure!(
        from_peers >= layers,
        "only {from_peers} bytes came from the swarm for {layers} bytes of layers"
    );
    Ok(())
}
