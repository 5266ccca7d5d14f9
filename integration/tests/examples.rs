//! The deployment files in `examples/` parse and say what the docs say they do.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};

fn example(path: &str) -> Result<toml::Table> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(path);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn get<'a>(table: &'a toml::Table, dotted: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = dotted.split_last()?;
    let mut t = table;
    for key in parents {
        t = t.get(*key)?.as_table()?;
    }
    t.get(*last)
}

#[test]
fn containerd_configs_register_the_snapshotter_for_the_cri() -> Result<()> {
    for (file, images) in [
        (
            "containerd/config-1.x.toml",
            vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        ),
        (
            "containerd/config-2.x.toml",
            vec!["plugins", "io.containerd.cri.v1.images"],
        ),
    ] {
        let cfg = example(file)?;
        let addr = get(&cfg, &["proxy_plugins", "shoal", "address"]).and_then(|v| v.as_str());
        ensure!(
            addr == Some("/run/shoal/shoal.sock"),
            "{file}: proxy address {addr:?}"
        );
        let content =
            get(&cfg, &["proxy_plugins", "shoal-content", "type"]).and_then(|v| v.as_str());
        ensure!(
            content == Some("content"),
            "{file}: no content proxy plugin"
        );
        let disabled = get(&cfg, &["disabled_plugins"]).and_then(|v| v.as_array());
        ensure!(
            disabled.is_some_and(|d| d
                .iter()
                .any(|p| p.as_str() == Some("io.containerd.content.v1.content"))),
            "{file}: the built-in content store must be disabled"
        );
        let kind = get(&cfg, &["proxy_plugins", "shoal", "type"]).and_then(|v| v.as_str());
        ensure!(kind == Some("snapshot"), "{file}: proxy type {kind:?}");
        let mut path = images.clone();
        path.push("snapshotter");
        ensure!(
            get(&cfg, &path).and_then(|v| v.as_str()) == Some("shoal"),
            "{file}: CRI snapshotter"
        );
        let mut path = images;
        path.push("disable_snapshot_annotations");
        ensure!(
            get(&cfg, &path).and_then(|v| v.as_bool()) == Some(false),
            "{file}: snapshot annotations"
        );
    }
    Ok(())
}

#[test]
fn hosts_files_send_pulls_to_the_node_mirror_first() -> Result<()> {
    for file in [
        "containerd/hosts.toml",
        "containerd/certs.d/docker.io/hosts.toml",
        "containerd/certs.d/_default/hosts.toml",
    ] {
        let hosts = example(file)?;
        let host = get(&hosts, &["host", "http://127.0.0.1:7072", "capabilities"])
            .and_then(|v| v.as_array())
            .with_context(|| format!("{file}: no mirror host"))?;
        ensure!(
            host.iter().any(|c| c.as_str() == Some("pull")),
            "{file}: mirror cannot pull"
        );
    }
    Ok(())
}
