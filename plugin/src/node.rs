//! `shoal node` and `shoal seed`: the blob store, the swarm peer, the registry mirror and (on a
//! node) containerd's gRPC services on a Unix socket, wired together.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_p2p::swarm::{Swarm, SwarmMetrics};
use shoal_p2p::upstream::Upstream;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::content::{self, ContentConfig, ContentStore};
use crate::lazy::Lazy;
use crate::mirror::{self, Mirror};
use crate::snapshotter::{self, OverlaySnapshotter, RemoteSnapshotter};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("binding {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the blob store")]
    Store(#[from] shoal_p2p::store::StoreError),
    #[error("setting up the upstream registry client")]
    Upstream(#[from] shoal_p2p::upstream::Error),
    #[error(transparent)]
    Swarm(#[from] shoal_p2p::swarm::SwarmError),
    #[error("serving the mirror")]
    Serve(#[source] std::io::Error),
    #[error("opening the content store")]
    Content(#[from] content::Error),
    #[error("opening the snapshotter")]
    Snapshotter(#[from] snapshotter::Error),
    #[error("preparing the containerd socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serving containerd's gRPC services")]
    Grpc(#[from] tonic::transport::Error),
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

/// Raises the soft limit on open files to the hard one, as Go programs (containerd among them)
/// do at start: a node holds a descriptor per peer connection and per blob it serves, and two
/// per local copy of a lazy layer's files, so the usual soft limit of 1024 runs out on an image
/// with a few hundred files.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => debug!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => warn!(soft, hard, error = %e, "could not raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the open files limit"),
    }
}

/// Runs a node (or, with `seed`, a seed) until `shutdown`.
pub async fn run(
    mut cfg: Config,
    seed: bool,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    cfg.p2p.seed = seed;
    raise_open_files_limit();
    let store = BlobStore::open(&StoreConfig {
        root: cfg.node.root.join("store"),
        capacity: cfg.node.store_capacity_mib.saturating_mul(1 << 20),
    })?;
    let upstream = Upstream::new(&cfg.registry)?;
    let swarm_listener = bind("the swarm listener", &cfg.p2p.listen).await?;
    let mirror_listener = bind("the registry mirror", &cfg.mirror.listen).await?;
    let swarm_addr = swarm_listener.local_addr().map_err(NodeError::Serve)?;

    let metrics = SwarmMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let swarm = Swarm::new(
        cfg.p2p.clone(),
        swarm_addr,
        store.clone(),
        upstream.clone(),
        metrics,
        shutdown.clone(),
    )?;
    // A seed has no containerd to serve.
    let grpc = if seed {
        None
    } else {
        let overlay = OverlaySnapshotter::open(&cfg.node.root.join("snapshotter"))?;
        let lazy = Arc::new(Lazy::new(
            swarm.clone(),
            cfg.fuse.clone(),
            &cfg.node.root.join("lazy"),
        ));
        registry.register_collector(Box::new(Arc::clone(&lazy)));
        let snapshots = RemoteSnapshotter::new(overlay, Arc::clone(&lazy));
        // Containers must never see an empty lower layer: remount before serving containerd.
        let restored = snapshots.restore().await?;
        if restored.mounted > 0 || !restored.failed.is_empty() {
            info!(
                mounted = restored.mounted,
                failed = restored.failed.len(),
                "lazy layers remounted"
            );
        }
        let contents = ContentStore::open(
            store,
            &cfg.node.root.join("content.redb"),
            Some(swarm.clone()),
            ContentConfig {
                remote_content: cfg.content.remote_content,
                info_timeout: Duration::from_millis(cfg.content.info_timeout_ms),
                read_timeout: Duration::from_millis(cfg.content.read_timeout_ms),
            },
        )?;
        let socket = bind_socket(&cfg.node.socket)?;
        let server = tonic::transport::Server::builder()
            .add_service(snapshotter::service(snapshots))
            .add_service(content::service(contents))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(socket),
                shutdown.clone().cancelled_owned(),
            );
        Some((tokio::spawn(server), lazy))
    };
    info!(
        role = if seed { "seed" } else { "node" },
        swarm = %swarm_addr,
        mirror = %mirror_listener.local_addr().map_err(NodeError::Serve)?,
        socket = %if seed { "none".into() } else { cfg.node.socket.display().to_string() },
        tracker = cfg.p2p.tracker.as_deref().unwrap_or("none"),
        "shoal started"
    );
    let swarm_task = tokio::spawn(Arc::clone(&swarm).run(swarm_listener));
    let mirror = Mirror {
        swarm,
        upstream,
        registry,
        cfg: cfg.mirror.clone(),
        lazy: grpc.as_ref().map(|(_, lazy)| Arc::clone(lazy)),
    };
    let served = mirror::run(mirror_listener, mirror, shutdown.clone()).await;
    shutdown.cancel();
    let _ = swarm_task.await;
    if let Some((task, lazy)) = grpc {
        let result = task.await;
        tokio::task::spawn_blocking(move || lazy.unmount_all())
            .await
            .ok();
        let _ = std::fs::remove_file(&cfg.node.socket);
        if let Ok(result) = result {
            result?;
        }
    }
    served.map_err(NodeError::Serve)
}

/// Binds containerd's socket, replacing a stale one from a previous run; only root may use it.
fn bind_socket(path: &Path) -> Result<UnixListener, NodeError> {
    let err = |source| NodeError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() -> nix::Result<()> {
        // nextest runs each test in its own process: this limit is this test's alone.
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        if hard <= 256 {
            return Ok(());
        }
        setrlimit(Resource::RLIMIT_NOFILE, 256, hard)?;
        super::raise_open_files_limit();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE)?, (hard, hard));
        Ok(())
    }
}
