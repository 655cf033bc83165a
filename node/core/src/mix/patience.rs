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
//! - a neighbour that missed its last exchange gets the grace only every
//!   `PROBE_EVERY`th exchange until it answers in time again, and none in
//!   between (only its credit): a member that never sends would otherwise
//!   cost every exchange the whole grace (measured: 0.77x-0.80x of an
//!   unattacked node's speed). A message of its for an exchange already
//!   past ends that: a neighbour behind but alive is waited the grace
//!   again, so that it can catch up (see `heard_late`).
//!
//! A silent member thus costs a `PROBE_EVERY`th of the grace an exchange, and one that answers in time only to go silent again can spend
//! no more than it earned: either way under `fraction` of the node's time. An honest neighbour that
//! runs a little slow is waited for out of what it earns each round, so a
//! swarm whose nodes differ by less than `fraction` stays in step; one on a
//! lossy link is mixed whenever its message arrives within what it has.

use std::time::Duration;

use libp2p::PeerId;

use super::mixer::Roster;
use super::vec_map::VecMap;

/// The grace, and the credit earned, as a fraction of the training time,
/// unless told otherwise: a member that does not keep pace costs at most
/// about a fifth of it.
pub const DEFAULT_STRAGGLER_GRACE: f64 = 0.2;

/// The shortest grace: scheduling noise between processes on one host.
pub const MIN_GRACE: Duration = Duration::from_millis(5);

/// A neighbour that keeps missing its exchanges gets the whole grace once
/// in this many (a probe): often enough that an honest one a little behind
/// (a slower host, a node back from a pause) gets back in within a few
/// rounds and earns credit again; seldom enough that a silent one costs a
/// quarter of what it would.
pub const PROBE_EVERY: u32 = 4;

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

/// Every in-neighbour's credit and record, and the grace.
///
/// Only neighbours that have been settled, or joined after the start, have
/// an entry; a member from the start without one has a full deadline of
/// credit and no misses. So a node's patience costs its in-neighbours, not
/// the swarm.
#[derive(Debug, Clone)]
pub struct Patience {
    /// `None`: every neighbour gets the full deadline, always.
    fraction: Option<f64>,
    deadline: Duration,
    /// A few entries, one per in-neighbour settled (see `VecMap`).
    standing: VecMap<PeerId, Standing>,
}

/// What a neighbour has earned: credit, how many exchanges in a row it
/// missed, and whether a message of its came late since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Standing {
    credit: Duration,
    misses: u32,
    late: bool,
}

impl Patience {
    /// Members at the start have a deadline of credit. `fraction` of the
    /// local phase is the grace; `None` waits the full `deadline` for everyone.
    pub fn new(fraction: Option<f64>, deadline: Duration) -> Patience {
        let fraction = fraction.filter(|f| f.is_finite() && *f >= 0.0);
        Patience { fraction, deadline, standing: VecMap::default() }
    }

    /// How long after the grace the exchange may wait for `peer`.
    pub fn allowance(&self, peer: &PeerId) -> Duration {
        match self.fraction {
            None => self.deadline,
            Some(_) => self.credit(peer),
        }
    }

    fn standing(&self, peer: &PeerId) -> Standing {
        let fresh = Standing { credit: self.deadline, misses: 0, late: false };
        self.standing.get(peer).copied().unwrap_or(fresh)
    }

    fn credit(&self, peer: &PeerId) -> Duration {
        self.standing(peer).credit
    }

    /// The whole grace, after a local phase of `local`.
    pub fn grace(&self, local: Duration) -> Duration {
        let Some(f) = self.fraction else { return self.deadline };
        local.mul_f64(f).max(MIN_GRACE).min(self.deadline)
    }

    /// How long `peer` is waited for after the last answer, before its
    /// credit: the grace, unless it missed its last exchange; then only on
    /// every `PROBE_EVERY`th exchange since, and not at all in between.
    pub fn grace_for(&self, peer: &PeerId, local: Duration) -> Duration {
        match self.fraction.is_some() && !self.standing(peer).misses.is_multiple_of(PROBE_EVERY) {
            true => Duration::ZERO,
            false => self.grace(local),
        }
    }

    /// What an exchange that came `took` after the last one cost and saw of
    /// `peer`: `waited` beyond the grace, and whether its message came in time.
    pub fn settle(&mut self, peer: PeerId, waited: Duration, in_time: bool, took: Duration) {
        let Some(f) = self.fraction else { return };
        let Standing { credit, misses, late } = self.standing(&peer);
        let mut credit = credit.saturating_sub(waited);
        if in_time {
            credit = (credit + took.mul_f64(f)).min(self.deadline);
        }
        let misses = if in_time || late { 0 } else { misses.saturating_add(1) };
        self.standing.insert(peer, Standing { credit, misses, late: false });
    }

    /// A message of `peer`'s came for an exchange already past: it is
    /// alive and behind, and gets the whole grace again (no probation).
    /// Waiting the grace is what lets a node behind catch up: nodes
    /// started seconds apart (containers) never fell into step when the
    /// one ahead waited for the others only on probes. Costs the entry of
    /// a peer already known, never a new one.
    pub fn heard_late(&mut self, peer: &PeerId) {
        if let Some(s) = self.standing.get_mut(peer) {
            s.misses = 0;
            s.late = true;
        }
    }

    /// The members are now `after`, `joined` of them new: forgets peers
    /// that left; the new ones start without credit. Costs the entries and
    /// the newcomers, not the swarm.
    pub fn set_members(&mut self, after: &Roster, joined: &[PeerId]) {
        self.standing.retain(|p, _| after.index_of(p).is_some());
        for p in joined {
            self.standing.insert(*p, Standing { credit: Duration::ZERO, misses: 0, late: false });
        }
    }
}

/// The in-neighbours an exchange still waits for, by their place in the
/// exchange's sorted list of expected peers, each with the grace and credit
/// it had when the exchange began. Positions, not peer ids: the simulator
/// delivers millions of messages, and each answer then costs one lookup in
/// that list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Awaiting {
    /// `None` once answered.
    waits: Vec<Option<Wait>>,
    left: usize,
    /// The longest wait among those awaited, kept as they answer: asked
    /// after every message, a scan each time cost the simulator 5%.
    longest: Duration,
}

/// How long an awaited peer is waited for after the last answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wait {
    grace: Duration,
    credit: Duration,
}

impl Wait {
    fn total(&self) -> Duration {
        self.grace + self.credit
    }
}

impl Awaiting {
    /// Awaits every peer of `expect` that has not `answered` yet, with the
    /// grace (after a local phase of `local`) and allowance `patience`
    /// gives it now.
    pub fn new(
        patience: &Patience,
        expect: &[PeerId],
        local: Duration,
        answered: impl Fn(&PeerId) -> bool,
    ) -> Awaiting {
        let wait = |p: &PeerId| Wait {
            grace: patience.grace_for(p, local),
            credit: patience.allowance(p),
        };
        let waits: Vec<Option<Wait>> =
            expect.iter().map(|p| (!answered(p)).then(|| wait(p))).collect();
        let left = waits.iter().flatten().count();
        let mut awaiting = Awaiting { waits, left, longest: Duration::ZERO };
        awaiting.longest = awaiting.scan_longest();
        awaiting
    }

    fn scan_longest(&self) -> Duration {
        self.waits.iter().flatten().map(Wait::total).max().unwrap_or_default()
    }

    /// The peer at `pos` answered: no longer awaited.
    pub fn answered(&mut self, pos: usize) {
        if let Some(c) = self.waits.get_mut(pos)
            && let Some(w) = c.take()
        {
            self.left -= 1;
            if w.total() == self.longest {
                self.longest = self.scan_longest();
            }
        }
    }

    /// The grace of the peer at `pos`, while it is awaited.
    pub fn grace(&self, pos: usize) -> Option<Duration> {
        self.waits.get(pos).copied().flatten().map(|w| w.grace)
    }

    /// Whether the peer at `pos` is still awaited.
    pub fn contains(&self, pos: usize) -> bool {
        self.waits.get(pos).is_some_and(Option::is_some)
    }

    /// Awaited peers of `expect` (the list this was made from) that are no
    /// longer members of `roster` are waited for only the grace, as a member
    /// without credit.
    pub fn left(&mut self, expect: &[PeerId], roster: &Roster) {
        for (c, p) in self.waits.iter_mut().zip(expect) {
            if let Some(c) = c.as_mut()
                && roster.index_of(p).is_none()
            {
                c.credit = Duration::ZERO;
            }
        }
        self.longest = self.scan_longest();
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    pub fn len(&self) -> usize {
        self.left
    }

    /// The longest wait, grace and credit, among the awaited peers (zero if
    /// none).
    pub fn max_wait(&self) -> Duration {
        self.longest
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

    fn roster(members: &[PeerId]) -> Roster {
        Roster::new(members[0], members.to_vec())
    }

    #[test]
    fn members_at_the_start_have_a_deadline_of_credit_and_later_ones_earn_it() {
        let p = peers(3);
        let mut pat = Patience::new(Some(0.2), D);
        assert_eq!(pat.allowance(&p[0]), D);
        pat.set_members(&roster(&p), &p[2..]);
        assert_eq!(pat.allowance(&p[1]), D);
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
        let mut pat = Patience::new(Some(0.2), D);
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
        let mut pat = Patience::new(Some(0.2), D);
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_neighbour_that_keeps_missing_gets_the_whole_grace_only_on_probes() {
        let p = peers(2);
        let mut pat = Patience::new(Some(0.2), D);
        let local = Duration::from_secs(1);
        let mut graces = Vec::new();
        for _ in 0..9 {
            graces.push(pat.grace_for(&p[0], local));
            pat.settle(p[0], Duration::ZERO, false, ROUND);
        }
        let (whole, short) = (ms(200), Duration::ZERO);
        let probes = [whole, short, short, short, whole, short, short, short, whole];
        assert_eq!(graces, probes);
        assert_eq!(pat.grace_for(&p[1], local), whole, "one that never missed");
        // An answer in time restores it.
        pat.settle(p[0], Duration::ZERO, true, ROUND);
        assert_eq!(pat.grace_for(&p[0], local), whole);
        // Off: the deadline, always.
        let mut off = Patience::new(None, D);
        off.settle(p[0], Duration::ZERO, false, ROUND);
        assert_eq!(off.grace_for(&p[0], local), D);
    }

    #[test]
    fn a_neighbour_behind_whose_messages_come_late_keeps_the_whole_grace() {
        let p = peers(2);
        let mut pat = Patience::new(Some(0.2), D);
        let local = Duration::from_secs(1);
        let (whole, short) = (ms(200), Duration::ZERO);
        // It misses, then its message for that exchange arrives after it:
        // whether before the next exchange or before this one settles.
        pat.settle(p[0], Duration::ZERO, false, ROUND);
        assert_eq!(pat.grace_for(&p[0], local), short);
        pat.heard_late(&p[0]);
        assert_eq!(pat.grace_for(&p[0], local), whole);
        for _ in 0..5 {
            pat.heard_late(&p[0]);
            pat.settle(p[0], Duration::ZERO, false, ROUND);
            assert_eq!(pat.grace_for(&p[0], local), whole);
        }
        // Silent again: on probation after one miss.
        pat.settle(p[0], Duration::ZERO, false, ROUND);
        assert_eq!(pat.grace_for(&p[0], local), short);
        // A peer with no entry gets none from a late message.
        pat.heard_late(&p[1]);
        assert!(!pat.standing.contains_key(&p[1]));
    }

    #[test]
    fn the_grace_is_a_fraction_of_the_local_phase_within_bounds() {
        let pat = Patience::new(Some(0.2), D);
        assert_eq!(pat.grace(Duration::from_secs(1)), Duration::from_millis(200));
        assert_eq!(pat.grace(Duration::from_millis(10)), MIN_GRACE);
        assert_eq!(pat.grace(Duration::from_secs(60)), D);
        assert_eq!(Patience::new(None, D).grace(Duration::from_millis(10)), D);
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
        let mut pat = Patience::new(None, D);
        pat.settle(p, D, false, ROUND);
        assert_eq!(pat.allowance(&p), D);
    }

    #[test]
    fn former_members_are_forgotten() {
        let p = peers(3);
        let mut pat = Patience::new(Some(0.2), D);
        for q in &p {
            pat.settle(*q, D, false, ROUND);
        }
        pat.set_members(&roster(&p[..1]), &[]);
        assert_eq!(pat.standing.len(), 1);
        // One that comes back is new again: no credit.
        pat.set_members(&roster(&p), &p[1..]);
        assert_eq!(pat.allowance(&p[2]), Duration::ZERO);
    }

    #[test]
    fn awaiting_keeps_the_largest_credit_of_those_not_yet_answered() {
        let p = peers(4);
        let mut pat = Patience::new(Some(0.2), D);
        pat.settle(p[1], D - Duration::from_secs(1), false, ROUND);
        pat.settle(p[2], D, false, ROUND);
        // p[3] answered before the exchange began.
        // A grace of 20 ms; p[1] and p[2] missed, so they get none.
        let mut a = Awaiting::new(&pat, &p, ROUND, |q| *q == p[3]);
        assert_eq!((a.len(), a.max_wait()), (3, ms(20) + D));
        assert!(!a.contains(3));
        a.answered(0);
        assert_eq!(a.max_wait(), Duration::from_secs(1));
        assert!(!a.contains(0) && a.contains(1));
        a.answered(0);
        a.answered(1);
        assert_eq!((a.len(), a.max_wait()), (1, Duration::ZERO));
        a.answered(2);
        a.answered(9);
        assert!(a.is_empty());
        assert_eq!(a.max_wait(), Duration::ZERO);
    }

    #[test]
    fn an_awaited_peer_that_left_keeps_no_credit() {
        let p = peers(2);
        let pat = Patience::new(Some(0.2), D);
        let mut a = Awaiting::new(&pat, &p, ROUND, |_| false);
        a.left(&p, &roster(&p[..1]));
        assert_eq!((a.len(), a.max_wait()), (2, ms(20) + D));
        a.answered(0);
        assert_eq!((a.len(), a.max_wait()), (1, ms(20)), "the grace alone");
    }
}
