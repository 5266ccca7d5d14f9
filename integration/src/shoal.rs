//! Shoal's own daemons as child processes: a tracker, seeds and nodes, each with a config file
//! and a log in the test's directory, all on loopback ports picked at start.
//!
//! A daemon can also run on a host of a [`Network`](crate::netns::Network) (`netns` in the
//! options): it is started through `nsenter --net`, listens on the addresses given, and the
//! harness reaches it from a thread inside that namespace.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::proc::{Child, free_port, wait_until};
use crate::{netns, shoal_bin};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `shoal tracker`.
#[derive(Debug)]
pub struct Tracker {
    pub child: Child,
    pub addr: String,
}

/// Where a tracker runs, beyond the loopback default.
#[derive(Clone, Debug, Default)]
pub struct TrackerOptions {
    /// Network namespace to run in (a [`netns::Host`]'s); `listen` must then be given too.
    pub netns: Option<String>,
    /// Listen address; default `127.0.0.1:<free port>`.
    pub listen: Option<String>,
}

impl Tracker {
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, &TrackerOptions::default())
    }

    pub fn start_with(dir: &Path, opts: &TrackerOptions) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = match &opts.listen {
            Some(addr) => addr.clone(),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let config = dir.join("tracker.toml");
        std::fs::write(&config, format!("[tracker]\nlisten = \"{addr}\"\n"))?;
        let mut cmd = command(opts.netns.as_deref(), shoal_bin()?);
        cmd.arg("tracker").arg("--config").arg(&config);
        let mut child = Child::spawn("tracker", cmd, dir)?;
        wait_for_listener(&mut child, opts.netns.as_deref(), &addr)
            .context("waiting for the tracker")?;
        Ok(Self { child, addr })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Options for a node or seed beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    pub seed: bool,
    /// Registries reached over plain HTTP.
    pub insecure: Vec<String>,
    pub tracker: Option<String>,
    /// Test hook: corrupt every piece served.
    pub corrupt_uploads: bool,
    /// Extra TOML appended to the config (whole sections).
    pub extra: String,
    /// Network namespace to run in (a [`netns::Host`]'s); give `listen` and `mirror` then.
    pub netns: Option<String>,
    /// Swarm listen address, also the one advertised; default `127.0.0.1:<free port>`.
    pub listen: Option<String>,
    /// Mirror (and `/metrics`) listen address; default `127.0.0.1:<free port>`.
    pub mirror: Option<String>,
}

/// A running `shoal node` or `shoal seed`.
#[derive(Debug)]
pub struct Node {
    pub child: Child,
    pub name: String,
    pub root: PathBuf,
    /// containerd's proxy_plugins address (snapshots service).
    pub socket: PathBuf,
    pub mirror: String,
    pub swarm: String,
    /// The network namespace it runs in, if not the test's own.
    pub netns: Option<String>,
}

impl Node {
    pub fn start(dir: &Path, name: &str, opts: &NodeOptions) -> Result<Self> {
        let home = dir.join(name);
        std::fs::create_dir_all(&home)?;
        let root = home.join("root");
        let socket = home.join("shoal.sock");
        let mirror = match &opts.mirror {
            Some(addr) => addr.clone(),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let swarm = match &opts.listen {
            Some(addr) => addr.clone(),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let insecure: Vec<String> = opts.insecure.iter().map(|h| format!("{h:?}")).collect();
        let mut config = format!(
            "[node]\nroot = {root:?}\nsocket = {socket:?}\n\n[mirror]\nlisten = \"{mirror}\"\n\n[registry]\ninsecure = [{}]\n\n[p2p]\nlisten = \"{swarm}\"\ncorrupt_uploads = {}\n",
            insecure.join(", "),
            opts.corrupt_uploads,
        );
        if let Some(t) = &opts.tracker {
            config.push_str(&format!("tracker = \"{t}\"\n"));
        }
        config.push_str(&opts.extra);
        let config_path = home.join("shoal.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = command(opts.netns.as_deref(), shoal_bin()?);
        cmd.arg(if opts.seed { "seed" } else { "node" })
            .arg("--config")
            .arg(&config_path);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut child = Child::spawn(name, cmd, &home)?;
        wait_for_listener(&mut child, opts.netns.as_deref(), &mirror)
            .with_context(|| format!("waiting for {name}'s mirror"))?;
        if !opts.seed {
            // Connect, not just look: a killed predecessor leaves its socket file behind.
            crate::proc::wait_until(START_TIMEOUT, &format!("{name}'s socket"), || {
                Ok(std::os::unix::net::UnixStream::connect(&socket).is_ok())
            })?;
        }
        Ok(Self {
            child,
            name: name.to_owned(),
            root,
            socket,
            mirror,
            swarm,
            netns: opts.netns.clone(),
        })
    }

    pub fn mirror_url(&self) -> String {
        format!("http://{}", self.mirror)
    }

    /// One Prometheus sample from the node's `/metrics` (summing all label sets), 0 if absent.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics_text()?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
            .sum())
    }

    /// The node's whole `/metrics` page, fetched from inside its namespace if it has one.
    pub fn metrics_text(&self) -> Result<String> {
        let url = format!("{}/metrics", self.mirror_url());
        match &self.netns {
            Some(ns) => netns::in_netns(ns, || crate::http::get_text(&url)),
            None => crate::http::get_text(&url),
        }
    }
}

impl Node {
    /// The node's config file.
    pub fn config_path(&self) -> PathBuf {
        self.root.parent().map_or_else(
            || self.root.join("shoal.toml"),
            |home| home.join("shoal.toml"),
        )
    }

    /// `shoal pull --json IMAGE` into `containerd` through this node; the pull's summary.
    pub fn pull(&self, containerd: &crate::Containerd, image: &str) -> Result<serde_json::Value> {
        let address = containerd.address().display().to_string();
        let mirror = self.mirror_url();
        let out = shoal_cli(
            &self.config_path(),
            &[
                "pull",
                "--json",
                "--address",
                &address,
                "--namespace",
                containerd.namespace(),
                "--node",
                &mirror,
                image,
            ],
        )?;
        serde_json::from_str(&out).with_context(|| format!("shoal pull printed {out:?}"))
    }
}

/// Runs the `shoal` binary with `--config config` and `args`; its stdout, or an error with its
/// stderr.
pub fn shoal_cli(config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(shoal_bin()?)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .context("running shoal")?;
    anyhow::ensure!(
        out.status.success(),
        "shoal {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Converts `src` (pushed to `registry`, plain HTTP) to eStargz as `dst` with `shoal convert`;
/// `prioritize` lists the files to put first and prefetch.
pub fn convert(
    dir: &Path,
    registry: &str,
    src: &str,
    dst: &str,
    prioritize: &[&str],
) -> Result<()> {
    let config = dir.join("convert.toml");
    std::fs::write(&config, format!("[registry]\ninsecure = [{registry:?}]\n"))?;
    let mut args = vec!["convert", src, dst];
    let list = dir.join("prioritize.txt");
    let list_arg = list.display().to_string();
    if !prioritize.is_empty() {
        std::fs::write(&list, prioritize.join("\n"))?;
        args.extend(["--prioritize", &list_arg]);
    }
    shoal_cli(&config, &args).map(drop)
}

impl Drop for Node {
    /// Stops the node, then detaches the FUSE mounts a killed node leaves dead under its root
    /// (a node stopped gracefully unmounts its own). Live mounts are left alone: they belong to
    /// a node started again on the same root.
    fn drop(&mut self) {
        if let Err(e) = self.child.stop() {
            eprintln!("stopping {}: {e:#}", self.name);
        }
        for point in crate::containerd::mounts_under(&self.root) {
            // statfs always reaches the daemon; stat may be answered from the kernel's cache.
            let dead = matches!(
                nix::sys::statfs::statfs(&point),
                Err(nix::errno::Errno::ENOTCONN)
            );
            if dead && let Err(e) = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {}: {e}", point.display());
            }
        }
    }
}

/// `program`, run in `netns` when one is given.
fn command(netns: Option<&str>, program: PathBuf) -> Command {
    match netns {
        Some(ns) => netns::command(ns, program),
        None => Command::new(program),
    }
}

/// Waits until `addr` (in `netns`, if given) accepts connections; fails at once, with its log,
/// if `child` exits first (a bad config, a port in use).
fn wait_for_listener(child: &mut Child, netns: Option<&str>, addr: &str) -> Result<()> {
    let mut wait = || {
        wait_until(START_TIMEOUT, &format!("a TCP listener at {addr}"), || {
            child.ensure_running()?;
            Ok(addr
                .to_socket_addrs()
                .into_iter()
                .flatten()
                .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok()))
        })
    };
    match netns {
        Some(ns) => netns::in_netns(ns, wait),
        None => wait(),
    }
}
