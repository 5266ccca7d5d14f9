//! containerd registry host configuration (`hosts.toml`, containerd ≥ 1.5) that sends pulls to
//! a mirror, such as a Shoal node's registry endpoint, before the registry itself.
//!
//! containerd looks for `<hosts dir>/<registry host>/hosts.toml`: `server` is the upstream,
//! each `[host."URL"]` a mirror tried first, in file order; a mirror answering 404 (or failing)
//! makes containerd fall back to the next host and finally to `server`. Mirrors receive
//! `?ns=<registry host>` on every request. `ctr image pull --hosts-dir DIR` reads it; the CRI
//! plugin reads it from `[plugins."io.containerd.grpc.v1.cri".registry] config_path = "DIR"`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `dir/<registry_host>/hosts.toml` making `mirror_url` (e.g. `http://127.0.0.1:7000`;
/// `http://` is assumed without a scheme) a pull and resolve mirror of the plain-HTTP registry
/// `registry_host` (`127.0.0.1:5000`). Returns `dir`, the value for `--hosts-dir`.
pub fn hosts_dir(dir: &Path, registry_host: &str, mirror_url: &str) -> Result<PathBuf> {
    let host_dir = dir.join(registry_host);
    fs::create_dir_all(&host_dir).with_context(|| format!("creating {}", host_dir.display()))?;
    let path = host_dir.join("hosts.toml");
    fs::write(&path, hosts_toml(registry_host, mirror_url))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(dir.to_owned())
}

fn hosts_toml(registry_host: &str, mirror_url: &str) -> String {
    let mirror = if mirror_url.contains("://") {
        mirror_url.to_owned()
    } else {
        format!("http://{mirror_url}")
    };
    format!(
        r#"server = "http://{registry_host}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_names_server_and_mirror() -> Result<()> {
        let parsed: toml::Table = toml::from_str(&hosts_toml("127.0.0.1:5000", "127.0.0.1:7000"))?;
        assert_eq!(parsed["server"].as_str(), Some("http://127.0.0.1:5000"));
        let caps = &parsed["host"]["http://127.0.0.1:7000"]["capabilities"];
        assert_eq!(caps.as_array().map(Vec::len), Some(2));
        Ok(())
    }
}
