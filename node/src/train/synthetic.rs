//! The built-in classification task, generated in code so that a run needs no
//! files: `--data synthetic`.
//!
//! Each class is a union of clusters that come in antipodal pairs (`+c` and
//! `-c`) in an informative subspace, so every class has mean zero and no linear
//! rule (softmax regression, nearest class mean) does much better than chance,
//! while a small MLP separates the clusters easily. The remaining features are
//! pure noise. Generation uses ChaCha8 so that every node and platform derives
//! the same examples from the same seed; this module owns nothing else.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::dataset::ClassData;

/// The seed `--data synthetic` uses.
pub const DEFAULT_SEED: u64 = 0x6d75_726d_7572; // "murmur"
/// The number of examples `--data synthetic` generates.
pub const DEFAULT_SAMPLES: usize = 10_000;
/// Features per example.
pub const FEATURES: usize = 32;
/// Number of classes.
pub const CLASSES: usize = 10;

/// Dimensions that carry the clusters; the rest are noise.
const INFORMATIVE: usize = 16;
/// Antipodal cluster pairs per class: 8 clusters per class, 80 in all.
const PAIRS: usize = 4;
/// Standard deviation of the cluster centres; clusters have unit variance.
const SPREAD: f64 = 1.6;

/// `samples` examples of the synthetic task, in a shuffled order (so the last
/// part is a fair held-out set), labels balanced to within one per class,
/// features standardised to zero mean and unit variance over the whole set.
pub fn generate(seed: u64, samples: usize) -> ClassData {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<f64> = (0..CLASSES * PAIRS * INFORMATIVE)
        .map(|_| SPREAD * rng.sample::<f64, _>(StandardNormal))
        .collect();
    let mut labels: Vec<i64> = (0..samples).map(|i| (i % CLASSES) as i64).collect();
    labels.shuffle(&mut rng);

    let mut features = Vec::with_capacity(samples * FEATURES);
    for &label in &labels {
        let cluster = label as usize * PAIRS + rng.random_range(0..PAIRS);
        let centre = &centres[cluster * INFORMATIVE..(cluster + 1) * INFORMATIVE];
        let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
        for d in 0..FEATURES {
            let noise: f64 = rng.sample(StandardNormal);
            let offset = centre.get(d).map_or(0.0, |c| sign * c);
            features.push((offset + noise) as f32);
        }
    }
    standardise(&mut features, FEATURES);
    ClassData { features, sample_shape: vec![FEATURES], labels, num_classes: CLASSES }
}

/// Scales each of the `width` columns of the row-major `values` to zero mean
/// and unit variance (columns with no variance are only centred).
fn standardise(values: &mut [f32], width: usize) {
    let rows = values.len() / width;
    if rows == 0 {
        return;
    }
    for col in 0..width {
        let column = || values.iter().skip(col).step_by(width).map(|&v| f64::from(v));
        let mean = column().sum::<f64>() / rows as f64;
        let var = column().map(|v| (v - mean) * (v - mean)).sum::<f64>() / rows as f64;
        let scale = if var > 0.0 { 1.0 / var.sqrt() } else { 1.0 };
        for v in values.iter_mut().skip(col).step_by(width) {
            *v = ((f64::from(*v) - mean) * scale) as f32;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Held-out accuracy of `predict` on the last `test` examples, given the rest.
    fn heldout_accuracy(
        data: &ClassData,
        test: usize,
        predict: impl Fn(&ClassData, &[f32]) -> i64,
    ) -> f64 {
        let (train, held) = data.clone().split_at(data.len() - test);
        let correct = (0..held.len())
            .filter(|&i| {
                predict(&train, &held.features[i * FEATURES..(i + 1) * FEATURES]) == held.labels[i]
            })
            .count();
        correct as f64 / test as f64
    }

    fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
    }

    #[test]
    fn same_seed_same_data_other_seed_other_data() {
        let a = generate(7, 500);
        assert_eq!(a, generate(7, 500));
        let b = generate(8, 500);
        assert_ne!(a.features, b.features);
        assert_ne!(a.labels, b.labels);
        assert_eq!(a.sample_shape, vec![FEATURES]);
        assert_eq!(a.features.len(), 500 * FEATURES);
        assert!(generate(1, 0).is_empty());
    }

    #[test]
    fn labels_in_range_balanced_and_shuffled() {
        let d = generate(DEFAULT_SEED, DEFAULT_SAMPLES);
        let mut counts = [0usize; CLASSES];
        for &l in &d.labels {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == DEFAULT_SAMPLES / CLASSES), "{counts:?}");
        // The held-out tail must see every class in fair measure too.
        let mut tail = [0usize; CLASSES];
        for &l in &d.labels[8000..] {
            tail[l as usize] += 1;
        }
        assert!(tail.iter().all(|&c| (150..=250).contains(&c)), "{tail:?}");
    }

    #[test]
    fn features_are_standardised() {
        let d = generate(DEFAULT_SEED, 4000);
        for col in 0..FEATURES {
            let v: Vec<f64> =
                d.features.iter().skip(col).step_by(FEATURES).map(|&x| f64::from(x)).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            assert!(
                mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
                "column {col}: mean {mean} var {var}"
            );
        }
    }

    /// The task must defeat a linear rule (nearest class mean) and yield to a
    /// non-linear one (k nearest neighbours), on the default data's held-out tail.
    #[test]
    fn nearest_mean_fails_where_nearest_neighbours_succeed() {
        let d = generate(DEFAULT_SEED, DEFAULT_SAMPLES);
        let nearest_mean = heldout_accuracy(&d, 2000, |train, x| {
            let mut sums = vec![0f32; CLASSES * FEATURES];
            let mut counts = [0f32; CLASSES];
            for (i, &l) in train.labels.iter().enumerate() {
                let l = l as usize;
                counts[l] += 1.0;
                for f in 0..FEATURES {
                    sums[l * FEATURES + f] += train.features[i * FEATURES + f];
                }
            }
            let means: Vec<f32> =
                sums.iter().enumerate().map(|(j, s)| s / counts[j / FEATURES]).collect();
            (0..CLASSES)
                .min_by(|&a, &b| {
                    let da = sq_dist(x, &means[a * FEATURES..(a + 1) * FEATURES]);
                    let db = sq_dist(x, &means[b * FEATURES..(b + 1) * FEATURES]);
                    da.total_cmp(&db)
                })
                .unwrap() as i64
        });
        let knn = heldout_accuracy(&d, 2000, |train, x| {
            let mut dists: Vec<(f32, i64)> = (0..train.len())
                .map(|i| {
                    (sq_dist(x, &train.features[i * FEATURES..(i + 1) * FEATURES]), train.labels[i])
                })
                .collect();
            dists.select_nth_unstable_by(5, |a, b| a.0.total_cmp(&b.0));
            let mut votes = [0usize; CLASSES];
            for &(_, l) in &dists[..5] {
                votes[l as usize] += 1;
            }
            (0..CLASSES).max_by_key(|&c| votes[c]).unwrap() as i64
        });
        eprintln!("nearest class mean {nearest_mean:.3}, 5-NN {knn:.3}");
        assert!(nearest_mean < 0.3, "nearest class mean scored {nearest_mean}");
        assert!(knn > 0.85, "5-NN scored {knn}");
    }
}
