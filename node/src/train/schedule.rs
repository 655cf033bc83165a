//! Learning-rate schedules: a pure function from the step number to the rate,
//! so that a resumed run gets exactly the rates it would have had.

use serde::{Deserialize, Serialize};

/// How the learning rate moves over `steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up from lr/warmup to lr over this many steps.
    pub warmup_steps: u64,
    /// Cosine decays to this rate at `total_steps`.
    pub min_lr: f64,
    pub total_steps: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Cosine,
}

impl Schedule {
    /// The rate for step `step` (counting from 0).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let done = (step - self.warmup_steps).min(span) as f64 / span as f64;
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * done).cos());
                self.min_lr + (self.lr - self.min_lr) * cos
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_min() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            lr: 1.0,
            warmup_steps: 10,
            min_lr: 0.1,
            total_steps: 110,
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(500) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn constant_stays() {
        let s = Schedule {
            kind: ScheduleKind::Constant,
            lr: 0.3,
            warmup_steps: 0,
            min_lr: 0.0,
            total_steps: 5,
        };
        assert_eq!(s.lr_at(0), 0.3);
        assert_eq!(s.lr_at(1000), 0.3);
    }
}
