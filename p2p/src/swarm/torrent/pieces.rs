//! Pieces arriving: committing them (their bytes are already in the store, see `sink.rs`) on
//! the blocking pool, holding those whose hash is not yet published, and dealing with pieces
//! that fail verification.

use super::*;

impl Torrent {
    pub(super) fn on_piece(
        &mut self,
        conn: u64,
        index: u32,
        piece: Option<Result<PieceWriter, StoreError>>,
    ) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        let from = Some((conn, peer.peer_id));
        if peer.inflight.remove(&index).is_some()
            && let Some(s) = self.sched.as_mut()
        {
            s.request_done(index);
        }
        match piece {
            Some(Ok(piece)) => {
                trace!(index, from = %peer.addr, "piece received");
                self.write(piece, from)
            }
            Some(Err(e)) => self.on_written(index, from, None, Err(e)),
            None => {
                self.ctx.metrics.pieces_wasted.inc();
            }
        }
    }

    /// Commits a stored piece on the blocking pool; the result comes back as `Written`.
    pub(super) fn write(&mut self, mut piece: PieceWriter, from: Option<(u64, PeerId)>) {
        let index = piece.index();
        // Not requested, not had: without this mark the piece would be fetched again meanwhile.
        if let Some(s) = self.sched.as_mut() {
            s.set_pending(index, true);
        }
        let tx = self.events_tx.clone();
        self.ctx.tasks.spawn(async move {
            let (piece, result) = tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let result = piece.commit(from.is_none());
                trace!(
                    index,
                    ms = start.elapsed().as_millis() as u64,
                    "piece committed"
                );
                (Some(piece), result)
            })
            .await
            .unwrap_or_else(|e| {
                let e = StoreError::Corrupt(format!("piece writer panicked: {e}"));
                (None, Err(e))
            });
            let _ = tx
                .send(Event::Written {
                    index,
                    from,
                    piece,
                    result,
                })
                .await;
        });
    }

    pub(super) fn on_written(
        &mut self,
        index: u32,
        from: Option<(u64, PeerId)>,
        piece: Option<PieceWriter>,
        result: Result<PieceWrite, StoreError>,
    ) {
        if let Some(s) = self.sched.as_mut() {
            s.set_pending(index, false);
        }
        match result {
            Ok(PieceWrite::Added) => {
                let peer = from.and_then(|(conn, _)| self.peers.get(&conn));
                trace!(
                    index,
                    from = peer.map_or("upstream", |p| p.addr.as_str()),
                    "piece added"
                );
                if from.is_some() {
                    let len = piece.as_ref().map_or(0, PieceWriter::len);
                    self.ctx.metrics.bytes_from_peers.inc_by(len as u64);
                }
                if let Some(s) = self.sched.as_mut() {
                    s.got(index);
                }
                for p in self.peers.values_mut() {
                    if p.inflight.remove(&index).is_some() {
                        let _ = p.tx.try_send(Message::Cancel(index));
                        if let Some(s) = self.sched.as_mut() {
                            s.request_done(index);
                        }
                    }
                }
                let hash = piece.as_ref().and_then(PieceWriter::hash);
                if let (None, Some(_), Some(hash)) = (from, &self.ctx.tracker, hash) {
                    // From upstream: peers hear of it once its hash is published.
                    self.unpublished.push((index, hash));
                    self.publish_hashes();
                } else {
                    self.announce_have(&[index]);
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
                trace!(index, "piece held until its hash is published");
                match piece {
                    Some(piece) if self.pending.len() < MAX_PENDING => {
                        self.pending.insert(index, (piece, from));
                        if let Some(s) = self.sched.as_mut() {
                            s.set_pending(index, true);
                        }
                    }
                    // No room to hold it: do not ask for it again until its hash is known.
                    _ => {
                        self.awaiting_hash.insert(index);
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

    pub(super) fn report(&self, kind: ReportKind, culprit: Option<PeerId>) {
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

    pub(super) fn refresh_metainfo(&mut self) {
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        let recent = self
            .last_refresh
            .is_some_and(|t| t.elapsed() < MIN_REFRESH_INTERVAL);
        if self.refreshing || recent {
            // `on_tick` asks again once the current request is answered and enough time passed.
            self.refresh_again = true;
            return;
        }
        self.refreshing = true;
        self.last_refresh = Some(Instant::now());
        let (tx, digest) = (self.events_tx.clone(), self.digest);
        self.ctx.tasks.spawn(async move {
            let _ = tx
                .send(Event::MetaRefreshed(tracker.metainfo(&digest).await))
                .await;
        });
    }

    pub(super) fn on_refreshed(&mut self, res: Result<Option<Metainfo>, TrackerError>) {
        self.refreshing = false;
        match res {
            Ok(Some(meta)) => self.learn_layout(&meta),
            Ok(None) => {}
            Err(e) => debug!(error = %e, "refreshing metainfo"),
        }
        let known = self.blob.as_ref().map(Blob::metainfo);
        if let Some(m) = &known {
            self.awaiting_hash
                .retain(|i| m.pieces[*i as usize].is_none());
        }
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
            if let Some((piece, from)) = self.pending.remove(&index) {
                if let Some(s) = self.sched.as_mut() {
                    s.set_pending(index, false);
                }
                self.write(piece, from);
            }
        }
        if self.pending.is_empty() && self.awaiting_hash.is_empty() {
            self.refresh_again = false;
        }
    }

    /// Tells every peer we have these pieces.
    pub(super) fn announce_have(&mut self, pieces: &[u32]) {
        for p in self.peers.values() {
            for &index in pieces {
                let _ = p.tx.try_send(Message::Have(index));
            }
        }
    }

    /// Publishes the hashes of pieces fetched upstream, in batches, one request at a time; the
    /// pieces are announced to peers when the tracker has their hashes (`Event::Published`).
    /// The upstream fetches never wait for this.
    pub(super) fn publish_hashes(&mut self) {
        if self.publishing || self.unpublished.is_empty() {
            return;
        }
        let Some(tracker) = self.ctx.tracker.clone() else {
            return;
        };
        let Some(size) = self.size else { return };
        self.publishing = true;
        let pieces = std::mem::take(&mut self.unpublished);
        let indices: Vec<u32> = pieces.iter().map(|(i, _)| *i).collect();
        trace!(pieces = ?indices, "publishing piece hashes");
        let req = PublishRequest {
            peer_id: self.ctx.peer_id,
            size,
            pieces,
        };
        let (tx, digest) = (self.events_tx.clone(), self.digest);
        self.ctx.tasks.spawn(async move {
            if let Err(e) = tracker.publish(&digest, &req).await {
                debug!(%digest, error = %e, "publishing piece hashes");
            }
            let _ = tx.send(Event::Published(indices)).await;
        });
    }

    /// A peer that has the whole blob but whose tracker lacks its hashes (the blob arrived by
    /// another door) publishes them, so other peers can verify what it serves.
    pub(super) fn publish_all_hashes(&self) {
        let (Some(tracker), Some(blob)) =
            (self.ctx.tracker.clone(), self.ctx.store.get(&self.digest))
        else {
            return;
        };
        let meta = blob.metainfo();
        let pieces: Vec<_> = meta
            .pieces
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some((i as u32, (*h)?)))
            .collect();
        let req = PublishRequest {
            peer_id: self.ctx.peer_id,
            size: meta.size,
            pieces,
        };
        let digest = self.digest;
        self.ctx.tasks.spawn(async move {
            if let Err(e) = tracker.publish(&digest, &req).await {
                debug!(%digest, error = %e, "publishing the hashes of a complete blob");
            }
        });
    }
}
