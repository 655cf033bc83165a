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
//! trains that round with everyone, in everyone's exchanges. Where other
//! members train the same model, the joiner asks up to four of them too
//! ([`Pulls`]) and [`settle`]s the answers: of three or more, it takes the
//! coordinate-wise median, which lies between honest members' values in
//! every coordinate while fewer than half of them lie, however far apart
//! honest members are (a sparse topology with nodes down leaves them 40%
//! apart); of two, it takes the source's state only if the two agree
//! ([`agree`]). So one member cannot hand a joiner a model of its own. It asks again every
//! [`PULL_RETRY`] until the state comes (a request that arrives before the
//! joiner's first heartbeat is refused), and while fewer than three have
//! answered it asks members that have come back into the run since (under
//! churn, those asked may stop and restart meanwhile); if none comes by the
//! deadline it continues from its checkpoint.
//!
//! [`PullServer`] is the serving end: it takes requests only from peers of
//! this run and model, one pending per peer, a few in all, and no more often
//! than once per interval per peer; they are answered from the strategy's
//! snapshot at the next round end, never by asking the trainer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::mix::aggregate::Aggregator;
use crate::mix::mixer::{Message, MsgKind, StatePart, StrategyState};
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

/// The live members other than `me` that train this model (`fingerprint`)
/// and have entered the run: a member that announced its entry round but
/// has not reached it (it is pulling the state itself, and its heartbeat
/// still says the round its process started at) has no state to give.
fn trainers<'a>(
    members: &'a [Member],
    me: PeerId,
    fingerprint: &'a str,
) -> impl Iterator<Item = &'a Member> {
    members.iter().filter(move |m| {
        m.peer != me
            && m.role == Role::Node
            && m.fingerprint == fingerprint
            && m.round >= m.entry_round
    })
}

/// How many answers a joiner takes the coordinate-wise median of: three,
/// the fewest whose median one liar cannot move outside the honest
/// members' values.
pub const PULL_QUORUM: usize = 3;
/// How many members a joiner asks, where that many train its model: more
/// than the quorum, since under churn a member asked may stop or restart
/// before it answers (with five, two liars are outvoted too).
pub const PULL_ASK: usize = 5;

/// Up to `k` members to ask besides those `asked`: of the live trainers of
/// this model, those whose rounds are nearest `round`.
pub fn pick_witnesses(
    members: &[Member],
    me: PeerId,
    fingerprint: &str,
    asked: &[PeerId],
    round: u64,
    k: usize,
) -> Vec<PeerId> {
    let mut others: Vec<&Member> =
        trainers(members, me, fingerprint).filter(|m| !asked.contains(&m.peer)).collect();
    others.sort_by_key(|m| (m.round.abs_diff(round), m.peer));
    others.into_iter().take(k).map(|m| m.peer).collect()
}

/// The pulls a joiner has out: whom it asked and what came back. A member
/// asked that stops training before it answers (it stopped, died, or
/// restarted and is pulling itself) is dropped and another asked instead,
/// so the joiner keeps a quorum where the run has one.
#[derive(Debug)]
pub struct Pulls {
    names: Vec<String>,
    /// How many answers the joiner wants: those it asked first (`PULL_ASK`
    /// at most), and at least `PULL_QUORUM` where members come back.
    wanted: usize,
    asked: Vec<PeerId>,
    open: Vec<(Pull, Option<StrategyState>)>,
    /// The round the members to ask are picked near.
    round: u64,
}

impl Pulls {
    /// Asks `source` and up to `PULL_ASK - 1` witnesses near `round` for
    /// the parts `names`.
    pub fn new(
        names: Vec<String>,
        members: &[Member],
        me: PeerId,
        fingerprint: &str,
        source: PeerId,
        round: u64,
    ) -> Pulls {
        let witnesses = pick_witnesses(members, me, fingerprint, &[source], round, PULL_ASK - 1);
        let asked: Vec<PeerId> = std::iter::once(source).chain(witnesses).collect();
        let open = asked.iter().map(|p| (Pull::new(*p, names.clone()), None)).collect();
        let wanted = asked.len().max(PULL_QUORUM);
        Pulls { names, wanted, asked, open, round }
    }

    /// Every member asked, in the order asked.
    pub fn asked(&self) -> &[PeerId] {
        &self.asked
    }

    /// The members asked that have not answered.
    pub fn waiting(&self) -> Vec<PeerId> {
        self.open.iter().filter(|(_, got)| got.is_none()).map(|(p, _)| p.from).collect()
    }

    /// Whether every member still asked has answered.
    pub fn done(&self) -> bool {
        self.open.iter().all(|(_, got)| got.is_some())
    }

    /// Takes `m` if it answers a pull (`None`: it does not, keep it):
    /// whether it completed a state, or why the part was not taken.
    pub fn offer(&mut self, m: Message) -> Option<Result<Option<(PeerId, u64)>, &'static str>> {
        let (pull, got) = self.open.iter_mut().find(|(p, _)| p.answers(&m))?;
        Some(pull.offer(m).map(|state| {
            let state = state?;
            let done = (pull.from, state.round);
            *got = Some(state);
            Some(done)
        }))
    }

    /// Drops the unanswered pulls of members no longer training and asks
    /// others in their place, up to those wanted: members that were not
    /// training before (restarted ones back in the run), and those asked
    /// before that dropped out and are training again. Two honest answers
    /// may lie too far apart to agree ([`settle`]), so a joiner that asked
    /// only two (the others were restarting) asks a third once one is
    /// back. Returns the newly asked.
    pub fn refresh(&mut self, members: &[Member], me: PeerId, fingerprint: &str) -> Vec<PeerId> {
        let live: Vec<PeerId> = trainers(members, me, fingerprint).map(|m| m.peer).collect();
        self.open.retain(|(p, got)| got.is_some() || live.contains(&p.from));
        let missing = self.wanted.saturating_sub(self.open.len());
        let open: Vec<PeerId> = self.open.iter().map(|(p, _)| p.from).collect();
        let more = pick_witnesses(members, me, fingerprint, &open, self.round, missing);
        for p in &more {
            if !self.asked.contains(p) {
                self.asked.push(*p);
            }
            self.open.push((Pull::new(*p, self.names.clone()), None));
        }
        more
    }

    /// The answers, in the order asked.
    pub fn answers(self) -> Vec<Answer> {
        self.open.into_iter().filter_map(|(p, got)| Some((p.from, got?))).collect()
    }
}

/// What a joiner takes from the answers to its pull: a state, and the
/// member whose answer it is (of a median, the first voter's).
#[derive(Debug, Clone, PartialEq)]
pub enum Settled {
    /// The coordinate-wise median of this many answers of one shape.
    Median(PeerId, StrategyState, usize),
    /// The first of two answers that agree (the source's, when it answered).
    Witnessed(PeerId, StrategyState),
    /// The only answer: nothing to check it against.
    Unchecked(PeerId, StrategyState),
}

impl Settled {
    pub fn into_state(self) -> (PeerId, StrategyState) {
        match self {
            Settled::Median(p, s, _) | Settled::Witnessed(p, s) | Settled::Unchecked(p, s) => {
                (p, s)
            }
        }
    }
}

/// One member's answer to a pull.
pub type Answer = (PeerId, StrategyState);

/// Settles the `answers` to a pull (the source's first where it answered):
/// the median of the largest group of one shape (parts and lengths) when it
/// holds at least `PULL_QUORUM`, else the first two checked against each other
/// ([`agree`]), else the only one. The round taken is the lower median of
/// the voters' rounds (of two, the lower), at most `last_round`: a member
/// past the entry round answers at its own, and a liar's round is outvoted
/// or capped.
pub fn settle(answers: Vec<Answer>, last_round: u64) -> Result<Option<Settled>, String> {
    let shape = |s: &StrategyState| -> Vec<(String, usize)> {
        s.parts.iter().map(|p| (p.name.clone(), p.values.len())).collect()
    };
    let mut groups: Vec<Vec<&Answer>> = Vec::new();
    for a in &answers {
        match groups.iter_mut().find(|g| shape(&g[0].1) == shape(&a.1)) {
            Some(g) => g.push(a),
            None => groups.push(vec![a]),
        }
    }
    // The largest group; of equal ones, the first formed (the source's).
    let largest = groups.iter().rev().max_by_key(|g| g.len()).cloned().unwrap_or_default();
    let capped = |mut s: StrategyState, voters: &[&Answer]| {
        let mut r: Vec<u64> = voters.iter().map(|(_, a)| a.round).collect();
        r.sort_unstable();
        s.round = r[(r.len() - 1) / 2].min(last_round);
        s
    };
    if largest.len() >= PULL_QUORUM {
        let voters = &largest[..];
        let first = &voters[0].1;
        let parts = (0..first.parts.len())
            .map(|i| {
                let others: Vec<(&[f32], f64)> =
                    voters[1..].iter().map(|(_, s)| (s.parts[i].values.as_slice(), 1.0)).collect();
                let median = Aggregator::Median.aggregate(&first.parts[i].values, 1.0, &others);
                StatePart { name: first.parts[i].name.clone(), values: Arc::new(median) }
            })
            .collect();
        let state = capped(StrategyState { round: 0, parts }, voters);
        return Ok(Some(Settled::Median(voters[0].0, state, voters.len())));
    }
    let pair = if largest.len() == 2 { largest } else { answers.iter().take(2).collect() };
    match pair[..] {
        [] => Ok(None),
        [only] => Ok(Some(Settled::Unchecked(only.0, capped(only.1.clone(), &[only])))),
        [a, b, ..] => {
            agree(&a.1, &b.1)?;
            Ok(Some(Settled::Witnessed(a.0, capped(a.1.clone(), &[a, b]))))
        }
    }
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
    fn the_witnesses_are_two_other_trainers_of_this_model_nearest_the_source() {
        let ids: Vec<PeerId> = (0..6).map(|_| PeerId::random()).collect();
        let (me, source) = (ids[0], ids[1]);
        let members = [
            member(me, 50, Role::Node, "fp"),
            member(source, 10, Role::Node, "fp"),
            member(ids[2], 30, Role::Node, "fp"),
            member(ids[3], 11, Role::Joining, "fp"),
            member(ids[4], 12, Role::Node, "other"),
            member(ids[5], 9, Role::Node, "fp"),
        ];
        let pick = |m: &[Member]| pick_witnesses(m, me, "fp", &[source], 10, 2);
        assert_eq!(pick(&members), vec![ids[5], ids[2]]);
        assert_eq!(pick(&members[..3]), vec![ids[2]]);
        assert!(pick(&members[..2]).is_empty());
        // A member that announced entry at round 40 and has not reached it
        // (a restarted process still pulling, at round 0) is neither.
        let mut pulling = members.to_vec();
        pulling[5].entry_round = 40;
        pulling[2] = Member { round: 0, entry_round: 40, ..pulling[2].clone() };
        assert!(pick(&pulling).is_empty());
        let mut all_pulling = pulling.clone();
        all_pulling[1].entry_round = 40;
        assert_eq!(pick_source(&all_pulling, me, "fp"), None);
    }

    #[test]
    fn a_member_asked_that_stops_training_is_replaced_by_another() {
        let ids: Vec<PeerId> = (0..9).map(|_| PeerId::random()).collect();
        let me = ids[0];
        let rounds = [0, 20, 21, 22, 23, 24, 25, 40, 50];
        let mut members: Vec<Member> =
            ids.iter().zip(rounds).map(|(p, r)| member(*p, r, Role::Node, "fp")).collect();
        let names = vec!["params".to_string()];
        let mut pulls = Pulls::new(names, &members, me, "fp", ids[3], 22);
        assert_eq!(pulls.asked()[0], ids[3], "the source first");
        let mut asked = pulls.asked().to_vec();
        asked.sort();
        let mut near: Vec<PeerId> = ids[1..6].to_vec();
        near.sort();
        assert_eq!(asked, near, "then the four nearest its round");
        // ids[3] answers; ids[1] restarts (joining again) and ids[2] dies.
        let state = StrategyState::new(22, vec![("params", vec![1.0])]);
        let reply = reply(ids[3], &state).remove(0);
        assert_eq!(pulls.offer(reply), Some(Ok(Some((ids[3], 22)))));
        let stranger = Message::new(ids[8], MsgKind::PullReply, 22, Arc::new(vec![1.0]));
        assert_eq!(pulls.offer(stranger), None, "not asked: kept for the strategy");
        members[1].role = Role::Joining;
        members.remove(2);
        // In their place, the nearest round 22 of the others: 25, then 40.
        assert_eq!(pulls.refresh(&members, me, "fp"), vec![ids[6], ids[7]]);
        let mut waiting = pulls.waiting();
        waiting.sort();
        let mut want = vec![ids[4], ids[5], ids[6], ids[7]];
        want.sort();
        assert_eq!(waiting, want);
        assert!(!pulls.done());
        // With nobody left to ask, the pulls still out are dropped: done.
        members.truncate(3);
        assert!(pulls.refresh(&members, me, "fp").is_empty());
        assert!(pulls.done());
        assert_eq!(pulls.answers(), vec![(ids[3], state)]);
    }

    #[test]
    fn two_answers_wait_for_a_third_member_while_one_may_come_back() {
        let ids: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let me = ids[0];
        let mut members: Vec<Member> =
            ids.iter().map(|p| member(*p, 30, Role::Node, "fp")).collect();
        // ids[4] restarted and is pulling itself: not asked.
        members[4].role = Role::Joining;
        let names = vec!["params".to_string()];
        let mut pulls = Pulls::new(names, &members, me, "fp", ids[1], 30);
        let sorted = |p: &[PeerId]| {
            let mut p = p.to_vec();
            p.sort();
            p
        };
        assert_eq!(sorted(pulls.asked()), sorted(&ids[1..4]));
        let state = StrategyState::new(30, vec![("params", vec![1.0])]);
        for p in [ids[1], ids[2]] {
            assert!(matches!(pulls.offer(reply(p, &state).remove(0)), Some(Ok(Some(_)))));
        }
        assert!(!pulls.done(), "the third has not answered");
        // ids[3] restarts before it answers, and ids[4] is back: asked in
        // its place, so that three answer.
        members[3].role = Role::Joining;
        members[4].role = Role::Node;
        assert_eq!(pulls.refresh(&members, me, "fp"), vec![ids[4]]);
        assert!(!pulls.done());
        // ids[4] restarts again; ids[3] is back, and asked again (listed
        // once): a member asked before is not passed over for good.
        members[3].role = Role::Node;
        members[4].role = Role::Joining;
        assert_eq!(pulls.refresh(&members, me, "fp"), vec![ids[3]]);
        assert_eq!(sorted(pulls.asked()), sorted(&ids[1..5]));
        assert!(matches!(pulls.offer(reply(ids[3], &state).remove(0)), Some(Ok(Some(_)))));
        assert!(pulls.done());
        assert_eq!(pulls.answers().len(), 3);
        // With nobody back, the two answers are all there are.
        let mut two = Pulls::new(vec!["params".into()], &members, me, "fp", ids[1], 30);
        for p in [ids[1], ids[2]] {
            assert!(matches!(two.offer(reply(p, &state).remove(0)), Some(Ok(Some(_)))));
        }
        members[3].role = Role::Joining;
        assert!(two.refresh(&members, me, "fp").is_empty());
        assert!(two.done());
    }

    fn answer(round: u64, x: Vec<f32>) -> Answer {
        (PeerId::random(), StrategyState::new(round, vec![("params", x)]))
    }

    #[test]
    fn three_answers_settle_on_their_median_which_one_liar_cannot_move() {
        // Honest members 40% apart (too far for the pairwise tolerance),
        // and a liar with a model of its own and a round at the end.
        let a = answer(20, vec![1.0, -2.0, 3.0]);
        let b = answer(21, vec![1.4, -1.2, 4.2]);
        let liar = answer(u64::MAX, vec![1e30, 1e30, -1e30]);
        assert!(agree(&a.1, &b.1).is_err(), "the pair alone is refused");
        for order in [[&liar, &a, &b], [&a, &liar, &b], [&a, &b, &liar]] {
            let got = settle(order.map(|s| s.clone()).to_vec(), 99).unwrap().unwrap();
            let Settled::Median(from, m, 3) = got else { panic!("{got:?}") };
            assert_eq!(from, order[0].0, "named by the first voter");
            // Every coordinate between the honest two; the round theirs.
            assert_eq!(*m.parts[0].values, vec![1.4, -1.2, 3.0]);
            assert_eq!(m.round, 21);
        }
        let c = answer(22, vec![1.2, -1.6, 3.6]);
        let (_, m) = settle(vec![a, b, c], 99).unwrap().unwrap().into_state();
        assert_eq!((m.parts[0].values.to_vec(), m.round), (vec![1.2, -1.6, 3.6], 21));
        // A round past the run is capped at its last one.
        let late = |r| answer(r, vec![1.0, -2.0, 3.0]);
        let got = settle(vec![late(500), late(600), late(700)], 99).unwrap().unwrap();
        assert_eq!(got.into_state().1.round, 99);
    }

    #[test]
    fn fewer_answers_or_shapes_fall_back_to_the_pair_and_the_single_answer() {
        let honest = answer(7, vec![1.0, 2.0, 3.0]);
        let near = answer(5, vec![1.1, 2.0, 2.9]);
        assert_eq!(settle(vec![], 99), Ok(None));
        let only = settle(vec![honest.clone()], 99);
        assert_eq!(only, Ok(Some(Settled::Unchecked(honest.0, honest.1.clone()))));
        // Two that agree: the first's values at the lower round.
        let got = settle(vec![honest.clone(), near.clone()], 99).unwrap().unwrap();
        let at_5 = StrategyState { round: 5, ..honest.1.clone() };
        assert_eq!(got, Settled::Witnessed(honest.0, at_5));
        let own = answer(7, vec![-1.0, 2.0, 3.0]);
        let refused = settle(vec![own, honest.clone()], 99).unwrap_err();
        assert!(refused.contains("from the witness's"), "{refused}");
        // A liar of another shape is left out of three; the two left agree.
        let short = answer(7, vec![9.0, 9.0]);
        let got = settle(vec![short.clone(), honest.clone(), near], 99).unwrap().unwrap();
        assert!(
            matches!(got, Settled::Witnessed(p, s) if p == honest.0 && s.parts == honest.1.parts)
        );
        // Three shapes: the first two are compared, and differ.
        let other = StrategyState::new(7, vec![("params", vec![1.0; 3]), ("m", vec![0.0; 3])]);
        let all = settle(vec![honest, short, (PeerId::random(), other)], 99).unwrap_err();
        assert!(all.contains("values against"), "{all}");
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
