//! The tracker's HTTP/JSON API, shared by server and client.
//!
//! ```text
//! POST /announce                     AnnounceRequest -> AnnounceResponse
//! GET  /metainfo/<digest>            -> Metainfo (possibly partial) | 404
//! POST /metainfo/<digest>/pieces     PublishRequest  -> 204 | 403 (no lease) | 409 (conflict)
//! POST /report                       ReportRequest   -> 204
//! GET  /metrics                      Prometheus text
//! ```

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::metainfo::{Metainfo, PieceHash};
use crate::upstream::BlobSource;
use crate::wire::PeerId;

/// A peer says it is alive and, optionally, what it is doing with one blob.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceRequest {
    pub peer_id: PeerId,
    /// `host:port` of the peer's swarm listener.
    pub addr: String,
    /// Seeds cache blobs for the cluster and are preferred as back-sourcers.
    #[serde(default)]
    pub seed: bool,
    /// `None`: a heartbeat only (seeds with nothing to do send these).
    pub blob: Option<BlobAnnounce>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlobAnnounce {
    pub digest: Digest,
    /// Known once the peer (or its source) knows it.
    pub size: Option<u64>,
    pub complete: bool,
    /// Where to back-source the blob, passed on to seeds.
    pub source: Option<BlobSource>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnnounceResponse {
    /// Announce again within this many milliseconds to stay listed.
    pub interval_ms: u64,
    pub peers: Vec<PeerInfo>,
    /// The tracker's metainfo for the blob, partial while it is being back-sourced.
    pub metainfo: Option<Metainfo>,
    /// Whether this peer holds the back-source lease for the blob.
    pub backsource: bool,
    /// A lease holder's share: holder `index` of `count` fetches the `index`-th of `count`
    /// equal slices first, then whatever no peer has yet. Several back-sourcers thus split the
    /// blob between them instead of fetching the same pieces, and one alone fetches it all.
    #[serde(default)]
    pub stripe: Stripe,
}

/// One lease holder's place among the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stripe {
    pub index: u32,
    pub count: u32,
}

impl Default for Stripe {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Stripe {
    /// The piece this lease holder starts from, in a blob of `pieces` pieces.
    pub fn start(&self, pieces: u32) -> u32 {
        if self.count <= 1 || self.index >= self.count {
            return 0;
        }
        (u64::from(pieces) * u64::from(self.index) / u64::from(self.count)) as u32
    }

    /// Where this lease holder's own share ends (exclusive).
    pub fn end(&self, pieces: u32) -> u32 {
        if self.count <= 1 || self.index >= self.count {
            return pieces;
        }
        (u64::from(pieces) * u64::from(self.index + 1) / u64::from(self.count)) as u32
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: PeerId,
    pub addr: String,
    pub complete: bool,
    pub seed: bool,
    /// It holds a back-source lease: new pieces enter the swarm through it, so every peer
    /// (and every other back-sourcer) should be connected to it.
    #[serde(default)]
    pub backsource: bool,
}

/// A lease holder publishes hashes of pieces it fetched upstream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    pub peer_id: PeerId,
    pub size: u64,
    pub pieces: Vec<(u32, PieceHash)>,
}

/// A peer reports a verification failure it saw.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportRequest {
    pub reporter: PeerId,
    pub digest: Digest,
    pub kind: ReportKind,
    /// The peer that sent bad data, when known.
    pub culprit: Option<PeerId>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportKind {
    /// A piece did not match its published hash.
    BadPiece,
    /// A complete blob did not match its digest: the published hashes were wrong.
    BadBlob,
}
