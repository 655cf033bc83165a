//! Members this node hears but gossip cannot reach: connected, their
//! heartbeats taken, yet gossipsub does not list them on the run's topic.
//!
//! Gossipsub sends a published message only to peers it knows subscribe,
//! and it learns that once per peer, from the subscriptions sent when the
//! first connection between the two opens. If that one message is lost
//! (all connections to a peer share one queue, and a connection that
//! closes takes what it had taken from the queue with it), gossipsub never
//! sends it again: this node goes on taking the member's heartbeats while
//! its own never go to the member, which does not count it and refuses its
//! payloads. Closing every connection to such a member and dialling it
//! again makes both sides send their subscriptions anew.
//!
//! Sans-IO: the swarm driver says, once per heartbeat, which members are
//! unreached, and dials again those this hands back once disconnected.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// Heartbeats in a row a member stays unreached before its connections
/// are reset: a subscription sent with a new connection arrives within a
/// round trip, so three beats (three seconds by default) are not a race.
pub const UNREACHED_BEATS: u32 = 3;
/// The least time between two resets of one member's connections: a peer
/// that publishes without subscribing (not murmur) is reset at this pace
/// and no faster.
pub const RESET_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub struct GossipReach {
    /// Heartbeats in a row each member was unreached.
    beats: HashMap<PeerId, u32>,
    /// When each member's connections were last reset.
    reset_at: HashMap<PeerId, Instant>,
    /// Reset members not dialled again yet.
    to_redial: HashSet<PeerId>,
}

impl GossipReach {
    /// Takes this heartbeat's unreached members (connected, heard, not
    /// listed on the topic); returns those whose connections to close now.
    pub fn beat(&mut self, unreached: &[PeerId], now: Instant) -> Vec<PeerId> {
        self.beats.retain(|p, _| unreached.contains(p));
        self.reset_at.retain(|_, t| now.saturating_duration_since(*t) < RESET_EVERY);
        let mut reset = Vec::new();
        for p in unreached {
            let beats = self.beats.entry(*p).or_insert(0);
            *beats += 1;
            if *beats >= UNREACHED_BEATS && !self.reset_at.contains_key(p) {
                self.beats.remove(p);
                self.reset_at.insert(*p, now);
                self.to_redial.insert(*p);
                reset.push(*p);
            }
        }
        reset
    }

    /// Reset members that are no longer connected: to dial again now (each
    /// once; a member that reconnects on its own is simply forgotten).
    pub fn redial(&mut self, connected: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        self.to_redial.extract_if(|p| !connected(p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_unreached_for_three_beats_in_a_row_is_reset_once_per_period() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut reach = GossipReach::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(reach.beat(&[a, b], at(0)).is_empty());
        assert!(reach.beat(&[a, b], at(1)).is_empty());
        // b is listed again at the third beat: its count starts over.
        assert_eq!(reach.beat(&[a], at(2)), vec![a]);
        assert!(reach.beat(&[a, b], at(3)).is_empty());
        assert!(reach.beat(&[a, b], at(4)).is_empty());
        assert_eq!(reach.beat(&[a, b], at(5)), vec![b]);
        // a is still unreached after its reset: not again within the period.
        for s in 6..32 {
            assert!(reach.beat(&[a], at(s)).is_empty(), "second {s}");
        }
        assert_eq!(reach.beat(&[a], at(32)), vec![a]);
    }

    #[test]
    fn a_reset_member_is_dialled_again_once_it_is_disconnected() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut reach = GossipReach::default();
        let now = Instant::now();
        for _ in 0..UNREACHED_BEATS {
            reach.beat(&[a, b], now);
        }
        // a's connection is still closing; b's is gone.
        assert_eq!(reach.redial(|p| *p == a), vec![b]);
        assert_eq!(reach.redial(|_| false), vec![a]);
        assert!(reach.redial(|_| false).is_empty(), "each is dialled once");
    }
}
