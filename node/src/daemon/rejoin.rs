//! Rejoining a running swarm, from both ends, as pure decisions.
//!
//! A node that resumes (`--resume`) starts as `joining` (a member others
//! see but leave out of their exchanges) and picks the live member of its
//! model that is furthest ahead ([`pick_source`]). It watches the run's
//! rounds go by for a moment and picks the round it will enter at, a
//! second of rounds ahead ([`entry_round`]), then announces itself as a
//! trainer from that round (its heartbeat carries it) and sends the member
//! a pull request for it. Every member counts the joiner in from that same
//! round, having heard the announcement well before; members that fix
//! their exchanges' members at a round start (DiLoCo) then agree. The
//! member answers when that round starts, with its strategy's state for it
//! (the parameters to continue from, then what the strategy carries across
//! rounds, such as DiLoCo's theta and outer momentum), each part a
//! `PullReply` message; [`Pull`] assembles and checks them. So the joiner
//! trains that round with everyone, in everyone's exchanges. Where another
//! member trains the same model, the joiner asks it too ([`pick_witness`])
//! and takes the source's state only if the two agree ([`agree`]): one
//! member cannot hand a joiner a model of its own. It asks again every
//! [`PULL_RETRY`] until the state comes (a request that arrives before the
//! joiner's first heartbeat is refused); if none comes by the deadline it
//! continues from its checkpoint.
//!
//! [`PullServer`] is the serving end: it takes requests only from peers of
//! this run and model, one pending per peer, a few in all, and no more often
//! than once per interval per peer; they are answered from the strategy's
//! snapshot at the next round end, never by asking the trainer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::mix::mixer::{Message, MsgKind, StrategyState};
use crate::net::membership::{Member, Role};

/// Pull requests waiting for a round end, over all peers.
pub const MAX_PENDING_PULLS: usize = 8;
/// The least time between two pulls served to one peer.
pub const PULL_INTERVAL: Duration = Duration::from_secs(10);
/// How often a joiner asks again while no answer comes: the source takes a
/// request only from a peer whose heartbeat it has seen.
pub const PULL_RETRY: Duration = Duration::from_secs(2);

/// The member to pull from, and the round it announces: of the live
/// trainers of this model (`fingerprint`), the one at the lower median
/// round. A round is a peer's claim; the median is the quorum's, so one
/// member claiming to be far ahead (to finish a joiner at once, or hand it
/// its own model) is never the one chosen while honest members are the
/// majority. Rounds beyond the run are refused with the heartbeat.
pub fn pick_source(members: &[Member], me: PeerId, fingerprint: &str) -> Option<(PeerId, u64)> {
    let mut live: Vec<&Member> = trainers(members, me, fingerprint).collect();
    live.sort_by_key(|m| (m.round, m.peer));
    live.get(live.len().checked_sub(1)? / 2).map(|m| (m.peer, m.round))
}

/// The live members other than `me` that train this model (`fingerprint`).
fn trainers<'a>(
    members: &'a [Member],
    me: PeerId,
    fingerprint: &'a str,
) -> impl Iterator<Item = &'a Member> {
    members
        .iter()
        .filter(move |m| m.peer != me && m.role == Role::Node && m.fingerprint == fingerprint)
}

/// A second member to check the source's state against: of the other live
/// trainers of this model, the one whose round is nearest `round`.
pub fn pick_witness(
    members: &[Member],
    me: PeerId,
    fingerprint: &str,
    source: PeerId,
    round: u64,
) -> Option<PeerId> {
    trainers(members, me, fingerprint)
        .filter(|m| m.peer != source)
        .min_by_key(|m| (m.round.abs_diff(round), m.peer))
        .map(|m| m.peer)
}

/// How far apart two members' parameters may be, relative to the
/// witness's norm, and still agree. Honest members of one run are within a
/// few percent of each other after a mix (DiLoCo's exactly equal); a
/// model of the source's own making is not.
pub const WITNESS_TOLERANCE: f64 = 0.25;

/// Whether the `source`'s pulled state agrees with the `witness`'s: the
/// same parts, and parameters (the first part) within
/// `WITNESS_TOLERANCE`. Says how they differ if not.
pub fn agree(source: &StrategyState, witness: &StrategyState) -> Result<(), String> {
    // Rounds are not compared: a member past the entry round answers at
    // its own, and a fast run's members answer many rounds apart (seen:
    // an honest pair refused for it under a clean clone's load).
    if source.names() != witness.names() {
        return Err(format!(
            "round {} {:?} against the witness's round {} {:?}",
            source.round,
            source.names(),
            witness.round,
            witness.names()
        ));
    }
    let (Some(a), Some(b)) = (source.parts.first(), witness.parts.first()) else { return Ok(()) };
    if a.values.len() != b.values.len() {
        return Err(format!("{} values against the witness's {}", a.values.len(), b.values.len()));
    }
    let norm = b.values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let distance = crate::mix::aggregate::l2_distance(&a.values, &b.values);
    if distance.is_nan() || distance > WITNESS_TOLERANCE * norm {
        return Err(format!(
            "parameters {distance:.3e} from the witness's (norm {norm:.3e}; at most {WITNESS_TOLERANCE} of it)"
        ));
    }
    Ok(())
}

/// A state being pulled from one member.
#[derive(Debug)]
pub struct Pull {
    pub from: PeerId,
    names: Vec<String>,
    round: Option<u64>,
    parts: BTreeMap<u32, Vec<f32>>,
}

impl Pull {
    /// Expects the parts `names` (the local strategy's, in order) from `from`.
    pub fn new(from: PeerId, names: Vec<String>) -> Pull {
        Pull { from, names, round: None, parts: BTreeMap::new() }
    }

    /// Whether `m` is an answer to this pull (the driver keeps the rest).
    pub fn answers(&self, m: &Message) -> bool {
        m.kind == MsgKind::PullReply && m.peer == self.from
    }

    /// Takes one part; returns the whole state once every part of one
    /// round has arrived. A part of another round than the first one seen
    /// restarts the assembly (the member answered twice, rounds apart).
    pub fn offer(&mut self, m: Message) -> Result<Option<StrategyState>, &'static str> {
        if !self.answers(&m) {
            return Err("not_the_pull");
        }
        if m.part as usize >= self.names.len() {
            return Err("unknown_part");
        }
        if m.offset != 0 {
            return Err("wrong_offset");
        }
        if self.round != Some(m.slot) {
            self.round = Some(m.slot);
            self.parts.clear();
        }
        self.parts.insert(m.part, m.values.to_vec());
        if self.parts.len() < self.names.len() {
            return Ok(None);
        }
        let parts = std::mem::take(&mut self.parts);
        let named: Vec<(&str, Vec<f32>)> =
            self.names.iter().map(String::as_str).zip(parts.into_values()).collect();
        Ok(Some(StrategyState::new(m.slot, named)))
    }
}

/// The messages that carry `state` to `peer`, one per part.
pub fn reply(peer: PeerId, state: &StrategyState) -> Vec<Message> {
    state
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| Message {
            part: i as u32,
            ..Message::new(peer, MsgKind::PullReply, state.round, p.values.clone())
        })
        .collect()
}

/// The request a rejoining node sends: one zero value (the wire carries no
/// empty payloads) for the round its checkpoint holds.
pub fn request(peer: PeerId, saved_round: u64) -> Message {
    Message::new(peer, MsgKind::PullRequest, saved_round, std::sync::Arc::new(vec![0.0]))
}

/// How long a joiner watches the run's rounds go by before it picks the
/// round to enter at, and how far ahead (in time) it picks it.
pub const RATE_WINDOW: Duration = Duration::from_secs(2);
pub const ENTRY_LEAD: Duration = Duration::from_secs(1);

/// The round a joiner enters at: far enough ahead that every member hears
/// its announcement first (`ENTRY_LEAD` at the rate the run's rounds went,
/// from round `r0` to `r1` in `elapsed`, plus two rounds).
pub fn entry_round(r0: u64, r1: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let rate = r1.saturating_sub(r0) as f64 / secs;
    r1.saturating_add((rate * ENTRY_LEAD.as_secs_f64()).ceil() as u64).saturating_add(2)
}

/// The pull requests a node has taken and not yet answered, with the
/// round each joiner enters at.
#[derive(Debug, Default)]
pub struct PullServer {
    pending: BTreeMap<PeerId, u64>,
    served: BTreeMap<PeerId, Instant>,
}

impl PullServer {
    /// Takes a request from `peer` to enter at round `entry` (its announced
    /// membership in `members`), or says why not.
    pub fn request(
        &mut self,
        peer: PeerId,
        entry: u64,
        members: &[Member],
        fingerprint: &str,
        now: Instant,
    ) -> Result<(), &'static str> {
        let known = members.iter().any(|m| {
            m.peer == peer
                && m.fingerprint == fingerprint
                && (m.role == Role::Node || m.role == Role::Joining)
        });
        if !known {
            return Err("pull_from_non_member");
        }
        if self.pending.contains_key(&peer) {
            return Err("pull_already_pending");
        }
        if self.served.get(&peer).is_some_and(|t| now.saturating_duration_since(*t) < PULL_INTERVAL)
        {
            return Err("pull_too_soon");
        }
        if self.pending.len() >= MAX_PENDING_PULLS {
            return Err("too_many_pulls");
        }
        self.pending.insert(peer, entry);
        Ok(())
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The pending peers that `ready` accepts, given their entry rounds
    /// (the others stay pending), marked as served.
    pub fn take(&mut self, now: Instant, ready: impl Fn(&PeerId, u64) -> bool) -> Vec<PeerId> {
        let (due, wait): (BTreeMap<PeerId, u64>, BTreeMap<PeerId, u64>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(p, e)| ready(p, *e));
        self.pending = wait;
        let due: Vec<PeerId> = due.into_keys().collect();
        for p in &due {
            self.served.insert(*p, now);
        }
        self.served.retain(|_, t| now.saturating_duration_since(*t) < PULL_INTERVAL);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(peer: PeerId, round: u64, role: Role, fp: &str) -> Member {
        Member {
            peer,
            addrs: Vec::new(),
            round,
            role,
            fingerprint: fp.into(),
            entry_round: 0,
            elements: 0,
            last_seen: Instant::now(),
            seq: 1,
        }
    }

    #[test]
    fn the_source_is_the_trainer_of_this_model_furthest_ahead() {
        let (me, a, b, c, d) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        let members = [
            member(me, 50, Role::Node, "fp"),
            member(a, 7, Role::Node, "fp"),
            member(b, 9, Role::Node, "fp"),
            member(c, 30, Role::Node, "other"),
            member(d, 40, Role::Joining, "fp"),
        ];
        assert_eq!(pick_source(&members, me, "fp"), Some((a, 7)), "the lower of two");
        assert_eq!(pick_source(&members[..1], me, "fp"), None, "alone");
    }

    #[test]
    fn one_member_claiming_to_be_far_ahead_is_not_the_source() {
        let me = PeerId::random();
        let honest: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let liar = PeerId::random();
        let mut members: Vec<Member> = honest
            .iter()
            .zip([100, 101, 99])
            .map(|(p, r)| member(*p, r, Role::Node, "fp"))
            .collect();
        members.push(member(liar, u64::MAX, Role::Node, "fp"));
        let (source, round) = pick_source(&members, me, "fp").unwrap();
        assert!(honest.contains(&source) && round == 100, "{source} at {round}");
        // Entry arithmetic on the largest rounds saturates, never wraps.
        assert_eq!(entry_round(0, u64::MAX, Duration::from_secs(1)), u64::MAX);
    }

    #[test]
    fn the_witness_is_another_trainer_of_this_model_nearest_the_source() {
        let ids: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let (me, source) = (ids[0], ids[1]);
        let members = [
            member(me, 50, Role::Node, "fp"),
            member(source, 10, Role::Node, "fp"),
            member(ids[2], 30, Role::Node, "fp"),
            member(ids[3], 11, Role::Joining, "fp"),
            member(ids[4], 12, Role::Node, "other"),
        ];
        assert_eq!(pick_witness(&members, me, "fp", source, 10), Some(ids[2]));
        assert_eq!(pick_witness(&members[..2], me, "fp", source, 10), None);
    }

    #[test]
    fn a_source_state_far_from_the_witness_is_refused_with_the_distance() {
        let state = |round, x: Vec<f32>| StrategyState::new(round, vec![("params", x)]);
        let honest = state(7, vec![1.0, 2.0, 3.0]);
        assert_eq!(agree(&state(7, vec![1.1, 2.0, 2.9]), &honest), Ok(()));
        let own = agree(&state(7, vec![-1.0, 2.0, 3.0]), &honest).unwrap_err();
        assert!(own.contains("from the witness's"), "{own}");
        assert_eq!(agree(&state(60, vec![1.0, 2.0, 3.0]), &honest), Ok(()), "rounds apart");
        let other_parts =
            StrategyState::new(7, vec![("params", vec![1.0, 2.0, 3.0]), ("m", vec![0.0; 3])]);
        assert!(agree(&other_parts, &honest).unwrap_err().contains("against the witness's"));
        assert!(agree(&state(7, vec![1.0, 2.0]), &honest).unwrap_err().contains("2 values"));
        let nan = agree(&state(7, vec![f32::NAN, 2.0, 3.0]), &honest);
        assert!(nan.is_err(), "NaN is never within the tolerance");
    }

    #[test]
    fn a_joiner_enters_a_second_of_rounds_ahead_plus_two() {
        // 100 rounds in 2 s: 50 a second, so 50 + 2 ahead of round 130.
        assert_eq!(entry_round(30, 130, Duration::from_secs(2)), 182);
        // A run whose rounds take longer than the window: two ahead.
        assert_eq!(entry_round(7, 7, Duration::from_secs(2)), 9);
        assert_eq!(entry_round(7, 8, Duration::from_secs(2)), 11, "0.5 a second rounds up");
    }

    #[test]
    fn a_pull_assembles_the_parts_of_one_round() {
        let from = PeerId::random();
        let names = vec!["params".to_string(), "outer_momentum".to_string()];
        let mut pull = Pull::new(from, names);
        let state = StrategyState::new(
            5,
            vec![("params", vec![1.0, 2.0]), ("outer_momentum", vec![0.5, 0.0])],
        );
        let mut parts = reply(from, &state);
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[1].kind, parts[1].slot, parts[1].part), (MsgKind::PullReply, 5, 1));
        // A stranger's reply, and a part from an older answer, are not taken.
        let stranger = Message { peer: PeerId::random(), ..parts[0].clone() };
        assert_eq!(pull.offer(stranger), Err("not_the_pull"));
        let old = Message { slot: 4, ..parts[1].clone() };
        assert_eq!(pull.offer(old), Ok(None));
        assert_eq!(pull.offer(Message { part: 2, ..parts[0].clone() }), Err("unknown_part"));
        assert_eq!(pull.offer(parts.remove(1)), Ok(None), "round 5 restarts the assembly");
        let got = pull.offer(parts.remove(0)).unwrap().unwrap();
        assert_eq!(got, state);
    }

    #[test]
    fn pulls_are_served_to_members_once_each_and_not_too_often() {
        let fp = "fp";
        let peers: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let members: Vec<Member> = peers.iter().map(|p| member(*p, 1, Role::Joining, fp)).collect();
        let mut s = PullServer::default();
        let t0 = Instant::now();
        assert_eq!(s.request(PeerId::random(), 5, &members, fp, t0), Err("pull_from_non_member"));
        let wrong_model = [member(peers[0], 1, Role::Node, "other")];
        assert_eq!(s.request(peers[0], 5, &wrong_model, fp, t0), Err("pull_from_non_member"));
        assert_eq!(s.request(peers[0], 5, &members, fp, t0), Ok(()));
        assert_eq!(s.request(peers[0], 5, &members, fp, t0), Err("pull_already_pending"));
        for p in &peers[1..MAX_PENDING_PULLS] {
            assert_eq!(s.request(*p, 9, &members, fp, t0), Ok(()));
        }
        assert_eq!(s.request(peers[11], 5, &members, fp, t0), Err("too_many_pulls"));
        // Answered at the round each one enters at: peers[0] at 5, the rest at 9.
        assert_eq!(s.take(t0, |_, entry| entry <= 5), vec![peers[0]]);
        assert!(s.has_pending());
        assert_eq!(s.take(t0, |_, entry| entry <= 9).len(), MAX_PENDING_PULLS - 1);
        assert!(!s.has_pending());
        let later = t0 + PULL_INTERVAL / 2;
        assert_eq!(s.request(peers[0], 20, &members, fp, later), Err("pull_too_soon"));
        assert_eq!(s.request(peers[0], 20, &members, fp, t0 + PULL_INTERVAL), Ok(()));
        let req = request(peers[0], 3);
        assert_eq!((req.kind, req.slot, req.values.len()), (MsgKind::PullRequest, 3, 1));
    }
}
