//! The view of a run's live members, built from gossiped heartbeats.
//!
//! Sans-IO: heartbeats and the current time come in as arguments, joins and
//! departures come out, so expiry can be tested exactly. A member that has
//! been silent for longer than `expiry` has left.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use murmur_proto::wire::v1::Heartbeat;

/// The role of a member that trains.
pub const ROLE_NODE: &str = "node";
/// The role of a node that is pulling the run's state to rejoin: a member
/// others see, but not one that takes part in exchanges yet.
pub const ROLE_JOINING: &str = "joining";

/// What the view knows of one member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub round: u64,
    pub role: String,
    pub fingerprint: String,
    /// The first round it takes part in (`Heartbeat::entry_round`).
    pub entry_round: u64,
    pub last_seen: Instant,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    Joined(PeerId),
    Left(PeerId),
}

/// Why a heartbeat was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatRefusal {
    #[error("heartbeat for run {got:?}, this node is in run {want:?}")]
    WrongRun { got: String, want: String },
    #[error("heartbeat names peer {claimed} but came from {source_peer}")]
    Impostor { claimed: String, source_peer: PeerId },
    #[error("heartbeat peer id is not valid ({0})")]
    BadPeerId(String),
}

impl HeartbeatRefusal {
    /// Stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            HeartbeatRefusal::WrongRun { .. } => "heartbeat_wrong_run",
            HeartbeatRefusal::Impostor { .. } => "heartbeat_impostor",
            HeartbeatRefusal::BadPeerId(_) => "heartbeat_bad_peer_id",
        }
    }
}

#[derive(Debug)]
pub struct Membership {
    run_id: String,
    expiry: Duration,
    members: BTreeMap<PeerId, Member>,
}

impl Membership {
    pub fn new(run_id: impl Into<String>, expiry: Duration) -> Membership {
        Membership { run_id: run_id.into(), expiry, members: BTreeMap::new() }
    }

    /// Takes a heartbeat that gossip delivered from `source`.
    pub fn observe(
        &mut self,
        hb: &Heartbeat,
        source: PeerId,
        now: Instant,
    ) -> Result<Option<MemberEvent>, HeartbeatRefusal> {
        if hb.run_id != self.run_id {
            return Err(HeartbeatRefusal::WrongRun {
                got: hb.run_id.clone(),
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
        let member = Member {
            peer: source,
            // Unparsable addresses are skipped: they only cost a dial target.
            addrs: hb.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            round: hb.round,
            role: hb.role.clone(),
            fingerprint: hb.fingerprint.clone(),
            entry_round: hb.entry_round,
            last_seen: now,
        };
        // A member that changes role (a rejoining node that has its state
        // and now trains) joins anew in the role it announces.
        let previous = self.members.insert(source, member);
        let joined = previous.is_none_or(|p| p.role != hb.role || p.entry_round != hb.entry_round);
        Ok(joined.then_some(MemberEvent::Joined(source)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(run: &str, peer: &PeerId, round: u64) -> Heartbeat {
        Heartbeat {
            run_id: run.into(),
            peer_id: peer.to_bytes(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into(), "not an addr".into()],
            round,
            role: "node".into(),
            entry_round: 0,
            fingerprint: "f".into(),
            seq: 1,
        }
    }

    #[test]
    fn join_refresh_and_expire() {
        let t0 = Instant::now();
        let mut m = Membership::new("run", Duration::from_secs(5));
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(m.observe(&hb("run", &a, 1), a, t0), Ok(Some(MemberEvent::Joined(a))));
        assert_eq!(m.observe(&hb("run", &b, 1), b, t0), Ok(Some(MemberEvent::Joined(b))));
        assert_eq!(m.observe(&hb("run", &a, 2), a, t0 + Duration::from_secs(4)), Ok(None));
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
        let mut m = Membership::new("run", Duration::from_secs(5));
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(
            m.observe(&hb("other", &a, 1), a, t0).unwrap_err().reason(),
            "heartbeat_wrong_run"
        );
        assert_eq!(m.observe(&hb("run", &a, 1), b, t0).unwrap_err().reason(), "heartbeat_impostor");
        let mut bad = hb("run", &a, 1);
        bad.peer_id = vec![1, 2, 3];
        assert_eq!(m.observe(&bad, a, t0).unwrap_err().reason(), "heartbeat_bad_peer_id");
        assert!(m.is_empty());
    }
}
