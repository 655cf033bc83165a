//! The coordinator's sampling state machine, sans-IO: heartbeats and
//! parameters go in, `tick(now)` says what to send (Psyche's coordinator is
//! the model: every decision is a pure function of what came in and when).
//!
//! Every `sample_every` rounds, once the live members' (lower-median) round
//! reaches the next sampling round r, it draws K live training members
//! uniformly without replacement, seeded by the run's seed and r, so that
//! the same membership and seed always give the same sample. It asks them
//! for their parameters of round r, takes what arrives by the deadline (one
//! vector per sampled member, of the model's length, finite, with a sample
//! weight no larger than a member may declare), aggregates it (the
//! sample-weighted mean, or a robust aggregator) and sends the result to
//! the sampled members (S2S) or to every live member (S2A). A sample none of
//! whose members answered sends nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use murmur_core::mix::aggregate::Aggregator;
use rand::SeedableRng;
use rand::seq::index;
use rand_chacha::ChaCha8Rng;

/// Where an aggregate goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Sampled-to-sampled: only the members that were sampled.
    Sampled,
    /// Sampled-to-all: every live member.
    All,
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
    /// How long the sampled have to send their parameters.
    pub deadline: Duration,
    /// A member not heard from for this long is not live.
    pub member_expiry: Duration,
    pub aggregator: Aggregator,
    /// The model's length; vectors of another are refused.
    pub elements: usize,
    /// The largest sample weight a member may declare (its samples a round).
    pub max_weight: f64,
}

/// What the coordinator does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask `peers` for their parameters of `round`.
    Request { peers: Vec<PeerId>, round: u64 },
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
}

#[derive(Debug)]
struct Collecting {
    round: u64,
    sampled: Vec<PeerId>,
    deadline: Instant,
    got: BTreeMap<PeerId, (f64, Vec<f32>)>,
}

#[derive(Debug)]
struct Live {
    round: u64,
    last_seen: Instant,
}

/// The coordinator's state.
#[derive(Debug)]
pub struct Sampler {
    cfg: SamplerConfig,
    members: BTreeMap<PeerId, Live>,
    /// The next round to sample.
    next: u64,
    collecting: Option<Collecting>,
    pub outcomes: Vec<Outcome>,
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
        Sampler { cfg, members: BTreeMap::new(), next, collecting: None, outcomes: Vec::new() }
    }

    /// A heartbeat of a training member at `round`.
    pub fn observe(&mut self, peer: PeerId, round: u64, now: Instant) {
        self.members.insert(peer, Live { round, last_seen: now });
    }

    /// Parameters of `round` from `peer`, with their sample `weight`; says
    /// why not when they are not taken.
    pub fn receive(
        &mut self,
        peer: PeerId,
        round: u64,
        weight: f64,
        values: Vec<f32>,
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
        if !(weight > 0.0 && weight <= self.cfg.max_weight) {
            return Err("weight_out_of_range");
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err("non_finite");
        }
        c.got.insert(peer, (weight, values));
        Ok(())
    }

    /// When `tick` next has something to do by itself (a deadline).
    pub fn deadline(&self) -> Option<Instant> {
        self.collecting.as_ref().map(|c| c.deadline)
    }

    /// The round the members are at: their lower median.
    fn run_round(&self) -> Option<u64> {
        let mut rounds: Vec<u64> = self.members.values().map(|m| m.round).collect();
        rounds.sort_unstable();
        rounds.get(rounds.len().checked_sub(1)? / 2).copied()
    }

    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let expiry = self.cfg.member_expiry;
        self.members.retain(|_, m| now.saturating_duration_since(m.last_seen) < expiry);
        let live: Vec<PeerId> = self.members.keys().copied().collect();
        if let Some(c) = &self.collecting {
            let all_in = c.sampled.iter().all(|p| c.got.contains_key(p));
            if !all_in && now < c.deadline {
                return Vec::new();
            }
            return self.finish(live);
        }
        let Some(round) = self.run_round() else { return Vec::new() };
        // A run that moved past rounds it never sampled (the coordinator
        // started late, or was away) samples the next one due.
        let every = self.cfg.sample_every.max(1);
        if round > self.next {
            self.next += (round - self.next).div_ceil(every) * every;
        }
        if round < self.next {
            return Vec::new();
        }
        let sampled = sample(self.cfg.seed, self.next, &live, self.cfg.sample_size);
        if sampled.is_empty() {
            return Vec::new();
        }
        self.collecting = Some(Collecting {
            round: self.next,
            sampled: sampled.clone(),
            deadline: now + self.cfg.deadline,
            got: BTreeMap::new(),
        });
        vec![Action::Request { peers: sampled, round: self.next }]
    }

    /// Aggregates what arrived and sends it on.
    fn finish(&mut self, live: Vec<PeerId>) -> Vec<Action> {
        let Some(c) = self.collecting.take() else { return Vec::new() };
        self.next = c.round + self.cfg.sample_every.max(1);
        let answered: Vec<PeerId> = c.got.keys().copied().collect();
        let mut outcome =
            Outcome { round: c.round, sampled: c.sampled.clone(), answered, sent_to: Vec::new() };
        let mut vectors = c.got.values();
        let Some((w0, first)) = vectors.next() else {
            self.outcomes.push(outcome);
            return Vec::new();
        };
        let others: Vec<(&[f32], f64)> = vectors.map(|(w, v)| (v.as_slice(), *w)).collect();
        let values = self.cfg.aggregator.aggregate(first, *w0, &others);
        let peers = match self.cfg.target {
            Target::Sampled => c.sampled,
            Target::All => live,
        };
        outcome.sent_to = peers.clone();
        self.outcomes.push(outcome);
        vec![Action::Send { peers, round: c.round, values }]
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
            member_expiry: Duration::from_secs(10),
            aggregator: Aggregator::Mean,
            elements: 2,
            max_weight: 100.0,
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
        let [Action::Request { peers, round: 4 }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!(peers, &ids[1..].to_vec());
    }

    /// Runs one sampling round in which every sampled member sends
    /// [i, 2i] with weight i + 1 (i its index in `ids`).
    fn one_round(target: Target) -> (Vec<PeerId>, Vec<Action>, Outcome) {
        let ids = peer_ids(8, 4);
        let t0 = Instant::now();
        let mut s = run(&ids, 4, cfg(3, target), t0);
        let acts = s.tick(t0);
        let [Action::Request { peers, round }] = acts.as_slice() else { panic!("{acts:?}") };
        let (peers, round) = (peers.clone(), *round);
        assert!(s.tick(t0 + Duration::from_secs(1)).is_empty(), "waits for the sampled");
        for p in &peers {
            let i = ids.iter().position(|q| q == p).unwrap() as f32;
            s.receive(*p, round, f64::from(i) + 1.0, vec![i, 2.0 * i]).unwrap();
        }
        let sent = s.tick(t0 + Duration::from_secs(1));
        (peers, sent, s.outcomes[0].clone())
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
        let (sampled, sent, outcome) = one_round(Target::Sampled);
        let [Action::Send { peers, round: 4, values }] = sent.as_slice() else {
            panic!("{sent:?}")
        };
        assert_eq!(peers, &sampled);
        assert_eq!(values, &weighted_mean(&ids, &sampled));
        assert_eq!(outcome.answered, sampled);
        let (sampled, sent, _) = one_round(Target::All);
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
        let [Action::Request { peers, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        let peers = peers.clone();
        let outsider = *ids.iter().find(|p| !peers.contains(p)).unwrap();
        assert_eq!(s.receive(outsider, 4, 1.0, vec![1.0, 1.0]), Err("not_sampled"));
        assert_eq!(s.receive(peers[0], 3, 1.0, vec![1.0, 1.0]), Err("wrong_round"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0]), Err("wrong_length"));
        assert_eq!(s.receive(peers[0], 4, 1e300, vec![1.0, 1.0]), Err("weight_out_of_range"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![f32::NAN, 1.0]), Err("non_finite"));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0, 3.0]), Ok(()));
        assert_eq!(s.receive(peers[0], 4, 1.0, vec![1.0, 3.0]), Err("duplicate"));
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(2)));
        let acts = s.tick(t0 + Duration::from_secs(2));
        let [Action::Send { values, peers: to, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!((values.clone(), to.clone()), (vec![1.0, 3.0], peers.clone()));
        // The next sample is 5 rounds on, once the run gets there.
        assert!(s.tick(t0 + Duration::from_secs(3)).is_empty());
        for p in &ids {
            s.observe(*p, 9, t0 + Duration::from_secs(3));
        }
        let acts = s.tick(t0 + Duration::from_secs(3));
        assert!(matches!(acts.as_slice(), [Action::Request { round: 9, .. }]), "{acts:?}");
    }

    #[test]
    fn a_sample_nobody_answers_sends_nothing_and_a_late_start_skips_ahead() {
        let ids = peer_ids(4, 6);
        let t0 = Instant::now();
        // The run is at round 12 when the coordinator first hears it: the
        // next due sampling round is 14 (4, 9, 14, ...).
        let mut s = run(&ids, 12, cfg(2, Target::All), t0);
        assert!(s.tick(t0).is_empty());
        for p in &ids {
            s.observe(*p, 14, t0);
        }
        assert!(matches!(s.tick(t0).as_slice(), [Action::Request { round: 14, .. }]));
        assert!(s.tick(t0 + Duration::from_secs(2)).is_empty(), "nobody answered");
        assert_eq!(s.outcomes[0].answered, Vec::<PeerId>::new());
        assert_eq!(s.outcomes[0].sent_to, Vec::<PeerId>::new());
    }

    #[test]
    fn the_tick_is_a_pure_function_of_its_inputs() {
        let trace = || {
            let ids = peer_ids(9, 8);
            let t0 = Instant::now();
            let mut s = run(&ids, 4, cfg(4, Target::All), t0);
            let mut out = s.tick(t0);
            if let [Action::Request { peers, round }] = out.clone().as_slice() {
                for (i, p) in peers.iter().enumerate() {
                    let _ = s.receive(*p, *round, 1.0, vec![i as f32, 1.0]);
                }
            }
            out.extend(s.tick(t0));
            out
        };
        assert_eq!(trace(), trace());
    }
}
