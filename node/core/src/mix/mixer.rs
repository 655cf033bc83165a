//! The `Mixer` trait: a mixing strategy as a sans-IO state machine.
//!
//! A strategy never touches sockets, threads or clocks. The daemon (or the
//! simulator, or a unit test) feeds it `Input`s with the current time and
//! carries out the `Action`s it returns. That keeps the same strategy code
//! exact to test, deterministic to simulate, and real to run.

use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use murmur_proto::wire::v1::PayloadKind;

use crate::net::encoding::Encoding;

/// What a message is for; the one mapping to and from the wire's
/// `PayloadKind` (and the label traffic is counted under) lives here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsgKind {
    /// A full parameter vector (gossip, sparse pairwise exchange).
    Params,
    /// A pseudo-gradient (DiLoCo).
    Delta,
    /// One all-reduce shard, sent to its owner.
    Shard,
    /// An owner's reduced shard, sent back.
    ShardResult,
    /// A rejoining member asks for the strategy's state (the daemon's
    /// business: strategies never see one).
    PullRequest,
    /// One part of a pulled state (`Message::part`).
    PullReply,
    /// The coordinator asks for a member's parameters at the end of a
    /// round (one value: 1 send them, 0 only keep them as the reference).
    SampleRequest,
    /// A sampled member's parameters, for the coordinator.
    SampledParams,
    /// The coordinator's average of a round's sampled parameters.
    Average,
}

impl MsgKind {
    pub const ALL: [MsgKind; 9] = [
        MsgKind::Params,
        MsgKind::Delta,
        MsgKind::Shard,
        MsgKind::ShardResult,
        MsgKind::PullRequest,
        MsgKind::PullReply,
        MsgKind::SampleRequest,
        MsgKind::SampledParams,
        MsgKind::Average,
    ];

    pub fn to_wire(self) -> PayloadKind {
        match self {
            MsgKind::Params => PayloadKind::Params,
            MsgKind::Delta => PayloadKind::Delta,
            MsgKind::Shard => PayloadKind::Shard,
            MsgKind::ShardResult => PayloadKind::ShardResult,
            MsgKind::PullRequest => PayloadKind::PullRequest,
            MsgKind::PullReply => PayloadKind::PullReply,
            MsgKind::SampleRequest => PayloadKind::SampleRequest,
            MsgKind::SampledParams => PayloadKind::SampledParams,
            MsgKind::Average => PayloadKind::Average,
        }
    }

    /// The kind of a wire `PayloadKind` value; `None` for unknown values.
    pub fn from_wire(kind: i32) -> Option<MsgKind> {
        let kind = PayloadKind::try_from(kind).ok()?;
        MsgKind::ALL.into_iter().find(|k| k.to_wire() == kind)
    }

    /// The label its traffic is counted under.
    pub fn label(self) -> &'static str {
        match self {
            MsgKind::Params => "params",
            MsgKind::Delta => "delta",
            MsgKind::Shard => "shard",
            MsgKind::ShardResult => "shard_result",
            MsgKind::PullRequest => "pull_request",
            MsgKind::PullReply => "pull_reply",
            MsgKind::SampleRequest => "sample_request",
            MsgKind::SampledParams => "sampled_params",
            MsgKind::Average => "average",
        }
    }
}

/// A message between strategies. `slot` names the exchange it belongs to
/// (e.g. round and gossip step), so a late message never mixes into the
/// wrong exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub peer: PeerId,
    pub kind: MsgKind,
    pub slot: u64,
    /// Weight in a weighted mean (e.g. samples seen); 1 when unweighted.
    pub weight: f64,
    /// Index of `values[0]` in the full parameter vector (shards).
    pub offset: usize,
    pub values: Arc<Vec<f32>>,
    /// How the values travel. The sender's strategy chooses it (a lossy
    /// encoding for a compressed delta, f32 otherwise); what arrives says
    /// how it travelled.
    pub encoding: Encoding,
    /// Which part of a multi-part message (pull replies); 0 otherwise.
    pub part: u32,
}

impl Message {
    /// A message of `kind` for `slot` with weight 1, offset 0, f32 on the
    /// wire and part 0; set the other fields with struct update syntax.
    pub fn new(peer: PeerId, kind: MsgKind, slot: u64, values: Arc<Vec<f32>>) -> Message {
        Message {
            peer,
            kind,
            slot,
            weight: 1.0,
            offset: 0,
            values,
            encoding: Encoding::F32,
            part: 0,
        }
    }
}

/// What happened, as far as the strategy is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The trainer finished the local phase it was asked for.
    LocalDone { params: Vec<f32>, samples: u64 },
    /// A validated message from a peer (`Message::peer` is the sender).
    Received(Message),
    /// A peer's message of `kind` for `slot` arrived but was refused (NaN,
    /// bad checksum...): it will not come, so the strategy need not wait
    /// for it. It mixes nothing.
    Refused { peer: PeerId, kind: MsgKind, slot: u64 },
    /// The live members of the run changed: `members` (sorted, without
    /// duplicates, including this node), of whom `joined` were not members
    /// before. Shared, and the change named: the simulator hands one list
    /// to every node, which keeps it rather than a copy of the swarm each,
    /// and no node need compare two lists of the whole swarm.
    Members { members: Arc<[PeerId]>, joined: Vec<PeerId> },
    /// The last connection to this peer closed (a killed process, a cut
    /// link): what it has not sent to the exchanges under way will not
    /// come, so they need not wait for it. It stays a member until its
    /// heartbeats stop.
    Unreachable(PeerId),
    /// A deadline returned by `deadline()` has passed.
    Tick,
}

/// What the strategy asks the node to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Deliver a message (`Message::peer` is the destination).
    Send(Message),
    /// Replace the model's parameters.
    SetParams(Vec<f32>),
    /// Add these values to the model's parameters once the local phase
    /// under way (if any) ends (`overlap`: a mix's change, applied to
    /// the phase that trained on the unmixed vector meanwhile).
    Shift(Vec<f32>),
    /// Run `steps` local training steps, then report `LocalDone`.
    Train { steps: u64 },
    /// Record held-out metrics of the current parameters under `label`.
    Evaluate { label: &'static str },
    /// The run is over for this node.
    Finish,
}

/// A mixing strategy.
pub trait Mixer: Send {
    /// Actions to take when the node starts (usually the first `Train`).
    fn start(&mut self, now: Instant) -> Vec<Action>;

    /// The parameters the node starts from, given before `start`: the
    /// reference its own update is measured from until its first mix (so a
    /// norm bound holds from the first exchange on). Strategies that keep
    /// no reference ignore it.
    fn set_start_params(&mut self, _params: &[f32]) {}

    /// Reacts to one input.
    fn handle(&mut self, input: Input, now: Instant) -> Vec<Action>;

    /// The next time `Tick` must be delivered, if any.
    fn deadline(&self) -> Option<Instant>;

    /// The round this node is in (for status and heartbeats).
    fn round(&self) -> u64;

    /// Counters of what the strategy dropped, by reason (stale slot,
    /// unexpected sender, wrong length, missing at the deadline...).
    fn dropped(&self) -> Vec<(&'static str, u64)>;

    /// Mean L2 distance from this node's vector to the peers' vectors it
    /// mixed in its last exchange, if it mixed any yet.
    fn neighbour_distance(&self) -> Option<f64> {
        None
    }

    /// What a member that (re)joins takes from this one, and what a
    /// checkpoint keeps: part 0 is the parameters to continue from (the
    /// last mixed ones), then whatever the strategy itself carries across
    /// rounds (DiLoCo's outer momentum). `None` before the first round's
    /// parameters are known.
    fn snapshot(&self) -> Option<StrategyState>;

    /// Takes a state from a snapshot (a live member's, or a checkpoint's)
    /// before `start`, and returns the parameters the trainer continues
    /// from. A state of the wrong shape changes nothing.
    fn restore(&mut self, state: StrategyState) -> Result<Vec<f32>, StateError>;

    /// The outer optimizer's figures, for strategies that have one.
    fn outer(&self) -> Option<OuterStatus> {
        None
    }

    /// The parameters were set from outside the strategy (a coordinator's
    /// average): its own copy follows, so that snapshots and bounds see them.
    fn adopt(&mut self, _params: &[f32]) {}

    /// What a coordinated strategy did with its coordinator.
    fn coordination(&self) -> Option<super::coordinated::Coordination> {
        None
    }
}

/// The name of the parameters part (always part 0).
pub const PARAMS_PART: &str = "params";

/// A strategy's state at the start of `round`: named vectors, parameters
/// first (see `Mixer::snapshot`).
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyState {
    pub round: u64,
    pub parts: Vec<StatePart>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatePart {
    pub name: String,
    pub values: Arc<Vec<f32>>,
}

impl StrategyState {
    /// A state of the given parts, in order.
    pub fn new(round: u64, parts: Vec<(&str, Vec<f32>)>) -> StrategyState {
        let parts = parts
            .into_iter()
            .map(|(name, values)| StatePart { name: name.to_string(), values: Arc::new(values) })
            .collect();
        StrategyState { round, parts }
    }

    /// The state of a strategy that keeps nothing but the parameters
    /// (gossip, merge): `x` under the name `params`.
    pub fn params(round: u64, x: &[f32]) -> Option<StrategyState> {
        (!x.is_empty()).then(|| StrategyState::new(round, vec![(PARAMS_PART, x.to_vec())]))
    }

    /// The round and parameters of a state made by `params`, checked
    /// against `len` values.
    pub fn take_params(self, len: usize) -> Result<(u64, Vec<f32>), StateError> {
        let (round, mut parts) = self.take(&[PARAMS_PART], len)?;
        Ok((round, parts.pop().unwrap_or_default()))
    }

    /// The parts' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.name.clone()).collect()
    }

    /// Checks that the parts are `names`, each `len` finite values (any
    /// length when `len` is 0), and returns their values in that order.
    pub fn take(
        self,
        names: &[&'static str],
        len: usize,
    ) -> Result<(u64, Vec<Vec<f32>>), StateError> {
        let got: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if got != names {
            return Err(StateError::Parts { expected: names.join(","), got: got.join(",") });
        }
        let mut out = Vec::with_capacity(names.len());
        for (part, &name) in self.parts.into_iter().zip(names) {
            if len > 0 && part.values.len() != len {
                let got = part.values.len();
                return Err(StateError::Length { part: name, expected: len, got });
            }
            if let Some(index) = part.values.iter().position(|v| !v.is_finite()) {
                return Err(StateError::NonFinite { part: name, index });
            }
            out.push(Arc::try_unwrap(part.values).unwrap_or_else(|shared| shared.to_vec()));
        }
        Ok((self.round, out))
    }
}

/// Why a state could not be restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StateError {
    #[error("the state has parts [{got}], this strategy keeps [{expected}]")]
    Parts { expected: String, got: String },
    #[error("state part {part} has {got} values, this model has {expected}")]
    Length { part: &'static str, expected: usize, got: usize },
    #[error("state part {part} holds a non-finite value at index {index}")]
    NonFinite { part: &'static str, index: usize },
}

/// What the status and summary show of an outer optimizer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct OuterStatus {
    /// Outer steps applied (over all fragments).
    pub steps: u64,
    pub lr: f64,
    pub momentum: f64,
}

/// Sorted members and this node's index among them.
///
/// The member list is shared (`Arc`): the simulator gives one list to every
/// node's strategy, so a node costs its index, not a copy of the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub members: Arc<[PeerId]>,
    pub me: usize,
}

impl Roster {
    /// The roster for `members` (any order; this node added if missing).
    pub fn new(me: PeerId, mut members: Vec<PeerId>) -> Roster {
        members.push(me);
        members.sort();
        members.dedup();
        let idx = members.binary_search(&me).unwrap_or(0);
        Roster { members: members.into(), me: idx }
    }

    /// `members` (sorted, without duplicates) seen from `me`, sharing the
    /// list when it holds `me` (else a copy with `me` added).
    pub fn shared(me: PeerId, members: Arc<[PeerId]>) -> Roster {
        match members.binary_search(&me) {
            Ok(idx) => Roster { members, me: idx },
            Err(_) => Roster::new(me, members.to_vec()),
        }
    }

    /// The same members seen from `peer`, sharing the list (`None` if
    /// `peer` is not one of them).
    pub fn of(&self, peer: &PeerId) -> Option<Roster> {
        let me = self.index_of(peer)?;
        Some(Roster { members: self.members.clone(), me })
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn me(&self) -> PeerId {
        self.members[self.me]
    }

    pub fn index_of(&self, p: &PeerId) -> Option<usize> {
        self.members.binary_search(p).ok()
    }
}

/// Counts of dropped inputs by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops(std::collections::BTreeMap<&'static str, u64>);

impl Drops {
    pub fn add(&mut self, reason: &'static str) {
        self.add_many(reason, 1);
    }

    pub fn add_many(&mut self, reason: &'static str, n: u64) {
        if n > 0 {
            *self.0.entry(reason).or_default() += n;
        }
    }

    pub fn list(&self) -> Vec<(&'static str, u64)> {
        self.0.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Adds every count of `other`.
    pub fn absorb(&mut self, other: &Drops) {
        for (reason, n) in other.list() {
            self.add_many(reason, n);
        }
    }

    pub fn get(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }
}
