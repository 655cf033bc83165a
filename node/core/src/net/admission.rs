//! Who may use the node's inbound payload capacity, and how much of it.
//!
//! Every inbound `/murmur/params/1` stream takes a ticket before it is
//! queued, and holds it until its read ends. A ticket is refused when the
//! peer already holds `per_peer` streams (`inbound_peer_limit`), when the
//! node holds `queue` streams in all (`inbound_queue_full`), or when a
//! non-member would take one of the `reserved` slots kept for members. So
//! one peer opening streams and writing nothing holds at most `per_peer`
//! of them, strangers together at most `queue - reserved`, and members
//! always find room. Reading is capped the same way: at most
//! `reads_per_peer` reads per peer at once, beside the node-wide cap.
//!
//! The member set is the membership view's, copied here by the swarm task
//! on every change; a payload stream from a peer outside it is refused
//! before a byte of it is read (`not_a_member`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use libp2p::PeerId;
use tokio::sync::Semaphore;

/// The refusal counted for a stream that found the node's queue full.
pub const QUEUE_FULL: &str = "inbound_queue_full";
/// The refusal counted for a stream from a peer already holding its share.
pub const PEER_LIMIT: &str = "inbound_peer_limit";
/// The refusal counted for a payload stream from a peer that is not a member.
pub const NOT_A_MEMBER: &str = "not_a_member";

/// The caps, in streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Streams held (queued or being read) over all peers.
    pub queue: usize,
    /// Streams one peer may hold.
    pub per_peer: usize,
    /// Of `queue`, the streams only members may take.
    pub reserved: usize,
    /// Reads of one peer's streams at once.
    pub reads_per_peer: usize,
    /// Whether payloads from peers outside the member set are refused (off
    /// for tools that exchange payloads without a run's membership).
    pub members_only: bool,
}

impl Default for AdmissionLimits {
    fn default() -> AdmissionLimits {
        AdmissionLimits {
            queue: 256,
            per_peer: 16,
            reserved: 64,
            reads_per_peer: 4,
            members_only: true,
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_peer: HashMap<PeerId, usize>,
    /// Each holding peer's read permits (dropped with its last stream).
    reads: HashMap<PeerId, Arc<Semaphore>>,
}

#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    members: RwLock<HashSet<PeerId>>,
    held: Mutex<Held>,
}

/// One admitted stream's share of the capacity; given back on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    peer: PeerId,
    /// The peer's read permits.
    pub reads: Arc<Semaphore>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut held = self.admission.lock();
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.by_peer.remove(&self.peer);
                held.reads.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            members: RwLock::new(HashSet::new()),
            held: Mutex::new(Held::default()),
        })
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the member set.
    pub fn set_members(&self, members: impl IntoIterator<Item = PeerId>) {
        let mut m = self.members.write().unwrap_or_else(|p| p.into_inner());
        *m = members.into_iter().collect();
    }

    pub fn is_member(&self, peer: &PeerId) -> bool {
        self.members.read().unwrap_or_else(|p| p.into_inner()).contains(peer)
    }

    /// Whether a payload from `peer` may be read at all.
    pub fn may_send(&self, peer: &PeerId) -> bool {
        !self.limits.members_only || self.is_member(peer)
    }

    /// A ticket for a new stream from `peer`, or the reason it has none.
    pub fn admit(self: &Arc<Self>, peer: PeerId) -> Result<Ticket, &'static str> {
        let stranger = !self.is_member(&peer);
        let l = self.limits;
        let mut held = self.lock();
        if held.by_peer.get(&peer).copied().unwrap_or(0) >= l.per_peer {
            return Err(PEER_LIMIT);
        }
        // A stranger may not take the node past `queue - reserved`: the
        // reserve stays free for members whoever holds the rest.
        let room = if stranger { l.queue.saturating_sub(l.reserved) } else { l.queue };
        if held.total >= room {
            return Err(QUEUE_FULL);
        }
        held.total += 1;
        *held.by_peer.entry(peer).or_default() += 1;
        let reads = held
            .reads
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(l.reads_per_peer.max(1))))
            .clone();
        Ok(Ticket { admission: self.clone(), peer, reads })
    }

    /// Streams held now, over all peers.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            queue: 10,
            per_peer: 4,
            reserved: 3,
            reads_per_peer: 2,
            members_only: true,
        }
    }

    #[test]
    fn one_peer_holds_at_most_its_share_and_gets_it_back() {
        let a = Admission::new(limits());
        let p = PeerId::random();
        a.set_members([p]);
        let tickets: Vec<Ticket> = (0..4).map(|_| a.admit(p).unwrap()).collect();
        assert_eq!(a.admit(p).unwrap_err(), PEER_LIMIT);
        drop(tickets);
        assert_eq!(a.held(), 0);
        assert!(a.admit(p).is_ok(), "room again once its streams end");
    }

    #[test]
    fn strangers_cannot_take_the_members_reserve() {
        let a = Admission::new(limits());
        let member = PeerId::random();
        a.set_members([member]);
        // Seven strangers' streams fill what strangers may use (10 - 3).
        let strangers: Vec<Ticket> = (0..7).map(|_| a.admit(PeerId::random()).unwrap()).collect();
        assert_eq!(a.admit(PeerId::random()).unwrap_err(), QUEUE_FULL);
        let members: Vec<Ticket> = (0..3).map(|_| a.admit(member).unwrap()).collect();
        assert_eq!(a.admit(member).unwrap_err(), QUEUE_FULL, "the whole queue is held");
        assert_eq!(a.held(), 10);
        drop(strangers);
        drop(members);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn reads_are_capped_per_peer() {
        let a = Admission::new(limits());
        let p = PeerId::random();
        a.set_members([p]);
        let t1 = a.admit(p).unwrap();
        let t2 = a.admit(p).unwrap();
        let r1 = t1.reads.clone().try_acquire_owned().unwrap();
        let _r2 = t2.reads.clone().try_acquire_owned().unwrap();
        let t3 = a.admit(p).unwrap();
        assert!(t3.reads.clone().try_acquire_owned().is_err(), "a third read waits");
        drop(r1);
        assert!(t3.reads.clone().try_acquire_owned().is_ok());
    }

    #[test]
    fn payloads_from_non_members_are_refused_unless_the_run_has_no_membership() {
        let a = Admission::new(limits());
        let (member, stranger) = (PeerId::random(), PeerId::random());
        a.set_members([member]);
        assert!(a.may_send(&member) && !a.may_send(&stranger));
        let open = Admission::new(AdmissionLimits { members_only: false, ..limits() });
        assert!(open.may_send(&stranger));
    }
}
