//! The `Mixer` trait: a mixing strategy as a sans-IO state machine.
//!
//! A strategy never touches sockets, threads or clocks. The daemon (or the
//! simulator, or a unit test) feeds it `Input`s with the current time and
//! carries out the `Action`s it returns. That keeps the same strategy code
//! exact to test, deterministic to simulate, and real to run.

use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;

/// What a message is for; mirrors the wire's `PayloadKind`.
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
    /// The live members of the run changed (sorted, including this node).
    Members(Vec<PeerId>),
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
}

/// Sorted members and this node's index among them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub members: Vec<PeerId>,
    pub me: usize,
}

impl Roster {
    /// The roster for `members` (any order; this node added if missing).
    pub fn new(me: PeerId, mut members: Vec<PeerId>) -> Roster {
        if !members.contains(&me) {
            members.push(me);
        }
        members.sort();
        members.dedup();
        let idx = members.iter().position(|p| *p == me).unwrap_or(0);
        Roster { members, me: idx }
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

    pub fn get(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }
}
