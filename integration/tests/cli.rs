//! The `shoal` CLI as a newcomer meets it: `shoal doctor` on a broken containerd config names the
//! key and the fix and exits non-zero; `shoal status` lists what a running node holds.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use shoal_integration::shoal::{Node, NodeOptions, shoal_cli};
use shoal_integration::{ImageBuilder, Registry, caps, free_port, http, random_bytes, shoal_bin};

/// A containerd config from the doctor's unit-test fixtures.
fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../plugin/src/doctor/fixtures")
        .join(name)
}

/// Runs `shoal ARGS` with the built-in defaults (no config file), whatever its exit status.
fn shoal(args: &[&str]) -> Result<Output> {
    Command::new(shoal_bin()?)
        .env_remove("SHOAL_CONFIG")
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .output()
        .context("running shoal")
}

fn no_panic(out: &Output) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "shoal panicked: {stderr}"
    );
    Ok(())
}

#[test]
fn doctor_names_the_broken_key_and_its_fix() -> Result<()> {
    let broken = fixture("wrong-snapshotter.toml");
    let out = shoal(&[
        "doctor",
        "--containerd-config",
        &broken.display().to_string(),
    ])?;
    no_panic(&out)?;
    ensure!(!out.status.success(), "doctor passed a broken config");
    let stdout = String::from_utf8(out.stdout)?;
    let line = stdout
        .lines()
        .find(|l| l.contains("cri-snapshotter"))
        .with_context(|| format!("no cri-snapshotter line in\n{stdout}"))?;
    let key = r#"plugins."io.containerd.grpc.v1.cri".containerd.snapshotter"#;
    ensure!(
        line.starts_with("FAIL")
            && line.contains(&format!("{key} in {}", broken.display()))
            && line.contains(&format!("fix: set {key} = \"shoal\"")),
        "{line}"
    );

    // The same as JSON, on a config that keeps containerd's own content store beside Shoal's.
    let broken = fixture("content-not-disabled.toml");
    let out = shoal(&[
        "doctor",
        "--json",
        "--containerd-config",
        &broken.display().to_string(),
    ])?;
    no_panic(&out)?;
    ensure!(!out.status.success(), "doctor passed a broken config");
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let content = checks
        .iter()
        .find(|c| c["name"] == "content-proxy")
        .with_context(|| format!("no content-proxy check in {checks:#?}"))?;
    ensure!(content["status"] == "fail", "{content:#}");
    ensure!(
        content["detail"]
            .as_str()
            .is_some_and(|d| d.contains("disabled_plugins")),
        "{content:#}"
    );
    ensure!(
        content["fix"]
            .as_str()
            .is_some_and(|f| f.contains("\"io.containerd.content.v1.content\"")),
        "{content:#}"
    );

    // A file that is not there is named, not a crash.
    let out = shoal(&["doctor", "--containerd-config", "/nonexistent/config.toml"])?;
    no_panic(&out)?;
    ensure!(!out.status.success());
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(
        stdout.contains("FAIL  containerd-config")
            && stdout.contains("/nonexistent/config.toml does not exist"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn status_of_a_node_that_is_not_running_names_the_url() -> Result<()> {
    let node = format!("http://127.0.0.1:{}", free_port()?);
    let out = shoal(&["status", "--node", &node])?;
    no_panic(&out)?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains(&format!("{node}/status")) && stderr.contains("`shoal node` running"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn status_lists_the_blob_a_node_fetched() -> Result<()> {
    if let Some(why) = caps::missing(&["docker-registry", "skopeo"]) {
        eprintln!("skipping: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let registry = Registry::start(&dir.join("registry"))?;
    let image = ImageBuilder::new()
        .layer([("data/blob", random_bytes(11, 5 << 20))])
        .build(&dir.join("image"))?
        .push(&registry.addr(), "test/status:latest")?;
    let node = Node::start(
        dir,
        "node",
        &NodeOptions {
            insecure: vec![registry.addr()],
            ..NodeOptions::default()
        },
    )?;

    // The node fetches the layer through its mirror, as containerd would.
    let (layer, size) = image.layers[0].clone();
    let url = format!(
        "{}/v2/test/status/blobs/{layer}?ns={}",
        node.mirror_url(),
        registry.addr()
    );
    let got = http::get(&url, None, Duration::from_secs(60))?;
    ensure!(
        got.status == 200 && got.body.len() as u64 == size,
        "GET {url}: {} with {} bytes, want {size}",
        got.status,
        got.body.len()
    );

    let mirror = node.mirror_url();
    let out = shoal_cli(
        &node.config_path(),
        &["status", "--json", "--node", &mirror],
    )?;
    let status: Value =
        serde_json::from_str(&out).with_context(|| format!("shoal status printed {out}"))?;
    let blobs = status["blobs"]
        .as_array()
        .with_context(|| format!("no blobs in {status:#}"))?;
    let blob = blobs
        .iter()
        .find(|b| b["digest"] == layer.as_str())
        .with_context(|| format!("{layer} not listed in {status:#}"))?;
    let pieces = blob["pieces_total"].as_u64().unwrap_or_default();
    ensure!(
        blob["size"] == size
            && blob["complete"] == true
            && pieces > 1
            && blob["pieces_present"] == pieces,
        "{blob:#}"
    );
    ensure!(
        status["role"] == "node" && status["lazy_mounts"] == serde_json::json!([]),
        "{status:#}"
    );
    ensure!(
        status["bytes"]["from_upstream"].as_u64() >= Some(size),
        "{status:#}"
    );

    // Without --json: the same blob, readable.
    let text = shoal_cli(&node.config_path(), &["status"])?;
    ensure!(
        text.lines()
            .any(|l| l.contains(&layer)
                && l.contains(&format!("complete  {pieces}/{pieces} pieces"))),
        "{text}"
    );
    Ok(())
}
