//! The fault injector: the faults a node has now, and the questions the
//! parts that carry them out ask. Faults act where real ones would, so each
//! part asks only about its own: the network layer about drops, delays,
//! bandwidth, partitions and pauses; the driver about crashes, pauses and
//! what to corrupt in what it sends; the trainer about pauses and labels.
//!
//! One `Faults` value is shared by all of them (and by the API, which adds
//! and clears faults). Time is passed in, so expiry is exact to test; random
//! draws (drops, jitter, noise) come from a seeded generator, so a run with
//! the same seed and the same faults draws the same numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use murmur_proto::v1 as pb;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tokio::sync::watch;

use super::spec::{FaultError, FaultKind, FaultSpec};

/// The exit status of an injected crash.
pub const CRASH_EXIT_CODE: i32 = 70;

/// A fault as the node holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveFault {
    pub id: u64,
    pub spec: FaultSpec,
    /// False while it waits for its `from` round.
    pub active: bool,
    /// Time left once active; `None` until cleared (or not started).
    pub remaining: Option<Duration>,
}

impl ActiveFault {
    pub fn to_proto(&self) -> pb::ActiveFault {
        pb::ActiveFault {
            id: self.id,
            fault: Some(self.spec.to_proto()),
            spec: self.spec.to_string(),
            active: self.active,
            remaining_seconds: self.remaining.map(|d| d.as_secs_f64()),
        }
    }
}

#[derive(Debug)]
struct Entry {
    id: u64,
    spec: FaultSpec,
    /// When it became active; `None` while it waits for `from_round`.
    since: Option<Instant>,
    /// For a crash: the round at whose start it fires.
    crash_round: u64,
}

impl Entry {
    fn ends(&self) -> Option<Instant> {
        // Checked: a duration too far out to represent never ends.
        self.since?.checked_add(self.spec.duration?)
    }

    fn is(&self, now: Instant, pick: impl Fn(&FaultKind) -> bool) -> bool {
        self.since.is_some_and(|s| s <= now) && pick(&self.spec.kind)
    }
}

#[derive(Debug)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
    round: u64,
    rng: ChaCha8Rng,
    effects: BTreeMap<&'static str, u64>,
}

impl State {
    /// Drops the faults whose time is up; says whether any was.
    fn prune(&mut self, now: Instant) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.ends().is_none_or(|end| end > now));
        before != self.entries.len()
    }

    fn count(&mut self, effect: &'static str) {
        *self.effects.entry(effect).or_default() += 1;
    }

    fn active(&self, now: Instant) -> impl Iterator<Item = &FaultKind> {
        self.entries.iter().filter(move |e| e.is(now, |_| true)).map(|e| &e.spec.kind)
    }
}

/// The faults of one node.
#[derive(Debug)]
pub struct Faults {
    state: Mutex<State>,
    /// Bumped whenever the set of active faults changes.
    changes: watch::Sender<u64>,
    /// Why label-flip cannot apply to this node, if it cannot.
    no_labels: Option<String>,
}

impl Faults {
    /// No faults yet; random draws seeded by `seed`.
    pub fn new(seed: u64) -> Faults {
        Faults {
            state: Mutex::new(State {
                next_id: 1,
                entries: Vec::new(),
                round: 0,
                rng: ChaCha8Rng::seed_from_u64(seed),
                effects: BTreeMap::new(),
            }),
            changes: watch::Sender::new(0),
            no_labels: None,
        }
    }

    /// The same, for a node whose data has no labels to flip: `label-flip`
    /// is then refused with `why`.
    pub fn without_labels(mut self, why: impl Into<String>) -> Faults {
        self.no_labels = Some(why.into());
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state whole, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Wakes on every change to the active faults.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Adds a fault; it is active at once unless it waits for a round.
    /// Refused only when it cannot apply to this node.
    pub fn inject(&self, spec: FaultSpec, now: Instant) -> Result<ActiveFault, FaultError> {
        if let (FaultKind::LabelFlip, Some(why)) = (&spec.kind, &self.no_labels) {
            return Err(FaultError { spec: spec.to_string(), reason: why.clone() });
        }
        let view = {
            let mut s = self.lock();
            let id = s.next_id;
            s.next_id += 1;
            let waits = spec.from_round.is_some_and(|r| r > s.round);
            let crash_round = match spec.kind {
                FaultKind::Crash { round: Some(r) } => r,
                _ => s.round + 1,
            };
            let entry = Entry { id, spec, since: (!waits).then_some(now), crash_round };
            let view = view_of(&entry, now);
            s.entries.push(entry);
            view
        };
        self.changed();
        Ok(view)
    }

    /// Ends the faults with these ids, or all of them when `ids` is empty;
    /// returns how many ended.
    pub fn clear(&self, ids: &[u64]) -> usize {
        let cleared = {
            let mut s = self.lock();
            let before = s.entries.len();
            s.entries.retain(|e| !(ids.is_empty() || ids.contains(&e.id)));
            before - s.entries.len()
        };
        if cleared > 0 {
            self.changed();
        }
        cleared
    }

    /// The node entered `round`: faults waiting for it become active.
    pub fn set_round(&self, round: u64, now: Instant) {
        let woke = {
            let mut s = self.lock();
            s.round = round;
            let mut woke = false;
            for e in s.entries.iter_mut().filter(|e| e.since.is_none()) {
                if e.spec.from_round.is_some_and(|r| r <= round) {
                    e.since = Some(now);
                    woke = true;
                }
            }
            woke
        };
        if woke {
            self.changed();
        }
    }

    /// Every fault the node holds, active or waiting.
    pub fn list(&self, now: Instant) -> Vec<ActiveFault> {
        self.with(now, |s| s.entries.iter().map(|e| view_of(e, now)).collect())
    }

    /// What the faults did so far, by effect.
    pub fn effects(&self) -> BTreeMap<String, u64> {
        self.lock().effects.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    /// Runs `f` on the state after expiring what is due.
    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, expired) = {
            let mut s = self.lock();
            let expired = s.prune(now);
            (f(&mut s), expired)
        };
        if expired {
            self.changed();
        }
        out
    }

    /// Whether an injected crash is due as `round` begins.
    pub fn crash_due(&self, round: u64, now: Instant) -> bool {
        self.with(now, |s| {
            s.entries.iter().any(|e| {
                e.is(now, |k| matches!(k, FaultKind::Crash { .. })) && round >= e.crash_round
            })
        })
    }

    /// `None` when not paused; else when the pause ends (`Some(None)`: when cleared).
    pub fn pause_end(&self, now: Instant) -> Option<Option<Instant>> {
        self.with(now, |s| {
            let ends: Vec<Option<Instant>> = s
                .entries
                .iter()
                .filter(|e| e.is(now, |k| *k == FaultKind::Pause))
                .map(Entry::ends)
                .collect();
            match ends.is_empty() {
                true => None,
                false if ends.contains(&None) => Some(None),
                false => Some(ends.into_iter().flatten().max()),
            }
        })
    }

    pub fn paused(&self, now: Instant) -> bool {
        self.pause_end(now).is_some()
    }

    /// Returns once no pause is active (at once if none is).
    pub async fn wait_unpaused(&self) {
        let mut changes = self.subscribe();
        while let Some(end) = self.pause_end(Instant::now()) {
            let until_end = async {
                match end {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changes.changed() => {}
                _ = until_end => {}
            }
        }
    }

    /// Whether to lose this outgoing payload (counted as `dropped_out`).
    pub fn drop_outgoing(&self, now: Instant) -> bool {
        self.drop_draw(now, true)
    }

    /// Whether to lose this incoming payload (counted as `dropped_in`).
    pub fn drop_incoming(&self, now: Instant) -> bool {
        self.drop_draw(now, false)
    }

    fn drop_draw(&self, now: Instant, outgoing: bool) -> bool {
        self.with(now, |s| {
            let fractions: Vec<f64> = s
                .active(now)
                .filter_map(|k| match k {
                    FaultKind::Drop { fraction, direction }
                        if (outgoing && direction.outgoing())
                            || (!outgoing && direction.incoming()) =>
                    {
                        Some(*fraction)
                    }
                    _ => None,
                })
                .collect();
            let lost = fractions.into_iter().any(|p| s.rng.random_bool(p.clamp(0.0, 1.0)));
            if lost {
                s.count(if outgoing { "dropped_out" } else { "dropped_in" });
            }
            lost
        })
    }

    /// How long to hold this outgoing payload back, if at all (counted as `delayed`).
    pub fn send_delay(&self, now: Instant) -> Option<Duration> {
        self.with(now, |s| {
            let delays: Vec<(Duration, Duration)> = s
                .active(now)
                .filter_map(|k| match k {
                    FaultKind::Delay { delay, jitter } => Some((*delay, *jitter)),
                    _ => None,
                })
                .collect();
            if delays.is_empty() {
                return None;
            }
            let mut total = 0.0;
            for (d, j) in delays {
                let jitter = j.as_secs_f64();
                let offset = if jitter > 0.0 { s.rng.random_range(-jitter..=jitter) } else { 0.0 };
                total += (d.as_secs_f64() + offset).max(0.0);
            }
            s.count("delayed");
            Some(Duration::from_secs_f64(total))
        })
    }

    /// The tightest active bandwidth cap, in bytes per second.
    pub fn bandwidth(&self, now: Instant) -> Option<u64> {
        self.with(now, |s| {
            s.active(now)
                .filter_map(|k| match k {
                    FaultKind::Bandwidth { bytes_per_second } => Some(*bytes_per_second),
                    _ => None,
                })
                .min()
        })
    }

    /// Every peer an active partition cuts this node off from.
    pub fn partitioned(&self, now: Instant) -> BTreeSet<PeerId> {
        self.with(now, |s| {
            s.active(now)
                .filter_map(|k| match k {
                    FaultKind::Partition { peers } => Some(peers.iter().copied()),
                    _ => None,
                })
                .flatten()
                .collect()
        })
    }

    /// Whether a payload to or from `peer` must not pass (counted as `partitioned`).
    pub fn blocks(&self, peer: &PeerId, now: Instant) -> bool {
        self.with(now, |s| {
            let cut = s
                .active(now)
                .any(|k| matches!(k, FaultKind::Partition { peers } if peers.contains(peer)));
            if cut {
                s.count("partitioned");
            }
            cut
        })
    }

    /// Whether a Byzantine mode is active (so the sender must copy before corrupting).
    pub fn corrupts(&self, now: Instant) -> bool {
        self.with(now, |s| s.active(now).any(FaultKind::is_byzantine))
    }

    /// Applies every active Byzantine mode to `values`, in the order noise,
    /// sign flip, scale, NaN; says whether any did (counted as `corrupted`).
    pub fn corrupt(&self, values: &mut [f32], now: Instant) -> bool {
        self.with(now, |s| {
            let modes: Vec<FaultKind> =
                s.active(now).filter(|k| k.is_byzantine()).cloned().collect();
            let mut order = modes.clone();
            order.sort_by_key(|k| match k {
                FaultKind::Noise { .. } => 0,
                FaultKind::SignFlip => 1,
                FaultKind::Scale { .. } => 2,
                _ => 3,
            });
            for mode in &order {
                match *mode {
                    FaultKind::Noise { scale } => {
                        if let Ok(normal) = Normal::new(0.0, scale) {
                            for v in values.iter_mut() {
                                *v += normal.sample(&mut s.rng) as f32;
                            }
                        }
                    }
                    FaultKind::SignFlip => values.iter_mut().for_each(|v| *v = -*v),
                    FaultKind::Scale { factor } => {
                        values.iter_mut().for_each(|v| *v = (f64::from(*v) * factor) as f32)
                    }
                    FaultKind::Nan => values.iter_mut().for_each(|v| *v = f32::NAN),
                    _ => {}
                }
            }
            if !modes.is_empty() {
                s.count("corrupted");
            }
            !modes.is_empty()
        })
    }

    /// Whether the trainer must flip its labels now.
    pub fn label_flip(&self, now: Instant) -> bool {
        self.with(now, |s| s.active(now).any(|k| *k == FaultKind::LabelFlip))
    }
}

fn view_of(e: &Entry, now: Instant) -> ActiveFault {
    ActiveFault {
        id: e.id,
        spec: e.spec.clone(),
        active: e.since.is_some(),
        remaining: e.ends().map(|end| end.saturating_duration_since(now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> FaultSpec {
        s.parse().unwrap()
    }

    #[test]
    fn faults_expire_after_their_duration_and_clear_on_request() {
        let f = Faults::new(1);
        let t0 = Instant::now();
        let a = f.inject(spec("pause,for=2s"), t0).unwrap();
        let b = f.inject(spec("label-flip"), t0).unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        assert_eq!(a.remaining, Some(Duration::from_secs(2)));
        assert_eq!(f.pause_end(t0), Some(Some(t0 + Duration::from_secs(2))));
        assert!(f.paused(t0 + Duration::from_millis(1999)));
        assert!(!f.paused(t0 + Duration::from_secs(2)));
        assert_eq!(f.list(t0 + Duration::from_secs(3)).len(), 1, "the pause is gone");
        assert!(f.label_flip(t0 + Duration::from_secs(1000)));
        assert_eq!(f.clear(&[7]), 0);
        assert_eq!(f.clear(&[b.id]), 1);
        assert!(!f.label_flip(t0));
        f.inject(spec("pause"), t0).unwrap();
        assert_eq!(f.pause_end(t0 + Duration::from_secs(99)), Some(None));
        assert_eq!(f.clear(&[]), 1);
        assert!(!f.paused(t0));
    }

    #[test]
    fn a_fault_from_a_round_waits_for_it() {
        let f = Faults::new(1);
        let t0 = Instant::now();
        let view = f.inject(spec("sign-flip,from=3,for=10s"), t0).unwrap();
        assert!(!view.active && view.remaining.is_none());
        f.set_round(2, t0);
        assert!(!f.corrupts(t0));
        let t1 = t0 + Duration::from_secs(60);
        f.set_round(3, t1);
        assert!(f.corrupts(t1));
        // Its duration counts from when it became active.
        assert!(f.corrupts(t1 + Duration::from_secs(9)));
        assert!(!f.corrupts(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn crashes_fire_at_their_round() {
        let f = Faults::new(1);
        let t = Instant::now();
        f.set_round(4, t);
        f.inject(spec("crash"), t).unwrap();
        assert!(!f.crash_due(4, t), "the next round, not this one");
        assert!(f.crash_due(5, t));
        let g = Faults::new(1);
        g.inject(spec("crash:3"), t).unwrap();
        assert!(!g.crash_due(2, t));
        assert!(g.crash_due(3, t));
    }

    #[test]
    fn drops_lose_about_their_fraction_in_their_direction_only() {
        let f = Faults::new(7);
        let t = Instant::now();
        f.inject(spec("drop:0.3:out"), t).unwrap();
        let lost = (0..10_000).filter(|_| f.drop_outgoing(t)).count();
        assert!((2700..3300).contains(&lost), "{lost} of 10000");
        assert!((0..1000).all(|_| !f.drop_incoming(t)));
        assert_eq!(f.effects()["dropped_out"], lost as u64);
        // The same seed draws the same losses.
        let g = Faults::new(7);
        g.inject(spec("drop:0.3:out"), t).unwrap();
        assert_eq!((0..10_000).filter(|_| g.drop_outgoing(t)).count(), lost);
    }

    #[test]
    fn delays_stay_within_their_jitter_and_caps_take_the_tightest() {
        let f = Faults::new(3);
        let t = Instant::now();
        assert_eq!(f.send_delay(t), None);
        f.inject(spec("delay:200ms~50ms"), t).unwrap();
        for _ in 0..1000 {
            let d = f.send_delay(t).unwrap();
            assert!(d >= Duration::from_millis(150) && d <= Duration::from_millis(250), "{d:?}");
        }
        f.inject(spec("bandwidth:1MB/s"), t).unwrap();
        f.inject(spec("bandwidth:500kB/s"), t).unwrap();
        assert_eq!(f.bandwidth(t), Some(500_000));
    }

    #[test]
    fn byzantine_modes_change_what_is_sent() {
        let t = Instant::now();
        let run = |s: &str| {
            let f = Faults::new(5);
            f.inject(spec(s), t).unwrap();
            let mut v = vec![1.0f32, -2.0, 0.5];
            assert!(f.corrupt(&mut v, t));
            v
        };
        assert_eq!(run("sign-flip"), [-1.0, 2.0, -0.5]);
        assert_eq!(run("scale:10"), [10.0, -20.0, 5.0]);
        assert!(run("nan").iter().all(|v| v.is_nan()));
        let noisy = run("noise:0.1");
        assert!(noisy.iter().zip([1.0f32, -2.0, 0.5]).all(|(a, b)| a != &b && (a - b).abs() < 1.0));
        // Both at once: flip, then scale.
        let f = Faults::new(5);
        f.inject(spec("scale:2"), t).unwrap();
        f.inject(spec("sign-flip"), t).unwrap();
        let mut v = vec![1.0f32];
        f.corrupt(&mut v, t);
        assert_eq!(v, [-2.0]);
        let clean = Faults::new(5);
        let mut w = vec![1.0f32];
        assert!(!clean.corrupt(&mut w, t) && w == [1.0]);
    }

    #[test]
    fn label_flip_is_refused_where_there_are_no_labels() {
        let f = Faults::new(1)
            .without_labels("label-flip needs labelled data; this node trains on text");
        let e = f.inject(spec("label-flip"), Instant::now()).unwrap_err().to_string();
        assert!(e.contains("trains on text"), "{e}");
        assert!(f.inject(spec("nan"), Instant::now()).is_ok());
    }

    #[test]
    fn partitions_name_their_peers() {
        let f = Faults::new(1);
        let t = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        f.inject(
            FaultSpec {
                kind: FaultKind::Partition { peers: vec![a] },
                duration: None,
                from_round: None,
            },
            t,
        )
        .unwrap();
        assert!(f.blocks(&a, t) && !f.blocks(&b, t));
        assert_eq!(f.partitioned(t), BTreeSet::from([a]));
        assert_eq!(f.effects()["partitioned"], 1);
    }

    #[tokio::test]
    async fn waiting_out_a_pause_ends_when_it_ends_or_is_cleared() {
        let f = std::sync::Arc::new(Faults::new(1));
        let started = Instant::now();
        f.inject(spec("pause,for=300ms"), started).unwrap();
        f.wait_unpaused().await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        f.inject(spec("pause"), Instant::now()).unwrap();
        let g = f.clone();
        let waiter = tokio::spawn(async move { g.wait_unpaused().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        f.clear(&[]);
        waiter.await.unwrap();
    }
}
