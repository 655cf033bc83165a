//! Where a node's wall time goes: local phases (compute, as the trainer
//! measured them), and the time between the end of one local phase and the
//! start of the next (the exchange and the mix: communication). Trainer
//! work between phases that the node chose to do (evaluation, checkpoint)
//! is in neither bucket.

use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PhaseTiming {
    pub compute_seconds: f64,
    pub communication_seconds: f64,
    /// When the last local phase ended, until the next one starts.
    #[serde(skip)]
    mixing_since: Option<Instant>,
    /// Trainer work since then that was not a local phase.
    #[serde(skip)]
    side_work: f64,
}

impl PhaseTiming {
    /// A local phase ran on the trainer from `started` for `seconds`.
    pub fn phase(&mut self, started: Instant, seconds: f64) {
        self.close(started);
        self.compute_seconds += seconds;
        self.mixing_since = Some(started + Duration::from_secs_f64(seconds.max(0.0)));
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
        if let Some(t) = self.mixing_since.take() {
            let between = until.saturating_duration_since(t).as_secs_f64();
            self.communication_seconds += (between - self.side_work).max(0.0);
        }
        self.side_work = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_split_into_compute_and_communication() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = PhaseTiming::default();
        t.phase(at(0), 0.3);
        // 100 ms between phases, 50 of them an evaluation.
        t.side_work(0.05);
        t.phase(at(400), 0.2);
        t.finished(at(650));
        assert!((t.compute_seconds - 0.5).abs() < 1e-9);
        assert!((t.communication_seconds - 0.1).abs() < 1e-9, "{}", t.communication_seconds);
    }
}
