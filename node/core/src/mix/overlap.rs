//! Overlapped gossip (`--overlap`): the trainer runs the next local phase
//! while the last phase's exchange is under way, and the exchange's change
//! is added to the model once that next phase ends. This is CoCoD-SGD
//! (Shen et al., "Computation and Communication Decoupled SGD", IJCAI
//! 2019). With q_k what node i sends after local phase k and
//! m_k = sum_j W_ij q_k^j its mix:
//!
//! ```text
//! blocking:  q_{k+1} = m_k + D(m_k)    phase k+1 starts from m_k
//! overlap:   q_{k+1} = m_k + D(q_k)    phase k+1 starts from q_k; m_k - q_k is added at its end
//! ```
//!
//! where D(x) is a local phase's progress from x. Every mix is applied
//! whole and once; only the local progress is taken one mix earlier.
//!
//! Why a wrapper and not a gossip option: the strategy inside is the
//! gossip state machine unchanged (it sees q_k as its phase's end and
//! mixes as always). What changes is only when the trainer is told what:
//! the phase after next and the mix's change (`Action::Shift`) are queued
//! on the trainer as soon as the mix is done, so while an exchange takes
//! less than a local phase the trainer goes from one phase into the next
//! without waiting for the driver at all: no exchange, no thread hop, in
//! the time between phases.

use std::time::Instant;

use super::gossip::Gossip;
use super::mixer::{Action, Input, Mixer, StateError, StrategyState};

/// Gossip whose exchanges run while the trainer trains.
#[derive(Debug)]
pub struct Overlapped {
    gossip: Gossip,
    rounds: u64,
    /// q_k: what gossip was given at its last phase's end, until it has mixed it.
    exchanging: Option<Vec<f32>>,
    /// The mix's change queued on the trainer after the phase under way:
    /// that phase reports its parameters before the change is added.
    owed: Option<Vec<f32>>,
    /// A phase's end (parameters, samples) reported before the exchange it
    /// follows had mixed: it goes to gossip once that mix is done.
    held: Option<(Vec<f32>, u64)>,
    /// Local phases asked of the trainer and not reported yet.
    phases_out: u64,
    /// When the trainer began the phase handed to gossip next, as far as
    /// the wrapper can tell (the previous phase's hand-over: its report, or
    /// the late mix that freed it):
    /// gossip's straggler grace is a fraction of the real phase, not of the
    /// part of it after the mix.
    phase_began: Option<Instant>,
}

impl Overlapped {
    /// Overlaps `gossip`'s exchanges with local phases, for a run of `rounds`.
    pub fn new(gossip: Gossip, rounds: u64) -> Overlapped {
        Overlapped {
            gossip,
            rounds,
            exchanging: None,
            owed: None,
            held: None,
            phases_out: 0,
            phase_began: None,
        }
    }

    /// Asks the trainer for one more phase, if the run has one after those
    /// asked and not yet handed to gossip (under way, queued or held).
    fn next_phase(&mut self, steps: u64, out: &mut Vec<Action>) {
        let ahead = self.phases_out + u64::from(self.held.is_some());
        if self.gossip.round() + ahead < self.rounds {
            self.phases_out += 1;
            out.push(Action::Train { steps });
        }
    }

    /// Hands q (a phase's end with the mix's change added) to gossip.
    fn forward(&mut self, q: Vec<f32>, samples: u64, now: Instant) -> Vec<Action> {
        if let Some(at) = self.phase_began.replace(now) {
            self.gossip.phase_began(at);
        }
        self.exchanging = Some(q.clone());
        let actions = self.gossip.handle(Input::LocalDone { params: q, samples }, now);
        self.carry(actions, now)
    }

    /// Turns gossip's actions into the trainer's: a mix becomes the change
    /// it makes while a phase runs on the unmixed vector, and its `Train`
    /// the phase after the one already under way.
    fn carry(&mut self, actions: Vec<Action>, now: Instant) -> Vec<Action> {
        let mut out = Vec::with_capacity(actions.len() + 1);
        for a in actions {
            match a {
                Action::SetParams(m) => match self.exchanging.as_deref() {
                    Some(q) if self.phases_out > 0 || self.held.is_some() => {
                        let delta: Vec<f32> = m.iter().zip(q).map(|(m, q)| m - q).collect();
                        // A non-finite change is never added (the daemon
                        // refuses one): the trainer goes on from its own
                        // vector, and so does the next q.
                        if delta.iter().all(|v| v.is_finite()) {
                            match self.held.as_mut() {
                                Some((y, _)) => add(y, &delta),
                                None => self.owed = Some(delta.clone()),
                            }
                            out.push(Action::Shift(delta));
                        }
                    }
                    // The last mix: no phase follows, the trainer is idle.
                    _ => out.push(Action::SetParams(m)),
                },
                Action::Train { steps } => {
                    self.exchanging = None;
                    self.next_phase(steps, &mut out);
                }
                Action::Finish => {
                    self.exchanging = None;
                    out.push(Action::Finish);
                }
                other => out.push(other),
            }
        }
        if self.exchanging.is_none()
            && let Some((y, samples)) = self.held.take()
        {
            out.extend(self.forward(y, samples, now));
        }
        out
    }
}

/// `y += delta`, the same f32 additions the trainer makes for a `Shift`.
fn add(y: &mut [f32], delta: &[f32]) {
    for (v, d) in y.iter_mut().zip(delta) {
        *v += d;
    }
}

impl Mixer for Overlapped {
    fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for a in self.gossip.start(now) {
            match a {
                Action::Train { steps } => {
                    self.phase_began = Some(now);
                    self.next_phase(steps, &mut out);
                    self.next_phase(steps, &mut out);
                }
                other => out.push(other),
            }
        }
        out
    }

    fn set_start_params(&mut self, params: &[f32]) {
        self.gossip.set_start_params(params);
    }

    fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::LocalDone { mut params, samples } => {
                self.phases_out = self.phases_out.saturating_sub(1);
                if self.exchanging.is_some() {
                    // The mix of the phase before is late: this phase's end
                    // waits for its change.
                    self.held = Some((params, samples));
                    return Vec::new();
                }
                if let Some(delta) = self.owed.take() {
                    add(&mut params, &delta);
                }
                self.forward(params, samples, now)
            }
            other => {
                let actions = self.gossip.handle(other, now);
                self.carry(actions, now)
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.gossip.deadline()
    }

    fn round(&self) -> u64 {
        self.gossip.round()
    }

    fn dropped(&self) -> Vec<(&'static str, u64)> {
        self.gossip.dropped()
    }

    fn neighbour_distance(&self) -> Option<f64> {
        self.gossip.neighbour_distance()
    }

    fn snapshot(&self) -> Option<StrategyState> {
        self.gossip.snapshot()
    }

    fn restore(&mut self, state: StrategyState) -> Result<Vec<f32>, StateError> {
        self.gossip.restore(state)
    }

    fn adopt(&mut self, params: &[f32]) {
        self.gossip.adopt(params);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::gossip::tests::{cfg, peers};
    use crate::mix::mixer::{Message, MsgKind};
    use libp2p::PeerId;
    use std::sync::Arc;

    /// Node 0 of two, overlapped, over `rounds`; and node 1's id.
    fn pair(rounds: u64) -> (Overlapped, PeerId) {
        let ids = peers(2);
        let gossip = Gossip::new(cfg("complete", rounds), ids[0], ids.clone()).unwrap();
        (Overlapped::new(gossip, rounds), ids[1])
    }

    /// Node 1's vector for `round`.
    fn from(peer: PeerId, round: u64, v: f32) -> Input {
        Input::Received(Message::new(peer, MsgKind::Params, round, Arc::new(vec![v])))
    }

    fn sent(actions: &[Action]) -> Vec<f32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) => Some(m.values[0]),
                _ => None,
            })
            .collect()
    }

    fn done(v: f32) -> Input {
        Input::LocalDone { params: vec![v], samples: 1 }
    }

    #[test]
    fn the_next_phase_runs_during_the_exchange_and_the_mix_comes_as_its_change() {
        let (mut m, other) = pair(3);
        let t = Instant::now();
        let train = Action::Train { steps: 5 };
        assert_eq!(m.start(t), vec![train.clone(), train.clone()], "phases 0 and 1 at once");
        // q0 = 1 goes out; nothing for the trainer, which is on phase 1.
        let acts = m.handle(done(1.0), t);
        assert_eq!((sent(&acts), acts.len()), (vec![1.0], 1), "{acts:?}");
        // m0 = (1 + 3) / 2 = 2: its change, then phase 2.
        assert_eq!(m.handle(from(other, 0, 3.0), t), vec![Action::Shift(vec![1.0]), train]);
        // Phase 1 trained 1 -> 1.5 (its progress 0.5); q1 = m0 + 0.5 = 2.5.
        let acts = m.handle(done(1.5), t);
        assert_eq!(sent(&acts), vec![2.5], "{acts:?}");
        // m1 = (2.5 + 4.5) / 2 = 3.5: a change of 1, and no phase 3.
        assert_eq!(m.handle(from(other, 1, 4.5), t), vec![Action::Shift(vec![1.0])]);
        // Phase 2 trained 2.5 -> 2 on the trainer; q2 = 2 + 1 = 3.
        let acts = m.handle(done(2.0), t);
        assert_eq!(sent(&acts), vec![3.0], "{acts:?}");
        // The last mix is set whole: no phase runs on an unmixed vector.
        let acts = m.handle(from(other, 2, 5.0), t);
        assert_eq!(acts, vec![Action::SetParams(vec![4.0]), Action::Finish]);
        assert_eq!(m.round(), 3);
    }

    #[test]
    fn a_phase_that_ends_before_the_mix_waits_for_it() {
        let (mut m, other) = pair(4);
        let t = Instant::now();
        m.start(t);
        assert_eq!(sent(&m.handle(done(1.0), t)), vec![1.0]);
        // Phase 1 (1 -> 1.25) ends before node 1's vector came: held.
        assert_eq!(m.handle(done(1.25), t), vec![]);
        // m0 = 2: the idle trainer gets the change and phase 2 at once,
        // and q1 = 1.25 + 1 goes out.
        let acts = m.handle(from(other, 0, 3.0), t);
        assert_eq!(acts[..2], [Action::Shift(vec![1.0]), Action::Train { steps: 5 }], "{acts:?}");
        assert_eq!(sent(&acts), vec![2.25], "{acts:?}");
        assert_eq!(acts.len(), 3, "{acts:?}");
        // The next mix has phase 3 to queue and the one after none.
        let acts = m.handle(from(other, 1, 2.25), t);
        assert_eq!(acts, vec![Action::Shift(vec![0.0]), Action::Train { steps: 5 }]);
    }

    #[test]
    fn a_non_finite_mix_changes_nothing_and_the_next_vector_is_the_trainers() {
        let (mut m, other) = pair(3);
        let t = Instant::now();
        m.start(t);
        m.handle(done(1.0), t);
        let acts = m.handle(from(other, 0, f32::INFINITY), t);
        assert_eq!(acts, vec![Action::Train { steps: 5 }], "no change queued: {acts:?}");
        assert_eq!(sent(&m.handle(done(1.5), t)), vec![1.5]);
    }

    #[test]
    fn a_run_of_one_round_is_plain_gossip() {
        let (mut m, other) = pair(1);
        let t = Instant::now();
        assert_eq!(m.start(t), vec![Action::Train { steps: 5 }]);
        assert_eq!(sent(&m.handle(done(1.0), t)), vec![1.0]);
        let acts = m.handle(from(other, 0, 3.0), t);
        assert_eq!(acts, vec![Action::SetParams(vec![2.0]), Action::Finish]);
    }
}
