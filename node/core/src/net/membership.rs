//! The view of a run's live members, built from gossiped heartbeats.
//!
//! Sans-IO: heartbeats and the current time come in as arguments, joins and
//! departures come out, so expiry can be tested exactly. A member that has
//! been silent for longer than `expiry` has left.
//!
//! A heartbeat is a claim, and a claim is checked before it counts: it names
//! this run and its own signer; its sequence number rises (an old one
//! replayed later is stale); its round and entry round lie within the run's
//! length; its address list and strings are small; and its role is one this
//! version knows. Then two limits: a signer becomes a member only while it
//! holds a connection to this node (one connection relaying heartbeats
//! signed by many keys makes no members; each identity must connect, and
//! with `--swarm-key` or `--allow-peer` a stranger cannot), and the view
//! holds at most `max_members` members.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use murmur_proto::wire::v1::Heartbeat;

use super::log_limit::peer_text;

/// What a member does in the run, as its heartbeats say. A heartbeat with
/// a role this version does not know is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Trains and takes part in exchanges.
    Node,
    /// Pulls the run's state to rejoin: a member others see, but not one
    /// that takes part in exchanges yet.
    Joining,
    /// The run's coordinator (`murmur-coordinator`): samples members and
    /// averages their models; never trains, never in an exchange.
    Coordinator,
}

impl Role {
    /// Every role this version knows.
    pub const ALL: [Role; 3] = [Role::Node, Role::Joining, Role::Coordinator];

    /// The role's name on the wire (`Heartbeat::role`) and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Joining => "joining",
            Role::Coordinator => "coordinator",
        }
    }

    /// The role named `name` on the wire, if this version knows it.
    pub fn from_wire(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Addresses one heartbeat may list; each is dialled, so they are few.
pub const MAX_ADDRS: usize = 16;
/// The longest address, role or fingerprint a heartbeat may carry.
pub const MAX_FIELD_BYTES: usize = 256;

/// What the view knows of one member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub round: u64,
    pub role: Role,
    pub fingerprint: String,
    /// The first round it takes part in (`Heartbeat::entry_round`).
    pub entry_round: u64,
    /// The f32 values of its model, as it claims (0 for a coordinator).
    pub elements: u64,
    pub last_seen: Instant,
    /// The highest heartbeat sequence number taken from it.
    pub seq: u64,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Joined(PeerId),
    Left(PeerId),
}

/// What a heartbeat that passed the checks did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A new member, or one that changed role or entry round.
    Joined(PeerId),
    /// A known member, refreshed.
    Refreshed,
    /// A valid heartbeat from a peer this node has no connection to: not a
    /// member until it connects (the caller may dial it).
    NotConnected,
    /// A member said it is stopping, and is no member any more.
    Left(PeerId),
    /// A peer that is no member here said it is stopping: nothing to do.
    NotAMember,
}

/// What gossip should do with a refused heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Invalid: do not relay it, and count it against the peer that relayed it.
    Reject,
    /// Not for this node (stale, or no room): do not relay, no penalty.
    Ignore,
}

/// Why a heartbeat was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatRefusal {
    #[error("heartbeat for run {got}, this node is in run {want:?}")]
    WrongRun { got: String, want: String },
    #[error("heartbeat names peer {claimed} but was signed by {source_peer}")]
    Impostor { claimed: String, source_peer: PeerId },
    #[error("heartbeat peer id is not valid ({0})")]
    BadPeerId(String),
    #[error("heartbeat {field} is too large ({size}; at most {max})")]
    Oversize { field: &'static str, size: usize, max: usize },
    #[error("heartbeat role {0} is not one of node, joining")]
    UnknownRole(String),
    #[error("heartbeat {field} {value} is beyond the run's {max} rounds")]
    RoundOutOfRange { field: &'static str, value: u64, max: u64 },
    #[error("heartbeat sequence number {seq} is not above the last taken, {last}")]
    StaleSeq { seq: u64, last: u64 },
    #[error("{members} members already: the most this node keeps")]
    MemberCap { members: usize },
}

impl HeartbeatRefusal {
    /// Stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            HeartbeatRefusal::WrongRun { .. } => "heartbeat_wrong_run",
            HeartbeatRefusal::Impostor { .. } => "heartbeat_impostor",
            HeartbeatRefusal::BadPeerId(_) => "heartbeat_bad_peer_id",
            HeartbeatRefusal::Oversize { .. } => "heartbeat_oversize",
            HeartbeatRefusal::UnknownRole(_) => "heartbeat_unknown_role",
            HeartbeatRefusal::RoundOutOfRange { .. } => "heartbeat_round_out_of_range",
            HeartbeatRefusal::StaleSeq { .. } => "heartbeat_stale_seq",
            HeartbeatRefusal::MemberCap { .. } => "heartbeat_member_cap",
        }
    }

    /// Whether it is routine, not worth a warning: a stale heartbeat is a
    /// relayed copy that came after a newer one, as under churn (a churn
    /// run warned six times in one burst). Still counted.
    pub fn is_routine(&self) -> bool {
        matches!(self, HeartbeatRefusal::StaleSeq { .. })
    }

    /// Whether the relaying peer is at fault (gossipsub's P4 penalty).
    pub fn verdict(&self) -> Verdict {
        match self {
            HeartbeatRefusal::StaleSeq { .. } | HeartbeatRefusal::MemberCap { .. } => {
                Verdict::Ignore
            }
            _ => Verdict::Reject,
        }
    }
}

/// Bounds on what heartbeats may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLimits {
    /// Members the view holds at most (this node not counted).
    pub max_members: usize,
    /// The run's length: no round or entry round beyond it.
    pub max_round: u64,
}

impl Default for MemberLimits {
    fn default() -> MemberLimits {
        MemberLimits { max_members: 256, max_round: u64::MAX }
    }
}

#[derive(Debug)]
pub struct Membership {
    run_id: String,
    expiry: Duration,
    limits: MemberLimits,
    members: BTreeMap<PeerId, Member>,
}

impl Membership {
    pub fn new(run_id: impl Into<String>, expiry: Duration, limits: MemberLimits) -> Membership {
        Membership { run_id: run_id.into(), expiry, limits, members: BTreeMap::new() }
    }

    /// Takes a heartbeat that gossip delivered, signed by `source`;
    /// `connected`: whether `source` holds a connection to this node.
    pub fn observe(
        &mut self,
        hb: &Heartbeat,
        source: PeerId,
        connected: bool,
        now: Instant,
    ) -> Result<Observed, HeartbeatRefusal> {
        if hb.run_id != self.run_id {
            return Err(HeartbeatRefusal::WrongRun {
                got: peer_text(&hb.run_id),
                want: self.run_id.clone(),
            });
        }
        let claimed = PeerId::from_bytes(&hb.peer_id)
            .map_err(|e| HeartbeatRefusal::BadPeerId(e.to_string()))?;
        if claimed != source {
            return Err(HeartbeatRefusal::Impostor {
                claimed: claimed.to_base58(),
                source_peer: source,
            });
        }
        let (addrs, role) = check_shape(hb, self.limits)?;
        let previous = self.members.get(&source);
        if let Some(last) = previous.map(|p| p.seq).filter(|&last| hb.seq <= last) {
            return Err(HeartbeatRefusal::StaleSeq { seq: hb.seq, last });
        }
        // A goodbye counts only from a member, and only as a goodbye: its
        // sequence number passed the check, so it is the member's latest.
        if hb.leaving {
            return Ok(match self.members.remove(&source) {
                Some(_) => Observed::Left(source),
                None => Observed::NotAMember,
            });
        }
        // A stranger must connect to become a member; a member whose
        // connection dropped stays one while others relay its heartbeats.
        if !connected && previous.is_none() {
            return Ok(Observed::NotConnected);
        }
        if previous.is_none() && self.members.len() >= self.limits.max_members {
            return Err(HeartbeatRefusal::MemberCap { members: self.members.len() });
        }
        let joined = previous.is_none_or(|p| p.role != role || p.entry_round != hb.entry_round);
        let member = Member {
            peer: source,
            addrs,
            round: hb.round,
            role,
            fingerprint: hb.fingerprint.clone(),
            entry_round: hb.entry_round,
            elements: hb.elements,
            last_seen: now,
            seq: hb.seq,
        };
        // A member that changes role (a rejoining node that has its state
        // and now trains) joins anew in the role it announces.
        self.members.insert(source, member);
        Ok(if joined { Observed::Joined(source) } else { Observed::Refreshed })
    }

    /// Removes members silent for longer than the expiry.
    pub fn expire(&mut self, now: Instant) -> Vec<MemberEvent> {
        let expiry = self.expiry;
        let gone: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| now.saturating_duration_since(m.last_seen) > expiry)
            .map(|m| m.peer)
            .collect();
        gone.iter().for_each(|p| {
            self.members.remove(p);
        });
        gone.into_iter().map(MemberEvent::Left).collect()
    }

    /// Forgets a member at once (e.g. it said goodbye or was banned).
    pub fn remove(&mut self, peer: &PeerId) -> Option<MemberEvent> {
        self.members.remove(peer).map(|m| MemberEvent::Left(m.peer))
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Member> {
        self.members.get(peer)
    }

    /// Live members, sorted by peer id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// The checks on a heartbeat's own fields; its addresses, parsed, and its role.
fn check_shape(
    hb: &Heartbeat,
    limits: MemberLimits,
) -> Result<(Vec<Multiaddr>, Role), HeartbeatRefusal> {
    let oversize = |field, size, max| HeartbeatRefusal::Oversize { field, size, max };
    if hb.addrs.len() > MAX_ADDRS {
        return Err(oversize("address list", hb.addrs.len(), MAX_ADDRS));
    }
    for (field, len) in [
        ("role", hb.role.len()),
        ("fingerprint", hb.fingerprint.len()),
        ("address", hb.addrs.iter().map(String::len).max().unwrap_or(0)),
    ] {
        if len > MAX_FIELD_BYTES {
            return Err(oversize(field, len, MAX_FIELD_BYTES));
        }
    }
    let role = Role::from_wire(&hb.role)
        .ok_or_else(|| HeartbeatRefusal::UnknownRole(peer_text(&hb.role)))?;
    for (field, value) in [("round", hb.round), ("entry round", hb.entry_round)] {
        if value > limits.max_round {
            return Err(HeartbeatRefusal::RoundOutOfRange { field, value, max: limits.max_round });
        }
    }
    // Unparsable addresses are skipped: they only cost a dial target.
    Ok((hb.addrs.iter().filter_map(|a| a.parse().ok()).collect(), role))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn hb(run: &str, peer: &PeerId, round: u64) -> Heartbeat {
        Heartbeat {
            run_id: run.into(),
            peer_id: peer.to_bytes(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into(), "not an addr".into()],
            round,
            role: "node".into(),
            entry_round: 0,
            fingerprint: "f".into(),
            seq: round + 1,
            elements: 10,
            leaving: false,
        }
    }

    fn view() -> Membership {
        Membership::new("run", Duration::from_secs(5), MemberLimits::default())
    }

    #[test]
    fn join_refresh_and_expire() {
        let t0 = Instant::now();
        let mut m = view();
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(m.observe(&hb("run", &a, 1), a, true, t0), Ok(Observed::Joined(a)));
        assert_eq!(m.observe(&hb("run", &b, 1), b, true, t0), Ok(Observed::Joined(b)));
        let later = t0 + Duration::from_secs(4);
        assert_eq!(m.observe(&hb("run", &a, 2), a, true, later), Ok(Observed::Refreshed));
        assert_eq!(m.get(&a).unwrap().round, 2);
        assert_eq!(m.get(&a).unwrap().addrs.len(), 1);
        assert_eq!(m.expire(t0 + Duration::from_secs(5)), vec![]);
        assert_eq!(m.expire(t0 + Duration::from_secs(6)), vec![MemberEvent::Left(b)]);
        assert_eq!(m.len(), 1);
        assert_eq!(m.expire(t0 + Duration::from_secs(10)), vec![MemberEvent::Left(a)]);
    }

    #[test]
    fn other_runs_and_impostors_are_refused() {
        let t0 = Instant::now();
        let mut m = view();
        let (a, b) = (PeerId::random(), PeerId::random());
        let refusal = m.observe(&hb("other", &a, 1), a, true, t0).unwrap_err();
        assert_eq!(refusal.reason(), "heartbeat_wrong_run");
        assert_eq!(refusal.verdict(), Verdict::Reject);
        let impostor = m.observe(&hb("run", &a, 1), b, true, t0).unwrap_err();
        assert_eq!(impostor.reason(), "heartbeat_impostor");
        let mut bad = hb("run", &a, 1);
        bad.peer_id = vec![1, 2, 3];
        assert_eq!(m.observe(&bad, a, true, t0).unwrap_err().reason(), "heartbeat_bad_peer_id");
        assert!(m.is_empty());
    }

    #[test]
    fn a_replayed_heartbeat_is_stale_and_changes_nothing() {
        let t0 = Instant::now();
        let mut m = view();
        let a = PeerId::random();
        m.observe(&hb("run", &a, 5), a, true, t0).unwrap();
        let old = hb("run", &a, 3);
        let refusal = m.observe(&old, a, true, t0).unwrap_err();
        assert_eq!(refusal, HeartbeatRefusal::StaleSeq { seq: 4, last: 6 });
        assert_eq!(refusal.verdict(), Verdict::Ignore);
        let same = hb("run", &a, 5);
        assert_eq!(m.observe(&same, a, true, t0).unwrap_err().reason(), "heartbeat_stale_seq");
        assert_eq!(m.get(&a).unwrap().round, 5);
    }

    #[test]
    fn claims_beyond_the_run_and_oversized_fields_are_refused() {
        let t0 = Instant::now();
        let limits = MemberLimits { max_members: 8, max_round: 100 };
        let mut m = Membership::new("run", Duration::from_secs(5), limits);
        let a = PeerId::random();
        let far = hb("run", &a, u64::MAX - 1);
        assert_eq!(
            m.observe(&far, a, true, t0).unwrap_err().to_string(),
            format!("heartbeat round {} is beyond the run's 100 rounds", u64::MAX - 1)
        );
        let mut entry = hb("run", &a, 1);
        entry.entry_round = 101;
        let reason = m.observe(&entry, a, true, t0).unwrap_err().reason();
        assert_eq!(reason, "heartbeat_round_out_of_range");
        let mut many = hb("run", &a, 1);
        many.addrs = vec!["/ip4/10.0.0.1/tcp/1".into(); MAX_ADDRS + 1];
        assert_eq!(m.observe(&many, a, true, t0).unwrap_err().reason(), "heartbeat_oversize");
        let mut long = hb("run", &a, 1);
        long.fingerprint = "f".repeat(4096);
        let refusal = m.observe(&long, a, true, t0).unwrap_err();
        assert_eq!(refusal.to_string(), "heartbeat fingerprint is too large (4096; at most 256)");
        let mut role = hb("run", &a, 1);
        role.role = "coordinator\u{1b}[31m".into();
        let refusal = m.observe(&role, a, true, t0).unwrap_err();
        assert_eq!(refusal.reason(), "heartbeat_unknown_role");
        assert!(!refusal.to_string().contains('\u{1b}'), "escaped: {refusal}");
        assert!(m.is_empty());
        assert!(m.observe(&hb("run", &a, 100), a, true, t0).is_ok(), "the last round is in range");
    }

    #[test]
    fn a_signer_without_a_connection_is_not_a_member_and_the_cap_holds() {
        let t0 = Instant::now();
        let limits = MemberLimits { max_members: 3, max_round: u64::MAX };
        let mut m = Membership::new("run", Duration::from_secs(5), limits);
        let relayed = PeerId::random();
        let got = m.observe(&hb("run", &relayed, 1), relayed, false, t0);
        assert_eq!(got, Ok(Observed::NotConnected));
        assert!(m.is_empty());
        m.observe(&hb("run", &relayed, 2), relayed, true, t0).unwrap();
        let refreshed = m.observe(&hb("run", &relayed, 3), relayed, false, t0);
        assert_eq!(refreshed, Ok(Observed::Refreshed), "a member stays one through relays");
        m.remove(&relayed);
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let taken: Vec<_> =
            peers.iter().map(|p| m.observe(&hb("run", p, 1), *p, true, t0)).collect();
        assert_eq!(taken.iter().filter(|r| r.is_ok()).count(), 3);
        let cap = taken[4].clone().unwrap_err();
        assert_eq!((cap.reason(), cap.verdict()), ("heartbeat_member_cap", Verdict::Ignore));
        assert_eq!(m.len(), 3);
        // Members already in refresh as before.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            m.observe(&hb("run", &peers[0], 2), peers[0], true, later),
            Ok(Observed::Refreshed)
        );
    }

    #[test]
    fn a_member_that_says_it_is_leaving_is_dropped_at_once_and_only_by_itself() {
        let mut m = view();
        let (a, b) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for p in [a, b] {
            assert_eq!(m.observe(&hb("run", &p, 3), p, true, t0), Ok(Observed::Joined(p)));
        }
        let bye = |p: &PeerId, round| Heartbeat { leaving: true, ..hb("run", p, round) };
        // Signed by another: refused, and `a` stays.
        let forged = m.observe(&bye(&a, 4), b, true, t0).unwrap_err();
        assert_eq!(forged.reason(), "heartbeat_impostor");
        // An old goodbye replayed (its sequence number not above the last): stale.
        assert!(matches!(
            m.observe(&bye(&a, 2), a, true, t0),
            Err(HeartbeatRefusal::StaleSeq { .. })
        ));
        assert_eq!(m.len(), 2);
        // Its own, newer: gone now, long before the expiry.
        assert_eq!(m.observe(&bye(&a, 4), a, true, t0), Ok(Observed::Left(a)));
        assert!(m.get(&a).is_none() && m.get(&b).is_some());
        // Its later heartbeats still say goodbye; a stranger's goodbye is nothing.
        assert_eq!(m.observe(&bye(&a, 5), a, true, t0), Ok(Observed::NotAMember));
        let c = PeerId::random();
        assert_eq!(m.observe(&bye(&c, 1), c, true, t0), Ok(Observed::NotAMember));
        assert_eq!(m.len(), 1);
        // Restarted (its sequence number rises across restarts): a member again.
        assert_eq!(m.observe(&hb("run", &a, 9), a, true, t0), Ok(Observed::Joined(a)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever bytes gossip delivers: decoding never panics, and what
        /// the view takes satisfies every bound.
        #[test]
        fn arbitrary_heartbeats_never_panic_and_never_break_a_bound(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            round in any::<u64>(),
            entry_round in any::<u64>(),
            seq in any::<u64>(),
            role in prop_oneof![Just("node".to_string()), Just("joining".to_string()), ".{0,300}"],
            addrs in proptest::collection::vec(".{0,300}", 0..20),
            connected in any::<bool>(),
            leaving in any::<bool>(),
        ) {
            let limits = MemberLimits { max_members: 4, max_round: 1000 };
            let mut m = Membership::new("run", Duration::from_secs(5), limits);
            let t0 = Instant::now();
            let a = PeerId::random();
            if let Ok(decoded) = Heartbeat::decode(bytes.as_slice()) {
                let _ = m.observe(&decoded, a, connected, t0);
            }
            let claim = Heartbeat {
                run_id: "run".into(),
                peer_id: a.to_bytes(),
                addrs,
                round,
                role,
                entry_round,
                fingerprint: "f".into(),
                seq,
                elements: 0,
                leaving,
            };
            let _ = m.observe(&claim, a, connected, t0);
            prop_assert!(m.len() <= 4);
            for member in m.members() {
                prop_assert!(member.round <= 1000 && member.entry_round <= 1000);
                prop_assert!(member.addrs.len() <= MAX_ADDRS);
                prop_assert!(Role::ALL.contains(&member.role));
                prop_assert!(connected, "a stranger without a connection never became one");
            }
        }
    }
}
