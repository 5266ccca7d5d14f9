//! The swarm peer: fetches blobs piece by piece from other peers (and from upstream only when
//! no peer has a piece and the tracker says so), and serves what it has to everyone else.
//!
//! - [`Swarm`] is the node-wide part: the listener, the tracker client, the rate limiters and
//!   one torrent per blob. [`Swarm::fetch`] is how the rest of the node asks for a blob.
//! - `torrent.rs` is the per-blob actor: announces, peer set, requests, upstream fetches.
//! - `scheduler.rs` decides which piece to request next (rarest first, endgame).
//! - `conn.rs` runs one peer connection; `sink.rs` writes a piece into the store as it arrives
//!   (from a peer or upstream); `ratelimit.rs` caps ingress and egress.

mod conn;
mod metrics;
mod ratelimit;
mod scheduler;
mod sink;
mod torrent;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::SinkExt;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use metrics::SwarmMetrics;
pub use ratelimit::RateLimiter;

use self::torrent::{Event, Torrent, TorrentHandle};
use crate::digest::Digest;
use crate::store::{Blob, BlobStore};
use crate::tracker::TrackerClient;
use crate::tracker::api::AnnounceRequest;
use crate::upstream::{BlobSource, Upstream};
use crate::wire::{Codec, Message, PeerId};

/// `[p2p]` config section.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pConfig {
    /// Address the swarm listener binds.
    pub listen: String,
    /// `host:port` other peers use to reach us; defaults to `listen` when that is not a
    /// wildcard address.
    pub advertise: Option<String>,
    /// Tracker base URL (`http://tracker:7070`); without one the node only uses upstream.
    pub tracker: Option<String>,
    /// Open connections per blob.
    pub max_conns: usize,
    /// Outstanding piece requests per blob.
    pub max_inflight: usize,
    /// Parallel range requests to upstream per blob, when back-sourcing.
    pub upstream_concurrency: usize,
    /// Pieces being sent to peers at once, over all connections (bounds upload memory).
    pub max_uploads: usize,
    /// Ingress and egress caps in Mbit/s; 0 means unlimited. Ingress covers the registry too.
    pub ingress_mbit: u64,
    pub egress_mbit: u64,
    /// When the tracker is unreachable, fetch pieces no known peer has from upstream.
    pub fallback_to_upstream: bool,
    /// How long [`Swarm::fetch`] waits to learn a blob's size before giving up.
    pub layout_timeout_ms: u64,
    /// Set by `shoal seed`: cache blobs for the cluster and back-source them on request.
    #[serde(skip)]
    pub seed: bool,
    /// Test hook: corrupt every piece we serve, to prove that peers catch it.
    pub corrupt_uploads: bool,
}

impl Default for P2pConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:7071".into(),
            advertise: None,
            tracker: None,
            max_conns: 12,
            max_inflight: 24,
            upstream_concurrency: 8,
            max_uploads: 6,
            ingress_mbit: 0,
            egress_mbit: 0,
            fallback_to_upstream: true,
            layout_timeout_ms: 10_000,
            seed: false,
            corrupt_uploads: false,
        }
    }
}

impl P2pConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_conns == 0
            || self.max_inflight == 0
            || self.upstream_concurrency == 0
            || self.max_uploads == 0
        {
            return Err(
                "p2p.max_conns, p2p.max_inflight, p2p.upstream_concurrency and p2p.max_uploads must be at least 1"
                    .into(),
            );
        }
        if let Some(t) = &self.tracker
            && !(t.starts_with("http://") || t.starts_with("https://"))
        {
            return Err(format!(
                "p2p.tracker {t:?} must be an http:// or https:// URL"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error(
        "nobody could say how big {digest} is within {timeout:?} (no peer, tracker or upstream answered)"
    )]
    NoLayout { digest: Digest, timeout: Duration },
    #[error("fetching {digest}: {why}")]
    Failed { digest: Digest, why: String },
    #[error("{0} has no advertise address: set p2p.advertise")]
    NoAdvertise(String),
    #[error("swarm is shutting down")]
    Shutdown,
}

/// What every torrent and connection of a node shares.
#[derive(Debug)]
pub(crate) struct SwarmCtx {
    cfg: P2pConfig,
    peer_id: PeerId,
    advertise: String,
    store: BlobStore,
    upstream: Upstream,
    tracker: Option<TrackerClient>,
    metrics: SwarmMetrics,
    ingress: RateLimiter,
    egress: RateLimiter,
    /// Pieces being sent at once, across all connections (`p2p.max_uploads`).
    upload_slots: Arc<tokio::sync::Semaphore>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Open peer connections, by (blob, connection id): what `shoal status` lists.
    links: Mutex<HashMap<(Digest, u64), (PeerId, String)>>,
}

/// A peer this node is connected to, as `shoal status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerLink {
    pub peer_id: String,
    pub addr: String,
    /// Blobs exchanged over connections with it.
    pub blobs: usize,
}

/// A node's (or seed's) swarm peer.
#[derive(Debug)]
pub struct Swarm {
    ctx: Arc<SwarmCtx>,
    torrents: Mutex<HashMap<Digest, TorrentHandle>>,
}

impl Swarm {
    /// `listen_addr` is where the listener is actually bound (it may have been port 0).
    pub fn new(
        cfg: P2pConfig,
        listen_addr: std::net::SocketAddr,
        store: BlobStore,
        upstream: Upstream,
        metrics: SwarmMetrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, SwarmError> {
        let advertise = match &cfg.advertise {
            Some(a) => a.clone(),
            None if !listen_addr.ip().is_unspecified() => listen_addr.to_string(),
            None => return Err(SwarmError::NoAdvertise(cfg.listen.clone())),
        };
        let mbit = |m: u64| m * 1_000_000 / 8;
        let ctx = SwarmCtx {
            peer_id: PeerId::random(),
            advertise,
            tracker: cfg.tracker.as_deref().map(TrackerClient::new),
            ingress: RateLimiter::new(mbit(cfg.ingress_mbit)),
            egress: RateLimiter::new(mbit(cfg.egress_mbit)),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_uploads)),
            cfg,
            store,
            upstream,
            metrics,
            tasks: TaskTracker::new(),
            shutdown,
            links: Mutex::new(HashMap::new()),
        };
        Ok(Arc::new(Self {
            ctx: Arc::new(ctx),
            torrents: Mutex::new(HashMap::new()),
        }))
    }

    /// The peers this node has connections with: each peer's id and address, and over how
    /// many blobs.
    pub fn peers(&self) -> Vec<PeerLink> {
        let links = self.ctx.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers: HashMap<PeerId, PeerLink> = HashMap::new();
        for (peer_id, addr) in links.values() {
            let link = peers.entry(*peer_id).or_insert_with(|| PeerLink {
                peer_id: peer_id.to_string(),
                addr: addr.clone(),
                blobs: 0,
            });
            link.blobs += 1;
        }
        let mut peers: Vec<PeerLink> = peers.into_values().collect();
        peers.sort_by(|a, b| a.addr.cmp(&b.addr));
        peers
    }

    pub fn peer_id(&self) -> PeerId {
        self.ctx.peer_id
    }

    pub fn store(&self) -> &BlobStore {
        &self.ctx.store
    }

    pub fn metrics(&self) -> &SwarmMetrics {
        &self.ctx.metrics
    }

    /// Accepts peer connections until shutdown; also seeds every complete blob in the store
    /// and, for seeds, keeps the tracker aware of us.
    pub async fn run(self: Arc<Self>, listener: TcpListener) {
        for digest in self.ctx.store.complete_blobs() {
            self.torrent(digest, None);
        }
        if self.ctx.cfg.seed {
            self.ctx.tasks.spawn(self.clone().heartbeat());
        }
        info!(peer_id = %self.ctx.peer_id, addr = %self.ctx.advertise, seed = self.ctx.cfg.seed, "swarm peer listening");
        loop {
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let this = self.clone();
                        self.ctx.tasks.spawn(async move { this.accept(stream, addr.to_string()).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "accepting peer connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.ctx.tasks.close();
        self.ctx.tasks.wait().await;
    }

    async fn heartbeat(self: Arc<Self>) {
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        let req = AnnounceRequest {
            peer_id: self.ctx.peer_id,
            addr: self.ctx.advertise.clone(),
            seed: true,
            blob: None,
        };
        loop {
            let wait = match tracker.announce(&req).await {
                Ok(resp) => Duration::from_millis(resp.interval_ms.clamp(100, 60_000)),
                Err(e) => {
                    debug!(error = %e, "seed heartbeat");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                () = self.ctx.shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn accept(self: Arc<Self>, stream: TcpStream, addr: String) {
        if let Err(e) = conn::tune(&stream) {
            debug!(%addr, error = %e, "tuning peer socket");
        }
        let mut transport = Framed::new(stream, Codec::default());
        let hello = match conn::read_hello(&mut transport).await {
            Ok(h) => h,
            Err(e) => {
                debug!(%addr, error = %e, "refusing connection");
                return;
            }
        };
        let known = self
            .torrents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&hello.digest);
        let handle = if known
            || self
                .ctx
                .store
                .get(&hello.digest)
                .is_some_and(|b| b.is_complete())
            || self.ctx.cfg.seed
        {
            let source = hello.source.clone().filter(|s| s.validate().is_ok());
            self.torrent(hello.digest, source)
        } else {
            let _ = transport
                .send(Message::Goodbye(format!("no blob {}", hello.digest)))
                .await;
            return;
        };
        let _ = handle
            .events
            .send(Event::Established {
                transport,
                hello,
                incoming: true,
                addr,
            })
            .await;
    }

    /// The torrent for `digest`, started if needed.
    fn torrent(&self, digest: Digest, source: Option<BlobSource>) -> TorrentHandle {
        let mut torrents = self.torrents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = torrents.get(&digest).filter(|t| !t.events.is_closed()) {
            return t.clone();
        }
        let existing = self.ctx.store.get(&digest);
        let handle = Torrent::spawn(self.ctx.clone(), digest, source, existing);
        torrents.insert(digest, handle.clone());
        handle
    }

    /// Starts fetching `digest` (if the store lacks it) and returns its blob as soon as its
    /// layout is known. Bytes arrive in the background; read them with [`Blob::wait_range`]
    /// after [`Swarm::want`] for the range, so those pieces are fetched first.
    pub async fn fetch(
        &self,
        digest: Digest,
        source: Option<BlobSource>,
    ) -> Result<Blob, SwarmError> {
        if let Some(blob) = self.ctx.store.get(&digest).filter(Blob::is_complete) {
            return Ok(blob);
        }
        let mut rx = self.torrent(digest, source).layout;
        let timeout = Duration::from_millis(self.ctx.cfg.layout_timeout_ms);
        let state = match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
            Err(_) => return Err(SwarmError::NoLayout { digest, timeout }),
            Ok(Err(_)) => return Err(SwarmError::Shutdown),
            Ok(Ok(state)) => state.clone(),
        };
        match state {
            Some(Ok(())) => self
                .ctx
                .store
                .get(&digest)
                .ok_or_else(|| SwarmError::Failed {
                    digest,
                    why: "removed from the store meanwhile".into(),
                }),
            Some(Err(why)) => {
                // Let the next fetch start over with a fresh torrent.
                self.torrents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&digest);
                Err(SwarmError::Failed { digest, why })
            }
            None => Err(SwarmError::NoLayout { digest, timeout }),
        }
    }

    /// Starts seeding a complete blob that arrived by another door (containerd's content
    /// store), so whatever containerd has, the swarm can fetch from this node.
    pub fn seed(&self, digest: Digest) {
        if self.ctx.store.get(&digest).is_some_and(|b| b.is_complete()) {
            self.torrent(digest, None);
        }
    }

    /// Asks for `range` of `digest` ahead of everything else (a reader is waiting for it).
    pub fn want(&self, digest: &Digest, range: Range<u64>) {
        self.send_want(digest, range, false);
    }

    /// Like [`Swarm::want`], for a reader that is blocked on `range` (a lazy read in a
    /// container): pieces no connected peer has are fetched upstream by this node right away,
    /// even while another node holds the back-source lease.
    pub fn need(&self, digest: &Digest, range: Range<u64>) {
        self.send_want(digest, range, true);
    }

    fn send_want(&self, digest: &Digest, range: Range<u64>, needed: bool) {
        let handle = self
            .torrents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        if let Some(h) = handle {
            let _ = h.events.try_send(Event::Want { range, needed });
        }
    }
}
