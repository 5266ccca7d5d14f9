//! A private containerd per test: its own config, root, state and sockets in a temp dir,
//! optionally inside a network namespace, driven with `ctr`.
//!
//! The `containerd` and `ctr` found first in `PATH` are used: Debian 12's 1.6 in CI; put another
//! build's `bin` directory first in `PATH` to run the same tests against 1.7 or 2.x (see
//! `.ci/containerd-from-debian`).
//!
//! The config is generated rather than taken from `containerd config default`: TOML forbids
//! defining a table twice, so appending a test's `[proxy_plugins.shoal]` or `[plugins."..."]`
//! to the full default config would break as soon as both mention the same table. Instead the
//! harness builds a minimal `version = 2` table and deep-merges the test's TOML into it (tables
//! merge key by key, `disabled_plugins` lists are joined, other values from the test win).
//!
//! The CRI plugin is disabled unless the extra config configures it: `ctr` does not need it,
//! and it would otherwise look for CNI and bind a streaming port in every test.
//!
//! Dropping a [`Containerd`] kills the tasks it still runs, stops it, kills shims it left
//! behind and unmounts whatever is still mounted under its directory, so a failed `ctr run`
//! leaves no process or mount on the machine.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use toml::{Table, Value};

use crate::proc::{self, Child};

/// The containerd namespace `ctr` uses unless [`Options::namespace`] says otherwise.
pub const NAMESPACE: &str = "shoal-test";

const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct Options {
    /// TOML merged into the generated config, e.g. `[proxy_plugins.shoal] ...`.
    pub extra_config: String,
    /// Run containerd and `ctr` in `/run/netns/<name>` (via `nsenter --net`, see RECIPES.md:
    /// `ip netns exec` remounts /sys and hides the cgroup mounts from runc).
    pub netns: Option<String>,
    /// The containerd namespace `ctr` commands use.
    pub namespace: String,
    /// How long one `ctr` command may take before it is killed and reported.
    pub ctr_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_config: String::new(),
            netns: None,
            namespace: NAMESPACE.to_owned(),
            ctr_timeout: Duration::from_secs(180),
        }
    }
}

/// A running containerd; cleaned up (tasks, process, shims, mounts) when dropped.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    options: Options,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with everything under `dir` and `extra_config` merged into its config.
    pub fn start(dir: &Path, extra_config: &str) -> Result<Containerd> {
        Containerd::start_with(
            dir,
            Options {
                extra_config: extra_config.to_owned(),
                ..Options::default()
            },
        )
    }

    /// Like [`Containerd::start`], inside the network namespace `/run/netns/<netns>`.
    pub fn start_in_netns(dir: &Path, extra_config: &str, netns: &str) -> Result<Containerd> {
        Containerd::start_with(
            dir,
            Options {
                extra_config: extra_config.to_owned(),
                netns: Some(netns.to_owned()),
                ..Options::default()
            },
        )
    }

    /// Writes the config, starts containerd and waits until `ctr version` answers.
    pub fn start_with(dir: &Path, options: Options) -> Result<Containerd> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let socket = dir.join("containerd.sock");
        let config = config_toml(&dir, &socket, &options.extra_config)?;
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let mut containerd = Containerd {
            dir,
            config_path,
            socket,
            options,
            child: None,
        };
        let mut cmd = containerd.command("containerd");
        cmd.arg("--config").arg(&containerd.config_path);
        let mut child = Child::spawn("containerd", cmd, &containerd.dir)?;
        let what = format!("containerd at {}", containerd.socket.display());
        let result = proc::wait_until(START_TIMEOUT, &what, || {
            child.ensure_running()?;
            let mut version = containerd.command("ctr");
            version
                .arg("--address")
                .arg(&containerd.socket)
                .arg("version");
            Ok(proc::run(&mut version, Duration::from_secs(10))?
                .status
                .success())
        });
        containerd.child = Some(child);
        // On failure, dropping `containerd` cleans up whatever got started.
        result?;
        Ok(containerd)
    }

    /// The gRPC socket (`ctr --address`, a proxy plugin's peer).
    pub fn address(&self) -> &Path {
        &self.socket
    }

    /// The directory everything lives under.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's `root` (content store, snapshots, metadata).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The containerd namespace of [`Containerd::ctr`].
    pub fn namespace(&self) -> &str {
        &self.options.namespace
    }

    /// runc's state directory for containers started by [`Containerd::run`]; private to this
    /// containerd so that two tests can both run a container called `c1`.
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// Everything containerd logged.
    pub fn log(&self) -> String {
        proc::read_log(&self.dir.join("containerd.log"))
    }

    /// A command for `program` in this containerd's network namespace (if any): for starting a
    /// `shoal node` or `shoal pull` next to it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.options.netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{netns}")).arg("--");
                cmd.arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Runs `ctr --address SOCK --namespace NS <args>`; its exit status is the caller's to check.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        proc::run(&mut self.ctr_command(args), self.options.ctr_timeout)
    }

    /// [`Containerd::ctr`], failing (with ctr's stderr) unless it exits 0; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let output = self.ctr(args)?;
        proc::check_output(&format!("ctr {}", args.join(" ")), output)
    }

    /// `ctr run --rm IMAGE ID ARGS...`; returns the container's stdout.
    pub fn run(&self, image: &str, id: &str, args: &[&str]) -> Result<String> {
        self.run_with(&["--rm"], image, id, args)
    }

    /// `ctr run FLAGS... IMAGE ID ARGS...` (e.g. `--detach`, `--snapshotter shoal`) with this
    /// containerd's private runc root and FIFO directory; returns stdout.
    pub fn run_with(&self, flags: &[&str], image: &str, id: &str, args: &[&str]) -> Result<String> {
        let runc_root = self.runc_root().display().to_string();
        let fifo_dir = self.dir.join("fifo").display().to_string();
        let mut all = vec!["run", "--runc-root", &runc_root, "--fifo-dir", &fifo_dir];
        all.extend_from_slice(flags);
        all.extend_from_slice(&[image, id]);
        all.extend_from_slice(args);
        self.ctr_ok(&all)
    }

    /// Stops containerd and cleans up after it (as dropping it does); idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.is_running() {
                self.delete_tasks();
            }
            if let Err(e) = child.stop() {
                eprintln!("stopping containerd: {e:#}");
            }
        }
        self.kill_shims();
        unmount_under(&self.dir);
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.options.namespace)
            .args(args);
        cmd
    }

    /// Force-deletes every task in every namespace (best effort: this runs during cleanup).
    fn delete_tasks(&self) {
        let ctr = |args: &[&str]| -> Result<String> {
            let mut cmd = self.command("ctr");
            cmd.arg("--address").arg(&self.socket).args(args);
            proc::run_ok(&mut cmd, CLEANUP_TIMEOUT)
        };
        let namespaces = match ctr(&["namespaces", "ls", "-q"]) {
            Ok(out) => out,
            Err(e) => return eprintln!("listing containerd namespaces: {e:#}"),
        };
        for ns in namespaces.lines().map(str::trim).filter(|n| !n.is_empty()) {
            let Ok(tasks) = ctr(&["--namespace", ns, "tasks", "ls", "-q"]) else {
                continue;
            };
            for task in tasks.lines().map(str::trim).filter(|t| !t.is_empty()) {
                if let Err(e) = ctr(&["--namespace", ns, "tasks", "delete", "--force", task]) {
                    eprintln!("deleting leftover task {ns}/{task}: {e:#}");
                }
            }
        }
    }

    /// Kills shims started for this containerd (they outlive it by design).
    fn kill_shims(&self) {
        for pid in self.shim_pids() {
            eprintln!("killing leftover containerd shim {pid}");
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// The shims this containerd started that are still running, found by the
    /// `-address <our socket>` on their command line: a test that removed its containers and
    /// pods expects none.
    pub fn shim_pids(&self) -> Vec<i32> {
        let Ok(procs) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let socket = self.socket.as_os_str().as_encoded_bytes();
        let mut pids = Vec::new();
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| a.windows(15).any(|w| w == b"containerd-shim"));
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket);
            if is_shim && ours {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Unmounts (lazily, deepest first) every mount point under `dir`.
fn unmount_under(dir: &Path) {
    let mut points = mounts_under(dir);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
            eprintln!("unmounting {}: {e}", point.display());
        }
    }
}

/// Mount points at or under `dir` in this process's mount namespace (for a test's check that
/// it left nothing mounted, and for cleanup).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = (bytes[i] == b'\\' && i + 3 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(code) = code {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The minimal config for a private containerd under `dir`, with `extra` merged in.
fn config_toml(dir: &Path, socket: &Path, extra: &str) -> Result<String> {
    let extra: Table = toml::from_str(extra).context("parsing the extra containerd config")?;
    let path = |p: &Path| Value::String(p.display().to_string());
    let mut ttrpc = socket.as_os_str().to_owned();
    ttrpc.push(".ttrpc");

    let mut config = Table::new();
    // containerd 2.x reads `version = 2` configs too (it migrates them to version 3 in memory).
    config.insert("version".into(), Value::Integer(2));
    config.insert("root".into(), path(&dir.join("root")));
    config.insert("state".into(), path(&dir.join("state")));
    let mut grpc = Table::new();
    grpc.insert("address".into(), path(socket));
    config.insert("grpc".into(), Value::Table(grpc));
    let mut ttrpc_table = Table::new();
    ttrpc_table.insert("address".into(), path(Path::new(&ttrpc)));
    config.insert("ttrpc".into(), Value::Table(ttrpc_table));
    // The "opt" plugin would otherwise create /opt/containerd.
    let mut opt = Table::new();
    opt.insert("path".into(), path(&dir.join("opt")));
    let mut plugins = Table::new();
    plugins.insert("io.containerd.internal.v1.opt".into(), Value::Table(opt));
    config.insert("plugins".into(), Value::Table(plugins));

    let wants_cri = extra
        .get("plugins")
        .and_then(Value::as_table)
        .is_some_and(|p| p.contains_key(CRI_PLUGIN));
    let disabled = if wants_cri {
        Vec::new()
    } else {
        vec![Value::String(CRI_PLUGIN.into())]
    };
    config.insert("disabled_plugins".into(), Value::Array(disabled));
    let has_shoal = extra
        .get("proxy_plugins")
        .and_then(Value::as_table)
        .is_some_and(|p| p.contains_key("shoal"));
    // The transfer service refuses to start when its unpack config names a snapshotter that
    // does not exist, so only configs with Shoal get it.
    if has_shoal && major_version()? >= 2 {
        merge(&mut config, transfer_unpack_config()?);
    }

    merge(&mut config, extra);
    toml::to_string(&config).context("writing the containerd config")
}

/// The major version of the `containerd` in `PATH` (asked once per process).
pub fn major_version() -> Result<u32> {
    static MAJOR: OnceLock<Result<u32, String>> = OnceLock::new();
    let major = MAJOR.get_or_init(|| {
        let output = Command::new("containerd")
            .arg("--version")
            .output()
            .map_err(|e| format!("running containerd --version: {e}"))?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        parse_major(&text).ok_or_else(|| format!("no version in `containerd --version`: {text:?}"))
    });
    major.clone().map_err(anyhow::Error::msg)
}

/// `containerd github.com/containerd/containerd/v2 2.1.9+unknown` -> 2; Debian's 1.6 prints
/// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` -> 1.
fn parse_major(version_output: &str) -> Option<u32> {
    let version = version_output.split_whitespace().nth(2)?;
    version
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// containerd 2.x pulls with `ctr` through its transfer service, which unpacks only into the
/// (platform, snapshotter) pairs its config lists; without an entry for `shoal` a pull into it
/// fails with "no unpack platforms defined". Listing entries replaces the built-in default, so
/// overlayfs is listed again (as `examples/containerd/config-2.x.toml` does).
fn transfer_unpack_config() -> Result<Table> {
    Ok(toml::from_str(
        r#"
        [[plugins."io.containerd.transfer.v1.local".unpack_config]]
          platform = "linux"
          snapshotter = "shoal"
        [[plugins."io.containerd.transfer.v1.local".unpack_config]]
          platform = "linux"
          snapshotter = "overlayfs"
        "#,
    )?)
}

/// Deep-merges `extra` into `base`: tables key by key, `disabled_plugins` joined, else `extra`
/// wins.
fn merge(base: &mut Table, extra: Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(e)) => merge(b, e),
            (Some(Value::Array(b)), Value::Array(e)) if key == "disabled_plugins" => {
                for v in e {
                    if !b.contains(&v) {
                        b.push(v);
                    }
                }
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// containerd config using Shoal at `socket` as snapshotter (`shoal`) and content store
/// (`shoal-content`), with the built-in content store disabled, as `examples/containerd/` does.
pub fn shoal_proxy_config(socket: &Path) -> String {
    let socket = socket.display();
    format!(
        "disabled_plugins = [\"io.containerd.content.v1.content\"]\n\n\
         [proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{socket}\"\n\n\
         [proxy_plugins.shoal-content]\n  type = \"content\"\n  address = \"{socket}\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_comes_from_the_third_word() {
        let debian_16 =
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(parse_major(debian_16), Some(1));
        let v2 = "containerd github.com/containerd/containerd/v2 v2.1.9 0123abc\n";
        assert_eq!(parse_major(v2), Some(2));
        assert_eq!(parse_major("containerd"), None);
    }

    #[test]
    fn extra_config_merges_into_generated_tables() -> Result<()> {
        let extra = r#"
            disabled_plugins = ["io.containerd.content.v1.content"]
            [proxy_plugins.shoal]
              type = "snapshot"
              address = "/run/shoal/shoal.sock"
            [plugins."io.containerd.internal.v1.opt"]
              path = "/elsewhere"
        "#;
        let text = config_toml(Path::new("/t"), Path::new("/t/c.sock"), extra)?;
        let config: Table = toml::from_str(&text)?;
        let disabled = config["disabled_plugins"].as_array().context("array")?;
        assert_eq!(disabled.len(), 2, "{text}");
        assert_eq!(
            config["proxy_plugins"]["shoal"]["type"].as_str(),
            Some("snapshot")
        );
        assert_eq!(
            config["plugins"]["io.containerd.internal.v1.opt"]["path"].as_str(),
            Some("/elsewhere")
        );
        assert_eq!(config["ttrpc"]["address"].as_str(), Some("/t/c.sock.ttrpc"));
        Ok(())
    }

    #[test]
    fn cri_stays_enabled_when_configured() -> Result<()> {
        let extra = r#"
            [plugins."io.containerd.grpc.v1.cri".containerd]
              snapshotter = "shoal"
        "#;
        let config: Table = toml::from_str(&config_toml(Path::new("/t"), Path::new("/s"), extra)?)?;
        assert!(
            config["disabled_plugins"]
                .as_array()
                .context("array")?
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/tmp/plain"), "/tmp/plain");
    }
}
