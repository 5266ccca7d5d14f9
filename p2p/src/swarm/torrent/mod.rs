//! One blob's download and seeding: an actor that owns the piece scheduler, the peer set, the
//! tracker announces and the upstream fetches for that blob.
//!
//! Connections and helper tasks report to it through [`Event`]s; it alone decides what to
//! request, so no lock guards the scheduling state. A piece's bytes reach the store before the
//! torrent hears of it (connections and upstream fetches stream them in, see `sink.rs`); the
//! torrent then commits it on the blocking pool (check the hash, sync, make it visible), which
//! reports back as an event too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

mod peers;
mod pieces;
mod upstream;

use super::SwarmCtx;
use super::conn::{self, Conn, PieceCounts, Transport};
use super::scheduler::Scheduler;
use crate::bitfield::Bitfield;
use crate::digest::Digest;
use crate::metainfo::{Metainfo, PieceHash};
use crate::store::{Blob, PieceWrite, PieceWriter, StoreError};
use crate::tracker::api::{
    AnnounceRequest, AnnounceResponse, BlobAnnounce, PublishRequest, ReportKind, ReportRequest,
    Stripe,
};
use crate::tracker::client::TrackerError;
use crate::tracker::server::COMPLETE_ANNOUNCE_FACTOR;
use crate::upstream::BlobSource;
use crate::wire::{Hello, Message, PeerId, UNKNOWN_SIZE};

/// Requests in flight to one peer: enough to keep a LAN link busy between round trips.
const PER_PEER_INFLIGHT: usize = 4;
/// Pieces held for want of a hash; beyond this they are dropped and fetched again later.
const MAX_PENDING: usize = 8;
/// How long a request to a peer may take, piece and all, before it is asked elsewhere.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const REJECT_COOLDOWN: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(200);
/// Least time between two metainfo requests to the tracker from one torrent.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(250);
/// Bad pieces a peer may send before we hang up on it for good.
const MAX_STRIKES: u32 = 2;
/// A peer that cannot be reached is retried after 1, 2, 4, 8 and 16 s, then forgotten.
const DIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_DIAL_FAILURES: u32 = 5;

/// What connections and helper tasks tell the torrent.
#[derive(Debug)]
pub(super) enum Event {
    Established {
        transport: Transport,
        hello: Hello,
        incoming: bool,
        addr: String,
    },
    Bitfield {
        conn: u64,
        bits: Bytes,
    },
    Have {
        conn: u64,
        index: u32,
    },
    /// A piece's bytes arrived from a peer and are in the store, claimed and hashed, for us to
    /// commit; `None` if the connection dropped them (not asked for, or had already), `Err` if
    /// they could not be stored.
    Piece {
        conn: u64,
        index: u32,
        piece: Option<Result<PieceWriter, StoreError>>,
    },
    Reject {
        conn: u64,
        index: u32,
    },
    Gone {
        conn: u64,
        reason: String,
    },
    DialFailed {
        addr: String,
    },
    Announced(Result<AnnounceResponse, TrackerError>),
    MetaRefreshed(Result<Option<Metainfo>, TrackerError>),
    SizeKnown(Result<u64, String>),
    /// A piece fetched upstream is in the store, to commit like a peer's; `None` if the store
    /// had it or was writing it already.
    Upstream {
        index: u32,
        result: Result<Option<PieceWriter>, String>,
    },
    /// A commit ended; the writer is back (`None` only if committing panicked), holding its
    /// claim if the hash is unknown.
    Written {
        index: u32,
        from: Option<(u64, PeerId)>,
        piece: Option<PieceWriter>,
        result: Result<PieceWrite, StoreError>,
    },
    /// A reader waits for this range (`needed`: is blocked on it, see [`Swarm::need`]).
    Want {
        range: std::ops::Range<u64>,
        needed: bool,
    },
    /// The tracker has the hashes of these upstream pieces: tell peers.
    Published(Vec<u32>),
}

/// The handle the rest of the node holds on a torrent.
#[derive(Clone, Debug)]
pub(super) struct TorrentHandle {
    pub events: mpsc::Sender<Event>,
    /// `Some(Ok)` once the blob's layout is known and it is in the store; `Err` if the
    /// torrent gave up.
    pub layout: watch::Receiver<Option<Result<(), String>>>,
}

/// A peer the tracker told us about, and how dialing it went.
struct KnownPeer {
    peer_id: PeerId,
    /// A back-sourcer or seed: dialed first, even beyond `max_conns`.
    source: bool,
    /// Not dialed again before this.
    retry_at: Instant,
    failures: u32,
}

struct Peer {
    peer_id: PeerId,
    addr: String,
    tx: mpsc::Sender<Message>,
    cancel: CancellationToken,
    has: Bitfield,
    inflight: HashMap<u32, Instant>,
    rejected: HashMap<u32, Instant>,
}

pub(super) struct Torrent {
    digest: Digest,
    source: Option<BlobSource>,
    ctx: Arc<SwarmCtx>,
    events_tx: mpsc::Sender<Event>,
    /// `Some(Ok)` once the layout is known and the blob is open in the store.
    layout_tx: watch::Sender<Option<Result<(), String>>>,
    /// Held while downloading; dropped once complete, so a seeded blob is not "in use" and the
    /// store may evict it (the torrent then ends). Connections hold their own handles.
    blob: Option<Blob>,
    size: Option<u64>,
    /// The blob left the store (evicted or removed): stop announcing and end.
    gone: bool,
    sched: Option<Scheduler>,
    /// Per-piece availability among our peers and uploads in progress, shared with connections.
    counts: Arc<PieceCounts>,
    peers: HashMap<u64, Peer>,
    next_conn: u64,
    dialing: HashSet<String>,
    /// Addresses from the tracker we may connect to.
    known: HashMap<String, KnownPeer>,
    strikes: HashMap<PeerId, u32>,
    banned: HashSet<PeerId>,
    backsource: bool,
    /// This peer's share of the pieces while it back-sources.
    stripe: Stripe,
    tracker_down: bool,
    started: Instant,
    next_announce: Instant,
    announcing: bool,
    size_query: bool,
    upstream_inflight: usize,
    /// When a reader last blocked on a piece this node lacked (a lazy read): the background
    /// fetch from upstream holds back until readers have been quiet for a while.
    last_need: Option<Instant>,
    /// Pieces whose bytes are stored (and claimed) but whose hash is not known yet.
    pending: HashMap<u32, (PieceWriter, Option<(u64, PeerId)>)>,
    refreshing: bool,
    refresh_again: bool,
    /// Upstream pieces stored but not yet published to the tracker (nor announced to peers).
    unpublished: Vec<(u32, PieceHash)>,
    publishing: bool,
    last_refresh: Option<Instant>,
    /// Pieces received with no known hash and no room to hold them: not requested again until
    /// the tracker publishes their hash.
    awaiting_hash: HashSet<u32>,
    /// Incoming connections that arrived before we knew the blob's size.
    waiting_incoming: Vec<(Transport, Hello, String)>,
}

impl Torrent {
    pub(super) fn spawn(
        ctx: Arc<SwarmCtx>,
        digest: Digest,
        source: Option<BlobSource>,
        existing: Option<Blob>,
    ) -> TorrentHandle {
        let (events_tx, events_rx) = mpsc::channel(64);
        let (layout_tx, layout_rx) = watch::channel(None);
        let mut t = Torrent {
            digest,
            source,
            ctx: ctx.clone(),
            events_tx: events_tx.clone(),
            layout_tx,
            blob: None,
            size: None,
            gone: false,
            sched: None,
            counts: Arc::new(PieceCounts::default()),
            peers: HashMap::new(),
            next_conn: 0,
            dialing: HashSet::new(),
            known: HashMap::new(),
            strikes: HashMap::new(),
            banned: HashSet::new(),
            backsource: false,
            stripe: Stripe::default(),
            tracker_down: ctx.tracker.is_none(),
            next_announce: Instant::now(),
            started: Instant::now(),
            announcing: false,
            size_query: false,
            upstream_inflight: 0,
            last_need: None,
            pending: HashMap::new(),
            refreshing: false,
            refresh_again: false,
            unpublished: Vec::new(),
            publishing: false,
            last_refresh: None,
            awaiting_hash: HashSet::new(),
            waiting_incoming: Vec::new(),
        };
        if let Some(blob) = existing {
            t.set_blob(blob);
        }
        ctx.tasks.spawn(t.run(events_rx));
        TorrentHandle {
            events: events_tx,
            layout: layout_rx,
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(TICK);
        let shutdown = self.ctx.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => self.on_tick(),
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
            }
            if self.gone {
                debug!(digest = %self.digest, "blob left the store; torrent ends");
                break;
            }
            self.schedule();
        }
        let mut links = self.ctx.links.lock().unwrap_or_else(|p| p.into_inner());
        for (id, p) in self.peers.drain() {
            p.cancel.cancel();
            self.ctx.metrics.peers_connected.dec();
            links.remove(&(self.digest, id));
        }
    }

    fn set_blob(&mut self, blob: Blob) {
        let have = blob.have();
        self.counts = Arc::new(PieceCounts::new(have.len(), self.ctx.cfg.max_uploads));
        self.sched = Some(Scheduler::new(have));
        self.size = Some(blob.size());
        self.blob = (!blob.is_complete()).then_some(blob);
        self.layout_tx.send_replace(Some(Ok(())));
        for (transport, hello, addr) in std::mem::take(&mut self.waiting_incoming) {
            self.establish(transport, hello, true, addr);
        }
    }

    /// Learns the blob's layout (from the tracker, a peer, or upstream) and opens it in the store.
    fn learn_layout(&mut self, meta: &Metainfo) {
        if self.complete() {
            return;
        }
        if let Some(blob) = &self.blob {
            if let Err(e) = blob.learn_hashes(meta) {
                warn!(digest = %self.digest, error = %e, "tracker metainfo conflicts with ours");
            }
            return;
        }
        match self.ctx.store.open_blob(meta) {
            Ok(blob) => self.set_blob(blob),
            Err(e) => self.fail(format!("opening {} in the store: {e}", self.digest)),
        }
    }

    fn fail(&mut self, why: String) {
        warn!(digest = %self.digest, %why, "torrent failed");
        self.layout_tx.send_replace(Some(Err(why)));
    }

    fn complete(&self) -> bool {
        self.sched.as_ref().is_some_and(Scheduler::is_complete)
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.complete() && self.ctx.store.get(&self.digest).is_none() {
            self.gone = true;
            return;
        }
        // Nobody (peer, tracker or upstream) could say what this blob is: stop asking. Asking
        // about unknown digests (containerd's Info with remote content) must not leave a torrent
        // behind each time.
        let give_up = Duration::from_millis(self.ctx.cfg.layout_timeout_ms) * 3;
        if self.size.is_none() && now.duration_since(self.started) > give_up {
            self.fail(format!(
                "no peer, tracker or upstream knew {} for {give_up:?}",
                self.digest
            ));
            self.gone = true;
            return;
        }
        if self.refresh_again && !self.refreshing {
            self.refresh_again = false;
            self.refresh_metainfo();
        }
        if !self.announcing && now >= self.next_announce {
            self.announce();
        }
        // Requests that took too long go back in the pool.
        for peer in self.peers.values_mut() {
            let expired: Vec<u32> = peer
                .inflight
                .iter()
                .filter(|(_, t)| now - **t > REQUEST_TIMEOUT)
                .map(|(i, _)| *i)
                .collect();
            for i in expired {
                debug!(index = i, peer = %peer.addr, "request timed out; asking elsewhere");
                peer.inflight.remove(&i);
                let _ = peer.tx.try_send(Message::Cancel(i));
                if let Some(s) = self.sched.as_mut() {
                    s.request_done(i);
                }
            }
            peer.rejected.retain(|_, t| now - *t < REJECT_COOLDOWN);
        }
    }

    fn announce(&mut self) {
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        self.announcing = true;
        let req = AnnounceRequest {
            peer_id: self.ctx.peer_id,
            addr: self.ctx.advertise.clone(),
            seed: self.ctx.cfg.seed,
            blob: Some(BlobAnnounce {
                digest: self.digest,
                size: self.size,
                complete: self.complete(),
                source: self.source.clone(),
            }),
        };
        let tx = self.events_tx.clone();
        self.ctx.tasks.spawn(async move {
            let _ = tx
                .send(Event::Announced(tracker.announce(&req).await))
                .await;
        });
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Established {
                transport,
                hello,
                incoming,
                addr,
            } => self.establish(transport, hello, incoming, addr),
            Event::DialFailed { addr } => {
                self.dialing.remove(&addr);
                if let Some(k) = self.known.get_mut(&addr) {
                    k.failures += 1;
                    if k.failures > MAX_DIAL_FAILURES {
                        // Gone for good, as far as we can tell; the tracker re-lists it if not.
                        self.known.remove(&addr);
                    } else {
                        k.retry_at = Instant::now() + DIAL_BACKOFF * 2u32.pow(k.failures);
                    }
                }
            }
            Event::Bitfield { conn, bits } => self.on_bitfield(conn, &bits),
            Event::Have { conn, index } => {
                if let (Some(p), Some(s)) = (self.peers.get_mut(&conn), self.sched.as_mut())
                    && p.has.set(index)
                {
                    s.peer_has(index);
                    self.counts.add_avail(index, 1);
                }
            }
            Event::Piece { conn, index, piece } => self.on_piece(conn, index, piece),
            Event::Reject { conn, index } => {
                if let Some(p) = self.peers.get_mut(&conn)
                    && p.inflight.remove(&index).is_some()
                {
                    trace!(index, peer = %p.addr, "request rejected");
                    p.rejected.insert(index, Instant::now());
                    if let Some(s) = self.sched.as_mut() {
                        s.request_done(index);
                    }
                }
            }
            Event::Gone { conn, reason } => self.drop_peer(conn, &reason),
            Event::Announced(res) => self.on_announced(res),
            Event::MetaRefreshed(res) => self.on_refreshed(res),
            Event::SizeKnown(res) => {
                self.size_query = false;
                match res
                    .map_err(|e| e.to_string())
                    .and_then(|size| Metainfo::empty(self.digest, size).map_err(|e| e.to_string()))
                {
                    Ok(meta) => self.learn_layout(&meta),
                    Err(e) => {
                        warn!(digest = %self.digest, error = %e, "asking upstream for the blob size")
                    }
                }
            }
            Event::Upstream { index, result } => {
                self.upstream_inflight -= 1;
                if let Some(s) = self.sched.as_mut() {
                    s.request_done(index);
                }
                match result {
                    Ok(Some(piece)) => {
                        self.ctx
                            .metrics
                            .bytes_from_upstream
                            .inc_by(piece.len() as u64);
                        self.write(piece, None);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(digest = %self.digest, index, error = %e, "fetching piece upstream")
                    }
                }
            }
            Event::Written {
                index,
                from,
                piece,
                result,
            } => self.on_written(index, from, piece, result),
            Event::Published(pieces) => {
                self.publishing = false;
                self.announce_have(&pieces);
                self.publish_hashes();
            }
            Event::Want { range, needed } => {
                if needed {
                    self.last_need = Some(Instant::now());
                }
                if let (Some(b), Some(s)) = (&self.blob, self.sched.as_mut()) {
                    s.prioritize(b.layout().pieces_for(range), needed);
                }
            }
        }
    }

    fn on_announced(&mut self, res: Result<AnnounceResponse, TrackerError>) {
        self.announcing = false;
        let now = Instant::now();
        match res {
            Ok(resp) => {
                self.tracker_down = false;
                let interval = Duration::from_millis(resp.interval_ms.clamp(100, 60_000));
                self.next_announce = now
                    + if self.complete() {
                        interval * COMPLETE_ANNOUNCE_FACTOR
                    } else {
                        interval
                    };
                if let Some(meta) = &resp.metainfo
                    && meta.digest == self.digest
                {
                    self.learn_layout(meta);
                    if !self.pending.is_empty() || !self.awaiting_hash.is_empty() {
                        self.on_refreshed(Ok(None));
                    }
                }
                if self.complete() && !resp.metainfo.as_ref().is_some_and(Metainfo::is_complete) {
                    self.publish_all_hashes();
                }
                self.backsource = resp.backsource;
                self.stripe = resp.stripe;
                for p in resp.peers {
                    if p.peer_id != self.ctx.peer_id && !self.banned.contains(&p.peer_id) {
                        self.known
                            .entry(p.addr)
                            .or_insert(KnownPeer {
                                peer_id: p.peer_id,
                                source: false,
                                retry_at: now,
                                failures: 0,
                            })
                            .source = p.backsource || p.seed;
                    }
                }
            }
            Err(e) => {
                if !self.tracker_down {
                    warn!(digest = %self.digest, error = %e, "tracker unreachable: using known peers and upstream");
                }
                self.tracker_down = true;
                self.next_announce = now + Duration::from_secs(2);
            }
        }
    }

    /// Starts whatever work is due: connections, requests to peers, upstream fetches.
    fn schedule(&mut self) {
        self.dial_peers();
        if self.size.is_none() {
            if (self.backsource || self.tracker_down) && !self.size_query {
                self.query_size();
            }
            return;
        }
        self.request_from_peers();
        self.fetch_upstream();
    }
}
