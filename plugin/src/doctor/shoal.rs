//! Checks of Shoal's own side: its config file, the node's socket, the tracker and the disk
//! under `node.root`.

use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use super::Check;
use crate::config::Config;

/// How long the tracker gets to answer.
const TRACKER_TIMEOUT: Duration = Duration::from_secs(3);

/// Loads Shoal's config as `shoal node` would. On error the check FAILs with the message (which
/// names the file and the option) and the other checks go on with the defaults.
pub fn config(path: Option<&Path>) -> (Check, Config) {
    const NAME: &str = "shoal-config";
    match Config::load(path) {
        Ok(cfg) => {
            let detail = match path {
                Some(p) => format!(
                    "{} loads (node.socket {}, mirror.listen {})",
                    p.display(),
                    cfg.node.socket.display(),
                    cfg.mirror.listen
                ),
                None => format!(
                    "no --config given: the built-in defaults (node.socket {}, mirror.listen {})",
                    cfg.node.socket.display(),
                    cfg.mirror.listen
                ),
            };
            (Check::ok(NAME, detail), cfg)
        }
        Err(e) => {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail.push_str(": ");
                detail.push_str(&s.to_string());
                source = s.source();
            }
            detail.push_str(" (the other checks use the defaults)");
            let check = Check::fail(
                NAME,
                detail,
                "correct the option named above; examples/shoal.toml documents every option",
            );
            (check, Config::default())
        }
    }
}

/// The node's Unix socket exists and accepts a connection: `shoal node` is up for containerd.
pub fn node_socket(path: &Path) -> Check {
    const NAME: &str = "node-socket";
    let shown = path.display();
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Check::ok(NAME, format!("{shown} accepts connections")),
        Err(e) if e.kind() == ErrorKind::NotFound => Check::fail(
            NAME,
            format!("no socket at {shown} (node.socket): the node is not running"),
            "start `shoal node` with the same config, before restarting containerd",
        ),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Check::fail(
            NAME,
            format!(
                "{shown} exists but refuses connections: a stale socket, the node is not running"
            ),
            "start `shoal node` with the same config (it replaces the stale socket)",
        ),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Check::warn(
            NAME,
            format!("{shown}: {e} (the socket is root-only)"),
            "run `shoal doctor` as root to check the socket",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("connecting to {shown}: {e}"),
            "start `shoal node` with the same config",
        ),
    }
}

/// The tracker answers an HTTP GET of its `/metrics`.
pub async fn tracker(url: Option<&str>) -> Check {
    const NAME: &str = "tracker";
    let Some(base) = url else {
        return Check::warn(
            NAME,
            "no p2p.tracker set: this node finds no peers and fetches every blob from the registry",
            "set `[p2p] tracker = \"http://TRACKER-HOST:7070\"` and run `shoal tracker` there",
        );
    };
    let url = format!("{}/metrics", base.trim_end_matches('/'));
    let client = match reqwest::Client::builder().timeout(TRACKER_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, format!("building an HTTP client: {e}"), "none"),
    };
    match client.get(&url).send().await {
        Ok(resp) if resp.status().is_success() => {
            Check::ok(NAME, format!("GET {url} answered {}", resp.status()))
        }
        Ok(resp) => Check::warn(
            NAME,
            format!(
                "GET {url} answered {}: something listens there, but not a Shoal tracker",
                resp.status()
            ),
            "point p2p.tracker at a `shoal tracker` (its [tracker] listen address)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("GET {url} (p2p.tracker) failed within {TRACKER_TIMEOUT:?}: {e}"),
            "start `shoal tracker` there, or correct p2p.tracker; check firewalls between the hosts",
        ),
    }
}

/// Free space under `node.root` against what the blob store may still grow to.
pub fn disk_space(root: &Path, capacity_mib: u64) -> Check {
    const NAME: &str = "disk-space";
    let Some(existing) = root.ancestors().find(|p| p.exists()) else {
        return Check::warn(
            NAME,
            format!("no part of {} exists", root.display()),
            "none",
        );
    };
    let stat = match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => s,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("statvfs {}: {e}", existing.display()),
                "check that node.root is on a mounted filesystem",
            );
        }
    };
    #[allow(clippy::useless_conversion)] // the field types differ between platforms
    let free = u64::from(stat.blocks_available()).saturating_mul(stat.fragment_size());
    let capacity = capacity_mib.saturating_mul(1 << 20);
    let stored = dir_bytes(&root.join("store"), 4);
    let needed = capacity.saturating_sub(stored);
    let gib = |b: u64| b as f64 / f64::from(1 << 30);
    let detail = format!(
        "{:.1} GiB free under {} ({}); the blob store holds {:.1} GiB of node.store_capacity_mib = {capacity_mib} ({:.1} GiB)",
        gib(free),
        root.display(),
        existing.display(),
        gib(stored),
        gib(capacity),
    );
    if free >= needed {
        Check::ok(NAME, detail)
    } else {
        let fits = (free.saturating_add(stored)) >> 20;
        Check::warn(
            NAME,
            format!("{detail}: the disk fills up before the store reaches its cap"),
            format!(
                "free {:.1} GiB under {}, or lower node.store_capacity_mib to {fits} or less",
                gib(needed - free),
                existing.display()
            ),
        )
    }
}

/// Apparent bytes of the files under `dir`, `depth` levels down (the store's layout is shallow).
fn dir_bytes(dir: &Path, depth: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth > 0 => dir_bytes(&e.path(), depth - 1),
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Level;

    #[test]
    fn a_broken_config_names_the_file_and_option() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shoal.toml");
        std::fs::write(&path, "[node]\nstore_capacity_mib = 0\n")?;
        let (check, cfg) = config(Some(&path));
        assert_eq!(check.status, Level::Fail);
        assert!(
            check.detail.contains("shoal.toml") && check.detail.contains("store_capacity_mib"),
            "{}",
            check.detail
        );
        assert_eq!(cfg.node.socket, Config::default().node.socket);
        std::fs::write(&path, "[nodes]\n")?;
        let (check, _) = config(Some(&path));
        assert!(check.detail.contains("nodes"), "{}", check.detail);
        let (check, _) = config(Some(&dir.path().join("missing.toml")));
        assert!(check.detail.contains("missing.toml"), "{}", check.detail);
        assert_eq!(config(None).0.status, Level::Ok);
        Ok(())
    }

    #[test]
    fn the_socket_check_tells_missing_stale_and_live_apart() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shoal.sock");
        assert_eq!(node_socket(&path).status, Level::Fail);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        assert_eq!(node_socket(&path).status, Level::Ok);
        drop(listener);
        let stale = node_socket(&path);
        assert_eq!(stale.status, Level::Fail);
        assert!(stale.detail.contains("stale"), "{}", stale.detail);
        Ok(())
    }

    #[tokio::test]
    async fn the_tracker_check_names_the_url_it_tried() -> anyhow::Result<()> {
        let unset = tracker(None).await;
        assert_eq!(unset.status, Level::Warn);
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let down = tracker(Some(&format!("http://127.0.0.1:{port}"))).await;
        assert_eq!(down.status, Level::Fail);
        assert!(
            down.detail
                .contains(&format!("http://127.0.0.1:{port}/metrics")),
            "{}",
            down.detail
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { "" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(tracker(Some(&url)).await.status, Level::Ok);
        server.abort();
        Ok(())
    }

    #[test]
    fn disk_space_warns_when_the_cap_does_not_fit() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("shoal");
        assert_eq!(disk_space(&root, 1).status, Level::Ok);
        let huge = disk_space(&root, u64::MAX >> 21);
        assert_eq!(huge.status, Level::Warn);
        assert!(
            huge.fix
                .as_deref()
                .unwrap_or("")
                .contains("node.store_capacity_mib"),
            "{huge:?}"
        );
        Ok(())
    }
}
