//! `shoal node` and `shoal seed`: the blob store, the swarm peer and the registry mirror, wired
//! together. (The containerd snapshotter and content services join them here.)

use std::sync::Arc;

use prometheus_client::registry::Registry;
use shoal_p2p::store::{BlobStore, StoreConfig};
use shoal_p2p::swarm::{Swarm, SwarmMetrics};
use shoal_p2p::upstream::Upstream;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::mirror::{self, Mirror};

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

/// Runs a node (or, with `seed`, a seed) until `shutdown`.
pub async fn run(
    mut cfg: Config,
    seed: bool,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    cfg.p2p.seed = seed;
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
        store,
        upstream.clone(),
        metrics,
        shutdown.clone(),
    )?;
    info!(
        role = if seed { "seed" } else { "node" },
        swarm = %swarm_addr,
        mirror = %mirror_listener.local_addr().map_err(NodeError::Serve)?,
        tracker = cfg.p2p.tracker.as_deref().unwrap_or("none"),
        "shoal started"
    );
    let swarm_task = tokio::spawn(Arc::clone(&swarm).run(swarm_listener));
    let mirror = Mirror {
        swarm,
        upstream,
        registry,
        cfg: cfg.mirror.clone(),
    };
    let served = mirror::run(mirror_listener, mirror, shutdown.clone()).await;
    shutdown.cancel();
    let _ = swarm_task.await;
    served.map_err(NodeError::Serve)
}
