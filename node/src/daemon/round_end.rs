//! What a node does when a round ends, as pure functions of its counters:
//! evaluate the mixed model when `--eval-every` steps were crossed (the
//! last round's is the final evaluation, so not twice), checkpoint when
//! `--checkpoint-every` steps were crossed.

/// The work due at one round's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoundEnd {
    pub evaluate: bool,
    pub checkpoint: bool,
}

/// The work due when `round` of `rounds` has just been left, the trainer
/// having gone from `steps_before` to `steps_now` steps in it.
pub fn due(
    steps_before: u64,
    steps_now: u64,
    (eval_every, checkpoint_every): (u64, u64),
    round: u64,
    rounds: u64,
) -> RoundEnd {
    let crossed = |every: u64| every > 0 && steps_now / every != steps_before / every;
    RoundEnd {
        evaluate: crossed(eval_every) && round < rounds,
        checkpoint: crossed(checkpoint_every),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_and_checkpoints_fall_where_their_step_counts_are_crossed() {
        let every = (100, 250);
        // Rounds of 30 steps: evaluate after steps 120, 210, 300; checkpoint after 270.
        let ends: Vec<(u64, RoundEnd)> = (1..=10u64)
            .map(|r| (r * 30, due((r - 1) * 30, r * 30, every, r, 10)))
            .filter(|(_, e)| *e != RoundEnd::default())
            .collect();
        let want = |evaluate, checkpoint| RoundEnd { evaluate, checkpoint };
        assert_eq!(
            ends,
            [(120, want(true, false)), (210, want(true, false)), (270, want(false, true))],
            "the last round (300 steps) is left to the final evaluation"
        );
    }

    #[test]
    fn zero_turns_either_off_and_a_round_of_no_steps_crosses_nothing() {
        assert_eq!(due(0, 500, (0, 0), 1, 9), RoundEnd::default());
        assert_eq!(due(100, 100, (100, 100), 1, 9), RoundEnd::default());
        assert_eq!(due(99, 100, (100, 100), 1, 9), RoundEnd { evaluate: true, checkpoint: true });
    }
}
