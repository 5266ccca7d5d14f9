//! The torrent's peers: handshakes, the one-connection-per-peer rule, bitfields, dialing,
//! and handing each peer requests from the scheduler.

use rand::seq::SliceRandom;

use super::*;

impl Torrent {
    pub(super) fn establish(
        &mut self,
        transport: Transport,
        hello: Hello,
        incoming: bool,
        addr: String,
    ) {
        self.dialing.remove(&addr);
        if let Some(k) = self.known.get_mut(&addr) {
            k.failures = 0;
        }
        // We dial at most `max_conns`; others may dial us too, but not without bound.
        let full = incoming && self.peers.len() >= 2 * self.ctx.cfg.max_conns;
        if full
            || hello.digest != self.digest
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

    pub(super) fn add_peer(
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
            counts: self.counts.clone(),
            ctx: self.ctx.clone(),
            cancel: cancel.clone(),
        };
        self.ctx.tasks.spawn(conn.run(transport));
        self.ctx.metrics.peers_connected.inc();
        self.ctx
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((self.digest, id), (hello.peer_id, addr.clone()));
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

    pub(super) fn hello(&self) -> Hello {
        Hello {
            peer_id: self.ctx.peer_id,
            digest: self.digest,
            size: self.size.unwrap_or(UNKNOWN_SIZE),
            source: self.source.clone(),
        }
    }

    pub(super) fn on_bitfield(&mut self, conn: u64, bits: &[u8]) {
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
            self.counts.add_avail(i, -1);
        }
        s.peer_added(&has);
        for i in has.iter_ones() {
            self.counts.add_avail(i, 1);
        }
        peer.has = has;
    }

    pub(super) fn drop_peer(&mut self, conn: u64, reason: &str) {
        let Some(peer) = self.peers.remove(&conn) else {
            return;
        };
        debug!(digest = ?self.digest, peer = ?peer.peer_id, addr = %peer.addr, reason, "dropping peer");
        peer.cancel.cancel();
        self.ctx.metrics.peers_connected.dec();
        self.ctx
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.digest, conn));
        if let Some(s) = self.sched.as_mut() {
            s.peer_removed(&peer.has);
            for i in peer.has.iter_ones() {
                self.counts.add_avail(i, -1);
            }
            for i in peer.inflight.keys() {
                s.request_done(*i);
            }
        }
    }

    pub(super) fn dial_peers(&mut self) {
        if self.complete() {
            return;
        }
        let connected: HashSet<PeerId> = self.peers.values().map(|p| p.peer_id).collect();
        let now = Instant::now();
        let mut candidates: Vec<(bool, String)> = self
            .known
            .iter()
            .filter(|(addr, k)| {
                !connected.contains(&k.peer_id)
                    && !self.dialing.contains(*addr)
                    && k.retry_at <= now
            })
            .map(|(a, k)| (k.source, a.clone()))
            .collect();
        // Sources first; they are dialed even when we are otherwise at our connection limit.
        candidates.sort_by_key(|(source, _)| !*source);
        for (source, addr) in candidates {
            if !source && self.peers.len() + self.dialing.len() >= self.ctx.cfg.max_conns {
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

    pub(super) fn request_from_peers(&mut self) {
        let Some(s) = self.sched.as_mut() else { return };
        let mut total: usize = self.peers.values().map(|p| p.inflight.len()).sum();
        let awaiting = &self.awaiting_hash;
        // A different order each time, so the first peers in the map do not get every request.
        let mut order: Vec<u64> = self.peers.keys().copied().collect();
        order.shuffle(&mut rand::rng());
        for id in order {
            let Some(peer) = self.peers.get_mut(&id) else {
                continue;
            };
            while peer.inflight.len() < PER_PEER_INFLIGHT && total < self.ctx.cfg.max_inflight {
                let Some(i) = s.pick_for_peer(&peer.has, |i| {
                    peer.inflight.contains_key(&i)
                        || peer.rejected.contains_key(&i)
                        || awaiting.contains(&i)
                }) else {
                    break;
                };
                if peer.tx.try_send(Message::Request(i)).is_err() {
                    break;
                }
                trace!(index = i, peer = %peer.addr, "requested");
                s.requested(i);
                peer.inflight.insert(i, Instant::now());
                total += 1;
            }
        }
    }
}
