//! The tracker's in-memory state and every decision it makes, free of HTTP so it can be tested
//! directly.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use tracing::{info, warn};

use super::api::{
    AnnounceRequest, AnnounceResponse, PeerInfo, PublishRequest, ReportKind, ReportRequest, Stripe,
};
use super::server::TrackerConfig;
use crate::digest::Digest;
use crate::metainfo::{Metainfo, MetainfoError};
use crate::upstream::BlobSource;
use crate::wire::PeerId;

#[derive(Debug)]
struct Peer {
    addr: String,
    seed: bool,
    last_seen: Instant,
}

#[derive(Debug)]
struct Member {
    complete: bool,
    last_seen: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    granted: Instant,
    until: Instant,
}

#[derive(Debug, Default)]
struct Swarm {
    members: HashMap<PeerId, Member>,
    meta: Option<Metainfo>,
    /// Back-source leases.
    leases: HashMap<PeerId, Lease>,
    source: Option<BlobSource>,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{peer} holds no back-source lease for {digest}")]
    NoLease { peer: PeerId, digest: Digest },
    #[error(transparent)]
    Metainfo(#[from] MetainfoError),
}

#[derive(Debug)]
pub(crate) struct State {
    cfg: TrackerConfig,
    peers: HashMap<PeerId, Peer>,
    swarms: HashMap<Digest, Swarm>,
}

impl State {
    pub(crate) fn new(cfg: TrackerConfig) -> Self {
        Self {
            cfg,
            peers: HashMap::new(),
            swarms: HashMap::new(),
        }
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.cfg.peer_ttl_ms)
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn blob_count(&self) -> usize {
        self.swarms.len()
    }

    /// The seed responsible for `digest`: highest rendezvous hash among live seeds.
    fn seed_for(&self, digest: &Digest) -> Option<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.seed)
            .max_by_key(|(id, _)| {
                let mut key = Vec::with_capacity(48);
                key.extend_from_slice(digest.as_bytes());
                key.extend_from_slice(&id.0);
                *Digest::of(&key).as_bytes()
            })
            .map(|(id, _)| *id)
    }

    pub(crate) fn announce(&mut self, req: AnnounceRequest, now: Instant) -> AnnounceResponse {
        self.expire(now);
        self.peers.insert(
            req.peer_id,
            Peer {
                addr: req.addr,
                seed: req.seed,
                last_seen: now,
            },
        );
        let interval_ms = self.cfg.announce_interval_ms;
        let Some(blob) = req.blob else {
            return AnnounceResponse {
                interval_ms,
                peers: Vec::new(),
                metainfo: None,
                backsource: false,
                stripe: Stripe::default(),
            };
        };
        let seed = self.seed_for(&blob.digest);
        let lease_ttl = self.ttl();
        let max_backsourcers = self.cfg.max_backsourcers;
        let settle = Duration::from_millis(2 * self.cfg.announce_interval_ms);
        let swarm = self.swarms.entry(blob.digest).or_default();
        swarm.members.insert(
            req.peer_id,
            Member {
                complete: blob.complete,
                last_seen: now,
            },
        );
        if swarm.source.is_none() {
            swarm.source = blob.source;
        }
        match (&swarm.meta, blob.size) {
            (None, Some(size)) => match Metainfo::empty(blob.digest, size) {
                Ok(meta) => swarm.meta = Some(meta),
                Err(e) => warn!(peer = %req.peer_id, error = %e, "ignoring announced size"),
            },
            (Some(meta), Some(size)) if meta.size != size => {
                warn!(peer = %req.peer_id, digest = %blob.digest, size, known = meta.size, "peer announces a different size");
            }
            _ => {}
        }

        swarm.leases.retain(|_, l| l.until > now);
        let someone_complete = swarm
            .members
            .iter()
            .any(|(id, m)| m.complete && *id != req.peer_id);
        let backsource =
            if blob.complete || someone_complete {
                swarm.leases.remove(&req.peer_id);
                false
            } else {
                let may = match seed {
                    Some(seed) => seed == req.peer_id,
                    // A second back-sourcer only joins one that has been at it a while: by then the
                    // first is in every peer list, so the two see each other's pieces and split the
                    // blob instead of both fetching it whole.
                    // Nor once every piece has been fetched (all hashes published): nothing is
                    // left to split. With no lease holder left (it died before anyone else had
                    // the blob), someone must fetch it again.
                    None => {
                        let all_fetched = swarm.meta.as_ref().is_some_and(Metainfo::is_complete);
                        swarm.leases.contains_key(&req.peer_id)
                            || swarm.leases.is_empty()
                            || (swarm.leases.len() < max_backsourcers
                                && !all_fetched
                                && swarm.leases.values().all(|l| now >= l.granted + settle))
                    }
                };
                if may {
                    let lease = swarm.leases.entry(req.peer_id).or_insert_with(|| {
                    info!(digest = %blob.digest, peer = %req.peer_id, "back-source lease granted");
                    Lease { granted: now, until: now }
                });
                    lease.until = now + lease_ttl;
                }
                may
            };
        // Lease holders split the pieces between them, in peer-id order.
        let stripe = if backsource {
            let mut holders: Vec<(Instant, PeerId)> = swarm
                .leases
                .iter()
                .map(|(id, l)| (l.granted, *id))
                .collect();
            holders.sort();
            let index = holders
                .iter()
                .position(|(_, h)| *h == req.peer_id)
                .unwrap_or(0);
            Stripe {
                index: index as u32,
                count: holders.len() as u32,
            }
        } else {
            Stripe::default()
        };

        let mut complete = Vec::new();
        let mut partial = Vec::new();
        let mut sources = Vec::new();
        for (id, m) in &swarm.members {
            if *id == req.peer_id {
                continue;
            }
            let Some(p) = self.peers.get(id) else {
                continue;
            };
            let info = PeerInfo {
                peer_id: *id,
                addr: p.addr.clone(),
                complete: m.complete,
                seed: p.seed,
                backsource: swarm.leases.contains_key(id),
            };
            if info.backsource {
                sources.push(info)
            } else if m.complete {
                complete.push(info)
            } else {
                partial.push(info)
            }
        }
        let mut rng = rand::rng();
        complete.shuffle(&mut rng);
        partial.shuffle(&mut rng);
        let mut peers: Vec<PeerInfo> = complete.into_iter().chain(partial).collect();
        peers.truncate(self.cfg.max_peers);
        // Back-sourcers are always offered, beyond the bound: there are at most a few.
        peers.extend(sources);
        // The responsible seed is always offered: it has the blob or will fetch it when asked.
        if let Some(seed) =
            seed.filter(|s| *s != req.peer_id && !peers.iter().any(|p| p.peer_id == *s))
        {
            let p = &self.peers[&seed];
            peers.push(PeerInfo {
                peer_id: seed,
                addr: p.addr.clone(),
                complete: false,
                seed: true,
                backsource: true,
            });
        }
        AnnounceResponse {
            interval_ms,
            peers,
            metainfo: swarm.meta.clone(),
            backsource,
            stripe,
        }
    }

    pub(crate) fn metainfo(&self, digest: &Digest) -> Option<Metainfo> {
        self.swarms.get(digest)?.meta.clone()
    }

    pub(crate) fn publish(
        &mut self,
        digest: Digest,
        req: PublishRequest,
        now: Instant,
    ) -> Result<usize, PublishError> {
        let swarm = self.swarms.entry(digest).or_default();
        // Lease holders publish as they back-source; a peer that has the whole blob (it came by
        // another door, e.g. containerd's content store) publishes all its hashes at once.
        let leased = swarm
            .leases
            .get(&req.peer_id)
            .is_some_and(|l| l.until > now);
        let complete = swarm.members.get(&req.peer_id).is_some_and(|m| m.complete);
        if !leased && !complete {
            return Err(PublishError::NoLease {
                peer: req.peer_id,
                digest,
            });
        }
        let meta = match &mut swarm.meta {
            Some(meta) => meta,
            None => swarm.meta.insert(Metainfo::empty(digest, req.size)?),
        };
        let mut added = 0;
        for (index, hash) in req.pieces {
            added += usize::from(meta.set_hash(index, hash)?);
        }
        Ok(added)
    }

    pub(crate) fn report(&mut self, req: ReportRequest) {
        warn!(reporter = %req.reporter, digest = %req.digest, kind = ?req.kind, culprit = ?req.culprit, "verification failure reported");
        if req.kind == ReportKind::BadBlob {
            // The published hashes let a wrong blob through: they cannot be trusted. Start over.
            if let Some(swarm) = self.swarms.get_mut(&req.digest) {
                swarm.meta = None;
                swarm.leases.clear();
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl();
        self.peers
            .retain(|_, p| now.duration_since(p.last_seen) < ttl);
        self.swarms.retain(|_, s| {
            s.members
                .retain(|_, m| now.duration_since(m.last_seen) < ttl);
            !s.members.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metainfo::PieceHash;
    use crate::tracker::api::BlobAnnounce;

    fn cfg() -> TrackerConfig {
        TrackerConfig {
            max_peers: 3,
            ..TrackerConfig::default()
        }
    }

    fn announce(
        st: &mut State,
        id: PeerId,
        seed: bool,
        complete: bool,
        now: Instant,
    ) -> AnnounceResponse {
        st.announce(
            AnnounceRequest {
                peer_id: id,
                addr: format!("10.0.0.{}:4000", id.0[0]),
                seed,
                blob: Some(BlobAnnounce {
                    digest: Digest::of(b"blob"),
                    size: Some(5 << 20),
                    complete,
                    source: None,
                }),
            },
            now,
        )
    }

    fn id(n: u8) -> PeerId {
        PeerId([n; 16])
    }

    #[test]
    fn one_node_backsources_when_there_is_no_seed() {
        let mut st = State::new(TrackerConfig {
            max_backsourcers: 1,
            ..cfg()
        });
        let now = Instant::now();
        assert!(announce(&mut st, id(1), false, false, now).backsource);
        let second = announce(&mut st, id(2), false, false, now);
        assert!(!second.backsource);
        assert_eq!(second.peers.len(), 1);
        assert!(second.metainfo.is_some_and(|m| m.piece_count() == 5));
        // The holder renews its lease by announcing; once it completes, nobody needs one.
        assert!(announce(&mut st, id(1), false, false, now).backsource);
        assert!(!announce(&mut st, id(1), false, true, now).backsource);
        assert!(!announce(&mut st, id(3), false, false, now).backsource);
    }

    #[test]
    fn the_seed_gets_the_lease_and_is_offered_to_nodes() {
        let mut st = State::new(cfg());
        let now = Instant::now();
        st.announce(
            AnnounceRequest {
                peer_id: id(9),
                addr: "10.0.0.9:1".into(),
                seed: true,
                blob: None,
            },
            now,
        );
        let node = announce(&mut st, id(1), false, false, now);
        assert!(!node.backsource);
        assert!(node.peers.iter().any(|p| p.peer_id == id(9) && p.seed));
        assert!(announce(&mut st, id(9), true, false, now).backsource);
    }

    #[test]
    fn peer_lists_are_bounded_complete_first_and_expire() {
        let mut st = State::new(cfg());
        let now = Instant::now();
        for n in 1..=6 {
            announce(&mut st, id(n), false, n == 6, now);
        }
        let resp = announce(&mut st, id(7), false, false, now);
        // Three, plus the back-sourcer (the first announcer), who is always listed.
        assert_eq!(resp.peers.iter().filter(|p| !p.backsource).count(), 3);
        assert!(
            resp.peers
                .iter()
                .any(|p| p.peer_id == id(1) && p.backsource)
        );
        assert_eq!(resp.peers[0].peer_id, id(6));
        assert!(resp.peers.iter().all(|p| p.peer_id != id(7)));
        let later = now + Duration::from_millis(st.cfg.peer_ttl_ms + 1);
        let resp = announce(&mut st, id(8), false, false, later);
        assert!(
            resp.peers.is_empty(),
            "expired peers still listed: {:?}",
            resp.peers
        );
    }

    #[test]
    fn only_lease_holders_publish_and_hashes_never_change() -> anyhow::Result<()> {
        let mut st = State::new(TrackerConfig {
            max_backsourcers: 1,
            ..cfg()
        });
        let now = Instant::now();
        announce(&mut st, id(1), false, false, now);
        announce(&mut st, id(2), false, false, now);
        let digest = Digest::of(b"blob");
        let publish = |peer, hash: &[u8]| PublishRequest {
            peer_id: peer,
            size: 5 << 20,
            pieces: vec![(0, PieceHash::of(hash))],
        };
        assert!(matches!(
            st.publish(digest, publish(id(2), b"a"), now),
            Err(PublishError::NoLease { .. })
        ));
        assert_eq!(st.publish(digest, publish(id(1), b"a"), now)?, 1);
        assert!(st.publish(digest, publish(id(1), b"b"), now).is_err());
        assert_eq!(st.metainfo(&digest).map(|m| m.known_hashes()), Some(1));
        let bad = PublishRequest {
            peer_id: id(1),
            size: 5 << 20,
            pieces: vec![(99, PieceHash::of(b"a"))],
        };
        assert!(st.publish(digest, bad, now).is_err());
        Ok(())
    }

    #[test]
    fn a_complete_peer_may_publish_the_hashes_it_has() -> anyhow::Result<()> {
        let mut st = State::new(cfg());
        let now = Instant::now();
        announce(&mut st, id(4), false, true, now);
        let digest = Digest::of(b"blob");
        let req = PublishRequest {
            peer_id: id(4),
            size: 5 << 20,
            pieces: (0..5).map(|i| (i, PieceHash::of(&[i as u8]))).collect(),
        };
        assert_eq!(st.publish(digest, req, now)?, 5);
        assert!(st.metainfo(&digest).is_some_and(|m| m.is_complete()));
        Ok(())
    }

    #[test]
    fn two_back_sourcers_split_the_blob() {
        let mut st = State::new(TrackerConfig {
            max_backsourcers: 2,
            ..cfg()
        });
        let now = Instant::now();
        let a = announce(&mut st, id(1), false, false, now);
        assert!(a.backsource);
        assert_eq!(a.stripe, Stripe::default(), "alone, it fetches everything");
        // Not while the first has only just started: they would not yet know each other.
        assert!(!announce(&mut st, id(2), false, false, now).backsource);
        let later = now + Duration::from_millis(2 * st.cfg.announce_interval_ms);
        announce(&mut st, id(1), false, false, later);
        let b = announce(&mut st, id(2), false, false, later);
        assert!(b.backsource);
        assert_eq!(b.stripe, Stripe { index: 1, count: 2 });
        let a = announce(&mut st, id(1), false, false, later);
        assert_eq!(a.stripe, Stripe { index: 0, count: 2 });
        assert!(!announce(&mut st, id(3), false, false, later).backsource);
    }

    #[test]
    fn a_fully_fetched_blob_gets_no_second_back_sourcer_but_a_new_one_if_the_first_dies() {
        let mut st = State::new(TrackerConfig {
            max_backsourcers: 2,
            ..cfg()
        });
        let now = Instant::now();
        assert!(announce(&mut st, id(1), false, false, now).backsource);
        let hashes = PublishRequest {
            peer_id: id(1),
            size: 5 << 20,
            pieces: (0..5).map(|i| (i, PieceHash::of(&[i as u8]))).collect(),
        };
        let digest = Digest::of(b"blob");
        assert!(st.publish(digest, hashes, now).is_ok());
        let later = now + Duration::from_millis(2 * st.cfg.announce_interval_ms);
        announce(&mut st, id(1), false, false, later);
        assert!(!announce(&mut st, id(2), false, false, later).backsource);
        // The holder falls silent before anyone else has the blob: someone must fetch it again.
        let after_ttl = later + Duration::from_millis(st.cfg.peer_ttl_ms + 1);
        assert!(announce(&mut st, id(2), false, false, after_ttl).backsource);
    }
}
