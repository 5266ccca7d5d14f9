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

// ---- Kubernetes manifests -------------------------------------------------------------------

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml_ng::Value as Yaml;
use shoal_plugin::config::Config;

const NAMESPACE: &str = "shoal-system";
/// What the ConfigMap's templates hold in place of each pod's address.
const SAMPLE_IP: &str = "10.1.2.3";

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every document of every `examples/kubernetes/*.yaml`, with the file it came from.
fn manifests() -> Result<Vec<(String, Yaml)>> {
    let dir = examples_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = <Yaml as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("parsing {name}"))?;
            if !value.is_null() {
                docs.push((name.clone(), value));
            }
        }
    }
    Ok(docs)
}

/// `value` at a dotted path of mapping keys.
fn at<'a>(value: &'a Yaml, path: &str) -> Option<&'a Yaml> {
    path.split('.').try_fold(value, |v, key| v.get(key))
}

fn text<'a>(value: &'a Yaml, path: &str) -> Option<&'a str> {
    at(value, path).and_then(Yaml::as_str)
}

fn list<'a>(value: &'a Yaml, path: &str) -> &'a [Yaml] {
    at(value, path)
        .and_then(Yaml::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The one object of `kind` (and `name`, if given).
fn object<'a>(docs: &'a [(String, Yaml)], kind: &str, name: Option<&str>) -> Result<&'a Yaml> {
    let mut found = docs.iter().map(|(_, d)| d).filter(|d| {
        text(d, "kind") == Some(kind) && name.is_none_or(|n| text(d, "metadata.name") == Some(n))
    });
    let first = found
        .next()
        .with_context(|| format!("no {kind} {name:?} in examples/kubernetes"))?;
    ensure!(found.next().is_none(), "several {kind} {name:?}");
    Ok(first)
}

/// The ConfigMap's file `key`, with pod addresses filled in as the init containers do, loaded
/// by the node's own config loader.
fn configmap_file(docs: &[(String, Yaml)], key: &str) -> Result<(Config, String)> {
    let cm = object(docs, "ConfigMap", Some("shoal-config"))?;
    let raw = at(cm, "data")
        .and_then(|d| d.get(key))
        .and_then(Yaml::as_str)
        .with_context(|| format!("ConfigMap has no {key}"))?;
    let filled = raw
        .replace("@NODE_IP@", SAMPLE_IP)
        .replace("@POD_IP@", SAMPLE_IP);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(key);
    std::fs::write(&path, &filled)?;
    let cfg = Config::load(Some(&path)).with_context(|| format!("ConfigMap {key}"))?;
    Ok((cfg, raw.to_owned()))
}

/// A pod template's volumes by name.
fn volumes(workload: &Yaml) -> BTreeMap<String, &Yaml> {
    list(workload, "spec.template.spec.volumes")
        .iter()
        .filter_map(|v| Some((text(v, "name")?.to_owned(), v)))
        .collect()
}

fn container<'a>(workload: &'a Yaml, name: &str) -> Result<&'a Yaml> {
    list(workload, "spec.template.spec.containers")
        .iter()
        .find(|c| text(c, "name") == Some(name))
        .with_context(|| format!("no container {name}"))
}

fn mount_at<'a>(container: &'a Yaml, path: &str) -> Result<&'a Yaml> {
    list(container, "volumeMounts")
        .iter()
        .find(|m| text(m, "mountPath") == Some(path))
        .with_context(|| format!("nothing mounted at {path}"))
}

/// Checks that `container` runs `shoal <subcommand> --config F` with F rendered by the pod's
/// init container from the ConfigMap's `key`.
fn runs_shoal(workload: &Yaml, container_name: &str, subcommand: &str, key: &str) -> Result<()> {
    let c = container(workload, container_name)?;
    let image = text(c, "image").unwrap_or_default();
    ensure!(
        image.starts_with("ghcr.io/shoal-dev/shoal:"),
        "{container_name}: image {image}"
    );
    let argv: Vec<&str> = list(c, "command")
        .iter()
        .chain(list(c, "args"))
        .filter_map(Yaml::as_str)
        .collect();
    ensure!(
        argv.first() == Some(&"/usr/local/bin/shoal") && argv.get(1) == Some(&subcommand),
        "{container_name} runs {argv:?}"
    );
    let config = argv
        .iter()
        .position(|a| *a == "--config")
        .and_then(|i| argv.get(i + 1))
        .with_context(|| format!("{container_name}: no --config in {argv:?}"))?;
    let dir = Path::new(config)
        .parent()
        .and_then(Path::to_str)
        .unwrap_or_default();
    let volume = text(mount_at(c, dir)?, "name")
        .unwrap_or_default()
        .to_owned();
    let vols = volumes(workload);
    let source = vols
        .get(&volume)
        .with_context(|| format!("no volume {volume}"))?;
    if text(source, "configMap.name") == Some("shoal-config") {
        return Ok(());
    }
    // Rendered: an init container writes the file from the ConfigMap's template.
    let init = list(workload, "spec.template.spec.initContainers")
        .first()
        .context("the config is rendered but there is no init container")?;
    let script: Vec<&str> = list(init, "command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let script = script.join(" ");
    ensure!(
        script.contains(&format!("/{key}")) && script.contains(&format!("> {config}")),
        "the init container does not render {key} into {config}: {script}"
    );
    ensure!(
        list(init, "volumeMounts")
            .iter()
            .any(|m| text(m, "name") == Some(volume.as_str())),
        "the init container does not write the {volume} volume"
    );
    Ok(())
}

#[test]
fn kubernetes_manifests_parse_and_live_in_shoal_system() -> Result<()> {
    let docs = manifests()?;
    let mut kinds = Vec::new();
    for (file, doc) in &docs {
        let kind = text(doc, "kind").with_context(|| format!("{file}: a document has no kind"))?;
        ensure!(
            text(doc, "apiVersion").is_some(),
            "{file}: {kind} has no apiVersion"
        );
        let name = text(doc, "metadata.name").unwrap_or_default();
        if kind == "Namespace" {
            ensure!(name == NAMESPACE, "{file}: namespace {name}");
        } else {
            ensure!(
                text(doc, "metadata.namespace") == Some(NAMESPACE),
                "{file}: {kind} {name} is not in {NAMESPACE}"
            );
        }
        kinds.push(kind.to_owned());
    }
    for kind in [
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "StatefulSet",
        "DaemonSet",
    ] {
        ensure!(kinds.iter().any(|k| k == kind), "no {kind}: {kinds:?}");
    }
    Ok(())
}

#[test]
fn the_node_daemonset_shares_socket_root_and_fuse_with_the_host() -> Result<()> {
    let docs = manifests()?;
    let ds = object(&docs, "DaemonSet", Some("shoal-node"))?;
    let pod = at(ds, "spec.template.spec").context("no pod spec")?;
    ensure!(
        at(pod, "hostNetwork").and_then(Yaml::as_bool) == Some(true),
        "the swarm port and the mirror on 127.0.0.1 need hostNetwork"
    );
    ensure!(
        text(pod, "dnsPolicy") == Some("ClusterFirstWithHostNet"),
        "the tracker's Service name must resolve from the host network"
    );
    let node = container(ds, "node")?;
    ensure!(
        at(node, "securityContext.privileged").and_then(Yaml::as_bool) == Some(true),
        "the node must be privileged"
    );
    runs_shoal(ds, "node", "node", "shoal.toml")?;

    let (cfg, raw) = configmap_file(&docs, "shoal.toml")?;
    ensure!(
        raw.contains("@NODE_IP@"),
        "p2p.advertise must be filled in per host"
    );
    ensure!(
        cfg.p2p.advertise.as_deref() == Some(&format!("{SAMPLE_IP}:7071")[..]),
        "advertise {:?}",
        cfg.p2p.advertise
    );
    let vols = volumes(ds);
    // Each host path is mounted at the same path, so the paths the node hands containerd are
    // the host's.
    let host_mount = |path: &Path| -> Result<&Yaml> {
        let path = path.to_str().context("path")?;
        let mount = mount_at(node, path)?;
        let volume = text(mount, "name").unwrap_or_default();
        let host = vols
            .get(volume)
            .and_then(|v| text(v, "hostPath.path"))
            .with_context(|| format!("{path} is not a host path"))?;
        ensure!(host == path, "{path} is the host's {host}");
        Ok(mount)
    };
    let socket_dir = cfg.node.socket.parent().context("socket dir")?;
    host_mount(socket_dir)?;
    let root = host_mount(&cfg.node.root)?;
    ensure!(
        text(root, "mountPropagation") == Some("Bidirectional"),
        "FUSE mounts under node.root must reach the host: Bidirectional"
    );
    host_mount(Path::new("/dev/fuse"))?;
    let containerd = host_mount(Path::new("/etc/containerd"))?;
    ensure!(
        at(containerd, "readOnly").and_then(Yaml::as_bool) == Some(true),
        "/etc/containerd must be read-only"
    );

    // containerd reaches the mirror through the hosts.toml in examples/containerd.
    let hosts = example("containerd/certs.d/_default/hosts.toml")?;
    let mirror = format!("http://{}", cfg.mirror.listen);
    ensure!(
        hosts
            .get("host")
            .and_then(|h| h.as_table())
            .is_some_and(|h| h.contains_key(&mirror)),
        "hosts.toml does not name the node's mirror {mirror}"
    );
    // And the containerd configs dial the ConfigMap's socket.
    let cd = example("containerd/config-1.x.toml")?;
    let address = get(&cd, &["proxy_plugins", "shoal", "address"]).and_then(|v| v.as_str());
    ensure!(
        address == cfg.node.socket.to_str(),
        "containerd dials {address:?}, the node listens on {}",
        cfg.node.socket.display()
    );
    Ok(())
}

#[test]
fn tracker_and_seeds_are_wired_to_each_other() -> Result<()> {
    let docs = manifests()?;
    let tracker = object(&docs, "Deployment", Some("shoal-tracker"))?;
    ensure!(
        at(tracker, "spec.replicas").and_then(Yaml::as_u64) == Some(1),
        "the tracker keeps its state in memory: one replica"
    );
    ensure!(
        text(tracker, "spec.strategy.type") == Some("Recreate"),
        "two trackers at once split the swarm: Recreate"
    );
    runs_shoal(tracker, "tracker", "tracker", "tracker.toml")?;
    let (tracker_cfg, _) = configmap_file(&docs, "tracker.toml")?;
    let port: u64 = tracker_cfg
        .tracker
        .listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("tracker.listen port")?;
    let service = object(&docs, "Service", Some("shoal-tracker"))?;
    let service_port = list(service, "spec.ports")
        .first()
        .and_then(|p| at(p, "port"))
        .and_then(Yaml::as_u64)
        .context("tracker Service port")?;
    ensure!(
        service_port == port,
        "Service port {service_port}, tracker listens on {port}"
    );
    let url = format!("http://shoal-tracker.{NAMESPACE}.svc.cluster.local:{service_port}");

    let seeds = object(&docs, "StatefulSet", Some("shoal-seed"))?;
    runs_shoal(seeds, "seed", "seed", "seed.toml")?;
    let headless = text(seeds, "spec.serviceName").context("serviceName")?;
    let svc = object(&docs, "Service", Some(headless))?;
    ensure!(
        text(svc, "spec.clusterIP") == Some("None"),
        "the seeds' Service is headless"
    );
    let (seed_cfg, _) = configmap_file(&docs, "seed.toml")?;
    let claim = list(seeds, "spec.volumeClaimTemplates")
        .first()
        .context("seeds have no volume claim")?;
    let claim_name = text(claim, "metadata.name").unwrap_or_default();
    let store = mount_at(
        container(seeds, "seed")?,
        seed_cfg.node.root.to_str().unwrap_or_default(),
    )?;
    ensure!(
        text(store, "name") == Some(claim_name),
        "node.root is not on the claim"
    );
    let size = text(claim, "spec.resources.requests.storage").unwrap_or_default();
    let gib: u64 = size
        .strip_suffix("Gi")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("claim size {size}: expected NGi"))?;
    ensure!(
        seed_cfg.node.store_capacity_mib < gib * 1024,
        "the seed's store cap ({} MiB) must stay below its volume ({size})",
        seed_cfg.node.store_capacity_mib
    );

    let (node_cfg, _) = configmap_file(&docs, "shoal.toml")?;
    for (who, cfg) in [("node", &node_cfg), ("seed", &seed_cfg)] {
        ensure!(
            cfg.p2p.tracker.as_deref() == Some(url.as_str()),
            "{who}: tracker {:?}, the Service is {url}",
            cfg.p2p.tracker
        );
    }
    Ok(())
}

// ---- systemd units ------------------------------------------------------------------------

/// A unit file's `[section] key=value` lines; a key may repeat.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Result<Unit> {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let current = section
            .as_ref()
            .with_context(|| format!("line {}: outside any section", n + 1))?;
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("line {}: not key=value: {line}", n + 1))?;
        ensure!(
            !value.ends_with('\\'),
            "line {}: continuation lines are not expected",
            n + 1
        );
        unit.entry(current.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    Ok(unit)
}

fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> Option<&'a str> {
    unit.get(section)?.get(key)?.last().map(String::as_str)
}

const UNITS: [(&str, &str); 3] = [
    ("shoal-node.service", "node"),
    ("shoal-tracker.service", "tracker"),
    ("shoal-seed.service", "seed"),
];

#[test]
fn systemd_units_run_shoal_and_spare_the_cgroup() -> Result<()> {
    let shoal = shoal_integration::shoal_bin().ok();
    if shoal.is_none() {
        eprintln!("no shoal binary built: subcommands checked by name only");
    }
    for (file, subcommand) in UNITS {
        let path = examples_dir().join("systemd").join(file);
        let unit = parse_unit(&std::fs::read_to_string(&path)?).with_context(|| file.to_owned())?;
        for section in ["Unit", "Service", "Install"] {
            ensure!(unit.contains_key(section), "{file}: no [{section}]");
        }
        ensure!(
            one(&unit, "Service", "KillMode") == Some("process"),
            "{file}: KillMode=process"
        );
        ensure!(
            one(&unit, "Service", "Restart").is_some_and(|r| r != "no"),
            "{file}: no restart policy"
        );
        ensure!(
            one(&unit, "Service", "LimitNOFILE").is_some(),
            "{file}: LimitNOFILE"
        );
        let exec = one(&unit, "Service", "ExecStart").context("no ExecStart")?;
        let argv: Vec<&str> = exec.split_whitespace().collect();
        ensure!(
            argv == [
                "/usr/local/bin/shoal",
                subcommand,
                "--config",
                "/etc/shoal/shoal.toml"
            ],
            "{file}: ExecStart={exec}"
        );
        if let Some(bin) = &shoal {
            let out = std::process::Command::new(bin)
                .args([subcommand, "--help"])
                .output()?;
            ensure!(
                out.status.success(),
                "{file}: `shoal {subcommand}` is not a subcommand: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let node = parse_unit(&std::fs::read_to_string(
        examples_dir().join("systemd/shoal-node.service"),
    )?)?;
    ensure!(
        one(&node, "Unit", "Before").is_some_and(|b| b.contains("containerd.service")),
        "the node must start before containerd, which dials its socket"
    );
    Ok(())
}

#[test]
fn systemd_analyze_verifies_the_units() -> Result<()> {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("skipping: systemd-analyze is not installed");
        return Ok(());
    };
    ensure!(out.status.success(), "systemd-analyze --version failed");
    // verify insists that ExecStart's binary exists: point it at the one built here.
    let bin = match shoal_integration::shoal_bin() {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("no shoal binary ({e:#}): verifying with /bin/true in its place");
            PathBuf::from("/bin/true")
        }
    };
    let dir = tempfile::tempdir()?;
    let mut files = Vec::new();
    for (file, _) in UNITS {
        let text = std::fs::read_to_string(examples_dir().join("systemd").join(file))?;
        let path = dir.path().join(file);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/shoal", &bin.display().to_string()),
        )?;
        files.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings (unknown keys, bad values) go to stderr with exit status 0: refuse those too.
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| UNITS.iter().any(|(f, _)| l.contains(f)))
        .collect();
    ensure!(
        out.status.success() && about_ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    Ok(())
}
