//! Stock containerd pulls an image through a node's registry mirror (`ctr image pull
//! --hosts-dir`) and runs it: the layers come out of the swarm, verified, and the registry
//! serves each blob once (to the node, not to containerd).

use anyhow::{Result, ensure};
use shoal_integration::shoal::{Node, NodeOptions, Tracker};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, hosts_dir, random_bytes};

#[test]
fn ctr_pulls_through_the_mirror_and_runs_the_image() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/blob", random_bytes(3, 8 << 20))])
        .cmd(&["/bin/sh", "-c", "wc -c < /data/blob"])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/mirror:latest")?;
    let tracker = Tracker::start(&dir.join("tracker"))?;
    let node = Node::start(
        dir,
        "node",
        &NodeOptions {
            insecure: vec![registry.addr()],
            tracker: Some(tracker.url()),
            ..NodeOptions::default()
        },
    )?;
    let containerd = Containerd::start(&dir.join("containerd"), "")?;
    let hosts = hosts_dir(&dir.join("hosts"), &registry.addr(), &node.mirror_url())?;
    let hosts = hosts.display().to_string();
    containerd.ctr_ok(&["image", "pull", "--hosts-dir", &hosts, &image.reference])?;
    let out = containerd.run(&image.reference, "mirror-run", &[])?;
    ensure!(
        out.trim() == (8 << 20).to_string(),
        "container printed {out:?}"
    );

    // Layers and the image config all come through the mirror's blob endpoint.
    let config_size = registry.blob_bytes_served(&image.config_digest)?;
    let blob_bytes = config_size + image.layers.iter().map(|(_, size)| size).sum::<u64>();
    let from_upstream = node.metric("shoal_swarm_bytes_from_upstream_total")? as u64;
    ensure!(
        from_upstream == blob_bytes,
        "node fetched {from_upstream} bytes upstream for {blob_bytes} bytes of layers"
    );
    for (digest, size) in &image.layers {
        let served = registry.blob_bytes_served(digest)?;
        ensure!(
            served == *size,
            "registry served {served} bytes of {digest} ({size} bytes): containerd bypassed the mirror"
        );
    }
    Ok(())
}
