//! `shoal convert` end to end: an image built here and pushed to a real registry is converted
//! registry to registry; the new manifest's layers carry TOC digests that Shoal's own eStargz
//! reader accepts (and whose chunks give back the original file), the config's diff ids match
//! the new layers, stock containerd pulls and runs the result exactly as it ran the original,
//! and converting again copies the layers unchanged. Layout to layout, skopeo accepts the
//! result and umoci unpacks it to the same files as the original.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use shoal_fuse::estargz::{self, Limits};
use shoal_fuse::index::ROOT;
use shoal_fuse::{FileSource, Index};
use shoal_integration::image::{FileEntry, MANIFEST_MEDIA_TYPE};
use shoal_integration::{
    Containerd, ImageBuilder, Registry, caps, http, proc, random_bytes, shoal_bin,
};

const CONVERT_TIMEOUT: Duration = Duration::from_secs(600);
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";

/// Three layers: busybox, data (a 6 MiB random file, two 4 MiB chunks), and an executable script.
fn builder() -> ImageBuilder {
    ImageBuilder::new()
        .busybox()
        .layer([
            ("data/blob", random_bytes(11, 6 << 20)),
            ("etc/motd", b"hello from shoal\n".to_vec()),
        ])
        .layer_entries([
            FileEntry::new("app/run.sh", b"#!/bin/sh\necho ran\n".to_vec()).mode(0o755),
        ])
        .cmd(&["/bin/sh", "-c", "cat /etc/motd"])
}

/// Runs `shoal [--config CFG] convert ARGS...`; returns the digest it printed last.
fn convert(config: Option<&Path>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(shoal_bin()?);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("convert").args(args);
    let out = proc::run_ok(&mut cmd, CONVERT_TIMEOUT)?;
    out.lines()
        .find_map(|l| l.strip_prefix("digest: "))
        .map(str::to_owned)
        .with_context(|| format!("no digest in the output of convert:\n{out}"))
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn get_ok(url: &str, accept: Option<&str>) -> Result<Vec<u8>> {
    let response = http::get(url, accept, Duration::from_secs(60))?;
    ensure!(
        response.status == 200,
        "GET {url}: HTTP {}",
        response.status
    );
    Ok(response.body)
}

/// The `(path, node)` of `path` (`a/b`) in an index.
fn lookup<'a>(index: &'a Index, path: &str) -> Result<&'a shoal_fuse::Node> {
    let mut ino = ROOT;
    for name in path.split('/') {
        ino = index
            .lookup(ino, name.as_bytes())
            .with_context(|| format!("{path} is not in the layer"))?;
    }
    index.node(ino).context("dangling inode")
}

#[test]
fn converts_a_registry_image_that_containerd_still_runs() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo", "containerd", "ctr", "runc"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let original = builder()
        .build(&dir.join("image"))?
        .push(&registry.addr(), "demo:v1")?;
    let config = dir.join("shoal.toml");
    std::fs::write(
        &config,
        format!("[registry]\ninsecure = [{:?}]\n", registry.addr()),
    )?;
    let prioritize = dir.join("prioritize");
    std::fs::write(&prioritize, "/etc/motd\nbin/busybox\n")?;

    let converted = format!("{}/demo:esgz", registry.addr());
    let digest = convert(
        Some(&config),
        &[
            "--prioritize",
            &prioritize.display().to_string(),
            &original.reference,
            &converted,
        ],
    )?;

    let base = format!("{}/v2/demo", registry.url());
    let manifest_bytes = get_ok(&format!("{base}/manifests/esgz"), Some(MANIFEST_MEDIA_TYPE))?;
    ensure!(
        sha256(&manifest_bytes) == digest,
        "printed {digest}, registry holds another"
    );
    let manifest: Value = serde_json::from_slice(&manifest_bytes)?;
    ensure!(manifest["mediaType"] == MANIFEST_MEDIA_TYPE, "{manifest}");
    let layers = manifest["layers"].as_array().context("no layers")?;
    ensure!(layers.len() == original.layers.len(), "{manifest}");
    let config_digest = manifest["config"]["digest"].as_str().context("no config")?;
    let image_config: Value =
        serde_json::from_slice(&get_ok(&format!("{base}/blobs/{config_digest}"), None)?)?;
    ensure!(
        image_config["config"]["Cmd"][2] == "cat /etc/motd",
        "the config lost its Cmd: {image_config}"
    );

    let mut layer_digests = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        ensure!(
            layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip",
            "{layer}"
        );
        let toc = layer["annotations"][TOC_DIGEST]
            .as_str()
            .context("no TOC digest")?;
        let layer_digest = layer["digest"].as_str().context("no digest")?;
        layer_digests.push(layer_digest.to_owned());
        let blob = get_ok(&format!("{base}/blobs/{layer_digest}"), None)?;
        ensure!(
            sha256(&blob) == layer_digest && blob.len() as u64 == layer["size"],
            "{layer}"
        );

        // The config's diff id is that of the tar the blob inflates to.
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut tar)?;
        ensure!(
            image_config["rootfs"]["diff_ids"][i] == sha256(&tar),
            "diff id of layer {i}"
        );
        ensure!(
            layer["annotations"][UNCOMPRESSED_SIZE].as_str()
                == Some(tar.len().to_string().as_str()),
            "{layer}"
        );

        let path = dir.join(format!("layer{i}"));
        std::fs::write(&path, &blob)?;
        let source = Arc::new(FileSource::open(&path)?);
        let opened = estargz::Layer::open(source, Some(toc), &Limits::default())
            .with_context(|| format!("opening layer {i} as eStargz"))?;
        if i == 1 {
            let node = lookup(opened.index(), "data/blob")?;
            let mut content = Vec::new();
            for chunk in &node.chunks {
                content.extend(opened.read_chunk(chunk)?);
            }
            ensure!(
                content == random_bytes(11, 6 << 20),
                "data/blob read through the TOC differs"
            );
            ensure!(
                opened.index().prefetch.is_some(),
                "prioritized etc/motd but no prefetch range"
            );
        }
    }

    // Converting an eStargz image again copies its layers unchanged.
    let again = format!("{}/demo:again", registry.addr());
    convert(Some(&config), &[&converted, &again])?;
    let manifest: Value = serde_json::from_slice(&get_ok(
        &format!("{base}/manifests/again"),
        Some(MANIFEST_MEDIA_TYPE),
    )?)?;
    let copied: Vec<&str> = manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str())
        .collect();
    ensure!(
        copied == layer_digests,
        "re-conversion changed layers: {copied:?}"
    );

    // Stock containerd, no Shoal: pulls both, and both run the same.
    let containerd = Containerd::start(&dir.join("containerd"), "")?;
    let script =
        "cat /etc/motd; sha256sum /data/blob; ls -ln /app /etc/motd /bin/busybox; /app/run.sh";
    let mut outputs = Vec::new();
    for (i, reference) in [&original.reference, &converted].into_iter().enumerate() {
        containerd.ctr_ok(&["image", "pull", "--plain-http", reference])?;
        let out = containerd.run(reference, &format!("run{i}"), &["/bin/sh", "-c", script])?;
        outputs.push(out);
    }
    ensure!(
        outputs[0].contains("hello from shoal") && outputs[0].contains("ran"),
        "{outputs:?}"
    );
    ensure!(
        outputs[0] == outputs[1],
        "original and converted differ:\n{}\n---\n{}",
        outputs[0],
        outputs[1]
    );
    let default_cmd = containerd.run(&converted, "default-cmd", &[])?;
    ensure!(default_cmd.trim() == "hello from shoal", "{default_cmd:?}");
    Ok(())
}

#[test]
fn converts_a_layout_that_skopeo_and_umoci_accept() -> Result<()> {
    if let Some(why) = caps::missing(&["skopeo", "umoci"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let image = builder().build(&dir.join("image"))?;
    let src = format!("oci:{}:latest", image.layout.display());
    let out = dir.join("out");
    let digest = convert(None, &[&src, &format!("oci:{}:esgz", out.display())])?;

    let inspect = proc::run_ok(
        Command::new("skopeo").args(["inspect", &format!("oci:{}:esgz", out.display())]),
        Duration::from_secs(60),
    )?;
    let inspect: Value = serde_json::from_str(&inspect)?;
    ensure!(inspect["Digest"] == digest.as_str(), "{inspect}");
    ensure!(
        inspect["Layers"].as_array().map(Vec::len) == Some(3),
        "{inspect}"
    );

    let unpack = |layout: &Path, tag: &str, to: &Path| {
        proc::run_ok(
            Command::new("umoci").args([
                "unpack",
                "--rootless",
                "--image",
                &format!("{}:{tag}", layout.display()),
                &to.display().to_string(),
            ]),
            Duration::from_secs(120),
        )
    };
    unpack(&image.layout, "latest", &dir.join("a"))?;
    unpack(&out, "esgz", &dir.join("b"))?;
    let a = tree(&dir.join("a/rootfs"))?;
    let mut b = tree(&dir.join("b/rootfs"))?;
    // eStargz's own entries are plain files to any other reader.
    for extra in [
        ".no.prefetch.landmark",
        ".prefetch.landmark",
        "stargz.index.json",
    ] {
        b.remove(&PathBuf::from(extra));
    }
    ensure!(
        a.len() > 100,
        "busybox unpacked to only {} entries",
        a.len()
    );
    if a != b {
        let differ: Vec<_> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(b.keys().filter(|k| !a.contains_key(*k)))
            .take(10)
            .collect();
        bail!("unpacked trees differ at {differ:?}");
    }
    Ok(())
}

/// Every entry under `root`: type, mode and content (or link target).
fn tree(root: &Path) -> Result<BTreeMap<PathBuf, (u32, Vec<u8>)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let content = if meta.is_symlink() {
                std::fs::read_link(&path)?
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_file() {
                Sha256::digest(std::fs::read(&path)?).to_vec()
            } else {
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                Vec::new()
            };
            out.insert(path.strip_prefix(root)?.to_owned(), (meta.mode(), content));
        }
    }
    Ok(out)
}

#[test]
fn converts_an_index_and_a_docker_manifest() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let image = builder().build(&dir.join("image"))?;
    let layout = &image.layout;
    let blob = |digest: &str| -> Result<Vec<u8>> {
        let hex = digest.strip_prefix("sha256:").context("not sha256")?;
        Ok(std::fs::read(layout.join("blobs/sha256").join(hex))?)
    };
    // An index over the image for this machine's platform, and a Windows entry to leave out.
    let config: Value = serde_json::from_slice(&blob(&image.config_digest)?)?;
    let manifest_size = blob(&image.manifest_digest)?.len();
    let entry = |os: &str, arch: &Value| {
        serde_json::json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": image.manifest_digest,
            "size": manifest_size,
            "platform": {"os": os, "architecture": arch},
        })
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("linux", &config["architecture"]), entry("windows", &"amd64".into())],
    }))?;
    let index_digest = sha256(&index);
    std::fs::write(layout.join("blobs/sha256").join(&index_digest[7..]), &index)?;
    let mut top: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    top["manifests"]
        .as_array_mut()
        .context("no manifests")?
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest,
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }));
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&top)?)?;

    let out = dir.join("out");
    let digest = convert(
        None,
        &[
            &format!("oci:{}:multi", layout.display()),
            &format!("oci:{}:multi", out.display()),
        ],
    )?;
    let new_index: Value =
        serde_json::from_slice(&std::fs::read(out.join("blobs/sha256").join(&digest[7..]))?)?;
    ensure!(
        new_index["mediaType"] == "application/vnd.oci.image.index.v1+json",
        "{new_index}"
    );
    let entries = new_index["manifests"].as_array().context("no manifests")?;
    ensure!(entries.len() == 1, "windows was not left out: {new_index}");
    ensure!(entries[0]["platform"]["os"] == "linux", "{new_index}");
    ensure!(
        entries[0]["digest"] != image.manifest_digest.as_str(),
        "{new_index}"
    );
    proc::run_ok(
        Command::new("skopeo").args(["inspect", &format!("oci:{}:multi", out.display())]),
        Duration::from_secs(60),
    )?;
    // Asking for a platform the index lacks fails and says so.
    let mut cmd = Command::new(shoal_bin()?);
    cmd.args([
        "convert",
        "--platform",
        "linux/s390x",
        &format!("oci:{}:multi", layout.display()),
        &format!("oci:{}:none", out.display()),
    ]);
    let failed = proc::run(&mut cmd, CONVERT_TIMEOUT)?;
    ensure!(
        !failed.status.success() && String::from_utf8_lossy(&failed.stderr).contains("linux/s390x"),
        "{failed:?}"
    );

    // A Docker schema 2 manifest in a registry becomes an OCI one.
    let registry = Registry::start(&dir.join("registry"))?;
    proc::run_ok(
        Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--insecure-policy",
            "--format",
            "v2s2",
            "--dest-tls-verify=false",
            &format!("oci:{}:latest", layout.display()),
            &format!("docker://{}/demo:docker", registry.addr()),
        ]),
        Duration::from_secs(120),
    )?;
    let config_file = dir.join("shoal.toml");
    std::fs::write(
        &config_file,
        format!("[registry]\ninsecure = [{:?}]\n", registry.addr()),
    )?;
    let digest = convert(
        Some(&config_file),
        &[
            &format!("{}/demo:docker", registry.addr()),
            &format!("{}/demo:esgz", registry.addr()),
        ],
    )?;
    let manifest: Value = serde_json::from_slice(&get_ok(
        &format!("{}/v2/demo/manifests/{digest}", registry.url()),
        Some(MANIFEST_MEDIA_TYPE),
    )?)?;
    ensure!(manifest["mediaType"] == MANIFEST_MEDIA_TYPE, "{manifest}");
    ensure!(
        manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json",
        "{manifest}"
    );
    let layers = manifest["layers"].as_array().context("no layers")?;
    ensure!(
        layers.len() == 3
            && layers
                .iter()
                .all(|l| l["annotations"][TOC_DIGEST].is_string()),
        "{manifest}"
    );
    Ok(())
}
