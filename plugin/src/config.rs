//! `shoal.toml`: one file, one typed section per component, validated at start.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use shoal_p2p::swarm::P2pConfig;
use shoal_p2p::tracker::TrackerConfig;
use shoal_p2p::upstream::RegistryConfig;

/// The whole config file. Each component receives only its own section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub content: ContentSection,
    pub mirror: MirrorConfig,
    pub fuse: FuseConfig,
    pub p2p: P2pConfig,
    pub registry: RegistryConfig,
    pub tracker: TrackerConfig,
}

/// `[node]`: where the node keeps its state.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Root of everything the node writes; the blob store lives in `<root>/store`.
    pub root: PathBuf,
    /// Blob store size cap in MiB; unused complete blobs are evicted beyond it.
    pub store_capacity_mib: u64,
    /// Unix socket serving containerd's snapshots (and content) gRPC services (mode 0600).
    pub socket: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/shoal"),
            store_capacity_mib: 50 * 1024,
            socket: PathBuf::from("/run/shoal/shoal.sock"),
        }
    }
}

/// `[content]`: containerd's content store, served by the node.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContentSection {
    /// `Info` also answers for blobs the swarm can fetch, so containerd skips the registry
    /// download; `Read` then fetches missing pieces on demand.
    pub remote_content: bool,
    /// How long `Info` waits for the swarm to find a blob before answering NotFound.
    pub info_timeout_ms: u64,
    /// How long `Read` waits for the missing pieces of one chunk before failing.
    pub read_timeout_ms: u64,
}

impl Default for ContentSection {
    fn default() -> Self {
        Self {
            remote_content: false,
            info_timeout_ms: 3_000,
            read_timeout_ms: 60_000,
        }
    }
}

/// `[mirror]`: the registry mirror containerd reaches through `hosts.toml`; also serves
/// `/metrics`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    pub listen: String,
    /// How long a blob request waits for its next piece before the stream is cut (a reader
    /// never hangs forever).
    pub stall_timeout_ms: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7072".into(),
            stall_timeout_ms: 60_000,
        }
    }
}

/// `[fuse]`: lazily mounted eStargz layers (remote snapshots).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// Mount eStargz layers lazily; with `false` every layer is unpacked normally.
    pub enabled: bool,
    /// Inflated, verified chunks kept in memory, per mounted layer, in MiB.
    pub cache_mib: u64,
    /// Threads serving each layer's FUSE requests.
    pub threads: usize,
    /// How long one read waits for its pieces (from peers or the registry) before failing
    /// with EIO; a read never hangs forever.
    pub read_timeout_ms: u64,
    /// Let the kernel read files that have a local copy directly (FUSE passthrough, Linux
    /// 6.9+); falls back to reads through FUSE where the kernel refuses. A small local file is
    /// copied before its first open returns, so it passes through at once.
    pub passthrough: bool,
    /// Once a layer's whole blob is local, write a verified, uncompressed copy of each of its
    /// files (under `node.root/lazy/copies`, as much disk as the layer unpacked), so reads no
    /// longer inflate and hash chunks, and with passthrough bypass FUSE. Copies are kept
    /// across restarts (checked before use) and removed with the layer's last snapshot.
    /// Without it (and without passthrough) nothing is copied; with passthrough alone, a file
    /// is copied on its first open.
    pub materialize: bool,
    /// At mount, fetch the files the image marks as needed first (`.prefetch.landmark`).
    pub prefetch: bool,
}

impl Default for FuseConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cache_mib: 64,
            threads: 4,
            read_timeout_ms: 30_000,
            passthrough: true,
            materialize: true,
            prefetch: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads and validates `path`; `None` gives the embedded defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            let cfg = Self::default();
            cfg.validate().map_err(|message| ConfigError::Invalid {
                path: "<defaults>".into(),
                message,
            })?;
            return Ok(cfg);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node.store_capacity_mib == 0 {
            return Err("node.store_capacity_mib must be above 0".into());
        }
        if !self.node.root.is_absolute() {
            return Err(format!(
                "node.root {:?} must be an absolute path",
                self.node.root
            ));
        }
        if !self.node.socket.is_absolute() {
            return Err(format!(
                "node.socket {:?} must be an absolute path",
                self.node.socket
            ));
        }
        if self.content.info_timeout_ms == 0 || self.content.read_timeout_ms == 0 {
            return Err(
                "content.info_timeout_ms and content.read_timeout_ms must be above 0".into(),
            );
        }
        if self.fuse.threads == 0 || self.fuse.threads > 256 {
            return Err("fuse.threads must be between 1 and 256".into());
        }
        if self.fuse.read_timeout_ms == 0 {
            return Err("fuse.read_timeout_ms must be above 0".into());
        }
        if self.mirror.stall_timeout_ms == 0 {
            return Err("mirror.stall_timeout_ms must be above 0".into());
        }
        self.p2p.validate()?;
        self.registry.validate()?;
        self.tracker.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_invalid_options_name_the_option_and_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("shoal.toml");
        std::fs::write(&path, "[p2p]\nmax_conn = 3\n")?;
        let err = Config::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("max_conn") && err.contains("shoal.toml"),
            "{err}"
        );
        std::fs::write(&path, "[node]\nroot = \"relative\"\n")?;
        let err = Config::load(Some(&path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("node.root"), "{err}");
        std::fs::write(
            &path,
            "[p2p]\ntracker = \"http://t:7070\"\n[mirror]\nlisten = \"127.0.0.1:1\"\n",
        )?;
        let cfg = Config::load(Some(&path))?;
        assert_eq!(cfg.p2p.tracker.as_deref(), Some("http://t:7070"));
        assert!(Config::load(None).is_ok());
        Ok(())
    }

    #[test]
    fn the_annotated_example_parses_and_matches_the_defaults() -> anyhow::Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shoal.toml");
        let cfg = Config::load(Some(&path))?;
        let defaults = Config::default();
        assert_eq!(cfg.node.root, defaults.node.root);
        assert_eq!(
            cfg.node.store_capacity_mib,
            defaults.node.store_capacity_mib
        );
        assert_eq!(cfg.mirror.listen, defaults.mirror.listen);
        assert_eq!(cfg.p2p.max_conns, defaults.p2p.max_conns);
        assert_eq!(cfg.p2p.max_inflight, defaults.p2p.max_inflight);
        assert_eq!(cfg.tracker.peer_ttl_ms, defaults.tracker.peer_ttl_ms);
        Ok(())
    }
}
