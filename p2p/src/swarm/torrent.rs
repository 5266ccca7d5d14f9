//! One blob's download and seeding: an actor that owns the piece scheduler, the peer set, the
//! tracker announces and the upstream fetches for that blob.
//!
//! Connections and helper tasks report to it through [`Event`]s; it alone decides what to
//! request, so no lock guards the scheduling state. Blocking work (writing and hashing pieces)
//! runs on the blocking pool and reports back as events too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::conn::{self, Conn, Transport};
use super::scheduler::Scheduler;
use super::{SwarmCtx, SwarmError};
use crate::bitfield::Bitfield;
use crate::digest::Digest;
use crate::metainfo::{Metainfo, PieceHash};
use crate::store::{Blob, PieceWrite, StoreError};
use crate::tracker::api::{
    AnnounceRequest, AnnounceResponse, BlobAnnounce, PublishRequest, ReportKind, ReportRequest,
};
use crate::tracker::client::TrackerError;
use crate::upstream::BlobSource;
use crate::wire::{Hello, Message, PeerId, UNKNOWN_SIZE};

/// Requests in flight to one peer: enough to keep a LAN link busy between round trips.
const PER_PEER_INFLIGHT: usize = 4;
/// Pieces held for want of a hash; beyond this they are dropped and fetched again later.
const MAX_PENDING: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const REJECT_COOLDOWN: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(200);
/// Bad pieces a peer may send before we hang up on it for good.
const MAX_STRIKES: u32 = 2;

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
    Piece {
        conn: u64,
        index: u32,
        data: Bytes,
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
    Upstream {
        index: u32,
        result: Result<Bytes, String>,
    },
    Written {
        index: u32,
        from: Option<(u64, PeerId)>,
        data: Bytes,
        result: Result<PieceWrite, StoreError>,
    },
    Want(std::ops::Range<u64>),
}

/// The handle the rest of the node holds on a torrent.
#[derive(Clone, Debug)]
pub(super) struct TorrentHandle {
    pub events: mpsc::Sender<Event>,
    /// `Some(Ok)` once the blob's layout is known and it is in the store; `Err` if the
    /// torrent gave up.
    pub layout: watch::Receiver<Option<Result<(), String>>>,
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
    avail: Arc<Vec<AtomicU16>>,
    peers: HashMap<u64, Peer>,
    next_conn: u64,
    dialing: HashSet<String>,
    /// Addresses from the tracker we may connect to.
    known: HashMap<String, PeerId>,
    strikes: HashMap<PeerId, u32>,
    banned: HashSet<PeerId>,
    backsource: bool,
    tracker_down: bool,
    next_announce: Instant,
    announcing: bool,
    size_query: bool,
    upstream_inflight: usize,
    pending: HashMap<u32, (Bytes, Option<(u64, PeerId)>)>,
    writing: HashSet<u32>,
    refreshing: bool,
    refresh_again: bool,
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
            avail: Arc::new(Vec::new()),
            peers: HashMap::new(),
            next_conn: 0,
            dialing: HashSet::new(),
            known: HashMap::new(),
            strikes: HashMap::new(),
            banned: HashSet::new(),
            backsource: false,
            tracker_down: ctx.tracker.is_none(),
            next_announce: Instant::now(),
            announcing: false,
            size_query: false,
            upstream_inflight: 0,
            pending: HashMap::new(),
            writing: HashSet::new(),
            refreshing: false,
            refresh_again: false,
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
        for p in self.peers.values() {
            p.cancel.cancel();
        }
    }

    fn set_blob(&mut self, blob: Blob) {
        let have = blob.have();
        self.avail = Arc::new((0..have.len()).map(|_| AtomicU16::new(0)).collect());
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
            }
            Event::Bitfield { conn, bits } => self.on_bitfield(conn, &bits),
            Event::Have { conn, index } => {
                if let (Some(p), Some(s)) = (self.peers.get_mut(&conn), self.sched.as_mut())
                    && p.has.set(index)
                {
                    s.peer_has(index);
                    self.avail[index as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Piece { conn, index, data } => self.on_piece(conn, index, data),
            Event::Reject { conn, index } => {
                if let Some(p) = self.peers.get_mut(&conn)
                    && p.inflight.remove(&index).is_some()
                {
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
                    Ok(data) => {
                        self.ctx
                            .metrics
                            .bytes_from_upstream
                            .inc_by(data.len() as u64);
                        self.write(index, data, None);
                    }
                    Err(e) => {
                        warn!(digest = %self.digest, index, error = %e, "fetching piece upstream")
                    }
                }
            }
            Event::Written {
                index,
                from,
                data,
                result,
            } => self.on_written(index, from, data, result),
            Event::Want(range) => {
                if let (Some(b), Some(s)) = (&self.blob, self.sched.as_mut()) {
                    s.prioritize(b.metainfo().pieces_for(range));
                }
            }
        }
    }

    fn establish(&mut self, transport: Transport, hello: Hello, incoming: bool, addr: String) {
        self.dialing.remove(&addr);
        if hello.digest != self.digest
            || hello.peer_id == self.ctx.peer_id
            || self.banned.contains(&hello.peer_id)
        {
            return;
        }
        // One connection per peer: the one opened by the smaller id wins a race.
        if let Some((&old, _)) = self.peers.iter().find(|(_, p)| p.peer_id == hello.peer_id) {
            let opener_is_smaller = if incoming {
                hello.peer_id < self.ctx.peer_id
            } else {
                self.ctx.peer_id < hello.peer_id
            };
            if !opener_is_smaller {
                return;
            }
            self.drop_peer(old, "replaced by a simultaneous connection");
        }
        if self.size.is_none() {
            if hello.size != UNKNOWN_SIZE {
                match Metainfo::empty(self.digest, hello.size) {
                    Ok(meta) => self.learn_layout(&meta),
                    Err(e) => {
                        debug!(peer = ?hello.peer_id, error = %e, "peer sent an absurd size");
                        return;
                    }
                }
            } else if incoming {
                // We will answer once we know the size; a seed is finding out.
                if self.waiting_incoming.len() < 64 {
                    self.waiting_incoming.push((transport, hello, addr));
                }
                return;
            } else {
                return;
            }
        }
        let Some(blob) = self
            .blob
            .clone()
            .or_else(|| self.ctx.store.get(&self.digest))
        else {
            self.gone = true;
            return;
        };
        // The accepting side answers the hello only now, with the size it knows.
        let greet = incoming.then(|| self.hello());
        self.add_peer(transport, hello, addr, blob, greet);
    }

    fn add_peer(
        &mut self,
        transport: Transport,
        hello: Hello,
        addr: String,
        blob: Blob,
        greet: Option<Hello>,
    ) {
        let (tx, rx) = mpsc::channel(32);
        let id = self.next_conn;
        self.next_conn += 1;
        let have = blob.have();
        if let Some(ours) = greet {
            let _ = tx.try_send(Message::Hello(ours));
        }
        let _ = tx.try_send(Message::Bitfield(Bytes::from(have.to_bytes())));
        let cancel = self.ctx.shutdown.child_token();
        let conn = Conn {
            id,
            peer_id: hello.peer_id,
            blob: blob.clone(),
            events: self.events_tx.clone(),
            outbox: rx,
            reply: tx.clone(),
            avail: self.avail.clone(),
            ctx: self.ctx.clone(),
            cancel: cancel.clone(),
        };
        self.ctx.tasks.spawn(conn.run(transport));
        self.ctx.metrics.peers_connected.inc();
        self.peers.insert(
            id,
            Peer {
                peer_id: hello.peer_id,
                addr,
                tx,
                cancel,
                has: Bitfield::new(have.len()),
                inflight: HashMap::new(),
                rejected: HashMap::new(),
            },
        );
    }

    fn hello(&self) -> Hello {
        Hello {
            peer_id: self.ctx.peer_id,
            digest: self.digest,
            size: self.size.unwrap_or(UNKNOWN_SIZE),
            source: self.source.clone(),
        }
    }

    fn on_bitfield(&mut self, conn: u64, bits: &[u8]) {
        let Some(s) = self.sched.as_mut() else { return };
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        let Some(has) = Bitfield::from_bytes(bits, s.have().len()) else {
            self.drop_peer(conn, "malformed bitfield");
            return;
        };
        s.peer_removed(&peer.has);
        for i in peer.has.iter_ones() {
            self.avail[i as usize].fetch_sub(1, Ordering::Relaxed);
        }
        s.peer_added(&has);
        for i in has.iter_ones() {
            self.avail[i as usize].fetch_add(1, Ordering::Relaxed);
        }
        peer.has = has;
    }

    fn drop_peer(&mut self, conn: u64, reason: &str) {
        let Some(peer) = self.peers.remove(&conn) else {
            return;
        };
        debug!(digest = ?self.digest, peer = ?peer.peer_id, addr = %peer.addr, reason, "dropping peer");
        peer.cancel.cancel();
        self.ctx.metrics.peers_connected.dec();
        if let Some(s) = self.sched.as_mut() {
            s.peer_removed(&peer.has);
            for i in peer.has.iter_ones() {
                self.avail[i as usize].fetch_sub(1, Ordering::Relaxed);
            }
            for i in peer.inflight.keys() {
                s.request_done(*i);
            }
        }
    }

    fn on_piece(&mut self, conn: u64, index: u32, data: Bytes) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        if peer.inflight.remove(&index).is_none() {
            self.ctx.metrics.pieces_wasted.inc();
            return;
        }
        let from = Some((conn, peer.peer_id));
        if let Some(s) = self.sched.as_mut() {
            s.request_done(index);
        }
        if self.sched.as_ref().is_some_and(|s| s.have().get(index)) || self.writing.contains(&index)
        {
            self.ctx.metrics.pieces_wasted.inc();
            return;
        }
        self.write(index, data, from);
    }

    /// Hands a piece to the store on the blocking pool; the result comes back as `Written`.
    fn write(&mut self, index: u32, data: Bytes, from: Option<(u64, PeerId)>) {
        let Some(blob) = self.blob.clone() else {
            return;
        };
        self.writing.insert(index);
        // Not requested, not had: without this mark the piece would be fetched again meanwhile.
        if let Some(s) = self.sched.as_mut() {
            s.set_pending(index, true);
        }
        let tx = self.events_tx.clone();
        self.ctx.tasks.spawn(async move {
            let d = data.clone();
            let result =
                tokio::task::spawn_blocking(move || blob.write_piece(index, &d, from.is_none()))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Corrupt(format!("piece writer panicked: {e}")))
                    });
            let _ = tx
                .send(Event::Written {
                    index,
                    from,
                    data,
                    result,
                })
                .await;
        });
    }

    fn on_written(
        &mut self,
        index: u32,
        from: Option<(u64, PeerId)>,
        data: Bytes,
        result: Result<PieceWrite, StoreError>,
    ) {
        self.writing.remove(&index);
        if let Some(s) = self.sched.as_mut() {
            s.set_pending(index, false);
        }
        match result {
            Ok(PieceWrite::Added) => {
                if from.is_some() {
                    self.ctx.metrics.bytes_from_peers.inc_by(data.len() as u64);
                }
                if let Some(s) = self.sched.as_mut() {
                    s.got(index);
                }
                for p in self.peers.values_mut() {
                    let _ = p.tx.try_send(Message::Have(index));
                    if p.inflight.remove(&index).is_some() {
                        let _ = p.tx.try_send(Message::Cancel(index));
                        if let Some(s) = self.sched.as_mut() {
                            s.request_done(index);
                        }
                    }
                }
                if self.complete() {
                    info!(digest = %self.digest, "blob complete and verified");
                    self.ctx.metrics.blobs_completed.inc();
                    self.blob = None;
                    self.backsource = false;
                    self.next_announce = Instant::now();
                }
            }
            Ok(PieceWrite::Duplicate) => {
                self.ctx.metrics.pieces_wasted.inc();
            }
            Ok(PieceWrite::HashUnknown) => {
                if self.pending.len() < MAX_PENDING {
                    self.pending.insert(index, (data, from));
                    if let Some(s) = self.sched.as_mut() {
                        s.set_pending(index, true);
                    }
                }
                self.refresh_metainfo();
            }
            Err(StoreError::PieceMismatch { .. }) | Err(StoreError::PieceLength { .. }) => {
                self.ctx.metrics.verification_failures.inc();
                let culprit = from.map(|(_, id)| id);
                warn!(digest = %self.digest, index, ?culprit, "piece failed verification; fetching it elsewhere");
                self.report(ReportKind::BadPiece, culprit);
                if let Some((conn, id)) = from {
                    let strikes = self.strikes.entry(id).or_default();
                    *strikes += 1;
                    if *strikes >= MAX_STRIKES {
                        self.banned.insert(id);
                        self.drop_peer(conn, "sent pieces that fail verification");
                    }
                }
            }
            Err(e @ StoreError::DigestMismatch { .. }) => {
                self.ctx.metrics.verification_failures.inc();
                self.report(ReportKind::BadBlob, None);
                self.fail(e.to_string());
            }
            Err(e) => warn!(digest = %self.digest, index, error = %e, "storing piece"),
        }
    }

    fn report(&self, kind: ReportKind, culprit: Option<PeerId>) {
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        let req = ReportRequest {
            reporter: self.ctx.peer_id,
            digest: self.digest,
            kind,
            culprit,
        };
        self.ctx.tasks.spawn(async move {
            if let Err(e) = tracker.report(&req).await {
                debug!(error = %e, "reporting to tracker");
            }
        });
    }

    fn refresh_metainfo(&mut self) {
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        if self.refreshing {
            self.refresh_again = true;
            return;
        }
        self.refreshing = true;
        let (tx, digest) = (self.events_tx.clone(), self.digest);
        self.ctx.tasks.spawn(async move {
            let _ = tx
                .send(Event::MetaRefreshed(tracker.metainfo(&digest).await))
                .await;
        });
    }

    fn on_refreshed(&mut self, res: Result<Option<Metainfo>, TrackerError>) {
        self.refreshing = false;
        match res {
            Ok(Some(meta)) => self.learn_layout(&meta),
            Ok(None) => {}
            Err(e) => debug!(error = %e, "refreshing metainfo"),
        }
        let known = self.blob.as_ref().map(Blob::metainfo);
        let ready: Vec<u32> = self
            .pending
            .keys()
            .copied()
            .filter(|i| {
                known
                    .as_ref()
                    .is_some_and(|m| m.pieces[*i as usize].is_some())
            })
            .collect();
        for index in ready {
            if let Some((data, from)) = self.pending.remove(&index) {
                if let Some(s) = self.sched.as_mut() {
                    s.set_pending(index, false);
                }
                self.write(index, data, from);
            }
        }
        if std::mem::take(&mut self.refresh_again) && !self.pending.is_empty() {
            self.refresh_metainfo();
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
                        interval * 5
                    } else {
                        interval
                    };
                if let Some(meta) = &resp.metainfo
                    && meta.digest == self.digest
                {
                    self.learn_layout(meta);
                    if !self.pending.is_empty() {
                        self.on_refreshed(Ok(None));
                    }
                }
                self.backsource = resp.backsource;
                for p in resp.peers {
                    if p.peer_id != self.ctx.peer_id && !self.banned.contains(&p.peer_id) {
                        self.known.insert(p.addr, p.peer_id);
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

    fn dial_peers(&mut self) {
        if self.complete() {
            return;
        }
        let connected: HashSet<PeerId> = self.peers.values().map(|p| p.peer_id).collect();
        let candidates: Vec<(String, PeerId)> = self
            .known
            .iter()
            .filter(|(addr, id)| !connected.contains(id) && !self.dialing.contains(*addr))
            .map(|(a, id)| (a.clone(), *id))
            .collect();
        for (addr, _) in candidates {
            if self.peers.len() + self.dialing.len() >= self.ctx.cfg.max_conns {
                break;
            }
            self.dialing.insert(addr.clone());
            let hello = self.hello();
            let tx = self.events_tx.clone();
            self.ctx.tasks.spawn(async move {
                let ev = match conn::dial(&addr, hello).await {
                    Ok((transport, hello)) => Event::Established {
                        transport,
                        hello,
                        incoming: false,
                        addr,
                    },
                    Err(e) => {
                        debug!(%addr, error = %e, "dialing peer");
                        Event::DialFailed { addr }
                    }
                };
                let _ = tx.send(ev).await;
            });
        }
    }

    fn request_from_peers(&mut self) {
        let Some(s) = self.sched.as_mut() else { return };
        let mut total: usize = self.peers.values().map(|p| p.inflight.len()).sum();
        for peer in self.peers.values_mut() {
            while peer.inflight.len() < PER_PEER_INFLIGHT && total < self.ctx.cfg.max_inflight {
                let Some(i) = s.pick_for_peer(&peer.has, |i| {
                    peer.inflight.contains_key(&i) || peer.rejected.contains_key(&i)
                }) else {
                    break;
                };
                if peer.tx.try_send(Message::Request(i)).is_err() {
                    break;
                }
                s.requested(i);
                peer.inflight.insert(i, Instant::now());
                total += 1;
            }
        }
    }

    fn may_backsource(&self) -> bool {
        self.source.is_some()
            && (self.backsource || (self.tracker_down && self.ctx.cfg.fallback_to_upstream))
    }

    fn query_size(&mut self) {
        let Some(source) = self.source.clone() else {
            return;
        };
        self.size_query = true;
        let (tx, upstream, digest) = (
            self.events_tx.clone(),
            self.ctx.upstream.clone(),
            self.digest,
        );
        self.ctx.tasks.spawn(async move {
            let res = upstream
                .blob_size(&source, &digest)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Event::SizeKnown(res)).await;
        });
    }

    fn fetch_upstream(&mut self) {
        if !self.may_backsource() {
            return;
        }
        let (Some(s), Some(blob), Some(source)) =
            (self.sched.as_mut(), self.blob.clone(), self.source.clone())
        else {
            return;
        };
        while self.upstream_inflight < self.ctx.cfg.upstream_concurrency {
            let Some(index) = s.pick_for_upstream() else {
                break;
            };
            s.requested(index);
            self.upstream_inflight += 1;
            let meta = blob.metainfo();
            let range = meta.piece_range(index);
            let (tx, ctx, digest, source) = (
                self.events_tx.clone(),
                self.ctx.clone(),
                self.digest,
                source.clone(),
            );
            self.ctx.tasks.spawn(async move {
                let result =
                    fetch_and_publish(&ctx, &source, digest, meta.size, index, range).await;
                let _ = tx.send(Event::Upstream { index, result }).await;
            });
        }
    }
}

/// Fetches one piece upstream and publishes its hash to the tracker before anyone can ask us
/// for it, so peers that receive it can always verify it.
async fn fetch_and_publish(
    ctx: &SwarmCtx,
    source: &BlobSource,
    digest: Digest,
    size: u64,
    index: u32,
    range: std::ops::Range<u64>,
) -> Result<Bytes, String> {
    let data = ctx
        .upstream
        .fetch_range(source, &digest, range)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(tracker) = &ctx.tracker {
        let req = PublishRequest {
            peer_id: ctx.peer_id,
            size,
            pieces: vec![(index, PieceHash::of(&data))],
        };
        if let Err(e) = tracker.publish(&digest, &req).await {
            debug!(%digest, index, error = %e, "publishing piece hash");
        }
    }
    Ok(data)
}

impl From<TrackerError> for SwarmError {
    fn from(e: TrackerError) -> Self {
        SwarmError::Tracker(e.to_string())
    }
}
