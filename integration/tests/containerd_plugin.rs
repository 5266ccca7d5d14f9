//! Real containerd (Debian's 1.6) with Shoal as its snapshotter and content store through
//! `proxy_plugins`: a multi-layer image is pulled into Shoal's blob store and unpacked into its
//! snapshots, a container runs on them and its writes land in Shoal's upper directory, a restart
//! of `shoal node` loses nothing, and removing the image deletes its blobs through Shoal.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_integration::containerd::shoal_proxy_config;
use shoal_integration::shoal::{Node, NodeOptions};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, random_bytes};

fn blob_path(node: &Node, digest: &str) -> std::path::PathBuf {
    node.root
        .join("store/blobs")
        .join(digest.trim_start_matches("sha256:"))
}

/// Files named `name` under any snapshot's upper directory.
fn find_in_snapshots(node: &Node, name: &str) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    let snapshots = node.root.join("snapshotter/snapshots");
    for entry in
        std::fs::read_dir(&snapshots).with_context(|| format!("listing {}", snapshots.display()))?
    {
        let path = entry?.path().join("fs").join(name);
        if path.exists() {
            found.push(path);
        }
    }
    Ok(found)
}

#[test]
fn containerd_pulls_and_runs_on_shoal_snapshots_across_a_restart() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/one", b"first layer\n".to_vec())])
        .layer([
            ("data/two", random_bytes(5, 1 << 20)),
            ("data/one", b"replaced by the top layer\n".to_vec()),
        ])
        .cmd(&["/bin/sh", "-c", "cat /data/one; wc -c < /data/two"])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/plugin:latest")?;
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        ..NodeOptions::default()
    };
    let mut node = Node::start(dir, "node", &opts)?;
    let containerd = Containerd::start(&dir.join("containerd"), &shoal_proxy_config(&node.socket))?;
    let plugins = containerd.ctr_ok(&["plugins", "ls"])?;
    ensure!(
        plugins
            .lines()
            .any(|l| l.contains("shoal") && l.contains("ok")),
        "shoal plugin not loaded:\n{plugins}"
    );

    containerd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "shoal",
        &image.reference,
    ])?;
    // containerd stored the image's blobs in Shoal's content store, which is the swarm's store.
    for (digest, size) in &image.layers {
        let len = std::fs::metadata(blob_path(&node, digest))
            .map(|m| m.len())
            .ok();
        ensure!(
            len == Some(*size),
            "{digest} not in Shoal's blob store ({len:?})"
        );
    }
    let snapshots = containerd.ctr_ok(&["snapshots", "--snapshotter", "shoal", "ls"])?;
    ensure!(
        snapshots.lines().count() > image.layers.len(),
        "expected one committed snapshot per layer:\n{snapshots}"
    );

    // Restart the node between pull and run: the snapshots must survive.
    node.child.stop()?;
    node = Node::start(dir, "node", &opts)?;
    // containerd redials the proxy with a short backoff; a user sees a brief Unavailable.
    shoal_integration::wait_until(
        Duration::from_secs(10),
        "containerd to reconnect to shoal",
        || {
            Ok(containerd
                .ctr(&["snapshots", "--snapshotter", "shoal", "ls"])?
                .status
                .success())
        },
    )?;

    let out = containerd.run_with(
        &["--rm", "--snapshotter", "shoal"],
        &image.reference,
        "plugin-run",
        &[],
    )?;
    ensure!(
        out == "replaced by the top layer\n1048576\n",
        "container printed {out:?}"
    );

    let marker = "written-inside-the-container";
    containerd.run_with(
        &["--snapshotter", "shoal"],
        &image.reference,
        "plugin-write",
        &["/bin/sh", "-c", &format!("echo hi > /{marker}")],
    )?;
    let found = find_in_snapshots(&node, marker)?;
    ensure!(
        found.len() == 1,
        "the container's write is not in one Shoal upper dir: {found:?}"
    );
    ensure!(std::fs::read_to_string(&found[0])? == "hi\n");
    containerd.ctr_ok(&["container", "rm", "plugin-write"])?;
    // containerd's garbage collector removes the container's snapshot through Shoal, soon after.
    shoal_integration::wait_until(
        Duration::from_secs(20),
        "the container's snapshot to be removed",
        || Ok(find_in_snapshots(&node, marker)?.is_empty()),
    )?;

    // Removing the image lets containerd's garbage collector delete its blobs through Shoal.
    containerd.ctr_ok(&["image", "rm", "--sync", &image.reference])?;
    shoal_integration::wait_until(
        Duration::from_secs(20),
        "the image's blobs to be deleted",
        || {
            Ok(image
                .layers
                .iter()
                .all(|(digest, _)| !blob_path(&node, digest).exists()))
        },
    )?;
    Ok(())
}

/// The example config for the containerd in `PATH` (`config-1.x.toml` for 1.6/1.7,
/// `config-2.x.toml` for 2.x), with only its paths pointed at this test's node and directory,
/// loads Shoal's plugins and pulls and runs an image on them.
#[test]
fn the_example_config_pulls_and_runs_on_shoal() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/one", b"from the example config\n".to_vec())])
        .cmd(&["/bin/cat", "/data/one"])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/example:latest")?;
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        ..NodeOptions::default()
    };
    let node = Node::start(dir, "node", &opts)?;

    let file = match shoal_integration::containerd::major_version()? {
        1 => "config-1.x.toml",
        _ => "config-2.x.toml",
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/containerd")
        .join(file);
    let example = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .replace("/run/shoal/shoal.sock", &node.socket.display().to_string())
        .replace(
            "/etc/containerd/certs.d",
            &dir.join("certs.d").display().to_string(),
        );
    let containerd = Containerd::start(&dir.join("containerd"), &example)
        .with_context(|| format!("starting containerd with {file}"))?;
    let plugins = containerd.ctr_ok(&["plugins", "ls"])?;
    for (kind, id) in [
        ("io.containerd.snapshotter.v1", "shoal"),
        ("io.containerd.content.v1", "shoal-content"),
    ] {
        ensure!(
            plugins.lines().any(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                words.first() == Some(&kind)
                    && words.get(1) == Some(&id)
                    && words.last() == Some(&"ok")
            }),
            "{file}: {kind} {id} is not loaded:\n{plugins}"
        );
    }

    containerd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "shoal",
        &image.reference,
    ])?;
    let out = containerd.run_with(
        &["--rm", "--snapshotter", "shoal"],
        &image.reference,
        "example-run",
        &[],
    )?;
    ensure!(
        out == "from the example config\n",
        "{file}: container printed {out:?}"
    );
    Ok(())
}
