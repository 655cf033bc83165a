//! A bandwidth-optimal all-reduce (weighted mean) as a sans-IO component,
//! for strategies that need every live member to agree on one average: the
//! final `merge` and DiLoCo's outer step.
//!
//! Each of the n members of a fixed [`Roster`] owns a contiguous 1/n of the
//! vector ([`shard`]). A member sends every other member its slice of that
//! member's range (`Shard`), so each byte of the vector crosses the network
//! about twice in total however large n is. An owner sums the weighted shards
//! that arrive, divides by the weight that arrived, and sends the mean back
//! (`ShardResult`). Two deadlines bound the wait, both counted from `start`:
//! an owner reduces over whatever arrived by the reduce deadline
//! (renormalising over the weights that arrived), and at the gather deadline
//! a range whose owner never answered keeps this member's own values, so a
//! dead owner costs agreement on its range, never progress.
//!
//! Sums are accumulated in f64 and rounded to f32 once, so equal weights give
//! the arithmetic mean to f32 rounding whatever the arrival order, and every
//! member that hears an owner gets bit-identical values for its range.
//!
//! With a robust [`Aggregator`] an owner keeps the shards it is sent and
//! combines them with its own by that aggregator (median, trimmed mean,
//! Krum) instead of the weighted mean; a [`NormBound`] refuses, before that,
//! a shard farther from the owner's own values than a multiple of the
//! owner's own update on that range (when a reference to measure it from is
//! set). Robust aggregation protects each owner's range from bad
//! contributors; it cannot protect a range from a bad owner.
//!
//! Compression: with a lossy [`Encoding`] (`with_encoding`) shards travel
//! in it as they are given (a caller that compresses, such as DiLoCo with
//! its error feedback, hands over values the encoding carries exactly, and
//! top-k travels as the shard's nonzero entries), and an owner rounds its
//! mean through the encoding before it keeps or sends it, so every member
//! still holds bit-identical values for each range. Sums stay in f64.
//!
//! A declared weight above `with_max_weight`'s bound is refused: a peer's
//! claim of how much data stands behind its shard is not taken whole.
//!
//! This component owns the shard arithmetic and the validation of shard
//! messages; it never touches sockets or clocks (time is passed in), and it
//! does not route: the strategy asks [`AllReduce::accepts`] and hands over
//! the messages of this all-reduce's `slot`.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::aggregate::{Aggregator, NormBound, l2_distance};
use crate::net::encoding::{self, Encoding};

use super::mixer::{Drops, Message, MsgKind, Roster};

/// Messages held before `start` (a faster peer may send its shards before
/// this node has its values); beyond this they are dropped.
const MAX_EARLY: usize = 4096;

/// The deadline of each phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllReduceTimeouts {
    /// How long an owner waits for the other members' shards, from `start`.
    pub reduce: Duration,
    /// How much longer a member waits for the owners' results after the
    /// reduce deadline (the owners' own wait plus transfer time).
    pub gather: Duration,
}

/// The range of a `len`-long vector that member `j` of `n` owns:
/// `[j*len/n, (j+1)*len/n)`. Empty when `len < n` for some members.
pub fn shard(len: usize, n: usize, j: usize) -> Range<usize> {
    let n = n.max(1);
    (j * len / n)..((j + 1) * len / n)
}

/// Who filled a range of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Pending,
    /// The owner's mean (or an empty range, which needs no one).
    Owner,
    /// The gather deadline passed first: the range keeps the local values.
    Fallback,
}

/// This member's own shard while contributions arrive.
#[derive(Debug)]
struct Reduction {
    sum: Vec<f64>,
    weight: f64,
    from: BTreeSet<PeerId>,
    /// The contributions themselves, kept for a robust aggregator.
    shards: Vec<(Arc<Vec<f32>>, f64)>,
    /// Members whose contribution was refused on arrival: not waited for.
    silent: BTreeSet<PeerId>,
}

/// The state from `start` on.
#[derive(Debug)]
struct Running {
    roster: Roster,
    reduce_deadline: Instant,
    gather_deadline: Instant,
    /// `None` once this member's shard has been reduced and sent back.
    own: Option<Reduction>,
    /// Starts as the local values, so a range that falls back is already
    /// right; the owners' results overwrite their ranges.
    result: Vec<f32>,
    fills: Vec<Fill>,
}

/// One all-reduce among a fixed set of members, named by `slot`.
#[derive(Debug)]
pub struct AllReduce {
    slot: u64,
    timeouts: AllReduceTimeouts,
    early: Vec<Message>,
    /// Values the early messages hold together.
    early_values: usize,
    run: Option<Running>,
    drops: Drops,
    contributions: usize,
    aggregator: Aggregator,
    norm_bound: NormBound,
    /// Where this member's values stood at its last mix, for the norm bound.
    reference: Option<Vec<f32>>,
    encoding: Encoding,
    max_weight: Option<f64>,
    /// Values early messages may hold together (`with_early_limit`).
    early_limit: usize,
}

impl AllReduce {
    /// An all-reduce that will run on messages of `slot` once started; until
    /// then it holds the messages it is given.
    pub fn new(slot: u64, timeouts: AllReduceTimeouts) -> AllReduce {
        AllReduce {
            slot,
            timeouts,
            early: Vec::new(),
            early_values: 0,
            run: None,
            drops: Drops::default(),
            contributions: 0,
            aggregator: Aggregator::Mean,
            norm_bound: NormBound::default(),
            reference: None,
            encoding: Encoding::F32,
            max_weight: None,
            early_limit: usize::MAX,
        }
    }

    /// Shards and results travel in `encoding` (see the module doc).
    pub fn with_encoding(mut self, encoding: Encoding) -> AllReduce {
        self.encoding = encoding;
        self
    }

    /// Shards that declare a weight above `max` are refused.
    /// Early messages (before `start`) hold at most `values` values in all:
    /// a peer's messages for a later exchange are kept, not an unbounded
    /// pile of them.
    pub fn with_early_limit(mut self, values: usize) -> AllReduce {
        self.early_limit = values;
        self
    }

    pub fn set_early_limit(&mut self, values: usize) {
        self.early_limit = values;
    }

    pub fn with_max_weight(mut self, max: f64) -> AllReduce {
        self.max_weight = Some(max);
        self
    }

    /// Owners combine with `aggregator` and refuse shards over `norm_bound`.
    pub fn with_aggregation(mut self, aggregator: Aggregator, norm_bound: NormBound) -> AllReduce {
        self.aggregator = aggregator;
        self.norm_bound = norm_bound;
        self
    }

    /// The vector this member's own update is measured from (its values at
    /// its last mix); without one the norm bound does not apply.
    pub fn set_reference(&mut self, reference: Vec<f32>) {
        self.reference = Some(reference);
    }

    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// Whether `m` belongs to this all-reduce (the strategy routes by this).
    pub fn accepts(&self, m: &Message) -> bool {
        m.slot == self.slot && matches!(m.kind, MsgKind::Shard | MsgKind::ShardResult)
    }

    /// Contributes `values` with `weight` among `roster` (fixed from now on)
    /// and returns the shards to send. Messages that arrived earlier are
    /// processed now. A second call is ignored and counted.
    pub fn start(
        &mut self,
        roster: Roster,
        values: Vec<f32>,
        weight: f64,
        now: Instant,
    ) -> Vec<Message> {
        if self.run.is_some() {
            self.drops.add("repeated_start");
            return Vec::new();
        }
        let (n, me, len) = (roster.len(), roster.me, values.len());
        let mut out = Vec::new();
        for (j, &peer) in roster.members.iter().enumerate() {
            let range = shard(len, n, j);
            if j != me && !range.is_empty() {
                let values = &values[range.clone()];
                let mut m = self.message(peer, MsgKind::Shard, weight, range.start, values);
                m.encoding = wire_encoding(self.encoding, values);
                out.push(m);
            }
        }
        let mine = shard(len, n, me);
        let own = (!mine.is_empty()).then(|| Reduction {
            sum: values[mine].iter().map(|&v| weight * f64::from(v)).collect(),
            weight,
            from: BTreeSet::new(),
            shards: Vec::new(),
            silent: BTreeSet::new(),
        });
        let fills = (0..n)
            .map(|j| if shard(len, n, j).is_empty() { Fill::Owner } else { Fill::Pending })
            .collect();
        let reduce_deadline = now + self.timeouts.reduce;
        self.run = Some(Running {
            roster,
            reduce_deadline,
            gather_deadline: reduce_deadline + self.timeouts.gather,
            own,
            result: values,
            fills,
        });
        self.early_values = 0;
        for m in std::mem::take(&mut self.early) {
            out.extend(self.receive(m));
        }
        out.extend(self.try_reduce(false));
        out
    }

    /// Takes one message of this all-reduce; returns what to send in reply
    /// (this member's reduced shard, once the last contribution arrived).
    pub fn receive(&mut self, m: Message) -> Vec<Message> {
        if !self.accepts(&m) {
            self.drops.add("other_all_reduce");
            return Vec::new();
        }
        let Some(run) = &mut self.run else {
            self.hold(m);
            return Vec::new();
        };
        let reason = match m.kind {
            MsgKind::Shard if self.max_weight.is_some_and(|max| m.weight > max) => {
                Err("weight_above_bound")
            }
            MsgKind::Shard => {
                let bound = (self.norm_bound, self.reference.as_deref());
                run.add_shard(&m, bound, !self.aggregator.is_mean())
            }
            _ => run.add_result(&m),
        };
        match reason {
            // A member's shard refused for what it holds will not come
            // again in a better form: it is not waited for.
            Err(
                r @ ("bad_weight" | "weight_above_bound" | "non_finite" | "wrong_length"
                | "wrong_offset" | "norm_bound"),
            ) if m.kind == MsgKind::Shard => {
                self.drops.add(r);
                self.refused(m.peer, MsgKind::Shard)
            }
            // An owner's result that does not fit the range it owns here
            // (its roster differs from this member's) will not come right:
            // the range keeps the local values now, not at the deadline.
            Err(r @ ("wrong_offset" | "wrong_length" | "non_finite"))
                if m.kind == MsgKind::ShardResult =>
            {
                self.drops.add(r);
                self.refused(m.peer, MsgKind::ShardResult)
            }
            Err(r) => {
                self.drops.add(r);
                Vec::new()
            }
            Ok(()) if m.kind == MsgKind::Shard => {
                self.contributions += 1;
                self.try_reduce(false)
            }
            Ok(()) => Vec::new(),
        }
    }

    /// A member's message to this all-reduce was refused on arrival: a
    /// refused shard is not waited for, and a refused result leaves its
    /// range to the local values at once. Returns what to send in reply.
    pub fn refused(&mut self, peer: PeerId, kind: MsgKind) -> Vec<Message> {
        let Some(run) = &mut self.run else { return Vec::new() };
        let Some(j) = run.roster.index_of(&peer).filter(|&j| j != run.roster.me) else {
            return Vec::new();
        };
        match kind {
            MsgKind::Shard => {
                if let Some(own) = &mut run.own {
                    own.silent.insert(peer);
                }
                self.try_reduce(false)
            }
            MsgKind::ShardResult => {
                if run.fills[j] == Fill::Pending {
                    run.fills[j] = Fill::Fallback;
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The last connection to `peer` closed: its shard and its result will
    /// not come, so neither is waited for (its range keeps the local
    /// values). Returns what to send in reply.
    pub fn unreachable(&mut self, peer: PeerId) -> Vec<Message> {
        let mut out = self.refused(peer, MsgKind::Shard);
        out.extend(self.refused(peer, MsgKind::ShardResult));
        out
    }

    /// The ranges that kept the local values (their owner never answered),
    /// once the all-reduce is done.
    pub fn fallback_ranges(&self) -> Vec<Range<usize>> {
        let Some(run) = &self.run else { return Vec::new() };
        (0..run.roster.len())
            .filter(|&j| run.fills[j] == Fill::Fallback)
            .map(|j| run.range(j))
            .collect()
    }

    /// Acts on the deadlines that `now` has passed.
    pub fn tick(&mut self, now: Instant) -> Vec<Message> {
        let Some(run) = &self.run else { return Vec::new() };
        let (reduce, gather) = (run.reduce_deadline, run.gather_deadline);
        let out = if now >= reduce { self.try_reduce(true) } else { Vec::new() };
        if let Some(run) = self.run.as_mut().filter(|_| now >= gather) {
            run.fills.iter_mut().filter(|f| **f == Fill::Pending).for_each(|f| *f = Fill::Fallback);
        }
        out
    }

    /// The next time `tick` must be called, if any.
    pub fn deadline(&self) -> Option<Instant> {
        let run = self.run.as_ref()?;
        if run.own.is_some() {
            Some(run.reduce_deadline)
        } else if run.fills.contains(&Fill::Pending) {
            Some(run.gather_deadline)
        } else {
            None
        }
    }

    pub fn is_done(&self) -> bool {
        self.run.as_ref().is_some_and(|r| !r.fills.contains(&Fill::Pending))
    }

    /// The averaged vector, once every range is filled.
    pub fn result(&self) -> Option<&[f32]> {
        self.run.as_ref().filter(|_| self.is_done()).map(|r| r.result.as_slice())
    }

    /// Ranges that kept the local values because their owner never answered.
    pub fn fallbacks(&self) -> usize {
        self.run.as_ref().map_or(0, |r| r.fills.iter().filter(|f| **f == Fill::Fallback).count())
    }

    /// Other members' shards averaged into this member's range.
    pub fn contributions(&self) -> usize {
        self.contributions
    }

    pub fn drops(&self) -> &Drops {
        &self.drops
    }

    fn hold(&mut self, m: Message) {
        if self.early.iter().any(|e| e.peer == m.peer && e.kind == m.kind) {
            self.drops.add("duplicate");
        } else if self.early.len() >= MAX_EARLY
            || self.early_values + m.values.len() > self.early_limit
        {
            self.drops.add("too_many_early");
        } else {
            self.early_values += m.values.len();
            self.early.push(m);
        }
    }

    fn message(
        &self,
        peer: PeerId,
        kind: MsgKind,
        weight: f64,
        offset: usize,
        values: &[f32],
    ) -> Message {
        Message {
            peer,
            kind,
            slot: self.slot,
            weight,
            offset,
            values: Arc::new(values.to_vec()),
            encoding: Encoding::F32,
            part: 0,
        }
    }

    /// Reduces this member's shard if every other member contributed, or
    /// `force` (the reduce deadline passed), and returns the results to send.
    fn try_reduce(&mut self, force: bool) -> Vec<Message> {
        let Some(run) = &mut self.run else { return Vec::new() };
        let Some(own) = &run.own else { return Vec::new() };
        let answered = own.from.union(&own.silent).count();
        if answered + 1 < run.roster.len() && !force {
            return Vec::new();
        }
        let Some(own) = run.own.take() else { return Vec::new() };
        let (me, range) = (run.roster.me, run.range(run.roster.me));
        let mean = &mut run.result[range.clone()];
        let finite_mean =
            |sum: &[f64], weight: f64| sum.iter().all(|s| ((s / weight) as f32).is_finite());
        if !self.aggregator.is_mean() {
            let others: Vec<(&[f32], f64)> =
                own.shards.iter().map(|(v, w)| (v.as_slice(), *w)).collect();
            let combined = self.aggregator.aggregate(mean, 1.0, &others);
            if combined.iter().all(|v| v.is_finite()) {
                mean.copy_from_slice(&combined);
            } else {
                self.drops.add("non_finite_aggregate");
            }
        } else if own.weight > 0.0 && !finite_mean(&own.sum, own.weight) {
            // Only reachable past the weight and value checks by overflow:
            // the range keeps the local values rather than spread infinity.
            self.drops.add("non_finite_aggregate");
        } else if own.weight > 0.0 {
            // Zero total weight has no mean: the range keeps the local values.
            mean.iter_mut().zip(&own.sum).for_each(|(m, s)| *m = (s / own.weight) as f32);
        }
        let result_encoding = match self.encoding {
            Encoding::F32 => Encoding::F32,
            // Sums of sparse shards: sent exactly, as their nonzero entries.
            Encoding::TopK { .. } => wire_encoding(self.encoding, mean),
            lossy => {
                let rounded = encoding::round_trip(mean, lossy);
                mean.copy_from_slice(&rounded);
                lossy
            }
        };
        run.fills[me] = Fill::Owner;
        let values = Arc::new(mean.to_vec());
        run.roster
            .members
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != me)
            .map(|(_, &peer)| Message {
                peer,
                kind: MsgKind::ShardResult,
                slot: self.slot,
                weight: own.weight,
                offset: range.start,
                values: values.clone(),
                encoding: result_encoding,
                part: 0,
            })
            .collect()
    }
}

/// How `values` travel in `encoding`: top-k as exactly their nonzero
/// entries (or f32 when that is smaller), anything else as it is.
fn wire_encoding(encoding: Encoding, values: &[f32]) -> Encoding {
    match encoding {
        Encoding::TopK { .. } => {
            let nonzero = values.iter().filter(|v| **v != 0.0).count();
            // 8 bytes per kept entry against 4 per value.
            if nonzero * 2 >= values.len() {
                Encoding::F32
            } else {
                Encoding::TopK { k: u32::try_from(nonzero.max(1)).unwrap_or(u32::MAX) }
            }
        }
        other => other,
    }
}

impl Running {
    fn range(&self, j: usize) -> Range<usize> {
        shard(self.result.len(), self.roster.len(), j)
    }

    /// The sender's index, if it is another member and `m` covers exactly
    /// the range `owner` owns with finite values.
    fn check(&self, m: &Message, owner: impl Fn(usize) -> usize) -> Result<usize, &'static str> {
        let j = self.roster.index_of(&m.peer).ok_or("not_a_member")?;
        if j == self.roster.me {
            return Err("from_self");
        }
        let range = self.range(owner(j));
        if m.offset != range.start {
            Err("wrong_offset")
        } else if m.values.len() != range.len() {
            Err("wrong_length")
        } else if crate::net::wire::first_non_finite(&m.values).is_some() {
            Err("non_finite")
        } else {
            Ok(j)
        }
    }

    /// Takes a contribution to this member's range; `keep` holds on to it
    /// for a robust aggregator.
    fn add_shard(
        &mut self,
        m: &Message,
        (bound, reference): (NormBound, Option<&[f32]>),
        keep: bool,
    ) -> Result<(), &'static str> {
        let me = self.roster.me;
        self.check(m, |_| me)?;
        if !(m.weight.is_finite() && m.weight >= 0.0) {
            return Err("bad_weight");
        }
        let range = self.range(me);
        let local = &self.result[range.clone()];
        if let Some(reference) = reference.filter(|r| r.len() == self.result.len()) {
            let update = l2_distance(local, &reference[range]);
            if !bound.admits(local, &m.values, update) {
                return Err("norm_bound");
            }
        }
        let own = self.own.as_mut().ok_or("late_shard")?;
        if own.from.contains(&m.peer) {
            return Err("duplicate");
        }
        own.from.insert(m.peer);
        if keep {
            own.shards.push((m.values.clone(), m.weight));
        }
        own.sum.iter_mut().zip(m.values.iter()).for_each(|(s, &v)| *s += m.weight * f64::from(v));
        own.weight += m.weight;
        Ok(())
    }

    fn add_result(&mut self, m: &Message) -> Result<(), &'static str> {
        let j = self.check(m, |j| j)?;
        match self.fills[j] {
            Fill::Owner => return Err("duplicate"),
            Fill::Fallback => return Err("late_result"),
            Fill::Pending => {}
        }
        let range = self.range(j);
        self.result[range].copy_from_slice(&m.values);
        self.fills[j] = Fill::Owner;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    const T: AllReduceTimeouts =
        AllReduceTimeouts { reduce: Duration::from_secs(1), gather: Duration::from_secs(1) };

    fn peers(n: usize) -> Vec<PeerId> {
        let mut p: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        p.sort();
        p
    }

    fn values(n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| (0..len).map(|k| ((i * 31 + k * 7) % 17) as f32 * 0.37 - 2.5).collect())
            .collect()
    }

    fn weighted_mean(x: &[Vec<f32>], w: &[f64]) -> Vec<f64> {
        let total: f64 = w.iter().sum();
        (0..x[0].len())
            .map(|k| x.iter().zip(w).map(|(xi, wi)| wi * f64::from(xi[k])).sum::<f64>() / total)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!((f64::from(*g) - w).abs() <= tol, "{what}: [{k}] {g} vs {w}");
        }
    }

    /// A cluster of all-reduces with instant delivery; `dead` members neither
    /// receive nor send after `start`.
    struct Cluster {
        ids: Vec<PeerId>,
        ars: Vec<AllReduce>,
        dead: Vec<bool>,
        t0: Instant,
    }

    impl Cluster {
        fn new(n: usize) -> Cluster {
            Cluster {
                ids: peers(n),
                ars: (0..n).map(|_| AllReduce::new(7, T)).collect(),
                dead: vec![false; n],
                t0: Instant::now(),
            }
        }

        fn start(&mut self, i: usize, x: &[f32], w: f64) {
            let roster = Roster::new(self.ids[i], self.ids.clone());
            let out = self.ars[i].start(roster, x.to_vec(), w, self.t0);
            self.deliver(i, out);
        }

        fn deliver(&mut self, from: usize, out: Vec<Message>) {
            let mut queue: VecDeque<(usize, Message)> =
                out.into_iter().map(|m| (from, m)).collect();
            while let Some((from, mut m)) = queue.pop_front() {
                let to = self.ids.iter().position(|p| *p == m.peer).unwrap();
                if self.dead[to] {
                    continue;
                }
                m.peer = self.ids[from];
                let out = self.ars[to].receive(m);
                queue.extend(out.into_iter().map(|m| (to, m)));
            }
        }

        fn tick(&mut self, after: Duration) {
            for i in 0..self.ids.len() {
                if !self.dead[i] {
                    let out = self.ars[i].tick(self.t0 + after);
                    self.deliver(i, out);
                }
            }
        }
    }

    #[test]
    fn equal_weights_give_the_arithmetic_mean_for_any_length() {
        for n in 2..=7 {
            for len in [0, 1, n - 1, n + 1, 3 * n + 2, 1001] {
                let x = values(n, len);
                let mut c = Cluster::new(n);
                for (i, xi) in x.iter().enumerate() {
                    c.start(i, xi, 1.0);
                }
                let want = weighted_mean(&x, &vec![1.0; n]);
                for (i, ar) in c.ars.iter().enumerate() {
                    let what = format!("n={n} len={len} member {i}");
                    assert!(ar.is_done() && ar.deadline().is_none(), "{what}");
                    assert_close(ar.result().unwrap(), &want, &what);
                    assert_eq!(ar.result(), c.ars[0].result(), "{what}: members disagree");
                    assert_eq!(ar.fallbacks(), 0, "{what}");
                    let own = shard(len, n, i);
                    assert_eq!(ar.contributions(), if own.is_empty() { 0 } else { n - 1 });
                }
            }
        }
    }

    #[test]
    fn unequal_weights_give_the_f32_weighted_mean_for_2_3_5_8_members_and_uneven_lengths() {
        for n in [2, 3, 5, 8] {
            for len in [n - 1, n + 3, 7 * n + 5, 1000 + n] {
                let x = values(n, len);
                let w: Vec<f64> = (0..n).map(|i| 1.0 + 3.0 * i as f64).collect();
                let mut c = Cluster::new(n);
                for (i, xi) in x.iter().enumerate() {
                    c.start(i, xi, w[i]);
                }
                let want = weighted_mean(&x, &w);
                for ar in &c.ars {
                    let what = format!("n={n} len={len}");
                    assert_close(ar.result().unwrap(), &want, &what);
                    assert_eq!(ar.result(), c.ars[0].result(), "{what}: members disagree");
                }
            }
        }
    }

    #[test]
    fn a_robust_owner_keeps_a_bad_shard_out_and_the_mean_does_not() {
        let n = 5;
        // Four honest members near 1.0, one Byzantine at 1000.
        let x: Vec<Vec<f32>> =
            (0..n).map(|i| vec![if i == 4 { 1000.0 } else { 1.0 + i as f32 * 0.01 }; 10]).collect();
        for (aggregator, lo, hi) in [
            (Aggregator::Mean, 200.0, 201.0),
            (Aggregator::Median, 1.01, 1.03),
            (Aggregator::TrimmedMean { beta: 0.2 }, 1.0, 1.03),
        ] {
            let mut c = Cluster::new(n);
            for ar in c.ars.iter_mut() {
                *ar = AllReduce::new(7, T).with_aggregation(aggregator, NormBound::default());
            }
            for (i, xi) in x.iter().enumerate() {
                c.start(i, xi, 1.0);
            }
            for ar in &c.ars {
                let r = ar.result().unwrap();
                assert!(r.iter().all(|v| (lo..=hi).contains(v)), "{aggregator}: {r:?}");
                assert_eq!(ar.result(), c.ars[0].result(), "{aggregator}: members agree");
            }
        }
    }

    #[test]
    fn the_norm_bound_refuses_a_far_shard_once_there_is_a_reference() {
        let ids = peers(2);
        let mut ar =
            AllReduce::new(7, T).with_aggregation(Aggregator::Mean, NormBound::new(2.0).unwrap());
        // Own update on its range is 1 (from 0 to 1): a shard 5 away is refused.
        ar.set_reference(vec![0.0, 0.0]);
        let roster = Roster::new(ids[0], ids.clone());
        let me = roster.me;
        let t0 = Instant::now();
        ar.start(roster, vec![1.0, 1.0], 1.0, t0);
        let range = shard(2, 2, me);
        let far = Message {
            peer: ids[1 - me],
            kind: MsgKind::Shard,
            slot: 7,
            weight: 1.0,
            offset: range.start,
            values: Arc::new(vec![6.0; range.len()]),
            encoding: Encoding::F32,
            part: 0,
        };
        // Refused, and not waited for: the owner's range is its own value.
        let out = ar.receive(far);
        assert_eq!(ar.drops().get("norm_bound"), 1);
        assert!(out.iter().all(|m| *m.values == vec![1.0f32; range.len()]), "{out:?}");
    }

    #[test]
    fn a_refused_shard_is_not_waited_for_and_a_refused_result_falls_back() {
        let ids = peers(3);
        let roster = Roster::new(ids[0], ids.clone());
        let (me, t0) = (roster.me, Instant::now());
        let mut ar = AllReduce::new(7, T);
        let sent = ar.start(roster, vec![3.0; 6], 1.0, t0);
        assert_eq!(sent.len(), 2, "one shard to each other owner");
        let others: Vec<PeerId> = ids.iter().copied().filter(|p| *p != ids[me]).collect();
        let mine = shard(6, 3, me);
        let shard_from = |peer| Message {
            peer,
            kind: MsgKind::Shard,
            slot: 7,
            weight: 1.0,
            offset: mine.start,
            values: Arc::new(vec![5.0; mine.len()]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(ar.receive(shard_from(others[0])).is_empty(), "waits for the third");
        let results = ar.refused(others[1], MsgKind::Shard);
        assert_eq!(results.len(), 2, "reduced over the two that answered, at once");
        assert!(results.iter().all(|m| m.values.iter().all(|&v| v == 4.0)));
        // Both other owners' results refused: their ranges keep the local values.
        ar.refused(others[0], MsgKind::ShardResult);
        ar.refused(others[1], MsgKind::ShardResult);
        assert!(ar.is_done() && ar.fallbacks() == 2);
    }

    #[test]
    fn huge_weights_are_refused_and_an_overflowing_sum_is_never_applied() {
        // Bounded: a declared weight above the bound is refused outright.
        let mut c = Cluster::new(3);
        c.ars.iter_mut().for_each(|a| *a = AllReduce::new(7, T).with_max_weight(1.0));
        let x = values(3, 9);
        c.start(0, &x[0], 1.0);
        c.start(1, &x[1], 1e300);
        c.start(2, &x[2], 1.0);
        assert_eq!(c.ars[0].drops().get("weight_above_bound"), 1);
        assert_eq!(c.ars[2].drops().get("weight_above_bound"), 1);
        // Unbounded (no configured bound): 1e308 twice overflows the f64
        // sum; the owner keeps its local values instead of infinity.
        let mut c = Cluster::new(3);
        let x = values(3, 9);
        for (i, w) in [1e308, 1e308, 1.0].into_iter().enumerate() {
            c.start(i, &x[i], w);
        }
        for ar in &c.ars {
            assert!(ar.result().unwrap().iter().all(|v| v.is_finite()), "{:?}", ar.result());
        }
        assert!(c.ars.iter().map(|a| a.drops().get("non_finite_aggregate")).sum::<u64>() >= 1);
    }

    #[test]
    fn early_messages_are_bounded_in_values() {
        let ids = peers(4);
        let mut ar = AllReduce::new(7, T).with_early_limit(10);
        let early = |peer, kind, n| Message {
            peer,
            kind,
            slot: 7,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![1.0; n]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(ar.receive(early(ids[1], MsgKind::Shard, 6)).is_empty());
        assert!(ar.receive(early(ids[2], MsgKind::Shard, 4)).is_empty());
        assert!(ar.receive(early(ids[3], MsgKind::Shard, 1)).is_empty());
        assert_eq!(ar.drops().get("too_many_early"), 1, "11 values would pass the bound of 10");
    }

    #[test]
    fn shards_partition_the_vector() {
        for (len, n) in [(10, 3), (2, 5), (0, 4), (7, 7)] {
            let ranges: Vec<_> = (0..n).map(|j| shard(len, n, j)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[n - 1].end, len);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(shard(10, 3, 1), 3..6);
        assert_eq!(shard(2, 5, 0), 0..0);
    }

    #[test]
    fn unequal_weights_give_the_weighted_mean() {
        let x = values(4, 9);
        let w = [1.0, 2.0, 3.0, 10.0];
        let mut c = Cluster::new(4);
        for i in 0..4 {
            c.start(i, &x[i], w[i]);
        }
        let want = weighted_mean(&x, &w);
        for ar in &c.ars {
            assert_close(ar.result().unwrap(), &want, "weighted");
        }
        // Hand-checked: element 0 is (1*-2.5 + 2*(31%17*.37-2.5) + ...) / 16.
        let hand = (1.0 * -2.5
            + 2.0 * (14.0 * 0.37 - 2.5)
            + 3.0 * (62.0f64 % 17.0 * 0.37 - 2.5)
            + 10.0 * (93.0f64 % 17.0 * 0.37 - 2.5))
            / 16.0;
        assert!((want[0] - hand).abs() < 1e-6, "{} vs {hand}", want[0]);
    }

    #[test]
    fn one_member_completes_at_once() {
        let id = PeerId::random();
        let mut ar = AllReduce::new(0, T);
        let out = ar.start(Roster::new(id, vec![id]), vec![1.5, -2.0], 3.0, Instant::now());
        assert!(out.is_empty());
        assert_eq!(ar.result(), Some(&[1.5f32, -2.0][..]));
        assert_eq!(ar.deadline(), None);
    }

    #[test]
    fn a_member_that_never_sends_is_renormalised_away_at_the_reduce_deadline() {
        let n = 4;
        let x = values(n, 11);
        let mut c = Cluster::new(n);
        c.dead[3] = true;
        for (i, xi) in x.iter().enumerate().take(3) {
            c.start(i, xi, 1.0);
        }
        assert!(c.ars.iter().take(3).all(|a| !a.is_done()));
        assert_eq!(c.ars[0].deadline(), Some(c.t0 + T.reduce));
        c.tick(T.reduce - Duration::from_millis(1));
        assert!(c.ars[0].deadline() == Some(c.t0 + T.reduce), "nothing happens early");
        c.tick(T.reduce);
        let mean3 = weighted_mean(&x[..3], &[1.0; 3]);
        for i in 0..3 {
            // Ranges 0..3 are reduced over the three that arrived; member 3's
            // range waits for the gather deadline.
            assert!(!c.ars[i].is_done());
            assert_eq!(c.ars[i].deadline(), Some(c.t0 + T.reduce + T.gather));
            assert_eq!(c.ars[i].contributions(), 2);
        }
        c.tick(T.reduce + T.gather);
        let owned3 = shard(11, n, 3);
        for (ar, xi) in c.ars.iter().zip(&x).take(3) {
            let got = ar.result().unwrap();
            assert_close(&got[..owned3.start], &mean3[..owned3.start], "reduced ranges");
            assert_eq!(&got[owned3.clone()], &xi[owned3.clone()], "fallback to local values");
            assert_eq!(ar.fallbacks(), 1);
        }
    }

    #[test]
    fn a_dead_owners_range_keeps_each_survivors_local_values() {
        let n = 5;
        let len = 13;
        let x = values(n, len);
        let mut c = Cluster::new(n);
        // Member 2 sends its shards, then dies before reducing its own.
        c.start(2, &x[2], 1.0);
        c.dead[2] = true;
        for i in [0, 1, 3, 4] {
            c.start(i, &x[i], 1.0);
        }
        let mean = weighted_mean(&x, &[1.0; 5]);
        let dead = shard(len, n, 2);
        for i in [0, 1, 3, 4] {
            assert!(c.ars[i].result().is_none(), "waits for the dead owner");
        }
        c.tick(T.reduce + T.gather);
        for i in [0, 1, 3, 4] {
            let got = c.ars[i].result().unwrap();
            assert_eq!(&got[dead.clone()], &x[i][dead.clone()]);
            assert_close(&got[..dead.start], &mean[..dead.start], "before");
            assert_close(&got[dead.end..], &mean[dead.end..], "after");
        }
        // A result that comes after the fallback is not mixed in.
        let late = Message {
            peer: c.ids[2],
            kind: MsgKind::ShardResult,
            slot: 7,
            weight: 5.0,
            offset: dead.start,
            values: Arc::new(vec![9.0; dead.len()]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(c.ars[0].receive(late).is_empty());
        assert_eq!(c.ars[0].drops().get("late_result"), 1);
        assert_eq!(&c.ars[0].result().unwrap()[dead.clone()], &x[0][dead]);
    }

    #[test]
    fn duplicate_misaddressed_and_foreign_shards_are_dropped_and_counted() {
        let ids = peers(3);
        let t0 = Instant::now();
        // len 6: member 0 owns 0..2, member 1 owns 2..4, member 2 owns 4..6.
        let fresh = || {
            let mut ar = AllReduce::new(7, T);
            let out = ar.start(Roster::new(ids[0], ids.clone()), vec![0.0; 6], 1.0, t0);
            (ar, out)
        };
        let (_, out) = fresh();
        assert_eq!(
            out.iter().map(|m| (m.offset, m.values.len())).collect::<Vec<_>>(),
            [(2, 2), (4, 2)]
        );
        let shard = |peer, offset, len: usize| Message {
            peer,
            kind: MsgKind::Shard,
            slot: 7,
            weight: 1.0,
            offset,
            values: Arc::new(vec![3.0; len]),
            encoding: Encoding::F32,
            part: 0,
        };
        // Refused for what it holds: counted, and the member is not waited for.
        for (bad, reason) in [
            (shard(ids[2], 2, 2), "wrong_offset"),
            (shard(ids[2], 0, 3), "wrong_length"),
            (Message { weight: f64::NAN, ..shard(ids[2], 0, 2) }, "bad_weight"),
            (
                Message { values: Arc::new(vec![f32::NAN, 1.0]), ..shard(ids[2], 0, 2) },
                "non_finite",
            ),
        ] {
            let (mut ar, _) = fresh();
            assert!(ar.receive(shard(ids[1], 0, 2)).is_empty(), "{reason}: waits for member 2");
            let out = ar.receive(bad);
            assert_eq!(ar.drops().get(reason), 1, "{reason}");
            assert_eq!(out.len(), 2, "{reason}: reduced at once without member 2");
            assert!(out.iter().all(|m| *m.values == vec![1.5f32; 2]), "{reason}: (0 + 3) / 2");
        }
        // Not a member, from itself, another all-reduce, a duplicate, a
        // misplaced result: counted, and nothing else changes.
        let (mut ar, _) = fresh();
        assert!(ar.receive(shard(ids[1], 0, 2)).is_empty());
        assert!(ar.receive(shard(ids[1], 0, 2)).is_empty());
        assert!(ar.receive(shard(PeerId::random(), 0, 2)).is_empty());
        assert!(ar.receive(shard(ids[0], 0, 2)).is_empty());
        let other = Message { slot: 8, ..shard(ids[2], 0, 2) };
        assert!(!ar.accepts(&other));
        assert!(ar.receive(other).is_empty());
        let bad_result = Message { kind: MsgKind::ShardResult, ..shard(ids[1], 4, 2) };
        assert!(ar.receive(bad_result).is_empty());
        for (reason, count) in [
            ("duplicate", 1),
            ("not_a_member", 1),
            ("from_self", 1),
            ("other_all_reduce", 1),
            ("wrong_offset", 1),
        ] {
            assert_eq!(ar.drops().get(reason), count, "{reason}: {:?}", ar.drops());
        }
        // The good shard from member 1 counted once; member 2's completes it.
        let out = ar.receive(shard(ids[2], 0, 2));
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|m| m.kind == MsgKind::ShardResult && m.offset == 0));
        assert_eq!(out[0].values.as_ref(), &vec![2.0f32; 2], "(0 + 3 + 3) / 3");
        assert!(ar.receive(shard(ids[2], 0, 2)).is_empty());
        assert_eq!(ar.drops().get("late_shard"), 1);
        // Member 1's result did not fit its range here (its roster
        // differs): that range kept the local values at once.
        assert_eq!(ar.fallbacks(), 1);
        assert_eq!(ar.deadline(), Some(t0 + T.reduce + T.gather), "member 2's result still due");
    }

    #[test]
    fn shards_that_arrive_before_start_are_kept() {
        let ids = peers(2);
        let mut ar = AllReduce::new(1, T);
        let early = Message {
            peer: ids[1],
            kind: MsgKind::Shard,
            slot: 1,
            weight: 1.0,
            offset: 0,
            values: Arc::new(vec![4.0]),
            encoding: Encoding::F32,
            part: 0,
        };
        assert!(ar.receive(early.clone()).is_empty());
        assert!(ar.receive(early).is_empty());
        assert_eq!(ar.drops().get("duplicate"), 1);
        let out = ar.start(Roster::new(ids[0], ids.clone()), vec![2.0, 0.0], 1.0, Instant::now());
        let kinds: Vec<_> = out.iter().map(|m| (m.kind, m.offset)).collect();
        assert_eq!(kinds, [(MsgKind::Shard, 1), (MsgKind::ShardResult, 0)]);
        assert_eq!(out[1].values.as_ref(), &vec![3.0f32]);
    }
}
