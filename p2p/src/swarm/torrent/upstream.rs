//! Back-sourcing: fetching pieces from the upstream registry when this peer holds the lease
//! (or the tracker is down). Hashes are published by `pieces.rs` once the pieces are stored.

use super::*;
use crate::swarm::sink::PieceSink;

/// Upstream fetches a waiting reader may add beyond `upstream_concurrency`.
const URGENT_UPSTREAM_SLOTS: usize = 4;

/// How long an upstream fetch that found its piece being written by someone else waits before
/// saying so.
const CLAIM_BUSY_PAUSE: Duration = Duration::from_millis(200);

/// How long lazy reads must have been quiet before the background fetch of their blob goes on.
const BACKGROUND_QUIET: Duration = Duration::from_secs(2);

/// How long a node without the back-source lease lets a blocked reader wait for a peer to
/// offer a piece before fetching it upstream itself.
const NEED_GRACE: Duration = Duration::from_millis(500);

impl Torrent {
    pub(super) fn may_backsource(&self) -> bool {
        self.source.is_some()
            && (self.backsource || (self.tracker_down && self.ctx.cfg.fallback_to_upstream))
    }

    pub(super) fn query_size(&mut self) {
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

    pub(super) fn fetch_upstream(&mut self) {
        let leased = self.may_backsource() && !self.complete();
        self.counts
            .backsourcing
            .store(leased, std::sync::atomic::Ordering::Relaxed);
        // Without the lease a node still fetches the pieces a lazy read is blocked on when no
        // connected peer has them: the read must not wait for the back-sourcer to get there in
        // its own order. That is a few chunks per container start, not the blob.
        if !leased && (self.complete() || self.source.is_none()) {
            return;
        }
        let (Some(s), Some(blob), Some(source)) =
            (self.sched.as_mut(), self.blob.clone(), self.source.clone())
        else {
            return;
        };
        let limit = self.ctx.cfg.upstream_concurrency;
        loop {
            // Without a tracker there is nobody to split the blob with.
            let stripe = if self.backsource {
                self.stripe
            } else {
                Stripe::default()
            };
            // A reader's pieces never queue behind background fetches: they get slots of
            // their own beyond the limit.
            // While lazy reads are blocking, the background fetch waits: on the registry's
            // link every byte it moves delays the container.
            let quiet = self
                .last_need
                .is_none_or(|t| t.elapsed() >= BACKGROUND_QUIET);
            let picked = if leased && self.upstream_inflight < limit {
                if quiet {
                    s.pick_for_upstream(stripe)
                } else {
                    s.pick_urgent_for_upstream(None)
                }
            } else if self.upstream_inflight < limit + URGENT_UPSTREAM_SLOTS {
                s.pick_urgent_for_upstream((!leased).then_some(NEED_GRACE))
            } else {
                None
            };
            let Some(index) = picked else {
                break;
            };
            let urgent = s.is_urgent(index);
            s.requested(index);
            self.upstream_inflight += 1;
            let range = blob.layout().piece_range(index);
            let (tx, ctx, digest, source, blob) = (
                self.events_tx.clone(),
                self.ctx.clone(),
                self.digest,
                source.clone(),
                blob.clone(),
            );
            self.ctx.tasks.spawn(async move {
                let len = (range.end - range.start) as usize;
                // The registry's bytes count against the node's ingress cap like a peer's; a
                // reader's go first, and the background pays for them.
                if urgent {
                    ctx.ingress.debit(len);
                } else {
                    ctx.ingress.acquire(len).await;
                }
                let result = fetch_piece(&ctx, &source, &digest, &blob, index).await;
                let _ = tx.send(Event::Upstream { index, result }).await;
            });
        }
    }
}

/// Streams piece `index` from the registry into the store, for the torrent to commit; `None`
/// if the store has it or is writing it already.
async fn fetch_piece(
    ctx: &SwarmCtx,
    source: &BlobSource,
    digest: &Digest,
    blob: &Blob,
    index: u32,
) -> Result<Option<PieceWriter>, String> {
    let Some(piece) = blob.piece_writer(index).map_err(|e| e.to_string())? else {
        // A peer's copy is arriving or being committed: pause, so that the scheduler, which
        // learns of it only when it lands, does not pick the piece again at once.
        tokio::time::sleep(CLAIM_BUSY_PAUSE).await;
        return Ok(None);
    };
    let range = blob.layout().piece_range(index);
    let mut sink = PieceSink::new(piece);
    ctx.upstream
        .fetch_range_into(source, digest, range, &mut sink)
        .await
        .map_err(|e| e.to_string())?;
    sink.finish().await.map(Some).map_err(|e| e.to_string())
}
