//! Which piece to ask whom for: rarest first with random ties, readers' pieces ahead of all,
//! and an endgame that lets the last pieces be requested from a second peer.
//!
//! Pure bookkeeping, no I/O: the torrent actor tells it what peers have and what is in flight,
//! and asks it for the next piece to request from a given peer or from upstream.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::bitfield::Bitfield;
use crate::tracker::api::Stripe;

/// Most outstanding requests for one piece during the endgame.
const ENDGAME_DUPLICATES: u8 = 2;

#[derive(Debug)]
pub struct Scheduler {
    have: Bitfield,
    /// How many connected peers have each piece.
    avail: Vec<u16>,
    /// Outstanding requests (to peers or upstream) per piece.
    requested: Vec<u8>,
    /// Pieces received but not yet stored: being written, or held until their hash is known.
    pending: Bitfield,
    /// Pieces a reader is waiting for.
    priority: BTreeSet<u32>,
    /// Among those, pieces a reader is blocked on (a lazy read in a container), with when it
    /// asked: this node fetches them upstream itself, lease or not, when no connected peer has
    /// them a short while later.
    needed: BTreeMap<u32, Instant>,
}

impl Scheduler {
    pub fn new(have: Bitfield) -> Self {
        let n = have.len() as usize;
        Self {
            avail: vec![0; n],
            requested: vec![0; n],
            pending: Bitfield::new(have.len()),
            priority: BTreeSet::new(),
            needed: BTreeMap::new(),
            have,
        }
    }

    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    pub fn peer_added(&mut self, has: &Bitfield) {
        for i in has.iter_ones() {
            self.avail[i as usize] = self.avail[i as usize].saturating_add(1);
        }
    }

    pub fn peer_removed(&mut self, has: &Bitfield) {
        for i in has.iter_ones() {
            self.avail[i as usize] = self.avail[i as usize].saturating_sub(1);
        }
    }

    pub fn peer_has(&mut self, index: u32) {
        if let Some(a) = self.avail.get_mut(index as usize) {
            *a = a.saturating_add(1);
        }
    }

    pub fn requested(&mut self, index: u32) {
        self.requested[index as usize] = self.requested[index as usize].saturating_add(1);
    }

    /// A request ended (answered, rejected, timed out, or its peer left).
    pub fn request_done(&mut self, index: u32) {
        if let Some(r) = self.requested.get_mut(index as usize) {
            *r = r.saturating_sub(1);
        }
    }

    pub fn set_pending(&mut self, index: u32, pending: bool) {
        if pending {
            self.pending.set(index);
        } else {
            self.pending.clear(index);
        }
    }

    pub fn got(&mut self, index: u32) {
        self.have.set(index);
        self.pending.clear(index);
        self.priority.remove(&index);
        self.needed.remove(&index);
    }

    /// Readers want these pieces first; `needed`: a reader is blocked on them.
    pub fn prioritize(&mut self, pieces: std::ops::Range<u32>, needed: bool) {
        for i in pieces.filter(|&i| i < self.have.len() && !self.have.get(i)) {
            self.priority.insert(i);
            if needed {
                self.needed.entry(i).or_insert_with(Instant::now);
            }
        }
    }

    fn wanted(&self, i: u32) -> bool {
        !self.have.get(i) && !self.pending.get(i)
    }

    /// Every missing piece is already requested or pending: time for the endgame.
    fn in_endgame(&self) -> bool {
        (0..self.have.len()).all(|i| !self.wanted(i) || self.requested[i as usize] > 0)
    }

    /// The next piece to request from a peer that has `peer_has`, skipping pieces for which
    /// `skip` is true (already in flight to that peer, or recently rejected by it).
    pub fn pick_for_peer(&self, peer_has: &Bitfield, skip: impl Fn(u32) -> bool) -> Option<u32> {
        let eligible = |i: u32| peer_has.get(i) && self.wanted(i) && !skip(i);
        if let Some(&i) = self
            .priority
            .iter()
            .find(|&&i| eligible(i) && self.requested[i as usize] == 0)
        {
            return Some(i);
        }
        if let Some(i) = self.rarest(|i| eligible(i) && self.requested[i as usize] == 0) {
            return Some(i);
        }
        if self.in_endgame() {
            return self.rarest(|i| eligible(i) && self.requested[i as usize] < ENDGAME_DUPLICATES);
        }
        None
    }

    /// The next piece to fetch from upstream: one no connected peer has and nobody is fetching,
    /// readers' pieces first, then in order from this back-sourcer's starting point (in order is
    /// what a streaming reader wants next).
    pub fn pick_for_upstream(&self, stripe: Stripe) -> Option<u32> {
        let n = self.have.len();
        let (start, end) = (stripe.start(n), stripe.end(n));
        self.pick_urgent_for_upstream(None)
            // Own share forward, then the rest backward from the end: another back-sourcer going
            // forward through its share meets us in the middle of what is left, instead of
            // both fetching the same pieces side by side.
            .or_else(|| {
                (start..end)
                    .chain((end..n).rev())
                    .chain((0..start).rev())
                    .find(|&i| self.free_upstream(i))
            })
    }

    /// A piece a reader is waiting for that no connected peer has and nobody is fetching, if
    /// any. With `needed_for`, only a piece a reader has been blocked on for that long (time for
    /// the peers that have it to connect and say so).
    pub fn pick_urgent_for_upstream(&self, needed_for: Option<Duration>) -> Option<u32> {
        match needed_for {
            None => self
                .priority
                .iter()
                .copied()
                .find(|&i| self.free_upstream(i)),
            Some(grace) => self
                .needed
                .iter()
                .find(|&(&i, since)| since.elapsed() >= grace && self.free_upstream(i))
                .map(|(&i, _)| i),
        }
    }

    /// Missing, requested from nobody, on no connected peer: only upstream can provide it.
    fn free_upstream(&self, i: u32) -> bool {
        self.wanted(i) && self.requested[i as usize] == 0 && self.avail[i as usize] == 0
    }

    /// Whether a reader is waiting for piece `index`.
    pub fn is_urgent(&self, index: u32) -> bool {
        self.priority.contains(&index)
    }

    /// Among pieces passing `ok`, one of the least available, chosen uniformly among ties so
    /// peers spread over different pieces.
    fn rarest(&self, ok: impl Fn(u32) -> bool) -> Option<u32> {
        let mut rng = rand::rng();
        let mut best: Option<(u16, u32)> = None;
        let mut ties = 0u32;
        for i in (0..self.have.len()).filter(|&i| ok(i)) {
            let a = self.avail[i as usize];
            match best {
                Some((b, _)) if a > b => {}
                Some((b, _)) if a == b => {
                    ties += 1;
                    if rng.random_range(0..ties) == 0 {
                        best = Some((a, i));
                    }
                }
                _ => {
                    best = Some((a, i));
                    ties = 1;
                }
            }
        }
        best.map(|(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn bits(len: u32, ones: &[u32]) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in ones {
            b.set(i);
        }
        b
    }

    #[test]
    fn picks_the_rarest_piece_the_peer_has() {
        let mut s = Scheduler::new(Bitfield::new(4));
        s.peer_added(&bits(4, &[0, 1, 2, 3]));
        s.peer_added(&bits(4, &[0, 1, 3]));
        s.peer_added(&bits(4, &[0, 3]));
        let peer = bits(4, &[0, 1, 2, 3]);
        assert_eq!(s.pick_for_peer(&peer, |_| false), Some(2));
        s.requested(2);
        assert_eq!(s.pick_for_peer(&peer, |_| false), Some(1));
        assert_eq!(s.pick_for_peer(&bits(4, &[0]), |_| false), Some(0));
        assert_eq!(s.pick_for_peer(&bits(4, &[]), |_| false), None);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let mut s = Scheduler::new(Bitfield::new(64));
        let all = Bitfield::full(64);
        s.peer_added(&all);
        let picks: HashSet<u32> = (0..200)
            .filter_map(|_| s.pick_for_peer(&all, |_| false))
            .collect();
        assert!(picks.len() > 20, "only {} distinct picks", picks.len());
    }

    #[test]
    fn readers_pieces_come_first() {
        let mut s = Scheduler::new(Bitfield::new(10));
        s.peer_added(&Bitfield::full(10));
        s.prioritize(7..9, false);
        assert_eq!(s.pick_for_peer(&Bitfield::full(10), |_| false), Some(7));
        s.got(7);
        assert_eq!(s.pick_for_peer(&Bitfield::full(10), |_| false), Some(8));
        assert_eq!(
            s.pick_for_upstream(Stripe::default()),
            None,
            "every piece is on a peer"
        );
    }

    #[test]
    fn only_pieces_a_reader_is_blocked_on_go_upstream_without_the_lease() {
        let mut s = Scheduler::new(Bitfield::new(10));
        let now = Some(Duration::ZERO);
        s.prioritize(2..3, false);
        assert_eq!(
            s.pick_urgent_for_upstream(now),
            None,
            "a streaming reader can wait"
        );
        assert_eq!(s.pick_urgent_for_upstream(None), Some(2));
        s.prioritize(5..6, true);
        assert_eq!(
            s.pick_urgent_for_upstream(Some(Duration::from_secs(60))),
            None,
            "peers get a moment to connect first"
        );
        assert_eq!(s.pick_urgent_for_upstream(now), Some(5));
        // A connected peer has it: ask the peer, not the registry.
        let mut on_peer = Bitfield::new(10);
        on_peer.set(5);
        s.peer_added(&on_peer);
        assert_eq!(s.pick_urgent_for_upstream(now), None);
        assert_eq!(s.pick_for_peer(&on_peer, |_| false), Some(5));
    }

    #[test]
    fn endgame_requests_a_piece_twice_but_not_thrice() {
        let mut s = Scheduler::new(bits(3, &[0, 1]));
        s.peer_added(&Bitfield::full(3));
        s.peer_added(&Bitfield::full(3));
        let peer = Bitfield::full(3);
        assert_eq!(s.pick_for_peer(&peer, |_| false), Some(2));
        s.requested(2);
        // Everything missing is in flight: a second peer may ask for it too.
        assert_eq!(s.pick_for_peer(&peer, |_| false), Some(2));
        s.requested(2);
        assert_eq!(s.pick_for_peer(&peer, |_| false), None);
        assert_eq!(s.pick_for_peer(&peer, |i| i == 2), None);
    }

    #[test]
    fn upstream_fetches_only_what_no_peer_has_in_order() {
        let mut s = Scheduler::new(Bitfield::new(4));
        s.peer_added(&bits(4, &[0, 2]));
        assert_eq!(s.pick_for_upstream(Stripe::default()), Some(1));
        s.requested(1);
        assert_eq!(s.pick_for_upstream(Stripe::default()), Some(3));
        s.set_pending(3, true);
        assert_eq!(s.pick_for_upstream(Stripe::default()), None);
    }

    #[test]
    fn back_sourcers_start_at_their_share_and_wrap_around() {
        let mut s = Scheduler::new(Bitfield::new(6));
        let (first, second) = (Stripe { index: 0, count: 2 }, Stripe { index: 1, count: 2 });
        assert_eq!(s.pick_for_upstream(second), Some(3));
        assert_eq!(s.pick_for_upstream(first), Some(0));
        for i in 0..3 {
            s.requested(i);
        }
        // Done with its share, the first comes down from the end to meet the second.
        assert_eq!(s.pick_for_upstream(first), Some(5));
        for i in 3..6 {
            s.requested(i);
        }
        assert_eq!(s.pick_for_upstream(second), None);
        assert_eq!(
            Stripe { index: 5, count: 2 }.start(6),
            0,
            "nonsense stripes start at 0"
        );
    }
}
