//! Where a node's wall time goes: local phases (compute, as the trainer
//! measured them), and the time between the end of one local phase and the
//! start of the next (the exchange and the mix: communication). Trainer
//! work between phases that the node chose to do (evaluation, checkpoint)
//! is in neither bucket.
//!
//! Communication is split where the node's threads hand the round on, so
//! that a slow round says which part was slow:
//! - handoff: the trainer thread ended its phase; the driver takes the
//!   parameters (a thread wake-up, longer on a busy machine);
//! - exchange: the driver sends, waits for its peers and mixes, until it
//!   hands the mixed parameters to the trainer (for a round that does not
//!   communicate, until the next phase is asked for);
//! - resume: the trainer sets them and starts the next phase.

use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PhaseTiming {
    pub compute_seconds: f64,
    /// handoff + exchange + resume.
    pub communication_seconds: f64,
    pub handoff_seconds: f64,
    pub exchange_seconds: f64,
    pub resume_seconds: f64,
    /// The between-phases stretch under way: when the last local phase
    /// ended, when the driver took it, when it handed back mixed parameters.
    #[serde(skip)]
    between: Option<Between>,
    /// Trainer work since then that was not a local phase.
    #[serde(skip)]
    side_work: f64,
}

#[derive(Debug, Clone, Copy)]
struct Between {
    ended: Instant,
    taken: Instant,
    mixed: Option<Instant>,
}

impl PhaseTiming {
    /// A local phase ran on the trainer from `started` for `seconds`; the
    /// driver took its result at `taken`.
    pub fn phase(&mut self, started: Instant, seconds: f64, taken: Instant) {
        self.close(started);
        self.compute_seconds += seconds;
        let ended = started + Duration::from_secs_f64(seconds.max(0.0));
        self.between = Some(Between { ended, taken: taken.max(ended), mixed: None });
    }

    /// The driver handed the trainer mixed parameters at `now` (the first
    /// time between two phases counts).
    pub fn mixed(&mut self, now: Instant) {
        if let Some(b) = self.between.as_mut().filter(|b| b.mixed.is_none()) {
            b.mixed = Some(now.max(b.taken));
        }
    }

    /// The trainer spent `seconds` between phases on something else.
    pub fn side_work(&mut self, seconds: f64) {
        self.side_work += seconds;
    }

    /// The strategy finished at `now`: no phase follows the last one.
    pub fn finished(&mut self, now: Instant) {
        self.close(now);
    }

    fn close(&mut self, until: Instant) {
        let side = std::mem::take(&mut self.side_work);
        let Some(b) = self.between.take() else { return };
        let secs = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64();
        // A phase queued before the driver took the last one's result
        // (`overlap`) started before `taken` and `mixed`: only the time the
        // trainer really stood between phases counts.
        let taken = b.taken.min(until);
        let handoff = secs(b.ended, taken);
        let (mut exchange, mut resume) = match b.mixed.map(|m| m.clamp(taken, until)) {
            Some(m) => (secs(taken, m), secs(m, until)),
            None => (secs(taken, until), 0.0),
        };
        // Side work (a round-end evaluation, a checkpoint) is queued after
        // the mixed parameters, so it sits in the resume part first.
        let from_resume = side.min(resume);
        resume -= from_resume;
        exchange = (exchange - (side - from_resume)).max(0.0);
        self.handoff_seconds += handoff;
        self.exchange_seconds += exchange;
        self.resume_seconds += resume;
        self.communication_seconds += handoff + exchange + resume;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ms` milliseconds after a fixed start.
    fn at(ms: u64) -> Instant {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *T0.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn phases_split_into_compute_and_communication() {
        let mut t = PhaseTiming::default();
        // Phase 0-300 ms, taken at 310, mixed at 360; 50 ms of the rest an
        // evaluation; the next phase starts at 400.
        t.phase(at(0), 0.3, at(310));
        t.mixed(at(360));
        t.mixed(at(380));
        t.side_work(0.02);
        t.phase(at(400), 0.2, at(600));
        t.finished(at(650));
        assert!(close(t.compute_seconds, 0.5));
        assert!(close(t.handoff_seconds, 0.01), "{t:?}");
        assert!(close(t.exchange_seconds, 0.05 + 0.05), "{t:?}");
        assert!(close(t.resume_seconds, 0.02), "{t:?}");
        assert!(close(t.communication_seconds, 0.13), "{t:?}");
    }

    #[test]
    fn side_work_beyond_the_resume_comes_out_of_the_exchange() {
        let mut t = PhaseTiming::default();
        t.phase(at(0), 0.1, at(100));
        t.side_work(0.05);
        t.phase(at(200), 0.1, at(300));
        assert!(close(t.exchange_seconds, 0.05) && close(t.resume_seconds, 0.0), "{t:?}");
        assert!(close(t.communication_seconds, 0.05), "{t:?}");
    }

    #[test]
    fn a_phase_queued_before_the_last_was_taken_counts_only_the_gap() {
        let mut t = PhaseTiming::default();
        // Overlap: phase 0 ends at 100, phase 1 (queued) starts at 101, the
        // driver takes phase 0 at 104 and its mix is done at 150.
        t.phase(at(0), 0.1, at(104));
        t.mixed(at(150));
        t.phase(at(101), 0.1, at(210));
        // Phase 1's successor waited for a late mix: idle 201-260.
        t.mixed(at(260));
        t.phase(at(261), 0.1, at(370));
        assert!(close(t.compute_seconds, 0.3), "{t:?}");
        assert!(close(t.handoff_seconds, 0.001 + 0.009), "{t:?}");
        assert!(close(t.exchange_seconds, 0.05), "{t:?}");
        assert!(close(t.communication_seconds, 0.001 + 0.06), "{t:?}");
    }
}
