//! Proves the end-to-end harness against the real components, before any Shoal code is involved:
//! an image built here is pushed to a real registry, pulled by a private containerd and run,
//! and the registry's log accounts for every byte of the layer it served.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shoal_integration::{Containerd, ImageBuilder, Registry, caps, random_bytes};

const TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "runc",
    "containerd-shim-runc-v2",
    "docker-registry",
    "skopeo",
];

fn skip_reason() -> Option<String> {
    caps::missing(TOOLS)
}

#[test]
fn image_is_pushed_pulled_and_run() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    // Declared first, dropped last: after the guards below have stopped and unmounted.
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry"))?;
    const LAYER_LEN: usize = 4 << 20;
    let image = ImageBuilder::new()
        .busybox()
        .layer([("data/random.bin", random_bytes(42, LAYER_LEN))])
        .build(&tmp.path().join("image"))?
        .push(&registry.addr(), "harness/test:v1")?;
    ensure!(image.layers.len() == 2, "{image:?}");
    let (random_layer, random_layer_size) = image.layers[1].clone();
    ensure!(
        random_layer_size >= LAYER_LEN as u64,
        "random data compressed to {random_layer_size} bytes"
    );
    let pushed_by_skopeo = registry.blob_bytes_served(&random_layer)?;

    let containerd = Containerd::start(&tmp.path().join("containerd"), "")?;
    let result = (|| -> Result<()> {
        containerd.ctr_ok(&["image", "pull", "--plain-http", &image.reference])?;
        let out = containerd.run(&image.reference, "c1", &["/bin/sh", "-c", "echo hello"])?;
        ensure!(out.trim() == "hello", "container printed {out:?}");
        // The layer's file is there, intact.
        let out = containerd.run(
            &image.reference,
            "c2",
            &["/bin/sh", "-c", "wc -c < /data/random.bin"],
        )?;
        ensure!(out.trim() == LAYER_LEN.to_string(), "wc printed {out:?}");

        let served = registry.blob_bytes_served(&random_layer)? - pushed_by_skopeo;
        ensure!(
            served >= random_layer_size && served < 2 * random_layer_size,
            "the registry served {served} bytes of a {random_layer_size}-byte layer"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("--- containerd log ---\n{}", containerd.log());
        eprintln!("--- registry log ---\n{}", registry.log());
    }
    result
}

#[test]
fn registry_restarts_on_the_same_port_with_its_storage() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let mut registry = Registry::start(&tmp.path().join("registry"))?;
    let image = ImageBuilder::new()
        .layer([("hello.txt", b"hello\n".to_vec())])
        .build(&tmp.path().join("image"))?
        .push(&registry.addr(), "small")?;
    let manifest_url = format!("{}/v2/small/manifests/latest", registry.url());

    registry.stop();
    ensure!(!registry.is_running());
    ensure!(
        std::net::TcpStream::connect(registry.addr()).is_err(),
        "something still listens on {}",
        registry.addr()
    );

    registry.restart()?;
    let (layer, size) = &image.layers[0];
    let blob_url = format!("{}/v2/small/blobs/{layer}", registry.url());
    let body = fetch(&blob_url)?;
    ensure!(
        body.len() as u64 == *size,
        "got {} of {size} bytes",
        body.len()
    );
    ensure!(registry.blob_bytes_served(layer)? == *size);
    ensure!(!fetch(&manifest_url)?.is_empty());
    Ok(())
}

/// A plain GET from the test, as a client other than the harness would make it.
fn fetch(url: &str) -> Result<Vec<u8>> {
    let url = url.to_owned();
    std::thread::spawn(move || -> Result<Vec<u8>> {
        let response = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?
            .get(&url)
            .header("Accept", shoal_integration::image::MANIFEST_MEDIA_TYPE)
            .send()?
            .error_for_status()?;
        Ok(response.bytes()?.to_vec())
    })
    .join()
    .ok()
    .context("fetch thread panicked")?
}

#[test]
fn hosts_dir_sends_pulls_to_the_mirror_and_falls_back() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let upstream = Registry::start(&tmp.path().join("upstream"))?;
    let mut mirror = Registry::start(&tmp.path().join("mirror"))?;
    let built = ImageBuilder::new()
        .busybox()
        .layer([("data/random.bin", random_bytes(7, 1 << 20))])
        .build(&tmp.path().join("image"))?;
    let image = built.push(&upstream.addr(), "mirrored:v1")?;
    built.push(&mirror.addr(), "mirrored:v1")?;
    let (layer, size) = image.layers[1].clone();
    let upstream_before = upstream.blob_bytes_served(&layer)?;
    let mirror_before = mirror.blob_bytes_served(&layer)?;

    let hosts =
        shoal_integration::hosts_dir(&tmp.path().join("hosts"), &upstream.addr(), &mirror.url())?;
    let hosts = hosts.display().to_string();
    let containerd = Containerd::start(&tmp.path().join("containerd"), "")?;
    let pull =
        |reference: &str| containerd.ctr_ok(&["image", "pull", "--hosts-dir", &hosts, reference]);

    pull(&image.reference)?;
    ensure!(mirror.blob_bytes_served(&layer)? - mirror_before == size);
    ensure!(upstream.blob_bytes_served(&layer)? == upstream_before);
    // containerd percent-encodes the registry host in the mirror's `ns` query parameter.
    let ns = format!("ns={}", upstream.addr().replace(':', "%3A"));
    let mirror_saw_ns = mirror.requests()?.iter().any(|r| r.uri.contains(&ns));
    ensure!(
        mirror_saw_ns,
        "the mirror got no ?ns= query: {:#?}",
        mirror.requests()?
    );

    // With the mirror gone, containerd falls back to the registry itself. (A fresh containerd:
    // one that has unpacked the layer skips fetching it again, even after `ctr content rm`.)
    mirror.stop();
    drop(containerd);
    let containerd = Containerd::start(&tmp.path().join("containerd2"), "")?;
    containerd.ctr_ok(&["image", "pull", "--hosts-dir", &hosts, &image.reference])?;
    ensure!(upstream.blob_bytes_served(&layer)? - upstream_before == size);
    Ok(())
}

#[test]
fn dropping_containerd_leaves_no_task_shim_or_mount() -> Result<()> {
    if let Some(why) = skip_reason() {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let registry = Registry::start(&tmp.path().join("registry"))?;
    let image = ImageBuilder::new()
        .busybox()
        .build(&tmp.path().join("image"))?
        .push(&registry.addr(), "busybox")?;
    let containerd = Containerd::start(&tmp.path().join("containerd"), "")?;
    containerd.ctr_ok(&["image", "pull", "--plain-http", &image.reference])?;
    containerd.run_with(
        &["--detach"],
        &image.reference,
        "left-running",
        &["sleep", "1000"],
    )?;
    let root = containerd.dir().to_owned();
    let socket = containerd.address().display().to_string();
    ensure!(
        !mounts_under(&root)?.is_empty(),
        "the running container has no rootfs mount"
    );
    ensure!(!processes_mentioning(&socket)?.is_empty(), "no shim found");

    drop(containerd);
    ensure!(
        mounts_under(&root)?.is_empty(),
        "left mounted: {:?}",
        mounts_under(&root)?
    );
    // A killed shim may linger a moment as a zombie until init reaps it: those are harmless.
    let live = processes_mentioning(&socket)?;
    ensure!(live.is_empty(), "left running: {live:?}");
    Ok(())
}

fn mounts_under(dir: &std::path::Path) -> Result<Vec<String>> {
    let dir = dir.display().to_string();
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&dir))
        .map(str::to_owned)
        .collect())
}

/// Live (non-zombie) processes whose command line contains `needle`.
fn processes_mentioning(needle: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let path = entry.path();
        let (Ok(cmdline), Ok(stat)) = (
            std::fs::read(path.join("cmdline")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    Ok(found)
}
