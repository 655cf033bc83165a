//! Patience: how long a gossip exchange waits for each in-neighbour.
//!
//! Why: the exchange deadline bounds the wait for a neighbour that never
//! answers, but only per exchange. A member that stays silent, or always
//! sends a beat too late, would cost every exchange its whole deadline and
//! slow an honest node ten-fold (measured: 0.09x). So waiting is something
//! a neighbour earns by answering in time:
//! - every neighbour is waited for a grace after the exchange began or last
//!   heard an answer (`fraction` of the local phase, at least `MIN_GRACE`):
//!   while neighbours keep arriving the wait is free;
//! - beyond that the exchange waits for one only as long as its credit,
//!   which that waiting spends; the deadline caps it all;
//! - an answer in time earns `fraction` of the time since the last exchange
//!   (local phase included), up to one deadline; members at the start begin
//!   with a full deadline of credit, members that join later with none.
//!
//! A silent member thus costs each exchange the grace, and one that answers
//! in time only to go silent again can spend no more than it earned: either
//! way about `fraction` of the node's time at most. An honest neighbour that
//! runs a little slow is waited for out of what it earns each round, so a
//! swarm whose nodes differ by less than `fraction` stays in step; one on a
//! lossy link is mixed whenever its message arrives within what it has.

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;

/// The grace, and the credit earned, as a fraction of the training time,
/// unless told otherwise: a member that does not keep pace costs at most
/// about a fifth of it.
pub const DEFAULT_STRAGGLER_GRACE: f64 = 0.2;

/// The shortest grace: scheduling noise between processes on one host.
pub const MIN_GRACE: Duration = Duration::from_millis(5);

/// `--straggler-grace`: `off` (wait the full deadline for everyone) or a
/// fraction of the local phase, at least 0.
pub fn parse_grace(s: &str) -> Result<Option<f64>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(Some(f)),
        _ => Err(format!(
            "--straggler-grace must be off or a fraction of the local phase, at least 0 (got {s:?})"
        )),
    }
}

/// Every in-neighbour's credit, and the grace.
#[derive(Debug, Clone)]
pub struct Patience {
    /// `None`: every neighbour gets the full deadline, always.
    fraction: Option<f64>,
    deadline: Duration,
    credit: BTreeMap<PeerId, Duration>,
}

impl Patience {
    /// `members` start with a deadline of credit. `fraction` of the local
    /// phase is the grace; `None` waits the full `deadline` for everyone.
    pub fn new(fraction: Option<f64>, deadline: Duration, members: &[PeerId]) -> Patience {
        let credit = members.iter().map(|p| (*p, deadline)).collect();
        Patience { fraction: fraction.filter(|f| f.is_finite() && *f >= 0.0), deadline, credit }
    }

    /// How long after the grace the exchange may wait for `peer`.
    pub fn allowance(&self, peer: &PeerId) -> Duration {
        match self.fraction {
            None => self.deadline,
            Some(_) => self.credit.get(peer).copied().unwrap_or_default(),
        }
    }

    /// How long every neighbour is waited for, after a local phase of `local`.
    pub fn grace(&self, local: Duration) -> Duration {
        let Some(f) = self.fraction else { return self.deadline };
        local.mul_f64(f).max(MIN_GRACE).min(self.deadline)
    }

    /// What an exchange that came `took` after the last one cost and saw of
    /// `peer`: `waited` beyond the grace, and whether its message came in time.
    pub fn settle(&mut self, peer: PeerId, waited: Duration, in_time: bool, took: Duration) {
        let Some(f) = self.fraction else { return };
        let c = self.credit.entry(peer).or_default();
        *c = c.saturating_sub(waited);
        if in_time {
            *c = (*c + took.mul_f64(f)).min(self.deadline);
        }
    }

    /// Forgets peers that are no longer members; members new to this node
    /// start without credit.
    pub fn set_members(&mut self, members: &[PeerId]) {
        self.credit.retain(|p, _| members.contains(p));
        for p in members {
            self.credit.entry(*p).or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(3);
    const ROUND: Duration = Duration::from_millis(100);

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    #[test]
    fn members_at_the_start_have_a_deadline_of_credit_and_later_ones_earn_it() {
        let p = peers(3);
        let mut pat = Patience::new(Some(0.2), D, &p[..2]);
        assert_eq!(pat.allowance(&p[0]), D);
        pat.set_members(&p);
        assert_eq!(pat.allowance(&p[2]), Duration::ZERO);
        pat.settle(p[2], Duration::ZERO, true, ROUND);
        assert_eq!(pat.allowance(&p[2]), Duration::from_millis(20));
        // Capped at the deadline.
        for _ in 0..1000 {
            pat.settle(p[2], Duration::ZERO, true, ROUND);
        }
        assert_eq!(pat.allowance(&p[2]), D);
    }

    #[test]
    fn waiting_spends_credit_and_a_miss_earns_nothing() {
        let p = peers(1)[0];
        let mut pat = Patience::new(Some(0.2), D, &[p]);
        pat.settle(p, D, false, ROUND);
        assert_eq!(pat.allowance(&p), Duration::ZERO);
        // A slow neighbour: waited 15 ms beyond the grace a round, earns 20 ms.
        for _ in 0..10 {
            pat.settle(p, Duration::from_millis(15), true, ROUND);
        }
        assert_eq!(pat.allowance(&p), Duration::from_millis(65), "5 + 10 x 5 + 15 unspent");
        // A miss spends what the wait took and earns nothing.
        pat.settle(p, Duration::from_millis(65), false, ROUND);
        assert_eq!(pat.allowance(&p), Duration::ZERO);
    }

    #[test]
    fn a_neighbour_that_goes_silent_whenever_it_can_costs_a_bounded_share() {
        let p = peers(1)[0];
        let mut pat = Patience::new(Some(0.2), D, &[p]);
        // With a second of credit it goes silent (spending all of it),
        // otherwise it answers at once.
        let (mut waited, mut trained) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..10_000 {
            trained += ROUND;
            let credit = pat.allowance(&p);
            if credit >= Duration::from_secs(1) {
                waited += credit;
                pat.settle(p, credit, false, ROUND);
            } else {
                pat.settle(p, Duration::ZERO, true, ROUND);
            }
        }
        let share = waited.as_secs_f64() / (waited + trained).as_secs_f64();
        assert!(share < 0.2, "waiting took {share:.3} of the time");
    }

    #[test]
    fn the_grace_is_a_fraction_of_the_local_phase_within_bounds() {
        let pat = Patience::new(Some(0.2), D, &[]);
        assert_eq!(pat.grace(Duration::from_secs(1)), Duration::from_millis(200));
        assert_eq!(pat.grace(Duration::from_millis(10)), MIN_GRACE);
        assert_eq!(pat.grace(Duration::from_secs(60)), D);
        assert_eq!(Patience::new(None, D, &[]).grace(Duration::from_millis(10)), D);
    }

    #[test]
    fn the_flag_parses_off_and_fractions_and_names_a_bad_value() {
        assert_eq!(parse_grace("off"), Ok(None));
        assert_eq!(parse_grace("0.5"), Ok(Some(0.5)));
        assert_eq!(parse_grace("0"), Ok(Some(0.0)));
        for bad in ["-1", "nan", "inf", "soon"] {
            assert!(parse_grace(bad).unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn off_waits_the_deadline_for_everyone_always() {
        let p = peers(1)[0];
        let mut pat = Patience::new(None, D, &[]);
        pat.settle(p, D, false, ROUND);
        assert_eq!(pat.allowance(&p), D);
    }

    #[test]
    fn former_members_are_forgotten() {
        let p = peers(3);
        let mut pat = Patience::new(Some(0.2), D, &p);
        pat.set_members(&p[..1]);
        assert_eq!(pat.credit.len(), 1);
    }
}
