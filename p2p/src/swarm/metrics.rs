//! A node's swarm metrics, exported on `/metrics` by whoever owns the registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters shared by every torrent and connection of a node. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct SwarmMetrics {
    pub bytes_from_peers: Counter,
    pub bytes_from_upstream: Counter,
    pub bytes_to_peers: Counter,
    pub pieces_served: Counter,
    pub pieces_wasted: Counter,
    pub verification_failures: Counter,
    pub peers_connected: Gauge,
    pub blobs_completed: Counter,
}

impl SwarmMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_swarm");
        r.register(
            "bytes_from_peers",
            "Verified piece bytes received from peers",
            self.bytes_from_peers.clone(),
        );
        r.register(
            "bytes_from_upstream",
            "Piece bytes fetched from the upstream registry",
            self.bytes_from_upstream.clone(),
        );
        r.register(
            "bytes_to_peers",
            "Piece bytes sent to peers",
            self.bytes_to_peers.clone(),
        );
        r.register(
            "pieces_served",
            "Pieces sent to peers",
            self.pieces_served.clone(),
        );
        r.register(
            "pieces_wasted",
            "Pieces received twice (endgame) and dropped",
            self.pieces_wasted.clone(),
        );
        r.register(
            "verification_failures",
            "Pieces or blobs that failed their hash check",
            self.verification_failures.clone(),
        );
        r.register(
            "peers_connected",
            "Open peer connections",
            self.peers_connected.clone(),
        );
        r.register(
            "blobs_completed",
            "Blobs downloaded and verified",
            self.blobs_completed.clone(),
        );
    }
}
