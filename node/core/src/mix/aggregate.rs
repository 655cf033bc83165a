//! Aggregation: how a node combines its own vector with the vectors its peers
//! sent. `Aggregator::Mean` is the weighted mean that plain gossip uses; the
//! robust ones (coordinate-wise median, trimmed mean, Krum) bound how far a
//! few Byzantine or broken peers can move the result. `NormBound` is a sanity
//! filter that refuses a peer's vector before any aggregator sees it.
//!
//! Everything here is a pure function of its arguments: no strategy state and
//! no counters (the caller counts what it refuses). Sums and distances
//! accumulate in f64. Values are expected finite (the wire refuses NaN and
//! Inf), but one that slips through never panics: ordering uses `total_cmp`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Added to `beta * m` before flooring, so that a product that should be a
/// whole number but falls just short of it (0.29 * 100 = 28.999999999999996)
/// still trims that many.
const TRIM_EPSILON: f64 = 1e-9;

/// How own + received vectors become one; parsed from and shown as the
/// CLI/config string.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Aggregator {
    /// `mean`: sum_k w_k x_k / sum_k w_k over own + others (gossip's
    /// renormalised Metropolis-Hastings mean). One peer can move it anywhere.
    #[default]
    Mean,
    /// `median`: per coordinate, the median of the m values of own + others,
    /// unweighted; for even m, the mean of the two middle values.
    Median,
    /// `trimmed-mean:BETA`: per coordinate, drop the k = floor(BETA * m)
    /// smallest and the k largest of the m values and average the m - 2k
    /// left, unweighted (Yin et al. 2018). BETA in [0, 0.5), so at least one
    /// value is always left.
    TrimmedMean { beta: f64 },
    /// `krum:F` (Blanchard et al. 2017): the vector among own + others whose
    /// squared distances to its m - F - 2 nearest others sum least, returned
    /// as is (plain Krum, not the mean of the best few); ties go to own, then
    /// to the earlier other. It tolerates F Byzantine vectors when
    /// m >= 2F + 3. With m - F - 2 < 1 there is nothing to score a vector by,
    /// and it falls back to the coordinate-wise median.
    Krum { f: usize },
}

/// Why an aggregator spec or a norm bound was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("unknown aggregator {0:?} (expected mean, median, trimmed-mean:BETA or krum:F)")]
    Unknown(String),
    #[error("aggregator {0:?}: trimmed-mean needs BETA in [0, 0.5), as in trimmed-mean:0.2")]
    Beta(String),
    #[error(
        "aggregator {0:?}: krum needs F >= 0, a whole number of Byzantine peers to tolerate, as in krum:2"
    )]
    Krum(String),
    #[error("the norm bound must be a finite number >= 0, 0 to disable (got {0})")]
    NormBound(String),
}

impl Aggregator {
    /// Whether this is the plain (weighted, non-robust) mean.
    pub fn is_mean(&self) -> bool {
        matches!(self, Aggregator::Mean)
    }

    /// Combines `own` (with weight `own_weight`) and `others` (vector,
    /// weight). Only `Mean` uses the weights; the robust aggregators count
    /// vectors, since their guarantees are about how many vectors are bad,
    /// and a topology weight says nothing about trust. A vector whose length
    /// is not `own.len()` is ignored. With no usable weight (`Mean` whose
    /// weights sum to <= 0) the result is `own`.
    pub fn aggregate(&self, own: &[f32], own_weight: f64, others: &[(&[f32], f64)]) -> Vec<f32> {
        let others: Vec<(&[f32], f64)> =
            others.iter().copied().filter(|(v, _)| v.len() == own.len()).collect();
        match *self {
            Aggregator::Mean => weighted_mean(own, own_weight, &others),
            Aggregator::Median => per_coordinate(own, &others, median_of_sorted),
            Aggregator::TrimmedMean { beta } => {
                let k = trim_count(beta, others.len() + 1);
                per_coordinate(own, &others, |s| mean_of(&s[k..s.len() - k]))
            }
            Aggregator::Krum { f } => krum(own, &others, f),
        }
    }
}

fn weighted_mean(own: &[f32], own_weight: f64, others: &[(&[f32], f64)]) -> Vec<f32> {
    let total = own_weight + others.iter().map(|(_, w)| w).sum::<f64>();
    if total.is_nan() || total <= 0.0 {
        return own.to_vec();
    }
    (0..own.len())
        .map(|i| {
            let sum = others
                .iter()
                .fold(own_weight * f64::from(own[i]), |s, (v, w)| s + w * f64::from(v[i]));
            (sum / total) as f32
        })
        .collect()
}

/// For each coordinate, `reduce` of the sorted values of own + others there.
fn per_coordinate(
    own: &[f32],
    others: &[(&[f32], f64)],
    reduce: impl Fn(&[f32]) -> f64,
) -> Vec<f32> {
    let mut column = Vec::with_capacity(others.len() + 1);
    (0..own.len())
        .map(|i| {
            column.clear();
            column.push(own[i]);
            column.extend(others.iter().map(|(v, _)| v[i]));
            column.sort_unstable_by(f32::total_cmp);
            reduce(&column) as f32
        })
        .collect()
}

/// The median of sorted, non-empty `s`; for even length, the mean of the two
/// middle values.
fn median_of_sorted(s: &[f32]) -> f64 {
    let m = s.len();
    if m % 2 == 1 {
        f64::from(s[m / 2])
    } else {
        (f64::from(s[m / 2 - 1]) + f64::from(s[m / 2])) / 2.0
    }
}

fn mean_of(s: &[f32]) -> f64 {
    s.iter().map(|&v| f64::from(v)).sum::<f64>() / s.len() as f64
}

/// Values trimmed from each end of `m`: floor(beta * m), never so many that
/// nothing is left (an out-of-range beta cannot panic here).
fn trim_count(beta: f64, m: usize) -> usize {
    let k = (beta * m as f64 + TRIM_EPSILON).floor();
    // `as` saturates: a negative or NaN product gives 0.
    (k as usize).min(m.saturating_sub(1) / 2)
}

fn krum(own: &[f32], others: &[(&[f32], f64)], f: usize) -> Vec<f32> {
    let all: Vec<&[f32]> = std::iter::once(own).chain(others.iter().map(|(v, _)| *v)).collect();
    let m = all.len();
    let Some(nearest) = m.checked_sub(f.saturating_add(2)).filter(|&k| k >= 1) else {
        return per_coordinate(own, others, median_of_sorted);
    };
    let mut d2 = vec![vec![0f64; m]; m];
    for a in 0..m {
        for b in a + 1..m {
            let d = squared_distance(all[a], all[b]);
            d2[a][b] = d;
            d2[b][a] = d;
        }
    }
    let score = |a: usize| {
        let mut row: Vec<f64> = (0..m).filter(|&b| b != a).map(|b| d2[a][b]).collect();
        row.sort_unstable_by(f64::total_cmp);
        row[..nearest].iter().sum::<f64>()
    };
    // `min_by` keeps the first of equal minima: own wins ties.
    let best = (0..m).map(|a| (a, score(a))).min_by(|x, y| x.1.total_cmp(&y.1)).map_or(0, |b| b.0);
    all[best].to_vec()
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum()
}

/// Euclidean distance, accumulated in f64.
pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    squared_distance(a, b).sqrt()
}

impl FromStr for Aggregator {
    type Err = AggregateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once(':') {
            None if s == "mean" => Ok(Aggregator::Mean),
            None if s == "median" => Ok(Aggregator::Median),
            None if s == "trimmed-mean" => Err(AggregateError::Beta(s.to_string())),
            None if s == "krum" => Err(AggregateError::Krum(s.to_string())),
            Some(("trimmed-mean", beta)) => beta
                .parse::<f64>()
                .ok()
                .filter(|b| (0.0..0.5).contains(b))
                .map(|beta| Aggregator::TrimmedMean { beta })
                .ok_or_else(|| AggregateError::Beta(s.to_string())),
            Some(("krum", f)) => f
                .parse::<usize>()
                .map(|f| Aggregator::Krum { f })
                .map_err(|_| AggregateError::Krum(s.to_string())),
            _ => Err(AggregateError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Aggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregator::Mean => f.write_str("mean"),
            Aggregator::Median => f.write_str("median"),
            Aggregator::TrimmedMean { beta } => write!(f, "trimmed-mean:{beta}"),
            Aggregator::Krum { f: byzantine } => write!(f, "krum:{byzantine}"),
        }
    }
}

impl TryFrom<String> for Aggregator {
    type Error = AggregateError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Aggregator> for String {
    fn from(a: Aggregator) -> String {
        a.to_string()
    }
}

/// Refuses a peer's vector whose distance to the node's own exceeds `factor`
/// times the node's own update norm (how far its own vector moved since its
/// last mix): an honest neighbour that started from the same place and
/// trained on similar data should not be much farther away than that. A
/// factor of 0 disables the bound.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NormBound {
    factor: f64,
}

impl NormBound {
    /// Fails unless `factor` is finite and >= 0.
    pub fn new(factor: f64) -> Result<NormBound, AggregateError> {
        if factor.is_finite() && factor >= 0.0 {
            Ok(NormBound { factor })
        } else {
            Err(AggregateError::NormBound(factor.to_string()))
        }
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }

    pub fn is_enabled(&self) -> bool {
        self.factor > 0.0
    }

    /// Whether `other` may be aggregated with `own`: always when disabled,
    /// else when ||other - own|| <= factor * `own_update_norm`. A distance
    /// that is not a number (a NaN that slipped through) is refused.
    pub fn admits(&self, own: &[f32], other: &[f32], own_update_norm: f64) -> bool {
        !self.is_enabled() || l2_distance(own, other) <= self.factor * own_update_norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(a: &str) -> Aggregator {
        a.parse().unwrap()
    }

    /// Unweighted: every vector with weight 1.
    fn run(a: &str, own: &[f32], others: &[Vec<f32>]) -> Vec<f32> {
        let others: Vec<(&[f32], f64)> = others.iter().map(|v| (v.as_slice(), 1.0)).collect();
        agg(a).aggregate(own, 1.0, &others)
    }

    fn dist(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (f64::from(*x) - y).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn mean_is_the_renormalised_weighted_mean() {
        let others: [(&[f32], f64); 2] = [(&[3.0, -2.0], 0.25), (&[5.0, 10.0], 0.25)];
        // (0.5 * 1 + 0.25 * 3 + 0.25 * 5) / 1, (0.5 * 2 - 0.25 * 2 + 0.25 * 10) / 1.
        assert_eq!(Aggregator::Mean.aggregate(&[1.0, 2.0], 0.5, &others), vec![2.5, 3.0]);
        // Weights summing to 2/3 (a missing neighbour): (0 + 3) / 2.
        let w = 1.0 / 3.0;
        assert_eq!(Aggregator::Mean.aggregate(&[0.0], w, &[(&[3.0], w)]), vec![1.5]);
        // (1 * 1 + 3 * 5) / 4.
        assert_eq!(Aggregator::Mean.aggregate(&[1.0], 1.0, &[(&[5.0], 3.0)]), vec![4.0]);
        // Nothing to weigh: own as it is.
        assert_eq!(Aggregator::Mean.aggregate(&[7.0], 0.0, &[]), vec![7.0]);
    }

    #[test]
    fn median_per_coordinate_odd_and_even() {
        let own = [1.0, 5.0, -1.0];
        let three = vec![vec![2.0, 0.0, 7.0], vec![9.0, 3.0, 3.0]];
        // {1, 2, 9}, {0, 3, 5}, {-1, 3, 7}.
        assert_eq!(run("median", &own, &three), vec![2.0, 3.0, 3.0]);
        let mut four = three.clone();
        four.push(vec![4.0, 10.0, -3.0]);
        // {1, 2, 4, 9} -> (2 + 4) / 2, {0, 3, 5, 10} -> 4, {-3, -1, 3, 7} -> 1.
        assert_eq!(run("median", &own, &four), vec![3.0, 4.0, 1.0]);
        // Weights do not matter to the median.
        let heavy: [(&[f32], f64); 2] = [(&[2.0], 100.0), (&[9.0], 100.0)];
        assert_eq!(Aggregator::Median.aggregate(&[1.0], 0.01, &heavy), vec![2.0]);
    }

    #[test]
    fn trimmed_mean_drops_floor_beta_m_from_each_end() {
        let own = [1.0];
        let others = vec![vec![2.0], vec![4.0], vec![9.0]];
        // m = 4, k = floor(0.25 * 4) = 1: drops 1 and 9, (2 + 4) / 2.
        assert_eq!(run("trimmed-mean:0.25", &own, &others), vec![3.0]);
        // k = floor(0.2 * 4) = 0: the plain mean, 16 / 4.
        assert_eq!(run("trimmed-mean:0.2", &own, &others), vec![4.0]);
        // m = 5, k = floor(0.2 * 5) = 1: drops 1 and 100, (2 + 4 + 9) / 3.
        let five = vec![vec![2.0], vec![4.0], vec![9.0], vec![100.0]];
        assert_eq!(run("trimmed-mean:0.2", &own, &five), vec![5.0]);
        assert_eq!(trim_count(0.29, 100), 29, "0.29 * 100 is 28.999999999999996 in f64");
        assert_eq!(trim_count(0.49, 2), 0);
        // Out-of-range betas (only constructible directly) leave a value.
        assert_eq!((trim_count(0.9, 4), trim_count(-1.0, 4), trim_count(f64::NAN, 4)), (1, 0, 0));
    }

    /// Six honest vectors around `base` (offsets within ±0.25) and two
    /// Byzantine ones made by `attack`.
    fn byzantine_case(attack: impl Fn(&[f32]) -> Vec<f32>) -> (Vec<Vec<f32>>, Vec<f64>, f64) {
        let base = [1.0f32, -2.0, 3.0, 0.5];
        let honest: Vec<Vec<f32>> = (0..6)
            .map(|k| (0..4).map(|i| base[i] + 0.1 * (((k * (i + 1)) % 6) as f32 - 2.5)).collect())
            .collect();
        let mean: Vec<f64> =
            (0..4).map(|i| honest.iter().map(|h| f64::from(h[i])).sum::<f64>() / 6.0).collect();
        let spread = honest.iter().map(|h| dist(h, &mean)).fold(0.0, f64::max);
        let mut all = honest.clone();
        all.push(attack(&honest[0]));
        all.push(attack(&honest[1]));
        (all, mean, spread)
    }

    #[test]
    fn two_byzantine_of_eight_move_the_mean_but_not_the_robust_aggregators() {
        // The mean's distance from the honest mean must exceed the third
        // number (measured 10.2, 1.86, 5e29); the robust ones stay within
        // the honest spread, 0.41 (measured median 0.23, trimmed mean 0.19,
        // krum 0.25, for every attack).
        type Attack = fn(&[f32]) -> Vec<f32>;
        let attacks: [(&str, Attack, f64); 3] = [
            ("scaled by -10", |h| h.iter().map(|v| -10.0 * v).collect(), 5.0),
            ("sign-flipped", |h| h.iter().map(|v| -v).collect(), 1.5),
            ("huge", |h| vec![1e30; h.len()], 1e29),
        ];
        for (name, attack, mean_moves) in attacks {
            let (all, honest_mean, spread) = byzantine_case(attack);
            // Own is honest vector 2: the attackers are others 5 and 6.
            let own = all[2].clone();
            let others: Vec<Vec<f32>> =
                all.iter().enumerate().filter(|(k, _)| *k != 2).map(|(_, v)| v.clone()).collect();
            let d = |a: &str| dist(&run(a, &own, &others), &honest_mean);
            assert!(d("mean") > mean_moves, "{name}: mean moved only {}", d("mean"));
            for robust in ["median", "trimmed-mean:0.25", "krum:2"] {
                assert!(
                    d(robust) <= spread,
                    "{name}: {robust} is {} from the honest mean, beyond the honest spread {spread}",
                    d(robust)
                );
            }
            let chosen = run("krum:2", &own, &others);
            assert!(all[..6].contains(&chosen), "{name}: krum chose {chosen:?}");
        }
    }

    #[test]
    fn krum_scores_by_the_nearest_m_minus_f_minus_2() {
        // m = 4, f = 1: one neighbour each. 0 and 0.5 score 0.25, 10 and
        // 10.4 score 0.16: krum picks 10, the first of the tied pair. (With
        // f = 1 it assumes one attacker, so a pair of outliers looks honest.)
        let pair = vec![vec![0.5], vec![10.0], vec![10.4]];
        assert_eq!(run("krum:1", &[0.0], &pair), vec![10.0]);
        // m = 5, f = 1: two neighbours each. 0: 0.01 + 1, 1: 0.81 + 1,
        // 0.1: 0.01 + 0.81, 10: 0.16 + 81, 10.4: 0.16 + 88.36.
        let cluster = vec![vec![1.0], vec![0.1], vec![10.0], vec![10.4]];
        assert_eq!(run("krum:1", &[0.0], &cluster), vec![0.1]);
        // m = 3, f = 1: 3 - 1 - 2 = 0 neighbours, so the median.
        assert_eq!(run("krum:1", &[0.0], &[vec![5.0], vec![100.0]]), vec![5.0]);
        // Ties go to own.
        assert_eq!(run("krum:0", &[1.0], &[vec![1.0], vec![1.0]]), vec![1.0]);
    }

    #[test]
    fn nothing_panics_on_nan_or_a_wrong_length() {
        let others = vec![vec![f32::NAN, 1.0], vec![2.0, 3.0], vec![4.0]];
        for a in ["mean", "median", "trimmed-mean:0.3", "krum:0", "krum:5"] {
            let out = run(a, &[0.0, 0.0], &others);
            assert_eq!(out.len(), 2, "{a}");
        }
        // The short vector is ignored: the median of {0, 1, 3} is 1.
        assert_eq!(run("median", &[0.0, 0.0], &others)[1], 1.0);
    }

    #[test]
    fn the_norm_bound_refuses_the_outlier() {
        let b = NormBound::new(2.0).unwrap();
        let own = [0.0, 0.0];
        assert!(b.admits(&own, &[1.0, 1.0], 1.0), "distance 1.41 <= 2");
        assert!(b.admits(&own, &[2.0, 0.0], 1.0), "distance exactly 2");
        assert!(!b.admits(&own, &[3.0, 0.0], 1.0), "distance 3 > 2");
        assert!(!b.admits(&own, &[f32::NAN, 0.0], 1.0));
        assert!(!b.admits(&own, &[1e-3, 0.0], 0.0), "a node that did not move admits no change");
        let off = NormBound::new(0.0).unwrap();
        assert!(!off.is_enabled() && off.admits(&own, &[1e30, 0.0], 0.0));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(NormBound::new(bad).unwrap_err().to_string().contains(&bad.to_string()));
        }
    }

    #[test]
    fn specs_round_trip_and_bad_ones_name_the_value() {
        for (s, a) in [
            ("mean", Aggregator::Mean),
            ("median", Aggregator::Median),
            ("trimmed-mean:0.2", Aggregator::TrimmedMean { beta: 0.2 }),
            ("trimmed-mean:0", Aggregator::TrimmedMean { beta: 0.0 }),
            ("krum:2", Aggregator::Krum { f: 2 }),
            ("krum:0", Aggregator::Krum { f: 0 }),
        ] {
            assert_eq!(agg(s), a);
            assert_eq!(a.to_string(), s);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Aggregator>(&json).unwrap(), a);
        }
        assert_eq!(Aggregator::default(), Aggregator::Mean);
        for bad in [
            "average",
            "median:3",
            "trimmed-mean",
            "trimmed-mean:0.5",
            "trimmed-mean:-0.1",
            "trimmed-mean:NaN",
            "trimmed-mean:x",
            "krum",
            "krum:-1",
            "krum:1.5",
        ] {
            let e = bad.parse::<Aggregator>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<Aggregator>("\"krum:x\"").is_err());
    }
}
