//! Gossip averaging (decentralized SGD). Each round: H local steps, then Q
//! gossip steps in which node i sends x_i to its out-neighbours and sets
//! x_i <- sum_j W_ij x_j over itself and the in-neighbours whose messages
//! arrived by the deadline, renormalised over those (so a silent neighbour
//! costs accuracy, never progress).
//!
//! A robust `Aggregator` (median, trimmed mean, Krum) replaces that weighted
//! mean with a combination of x_i and the arrived vectors that a few bad
//! neighbours cannot drag far; a `NormBound` refuses, before any aggregator,
//! a vector farther from x_i than a multiple of x_i's own update since its
//! last mix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::aggregate::{Aggregator, NormBound, l2_distance};
use super::comm::CommSchedule;
use crate::net::encoding::Encoding;

use super::mixer::{
    Action, Drops, Input, Message, Mixer, MsgKind, Roster, StateError, StrategyState,
};
use super::patience::{Awaiting, Patience};
use super::slot_inbox::{SlotInbox, find_peer, peer_key};
use super::topology::{Topology, TopologyError, TopologySpec};
use super::vec_map::VecMap;

/// How far ahead of the current exchange a message may be and still be kept.
const MAX_SLOTS_AHEAD: u64 = 64;

/// Messages for slots after the current one kept per peer: an honest
/// neighbour runs at most an exchange or two ahead, and each message is a
/// model's worth of values.
const MAX_AHEAD_PER_PEER: usize = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct GossipConfig {
    pub topology: TopologySpec,
    pub seed: u64,
    pub rounds: u64,
    pub local_steps: u64,
    /// Gossip steps per communicating round (Q).
    pub gossip_steps: u64,
    pub comm: CommSchedule,
    /// Deadline of one gossip step.
    pub timeout: Duration,
    /// Round to start from (a node that rejoins).
    pub start_round: u64,
    /// How x_i and the arrived vectors combine. `Mean` is the MH-weighted
    /// mean renormalised over arrivals; the robust ones ignore the weights.
    pub aggregator: Aggregator,
    /// Refuse an arrived vector farther from x_i than this times
    /// ||x_i after the local phase - x_i after its last mix||; 0 disables.
    /// Before the first mix the update is measured from the start params
    /// (`set_start_params`); without them the first mix is not bounded.
    /// A negative or non-finite value also disables it (config refuses one).
    pub norm_bound: f64,
    /// How parameters travel.
    pub encoding: Encoding,
    /// The grace every neighbour gets after the last answer, and the credit
    /// an answer in time earns, as a fraction of the training time (see
    /// `patience`); `None` waits the full deadline for everyone.
    pub straggler_grace: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Training,
    Exchanging {
        step: u64,
        deadline: Instant,
        /// Sorted.
        expect: Vec<PeerId>,
        /// `peer_key` of each of `expect`: finding a sender among them
        /// reads this small array, not a binary search's worth of 80-byte
        /// ids (in the simulator that search took a tenth of the time).
        keys: Vec<u64>,
        /// Those of `expect` that have not answered yet.
        awaiting: Awaiting,
        /// When the exchange began or last heard an expected peer: while
        /// neighbours keep arriving the wait is free, a silent one never does.
        last_heard: Instant,
        /// What waiting for each peer of `expect` that answered in this
        /// exchange cost beyond the grace after the answer before it (see
        /// `patience`).
        charged: Vec<Option<Duration>>,
    },
    Done,
}

/// The gossip strategy for one node.
#[derive(Debug)]
pub struct Gossip {
    cfg: GossipConfig,
    roster: Roster,
    topology: Option<Topology>,
    round: u64,
    phase: Phase,
    x: Vec<f32>,
    /// By slot: the current one and the few kept ahead.
    inbox: VecMap<u64, SlotInbox>,
    /// Peers whose message for a slot was refused on arrival: not waited for.
    refused: BTreeMap<u64, std::collections::BTreeSet<PeerId>>,
    /// The newest message of each neighbour that ran further ahead than
    /// the slots kept ahead for it: its newest model, standing in for it
    /// until this node gets to that slot (see `stand_in`). One per
    /// neighbour, a model's worth of values each.
    ahead: BTreeMap<PeerId, Message>,
    drops: Drops,
    patience: Patience,
    /// When the local phase under way began, and how long the last one took.
    training_since: Option<Instant>,
    local_phase: Duration,
    /// When the last exchange mixed (or the node started).
    last_mix: Option<Instant>,
    norm_bound: NormBound,
    /// x right after the last mix; kept only while the norm bound is on.
    last_mixed: Option<Vec<f32>>,
    /// ||x after this round's local phase - `last_mixed`||.
    update_norm: Option<f64>,
    /// Mean L2 distance to the neighbours mixed in the last exchange that
    /// mixed any.
    pub last_neighbour_distance: Option<f64>,
}

impl Gossip {
    /// Fails if the topology cannot be built for the initial members.
    pub fn new(
        cfg: GossipConfig,
        me: PeerId,
        members: Vec<PeerId>,
    ) -> Result<Gossip, TopologyError> {
        let roster = Roster::new(me, members);
        let topology = Topology::new(&cfg.topology, roster.len(), cfg.seed)?;
        Ok(Gossip::in_swarm(cfg, roster, topology))
    }

    /// The node `roster.me` of a swarm whose member list and `topology`
    /// (built from `cfg` for `roster`'s members) other nodes share: what the
    /// simulator builds for each of its nodes, at the cost of this node's
    /// own state, not of the swarm's size.
    pub fn in_swarm(cfg: GossipConfig, roster: Roster, topology: Topology) -> Gossip {
        let patience = Patience::new(cfg.straggler_grace, cfg.timeout);
        let topology = Some(topology);
        let norm_bound = NormBound::new(cfg.norm_bound).unwrap_or_else(|e| {
            tracing::warn!(%e, "gossip norm bound disabled");
            NormBound::default()
        });
        Gossip {
            round: cfg.start_round,
            cfg,
            roster,
            topology,
            phase: Phase::Training,
            x: Vec::new(),
            inbox: VecMap::default(),
            refused: BTreeMap::new(),
            ahead: BTreeMap::new(),
            drops: Drops::default(),
            patience,
            training_since: None,
            local_phase: Duration::ZERO,
            last_mix: None,
            norm_bound,
            last_mixed: None,
            update_norm: None,
            last_neighbour_distance: None,
        }
    }

    fn slot(&self, step: u64) -> u64 {
        self.round * self.cfg.gossip_steps.max(1) + step
    }

    fn current_slot(&self) -> u64 {
        match self.phase {
            Phase::Exchanging { step, .. } => self.slot(step),
            _ => self.slot(0),
        }
    }

    /// The topology for the current members, rebuilt when their number
    /// changed. A spec that cannot be built for the new size (e.g. regular:3
    /// with 3 members) falls back to complete; `None` only if even that fails.
    fn topology(&mut self) -> Option<&Topology> {
        let n = self.roster.len();
        if self.topology.as_ref().map(Topology::n) != Some(n) {
            let t = match &self.topology {
                // Not a fallback's: the spec may fit the new count.
                Some(t) if t.spec() == &self.cfg.topology => t.resized(n),
                _ => Topology::new(&self.cfg.topology, n, self.cfg.seed),
            };
            let t = t.or_else(|_| Topology::new(&TopologySpec::Complete, n, self.cfg.seed));
            self.topology = t.ok();
        }
        self.topology.as_ref()
    }

    fn begin_step(&mut self, step: u64, now: Instant) -> Vec<Action> {
        let slot = self.slot(step);
        let me = self.roster.me;
        let (outs, ins) = {
            match self.topology() {
                Some(t) => (t.out_neighbours(me, slot), t.in_neighbours(me, slot)),
                None => (Vec::new(), Vec::new()),
            }
        };
        let values = Arc::new(self.x.clone());
        let mut actions: Vec<Action> = outs
            .iter()
            .map(|&j| {
                Action::Send(Message {
                    peer: self.roster.members[j],
                    kind: MsgKind::Params,
                    slot,
                    weight: 1.0,
                    offset: 0,
                    values: values.clone(),
                    encoding: self.cfg.encoding,
                    part: 0,
                })
            })
            .collect();
        let mut expect: Vec<PeerId> = ins.iter().map(|&j| self.roster.members[j]).collect();
        expect.sort_unstable();
        let awaiting =
            Awaiting::new(&self.patience, &expect, self.local_phase, |p| self.answered(p, slot));
        let charged = vec![None; expect.len()];
        let keys = expect.iter().map(peer_key).collect();
        self.phase = Phase::Exchanging {
            step,
            deadline: now + self.cfg.timeout,
            expect,
            keys,
            awaiting,
            last_heard: now,
            charged,
        };
        actions.extend(self.try_mix(now, false));
        actions
    }

    /// Mixes if every expected message arrived, if the peers still missing
    /// have used up their patience, or `force` (deadline passed).
    fn try_mix(&mut self, now: Instant, force: bool) -> Vec<Action> {
        let Phase::Exchanging { step, awaiting, deadline, last_heard, .. } = &self.phase else {
            return Vec::new();
        };
        let (step, deadline, last_heard) = (*step, *deadline, *last_heard);
        let slot = self.slot(step);
        if !awaiting.is_empty() && !force && now < self.wait_limit(awaiting, last_heard, deadline) {
            return Vec::new();
        }
        // Mixing: copied once per exchange, not on every message that waits.
        let Phase::Exchanging { expect, charged, awaiting, .. } = &self.phase else {
            return Vec::new();
        };
        let (expect, charged, awaiting) = (expect.clone(), charged.clone(), awaiting.clone());
        let reason = if now >= deadline { "missing_at_deadline" } else { "missing_after_grace" };
        self.drops.add_many(reason, awaiting.len() as u64);
        // What waiting cost each peer beyond its grace, and who was in time.
        let took = self.last_mix.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_mix = Some(now);
        let arrived = self.inbox.get(&slot);
        for (pos, p) in expect.iter().enumerate() {
            let waited = match awaiting.grace(pos) {
                Some(grace) => now.saturating_duration_since(last_heard + grace),
                None => charged[pos].unwrap_or_default(),
            };
            let in_time = arrived.is_some_and(|m| m.contains_key(p));
            self.patience.settle(*p, waited, in_time, took);
        }
        self.refused = self.refused.split_off(&(slot + 1));
        let mut msgs = self.inbox.remove(&slot).unwrap_or_default();
        // Nobody ahead, as nearly always: nothing to look up per peer.
        if !self.ahead.is_empty() {
            for p in &expect {
                if !msgs.contains_key(p)
                    && let Some(m) = self.stand_in(p, slot)
                {
                    msgs.insert(m);
                }
            }
        }
        self.mix(&expect, msgs, slot);
        if step + 1 < self.cfg.gossip_steps {
            return self.begin_step(step + 1, now);
        }
        self.finish_round(true, now)
    }

    /// How long `peer` is waited for after the last answer, before its
    /// credit (see `patience`).
    fn grace_for(&self, peer: &PeerId) -> Duration {
        self.patience.grace_for(peer, self.local_phase)
    }

    /// Whether `peer` answered `slot`: its message arrived, was refused,
    /// or both. Each peer counts once: a refused-plus-valid pair must not
    /// stand in for an honest neighbour still on its way.
    /// A neighbour further ahead than the slots kept has answered every
    /// slot up to the one its newest message is for.
    fn answered(&self, peer: &PeerId, slot: u64) -> bool {
        self.inbox.get(&slot).is_some_and(|m| m.contains_key(peer))
            || self.refused.get(&slot).is_some_and(|r| r.contains(peer))
            || self.ahead.get(peer).is_some_and(|m| m.slot >= slot)
    }

    /// What mixes for `peer` in `slot` if nothing came for it: the
    /// neighbour's newest message from further ahead, in every slot until
    /// this node gets to that message's own. Without it a node that fell
    /// more than the kept slots behind would find nothing of that
    /// neighbour's for the slots between, wait out a deadline in each and
    /// drift apart from it for the rest of the run; with it, it mixes
    /// the neighbour's newest model without waiting and catches up at its
    /// own pace (the neighbour, ahead, waits for it). A late message is
    /// never mixed: a stale model would hold the mix back (in the
    /// simulator, 64 nodes on a lossy exponential graph ended 600 times
    /// further from consensus when late messages stood in).
    fn stand_in(&mut self, peer: &PeerId, slot: u64) -> Option<Message> {
        let newest = self.ahead.get(peer)?;
        match newest.slot.cmp(&slot) {
            std::cmp::Ordering::Greater => {
                let m = newest.clone();
                self.drops.add("mixed_newest_ahead");
                Some(m)
            }
            std::cmp::Ordering::Equal => self.ahead.remove(peer),
            std::cmp::Ordering::Less => {
                self.ahead.remove(peer);
                None
            }
        }
    }

    /// Where `peer` is in the exchange under way's expected peers, if that
    /// exchange is `slot`'s and expects it.
    fn expected(&self, peer: &PeerId, slot: u64) -> Option<usize> {
        match &self.phase {
            Phase::Exchanging { expect, keys, .. } if slot == self.current_slot() => {
                find_peer(keys, peer, |i| &expect[i])
            }
            _ => None,
        }
    }

    /// When the exchange stops waiting for `awaiting`: the longest grace
    /// and credit among them after the last answer, never past the
    /// deadline.
    fn wait_limit(&self, awaiting: &Awaiting, last_heard: Instant, deadline: Instant) -> Instant {
        (last_heard + awaiting.max_wait()).min(deadline)
    }

    /// Combines x with the expected messages of `slot` that pass the norm
    /// bound, with the configured aggregator.
    fn mix(&mut self, expect: &[PeerId], mut msgs: SlotInbox, slot: u64) {
        let before = msgs.len();
        msgs.retain(|m| expect.binary_search(&m.peer).is_ok());
        self.drops.add_many("unexpected_sender", (before - msgs.len()) as u64);
        let me = self.roster.me;
        let weights = self.topology().map(|t| t.weights(me, slot)).unwrap_or_default();
        let mut own_weight = 0.0;
        let mut others: Vec<(&[f32], f64)> = Vec::with_capacity(weights.len());
        let mut weighed = 0;
        for (j, w) in weights {
            if j == me {
                own_weight = w;
                continue;
            }
            let peer = self.roster.members[j];
            let Some(m) = msgs.get(&peer) else { continue };
            weighed += 1;
            if m.values.len() != self.x.len() {
                // Arrived before this node knew its own length.
                self.drops.add("wrong_length");
                continue;
            }
            if !self.admits(&m.values) {
                tracing::debug!(%peer, slot, "refused a neighbour's vector: norm_bound");
                self.drops.add("norm_bound");
                continue;
            }
            others.push((m.values.as_slice(), w));
        }
        // The weights are the members' now: a neighbour that said it was
        // leaving (it finished) after its message came is not in them.
        self.drops.add_many("sender_left", (msgs.len() - weighed) as u64);
        let distance: f64 = others.iter().map(|(v, _)| l2_distance(&self.x, v)).sum();
        // An exchange in which nobody arrived keeps the last distance known.
        if !others.is_empty() {
            self.last_neighbour_distance = Some(distance / others.len() as f64);
        }
        self.x = self.cfg.aggregator.aggregate(&self.x, own_weight, &others);
    }

    /// Whether the norm bound lets `values` into this mix.
    fn admits(&self, values: &[f32]) -> bool {
        self.update_norm.is_none_or(|u| self.norm_bound.admits(&self.x, values, u))
    }

    fn finish_round(&mut self, mixed: bool, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        if mixed {
            if self.norm_bound.is_enabled() {
                self.last_mixed = Some(self.x.clone());
            }
            actions.push(Action::SetParams(self.x.clone()));
        }
        self.round += 1;
        // Slots of rounds that did not communicate (`--comm every:K`) are
        // never mixed: forget what came for them. Not `current_slot()`: the
        // phase still names the last step, which would also forget what
        // came early for the next round's first steps.
        let current = self.slot(0);
        self.inbox.remove_below(&current);
        self.refused = self.refused.split_off(&current);
        if self.round >= self.cfg.rounds {
            self.phase = Phase::Done;
            actions.push(Action::Finish);
        } else {
            self.phase = Phase::Training;
            self.training_since = Some(now);
            actions.push(Action::Train { steps: self.cfg.local_steps });
        }
        actions
    }

    fn receive(&mut self, m: Message, now: Instant) -> Vec<Action> {
        let current = self.current_slot();
        let expected = self.expected(&m.peer, m.slot);
        let reason = if m.kind != MsgKind::Params {
            Some("wrong_kind")
        } else if !self.x.is_empty() && m.values.len() != self.x.len() {
            Some("wrong_length")
        } else if m.slot < current {
            Some("stale_slot")
        } else if m.slot > current + MAX_SLOTS_AHEAD {
            Some("far_future_slot")
        } else if expected.is_none() && !self.is_in_neighbour(&m.peer, m.slot) {
            Some("not_a_neighbour")
        } else if !self.awaits(expected)
            && self.inbox.get(&m.slot).is_some_and(|b| b.contains_key(&m.peer))
        {
            Some("duplicate")
        } else if m.slot > current && self.held_ahead(&m.peer) >= MAX_AHEAD_PER_PEER {
            Some("too_far_ahead")
        } else {
            None
        };
        if let Some(r) = reason {
            self.drops.add(r);
            if r == "stale_slot" {
                self.patience.heard_late(&m.peer);
            }
            let older = |held: &Message| held.slot >= m.slot;
            if r != "too_far_ahead" || self.ahead.get(&m.peer).is_some_and(older) {
                return Vec::new();
            }
            let peer = m.peer;
            self.ahead.insert(peer, m);
            // It is past the exchange under way, if that waits for it.
            if let Some(pos) = self.expected(&peer, current) {
                self.heard(pos, now);
            }
            return self.try_mix(now, false);
        }
        if let Some(pos) = expected {
            self.heard(pos, now);
        }
        self.inbox.get_or_insert_with(m.slot, SlotInbox::default).insert(m);
        self.try_mix(now, false)
    }

    /// Notes an answer at `now` of the peer at `pos` of the exchange under
    /// way: it is no longer awaited, and its first answer in this exchange
    /// is charged what waiting for it cost beyond the grace.
    fn heard(&mut self, pos: usize, now: Instant) {
        // The grace the exchange gave it, kept while it is awaited: a
        // lookup per message would cost the simulator a tenth of its time.
        let Phase::Exchanging { expect, awaiting, .. } = &self.phase else { return };
        let grace = awaiting.grace(pos).or_else(|| expect.get(pos).map(|p| self.grace_for(p)));
        let Some(grace) = grace else { return };
        if let Phase::Exchanging { last_heard, charged, awaiting, .. } = &mut self.phase {
            awaiting.answered(pos);
            if charged[pos].is_none() {
                charged[pos] = Some(now.saturating_duration_since(*last_heard + grace));
                *last_heard = now;
            }
        }
    }

    /// Whether the exchange under way still awaits the peer at `pos`: then
    /// nothing of its is in the inbox for the slot yet (its first message
    /// or refusal ends the wait), and no lookup there is needed.
    fn awaits(&self, pos: Option<usize>) -> bool {
        match (&self.phase, pos) {
            (Phase::Exchanging { awaiting, .. }, Some(pos)) => awaiting.contains(pos),
            _ => false,
        }
    }

    /// Whether `peer` sends to this node in `slot` (only those messages are
    /// kept: anyone else's would only take memory).
    fn is_in_neighbour(&mut self, peer: &PeerId, slot: u64) -> bool {
        let Some(j) = self.roster.index_of(peer) else { return false };
        let me = self.roster.me;
        self.topology().is_some_and(|t| t.sends_to(j, me, slot))
    }

    /// The local phase that ends next began at `at` (`overlap`: the
    /// trainer started it before this strategy asked for it, so its own
    /// clock would see only the part after the mix).
    pub fn phase_began(&mut self, at: Instant) {
        self.training_since = Some(at);
    }

    /// Messages from `peer` held for slots after the current one.
    fn held_ahead(&self, peer: &PeerId) -> usize {
        let current = self.current_slot();
        self.inbox.above(&current).filter(|(_, b)| b.contains_key(peer)).count()
    }
}

impl Mixer for Gossip {
    fn set_start_params(&mut self, params: &[f32]) {
        self.x = params.to_vec();
        if self.norm_bound.is_enabled() {
            self.last_mixed = Some(params.to_vec());
        }
    }

    fn snapshot(&self) -> Option<StrategyState> {
        StrategyState::params(self.round, &self.x)
    }

    fn adopt(&mut self, params: &[f32]) {
        if params.len() == self.x.len() {
            self.x.copy_from_slice(params);
            if let Some(last) = self.last_mixed.as_mut() {
                last.copy_from_slice(params);
            }
        }
    }

    fn restore(&mut self, state: StrategyState) -> Result<Vec<f32>, StateError> {
        let (round, x) = state.take_params(self.x.len())?;
        self.round = round;
        self.x = x.clone();
        if self.norm_bound.is_enabled() {
            self.last_mixed = Some(x.clone());
        }
        Ok(x)
    }

    fn start(&mut self, now: Instant) -> Vec<Action> {
        if self.round >= self.cfg.rounds {
            self.phase = Phase::Done;
            return vec![Action::Finish];
        }
        self.training_since = Some(now);
        self.last_mix = Some(now);
        vec![Action::Train { steps: self.cfg.local_steps }]
    }

    fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::LocalDone { params, .. } => {
                if self.phase != Phase::Training {
                    self.drops.add("unexpected_local_done");
                    return Vec::new();
                }
                self.update_norm = self
                    .last_mixed
                    .as_deref()
                    .filter(|last| last.len() == params.len())
                    .map(|last| l2_distance(&params, last));
                self.x = params;
                if let Some(since) = self.training_since.take() {
                    self.local_phase = now.saturating_duration_since(since);
                }
                if self.cfg.comm.communicates(self.round, self.cfg.rounds)
                    && self.cfg.gossip_steps > 0
                {
                    self.begin_step(0, now)
                } else {
                    self.finish_round(false, now)
                }
            }
            Input::Received(m) => self.receive(m, now),
            Input::Refused { peer, kind: MsgKind::Params, slot } => {
                let current = self.current_slot();
                if slot >= current && slot <= current + MAX_SLOTS_AHEAD {
                    if let Some(pos) = self.expected(&peer, slot) {
                        self.heard(pos, now);
                    }
                    self.refused.entry(slot).or_default().insert(peer);
                }
                self.try_mix(now, false)
            }
            Input::Refused { .. } => Vec::new(),
            Input::Unreachable(peer) => {
                // Not waited for in the exchange under way (a later one
                // waits again: the connection may come back).
                let current = self.current_slot();
                if let Some(pos) = self.expected(&peer, current)
                    && let Phase::Exchanging { awaiting, .. } = &mut self.phase
                {
                    awaiting.answered(pos);
                    self.refused.entry(current).or_default().insert(peer);
                }
                self.try_mix(now, false)
            }
            Input::Members { members, joined } => {
                let roster = Roster::shared(self.roster.me(), members);
                self.patience.set_members(&roster, &joined);
                self.ahead.retain(|p, _| roster.index_of(p).is_some());
                if let Phase::Exchanging { awaiting, expect, .. } = &mut self.phase {
                    awaiting.left(expect, &roster);
                }
                self.roster = roster;
                Vec::new()
            }
            Input::Tick if self.deadline().is_some_and(|d| now >= d) => self.try_mix(now, true),
            Input::Tick => Vec::new(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Exchanging { awaiting, deadline, last_heard, .. } => {
                Some(self.wait_limit(awaiting, *last_heard, *deadline))
            }
            _ => None,
        }
    }

    fn round(&self) -> u64 {
        self.round
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.drops.list()
    }

    fn neighbour_distance(&self) -> Option<f64> {
        self.last_neighbour_distance
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn peers(n: usize) -> Vec<PeerId> {
        let mut p: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        p.sort();
        p
    }

    pub(crate) fn cfg(topology: &str, rounds: u64) -> GossipConfig {
        GossipConfig {
            topology: topology.parse().unwrap(),
            seed: 1,
            rounds,
            local_steps: 5,
            gossip_steps: 1,
            comm: CommSchedule::Every(1),
            timeout: Duration::from_secs(1),
            start_round: 0,
            aggregator: Aggregator::Mean,
            norm_bound: 0.0,
            encoding: Encoding::F32,
            straggler_grace: Some(crate::mix::patience::DEFAULT_STRAGGLER_GRACE),
        }
    }

    /// Runs all nodes in lockstep with instant, lossless delivery.
    fn lockstep(mut nodes: Vec<Gossip>, mut x: Vec<Vec<f32>>, rounds: u64) -> Vec<Vec<f32>> {
        let now = Instant::now();
        let ids: Vec<PeerId> = nodes.iter().map(|g| g.roster.me()).collect();
        for n in nodes.iter_mut() {
            assert_eq!(n.start(now), vec![Action::Train { steps: 5 }]);
        }
        for _ in 0..rounds {
            let mut queue = Vec::new();
            for (i, n) in nodes.iter_mut().enumerate() {
                let acts = n.handle(Input::LocalDone { params: x[i].clone(), samples: 1 }, now);
                queue.extend(acts.into_iter().map(|a| (i, a)));
            }
            while let Some((from, a)) = queue.pop() {
                match a {
                    Action::Send(mut m) => {
                        let to = ids.iter().position(|p| *p == m.peer).unwrap();
                        m.peer = ids[from];
                        let acts = nodes[to].handle(Input::Received(m), now);
                        queue.extend(acts.into_iter().map(|a| (to, a)));
                    }
                    Action::SetParams(p) => x[from] = p,
                    _ => {}
                }
            }
        }
        x
    }

    #[test]
    fn averaging_on_a_ring_converges_to_the_mean() {
        let ids = peers(8);
        let nodes: Vec<Gossip> =
            ids.iter().map(|&p| Gossip::new(cfg("ring", 400), p, ids.clone()).unwrap()).collect();
        let x0: Vec<Vec<f32>> = (0..8).map(|i| vec![i as f32, (i * i) as f32]).collect();
        let mean = [3.5f32, 17.5];
        let x = lockstep(nodes, x0, 400);
        for xi in &x {
            assert!((xi[0] - mean[0]).abs() < 1e-4 && (xi[1] - mean[1]).abs() < 1e-3, "{xi:?}");
        }
    }

    #[test]
    fn one_peer_exponential_is_exact_in_log2_n_rounds() {
        let ids = peers(8);
        let nodes: Vec<Gossip> = ids
            .iter()
            .map(|&p| Gossip::new(cfg("one-peer-exp", 3), p, ids.clone()).unwrap())
            .collect();
        let x0: Vec<Vec<f32>> = (0..8).map(|i| vec![i as f32 * 2.0]).collect();
        let x = lockstep(nodes, x0, 3);
        assert!(x.iter().all(|xi| xi[0] == 7.0), "{x:?}");
    }

    #[test]
    fn a_silent_neighbour_is_renormalised_away_at_the_deadline() {
        let (ids, mut g, t0) = started(3, 2);
        let acts = g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Send(_))).count(), 2);
        assert_eq!(g.deadline(), Some(t0 + Duration::from_secs(1)));
        let msg = Message {
            peer: ids[1],
            kind: MsgKind::Params,
            slot: 0,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![3.0]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(g.handle(Input::Received(msg.clone()), t0).is_empty(), "waits for the third node");
        assert!(g.handle(Input::Tick, t0 + Duration::from_millis(999)).is_empty());
        let acts = g.handle(Input::Tick, t0 + Duration::from_secs(1));
        // MH weights on K3 are 1/3 each; renormalised over two: (0 + 3) / 2.
        assert_eq!(acts, vec![Action::SetParams(vec![1.5]), Action::Train { steps: 5 }]);
        // A late message for the finished slot is dropped, not mixed later.
        let late = Message { peer: ids[2], ..msg };
        assert!(g.handle(Input::Received(late), t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(g.drops.get("stale_slot"), 1);
    }

    #[test]
    fn a_refused_message_is_not_waited_for_and_a_missing_one_is_counted() {
        let (ids, mut g, t0) = started(3, 3);
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        assert!(g.handle(params(ids[1], 0, 3.0), t0).is_empty());
        // The third node's message was refused (NaN): mix now, not at the deadline.
        let acts = g.handle(Input::Refused { peer: ids[2], kind: MsgKind::Params, slot: 0 }, t0);
        assert_eq!(acts, vec![Action::SetParams(vec![1.5]), Action::Train { steps: 5 }]);
        assert_eq!(g.drops.get("missing_at_deadline"), 0);
        // Next round nothing arrives from either: both are missing at the
        // deadline (members at the start have a deadline of credit).
        g.handle(Input::LocalDone { params: vec![1.5], samples: 1 }, t0);
        g.handle(Input::Tick, t0 + Duration::from_secs(1));
        assert_eq!(g.drops.get("missing_at_deadline"), 2);
        assert_eq!(g.neighbour_distance(), Some(3.0), "the last exchange that mixed anyone");
    }

    /// One round of node 0 on K3 whose local phase takes `local`, starting
    /// at `t`; node 1 answers at once, node 2 `late` after it (never: None),
    /// unless node 0 has stopped waiting by then. Returns when node 0 mixed
    /// and the value it mixed to.
    fn round_with(
        g: &mut Gossip,
        ids: &[PeerId],
        t: Instant,
        local: Duration,
        late: Option<Duration>,
    ) -> (Instant, f32) {
        let slot = g.round();
        let done = t + local;
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, done);
        let mut acts = g.handle(params(ids[1], slot, 3.0), done);
        let mut arrival = late.map(|l| done + l);
        let mut at = done;
        while acts.is_empty() {
            let tick = g.deadline().unwrap();
            (at, acts) = match arrival.take() {
                Some(a) if a < tick => (a, g.handle(params(ids[2], slot, 6.0), a)),
                _ => (tick, g.handle(Input::Tick, tick)),
            };
        }
        let Action::SetParams(x) = &acts[0] else { panic!("{acts:?}") };
        (at, x[0])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_silent_member_costs_its_credit_once_then_mostly_the_shortest_grace() {
        let (ids, mut g, t0) = started(3, 100);
        let local = ms(500);
        // A member at the start has a deadline of credit: the first silence
        // is waited out; 900 ms of it spent beyond the 100 ms grace.
        let (t1, _) = round_with(&mut g, &ids, t0, local, None);
        assert_eq!(t1, t0 + local + ms(1000));
        // Having missed, no grace, only the 100 ms of credit left; then not
        // waited for at all, so 60 ms late is too late, until the fourth
        // exchange since the miss (a probe) waits the grace (0.2 x 500 ms).
        let (t2, x) = round_with(&mut g, &ids, t1, local, None);
        assert_eq!((t2, x), (t1 + local + ms(100), 1.5), "mixed with node 1 alone");
        let (t3, x) = round_with(&mut g, &ids, t2, local, Some(ms(300)));
        assert_eq!((t3, x), (t2 + local, 1.5), "300 ms late is too late now");
        let (t4, x) = round_with(&mut g, &ids, t3, local, Some(ms(60)));
        assert_eq!((t4, x), (t3 + local, 1.5), "so is 60 ms, but for a probe");
        assert_eq!(g.drops.get("missing_at_deadline"), 1);
        assert_eq!(g.drops.get("missing_after_grace"), 3);
        // The probe: within the grace it is mixed, and from then on each
        // answer in time earns it 0.2 x 560 ms: after 9, a deadline's worth.
        let mut t = t4;
        for _ in 0..9 {
            let (next, x) = round_with(&mut g, &ids, t, local, Some(ms(60)));
            assert_eq!((next, x), (t + local + ms(60), 3.0));
            t = next;
        }
        let (t5, x) = round_with(&mut g, &ids, t, local, Some(ms(900)));
        assert_eq!((t5, x), (t + local + ms(900), 3.0), "waited for again");
        // Off: every silence costs the deadline.
        let mut c = cfg("complete", 100);
        c.straggler_grace = None;
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        g.start(t0);
        let (t1, _) = round_with(&mut g, &ids, t0, local, None);
        let (t2, _) = round_with(&mut g, &ids, t1, local, None);
        assert_eq!(t2, t1 + local + ms(1000));
    }

    #[test]
    fn a_neighbour_a_round_behind_is_waited_the_grace_in_every_exchange_while_its_messages_come() {
        let (ids, mut g, t0) = started(3, 100);
        let local = ms(500);
        // Node 2 misses the first exchange (900 ms of its credit spent),
        // then runs a round behind: its message for each slot comes after
        // node 0 mixed it, early in node 0's next local phase. Alive and
        // behind, it is waited the whole grace (0.2 x 500 ms) every time,
        // never put on probation: that wait is how it catches up.
        let (mut t, _) = round_with(&mut g, &ids, t0, local, None);
        for i in 0..6 {
            let just_mixed = g.round() - 1;
            assert!(g.handle(params(ids[2], just_mixed, 6.0), t + ms(10)).is_empty());
            let (next, x) = round_with(&mut g, &ids, t, local, None);
            let waited = if i == 0 { ms(200) } else { ms(100) }; // first with its last 100 ms of credit
            assert_eq!((next, x), (t + local + waited, 1.5), "exchange {i}");
            t = next;
        }
        assert_eq!(g.drops.get("stale_slot"), 6);
        // Silent again: probation (no grace) after one miss.
        let (next, _) = round_with(&mut g, &ids, t, local, None);
        assert_eq!(next, t + local + ms(100), "the grace of the exchange it missed");
        let (last, _) = round_with(&mut g, &ids, next, local, None);
        assert_eq!(last, next + local);
    }

    #[test]
    fn a_message_whose_sender_left_before_the_mix_is_counted_not_weighed() {
        let (ids, mut g, t0) = started(3, 2);
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        let msg = |peer: PeerId, v: f32| Message {
            peer,
            kind: MsgKind::Params,
            slot: 0,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![v]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(g.handle(Input::Received(msg(ids[2], 30.0)), t0).is_empty());
        // Node 2 finished and said it was leaving, before node 1 answered.
        let members = ids[..2].to_vec().into();
        assert!(g.handle(Input::Members { members, joined: Vec::new() }, t0).is_empty());
        let acts = g.handle(Input::Received(msg(ids[1], 3.0)), t0);
        // MH weights on K2 are 1/2 each: node 2's 30 is not in it.
        assert_eq!(acts, vec![Action::SetParams(vec![1.5]), Action::Train { steps: 5 }]);
        assert_eq!(g.drops.get("sender_left"), 1);
        assert_eq!(g.drops.get("unexpected_sender"), 0);
    }

    #[test]
    fn a_member_that_joined_later_is_waited_for_only_the_grace_until_it_earns_more() {
        let ids = peers(3);
        let mut g = Gossip::new(cfg("complete", 100), ids[0], ids[..2].to_vec()).unwrap();
        let joined = vec![ids[2]];
        g.handle(Input::Members { members: ids.clone().into(), joined }, Instant::now());
        let local = ms(200);
        let t0 = Instant::now();
        g.start(t0);
        // Grace: max(0.2 x 200 ms, MIN_GRACE) = 40 ms; no credit yet.
        let (t1, x) = round_with(&mut g, &ids, t0, local, Some(ms(300)));
        assert_eq!((t1, x), (t0 + local + ms(40), 1.5));
        // Having missed, it is not waited for in three exchanges, then gets
        // the grace again (a probe).
        let mut t = t1;
        for i in 0..3 {
            let (next, x) = round_with(&mut g, &ids, t, local, Some(ms(30)));
            assert_eq!((next, x), (t + local, 1.5), "exchange {i} after the miss");
            t = next;
        }
        // Each answer in time earns 0.2 x 230 ms; 15 of them, 690 ms.
        for i in 0..15 {
            let (next, x) = round_with(&mut g, &ids, t, local, Some(ms(30)));
            assert_eq!((next, x), (t + local + ms(30), 3.0), "round {i}");
            t = next;
        }
        let (t2, x) = round_with(&mut g, &ids, t, local, Some(ms(700)));
        assert_eq!((t2, x), (t + local + ms(700), 3.0), "earned: waited for");
    }

    #[test]
    fn a_peer_that_sends_a_refused_and_a_valid_message_is_counted_once() {
        let (ids, mut g, t0) = started(3, 3);
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        let refused = Input::Refused { peer: ids[1], kind: MsgKind::Params, slot: 0 };
        assert!(g.handle(refused, t0).is_empty());
        assert!(g.handle(params(ids[1], 0, 3.0), t0).is_empty(), "still waits for the third");
        let acts = g.handle(params(ids[2], 0, 6.0), t0);
        assert_eq!(acts, vec![Action::SetParams(vec![3.0]), Action::Train { steps: 5 }]);
    }

    #[test]
    fn a_node_far_behind_its_neighbour_mixes_the_newest_model_without_waiting() {
        let (ids, mut g, t0) = started(2, 8);
        // The neighbour is four slots ahead: 0 is current, 1 and 2 are kept
        // ahead, 3 and 4 are too far ahead; 4, the newest, stands in.
        for slot in 0..=4 {
            g.handle(params(ids[1], slot, slot as f32), t0);
        }
        assert_eq!(g.drops.get("too_far_ahead"), 2);
        assert_eq!(g.ahead.len(), 1);
        // Slots 0-2 mix what was kept for them, 3 the newest model (slot
        // 4's) at once, 4 its own message; on K2, (0 + v) / 2.
        for (slot, v) in [(0, 0.0), (1, 0.5), (2, 1.0), (3, 2.0), (4, 2.0)] {
            let acts = g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
            let mixed = acts.iter().find(|a| matches!(a, Action::SetParams(_)));
            assert_eq!(mixed, Some(&Action::SetParams(vec![v])), "slot {slot}: {acts:?}");
        }
        assert_eq!(g.drops.get("mixed_newest_ahead"), 1);
        assert_eq!(g.drops.get("missing_at_deadline") + g.drops.get("missing_after_grace"), 0);
        assert!(g.ahead.is_empty());
        // Slot 5: nothing of the neighbour's is left to stand in; it waits.
        let acts = g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        assert!(acts.iter().all(|a| matches!(a, Action::Send(_))), "{acts:?}");
    }

    #[test]
    fn a_message_far_ahead_arriving_mid_exchange_ends_the_wait_for_its_sender() {
        let (ids, mut g, t0) = started(2, 8);
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        // Slot 0's message was lost; 1 and 2 are kept, 3 is the newest.
        for slot in 1..=2 {
            assert!(g.handle(params(ids[1], slot, 1.0), t0).is_empty());
        }
        let acts = g.handle(params(ids[1], 3, 4.0), t0);
        assert_eq!(acts, vec![Action::SetParams(vec![2.0]), Action::Train { steps: 5 }]);
    }

    #[test]
    fn only_neighbours_near_the_current_slot_are_kept_and_skipped_slots_are_freed() {
        // Ring of 5: node 0 hears from 1 and 4, never from 2 or 3.
        let ids = peers(5);
        let mut c = cfg("ring", 100);
        c.comm = CommSchedule::Every(3);
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.start(t0);
        assert!(g.handle(params(ids[2], 0, 1.0), t0).is_empty());
        assert_eq!(g.drops.get("not_a_neighbour"), 1);
        let stranger = PeerId::random();
        g.handle(params(stranger, 0, 1.0), t0);
        assert_eq!(g.drops.get("not_a_neighbour"), 2);
        // Two slots ahead are kept per neighbour, the third is not.
        for slot in [1, 2, 3] {
            g.handle(params(ids[1], slot, 1.0), t0);
        }
        assert_eq!(g.drops.get("too_far_ahead"), 1);
        assert_eq!(g.inbox.values().map(SlotInbox::len).sum::<usize>(), 2);
        // Rounds 1 and 2 do not communicate: their slots are freed as the
        // node passes them.
        for x in [0.0, 0.0] {
            g.handle(Input::LocalDone { params: vec![x], samples: 1 }, t0);
            g.handle(Input::Tick, t0 + Duration::from_secs(2));
        }
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        assert!(g.inbox.keys().all(|&slot| slot >= 3), "{:?}", g.inbox.keys().collect::<Vec<_>>());
    }

    #[test]
    fn a_message_early_for_the_next_rounds_first_step_is_kept() {
        // Two gossip steps a round: slots 0 and 1, then 2 and 3.
        let ids = peers(2);
        let mut c = cfg("complete", 3);
        c.gossip_steps = 2;
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.start(t0);
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        g.handle(params(ids[1], 0, 2.0), t0);
        // The neighbour's slot 2 overtakes its slot 1.
        g.handle(params(ids[1], 2, 4.0), t0);
        let acts = g.handle(params(ids[1], 1, 2.0), t0);
        assert!(acts.contains(&Action::Train { steps: 5 }), "{acts:?}");
        // Round 1's first step mixes at once with what came early.
        let acts = g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        let sent: Vec<u64> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(m.slot),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [2, 3], "{acts:?}");
        assert_eq!(g.drops.get("missing_after_grace") + g.drops.get("missing_at_deadline"), 0);
    }

    /// Node 0 of `n` on a complete graph for `rounds` rounds, started:
    /// the members, its strategy and when it started.
    fn started(n: usize, rounds: u64) -> (Vec<PeerId>, Gossip, Instant) {
        let ids = peers(n);
        let mut g = Gossip::new(cfg("complete", rounds), ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.start(t0);
        (ids, g, t0)
    }

    fn params(peer: PeerId, slot: u64, v: f32) -> Input {
        Input::Received(Message {
            peer,
            kind: MsgKind::Params,
            slot,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![v]),
            encoding: Encoding::F32,
            part: 0,
        })
    }

    #[test]
    fn a_robust_aggregator_ignores_the_outlier_that_the_mean_takes() {
        let ids = peers(4);
        for (aggregator, want) in [
            // MH weights on K4 are 1/4 each: (0 + 1 + 2 + 100) / 4.
            (Aggregator::Mean, 25.75),
            // {0, 1, 2, 100}: (1 + 2) / 2.
            (Aggregator::Median, 1.5),
            (Aggregator::TrimmedMean { beta: 0.25 }, 1.5),
            // One neighbour each (4 - 1 - 2): 0, 1 and 2 all score 1; own wins.
            (Aggregator::Krum { f: 1 }, 0.0),
        ] {
            let mut g =
                Gossip::new(GossipConfig { aggregator, ..cfg("complete", 1) }, ids[0], ids.clone())
                    .unwrap();
            let t0 = Instant::now();
            g.start(t0);
            g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
            g.handle(params(ids[1], 0, 1.0), t0);
            g.handle(params(ids[2], 0, 2.0), t0);
            let acts = g.handle(params(ids[3], 0, 100.0), t0);
            assert_eq!(acts, vec![Action::SetParams(vec![want]), Action::Finish], "{aggregator}");
        }
    }

    #[test]
    fn the_norm_bound_refuses_a_vector_far_beyond_the_own_update() {
        let ids = peers(3);
        let c = GossipConfig { norm_bound: 2.0, ..cfg("complete", 2) };
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.start(t0);
        // Round 0 is not bounded (no earlier mix to measure the update from):
        // 30 is 30 away, yet mixed: (0 + 0 + 30) / 3.
        g.handle(Input::LocalDone { params: vec![0.0], samples: 1 }, t0);
        g.handle(params(ids[1], 0, 0.0), t0);
        let acts = g.handle(params(ids[2], 0, 30.0), t0);
        assert_eq!(acts[0], Action::SetParams(vec![10.0]));
        // Round 1: the local phase moved 10 -> 11, so the bound is 2 * 1.
        // 12.5 (1.5 away) is mixed, 20 (9 away) refused: (11 + 12.5) / 2.
        g.handle(Input::LocalDone { params: vec![11.0], samples: 1 }, t0);
        g.handle(params(ids[1], 1, 12.5), t0);
        let acts = g.handle(params(ids[2], 1, 20.0), t0);
        assert_eq!(acts, vec![Action::SetParams(vec![11.75]), Action::Finish]);
        assert_eq!(g.drops.get("norm_bound"), 1);
        assert_eq!(g.last_neighbour_distance, Some(1.5));
    }

    #[test]
    fn with_start_params_the_norm_bound_holds_from_the_first_mix() {
        let ids = peers(3);
        let c = GossipConfig { norm_bound: 2.0, ..cfg("complete", 2) };
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.set_start_params(&[0.0]);
        g.start(t0);
        // The first phase moved 0 -> 1: bound 2 * 1. 2.5 is mixed, 30 refused.
        g.handle(Input::LocalDone { params: vec![1.0], samples: 1 }, t0);
        g.handle(params(ids[1], 0, 2.5), t0);
        let acts = g.handle(params(ids[2], 0, 30.0), t0);
        assert_eq!(acts[0], Action::SetParams(vec![1.75]));
        assert_eq!(g.drops.get("norm_bound"), 1);
    }

    #[test]
    fn rounds_without_communication_just_train() {
        let ids = peers(2);
        let mut c = cfg("ring", 4);
        c.comm = CommSchedule::Every(2);
        let mut g = Gossip::new(c, ids[0], ids.clone()).unwrap();
        let t0 = Instant::now();
        g.start(t0);
        assert!(
            g.handle(Input::LocalDone { params: vec![1.0], samples: 1 }, t0)
                .iter()
                .any(|a| matches!(a, Action::Send(_)))
        );
        let m = Message {
            peer: ids[1],
            kind: MsgKind::Params,
            slot: 0,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![3.0]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert_eq!(
            g.handle(Input::Received(m), t0),
            vec![Action::SetParams(vec![2.0]), Action::Train { steps: 5 }]
        );
        assert_eq!(
            g.handle(Input::LocalDone { params: vec![2.0], samples: 1 }, t0),
            vec![Action::Train { steps: 5 }]
        );
        assert_eq!(g.round(), 2);
    }
}
