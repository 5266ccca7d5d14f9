//! The CRI's side of containerd's config: which snapshotter it unpacks into, whether it passes
//! the remote-snapshot labels, where it reads hosts.toml, and (2.x) which snapshotters the
//! transfer service unpacks into. Key names differ between config versions 2 and 3; see the
//! table in the parent module.

use std::path::Path;

use toml::{Table, Value};

use super::{ContainerdConfig, ContainerdVersion, key_path};
use crate::doctor::Check;

/// The CRI keys of one config version.
#[derive(Debug)]
pub(super) struct CriKeys {
    /// Plugin ids whose presence in `disabled_plugins` means there is no CRI to check.
    pub(super) plugins: &'static [&'static str],
    pub(super) snapshotter: &'static [&'static str],
    pub(super) annotations: &'static [&'static str],
    pub(super) config_path: &'static [&'static str],
    pub(super) example: &'static str,
}

pub(super) const CRI_V2: CriKeys = CriKeys {
    plugins: &["io.containerd.grpc.v1.cri"],
    snapshotter: &[
        "plugins",
        "io.containerd.grpc.v1.cri",
        "containerd",
        "snapshotter",
    ],
    annotations: &[
        "plugins",
        "io.containerd.grpc.v1.cri",
        "containerd",
        "disable_snapshot_annotations",
    ],
    config_path: &[
        "plugins",
        "io.containerd.grpc.v1.cri",
        "registry",
        "config_path",
    ],
    example: "examples/containerd/config-1.x.toml",
};

pub(super) const CRI_V3: CriKeys = CriKeys {
    plugins: &["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"],
    snapshotter: &["plugins", "io.containerd.cri.v1.images", "snapshotter"],
    annotations: &[
        "plugins",
        "io.containerd.cri.v1.images",
        "disable_snapshot_annotations",
    ],
    config_path: &[
        "plugins",
        "io.containerd.cri.v1.images",
        "registry",
        "config_path",
    ],
    example: "examples/containerd/config-2.x.toml",
};

impl ContainerdConfig {
    /// The CRI unpacks images into Shoal's snapshotter.
    pub fn cri_snapshotter(&self, proxy: Option<&str>) -> Check {
        const NAME: &str = "cri-snapshotter";
        if self.cri_disabled() {
            return Check::ok(NAME, "the CRI plugin is disabled: nothing to check");
        }
        let cri = self.cri();
        let want = proxy.unwrap_or("shoal");
        let key = key_path(cri.snapshotter);
        let fix = format!("set {key} = \"{want}\"");
        match self.get(cri.snapshotter) {
            Some(Value::String(s)) if s == want => {
                Check::ok(NAME, format!("{key} in {} is \"{want}\"", self.file()))
            }
            Some(Value::String(s)) => Check::fail(
                NAME,
                format!(
                    "{key} in {} is {s:?}, not \"{want}\" (the name of Shoal's snapshot proxy): Kubernetes pulls bypass Shoal",
                    self.file()
                ),
                fix,
            ),
            Some(other) => self.wrong_type(NAME, cri.snapshotter, &format!("\"{want}\""), other),
            None => Check::fail(
                NAME,
                format!(
                    "{key} is not set in {}: the CRI uses \"overlayfs\" and Kubernetes pulls bypass Shoal",
                    self.file()
                ),
                fix,
            ),
        }
    }

    /// The CRI passes the remote-snapshot labels (image ref, layer digest) that lazy pulling
    /// needs.
    pub fn snapshot_annotations(
        &self,
        proxy: Option<&str>,
        found: Option<ContainerdVersion>,
    ) -> Check {
        const NAME: &str = "snapshot-annotations";
        if self.cri_disabled() {
            return Check::ok(NAME, "the CRI plugin is disabled: nothing to check");
        }
        let cri = self.cri();
        let key = key_path(cri.annotations);
        let file = self.file();
        let lazy_lost =
            "the CRI passes no remote-snapshot labels, so lazy pulls silently become full pulls";
        let annotations_off = match self.get(cri.annotations) {
            Some(Value::Boolean(b)) => Some(!b),
            Some(other) => {
                return self.wrong_type(NAME, cri.annotations, "the boolean false", other);
            }
            None => None,
        };
        if self.format() < 3 {
            return match annotations_off {
                Some(true) => Check::ok(NAME, format!("{key} in {file} is false")),
                Some(false) => Check::fail(
                    NAME,
                    format!("{key} in {file} is true: {lazy_lost}"),
                    format!("set {key} = false"),
                ),
                None => Check::fail(
                    NAME,
                    format!("{key} is not set in {file} and defaults to true: {lazy_lost}"),
                    format!("set {key} = false"),
                ),
            };
        }
        let proxy = proxy.unwrap_or("shoal");
        let export_keys = [
            "proxy_plugins",
            proxy,
            "exports",
            "enable_remote_snapshot_annotations",
        ];
        let export_key = key_path(&export_keys);
        let exported = match self.get(&export_keys) {
            Some(Value::String(s)) => s == "true",
            Some(other) => {
                return self.wrong_type(NAME, &export_keys, "the string \"true\"", other);
            }
            None => false,
        };
        let is_2_0 = found.is_some_and(|v| (v.major, v.minor) == (2, 0));
        match (annotations_off == Some(true), exported) {
            (true, _) => Check::ok(
                NAME,
                format!(
                    "{key} in {file} is false{}",
                    if exported {
                        ""
                    } else {
                        " (containerd 2.1+ then pulls without the transfer service)"
                    }
                ),
            ),
            (false, true) if is_2_0 => Check::fail(
                NAME,
                format!(
                    "{export_key} is set in {file}, but containerd 2.0 does not read it: {lazy_lost}"
                ),
                format!("set {key} = false"),
            ),
            (false, true) if found.is_some() => Check::ok(
                NAME,
                format!("{export_key} in {file} is \"true\" (containerd 2.1+ transfer service)"),
            ),
            (false, true) => Check::warn(
                NAME,
                format!("{export_key} in {file} is \"true\", which only containerd 2.1+ reads"),
                format!("for containerd 2.0 also set {key} = false"),
            ),
            (false, false) => Check::fail(
                NAME,
                format!(
                    "{key} is {} in {file} and {export_key} is not \"true\": {lazy_lost}",
                    if annotations_off.is_some() {
                        "true"
                    } else {
                        "not set (default true)"
                    }
                ),
                format!(
                    "set {key} = false (containerd 2.1+ also reads [proxy_plugins.{proxy}.exports] enable_remote_snapshot_annotations = \"true\")"
                ),
            ),
        }
    }

    /// The CRI reads hosts.toml files, and one of them sends pulls through the node's mirror.
    pub fn registry_config_path(&self, mirror_listen: &str) -> Check {
        const NAME: &str = "registry-config-path";
        if self.cri_disabled() {
            return Check::ok(NAME, "the CRI plugin is disabled: nothing to check");
        }
        let cri = self.cri();
        let key = key_path(cri.config_path);
        let file = self.file();
        let host_fix = format!(
            "put a hosts.toml per registry (DIR/<registry>/hosts.toml) with `[host.\"http://{mirror_listen}\"] capabilities = [\"pull\", \"resolve\"]` (see examples/containerd/certs.d/)"
        );
        let dirs = match self.get(cri.config_path) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None => {
                return Check::warn(
                    NAME,
                    format!(
                        "{key} is not set in {file}: CRI pulls read no hosts.toml, so layers that are not lazy come from the registry, not the swarm"
                    ),
                    format!("set {key} = \"/etc/containerd/certs.d\", then {host_fix}"),
                );
            }
            Some(other) => {
                return self.wrong_type(NAME, cri.config_path, "a directory path", other);
            }
        };
        let mut through_mirror = Vec::new();
        let mut problems = Vec::new();
        for dir in dirs.split(':').filter(|d| !d.is_empty()) {
            match mirrored_registries(Path::new(dir), mirror_listen) {
                Ok((names, bad)) => {
                    through_mirror.extend(names);
                    problems.extend(bad);
                }
                Err(e) => problems.push(format!("{dir}: {e}")),
            }
        }
        if !problems.is_empty() {
            return Check::warn(
                NAME,
                format!("{key} in {file} is {dirs:?}; {}", problems.join("; ")),
                host_fix,
            );
        }
        if through_mirror.is_empty() {
            return Check::warn(
                NAME,
                format!(
                    "{key} in {file} is {dirs:?}, but no hosts.toml there names the node's mirror http://{mirror_listen} (mirror.listen)"
                ),
                host_fix,
            );
        }
        through_mirror.sort();
        Check::ok(
            NAME,
            format!(
                "{key} in {file} is {dirs:?}; pulls from {} go through the mirror http://{mirror_listen}",
                through_mirror.join(", ")
            ),
        )
    }

    /// containerd 2.x's transfer service (`ctr` pulls; CRI pulls on 2.1+ unless
    /// `disable_snapshot_annotations = false`) unpacks only into the snapshotters its
    /// `unpack_config` lists; `None` for version 2 files, which have no transfer settings.
    pub fn transfer_unpack(&self, proxy: Option<&str>) -> Option<Check> {
        const NAME: &str = "transfer-unpack";
        if self.format() < 3 {
            return None;
        }
        let want = proxy.unwrap_or("shoal");
        let keys = [
            "plugins",
            "io.containerd.transfer.v1.local",
            "unpack_config",
        ];
        let key = key_path(&keys);
        let file = self.file();
        let entries = match self.get(&keys) {
            None => &Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(other) => return Some(self.wrong_type(NAME, &keys, "an array of tables", other)),
        };
        let listed = entries
            .iter()
            .any(|e| e.get("snapshotter").and_then(Value::as_str) == Some(want));
        Some(if listed {
            Check::ok(
                NAME,
                format!("{key} in {file} lists snapshotter \"{want}\""),
            )
        } else {
            Check::warn(
                NAME,
                format!(
                    "{key} in {file} has no entry with snapshotter = \"{want}\": transfer-service pulls into it (`ctr image pull --snapshotter {want}` on 2.x) fail with \"no unpack platforms defined\""
                ),
                format!(
                    "add [[{key}]] entries `platform = \"linux\"`, `snapshotter = \"{want}\"` and, since listing replaces the default, one for \"overlayfs\" (see examples/containerd/config-2.x.toml)"
                ),
            )
        })
    }
}

/// Registries under a hosts directory whose `hosts.toml` has the mirror as a `[host."…"]`, and
/// the hosts.toml files that could not be read.
fn mirrored_registries(
    dir: &Path,
    mirror_listen: &str,
) -> std::io::Result<(Vec<String>, Vec<String>)> {
    let mut names = Vec::new();
    let mut bad = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let hosts = entry.path().join("hosts.toml");
        let Ok(text) = std::fs::read_to_string(&hosts) else {
            continue;
        };
        let table: Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                bad.push(format!(
                    "{} is not valid TOML: {}",
                    hosts.display(),
                    e.message()
                ));
                continue;
            }
        };
        let names_mirror = table
            .get("host")
            .and_then(Value::as_table)
            .is_some_and(|hosts| hosts.keys().any(|h| is_mirror(h, mirror_listen)));
        if names_mirror {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok((names, bad))
}

/// Whether a hosts.toml host (`http://127.0.0.1:7072`, `127.0.0.1:7072/v2`) is the mirror
/// listening on `listen`; a wildcard listen address matches any host on its port.
fn is_mirror(host: &str, listen: &str) -> bool {
    let authority = host
        .split_once("://")
        .map_or(host, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    if authority == listen {
        return true;
    }
    let port = |a: &str| {
        a.rsplit_once(':')
            .map(|(h, p)| (h.to_owned(), p.to_owned()))
    };
    match (port(authority), port(listen)) {
        (Some((_, p)), Some((h, lp))) => {
            p == lp && matches!(h.as_str(), "0.0.0.0" | "[::]" | "" | "::")
        }
        _ => false,
    }
}
