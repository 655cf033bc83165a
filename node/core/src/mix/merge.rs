//! The `merge` strategy: train locally for R rounds, optionally with sparse
//! pairwise gossip, then average once over all live members. It measures how
//! far independently trained models drift apart and how much a single final
//! average recovers (the daemon evaluates the local model under the label
//! `"local"` before the merge and the merged model at the end).
//!
//! Sparse gossip pairs the sorted roster by a random perfect matching that
//! every node draws from the same (seed, round) stream, so both ends of a
//! pair agree without talking; each pair is active with probability p, drawn
//! from a stream keyed by (seed, round, pair), or always in the rounds a
//! [`CommSchedule`] picks. An active pair swaps parameters and both set
//! x <- (x + x_partner) / 2, which preserves the global mean; a partner that
//! misses the deadline leaves x unchanged. The final average is the
//! [`AllReduce`] with equal weights under [`FINAL_SLOT`].
//!
//! Robust aggregation: the final all-reduce's owners combine by the
//! configured [`Aggregator`]; a [`NormBound`] refuses a partner's vector in
//! a pairwise exchange, and a shard in the final merge, that lies farther
//! from this node's own than a multiple of its update since its last
//! exchange (or since the start params, before the first).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::aggregate::{Aggregator, NormBound, l2_distance};
use super::allreduce::{AllReduce, AllReduceTimeouts};
use super::comm::CommSchedule;
use crate::net::encoding::Encoding;

use super::mixer::{
    Action, Drops, Input, Message, Mixer, MsgKind, Roster, StateError, StrategyState,
};

/// The slot of the final all-reduce. Rounds use their number as slot, and a
/// run never reaches u64::MAX - 1 rounds, so the two never collide.
pub const FINAL_SLOT: u64 = u64::MAX - 1;

/// How far ahead of the current round a pairwise message may be and still
/// be kept (each is a model's worth of values, one per round at most: only
/// the round's partner's is kept).
const MAX_ROUNDS_AHEAD: u64 = 8;

/// Stream of the matching in a round's key; pair k uses stream k.
const MATCHING_STREAM: u64 = u64::MAX;

/// Whether and when pairs exchange before the final merge.
#[derive(Debug, Clone, PartialEq)]
pub enum Exchange {
    /// No communication until the final merge.
    None,
    /// Every round, each pair of the matching is active with probability p
    /// (the expected exchanges per node per round), in [0, 1].
    Random(f64),
    /// Every pair of the matching exchanges in the rounds the schedule picks.
    Schedule(CommSchedule),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    pub seed: u64,
    pub rounds: u64,
    pub local_steps: u64,
    pub exchange: Exchange,
    /// Deadline of one pairwise exchange.
    pub exchange_timeout: Duration,
    /// Deadline of each phase of the final all-reduce (reduce, gather).
    pub final_timeout: Duration,
    /// Round to start from (a node that rejoins).
    pub start_round: u64,
    /// How the final all-reduce's owners combine the shards.
    pub aggregator: Aggregator,
    pub norm_bound: NormBound,
    /// How parameters travel (pairwise exchanges and the final all-reduce).
    pub encoding: Encoding,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("merge exchange probability must be in [0, 1] (got {0}); use 0 for no gossip")]
    Probability(f64),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Training,
    Exchanging { partner: PeerId, deadline: Instant },
    Merging,
    Done,
}

/// The merge strategy for one node.
#[derive(Debug)]
pub struct Merge {
    cfg: MergeConfig,
    roster: Roster,
    round: u64,
    phase: Phase,
    x: Vec<f32>,
    inbox: BTreeMap<u64, BTreeMap<PeerId, Message>>,
    all_reduce: AllReduce,
    drops: Drops,
    /// Pairwise exchanges that completed (the partner's values arrived).
    pub exchanges: u64,
    /// x right after the last pairwise exchange; kept while the norm bound is on.
    last_mixed: Option<Vec<f32>>,
    last_distance: Option<f64>,
}

impl Merge {
    /// Fails if the exchange probability is outside [0, 1].
    pub fn new(cfg: MergeConfig, me: PeerId, members: Vec<PeerId>) -> Result<Merge, MergeError> {
        Merge::in_swarm(cfg, Roster::new(me, members))
    }

    /// The node `roster.me`, sharing the roster's member list with others.
    pub fn in_swarm(cfg: MergeConfig, roster: Roster) -> Result<Merge, MergeError> {
        if let Exchange::Random(p) = cfg.exchange
            && !(0.0..=1.0).contains(&p)
        {
            return Err(MergeError::Probability(p));
        }
        let timeouts = AllReduceTimeouts { reduce: cfg.final_timeout, gather: cfg.final_timeout };
        let all_reduce = AllReduce::new(FINAL_SLOT, timeouts)
            .with_aggregation(cfg.aggregator, cfg.norm_bound)
            .with_encoding(cfg.encoding)
            .with_max_weight(1.0);
        Ok(Merge {
            round: cfg.start_round,
            cfg,
            roster,
            phase: Phase::Training,
            x: Vec::new(),
            inbox: BTreeMap::new(),
            all_reduce,
            drops: Drops::default(),
            exchanges: 0,
            last_mixed: None,
            last_distance: None,
        })
    }

    /// This node's active partner in the current round, if any.
    fn partner_now(&self) -> Option<PeerId> {
        self.partner_in(self.round)
    }

    /// This node's active partner in `round`, if any.
    fn partner_in(&self, round: u64) -> Option<PeerId> {
        let p = match &self.cfg.exchange {
            Exchange::None => return None,
            Exchange::Random(p) => *p,
            Exchange::Schedule(s) if s.communicates(round, self.cfg.rounds) => 1.0,
            Exchange::Schedule(_) => return None,
        };
        let j = partner(self.cfg.seed, round, self.roster.len(), self.roster.me, p)?;
        Some(self.roster.members[j])
    }

    fn begin_exchange(&mut self, partner: PeerId, now: Instant) -> Vec<Action> {
        let mut actions = vec![Action::Send(Message {
            peer: partner,
            kind: MsgKind::Params,
            slot: self.round,
            weight: 1.0,
            offset: 0,
            values: Arc::new(self.x.clone()),
            encoding: self.cfg.encoding,
            part: 0,
        })];
        let deadline = now + self.cfg.exchange_timeout;
        self.phase = Phase::Exchanging { partner, deadline };
        actions.extend(self.try_exchange(now, false));
        actions
    }

    /// Averages with the partner if its values arrived; at the deadline
    /// (`force`) keeps x instead.
    fn try_exchange(&mut self, now: Instant, force: bool) -> Vec<Action> {
        let Phase::Exchanging { partner, .. } = self.phase else { return Vec::new() };
        let arrived = self.inbox.get(&self.round).and_then(|b| b.get(&partner));
        // Held before this node knew its length, so checked again here.
        let arrived = match arrived {
            Some(m) if m.values.len() != self.x.len() => {
                self.drops.add("wrong_length");
                self.inbox.get_mut(&self.round).and_then(|b| b.remove(&partner));
                None
            }
            Some(m) if !self.admits(&m.values) => {
                self.drops.add("norm_bound");
                self.inbox.get_mut(&self.round).and_then(|b| b.remove(&partner));
                // Refused: the exchange is over, as if the partner were silent.
                return self.close_exchange(partner, false, now);
            }
            other => other,
        };
        let mixed = match arrived {
            Some(m) => {
                self.last_distance = Some(l2_distance(&self.x, &m.values));
                average_into(&mut self.x, &m.values);
                self.exchanges += 1;
                true
            }
            None if force => {
                self.drops.add("missing_at_deadline");
                false
            }
            None => return Vec::new(),
        };
        self.close_exchange(partner, mixed, now)
    }

    /// Whether the norm bound lets a partner's `values` in.
    fn admits(&self, values: &[f32]) -> bool {
        match &self.last_mixed {
            Some(last) if self.cfg.norm_bound.is_enabled() && last.len() == self.x.len() => {
                self.cfg.norm_bound.admits(&self.x, values, l2_distance(&self.x, last))
            }
            _ => true,
        }
    }

    fn close_exchange(&mut self, partner: PeerId, mixed: bool, now: Instant) -> Vec<Action> {
        if mixed && self.cfg.norm_bound.is_enabled() {
            self.last_mixed = Some(self.x.clone());
            self.all_reduce.set_reference(self.x.clone());
        }
        if let Some(mut slot) = self.inbox.remove(&self.round) {
            slot.remove(&partner);
            slot.values().for_each(|_| self.drops.add("unexpected_sender"));
        }
        self.end_round(mixed, now)
    }

    fn end_round(&mut self, mixed: bool, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if mixed {
            actions.push(Action::SetParams(self.x.clone()));
        }
        self.round += 1;
        // Messages for rounds in which we had no exchange with their sender.
        let kept = self.inbox.split_off(&self.round);
        let stale = std::mem::replace(&mut self.inbox, kept);
        stale.values().flat_map(|b| b.values()).for_each(|_| self.drops.add("unexpected_sender"));
        if self.round >= self.cfg.rounds {
            actions.extend(self.begin_merge(now));
        } else {
            self.phase = Phase::Training;
            actions.push(Action::Train { steps: self.cfg.local_steps });
        }
        actions
    }

    fn begin_merge(&mut self, now: Instant) -> Vec<Action> {
        self.phase = Phase::Merging;
        let mut actions = vec![Action::Evaluate { label: "local" }];
        let sends = self.all_reduce.start(self.roster.clone(), self.x.clone(), 1.0, now);
        actions.extend(sends.into_iter().map(Action::Send));
        actions.extend(self.finish_if_merged());
        actions
    }

    fn finish_if_merged(&mut self) -> Vec<Action> {
        if self.phase != Phase::Merging {
            return Vec::new();
        }
        let Some(mean) = self.all_reduce.result() else { return Vec::new() };
        self.x = mean.to_vec();
        self.phase = Phase::Done;
        vec![Action::SetParams(self.x.clone()), Action::Finish]
    }

    fn receive(&mut self, m: Message, now: Instant) -> Vec<Action> {
        if self.all_reduce.accepts(&m) {
            let sends = self.all_reduce.receive(m);
            let mut actions: Vec<Action> = sends.into_iter().map(Action::Send).collect();
            actions.extend(self.finish_if_merged());
            return actions;
        }
        if let Some(reason) = self.check_params(&m) {
            self.drops.add(reason);
            return Vec::new();
        }
        let slot = m.slot;
        self.inbox.entry(slot).or_default().insert(m.peer, m);
        if slot == self.round { self.try_exchange(now, false) } else { Vec::new() }
    }

    /// Why a pairwise message cannot be kept, if it cannot.
    fn check_params(&self, m: &Message) -> Option<&'static str> {
        if m.kind != MsgKind::Params {
            Some("wrong_kind")
        } else if !self.x.is_empty() && m.values.len() != self.x.len() {
            Some("wrong_length")
        } else if m.values.iter().any(|v| !v.is_finite()) {
            Some("non_finite")
        } else if m.slot < self.round {
            Some("stale_slot")
        } else if m.slot >= self.cfg.rounds || m.slot > self.round + MAX_ROUNDS_AHEAD {
            Some("far_future_slot")
        } else if self.partner_in(m.slot) != Some(m.peer) {
            Some("not_a_partner")
        } else if self.inbox.get(&m.slot).is_some_and(|b| b.contains_key(&m.peer)) {
            Some("duplicate")
        } else {
            None
        }
    }
}

/// Member `i`'s partner among `n` sorted members in `round`, if its pair is
/// active (probability `p`). Every member computes the same matching: a
/// shuffle of 0..n keyed by (seed, round), paired as (0,1), (2,3), ...; with
/// odd n the last one sits out.
pub fn partner(seed: u64, round: u64, n: usize, i: usize, p: f64) -> Option<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng(seed, round, MATCHING_STREAM));
    let pos = order.iter().position(|&j| j == i)?;
    let pair = pos / 2;
    let j = *order.get(pos ^ 1)?;
    // `random::<f64>()` is in [0, 1): p = 0 never fires, p = 1 always does.
    (rng(seed, round, pair as u64).random::<f64>() < p).then_some(j)
}

/// The random stream of (seed, round, stream).
fn rng(seed: u64, round: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&round.to_le_bytes());
    key[16..24].copy_from_slice(&stream.to_le_bytes());
    key[24..].copy_from_slice(b"mrgpairs");
    ChaCha8Rng::from_seed(key)
}

/// x <- (x + y) / 2, in f64 and commutative, so both ends of a pair end
/// with bit-identical values.
fn average_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, &b)| *a = ((f64::from(*a) + f64::from(b)) * 0.5) as f32);
}

impl Mixer for Merge {
    fn snapshot(&self) -> Option<StrategyState> {
        StrategyState::params(self.round, &self.x)
    }

    fn restore(&mut self, state: StrategyState) -> Result<Vec<f32>, StateError> {
        let (round, x) = state.take_params(self.x.len())?;
        self.round = round;
        self.x = x.clone();
        if self.cfg.norm_bound.is_enabled() {
            self.last_mixed = Some(x.clone());
            self.all_reduce.set_reference(x.clone());
        }
        Ok(x)
    }

    fn set_start_params(&mut self, params: &[f32]) {
        // Shards and results of the final merge: a model's worth each.
        self.all_reduce.set_early_limit(2 * params.len().max(1));
        self.x = params.to_vec();
        if self.cfg.norm_bound.is_enabled() {
            self.last_mixed = Some(params.to_vec());
            self.all_reduce.set_reference(params.to_vec());
        }
    }

    fn start(&mut self, _now: Instant) -> Vec<Action> {
        if self.round >= self.cfg.rounds {
            self.phase = Phase::Done;
            return vec![Action::Finish];
        }
        vec![Action::Train { steps: self.cfg.local_steps }]
    }

    fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::LocalDone { params, .. } => {
                if self.phase != Phase::Training {
                    self.drops.add("unexpected_local_done");
                    return Vec::new();
                }
                self.x = params;
                match self.partner_now() {
                    Some(partner) => self.begin_exchange(partner, now),
                    None => self.end_round(false, now),
                }
            }
            Input::Received(m) => self.receive(m, now),
            Input::Refused { peer, kind, slot } => {
                if slot == FINAL_SLOT {
                    let sends = self.all_reduce.refused(peer, kind);
                    let mut actions: Vec<Action> = sends.into_iter().map(Action::Send).collect();
                    actions.extend(self.finish_if_merged());
                    return actions;
                }
                match self.phase {
                    Phase::Exchanging { partner, .. } if partner == peer && slot == self.round => {
                        self.close_exchange(partner, false, now)
                    }
                    _ => Vec::new(),
                }
            }
            Input::Unreachable(peer) => match self.phase {
                Phase::Merging => {
                    let sends = self.all_reduce.unreachable(peer);
                    let mut actions: Vec<Action> = sends.into_iter().map(Action::Send).collect();
                    actions.extend(self.finish_if_merged());
                    actions
                }
                Phase::Exchanging { partner, .. } if partner == peer => {
                    self.close_exchange(partner, false, now)
                }
                _ => Vec::new(),
            },
            Input::Members { members, .. } => {
                self.roster = Roster::shared(self.roster.me(), members);
                Vec::new()
            }
            Input::Tick => match &self.phase {
                Phase::Exchanging { deadline, .. } if now >= *deadline => {
                    self.try_exchange(now, true)
                }
                Phase::Merging => {
                    let sends = self.all_reduce.tick(now);
                    let mut actions: Vec<Action> = sends.into_iter().map(Action::Send).collect();
                    actions.extend(self.finish_if_merged());
                    actions
                }
                _ => Vec::new(),
            },
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Exchanging { deadline, .. } => Some(*deadline),
            Phase::Merging => self.all_reduce.deadline(),
            _ => None,
        }
    }

    fn round(&self) -> u64 {
        self.round
    }

    fn neighbour_distance(&self) -> Option<f64> {
        self.last_distance
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        let mut all: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (reason, n) in self.drops.list().into_iter().chain(self.all_reduce.drops().list()) {
            *all.entry(reason).or_default() += n;
        }
        all.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        let mut p: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        p.sort();
        p
    }

    fn cfg(exchange: Exchange, rounds: u64) -> MergeConfig {
        MergeConfig {
            seed: 3,
            rounds,
            local_steps: 5,
            exchange,
            exchange_timeout: Duration::from_secs(1),
            final_timeout: Duration::from_secs(2),
            start_round: 0,
            aggregator: Aggregator::Mean,
            norm_bound: NormBound::default(),
            encoding: Encoding::F32,
        }
    }

    fn nodes(ids: &[PeerId], exchange: Exchange, rounds: u64) -> Vec<Merge> {
        ids.iter()
            .map(|&p| Merge::new(cfg(exchange.clone(), rounds), p, ids.to_vec()).unwrap())
            .collect()
    }

    /// What a lockstep run did: each node's actions in order, every message
    /// as (from, to, message), and the parameters each node trained from.
    #[derive(Default)]
    struct Trace {
        actions: Vec<Vec<Action>>,
        sends: Vec<(usize, usize, Message)>,
        trained: Vec<Vec<Vec<f32>>>,
    }

    /// Runs all nodes with instant, lossless delivery; `train(i, round, x)`
    /// plays the trainer. Returns each node's final parameters.
    fn lockstep(
        nodes: &mut [Merge],
        x0: Vec<Vec<f32>>,
        train: impl Fn(usize, u64, &[f32]) -> Vec<f32>,
    ) -> (Vec<Vec<f32>>, Trace) {
        let now = Instant::now();
        let n = nodes.len();
        let ids: Vec<PeerId> = nodes.iter().map(|m| m.roster.me()).collect();
        let mut x = x0;
        let mut trace = Trace {
            actions: vec![Vec::new(); n],
            trained: vec![Vec::new(); n],
            ..Trace::default()
        };
        let mut queue: VecDeque<(usize, Action)> = VecDeque::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            queue.extend(node.start(now).into_iter().map(|a| (i, a)));
        }
        loop {
            let mut wants = vec![false; n];
            while let Some((from, a)) = queue.pop_front() {
                trace.actions[from].push(a.clone());
                match a {
                    Action::Send(mut m) => {
                        let to = ids.iter().position(|p| *p == m.peer).unwrap();
                        trace.sends.push((from, to, m.clone()));
                        m.peer = ids[from];
                        queue.extend(
                            nodes[to].handle(Input::Received(m), now).into_iter().map(|a| (to, a)),
                        );
                    }
                    Action::SetParams(p) => x[from] = p,
                    Action::Train { .. } => wants[from] = true,
                    _ => {}
                }
            }
            if !wants.contains(&true) {
                return (x, trace);
            }
            for i in (0..n).filter(|&i| wants[i]) {
                x[i] = train(i, nodes[i].round(), &x[i]);
                trace.trained[i].push(x[i].clone());
                let done = Input::LocalDone { params: x[i].clone(), samples: 1 };
                queue.extend(nodes[i].handle(done, now).into_iter().map(|a| (i, a)));
            }
        }
    }

    fn mean(x: &[Vec<f32>]) -> Vec<f64> {
        (0..x[0].len())
            .map(|k| x.iter().map(|v| f64::from(v[k])).sum::<f64>() / x.len() as f64)
            .collect()
    }

    fn params_sends(trace: &Trace) -> Vec<(usize, usize, u64)> {
        trace
            .sends
            .iter()
            .filter(|(_, _, m)| m.kind == MsgKind::Params)
            .map(|(f, t, m)| (*f, *t, m.slot))
            .collect()
    }

    /// A deterministic "training step" that moves each node differently.
    fn drift(i: usize, round: u64, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(k, v)| v + ((i * 5 + k * 3 + round as usize) % 7) as f32 * 0.125 - 0.375)
            .collect()
    }

    #[test]
    fn the_final_average_is_the_arithmetic_mean_of_the_inputs() {
        for n in 3..=5 {
            let ids = peers(n);
            let mut ns = nodes(&ids, Exchange::None, 4);
            let x0 = vec![vec![0.5f32; 7]; n];
            let (x, trace) = lockstep(&mut ns, x0, drift);
            let inputs: Vec<Vec<f32>> = trace.trained.iter().map(|t| t[3].clone()).collect();
            let want = mean(&inputs);
            for (i, xi) in x.iter().enumerate() {
                for (g, w) in xi.iter().zip(&want) {
                    assert!((f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0), "n={n} node {i}");
                }
                assert_eq!(xi, &x[0], "every node ends with the same merged model");
                assert_eq!(trace.actions[i].last(), Some(&Action::Finish));
                assert_eq!(ns[i].deadline(), None);
            }
            assert!(ns.iter().all(|m| m.dropped().is_empty()), "{:?}", ns[0].dropped());
        }
    }

    #[test]
    fn without_exchanges_no_params_are_ever_sent() {
        let ids = peers(4);
        for exchange in [Exchange::None, Exchange::Random(0.0)] {
            let mut ns = nodes(&ids, exchange, 20);
            let (_, trace) = lockstep(&mut ns, vec![vec![1.0; 3]; 4], drift);
            assert!(params_sends(&trace).is_empty());
            assert!(trace.sends.iter().all(|(_, _, m)| m.slot == FINAL_SLOT));
            assert!(trace.trained.iter().all(|t| t.len() == 20));
        }
    }

    #[test]
    fn with_p_one_every_round_is_a_perfect_matching_that_keeps_the_mean() {
        let ids = peers(4);
        let rounds = 10;
        let mut ns = nodes(&ids, Exchange::Random(1.0), rounds);
        // Dyadic values: pairwise averages stay exact in f32 for 10 rounds.
        let x0: Vec<Vec<f32>> = (0..4).map(|i| vec![i as f32 * 8.0, -(i as f32), 64.0]).collect();
        let (x, trace) = lockstep(&mut ns, x0.clone(), |_, _, x| x.to_vec());
        let sends = params_sends(&trace);
        for r in 0..rounds {
            let round: Vec<_> = sends.iter().filter(|s| s.2 == r).collect();
            assert_eq!(round.len(), 4, "round {r}: one exchange per node");
            for &&(from, to, _) in &round {
                assert!(round.contains(&&(to, from, r)), "round {r}: {from} -> {to} is mutual");
            }
        }
        let want = mean(&x0);
        for r in 0..rounds as usize {
            let after: Vec<Vec<f32>> = trace.trained.iter().map(|t| t[r].clone()).collect();
            assert_eq!(mean(&after), want, "round {r} input keeps the mean exactly");
        }
        assert!(x.iter().all(|xi| xi.iter().zip(&want).all(|(g, w)| f64::from(*g) == *w)));
        assert!(ns.iter().all(|m| m.exchanges == rounds));
        // The matching changes between rounds.
        let partners: std::collections::BTreeSet<_> =
            sends.iter().filter(|s| s.0 == 0).map(|s| s.1).collect();
        assert!(partners.len() > 1, "{partners:?}");
    }

    #[test]
    fn sparse_pairs_agree_and_fire_at_the_configured_rate() {
        let ids = peers(8);
        let rounds = 200;
        let mut ns = nodes(&ids, Exchange::Random(0.2), rounds);
        let (_, trace) = lockstep(&mut ns, vec![vec![1.0; 2]; 8], drift);
        let sends = params_sends(&trace);
        for &(from, to, r) in &sends {
            assert!(sends.contains(&(to, from, r)), "round {r}: {from} -> {to} without a reply");
        }
        let rate = sends.len() as f64 / (rounds as f64 * 8.0);
        assert!((0.15..=0.25).contains(&rate), "rate {rate}");
        assert!(ns.iter().all(|m| m.dropped().is_empty()));
        // The pure pairing agrees with itself from both ends.
        for r in 0..rounds {
            for i in 0..7 {
                if let Some(j) = partner(9, r, 7, i, 0.2) {
                    assert_eq!(partner(9, r, 7, j, 0.2), Some(i));
                }
            }
        }
    }

    #[test]
    fn local_metrics_are_recorded_before_the_merged_params() {
        let ids = peers(3);
        let mut ns = nodes(&ids, Exchange::Random(0.5), 3);
        let (_, trace) = lockstep(&mut ns, vec![vec![2.0]; 3], drift);
        for acts in &trace.actions {
            let eval = acts.iter().position(|a| *a == Action::Evaluate { label: "local" }).unwrap();
            let set = acts.iter().rposition(|a| matches!(a, Action::SetParams(_))).unwrap();
            let trains = acts.iter().filter(|a| matches!(a, Action::Train { .. })).count();
            assert!(eval < set && set + 1 == acts.len() - 1, "{acts:?}");
            assert_eq!(trains, 3);
            assert_eq!(acts.iter().filter(|a| matches!(a, Action::Evaluate { .. })).count(), 1);
        }
    }

    #[test]
    fn a_silent_partner_leaves_x_unchanged_at_the_deadline() {
        let ids = peers(2);
        let mut m = Merge::new(cfg(Exchange::Random(1.0), 2), ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        m.start(t0);
        let acts = m.handle(Input::LocalDone { params: vec![4.0], samples: 1 }, t0);
        assert!(matches!(&acts[..], [Action::Send(s)] if s.peer == ids[1] && s.slot == 0));
        assert_eq!(m.deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(m.handle(Input::Tick, t0 + Duration::from_millis(999)).is_empty());
        let acts = m.handle(Input::Tick, t0 + Duration::from_secs(1));
        assert_eq!(acts, vec![Action::Train { steps: 5 }], "no SetParams: x is kept");
        // The late reply for round 0 is stale; round 1 averages normally.
        let msg = |slot, v| Message {
            peer: ids[1],
            kind: MsgKind::Params,
            slot,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![v]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(m.handle(Input::Received(msg(0, 9.0)), t0).is_empty());
        assert_eq!(m.drops.get("stale_slot"), 1);
        assert!(m.handle(Input::Received(msg(1, 2.0)), t0).is_empty(), "held until LocalDone");
        let acts = m.handle(Input::LocalDone { params: vec![4.0], samples: 1 }, t0);
        assert_eq!(acts[1], Action::SetParams(vec![3.0]));
        assert_eq!(acts[2], Action::Evaluate { label: "local" });
        assert_eq!(m.round(), 2);
    }

    #[test]
    fn an_early_message_of_the_wrong_length_is_dropped_not_mixed() {
        let ids = peers(2);
        let mut m = Merge::new(cfg(Exchange::Random(1.0), 2), ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        m.start(t0);
        let early = Message {
            peer: ids[1],
            kind: MsgKind::Params,
            slot: 0,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![1.0, 2.0]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(m.handle(Input::Received(early), t0).is_empty(), "length unknown yet: held");
        let acts = m.handle(Input::LocalDone { params: vec![4.0], samples: 1 }, t0);
        assert_eq!(acts.len(), 1, "sent ours, still waiting: {acts:?}");
        assert_eq!(m.drops.get("wrong_length"), 1);
        let acts = m.handle(Input::Tick, t0 + Duration::from_secs(1));
        assert_eq!(acts, vec![Action::Train { steps: 5 }]);
    }

    #[test]
    fn a_schedule_exchanges_only_in_its_rounds() {
        let ids = peers(4);
        let schedule: CommSchedule = "every:3".parse().unwrap();
        let mut ns = nodes(&ids, Exchange::Schedule(schedule), 8);
        let (_, trace) = lockstep(&mut ns, vec![vec![1.0]; 4], drift);
        let rounds: std::collections::BTreeSet<u64> =
            params_sends(&trace).iter().map(|s| s.2).collect();
        assert_eq!(rounds.into_iter().collect::<Vec<_>>(), [0, 3, 6, 7]);
        assert_eq!(params_sends(&trace).len(), 4 * 4);
    }

    #[test]
    fn a_new_roster_rebuilds_the_matching_and_the_final_merge() {
        let ids = peers(4);
        let mut ns = nodes(&ids, Exchange::Random(1.0), 6);
        ns.truncate(3);
        for m in &mut ns {
            let members = ids[..3].to_vec().into();
            m.handle(Input::Members { members, joined: Vec::new() }, Instant::now());
        }
        let x0: Vec<Vec<f32>> = (0..3).map(|i| vec![i as f32]).collect();
        let (x, trace) = lockstep(&mut ns, x0, |_, _, x| x.to_vec());
        assert!(trace.sends.iter().all(|(_, to, _)| *to < 3), "nothing goes to the gone member");
        // Three members: one sits out each round, so two exchanges per round.
        assert_eq!(params_sends(&trace).len(), 6 * 2);
        assert!(x.iter().all(|xi| (xi[0] - 1.0).abs() < 1e-6), "{x:?}");
    }

    #[test]
    fn probabilities_outside_zero_one_are_refused() {
        let id = PeerId::random();
        for p in [-0.1, 1.5, f64::NAN] {
            let err = Merge::new(cfg(Exchange::Random(p), 1), id, vec![id]).unwrap_err();
            assert!(err.to_string().contains("[0, 1]"), "{err}");
        }
    }

    #[test]
    fn a_single_node_trains_then_merges_with_itself() {
        let id = PeerId::random();
        let mut m = Merge::new(cfg(Exchange::Random(1.0), 1), id, vec![id]).unwrap();
        let t0 = Instant::now();
        assert_eq!(m.start(t0), vec![Action::Train { steps: 5 }]);
        let acts = m.handle(Input::LocalDone { params: vec![1.0, 2.0], samples: 1 }, t0);
        assert_eq!(
            acts,
            vec![
                Action::Evaluate { label: "local" },
                Action::SetParams(vec![1.0, 2.0]),
                Action::Finish
            ]
        );
    }
}
