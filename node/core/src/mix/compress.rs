//! Compression of a pseudo-gradient before it is sharded, with error
//! feedback: what a lossy encoding leaves out of one exchange is added to
//! the next, so the sum of what a node sends over many exchanges tracks the
//! sum of its updates however coarse each one is.
//!
//! The vector is compressed range by range as an all-reduce cuts it into
//! shards, so that what this module returns is exactly what the wire carries
//! (int8's blocks start at each shard's first element, as the wire's do;
//! top-k keeps each shard's share of the K largest entries): a receiver
//! decodes the same values, bit for bit, and the residual is the true
//! error. The range this node owns is compressed too, though it does not
//! travel as a shard: it goes into the owner's average, which travels, and
//! a dense own range would make every top-k average dense.
//!
//! Pure: values in, values out. It owns no wire format (that is
//! `net::encoding`) and no all-reduce (that is `allreduce`).

use std::ops::Range;

use crate::net::encoding::{self, Encoding};

/// A lossy encoding and the residual it has left so far.
#[derive(Debug, Clone)]
pub struct Compressor {
    encoding: Encoding,
    residual: Vec<f32>,
}

impl Compressor {
    pub fn new(encoding: Encoding) -> Compressor {
        Compressor { encoding, residual: Vec::new() }
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// What has been left out so far (empty before the first call).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Returns `values + residual` as the wire will carry it in each of
    /// `ranges`, and keeps what that left out as the new residual. Top-k's
    /// K is for a vector of `total` elements; each range keeps its share of
    /// it. A vector of another length than the last starts from a zero
    /// residual.
    pub fn compress(&mut self, values: &[f32], ranges: &[Range<usize>], total: usize) -> Vec<f32> {
        if self.encoding == Encoding::F32 {
            return values.to_vec();
        }
        if self.residual.len() != values.len() {
            self.residual = vec![0.0; values.len()];
        }
        let mut target: Vec<f32> = values.iter().zip(&self.residual).map(|(v, r)| v + r).collect();
        for range in ranges.iter().filter(|r| !r.is_empty()) {
            let slice = &mut target[range.clone()];
            let sent = match self.encoding {
                Encoding::TopK { k } => top_k_share(slice, k, total),
                lossy => encoding::round_trip(slice, lossy),
            };
            slice.copy_from_slice(&sent);
        }
        // residual = (values + residual) - sent
        for ((r, v), s) in self.residual.iter_mut().zip(values).zip(&target) {
            *r = (*r + v) - s;
        }
        target
    }
}

/// `slice` with all but its share of the `k` largest magnitudes (of a
/// vector of `total` elements) set to zero: round(k * len / total), at
/// least 1. Ties go to the lower index, as the wire's top-k does.
fn top_k_share(slice: &[f32], k: u32, total: usize) -> Vec<f32> {
    let share = (f64::from(k) * slice.len() as f64 / total.max(1) as f64).round() as usize;
    let share = share.clamp(1, slice.len());
    let mut order: Vec<usize> = (0..slice.len()).collect();
    order.sort_by(|&a, &b| slice[b].abs().total_cmp(&slice[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; slice.len()];
    for &i in &order[..share] {
        out[i] = slice[i];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(len: usize, n: usize) -> Vec<Range<usize>> {
        (0..n).map(|j| super::super::allreduce::shard(len, n, j)).collect()
    }

    #[test]
    fn f32_is_the_identity_and_keeps_no_residual() {
        let mut c = Compressor::new(Encoding::F32);
        let v = vec![1.5, -2.25, 3.0];
        assert_eq!(c.compress(&v, &ranges(3, 2), 3), v);
        assert!(c.residual().is_empty());
    }

    #[test]
    fn what_is_sent_survives_the_wire_bit_for_bit_and_the_residual_is_the_error() {
        let v: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.173).collect();
        for enc in ["bf16", "f16", "int8:8", "topk:6"] {
            let enc: Encoding = enc.parse().unwrap();
            let mut c = Compressor::new(enc);
            let rs = ranges(40, 3);
            let sent = c.compress(&v, &rs, 40);
            for (j, r) in rs.iter().enumerate() {
                let slice = &sent[r.clone()];
                let wire = match enc {
                    Encoding::TopK { .. } => {
                        let nz = slice.iter().filter(|x| **x != 0.0).count() as u32;
                        assert_eq!(nz, 2, "{enc} range {j}: its share of 6 over 3 ranges");
                        Encoding::TopK { k: nz }
                    }
                    other => other,
                };
                let back = encoding::round_trip(slice, wire);
                assert_eq!(back, slice, "{enc} range {j}: the wire changes nothing");
            }
            for k in 0..40 {
                let err = v[k] - sent[k];
                assert!((c.residual()[k] - err).abs() < 1e-6, "{enc} [{k}]");
            }
        }
    }

    #[test]
    fn error_feedback_sends_in_sum_what_was_given_in_sum() {
        // Top-1 of 8 with a constant input: without feedback element 0
        // would be sent every time and the others never.
        let v = vec![1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3];
        let mut c = Compressor::new(Encoding::TopK { k: 1 });
        let rs = ranges(8, 1);
        let mut sent_sum = [0.0f32; 8];
        let rounds = 200;
        for _ in 0..rounds {
            let s = c.compress(&v, &rs, 8);
            sent_sum.iter_mut().zip(&s).for_each(|(a, b)| *a += b);
        }
        for k in 0..8 {
            let given = v[k] * rounds as f32;
            // What was given minus what was sent is the residual: bounded.
            assert!((given - sent_sum[k] - c.residual()[k]).abs() < 1e-3, "[{k}]");
            assert!(c.residual()[k].abs() < 8.0, "[{k}] residual {}", c.residual()[k]);
            assert!(sent_sum[k] > 0.5 * given, "[{k}] sent {} of {given}", sent_sum[k]);
        }
    }
}
