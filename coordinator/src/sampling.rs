//! The coordinator's sampling state machine, sans-IO: heartbeats and
//! parameters go in, `tick(now)` says what to send (Psyche's coordinator is
//! the model: every decision is a pure function of what came in and when).
//!
//! Sampling rounds are every `sample_every` rounds, the first at round
//! `sample_every - 1`. As soon as one sampling round is over, the next one
//! due at or after the members' (lower-median) round is drawn: K live
//! training members uniformly without replacement, seeded by the run's seed
//! and the round, so that the same membership and seed always give the same
//! sample. They are asked ahead of time for their parameters at the end of
//! that round; with sampled-to-all the other live members are told to keep
//! theirs then as the reference the average will correct. The request goes
//! out early so that members answer the moment they reach the round, and
//! wait only for the average: a round's answers come within an exchange's
//! time of each other, not a heartbeat's.
//!
//! Collection ends when every sampled member answered, when `deadline` has
//! passed since the first answer, or when nobody answered within
//! `patience`. It takes one vector per sampled member, of the model's
//! length, finite, with a sample weight no larger than a member may declare
//! (or weight 1 each when weights are off); aggregates it (the weighted
//! mean, or a robust aggregator) and sends the result to the sampled
//! (S2S) or to every member that was told (S2A). A sample none of whose
//! members answered sends nothing.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use murmur_core::mix::aggregate::Aggregator;
use rand::SeedableRng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;

/// Outcomes kept for status: the last this many sampling rounds.
pub const OUTCOMES_KEPT: usize = 64;

/// Where an aggregate goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Sampled-to-sampled: only the members that were sampled.
    Sampled,
    /// Sampled-to-all: every live member.
    All,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Sampled => "s2s",
            Target::All => "s2a",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// The run's seed: with the round, it seeds each sample.
    pub seed: u64,
    /// Sample every this many rounds (H_s), from round `sample_every - 1`.
    pub sample_every: u64,
    /// Members sampled (K); fewer when fewer are live.
    pub sample_size: usize,
    pub target: Target,
    /// How long the other sampled members have after the first answer.
    pub deadline: Duration,
    /// Live members needed before the first sampling round (after it,
    /// whoever is live is sampled).
    pub min_members: usize,
    /// How long the first answer may take after the request (the members
    /// may be up to `sample_every` rounds away from the round asked for).
    pub patience: Duration,
    /// A member not heard from for this long is not live.
    pub member_expiry: Duration,
    pub aggregator: Aggregator,
    /// The model's length; vectors of another are refused.
    pub elements: usize,
    /// The largest sample weight a member may declare; `None`: declared
    /// weights are ignored and every answer counts once.
    pub max_weight: Option<f64>,
}

/// What the coordinator does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask `sampled` for their parameters at the end of `round`, and tell
    /// the other live members, `noticed`, to keep theirs then (S2A) or
    /// that the round is not theirs (S2S).
    Request { round: u64, sampled: Vec<PeerId>, noticed: Vec<PeerId> },
    /// Send the aggregate of `round` to `peers`.
    Send { peers: Vec<PeerId>, round: u64, values: Vec<f32> },
}

/// One sampling round's outcome, for status and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub round: u64,
    pub sampled: Vec<PeerId>,
    pub answered: Vec<PeerId>,
    /// Where the aggregate went (empty when nobody answered).
    pub sent_to: Vec<PeerId>,
    /// From the request to the aggregate.
    pub took: Duration,
}

#[derive(Debug)]
struct Collecting {
    round: u64,
    sampled: Vec<PeerId>,
    noticed: Vec<PeerId>,
    requested: Instant,
    first_answer: Option<Instant>,
    got: BTreeMap<PeerId, (f64, Vec<f32>)>,
}

impl Collecting {
    /// When collection ends by itself.
    fn deadline(&self, cfg: &SamplerConfig) -> Instant {
        match self.first_answer {
            Some(t) => t + cfg.deadline,
            None => self.requested + cfg.patience,
        }
    }
}

#[derive(Debug)]
struct Live {
    round: u64,
    last_seen: Instant,
}

/// The coordinator's state.
///
/// A tick that has nothing to do costs no pass over the members: how many
/// are in each round is kept as they are heard (the run's round is their
/// lower median), and the members are only looked through for expiry once
/// the earliest of their last heartbeats may have expired. A simulated
/// coordinator ticks after every event of a run, so a pass per tick made a
/// run of n nodes cost n^2 (with the simulator telling it every node at
/// every event: 3,000 nodes 167 s, now 1.0 s).
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    members: BTreeMap<PeerId, Live>,
    /// How many members are in each round (no zero counts).
    rounds: BTreeMap<u64, usize>,
    /// No member was last seen before this: exact after an expiry pass, a
    /// lower bound in between (a member heard again is seen later).
    seen_since: Option<Instant>,
    /// The next round to sample.
    next: u64,
    collecting: Option<Collecting>,
    /// The last `OUTCOMES_KEPT` sampling rounds, oldest first.
    pub outcomes: VecDeque<Outcome>,
    /// Sampling rounds finished, and those that sent an aggregate.
    pub finished: u64,
    pub aggregated: u64,
}

/// `k` of `members` (sorted, deduplicated), uniformly without replacement,
/// seeded by `seed` and `round`: the same inputs give the same sample.
pub fn sample(seed: u64, round: u64, members: &[PeerId], k: usize) -> Vec<PeerId> {
    let mut pool = members.to_vec();
    pool.sort();
    pool.dedup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut picked: Vec<PeerId> = index::sample(&mut rng, pool.len(), k.min(pool.len()))
        .into_iter()
        .map(|i| pool[i])
        .collect();
    picked.sort();
    picked
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let next = cfg.sample_every.max(1) - 1;
        Sampler {
            cfg,
            members: BTreeMap::new(),
            rounds: BTreeMap::new(),
            seen_since: None,
            next,
            collecting: None,
            outcomes: VecDeque::new(),
            finished: 0,
            aggregated: 0,
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Learns the model's length (a coordinator learns it from heartbeats).
    pub fn set_elements(&mut self, elements: usize) {
        self.cfg.elements = elements;
    }

    /// A heartbeat of a training member at `round`.
    pub fn observe(&mut self, peer: PeerId, round: u64, now: Instant) {
        if let Some(was) = self.members.insert(peer, Live { round, last_seen: now }) {
            uncount(&mut self.rounds, was.round);
        }
        *self.rounds.entry(round).or_default() += 1;
        self.seen_since = Some(self.seen_since.map_or(now, |s| s.min(now)));
    }

    /// Live members and the round each last announced.
    pub fn members(&self) -> impl Iterator<Item = (&PeerId, u64)> {
        self.members.iter().map(|(p, m)| (p, m.round))
    }

    /// The round being collected and who was sampled for it, if any.
    pub fn collecting(&self) -> Option<(u64, &[PeerId], usize)> {
        self.collecting.as_ref().map(|c| (c.round, c.sampled.as_slice(), c.got.len()))
    }

    /// Parameters of `round` from `peer`, with their sample `weight`; says
    /// why not when they are not taken.
    pub fn receive(
        &mut self,
        peer: PeerId,
        round: u64,
        weight: f64,
        values: Vec<f32>,
        now: Instant,
    ) -> Result<(), &'static str> {
        let Some(c) = self.collecting.as_mut() else { return Err("not_collecting") };
        if round != c.round {
            return Err("wrong_round");
        }
        if !c.sampled.contains(&peer) {
            return Err("not_sampled");
        }
        if c.got.contains_key(&peer) {
            return Err("duplicate");
        }
        if values.len() != self.cfg.elements {
            return Err("wrong_length");
        }
        let weight = match self.cfg.max_weight {
            None => 1.0,
            Some(max) if weight > 0.0 && weight <= max => weight,
            Some(_) => return Err("weight_out_of_range"),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err("non_finite");
        }
        c.first_answer.get_or_insert(now);
        c.got.insert(peer, (weight, values));
        Ok(())
    }

    /// When `tick` next has something to do by itself (a deadline).
    pub fn deadline(&self) -> Option<Instant> {
        self.collecting.as_ref().map(|c| c.deadline(&self.cfg))
    }

    /// The round the members are at: their lower median.
    fn run_round(&self) -> Option<u64> {
        let mut before = self.members.len().checked_sub(1)? / 2;
        for (&round, &count) in &self.rounds {
            if before < count {
                return Some(round);
            }
            before -= count;
        }
        None
    }

    /// Forgets the members not heard from for `member_expiry`; looks
    /// through them only when the earliest heartbeat may be that old.
    fn expire(&mut self, now: Instant) {
        let expiry = self.cfg.member_expiry;
        if self.seen_since.is_none_or(|s| now.saturating_duration_since(s) < expiry) {
            return;
        }
        let (rounds, mut earliest) = (&mut self.rounds, None::<Instant>);
        self.members.retain(|_, m| {
            let keep = now.saturating_duration_since(m.last_seen) < expiry;
            if keep {
                earliest = Some(earliest.map_or(m.last_seen, |e| e.min(m.last_seen)));
            } else {
                uncount(rounds, m.round);
            }
            keep
        });
        self.seen_since = earliest;
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        self.expire(now);
        if let Some(c) = &self.collecting {
            // Done when nobody it waits for can still answer.
            let waits =
                c.sampled.iter().any(|p| !c.got.contains_key(p) && self.members.contains_key(p));
            if waits && now < c.deadline(&self.cfg) {
                return Vec::new();
            }
            return self.finish(now);
        }
        if self.finished == 0 && self.members.len() < self.cfg.min_members {
            return Vec::new();
        }
        let Some(round) = self.run_round() else { return Vec::new() };
        // The next round due at or after the members' round: a coordinator
        // that starts late, or was away, skips the rounds gone by.
        let every = self.cfg.sample_every.max(1);
        if round > self.next {
            self.next += (round - self.next).div_ceil(every) * every;
        }
        let live: Vec<PeerId> = self.members.keys().copied().collect();
        let sampled = sample(self.cfg.seed, self.next, &live, self.cfg.sample_size);
        if sampled.is_empty() {
            return Vec::new();
        }
        // Everyone else hears of the round too: with S2A to keep their
        // parameters for the average, with S2S that it is not theirs (a
        // member waits at a sampling round's end until it knows which).
        let noticed: Vec<PeerId> = live.into_iter().filter(|p| !sampled.contains(p)).collect();
        self.collecting = Some(Collecting {
            round: self.next,
            sampled: sampled.clone(),
            noticed: noticed.clone(),
            requested: now,
            first_answer: None,
            got: BTreeMap::new(),
        });
        vec![Action::Request { round: self.next, sampled, noticed }]
    }

    /// Aggregates what arrived and sends it to everyone told.
    fn finish(&mut self, now: Instant) -> Vec<Action> {
        let Some(c) = self.collecting.take() else { return Vec::new() };
        self.next = c.round + self.cfg.sample_every.max(1);
        self.finished += 1;
        let answered: Vec<PeerId> = c.got.keys().copied().collect();
        let mut outcome = Outcome {
            round: c.round,
            sampled: c.sampled.clone(),
            answered,
            sent_to: Vec::new(),
            took: now.saturating_duration_since(c.requested),
        };
        let mut vectors = c.got.values();
        let actions = match vectors.next() {
            None => Vec::new(),
            Some((w0, first)) => {
                let others: Vec<(&[f32], f64)> = vectors.map(|(w, v)| (v.as_slice(), *w)).collect();
                let values = self.cfg.aggregator.aggregate(first, *w0, &others);
                let mut peers = c.sampled;
                if self.cfg.target == Target::All {
                    peers.extend(c.noticed);
                    peers.sort();
                }
                outcome.sent_to = peers.clone();
                self.aggregated += 1;
                vec![Action::Send { peers, round: c.round, values }]
            }
        };
        if self.outcomes.len() == OUTCOMES_KEPT {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back(outcome);
        actions
    }
}

/// One member fewer in `round`.
fn uncount(rounds: &mut BTreeMap<u64, usize>, round: u64) {
    if let Some(c) = rounds.get_mut(&round) {
        *c -= 1;
        if *c == 0 {
            rounds.remove(&round);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use murmur_core::mix::sim::peer_ids;

    fn cfg(k: usize, target: Target) -> SamplerConfig {
        SamplerConfig {
            seed: 7,
            sample_every: 5,
            sample_size: k,
            target,
            deadline: Duration::from_secs(2),
            min_members: 1,
            patience: Duration::from_secs(30),
            member_expiry: Duration::from_secs(10),
            aggregator: Aggregator::Mean,
            elements: 2,
            max_weight: Some(100.0),
        }
    }

    #[test]
    fn sampling_is_uniform_over_many_rounds() {
        // 10 members, K = 3, 20,000 rounds: each member is picked 6,000
        // times in expectation. Chi-square with 9 degrees of freedom: the
        // 0.999 quantile is 27.9.
        let ids = peer_ids(10, 1);
        let mut counts: BTreeMap<PeerId, f64> = BTreeMap::new();
        let rounds = 20_000;
        for round in 0..rounds {
            let s = sample(42, round, &ids, 3);
            assert_eq!(s.len(), 3);
            let mut unique = s.clone();
            unique.dedup();
            assert_eq!(unique.len(), 3, "without replacement");
            for p in s {
                *counts.entry(p).or_default() += 1.0;
            }
        }
        let expected = rounds as f64 * 3.0 / 10.0;
        let chi2: f64 = ids.iter().map(|p| (counts[p] - expected).powi(2) / expected).sum();
        assert!(chi2 < 27.9, "chi-square {chi2:.1} over 9 degrees of freedom");
    }

    #[test]
    fn sampling_is_uniform_over_many_seeds() {
        // The same round under 20,000 seeds: as uniform.
        let ids = peer_ids(8, 9);
        let mut counts: BTreeMap<PeerId, f64> = BTreeMap::new();
        let seeds = 20_000;
        for seed in 0..seeds {
            for p in sample(seed, 4, &ids, 2) {
                *counts.entry(p).or_default() += 1.0;
            }
        }
        let expected = seeds as f64 * 2.0 / 8.0;
        let chi2: f64 = ids.iter().map(|p| (counts[p] - expected).powi(2) / expected).sum();
        // 7 degrees of freedom: the 0.999 quantile is 24.3.
        assert!(chi2 < 24.3, "chi-square {chi2:.1} over 7 degrees of freedom");
    }

    #[test]
    fn the_same_seed_and_membership_give_the_same_sample() {
        let ids = peer_ids(12, 2);
        let mut shuffled = ids.clone();
        shuffled.reverse();
        assert_eq!(sample(3, 9, &ids, 4), sample(3, 9, &shuffled, 4));
        assert_ne!(sample(3, 9, &ids, 4), sample(4, 9, &ids, 4), "another seed, another sample");
        assert_eq!(sample(3, 9, &ids[..2], 4).len(), 2, "never more than are live");
    }

    /// A sampler whose members are `ids`, all at `round`.
    fn run(ids: &[PeerId], round: u64, cfg: SamplerConfig, now: Instant) -> Sampler {
        let mut s = Sampler::new(cfg);
        for p in ids {
            s.observe(*p, round, now);
        }
        s
    }

    #[test]
    fn the_kept_counts_and_the_lazy_expiry_agree_with_a_pass_over_every_member() {
        // 3,000 pseudo-random heartbeats (some from the past, as a daemon
        // relays them) and expiry checks against the plain definitions: the
        // lower median of all members' rounds, and a pass dropping every
        // member not seen for member_expiry.
        let ids = peer_ids(40, 5);
        let t0 = Instant::now();
        let mut s = Sampler::new(cfg(3, Target::All));
        let mut model: BTreeMap<PeerId, (u64, Instant)> = BTreeMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut draw = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut clock = Duration::ZERO;
        for step in 0..3_000 {
            clock += Duration::from_millis(draw(400));
            let now = t0 + clock;
            if draw(4) == 0 {
                s.expire(now);
                model.retain(|_, (_, seen)| {
                    now.saturating_duration_since(*seen) < s.cfg.member_expiry
                });
            } else {
                let peer = ids[draw(ids.len() as u64) as usize];
                let seen = now - Duration::from_millis(draw(3_000)).min(clock);
                let round = draw(12);
                s.observe(peer, round, seen);
                model.insert(peer, (round, seen));
            }
            let mut rounds: Vec<u64> = model.values().map(|(r, _)| *r).collect();
            rounds.sort_unstable();
            let median = rounds.len().checked_sub(1).map(|i| rounds[i / 2]);
            assert_eq!(s.run_round(), median, "step {step}");
            assert!(s.members.keys().eq(model.keys()), "step {step}");
            assert_eq!(s.rounds.values().sum::<usize>(), model.len(), "step {step}");
            assert!(s.rounds.values().all(|c| *c > 0), "step {step}: a zero count is kept");
        }
    }

    #[test]
    fn a_dead_member_is_never_sampled() {
        let ids = peer_ids(6, 3);
        let t0 = Instant::now();
        let mut s = run(&ids, 4, cfg(6, Target::All), t0);
        // All but ids[0] are heard from again; then ids[0] has expired.
        let t1 = t0 + Duration::from_secs(11);
        for p in &ids[1..] {
            s.observe(*p, 4, t1 - Duration::from_secs(1));
        }
        let acts = s.tick(t1);
        let [Action::Request { sampled, round: 4, noticed }] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(sampled, &ids[1..].to_vec());
        assert!(noticed.is_empty(), "all live are sampled");
    }

    /// Runs one sampling round in which every sampled member sends
    /// [i, 2i] with weight i + 1 (i its index in `ids`).
    fn one_round(target: Target) -> (Vec<PeerId>, Vec<PeerId>, Vec<Action>, Outcome) {
        let ids = peer_ids(8, 4);
        let t0 = Instant::now();
        let mut s = run(&ids, 2, cfg(3, target), t0);
        let acts = s.tick(t0);
        let [Action::Request { sampled, round, noticed }] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(*round, 4, "the first sampling round, asked ahead");
        let (sampled, noticed, round) = (sampled.clone(), noticed.clone(), *round);
        assert!(s.tick(t0 + Duration::from_secs(1)).is_empty(), "waits for the sampled");
        for p in &sampled {
            let i = ids.iter().position(|q| q == p).unwrap() as f32;
            let t = t0 + Duration::from_secs(1);
            s.receive(*p, round, f64::from(i) + 1.0, vec![i, 2.0 * i], t).unwrap();
        }
        let sent = s.tick(t0 + Duration::from_secs(1));
        (sampled, noticed, sent, s.outcomes[0].clone())
    }

    fn weighted_mean(ids: &[PeerId], peers: &[PeerId]) -> Vec<f32> {
        let (mut sum, mut w) = ([0.0f64; 2], 0.0);
        for p in peers {
            let i = ids.iter().position(|q| q == p).unwrap() as f64;
            sum[0] += (i + 1.0) * i;
            sum[1] += (i + 1.0) * 2.0 * i;
            w += i + 1.0;
        }
        vec![(sum[0] / w) as f32, (sum[1] / w) as f32]
    }

    #[test]
    fn s2s_sends_the_exact_average_to_the_sampled_and_s2a_to_everyone() {
        let ids = peer_ids(8, 4);
        let (sampled, noticed, sent, outcome) = one_round(Target::Sampled);
        assert_eq!(noticed.len(), 5, "S2S tells the others it is not their round");
        let [Action::Send { peers, round: 4, values }] = sent.as_slice() else {
            panic!("{sent:?}")
        };
        assert_eq!(peers, &sampled, "only the sampled");
        assert_eq!(values, &weighted_mean(&ids, &sampled));
        assert_eq!(outcome.answered, sampled);
        let (sampled, noticed, sent, _) = one_round(Target::All);
        assert_eq!(noticed.len(), 5, "S2A tells every other live member");
        assert!(noticed.iter().all(|p| !sampled.contains(p)));
        let [Action::Send { peers, values, .. }] = sent.as_slice() else { panic!("{sent:?}") };
        assert_eq!(peers, &ids, "every live member");
        assert_eq!(values, &weighted_mean(&ids, &sampled));
    }

    #[test]
    fn the_deadline_aggregates_what_arrived_and_bad_vectors_are_refused_by_reason() {
        let ids = peer_ids(5, 5);
        let t0 = Instant::now();
        let mut s = run(&ids, 4, cfg(3, Target::Sampled), t0);
        let acts = s.tick(t0);
        let [Action::Request { sampled: peers, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        let peers = peers.clone();
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(30)), "patience for the first");
        let t1 = t0 + Duration::from_secs(5);
        let outsider = *ids.iter().find(|p| !peers.contains(p)).unwrap();
        assert_eq!(s.receive(outsider, 4, 1.0, vec![1.0, 1.0], t1), Err("not_sampled"));
        assert_eq!(s.receive(peers[0], 3, 1.0, vec![1.0, 1.0], t1), Err("wrong_round"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0], t1), Err("wrong_length"));
        assert_eq!(s.receive(peers[0], 4, 1e300, vec![1.0, 1.0], t1), Err("weight_out_of_range"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![f32::NAN, 1.0], t1), Err("non_finite"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0, 3.0], t1), Ok(()));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0, 3.0], t1), Err("duplicate"));
        assert_eq!(s.deadline(), Some(t1 + Duration::from_secs(2)), "the others' deadline");
        assert!(s.tick(t1 + Duration::from_secs(1)).is_empty());
        let acts = s.tick(t1 + Duration::from_secs(2));
        let [Action::Send { values, peers: to, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!((values.clone(), to.clone()), (vec![1.0, 3.0], peers.clone()));
        // The next sample is 5 rounds on, asked at once.
        let acts = s.tick(t1 + Duration::from_secs(2));
        assert!(matches!(acts.as_slice(), [Action::Request { round: 9, .. }]), "{acts:?}");
    }

    #[test]
    fn weights_off_count_every_answer_once() {
        let ids = peer_ids(3, 10);
        let t0 = Instant::now();
        let mut s = run(&ids, 4, SamplerConfig { max_weight: None, ..cfg(2, Target::All) }, t0);
        let acts = s.tick(t0);
        let [Action::Request { sampled, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        let sampled = sampled.clone();
        s.receive(sampled[0], 4, 1e300, vec![0.0, 0.0], t0).unwrap();
        s.receive(sampled[1], 4, 1.0, vec![2.0, 4.0], t0).unwrap();
        let acts = s.tick(t0);
        let [Action::Send { values, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!(values, &vec![1.0, 2.0], "a declared weight changes nothing");
    }

    #[test]
    fn a_sample_nobody_answers_sends_nothing_and_a_late_start_skips_ahead() {
        let ids = peer_ids(4, 6);
        let t0 = Instant::now();
        // The run is at round 12 when the coordinator first hears it: the
        // next due sampling round is 14 (4, 9, 14, ...).
        let long_lived =
            SamplerConfig { member_expiry: Duration::from_secs(60), ..cfg(2, Target::All) };
        let mut s = run(&ids, 12, long_lived, t0);
        assert!(matches!(s.tick(t0).as_slice(), [Action::Request { round: 14, .. }]));
        assert!(s.tick(t0 + Duration::from_secs(29)).is_empty(), "patience");
        assert_eq!(s.finished, 0, "still collecting");
        assert!(s.tick(t0 + Duration::from_secs(30)).is_empty(), "nobody answered");
        assert_eq!(s.outcomes[0].answered, Vec::<PeerId>::new());
        assert_eq!(s.outcomes[0].sent_to, Vec::<PeerId>::new());
        assert_eq!((s.finished, s.aggregated), (1, 0));
    }

    #[test]
    fn the_first_sampling_round_waits_for_min_members() {
        let ids = peer_ids(4, 12);
        let t0 = Instant::now();
        let mut s = run(&ids[..2], 0, SamplerConfig { min_members: 3, ..cfg(2, Target::All) }, t0);
        assert!(s.tick(t0).is_empty(), "2 of 3 live");
        s.observe(ids[2], 0, t0);
        assert_eq!(s.tick(t0).len(), 1);
    }

    #[test]
    fn a_sampled_member_that_leaves_is_not_waited_for() {
        let ids = peer_ids(3, 11);
        let t0 = Instant::now();
        let slow = SamplerConfig { deadline: Duration::from_secs(60), ..cfg(3, Target::Sampled) };
        let mut s = run(&ids, 4, slow, t0);
        assert_eq!(s.tick(t0).len(), 1);
        s.receive(ids[0], 4, 1.0, vec![1.0, 1.0], t0).unwrap();
        // ids[1] and ids[2] stop their heartbeats; ids[0] goes on. Their
        // expiry (10 s) ends the wait long before the 60 s deadline.
        let t1 = t0 + Duration::from_millis(10_500);
        s.observe(ids[0], 4, t1);
        let acts = s.tick(t1);
        let [Action::Send { peers, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!(peers.len(), 3, "sent to every sampled member, gone or not");
    }

    #[test]
    fn the_tick_is_a_pure_function_of_its_inputs() {
        let trace = || {
            let ids = peer_ids(9, 8);
            let t0 = Instant::now();
            let mut s = run(&ids, 4, cfg(4, Target::All), t0);
            let mut out = s.tick(t0);
            if let [Action::Request { sampled, round, .. }] = out.clone().as_slice() {
                for (i, p) in sampled.iter().enumerate() {
                    let _ = s.receive(*p, *round, 1.0, vec![i as f32, 1.0], t0);
                }
            }
            out.extend(s.tick(t0));
            out
        };
        assert_eq!(trace(), trace());
    }
}

/// The sampler and real members (`Coordinated` over gossip with no
/// gossip steps), messages carried by hand: what the members end with.
#[cfg(test)]
mod with_members {
    use std::sync::Arc;

    use murmur_core::mix::comm::CommSchedule;
    use murmur_core::mix::coordinated::{ASK_KEEP, ASK_NOTHING, ASK_SEND};
    use murmur_core::mix::coordinated::{Coordinated, CoordinatedConfig};
    use murmur_core::mix::gossip::{Gossip, GossipConfig};
    use murmur_core::mix::mixer::{self, Input, Message, Mixer, MsgKind};
    use murmur_core::mix::sim::peer_ids;
    use murmur_core::mix::topology::TopologySpec;
    use murmur_core::net::encoding::Encoding;

    use super::*;

    fn member(me: PeerId, coordinator: PeerId) -> Coordinated {
        let cfg = GossipConfig {
            topology: TopologySpec::Ring,
            seed: 0,
            rounds: 10,
            local_steps: 1,
            gossip_steps: 0,
            comm: CommSchedule::Every(1),
            timeout: Duration::from_secs(1),
            start_round: 0,
            aggregator: Aggregator::Mean,
            norm_bound: 0.0,
            encoding: Encoding::F32,
            straggler_grace: None,
        };
        let inner = Gossip::new(cfg, me, vec![me]).unwrap();
        let cfg = CoordinatedConfig { coordinator, wait: Duration::from_secs(5), weight: 1.0 };
        Coordinated::new(Box::new(inner), cfg)
    }

    /// One sampling round of 6 members, member i at [i, -i]; the
    /// parameters each member holds after it.
    fn round_with(target: Target) -> (Vec<PeerId>, Vec<PeerId>, Vec<Vec<f32>>) {
        let ids = peer_ids(6, 20);
        let c = PeerId::random();
        let t = Instant::now();
        let cfg = SamplerConfig {
            seed: 1,
            sample_every: 1,
            sample_size: 3,
            target,
            deadline: Duration::from_secs(2),
            min_members: 6,
            patience: Duration::from_secs(30),
            member_expiry: Duration::from_secs(10),
            aggregator: Aggregator::Mean,
            elements: 2,
            max_weight: None,
        };
        let mut sampler = Sampler::new(cfg);
        let mut members: Vec<Coordinated> = ids.iter().map(|p| member(*p, c)).collect();
        let mut held: Vec<Vec<f32>> = (0..6).map(|i| vec![i as f32, -(i as f32)]).collect();
        for (m, x) in members.iter_mut().zip(&held) {
            m.set_start_params(x);
            m.start(t);
        }
        for p in &ids {
            sampler.observe(*p, 0, t);
        }
        let acts = sampler.tick(t);
        let [Action::Request { round: 0, sampled, noticed }] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        let sampled = sampled.clone();
        assert_eq!(noticed.len(), 3, "the others hear of the round too");
        let others = if target == Target::All { ASK_KEEP } else { ASK_NOTHING };
        for (i, p) in ids.iter().enumerate() {
            let ask = if sampled.contains(p) { ASK_SEND } else { others };
            let req = Message::new(c, MsgKind::SampleRequest, 0, Arc::new(vec![ask, 1.0]));
            assert!(members[i].handle(Input::Received(req), t).is_empty());
        }
        // Every member ends round 0 with the parameters it has (no training).
        for (i, m) in members.iter_mut().enumerate() {
            let acts = m.handle(Input::LocalDone { params: held[i].clone(), samples: 1 }, t);
            for a in acts {
                if let mixer::Action::Send(msg) = a {
                    assert_eq!((msg.peer, msg.kind), (c, MsgKind::SampledParams));
                    let values = msg.values.to_vec();
                    sampler.receive(ids[i], 0, msg.weight, values, t).unwrap();
                }
            }
        }
        let acts = sampler.tick(t);
        let [Action::Send { peers, round: 0, values }] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        for (i, p) in ids.iter().enumerate() {
            if !peers.contains(p) {
                continue;
            }
            let avg = Message::new(c, MsgKind::Average, 0, Arc::new(values.clone()));
            for a in members[i].handle(Input::Received(avg), t) {
                if let mixer::Action::SetParams(x) = a {
                    held[i] = x;
                }
            }
        }
        (ids, sampled, held)
    }

    #[test]
    fn s2s_changes_only_the_sampled_and_s2a_everyone_to_the_exact_average() {
        for target in [Target::Sampled, Target::All] {
            let (ids, sampled, held) = round_with(target);
            let picked: Vec<f32> = ids
                .iter()
                .enumerate()
                .filter(|(_, p)| sampled.contains(p))
                .map(|(i, _)| i as f32)
                .collect();
            let mean = picked.iter().sum::<f32>() / picked.len() as f32;
            for (i, p) in ids.iter().enumerate() {
                let expected = match (target, sampled.contains(p)) {
                    (Target::Sampled, false) => vec![i as f32, -(i as f32)],
                    _ => vec![mean, -mean],
                };
                assert_eq!(held[i], expected, "{target:?}: member {i}");
            }
        }
    }
}
