//! How far a set of models is from agreeing: their coordinate-wise mean and
//! the consensus distance. Shared by the simulator and `murmur cluster`.

/// The coordinate-wise mean, in f64 (empty for no vectors).
pub fn mean(xs: &[&[f32]]) -> Vec<f64> {
    let Some(first) = xs.first() else { return Vec::new() };
    let mut acc = vec![0f64; first.len()];
    for x in xs {
        acc.iter_mut().zip(x.iter()).for_each(|(a, v)| *a += f64::from(*v));
    }
    acc.iter_mut().for_each(|a| *a /= xs.len() as f64);
    acc
}

/// `sqrt((1/n) sum_i ||x_i - x_bar||^2)`, in f64; 0 for no vectors.
pub fn consensus_distance(xs: &[&[f32]]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let m = mean(xs);
    let total: f64 = xs
        .iter()
        .map(|x| x.iter().zip(&m).map(|(v, c)| (f64::from(*v) - c).powi(2)).sum::<f64>())
        .sum();
    (total / xs.len() as f64).sqrt()
}
