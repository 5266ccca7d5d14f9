//! The containerd checks on fixture configs (`doctor/fixtures/`) and on the shipped examples.

use std::path::{Path, PathBuf};

use super::*;
use crate::doctor::Level;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/doctor/fixtures")
        .join(name)
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/containerd")
        .join(name)
}

fn v(major: u32, minor: u32) -> Option<ContainerdVersion> {
    Some(ContainerdVersion {
        major,
        minor,
        patch: 0,
    })
}

fn load(path: &Path) -> anyhow::Result<ContainerdConfig> {
    ContainerdConfig::load(path).map_err(|c| anyhow::anyhow!("{c:?}"))
}

/// Checks by name, for asserting on one.
fn by_name<'a>(checks: &'a [Check], name: &str) -> anyhow::Result<&'a Check> {
    checks
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| anyhow::anyhow!("no {name} check in {checks:#?}"))
}

fn remote_content() -> Config {
    let mut cfg = Config::default();
    cfg.content.remote_content = true;
    cfg
}

/// No FAIL; a warning only for the hosts.toml directory this test machine lacks, and (while
/// the 2.x example may lack it) the transfer service's unpack list.
fn assert_passes(checks: &[Check]) {
    for c in checks {
        assert!(
            c.status == Level::Ok
                || (c.status == Level::Warn
                    && ["registry-config-path", "transfer-unpack"].contains(&c.name.as_str())),
            "{c:#?}"
        );
    }
}

#[test]
fn the_shipped_examples_pass_with_the_default_socket() -> anyhow::Result<()> {
    let one = load(&example("config-1.x.toml"))?;
    assert_passes(&one.checks(&remote_content(), v(1, 6)));
    assert_passes(&one.checks(&Config::default(), v(1, 7)));
    assert_passes(&one.checks(&Config::default(), v(2, 1)));
    let two = load(&example("config-2.x.toml"))?;
    assert_passes(&two.checks(&remote_content(), v(2, 0)));
    assert_passes(&two.checks(&remote_content(), v(2, 1)));
    assert_passes(&two.checks(&Config::default(), None));
    Ok(())
}

#[test]
fn good_fixtures_pass() -> anyhow::Result<()> {
    let one = load(&fixture("good-1.x.toml"))?;
    assert_passes(&one.checks(&remote_content(), v(1, 6)));
    let two = load(&fixture("good-2.x.toml"))?;
    let checks = two.checks(&Config::default(), v(2, 1));
    assert_passes(&checks);
    // The proxy's own name is what the CRI must use.
    assert!(
        by_name(&checks, "cri-snapshotter")?
            .detail
            .contains("\"lazy\"")
    );
    // Only exports, no disable_snapshot_annotations: containerd 2.0 does not read exports.
    let on_2_0 = two.snapshot_annotations(Some("lazy"), v(2, 0));
    assert_eq!(on_2_0.status, Level::Fail, "{on_2_0:#?}");
    Ok(())
}

#[test]
fn a_missing_snapshot_proxy_fails_and_says_what_to_add() -> anyhow::Result<()> {
    let file = load(&fixture("missing-proxy.toml"))?;
    let checks = file.checks(&Config::default(), v(1, 6));
    let proxy = by_name(&checks, "snapshot-proxy")?;
    assert_eq!(proxy.status, Level::Fail);
    assert!(proxy.detail.contains("missing-proxy.toml"), "{proxy:#?}");
    let fix = proxy.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("[proxy_plugins.shoal]") && fix.contains("/run/shoal/shoal.sock"),
        "{fix}"
    );
    Ok(())
}

#[test]
fn a_wrong_socket_names_the_key_and_the_right_address() -> anyhow::Result<()> {
    let file = load(&fixture("wrong-socket.toml"))?;
    let (check, proxy) = file.snapshot_proxy(Path::new("/run/shoal/shoal.sock"));
    assert_eq!(check.status, Level::Fail);
    assert_eq!(proxy.as_deref(), Some("shoal"));
    assert!(
        check.detail.contains("proxy_plugins.shoal.address")
            && check.detail.contains("/run/containerd-shoal/shoal.sock"),
        "{check:#?}"
    );
    assert_eq!(
        check.fix.as_deref(),
        Some(
            "set proxy_plugins.shoal.address = \"/run/shoal/shoal.sock\" (or node.socket in shoal.toml to match)"
        )
    );
    // The same file passes for a node whose socket is there.
    let (check, _) = file.snapshot_proxy(Path::new("/run/containerd-shoal/shoal.sock"));
    assert_eq!(check.status, Level::Ok);
    Ok(())
}

#[test]
fn a_content_proxy_needs_the_builtin_store_disabled() -> anyhow::Result<()> {
    let file = load(&fixture("content-not-disabled.toml"))?;
    let socket = Path::new("/run/shoal/shoal.sock");
    for remote in [true, false] {
        let check = file.content_proxy(socket, remote);
        assert_eq!(check.status, Level::Fail);
        assert!(check.detail.contains("disabled_plugins"), "{check:#?}");
        assert!(
            check
                .fix
                .as_deref()
                .unwrap_or_default()
                .contains("\"io.containerd.content.v1.content\""),
            "{check:#?}"
        );
    }
    // Remote content without any content proxy.
    let none = load(&fixture("wrong-snapshotter.toml"))?;
    let check = none.content_proxy(socket, true);
    assert_eq!(check.status, Level::Fail);
    assert!(
        check.detail.contains("content.remote_content"),
        "{check:#?}"
    );
    assert_eq!(none.content_proxy(socket, false).status, Level::Ok);
    // A content proxy on another socket.
    let check = load(&fixture("good-1.x.toml"))?.content_proxy(Path::new("/x.sock"), true);
    assert_eq!(check.status, Level::Fail);
    assert!(
        check.detail.contains("proxy_plugins.shoal-content.address"),
        "{check:#?}"
    );
    Ok(())
}

#[test]
fn annotations_left_on_fail() -> anyhow::Result<()> {
    let file = load(&fixture("annotations-true.toml"))?;
    let checks = file.checks(&Config::default(), v(2, 1));
    let check = by_name(&checks, "snapshot-annotations")?;
    assert_eq!(check.status, Level::Fail);
    assert!(
        check
            .detail
            .contains("plugins.\"io.containerd.cri.v1.images\".disable_snapshot_annotations"),
        "{check:#?}"
    );
    let fix = check.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("disable_snapshot_annotations = false")
            && fix.contains("enable_remote_snapshot_annotations = \"true\""),
        "{fix}"
    );
    // Version 2: the key is unset in this file, and defaults to true.
    let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"shoal\"\n";
    let file =
        ContainerdConfig::parse(Path::new("c.toml"), text).map_err(|c| anyhow::anyhow!("{c:?}"))?;
    let check = file.snapshot_annotations(Some("shoal"), v(1, 7));
    assert_eq!(check.status, Level::Fail);
    assert!(check.detail.contains("defaults to true"), "{check:#?}");
    Ok(())
}

#[test]
fn a_wrong_cri_snapshotter_fails() -> anyhow::Result<()> {
    let file = load(&fixture("wrong-snapshotter.toml"))?;
    let checks = file.checks(&Config::default(), v(1, 6));
    let check = by_name(&checks, "cri-snapshotter")?;
    assert_eq!(check.status, Level::Fail);
    assert!(
        check
            .detail
            .contains("plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter")
            && check.detail.contains("\"overlayfs\""),
        "{check:#?}"
    );
    assert_eq!(
        check.fix.as_deref(),
        Some("set plugins.\"io.containerd.grpc.v1.cri\".containerd.snapshotter = \"shoal\"")
    );
    // Everything else in that file is right.
    assert_eq!(by_name(&checks, "snapshot-proxy")?.status, Level::Ok);
    assert_eq!(by_name(&checks, "snapshot-annotations")?.status, Level::Ok);
    Ok(())
}

#[test]
fn bad_files_name_the_file_and_line() -> anyhow::Result<()> {
    let err = ContainerdConfig::load(&fixture("not-toml.toml")).err();
    let check = err.ok_or_else(|| anyhow::anyhow!("parsed broken TOML"))?;
    assert_eq!(check.status, Level::Fail);
    assert!(check.detail.contains("not-toml.toml line 3"), "{check:#?}");
    let missing = ContainerdConfig::load(&fixture("nope.toml")).err();
    let check = missing.ok_or_else(|| anyhow::anyhow!("loaded a missing file"))?;
    assert!(
        check.detail.contains("nope.toml does not exist"),
        "{check:#?}"
    );
    // A value of the wrong type names its key.
    let text = "version = 2\n[proxy_plugins.shoal]\ntype = \"snapshot\"\naddress = 7\n";
    let file =
        ContainerdConfig::parse(Path::new("c.toml"), text).map_err(|c| anyhow::anyhow!("{c:?}"))?;
    let (check, _) = file.snapshot_proxy(Path::new("/run/shoal/shoal.sock"));
    assert_eq!(check.status, Level::Fail);
    assert!(
        check
            .detail
            .contains("proxy_plugins.shoal.address in c.toml must be a string"),
        "{check:#?}"
    );
    Ok(())
}

#[test]
fn config_version_must_suit_containerd() -> anyhow::Result<()> {
    let parse = |text: &str| {
        ContainerdConfig::parse(Path::new("c.toml"), text).map_err(|c| anyhow::anyhow!("{c:?}"))
    };
    assert_eq!(parse("")?.config_version(v(1, 6)).status, Level::Fail);
    assert_eq!(
        parse("version = 3")?.config_version(v(1, 7)).status,
        Level::Fail
    );
    assert_eq!(
        parse("version = 3")?.config_version(v(2, 0)).status,
        Level::Ok
    );
    assert_eq!(
        parse("version = 2")?.config_version(v(2, 1)).status,
        Level::Ok
    );
    assert_eq!(parse("version = 2")?.config_version(None).status, Level::Ok);
    Ok(())
}

#[test]
fn containerd_versions_parse() {
    assert_eq!(
        ContainerdVersion::parse(
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n"
        ),
        Some(ContainerdVersion {
            major: 1,
            minor: 6,
            patch: 20
        })
    );
    assert_eq!(
        ContainerdVersion::parse("containerd containerd.io v2.1.3 2f2ab4b"),
        v(2, 1).map(|v| ContainerdVersion { patch: 3, ..v })
    );
    assert_eq!(ContainerdVersion::parse("nothing here"), None);
    assert_eq!(version(v(1, 5)).status, Level::Fail);
    assert_eq!(version(v(1, 7)).status, Level::Ok);
    assert_eq!(version(None).status, Level::Warn);
}

#[test]
fn hosts_toml_under_config_path_must_name_the_mirror() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(certs.join("docker.io"))?;
    std::fs::copy(
        example("certs.d/docker.io/hosts.toml"),
        certs.join("docker.io/hosts.toml"),
    )?;
    let text = format!(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = {:?}\n",
        certs.display().to_string()
    );
    let file = ContainerdConfig::parse(Path::new("c.toml"), &text)
        .map_err(|c| anyhow::anyhow!("{c:?}"))?;
    let check = file.registry_config_path("127.0.0.1:7072");
    assert_eq!(check.status, Level::Ok, "{check:#?}");
    assert!(check.detail.contains("docker.io"), "{check:#?}");
    assert_eq!(file.registry_config_path("0.0.0.0:7072").status, Level::Ok);
    let other = file.registry_config_path("127.0.0.1:9999");
    assert_eq!(other.status, Level::Warn);
    assert!(
        other
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("127.0.0.1:9999")
    );
    let unset = load(&fixture("wrong-socket.toml"))?.registry_config_path("127.0.0.1:7072");
    assert_eq!(unset.status, Level::Warn);
    assert!(
        unset
            .detail
            .contains("plugins.\"io.containerd.grpc.v1.cri\".registry.config_path"),
        "{unset:#?}"
    );
    Ok(())
}

#[test]
fn the_transfer_service_must_list_shoal_on_2_x() -> anyhow::Result<()> {
    let two = load(&fixture("good-2.x.toml"))?;
    let check = two.transfer_unpack(Some("lazy"));
    assert_eq!(check.map(|c| c.status), Some(Level::Ok));
    let check = two.transfer_unpack(Some("shoal"));
    let check = check.ok_or_else(|| anyhow::anyhow!("no check on a version 3 file"))?;
    assert_eq!(check.status, Level::Warn);
    assert!(
        check.detail.contains("no unpack platforms defined"),
        "{check:#?}"
    );
    // Version 2 files have no transfer settings to check.
    assert_eq!(
        load(&fixture("good-1.x.toml"))?.transfer_unpack(Some("shoal")),
        None
    );
    Ok(())
}
