//! Checks of containerd: its version, and whether its config file hands Shoal what it needs.
//!
//! Key names, by config version (containerd `docs/cri/config.md`, `docs/hosts.md`,
//! `docs/PLUGINS.md`; containerd 2.x reads version 2 files too, converting them at start):
//!
//! | what | version 2 (containerd 1.6/1.7) | version 3 (containerd 2.x) |
//! |---|---|---|
//! | snapshot proxy | `[proxy_plugins.<name>] type = "snapshot"`, `address` | same |
//! | content proxy | `[proxy_plugins.<name>] type = "content"` + `disabled_plugins = ["io.containerd.content.v1.content"]` | same |
//! | CRI snapshotter | `plugins."io.containerd.grpc.v1.cri".containerd.snapshotter` | `plugins."io.containerd.cri.v1.images".snapshotter` |
//! | remote-snapshot labels | `plugins."io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations = false` | `plugins."io.containerd.cri.v1.images".disable_snapshot_annotations = false`, or (2.1+, transfer service) `[proxy_plugins.<name>.exports] enable_remote_snapshot_annotations = "true"` |
//! | hosts.toml directory | `plugins."io.containerd.grpc.v1.cri".registry.config_path` | `plugins."io.containerd.cri.v1.images".registry.config_path` |
//! | transfer service unpacks | — | `[[plugins."io.containerd.transfer.v1.local".unpack_config]] snapshotter = "<name>"` |
//!
//! Every finding names the file and the key, and the fix says what to write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use self::cri::{CRI_V2, CRI_V3, CriKeys};
use super::Check;
use crate::config::Config;

/// containerd's own content store, which must be disabled for a content proxy to be used.
pub const BUILTIN_CONTENT: &str = "io.containerd.content.v1.content";

/// `containerd --version`, as far as the checks care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ContainerdVersion {
    /// Finds the version in `containerd --version` output: `containerd
    /// github.com/containerd/containerd 1.6.20~ds1 …` or `containerd containerd.io v2.0.0 …`.
    pub fn parse(output: &str) -> Option<Self> {
        output.split_whitespace().find_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            if !word.starts_with(|c: char| c.is_ascii_digit()) || !word.contains('.') {
                return None;
            }
            let mut nums = word.split(|c: char| !c.is_ascii_digit());
            Some(Self {
                major: nums.next()?.parse().ok()?,
                minor: nums.next()?.parse().ok()?,
                patch: nums.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            })
        })
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Checks a containerd version: Shoal is made for 1.6, 1.7 and 2.x.
pub fn version(found: Option<ContainerdVersion>) -> Check {
    const NAME: &str = "containerd-version";
    match found {
        None => Check::warn(
            NAME,
            "`containerd --version` did not run or printed no version",
            "install containerd 1.6 or later (Debian: `apt-get install containerd`) and put it on PATH",
        ),
        Some(v) if (v.major, v.minor) < (1, 6) => Check::fail(
            NAME,
            format!("containerd {v} is older than 1.6"),
            "upgrade containerd to 1.6, 1.7 or 2.x",
        ),
        Some(v) if v.major >= 3 => Check::warn(
            NAME,
            format!("containerd {v}: Shoal is tested with 1.6, 1.7 and 2.x"),
            "none known; report problems with this version",
        ),
        Some(v) => {
            let format = if v.major == 1 {
                "version = 2"
            } else {
                "version = 3 (or 2)"
            };
            Check::ok(NAME, format!("containerd {v} (config {format})"))
        }
    }
}

/// Runs `containerd --version` from PATH.
pub async fn version_here() -> (Check, Option<ContainerdVersion>) {
    let run = tokio::process::Command::new("containerd")
        .arg("--version")
        .kill_on_drop(true)
        .output();
    let found = match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(out)) => ContainerdVersion::parse(&String::from_utf8_lossy(&out.stdout)),
        _ => None,
    };
    (version(found), found)
}

/// A `[proxy_plugins.<name>]` entry.
#[derive(Debug)]
struct Proxy<'a> {
    name: &'a str,
    kind: &'a str,
    address: &'a str,
}

/// A parsed containerd config file.
#[derive(Debug)]
pub struct ContainerdConfig {
    path: PathBuf,
    table: Table,
}

/// Runs every config check on the file at `path` against Shoal's `cfg`.
pub fn config_checks(path: &Path, cfg: &Config, found: Option<ContainerdVersion>) -> Vec<Check> {
    let file = match ContainerdConfig::load(path) {
        Ok(file) => file,
        Err(check) => return vec![check],
    };
    file.checks(cfg, found)
}

impl ContainerdConfig {
    /// Reads and parses `path`; a missing or broken file is a FAIL naming it.
    pub fn load(path: &Path) -> Result<Self, Check> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Check::fail(
                "containerd-config",
                format!(
                    "{} does not exist: containerd runs on its defaults, which know nothing of Shoal",
                    path.display()
                ),
                format!(
                    "`containerd config default > {}`, merge examples/containerd/config-1.x.toml \
                     (containerd 1.6/1.7) or config-2.x.toml (2.x) into it, restart containerd; \
                     or pass --containerd-config with the file containerd really reads",
                    path.display()
                ),
            )),
            Err(e) => Err(Check::fail(
                "containerd-config",
                format!("reading {}: {e}", path.display()),
                "run `shoal doctor` as root, or pass --containerd-config",
            )),
        }
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Check> {
        match text.parse::<Table>() {
            Ok(table) => Ok(Self {
                path: path.to_owned(),
                table,
            }),
            Err(e) => {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
                let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
                Err(Check::fail(
                    "containerd-config",
                    format!(
                        "{}{at} is not valid TOML: {}",
                        self_path(path),
                        e.message().trim()
                    ),
                    "fix the TOML syntax there (containerd will not start with it either)",
                ))
            }
        }
    }

    /// Every config check, in order.
    pub fn checks(&self, cfg: &Config, found: Option<ContainerdVersion>) -> Vec<Check> {
        let mut checks = vec![self.config_version(found)];
        checks.extend(self.imports());
        let (proxy_check, proxy) = self.snapshot_proxy(&cfg.node.socket);
        checks.push(proxy_check);
        checks.push(self.content_proxy(&cfg.node.socket, cfg.content.remote_content));
        checks.push(self.cri_snapshotter(proxy.as_deref()));
        checks.push(self.snapshot_annotations(proxy.as_deref(), found));
        checks.push(self.registry_config_path(&cfg.mirror.listen));
        checks.extend(self.transfer_unpack(proxy.as_deref()));
        checks
    }

    fn file(&self) -> String {
        self_path(&self.path)
    }

    fn get(&self, keys: &[&str]) -> Option<&Value> {
        let (last, parents) = keys.split_last()?;
        let mut table = &self.table;
        for key in parents {
            table = table.get(*key)?.as_table()?;
        }
        table.get(*last)
    }

    /// The config format: 2 for containerd 1.x, 3 for 2.x; a file without `version` is read as
    /// the long-deprecated version 1.
    fn format(&self) -> i64 {
        self.get(&["version"])
            .and_then(Value::as_integer)
            .unwrap_or(1)
    }

    fn cri(&self) -> &'static CriKeys {
        if self.format() >= 3 { &CRI_V3 } else { &CRI_V2 }
    }

    fn wrong_type(&self, name: &str, keys: &[&str], want: &str, got: &Value) -> Check {
        Check::fail(
            name,
            format!(
                "{} in {} must be {want}, not {got}",
                key_path(keys),
                self.file()
            ),
            format!("set {} to {want}", key_path(keys)),
        )
    }

    fn disabled_plugins(&self) -> Result<Vec<&str>, Check> {
        match self.get(&["disabled_plugins"]) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().ok_or_else(|| {
                        self.wrong_type(
                            "disabled-plugins",
                            &["disabled_plugins"],
                            "an array of strings",
                            v,
                        )
                    })
                })
                .collect(),
            Some(other) => Err(self.wrong_type(
                "disabled-plugins",
                &["disabled_plugins"],
                "an array of plugin ids",
                other,
            )),
        }
    }

    fn cri_disabled(&self) -> bool {
        self.disabled_plugins()
            .unwrap_or_default()
            .iter()
            .any(|p| self.cri().plugins.contains(p))
    }

    fn proxies(&self, name: &str) -> Result<Vec<Proxy<'_>>, Check> {
        let Some(value) = self.get(&["proxy_plugins"]) else {
            return Ok(Vec::new());
        };
        let Some(table) = value.as_table() else {
            return Err(self.wrong_type(name, &["proxy_plugins"], "a table", value));
        };
        let mut out = Vec::new();
        for (plugin, entry) in table {
            let Some(entry) = entry.as_table() else {
                return Err(self.wrong_type(name, &["proxy_plugins", plugin], "a table", entry));
            };
            let field = |key: &str| match entry.get(key) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(other) => {
                    Err(self.wrong_type(name, &["proxy_plugins", plugin, key], "a string", other))
                }
                None => Err(Check::fail(
                    name,
                    format!(
                        "{} in {} has no `{key}`",
                        key_path(&["proxy_plugins", plugin]),
                        self.file()
                    ),
                    format!("set {}", key_path(&["proxy_plugins", plugin, key])),
                )),
            };
            out.push(Proxy {
                name: plugin,
                kind: field("type")?,
                address: field("address")?,
            });
        }
        Ok(out)
    }

    /// `version` matches the containerd that reads the file.
    pub fn config_version(&self, found: Option<ContainerdVersion>) -> Check {
        const NAME: &str = "containerd-config-version";
        let file = self.file();
        match (self.get(&["version"]), found) {
            (None, _) => Check::fail(
                NAME,
                format!(
                    "{file} has no `version`: containerd reads it as the deprecated version 1, whose plugin keys differ"
                ),
                "add `version = 2` (containerd 1.6/1.7) or `version = 3` (containerd 2.x) at the top, with the keys of examples/containerd/config-1.x.toml or config-2.x.toml",
            ),
            (Some(Value::Integer(3)), Some(v)) if v.major < 2 => Check::fail(
                NAME,
                format!(
                    "{file} has version = 3, which containerd {v} cannot read (it is the containerd 2.x format)"
                ),
                "use `version = 2` and the keys of examples/containerd/config-1.x.toml",
            ),
            (Some(Value::Integer(2)), Some(v)) if v.major >= 2 => Check::ok(
                NAME,
                format!(
                    "{file} has version = 2; containerd {v} converts it at start (`containerd config migrate` writes version 3)"
                ),
            ),
            (Some(Value::Integer(n @ (2 | 3))), _) => Check::ok(
                NAME,
                format!(
                    "{file} has version = {n} (the containerd {} format)",
                    if *n == 2 { "1.6/1.7" } else { "2.x" }
                ),
            ),
            (Some(other), _) => Check::fail(
                NAME,
                format!("{file} has version = {other}: Shoal knows the keys of versions 2 and 3"),
                "set `version = 2` (containerd 1.6/1.7) or `version = 3` (containerd 2.x)",
            ),
        }
    }

    /// A warning when the file imports others, whose settings these checks do not see.
    fn imports(&self) -> Option<Check> {
        let imports: Vec<String> = self
            .get(&["imports"])?
            .as_array()?
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect();
        (!imports.is_empty()).then(|| {
            Check::warn(
                "containerd-config-imports",
                format!(
                    "{} imports {}: these checks read only {0}",
                    self.file(),
                    imports.join(", ")
                ),
                "if a check below fails but the setting is in an imported file, that check is wrong; otherwise none",
            )
        })
    }

    /// A `type = "snapshot"` proxy plugin whose `address` is Shoal's `node.socket`; returns its
    /// name (or the closest candidate's) for the CRI checks.
    pub fn snapshot_proxy(&self, socket: &Path) -> (Check, Option<String>) {
        const NAME: &str = "snapshot-proxy";
        let proxies = match self.proxies(NAME) {
            Ok(p) => p,
            Err(check) => return (check, None),
        };
        let snapshot: Vec<&Proxy<'_>> = proxies.iter().filter(|p| p.kind == "snapshot").collect();
        if let Some(p) = snapshot.iter().find(|p| Path::new(p.address) == socket) {
            let check = Check::ok(
                NAME,
                format!(
                    "{} in {} is a snapshot proxy on {}",
                    key_path(&["proxy_plugins", p.name]),
                    self.file(),
                    socket.display()
                ),
            );
            return (check, Some(p.name.to_owned()));
        }
        let socket = socket.display();
        if let Some(p) = snapshot
            .iter()
            .find(|p| p.name == "shoal")
            .or(snapshot.first())
        {
            let key = key_path(&["proxy_plugins", p.name, "address"]);
            let check = Check::fail(
                NAME,
                format!(
                    "{key} in {} is {:?}, but Shoal's node.socket is \"{socket}\"",
                    self.file(),
                    p.address
                ),
                format!("set {key} = \"{socket}\" (or node.socket in shoal.toml to match)"),
            );
            return (check, Some(p.name.to_owned()));
        }
        let check = Check::fail(
            NAME,
            format!(
                "{} has no [proxy_plugins] entry with type = \"snapshot\": containerd does not know Shoal's snapshotter",
                self.file()
            ),
            format!(
                "add `[proxy_plugins.shoal]` with `type = \"snapshot\"` and `address = \"{socket}\"` (see {})",
                self.cri().example
            ),
        );
        (check, None)
    }

    /// Shoal as containerd's content store: a content proxy on the node's socket, with the
    /// built-in store disabled. Required with `content.remote_content`, optional otherwise.
    pub fn content_proxy(&self, socket: &Path, remote_content: bool) -> Check {
        const NAME: &str = "content-proxy";
        let proxies = match self.proxies(NAME) {
            Ok(p) => p,
            Err(check) => return check,
        };
        let disabled = match self.disabled_plugins() {
            Ok(d) => d.contains(&BUILTIN_CONTENT),
            Err(check) => return check,
        };
        let file = self.file();
        let add_disabled = format!("add \"{BUILTIN_CONTENT}\" to the top-level disabled_plugins");
        let Some(p) = proxies.iter().find(|p| p.kind == "content") else {
            if remote_content {
                return Check::fail(
                    NAME,
                    format!(
                        "content.remote_content is on in Shoal's config, but {file} has no [proxy_plugins] entry with type = \"content\""
                    ),
                    format!(
                        "add `[proxy_plugins.shoal-content]` with `type = \"content\"` and `address = \"{}\"`, and {add_disabled} (see {})",
                        socket.display(),
                        self.cri().example
                    ),
                );
            }
            if disabled {
                return Check::fail(
                    NAME,
                    format!(
                        "disabled_plugins in {file} has \"{BUILTIN_CONTENT}\" but no content proxy replaces it: containerd has no content store"
                    ),
                    format!(
                        "add `[proxy_plugins.shoal-content]` with `type = \"content\"` and `address = \"{}\"`, or remove \"{BUILTIN_CONTENT}\" from disabled_plugins",
                        socket.display()
                    ),
                );
            }
            return Check::ok(
                NAME,
                format!(
                    "containerd keeps its own content store (optional: with Shoal as content store, {file} needs a type = \"content\" proxy and the built-in one disabled)"
                ),
            );
        };
        let key = key_path(&["proxy_plugins", p.name, "address"]);
        if Path::new(p.address) != socket {
            return Check::fail(
                NAME,
                format!(
                    "{key} in {file} is {:?}, but Shoal's node.socket is \"{}\"",
                    p.address,
                    socket.display()
                ),
                format!("set {key} = \"{}\"", socket.display()),
            );
        }
        if !disabled {
            return Check::fail(
                NAME,
                format!(
                    "{} in {file} is a content proxy, but disabled_plugins lacks \"{BUILTIN_CONTENT}\": containerd only uses a content proxy with its own store disabled (1.6 picks one at random per start)",
                    key_path(&["proxy_plugins", p.name])
                ),
                add_disabled,
            );
        }
        Check::ok(
            NAME,
            format!(
                "{} in {file} is containerd's content store on {}, the built-in one disabled",
                key_path(&["proxy_plugins", p.name]),
                socket.display()
            ),
        )
    }
}

fn self_path(path: &Path) -> String {
    path.display().to_string()
}

/// A TOML key path as written in a file: `plugins."io.containerd.grpc.v1.cri".containerd`.
fn key_path(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| {
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                (*k).to_owned()
            } else {
                format!("{k:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

mod cri;
#[cfg(test)]
mod tests;
