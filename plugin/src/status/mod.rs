//! `shoal status`: what a node holds and does, served as JSON on `GET /status` beside
//! `/metrics` (the mirror's HTTP server) and printed by the CLI.
//!
//! The node side is [`collect`]: blobs from the blob store (complete or partial, pieces present),
//! lazy mounts from [`Lazy`], peers and byte counters from the swarm's metrics. The CLI side
//! ([`client`]) fetches it twice, a second apart, to turn the counters into a throughput.
//!
//! Images come from containerd, not the node: containerd keeps image names in its own metadata,
//! which the node never sees, so the CLI asks containerd ([`images`]) and matches each image's
//! layers with the node's blobs and lazy mounts.

pub mod client;
pub mod images;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shoal_p2p::swarm::Swarm;

use crate::lazy::Lazy;

/// The whole `/status` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `node`, or `seed` (which has no containerd and no lazy mounts).
    pub role: String,
    pub peer_id: String,
    /// Where the blob store lives, and the bytes it holds (partial blobs at full size).
    pub store_root: PathBuf,
    pub store_bytes: u64,
    pub blobs: Vec<BlobStatus>,
    /// `None` on a seed.
    pub lazy_mounts: Option<Vec<LazyMount>>,
    pub peers_connected: i64,
    /// The peers behind those connections.
    #[serde(default)]
    pub peers: Vec<shoal_p2p::swarm::PeerLink>,
    pub bytes: ByteCounters,
}

/// One blob in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStatus {
    pub digest: String,
    pub size: u64,
    pub piece_size: u32,
    /// Pieces present and verified, of `pieces_total`.
    pub pieces_present: u32,
    pub pieces_total: u32,
    /// Whole and checked against its digest.
    pub complete: bool,
}

/// One lazily mounted layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyMount {
    pub snapshot: String,
    pub layer: String,
    pub dir: PathBuf,
}

/// Byte counters since the node started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteCounters {
    pub from_peers: u64,
    pub from_upstream: u64,
    pub to_peers: u64,
}

/// The status of the node `swarm` belongs to; `lazy` is `None` on a seed.
pub fn collect(swarm: &Swarm, lazy: Option<&Lazy>) -> NodeStatus {
    let store = swarm.store();
    let blobs = store
        .list()
        .into_iter()
        .map(|blob| {
            let have = blob.have();
            BlobStatus {
                digest: blob.digest().to_string(),
                size: blob.size(),
                piece_size: blob.layout().piece_size,
                pieces_present: have.count(),
                pieces_total: have.len(),
                complete: blob.is_complete(),
            }
        })
        .collect();
    let lazy_mounts = lazy.map(|lazy| {
        lazy.mounts()
            .into_iter()
            .map(|m| LazyMount {
                snapshot: m.snapshot,
                layer: m.layer.to_string(),
                dir: m.dir,
            })
            .collect()
    });
    let metrics = swarm.metrics();
    NodeStatus {
        role: if lazy.is_some() { "node" } else { "seed" }.to_owned(),
        peer_id: swarm.peer_id().to_string(),
        store_root: store.root().to_owned(),
        store_bytes: store.used_bytes(),
        blobs,
        lazy_mounts,
        peers: swarm.peers(),
        peers_connected: metrics.peers_connected.get(),
        bytes: ByteCounters {
            from_peers: metrics.bytes_from_peers.get(),
            from_upstream: metrics.bytes_from_upstream.get(),
            to_peers: metrics.bytes_to_peers.get(),
        },
    }
}
