//! When a strategy communicates: every k rounds, or a fixed budget of
//! communication rounds concentrated late in training, where averaging
//! matters most for the final model. The last round always communicates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A communication schedule over `rounds` rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CommSchedule {
    /// Rounds 0, k, 2k, ... (and the last).
    Every(u64),
    /// `budget` communication rounds at r_j = floor(R * sqrt(j / budget)),
    /// j = 1..budget: their spacing shrinks as training goes on.
    Late(u64),
}

impl CommSchedule {
    /// Whether round `round` (0-based) of `rounds` communicates.
    pub fn communicates(&self, round: u64, rounds: u64) -> bool {
        if rounds == 0 || round + 1 >= rounds {
            return true;
        }
        match *self {
            CommSchedule::Every(k) => round.is_multiple_of(k.max(1)),
            CommSchedule::Late(budget) => {
                (1..=budget).any(|j| late_round(j, budget, rounds) == round)
            }
        }
    }

    /// Number of communicating rounds among `rounds`.
    pub fn count(&self, rounds: u64) -> u64 {
        (0..rounds).filter(|&r| self.communicates(r, rounds)).count() as u64
    }
}

fn late_round(j: u64, budget: u64, rounds: u64) -> u64 {
    let r = (rounds as f64 * (j as f64 / budget as f64).sqrt()).floor() as u64;
    r.min(rounds - 1)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--comm {0:?} is not a schedule (expected every:K with K >= 1, or late:BUDGET with BUDGET >= 1)"
)]
pub struct CommScheduleError(pub String);

impl FromStr for CommSchedule {
    type Err = CommScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CommScheduleError(s.to_string());
        let (kind, n) = s.split_once(':').ok_or_else(err)?;
        let n: u64 = n.parse().map_err(|_| err())?;
        match (kind, n) {
            (_, 0) => Err(err()),
            ("every", k) => Ok(CommSchedule::Every(k)),
            ("late", b) => Ok(CommSchedule::Late(b)),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for CommSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommSchedule::Every(k) => write!(f, "every:{k}"),
            CommSchedule::Late(b) => write!(f, "late:{b}"),
        }
    }
}

impl TryFrom<String> for CommSchedule {
    type Error = CommScheduleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CommSchedule> for String {
    fn from(c: CommSchedule) -> String {
        c.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_k_and_the_last_round() {
        let s: CommSchedule = "every:3".parse().unwrap();
        let rounds: Vec<u64> = (0..10).filter(|&r| s.communicates(r, 10)).collect();
        assert_eq!(rounds, [0, 3, 6, 9]);
        assert_eq!("every:1".parse::<CommSchedule>().unwrap().count(10), 10);
    }

    #[test]
    fn late_spends_the_budget_late() {
        let s: CommSchedule = "late:10".parse().unwrap();
        let rounds: Vec<u64> = (0..100).filter(|&r| s.communicates(r, 100)).collect();
        assert_eq!(rounds, [31, 44, 54, 63, 70, 77, 83, 89, 94, 99]);
        let first_half = rounds.iter().filter(|&&r| r < 50).count();
        assert!(first_half < rounds.len() - first_half);
    }

    #[test]
    fn bad_schedules_are_named() {
        for bad in ["every:0", "late", "sometimes:3", "every:x"] {
            assert!(bad.parse::<CommSchedule>().unwrap_err().to_string().contains(bad));
        }
    }
}
