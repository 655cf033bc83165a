//! A strategy under a coordinator: semi-decentralized training (gossip plus
//! the coordinator's averages) and federated averaging (no gossip, the
//! coordinator's average every round).
//!
//! `Coordinated` wraps the node's own strategy and adds what the
//! coordinator asks of a member. Every sampling round r (every H_s rounds,
//! the first at H_s - 1) the coordinator tells every live member, ahead of
//! time, what to do at the end of r: send its parameters (sampled), keep
//! them as the reference an average will correct (sampled-to-all, not
//! sampled), or nothing (sampled-to-sample, not sampled). At the end of r,
//! after r's own mixing, a member that was asked to send or keep waits, up
//! to `wait`, for r's average and continues from exactly it. A member that
//! reaches the end of a sampling round before its request waits for the
//! request too: so a member that runs ahead cannot slip out of the
//! coordinator's rounds. A request for a round the member has already
//! ended is answered with what it has, without waiting; an average that
//! comes after the member went on is applied as a correction at its next
//! round end, x <- x + (average - x_r), which moves its round-r state to
//! the average and keeps what it learnt since.
//!
//! A wait that ends without the coordinator marks it lost: the member goes
//! on with its own strategy alone and waits no more until the coordinator
//! is heard again. So a coordinator that dies costs each member one `wait`.
//!
//! Only the coordinator named by `--coordinator` is heard; its average must
//! be of the model's length and finite (the wire checks that) and answer a
//! request this member had.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::mixer::{
    Action, Drops, Input, Message, Mixer, MsgKind, OuterStatus, StateError, StrategyState,
};

/// Requests held for rounds ahead (an honest coordinator has one out).
const MAX_REQUESTS: usize = 4;
/// References kept for averages still to come (each is a model's worth).
const MAX_REFERENCES: usize = 2;
/// How far ahead of this member a request may be.
const MAX_ROUNDS_AHEAD: u64 = 1 << 20;

/// What a sample request asks (its body's first value).
pub const ASK_SEND: f32 = 1.0;
pub const ASK_KEEP: f32 = 0.0;
pub const ASK_NOTHING: f32 = 2.0;

#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatedConfig {
    /// The coordinator's peer id: nobody else's requests or averages count.
    pub coordinator: PeerId,
    /// How long a member waits at a sampling round's end for its request,
    /// and then for its average.
    pub wait: Duration,
    /// The sample weight this member declares (its training examples).
    pub weight: f64,
}

/// What a member did with its coordinator, for status and summaries.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Coordination {
    /// Rounds this member was sampled in (its parameters sent).
    pub sampled: u64,
    /// Rounds it only kept its parameters for (S2A, not sampled).
    pub noticed: u64,
    /// Averages it took: at the round's end, or later as a correction.
    pub averages: u64,
    pub corrections: u64,
    /// Waits for a request or an average that ended without one.
    pub timeouts: u64,
    /// The round of the last average taken.
    pub last_round: Option<u64>,
    /// Whether it waits for the coordinator now.
    pub waiting: bool,
    /// Whether its last wait ended without the coordinator (it goes on
    /// alone until the coordinator is heard again).
    pub lost: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// Sampled: send the parameters.
    Send,
    /// Noticed: keep them as the reference only.
    Keep,
    /// Not in this sampling round.
    Nothing,
}

impl Ask {
    fn from_value(v: Option<&f32>) -> Ask {
        match v {
            Some(v) if *v == ASK_SEND => Ask::Send,
            Some(v) if *v == ASK_KEEP => Ask::Keep,
            _ => Ask::Nothing,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Request,
    Average,
}

#[derive(Debug)]
struct Waiting {
    round: u64,
    awaiting: Awaiting,
    until: Instant,
    /// The inner strategy's actions from its `Train` or `Finish` on.
    held: Vec<Action>,
}

/// A strategy that also answers a coordinator.
pub struct Coordinated {
    inner: Box<dyn Mixer>,
    cfg: CoordinatedConfig,
    asked: BTreeMap<u64, Ask>,
    /// Rounds between two sampling rounds, as the coordinator's requests say.
    every: Option<u64>,
    /// What this member had at the end of each round an average may still
    /// come for.
    references: BTreeMap<u64, Arc<Vec<f32>>>,
    waiting: Option<Waiting>,
    /// Averages that came after this member went on, as the change they
    /// make, applied at the next round end.
    correction: Option<Vec<f32>>,
    /// An average that came before this member ended its round (the
    /// sampled answered first): taken as it ends the round.
    early: Option<(u64, Vec<f32>)>,
    drops: Drops,
    stats: Coordination,
}

impl std::fmt::Debug for Coordinated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinated").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Coordinated {
    pub fn new(inner: Box<dyn Mixer>, cfg: CoordinatedConfig) -> Coordinated {
        Coordinated {
            inner,
            cfg,
            asked: BTreeMap::new(),
            every: None,
            references: BTreeMap::new(),
            waiting: None,
            correction: None,
            early: None,
            drops: Drops::default(),
            stats: Coordination::default(),
        }
    }

    /// The parameters the inner strategy continues from.
    fn current(&self) -> Option<Vec<f32>> {
        let state = self.inner.snapshot()?;
        state.parts.into_iter().next().map(|p| Arc::unwrap_or_clone(p.values))
    }

    /// Whether `round` is one the coordinator samples.
    fn is_sampling_round(&self, round: u64) -> bool {
        self.every.is_some_and(|every| (round + 1).is_multiple_of(every))
    }

    /// Keeps `x` as round `round`'s reference and sends it if sampled;
    /// whether an average is to come.
    fn answer(&mut self, round: u64, ask: Ask, x: &[f32], out: &mut Vec<Action>) -> bool {
        if ask == Ask::Nothing {
            return false;
        }
        while self.references.len() >= MAX_REFERENCES {
            self.references.pop_first();
        }
        let x = Arc::new(x.to_vec());
        self.references.insert(round, x.clone());
        if ask == Ask::Send {
            self.stats.sampled += 1;
            out.push(Action::Send(Message {
                weight: self.cfg.weight,
                ..Message::new(self.cfg.coordinator, MsgKind::SampledParams, round, x)
            }));
        } else {
            self.stats.noticed += 1;
        }
        true
    }

    fn wait(&mut self, round: u64, awaiting: Awaiting, held: Vec<Action>, now: Instant) {
        tracing::debug!(round, ?awaiting, "waiting for the coordinator");
        self.waiting = Some(Waiting { round, awaiting, until: now + self.cfg.wait, held });
    }

    /// Ends a wait: the held actions, to carry out now.
    fn release(&mut self) -> Vec<Action> {
        self.waiting.take().map(|w| w.held).unwrap_or_default()
    }

    /// The inner strategy's actions, seen at round ends: a pending
    /// correction applied, the coordinator answered, and the rest held
    /// while this member waits for the coordinator.
    fn after(&mut self, before: u64, mut actions: Vec<Action>, now: Instant) -> Vec<Action> {
        if self.inner.round() == before {
            return actions;
        }
        let asked_now: Vec<(u64, Ask)> = {
            let later = self.asked.split_off(&(before + 1));
            std::mem::replace(&mut self.asked, later).into_iter().collect()
        };
        let expect_request = !self.stats.lost
            && self.is_sampling_round(before)
            && !asked_now.iter().any(|(r, _)| *r == before);
        if asked_now.is_empty() && self.correction.is_none() && !expect_request {
            return actions;
        }
        // The parameters at this round's end: the mix, or the local phase's.
        let set = actions.iter().rposition(|a| matches!(a, Action::SetParams(_)));
        let x = match set {
            Some(i) => match &mut actions[i] {
                Action::SetParams(v) => Some(std::mem::take(v)),
                _ => None,
            },
            None => self.current(),
        };
        let Some(mut x) = x else { return actions };
        let corrected = self.correction.take().is_some_and(|c| {
            let fits = c.len() == x.len();
            if fits {
                x.iter_mut().zip(&c).for_each(|(v, d)| *v += d);
                self.stats.corrections += 1;
            }
            fits
        });
        if corrected {
            self.inner.adopt(&x);
        }
        let mut out = Vec::with_capacity(actions.len() + 2);
        let mut awaiting = expect_request.then_some(Awaiting::Request);
        let mut averaged = false;
        for (round, ask) in asked_now {
            if let Some((_, avg)) = self.early.take_if(|(r, a)| *r == round && a.len() == x.len()) {
                // The average is here already: nothing to send or wait for.
                x = avg;
                averaged = true;
                self.stats.averages += 1;
                self.stats.last_round = Some(round);
                continue;
            }
            if self.answer(round, ask, &x, &mut out) && round == before {
                awaiting = Some(Awaiting::Average);
            }
        }
        if averaged {
            self.inner.adopt(&x);
        }
        let mut held = Vec::new();
        for (i, a) in actions.into_iter().enumerate() {
            match a {
                Action::SetParams(_) if Some(i) == set => {}
                a @ (Action::Train { .. } | Action::Finish) if awaiting.is_some() => held.push(a),
                a if !held.is_empty() => held.push(a),
                a => out.push(a),
            }
        }
        if set.is_some() || corrected || averaged {
            // Before anything that reads the model.
            let at = out.iter().position(|a| !matches!(a, Action::Send(_))).unwrap_or(out.len());
            out.insert(at, Action::SetParams(x));
        }
        match awaiting {
            Some(what) => self.wait(before, what, held, now),
            None => out.extend(held),
        }
        out
    }

    fn on_request(&mut self, m: &Message) -> Vec<Action> {
        let ask = Ask::from_value(m.values.first());
        tracing::debug!(round = m.slot, ?ask, at = self.inner.round(), "sample request");
        if let Some(every) = m.values.get(1).filter(|v| v.is_finite() && **v >= 1.0) {
            self.every = Some(*every as u64);
        }
        if let Some(round) =
            self.waiting.as_ref().filter(|w| w.awaiting == Awaiting::Request).map(|w| w.round)
        {
            if m.slot == round {
                let mut out = Vec::new();
                let x = self.current().unwrap_or_default();
                if !x.is_empty() && self.answer(m.slot, ask, &x, &mut out) {
                    if let Some(w) = self.waiting.as_mut() {
                        w.awaiting = Awaiting::Average;
                    }
                    return out;
                }
                out.extend(self.release());
                return out;
            }
            if m.slot > round {
                // The coordinator skipped the round this member waits at.
                let mut out = self.release();
                out.extend(self.on_request(m));
                return out;
            }
        }
        let ahead = self.waiting.as_ref().map_or(self.inner.round(), |w| w.round + 1);
        if m.slot >= ahead {
            if m.slot > ahead + MAX_ROUNDS_AHEAD {
                self.drops.add("request_far_ahead");
                return Vec::new();
            }
            if self.asked.len() >= MAX_REQUESTS && !self.asked.contains_key(&m.slot) {
                self.drops.add("too_many_requests");
                return Vec::new();
            }
            self.asked.insert(m.slot, ask);
            return Vec::new();
        }
        if self.references.contains_key(&m.slot) {
            self.drops.add("duplicate_request");
            return Vec::new();
        }
        // A round this member has ended: what it has now stands for it.
        let Some(x) = self.current() else { return Vec::new() };
        let mut out = Vec::new();
        self.answer(m.slot, ask, &x, &mut out);
        out
    }

    fn on_average(&mut self, m: &Message) -> Vec<Action> {
        tracing::debug!(round = m.slot, at = self.inner.round(), "average");
        let Some(reference) = self.references.remove(&m.slot) else {
            if self.asked.contains_key(&m.slot) {
                // Before this member ended the round (with S2A the others'
                // answers can complete it first).
                self.early = Some((m.slot, m.values.to_vec()));
            } else {
                self.drops.add("average_unasked");
            }
            return Vec::new();
        };
        if m.values.len() != reference.len() {
            self.drops.add("average_wrong_length");
            return Vec::new();
        }
        // Older rounds' averages will not come after a newer one.
        self.references = self.references.split_off(&m.slot);
        self.stats.averages += 1;
        self.stats.last_round = Some(m.slot);
        let awaited = self
            .waiting
            .as_ref()
            .is_some_and(|w| w.round == m.slot && w.awaiting == Awaiting::Average);
        if awaited {
            let avg = m.values.to_vec();
            self.inner.adopt(&avg);
            let mut out = vec![Action::SetParams(avg)];
            out.extend(self.release());
            return out;
        }
        let change: Vec<f32> = m.values.iter().zip(reference.iter()).map(|(a, r)| a - r).collect();
        match self.correction.as_mut() {
            Some(c) => c.iter_mut().zip(&change).for_each(|(c, d)| *c += d),
            None => self.correction = Some(change),
        }
        Vec::new()
    }

    /// Stops waiting when the coordinator is overdue, and counts it lost.
    fn give_up(&mut self, now: Instant) -> Vec<Action> {
        let Some(w) = self.waiting.as_ref().filter(|w| now >= w.until) else { return Vec::new() };
        self.drops.add(match w.awaiting {
            Awaiting::Request => "request_timeout",
            Awaiting::Average => "average_timeout",
        });
        self.stats.timeouts += 1;
        self.stats.lost = true;
        tracing::debug!(round = w.round, awaiting = ?w.awaiting, "gave up waiting for the coordinator");
        self.release()
    }
}

impl Mixer for Coordinated {
    fn start(&mut self, now: Instant) -> Vec<Action> {
        self.inner.start(now)
    }

    fn set_start_params(&mut self, params: &[f32]) {
        self.inner.set_start_params(params);
    }

    fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let coordinator = self.cfg.coordinator;
        match input {
            Input::Received(m) if matches!(m.kind, MsgKind::SampleRequest | MsgKind::Average) => {
                if m.peer != coordinator {
                    self.drops.add("not_the_coordinator");
                    return Vec::new();
                }
                self.stats.lost = false;
                match m.kind {
                    MsgKind::SampleRequest => self.on_request(&m),
                    _ => self.on_average(&m),
                }
            }
            Input::Refused { kind: MsgKind::SampleRequest | MsgKind::Average, .. } => Vec::new(),
            Input::Tick => {
                let mut out = self.give_up(now);
                if self.inner.deadline().is_some_and(|d| now >= d) {
                    let before = self.inner.round();
                    let actions = self.inner.handle(Input::Tick, now);
                    out.extend(self.after(before, actions, now));
                }
                out
            }
            input => {
                let before = self.inner.round();
                let actions = self.inner.handle(input, now);
                self.after(before, actions, now)
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let own = self.waiting.as_ref().map(|w| w.until);
        match (self.inner.deadline(), own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// While it waits for the coordinator, the member is still in the
    /// round: the round's end (evaluation, checkpoint) comes with the average.
    fn round(&self) -> u64 {
        self.waiting.as_ref().map_or(self.inner.round(), |w| w.round)
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        let mut all = Drops::default();
        for (k, v) in self.inner.dropped() {
            all.add_many(k, v);
        }
        for (k, v) in self.drops.list() {
            all.add_many(k, v);
        }
        all.list()
    }

    fn neighbour_distance(&self) -> Option<f64> {
        self.inner.neighbour_distance()
    }

    fn snapshot(&self) -> Option<StrategyState> {
        self.inner.snapshot()
    }

    fn restore(&mut self, state: StrategyState) -> Result<Vec<f32>, StateError> {
        self.inner.restore(state)
    }

    fn outer(&self) -> Option<OuterStatus> {
        self.inner.outer()
    }

    fn adopt(&mut self, params: &[f32]) {
        self.inner.adopt(params);
    }

    fn coordination(&self) -> Option<Coordination> {
        Some(Coordination { waiting: self.waiting.is_some(), ..self.stats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::comm::CommSchedule;
    use crate::mix::gossip::{Gossip, GossipConfig};
    use crate::mix::topology::TopologySpec;
    use crate::net::encoding::Encoding;

    /// A member that only trains (no gossip), under coordinator `c`.
    fn member(me: PeerId, c: PeerId, rounds: u64) -> Coordinated {
        let cfg = GossipConfig {
            topology: TopologySpec::Ring,
            seed: 0,
            rounds,
            local_steps: 1,
            gossip_steps: 0,
            comm: CommSchedule::Every(1),
            timeout: Duration::from_secs(1),
            start_round: 0,
            aggregator: crate::mix::aggregate::Aggregator::Mean,
            norm_bound: 0.0,
            encoding: Encoding::F32,
            straggler_grace: None,
        };
        let inner = Gossip::new(cfg, me, vec![me]).unwrap();
        let cfg = CoordinatedConfig { coordinator: c, wait: Duration::from_secs(5), weight: 1.0 };
        let mut m = Coordinated::new(Box::new(inner), cfg);
        m.set_start_params(&[0.0, 0.0]);
        m
    }

    fn from(c: PeerId, kind: MsgKind, slot: u64, values: Vec<f32>) -> Input {
        Input::Received(Message::new(c, kind, slot, Arc::new(values)))
    }

    fn done(params: Vec<f32>) -> Input {
        Input::LocalDone { params, samples: 1 }
    }

    fn set_params(actions: &[Action]) -> Vec<Vec<f32>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SetParams(v) => Some(v.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_sampled_member_sends_at_the_round_end_and_waits_for_the_exact_average() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        assert!(matches!(m.start(t).as_slice(), [Action::Train { .. }]));
        assert!(m.handle(from(c, MsgKind::SampleRequest, 0, vec![1.0]), t).is_empty());
        let acts = m.handle(done(vec![1.0, 2.0]), t);
        let [Action::Send(sent)] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!((sent.kind, sent.slot, sent.peer), (MsgKind::SampledParams, 0, c));
        assert_eq!(sent.values.as_slice(), &[1.0, 2.0]);
        assert_eq!(m.round(), 0, "still in round 0 while it waits");
        assert_eq!(m.deadline(), Some(t + Duration::from_secs(5)));
        let acts = m.handle(from(c, MsgKind::Average, 0, vec![3.0, 4.0]), t);
        assert_eq!(set_params(&acts), vec![vec![3.0, 4.0]], "exactly the average");
        assert!(matches!(acts.last(), Some(Action::Train { .. })), "{acts:?}");
        assert_eq!(m.round(), 1);
        assert_eq!(m.snapshot().unwrap().parts[0].values.as_slice(), &[3.0, 4.0]);
        assert_eq!(m.coordination().unwrap().averages, 1);
    }

    #[test]
    fn a_member_not_asked_is_left_alone_and_strangers_are_not_heard() {
        let (me, c, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        m.start(t);
        assert!(m.handle(from(stranger, MsgKind::SampleRequest, 0, vec![1.0]), t).is_empty());
        let acts = m.handle(done(vec![1.0, 2.0]), t);
        assert!(matches!(acts.as_slice(), [Action::Train { .. }]), "no send, no wait: {acts:?}");
        assert!(m.handle(from(stranger, MsgKind::Average, 0, vec![9.0, 9.0]), t).is_empty());
        assert!(m.handle(from(c, MsgKind::Average, 0, vec![9.0, 9.0]), t).is_empty());
        let drops: BTreeMap<_, _> = m.dropped().into_iter().collect();
        assert_eq!(drops.get("not_the_coordinator"), Some(&2));
        assert_eq!(drops.get("average_unasked"), Some(&1));
        let acts = m.handle(done(vec![5.0, 5.0]), t);
        assert!(set_params(&acts).is_empty(), "nothing changed the model: {acts:?}");
    }

    #[test]
    fn a_silent_coordinator_costs_one_wait_and_a_late_average_corrects() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        m.start(t);
        // Noticed (S2A, not sampled): keeps its round-0 parameters, waits.
        m.handle(from(c, MsgKind::SampleRequest, 0, vec![0.0]), t);
        let acts = m.handle(done(vec![1.0, 1.0]), t);
        assert!(acts.is_empty(), "waits, sends nothing: {acts:?}");
        let late = t + Duration::from_secs(5);
        let acts = m.handle(Input::Tick, late);
        assert!(matches!(acts.as_slice(), [Action::Train { .. }]), "{acts:?}");
        assert_eq!(m.coordination().unwrap().timeouts, 1);
        // The average of round 0 comes during round 1: a correction, applied
        // at round 1's end, that keeps what round 1 learnt.
        assert!(m.handle(from(c, MsgKind::Average, 0, vec![3.0, 5.0]), late).is_empty());
        let acts = m.handle(done(vec![2.0, 2.0]), late);
        assert_eq!(set_params(&acts), vec![vec![4.0, 6.0]], "x + (average - x_0)");
        assert_eq!(m.coordination().unwrap().corrections, 1);
    }

    #[test]
    fn a_request_for_a_round_gone_by_is_answered_at_once() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        m.start(t);
        m.handle(done(vec![1.0, 2.0]), t);
        let acts = m.handle(from(c, MsgKind::SampleRequest, 0, vec![1.0]), t);
        let [Action::Send(sent)] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!(sent.values.as_slice(), &[1.0, 2.0]);
        assert!(m.deadline().is_none(), "no wait");
        assert!(m.handle(from(c, MsgKind::SampleRequest, 0, vec![1.0]), t).is_empty());
        // Far too many requests ahead are refused, not kept.
        for r in 10..20 {
            m.handle(from(c, MsgKind::SampleRequest, r, vec![1.0]), t);
        }
        let drops: BTreeMap<_, _> = m.dropped().into_iter().collect();
        assert_eq!(drops.get("too_many_requests"), Some(&6));
        assert_eq!(drops.get("duplicate_request"), Some(&1));
    }

    #[test]
    fn a_member_ahead_waits_at_a_sampling_round_for_its_request() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        m.start(t);
        // Round 0's request says: nothing for you this time, H_s = 1.
        m.handle(from(c, MsgKind::SampleRequest, 0, vec![ASK_NOTHING, 1.0]), t);
        let acts = m.handle(done(vec![1.0, 1.0]), t);
        assert!(matches!(acts.as_slice(), [Action::Train { .. }]), "not sampled: {acts:?}");
        // Round 1 ends before its request came: the member waits for it.
        let acts = m.handle(done(vec![2.0, 2.0]), t);
        assert!(acts.is_empty(), "{acts:?}");
        assert_eq!(m.round(), 1);
        let acts = m.handle(from(c, MsgKind::SampleRequest, 1, vec![ASK_SEND, 1.0]), t);
        let [Action::Send(sent)] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!((sent.slot, sent.values.as_slice()), (1, &[2.0, 2.0][..]));
        let acts = m.handle(from(c, MsgKind::Average, 1, vec![3.0, 3.0]), t);
        assert_eq!(set_params(&acts), vec![vec![3.0, 3.0]]);
        assert!(matches!(acts.last(), Some(Action::Train { .. })));
        // A coordinator that skipped the round waited at: the wait ends.
        m.handle(done(vec![4.0, 4.0]), t);
        assert_eq!(m.round(), 2, "waits at round 2");
        let acts = m.handle(from(c, MsgKind::SampleRequest, 3, vec![ASK_KEEP, 1.0]), t);
        assert!(matches!(acts.as_slice(), [Action::Train { .. }]), "{acts:?}");
        assert_eq!(m.round(), 3);
    }

    #[test]
    fn a_lost_coordinator_costs_one_wait_until_it_is_heard_again() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 10);
        m.start(t);
        m.handle(from(c, MsgKind::SampleRequest, 0, vec![ASK_NOTHING, 1.0]), t);
        m.handle(done(vec![1.0, 1.0]), t);
        assert!(m.handle(done(vec![1.0, 1.0]), t).is_empty(), "waits for round 1's request");
        let late = t + Duration::from_secs(5);
        assert!(matches!(m.handle(Input::Tick, late).as_slice(), [Action::Train { .. }]));
        let stats = m.coordination().unwrap();
        assert!(stats.lost && stats.timeouts == 1, "{stats:?}");
        let acts = m.handle(done(vec![1.0, 1.0]), late);
        assert!(matches!(acts.as_slice(), [Action::Train { .. }]), "no wait while lost: {acts:?}");
        // Heard again: it waits at the sampling rounds again.
        m.handle(from(c, MsgKind::SampleRequest, 2, vec![ASK_NOTHING, 1.0]), late);
        assert!(!m.coordination().unwrap().lost);
        assert!(m.handle(done(vec![1.0, 1.0]), late).is_empty(), "waits for round 3's");
    }

    #[test]
    fn an_average_before_the_round_end_is_taken_at_it_without_a_wait() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 5);
        m.start(t);
        m.handle(from(c, MsgKind::SampleRequest, 0, vec![ASK_KEEP, 1.0]), t);
        assert!(m.handle(from(c, MsgKind::Average, 0, vec![7.0, 7.0]), t).is_empty());
        let acts = m.handle(done(vec![1.0, 1.0]), t);
        assert_eq!(set_params(&acts), vec![vec![7.0, 7.0]]);
        assert!(matches!(acts.last(), Some(Action::Train { .. })), "no wait: {acts:?}");
        assert_eq!(m.coordination().unwrap().averages, 1);
    }

    #[test]
    fn the_last_round_finishes_with_the_average() {
        let (me, c) = (PeerId::random(), PeerId::random());
        let t = Instant::now();
        let mut m = member(me, c, 1);
        m.start(t);
        m.handle(from(c, MsgKind::SampleRequest, 0, vec![1.0]), t);
        let acts = m.handle(done(vec![1.0, 1.0]), t);
        assert!(matches!(acts.as_slice(), [Action::Send(_)]), "Finish held: {acts:?}");
        let acts = m.handle(from(c, MsgKind::Average, 0, vec![2.0, 2.0]), t);
        assert!(matches!(acts.as_slice(), [Action::SetParams(_), Action::Finish]), "{acts:?}");
    }
}
