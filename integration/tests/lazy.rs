//! Lazy start end to end, with real containerd, docker-registry, FUSE and overlayfs: an image is
//! built, converted with `shoal convert`, pushed, pulled with `shoal pull` (remote snapshots), and
//! a container runs on it and prints its line while most of its big layer is still in the
//! registry. The node is restarted with the container's image in place and the layer mounts
//! again. A second node reads the same layer lazily from the first one, not from the registry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_integration::containerd::shoal_proxy_config;
use shoal_integration::shoal::{Node, NodeOptions, Tracker, convert};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, http, random_bytes};

/// Layers `shoal pull` reported with `outcome`.
fn outcomes(summary: &serde_json::Value, outcome: &str) -> usize {
    summary["layers"]
        .as_array()
        .map(|l| l.iter().filter(|l| l["outcome"] == outcome).count())
        .unwrap_or(0)
}

fn fuse_mounts(root: &Path) -> Result<usize> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let root = root.display().to_string();
    Ok(mounts
        .lines()
        .filter(|l| l.contains(&root) && l.contains("fuse"))
        .count())
}

/// The converted image of the tests: busybox plus a 48 MiB layer of which the entrypoint
/// reads one small file and the first KiB of a big one.
fn lazy_image(dir: &Path, registry: &Registry) -> Result<String> {
    ImageBuilder::new()
        .busybox()
        .layer([
            ("data/small", b"hello from a lazy layer\n".to_vec()),
            ("data/big", random_bytes(7, 48 << 20)),
        ])
        .compression_level(1)
        .cmd(&[
            "/bin/sh",
            "-c",
            "cat /data/small; head -c 1024 /data/big | wc -c",
        ])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/lazy:plain")?;
    let converted = format!("{}/test/lazy:esgz", registry.addr());
    convert(
        dir,
        &registry.addr(),
        &format!("{}/test/lazy:plain", registry.addr()),
        &converted,
        &[],
    )?;
    Ok(converted)
}

const NEEDS: &[&str] = &["docker-registry", "skopeo", "containerd", "ctr", "runc"];

#[test]
fn a_container_starts_before_its_layer_has_arrived() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = lazy_image(dir, &registry)?;
    // 16 Mbit/s into the node: the 48 MiB layer needs about half a minute to arrive whole.
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        extra: "ingress_mbit = 16\n".into(),
        ..NodeOptions::default()
    };
    let mut node = Node::start(dir, "node", &opts)?;
    let containerd = Containerd::start(&dir.join("containerd"), &shoal_proxy_config(&node.socket))?;

    let summary = node.pull(&containerd, &image)?;
    ensure!(
        outcomes(&summary, "lazy") == 2,
        "both layers should be lazy: {summary}"
    );
    let out = containerd.run_with(&["--rm", "--snapshotter", "shoal"], &image, "lazy-1", &[])?;
    let fetched = node.metric("shoal_swarm_bytes_from_upstream_total")?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "container printed {out:?}"
    );
    let total: u64 = summary["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    ensure!(
        fetched < total as f64 / 2.0,
        "the container printed after {fetched} of {total} layer bytes were fetched: not lazy"
    );
    ensure!(fuse_mounts(&node.root)? == 2, "expected two FUSE layers");
    ensure!(
        node.metric("shoal_fuse_mounted_layers")? == 2.0
            && node.metric("shoal_fuse_reads_total")? > 0.0
            && node.metric("shoal_fuse_chunk_fetches_total")? > 0.0,
        "the node's /metrics should show the lazy reads:\n{}",
        node.metrics_text()?
    );
    // `shoal status` shows the lazy mounts, and the big layer still partly in the registry.
    let status = shoal_integration::shoal::shoal_cli(
        &node.config_path(),
        &[
            "status",
            "--json",
            "--node",
            &node.mirror_url(),
            "--address",
            &containerd.address().display().to_string(),
        ],
    )?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    // containerd's image, with both its layers mounted lazily.
    let listed = status["images"]
        .as_array()
        .with_context(|| format!("no images in {status}"))?
        .iter()
        .any(|i| i["name"] == image.as_str() && i["layers"] == 2 && i["layers_lazy"] == 2);
    ensure!(
        listed,
        "status does not show the image as lazy: {}",
        status["images"]
    );
    let layers = pull_layers(&summary);
    let mounted: Vec<&str> = status["lazy_mounts"]
        .as_array()
        .context("lazy_mounts")?
        .iter()
        .filter_map(|m| m["layer"].as_str())
        .collect();
    ensure!(
        mounted.len() == 2 && layers.iter().all(|l| mounted.contains(&l.as_str())),
        "status lists {mounted:?} as lazy mounts, the pull {layers:?}"
    );
    let partial = status["blobs"]
        .as_array()
        .context("blobs")?
        .iter()
        .filter(|b| layers.iter().any(|l| b["digest"] == l.as_str()))
        .filter(|b| {
            b["complete"] == false && b["pieces_present"].as_u64() < b["pieces_total"].as_u64()
        })
        .count();
    ensure!(
        partial >= 1,
        "the big layer should still be partial: {status}"
    );

    // Restart: the lazy layers are mounted again before containerd is served.
    node.child.stop()?;
    ensure!(
        fuse_mounts(&node.root)? == 0,
        "a stopped node leaves no mounts"
    );
    node = Node::start(dir, "node", &opts)?;
    ensure!(
        fuse_mounts(&node.root)? == 2,
        "the layers are mounted again"
    );
    shoal_integration::wait_until(Duration::from_secs(10), "containerd to reconnect", || {
        Ok(containerd
            .ctr(&["snapshots", "--snapshotter", "shoal", "ls"])?
            .status
            .success())
    })?;
    let out = containerd.run_with(&["--rm", "--snapshotter", "shoal"], &image, "lazy-2", &[])?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "after a restart the container printed {out:?}"
    );

    // Removing the image and collecting garbage unmounts and deletes the lazy snapshots.
    containerd.ctr_ok(&["image", "rm", "--sync", &image])?;
    shoal_integration::wait_until(Duration::from_secs(10), "lazy layers to unmount", || {
        Ok(fuse_mounts(&node.root)? == 0)
    })?;
    // The layers' local copies go with their last snapshot.
    ensure!(
        copy_files(&node.root)?.is_empty(),
        "copies left after the image was removed: {:?}",
        copy_files(&node.root)?
    );
    Ok(())
}

#[test]
fn lazy_reads_on_a_second_node_come_from_the_first() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = lazy_image(dir, &registry)?;
    let tracker = Tracker::start(dir)?;
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        tracker: Some(tracker.url()),
        ..NodeOptions::default()
    };
    let mut first = Node::start(dir, "first", &opts)?;
    let first_containerd = Containerd::start(
        &dir.join("containerd-1"),
        &shoal_proxy_config(&first.socket),
    )?;
    let first_summary = first.pull(&first_containerd, &image)?;
    let out = first_containerd.run_with(&["--rm", "--snapshotter", "shoal"], &image, "a", &[])?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "first node printed {out:?}"
    );
    // The first node's background fetch makes it a full seeder of both layers.
    shoal_integration::wait_until(
        Duration::from_secs(30),
        "the first node to hold both layers",
        || Ok(first.metric("shoal_swarm_blobs_completed_total")? >= 2.0),
    )?;
    let layers: Vec<String> = pull_layers(&first_summary);
    let served_before = layer_bytes_served(&registry, &layers)?;
    // With both blobs local, every file gets its verified local copy, and the next
    // container's opens go straight to the kernel.
    shoal_integration::wait_until(Duration::from_secs(30), "local copies", || {
        // busybox, /data/small, /data/big at least.
        Ok(first.metric("shoal_fuse_local_copies_total")? >= 3.0)
    })?;
    let out = first_containerd.run_with(&["--rm", "--snapshotter", "shoal"], &image, "a2", &[])?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "first node, again: {out:?}"
    );
    ensure!(
        first.metric("shoal_fuse_passthrough_opens_total")? > 0.0,
        "no passthrough open once the layers were local"
    );
    // The copies outlive a restart of the node: checked again, not written again.
    let before = copy_files(&first.root)?;
    ensure!(before.len() >= 3, "copies on disk: {before:?}");
    first.child.stop()?;
    let first = Node::start(dir, "first", &opts)?;
    shoal_integration::wait_until(Duration::from_secs(30), "copies checked again", || {
        Ok(first.metric("shoal_fuse_local_copies_total")? >= before.len() as f64)
    })?;
    ensure!(
        copy_files(&first.root)? == before,
        "the copies were written again after a restart"
    );

    let second = Node::start(dir, "second", &opts)?;
    let second_containerd = Containerd::start(
        &dir.join("containerd-2"),
        &shoal_proxy_config(&second.socket),
    )?;
    let summary = second.pull(&second_containerd, &image)?;
    ensure!(
        outcomes(&summary, "lazy") == 2,
        "lazy on the second node: {summary}"
    );
    let out = second_containerd.run_with(&["--rm", "--snapshotter", "shoal"], &image, "b", &[])?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "second node printed {out:?}"
    );
    let from_peers = second.metric("shoal_swarm_bytes_from_peers_total")?;
    let from_upstream = second.metric("shoal_swarm_bytes_from_upstream_total")?;
    ensure!(
        from_peers > 0.0 && from_upstream == 0.0,
        "second node: {from_peers} bytes from peers, {from_upstream} from the registry"
    );
    ensure!(
        layer_bytes_served(&registry, &layers)? == served_before,
        "the registry served layer bytes to the second node"
    );
    Ok(())
}

#[test]
fn a_layer_whose_toc_lies_is_unpacked_normally() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    lazy_image(dir, &registry)?;
    // The same image, but its data layer's manifest entry names another TOC digest: the TOC
    // the layer holds no longer matches what the manifest vouches for.
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let url = format!("{}/v2/test/lazy/manifests/", registry.url());
    let manifest = http::get(&format!("{url}esgz"), Some(oci), Duration::from_secs(10))?;
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest.body)?;
    let annotation = "containerd.io/snapshot/stargz/toc.digest";
    let data_layer = &mut manifest["layers"][1]["annotations"][annotation];
    ensure!(
        data_layer.is_string(),
        "converted layer without a TOC digest"
    );
    *data_layer = format!("sha256:{}", "0".repeat(64)).into();
    http::put(&format!("{url}lying"), oci, serde_json::to_vec(&manifest)?)?;
    let lying = format!("{}/test/lazy:lying", registry.addr());

    let node = Node::start(
        dir,
        "node",
        &NodeOptions {
            insecure: vec![registry.addr()],
            ..NodeOptions::default()
        },
    )?;
    let containerd = Containerd::start(&dir.join("containerd"), &shoal_proxy_config(&node.socket))?;
    let summary = node.pull(&containerd, &lying)?;
    ensure!(
        outcomes(&summary, "lazy") == 1 && outcomes(&summary, "unpacked") == 1,
        "the lying layer must be unpacked, the other mounted lazily: {summary}"
    );
    let out = containerd.run_with(&["--rm", "--snapshotter", "shoal"], &lying, "lying", &[])?;
    ensure!(
        out == "hello from a lazy layer\n1024\n",
        "container printed {out:?}"
    );
    ensure!(
        fuse_mounts(&node.root)? == 1,
        "only the honest layer is a FUSE mount"
    );
    Ok(())
}

#[test]
fn a_read_with_nowhere_to_come_from_fails_with_eio_then_recovers() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let mut registry = Registry::start(&dir.join("registry"))?;
    let image = lazy_image(dir, &registry)?;
    // Slow enough that the end of the big file is still in the registry when it stops.
    let opts = NodeOptions {
        insecure: vec![registry.addr()],
        extra: "ingress_mbit = 8\n\n[fuse]\nread_timeout_ms = 3000\n".into(),
        ..NodeOptions::default()
    };
    let node = Node::start(dir, "node", &opts)?;
    let containerd = Containerd::start(&dir.join("containerd"), &shoal_proxy_config(&node.socket))?;
    node.pull(&containerd, &image)?;
    let flags = ["--rm", "--snapshotter", "shoal"];
    // The last 4 KiB of the big file, which the slow background fetch has not reached.
    let tail = [
        "/bin/sh",
        "-c",
        "dd if=/data/big of=/dev/null bs=4096 skip=12287 count=1 && echo read",
    ];

    registry.stop();
    let started = std::time::Instant::now();
    let failed = containerd.run_with(&flags, &image, "no-source", &tail);
    let waited = started.elapsed();
    let message = match failed {
        Ok(out) => anyhow::bail!("the read succeeded with no source: {out:?}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        message.contains("I/O error") || message.contains("Input/output error"),
        "expected EIO, got: {message}"
    );
    ensure!(
        node.metric("shoal_fuse_eio_total")? > 0.0,
        "an EIO the node does not count"
    );
    // Bounded: the read timeout (3 s) per attempt, not forever.
    ensure!(
        waited < Duration::from_secs(60),
        "the failing read took {waited:?}"
    );

    registry.restart()?;
    let out = containerd.run_with(&flags, &image, "source-back", &tail)?;
    ensure!(out == "read\n", "after the registry came back: {out:?}");
    Ok(())
}

/// Two layers with every kind of entry a container sees: hard links, symlinks, a fifo, a
/// setuid binary, an empty file, a deep tree, then a whiteout and an opaque directory on top.
fn tricky_layers() -> Result<(Vec<u8>, Vec<u8>)> {
    fn tar(
        build: impl FnOnce(&mut tar::Builder<Vec<u8>>) -> std::io::Result<()>,
    ) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder)?;
        Ok(builder.into_inner()?)
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_600_000_000);
        h
    }
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            path,
            std::io::empty(),
        )
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| {
        b.append_data(
            &mut header(tar::EntryType::Regular, mode, data.len() as u64),
            path,
            data,
        )
    };
    let lower = tar(|b| {
        dir(b, "t/")?;
        file(b, "t/a", 0o644, b"hard linked\n")?;
        b.append_link(&mut header(tar::EntryType::Link, 0o644, 0), "t/b", "t/a")?;
        b.append_link(&mut header(tar::EntryType::Symlink, 0o777, 0), "t/s", "a")?;
        file(b, "t/gone", 0o600, b"whited out above\n")?;
        file(b, "t/empty", 0o644, b"")?;
        file(b, "t/suid", 0o4755, &random_bytes(3, 300_000))?;
        b.append_data(
            &mut header(tar::EntryType::Fifo, 0o644, 0),
            "t/fifo",
            std::io::empty(),
        )?;
        dir(b, "t/d/")?;
        file(b, "t/d/hidden", 0o644, b"hidden by an opaque dir\n")?;
        dir(b, "t/deep/a/b/c/")?;
        file(b, "t/deep/a/b/c/leaf", 0o640, &random_bytes(4, 5 << 20))
    })?;
    let upper = tar(|b| {
        dir(b, "t/")?;
        file(b, "t/.wh.gone", 0o644, b"")?;
        dir(b, "t/d/")?;
        file(b, "t/d/.wh..wh..opq", 0o644, b"")?;
        file(b, "t/d/shown", 0o644, b"from the upper layer\n")?;
        file(b, "t/new", 0o755, b"#!/bin/sh\necho new\n")
    })?;
    Ok((lower, upper))
}

#[test]
fn a_lazy_image_looks_exactly_like_the_same_image_on_overlayfs() -> Result<()> {
    if let Some(why) = caps::missing(NEEDS).or_else(caps::missing_fuse) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let (lower, upper) = tricky_layers()?;
    let plain = ImageBuilder::new()
        .busybox()
        .layer_tar(lower)
        .layer_tar(upper)
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/tricky:plain")?;
    let lazy = format!("{}/test/tricky:esgz", registry.addr());
    convert(dir, &registry.addr(), &plain.reference, &lazy, &[])?;

    let node = Node::start(
        dir,
        "node",
        &NodeOptions {
            insecure: vec![registry.addr()],
            ..NodeOptions::default()
        },
    )?;
    let containerd = Containerd::start(&dir.join("containerd"), &shoal_proxy_config(&node.socket))?;
    containerd.ctr_ok(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &plain.reference,
    ])?;
    let summary = node.pull(&containerd, &lazy)?;
    ensure!(
        outcomes(&summary, "lazy") == 3,
        "every layer lazy: {summary}"
    );

    let listing = [
        "/bin/sh",
        "-c",
        // Directory mtimes are left out: a directory the tar does not list gets the time of
        // its extraction on overlayfs, and of the mount on Shoal.
        "cd /t && find . | sort | while read f; do \
           if [ -d \"$f\" ]; then stat -c '%n %f %u:%g %s %h' \"$f\"; \
           else stat -c '%n %f %u:%g %s %Y %h %t:%T' \"$f\"; fi; \
           if [ -L \"$f\" ]; then readlink \"$f\"; \
           elif [ -f \"$f\" ]; then md5sum \"$f\"; fi; \
         done; ./new",
    ];
    let on_overlayfs = containerd.run_with(
        &["--rm", "--snapshotter", "overlayfs"],
        &plain.reference,
        "overlayfs",
        &listing,
    )?;
    let on_shoal = containerd.run_with(
        &["--rm", "--snapshotter", "shoal"],
        &lazy,
        "shoal",
        &listing,
    )?;
    ensure!(
        on_overlayfs.contains("./d/shown") && !on_overlayfs.contains("gone"),
        "the listing itself is wrong:\n{on_overlayfs}"
    );
    ensure!(
        on_shoal == on_overlayfs,
        "lazy:\n{on_shoal}\noverlayfs:\n{on_overlayfs}"
    );
    Ok(())
}

/// Every local copy a node keeps: its path and inode number (a rewritten copy gets a new one).
fn copy_files(root: &Path) -> Result<std::collections::BTreeMap<PathBuf, u64>> {
    use std::os::unix::fs::MetadataExt;
    let mut files = std::collections::BTreeMap::new();
    let layers = match std::fs::read_dir(root.join("lazy/copies")) {
        Ok(layers) => layers,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e.into()),
    };
    for layer in layers {
        for file in std::fs::read_dir(layer?.path())? {
            let file = file?;
            if !file.file_name().to_string_lossy().starts_with('.') {
                files.insert(file.path(), file.metadata()?.ino());
            }
        }
    }
    Ok(files)
}

fn pull_layers(summary: &serde_json::Value) -> Vec<String> {
    summary["layers"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|l| l["digest"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Layer bytes the registry has served so far (the image's config and manifests are not
/// counted: `shoal pull` reads those from the registry itself).
fn layer_bytes_served(registry: &Registry, layers: &[String]) -> Result<u64> {
    let mut total = 0;
    for digest in layers {
        total += registry.blob_bytes_served(digest)?;
    }
    Ok(total)
}
