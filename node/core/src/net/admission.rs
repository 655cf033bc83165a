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
//!
//! Refusing a stream is cheap but not free: each one costs the node a
//! protocol negotiation, and a peer that opens streams as fast as they are
//! refused (thousands a second) costs it a share of a core while costing
//! itself almost nothing. A peer refused at its share `FLOOD_STRIKES` times
//! within `FLOOD_WINDOW` is cut off: its connections are closed and new ones
//! denied for a cooldown that doubles with each repeat (`stream_flood`).
//! An honest peer never comes near: it opens a stream per message, and
//! holds at most a few at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::sync::Semaphore;

/// The refusal counted for a stream that found the node's queue full.
pub const QUEUE_FULL: &str = "inbound_queue_full";
/// The refusal counted for a stream from a peer already holding its share.
pub const PEER_LIMIT: &str = "inbound_peer_limit";
/// The refusal counted for a payload stream from a peer that is not a member.
pub const NOT_A_MEMBER: &str = "not_a_member";
/// The refusal counted for a stream, or a connection, from a peer cut off
/// for opening streams faster than they are refused.
pub const FLOODING: &str = "stream_flood";

/// Refusals at a peer's share, within `FLOOD_WINDOW`, that cut it off.
pub const FLOOD_STRIKES: u32 = 256;
pub const FLOOD_WINDOW: Duration = Duration::from_secs(1);
/// The first cooldown; each repeat doubles it, up to `MAX_COOLDOWN`.
pub const COOLDOWN: Duration = Duration::from_secs(30);
pub const MAX_COOLDOWN: Duration = Duration::from_secs(600);
/// Peers whose strikes are remembered at once (older windows are
/// forgotten first), so the record itself stays bounded.
const FLOOD_RECORDS: usize = 4096;

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
    /// Peers refused at their share lately, and those cut off.
    floods: HashMap<PeerId, Flood>,
}

/// One peer's recent refusals at its share, and its cut-off.
#[derive(Debug, Clone, Copy)]
struct Flood {
    window: Instant,
    strikes: u32,
    /// Cut-offs so far (each doubles the next cooldown).
    cutoffs: u32,
    until: Option<Instant>,
}

impl Flood {
    fn banned(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Whether the record still matters: a ban running, or a window open.
    /// A peer cut off before keeps its record while its ban could double.
    fn live(&self, now: Instant) -> bool {
        let last = self.until.unwrap_or(self.window + FLOOD_WINDOW);
        now < last + if self.cutoffs > 0 { MAX_COOLDOWN } else { Duration::ZERO }
    }
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
    /// `FLOODING` also means: close the peer's connections.
    pub fn admit(self: &Arc<Self>, peer: PeerId) -> Result<Ticket, &'static str> {
        self.admit_at(peer, Instant::now())
    }

    /// Whether `peer` is cut off now: a connection from it is denied.
    pub fn cut_off(&self, peer: &PeerId) -> bool {
        self.lock().floods.get(peer).is_some_and(|f| f.banned(Instant::now()))
    }

    fn admit_at(self: &Arc<Self>, peer: PeerId, now: Instant) -> Result<Ticket, &'static str> {
        let stranger = !self.is_member(&peer);
        let l = self.limits;
        let mut held = self.lock();
        if held.floods.get(&peer).is_some_and(|f| f.banned(now)) {
            return Err(FLOODING);
        }
        if held.by_peer.get(&peer).copied().unwrap_or(0) >= l.per_peer {
            return Err(strike(&mut held.floods, peer, now));
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

/// Counts a refusal at `peer`'s share; cuts it off at `FLOOD_STRIKES`
/// within a window. Returns the refusal's reason.
fn strike(floods: &mut HashMap<PeerId, Flood>, peer: PeerId, now: Instant) -> &'static str {
    if floods.len() >= FLOOD_RECORDS && !floods.contains_key(&peer) {
        floods.retain(|_, f| f.live(now));
        if floods.len() >= FLOOD_RECORDS {
            // Still full of live records: forget the oldest window.
            if let Some(oldest) =
                floods.iter().filter(|(_, f)| !f.banned(now)).min_by_key(|(_, f)| f.window)
            {
                let oldest = *oldest.0;
                floods.remove(&oldest);
            }
        }
    }
    let f =
        floods.entry(peer).or_insert(Flood { window: now, strikes: 0, cutoffs: 0, until: None });
    if now.duration_since(f.window) > FLOOD_WINDOW {
        (f.window, f.strikes) = (now, 0);
    }
    f.strikes += 1;
    if f.strikes < FLOOD_STRIKES {
        return PEER_LIMIT;
    }
    let cooldown = COOLDOWN.saturating_mul(1 << f.cutoffs.min(8)).min(MAX_COOLDOWN);
    f.cutoffs = f.cutoffs.saturating_add(1);
    f.until = Some(now + cooldown);
    f.strikes = 0;
    FLOODING
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
    fn a_peer_refused_at_its_share_too_often_is_cut_off_for_a_doubling_cooldown() {
        let a = Admission::new(limits());
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        a.set_members([flooder, honest]);
        let t0 = Instant::now();
        let _held: Vec<Ticket> = (0..4).map(|_| a.admit_at(flooder, t0).unwrap()).collect();
        // Refusals spread thinner than the window allows never cut it off.
        let slow = FLOOD_WINDOW * 2 / FLOOD_STRIKES;
        for k in 0..FLOOD_STRIKES * 2 {
            assert_eq!(a.admit_at(flooder, t0 + slow * k).unwrap_err(), PEER_LIMIT);
        }
        let t1 = t0 + slow * FLOOD_STRIKES * 2 + FLOOD_WINDOW * 2;
        for _ in 1..FLOOD_STRIKES {
            assert_eq!(a.admit_at(flooder, t1).unwrap_err(), PEER_LIMIT);
        }
        assert_eq!(a.admit_at(flooder, t1).unwrap_err(), FLOODING);
        assert_eq!(a.admit_at(flooder, t1 + COOLDOWN / 2).unwrap_err(), FLOODING);
        assert!(a.admit_at(honest, t1).is_ok(), "others are not touched");
        // After the cooldown it is refused at its share again; a second
        // flood cuts it off twice as long.
        let t2 = t1 + COOLDOWN;
        for _ in 1..FLOOD_STRIKES {
            assert_eq!(a.admit_at(flooder, t2).unwrap_err(), PEER_LIMIT);
        }
        assert_eq!(a.admit_at(flooder, t2).unwrap_err(), FLOODING);
        assert_eq!(a.admit_at(flooder, t2 + COOLDOWN * 3 / 2).unwrap_err(), FLOODING);
        assert_eq!(a.admit_at(flooder, t2 + COOLDOWN * 2).unwrap_err(), PEER_LIMIT);
    }

    #[test]
    fn the_flood_record_stays_bounded() {
        let a = Admission::new(AdmissionLimits { per_peer: 0, ..limits() });
        let t = Instant::now();
        for _ in 0..FLOOD_RECORDS + 100 {
            assert_eq!(a.admit_at(PeerId::random(), t).unwrap_err(), PEER_LIMIT);
        }
        assert!(a.lock().floods.len() <= FLOOD_RECORDS);
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
