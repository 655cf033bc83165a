//! Where a node's wall time goes: local phases (compute), and everything
//! between the end of one local phase and the start of the next (the
//! exchange and the mix: communication). Round-end work the node chooses to
//! do (evaluation, checkpoint) is left out of both.

use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PhaseTiming {
    pub compute_seconds: f64,
    pub communication_seconds: f64,
    #[serde(skip)]
    training_since: Option<Instant>,
    #[serde(skip)]
    mixing_since: Option<Instant>,
}

impl PhaseTiming {
    /// A local phase starts: the time since the last one ended was spent
    /// communicating.
    pub fn train_started(&mut self, now: Instant) {
        if let Some(t) = self.mixing_since.take() {
            self.communication_seconds += now.saturating_duration_since(t).as_secs_f64();
        }
        self.training_since = Some(now);
    }

    /// Leaves `d` (round-end evaluation and checkpoint) out of both buckets.
    pub fn skip(&mut self, d: Duration) {
        if let Some(t) = self.mixing_since.as_mut() {
            *t += d;
        }
    }

    pub fn train_ended(&mut self, now: Instant) {
        if let Some(t) = self.training_since.take() {
            self.compute_seconds += now.saturating_duration_since(t).as_secs_f64();
        }
        self.mixing_since = Some(now);
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
        t.train_started(at(0));
        t.train_ended(at(300));
        t.skip(Duration::from_millis(50));
        t.train_started(at(400));
        t.train_ended(at(600));
        assert!((t.compute_seconds - 0.5).abs() < 1e-9);
        assert!((t.communication_seconds - 0.05).abs() < 1e-9, "{}", t.communication_seconds);
    }
}
