//! Which examples make up training step `s`: a pure function of the sampler
//! seed and `s`, so that a run resumed at step `s` sees exactly the batches an
//! uninterrupted run would have seen.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mixes two numbers into one seed (splitmix64 finaliser).
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Epoch-wise shuffling without replacement over `n` examples.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    n: usize,
    batch: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl EpochSampler {
    /// `batch` is capped at `n`; the last incomplete batch of an epoch is dropped.
    pub fn new(n: usize, batch: usize, seed: u64) -> EpochSampler {
        EpochSampler { n, batch: batch.min(n).max(1), seed, cached: None }
    }

    pub fn batches_per_epoch(&self) -> u64 {
        (self.n / self.batch).max(1) as u64
    }

    /// The example indices of step `step`.
    pub fn indices(&mut self, step: u64) -> &[usize] {
        let epoch = step / self.batches_per_epoch();
        let pos = (step % self.batches_per_epoch()) as usize;
        if self.cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(self.seed, epoch)));
            self.cached = Some((epoch, order));
        }
        let order = self.cached.as_ref().map(|(_, o)| o.as_slice()).unwrap_or(&[]);
        &order[pos * self.batch..((pos + 1) * self.batch).min(order.len())]
    }
}

/// Random windows of `context + 1` tokens from a stream of `len` tokens.
pub fn text_window_starts(
    len: usize,
    context: usize,
    batch: usize,
    seed: u64,
    step: u64,
) -> Vec<usize> {
    let span = len.saturating_sub(context + 1) + 1;
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, step));
    (0..batch).map(|_| rng.random_range(0..span)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cover_every_example_once() {
        let mut s = EpochSampler::new(10, 3, 5);
        assert_eq!(s.batches_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|k| s.indices(k).to_vec()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        let first = s.indices(0).to_vec();
        assert_ne!(first, s.indices(3).to_vec(), "a new epoch reshuffles");
    }

    #[test]
    fn step_batches_do_not_depend_on_history() {
        let mut a = EpochSampler::new(100, 8, 1);
        let mut b = EpochSampler::new(100, 8, 1);
        let late = a.indices(57).to_vec();
        for k in 0..57 {
            b.indices(k);
        }
        assert_eq!(late, b.indices(57));
        assert_eq!(text_window_starts(100, 10, 4, 2, 9), text_window_starts(100, 10, 4, 2, 9));
        assert!(text_window_starts(100, 10, 50, 2, 9).iter().all(|&s| s + 11 <= 100));
    }
}
