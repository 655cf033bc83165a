//! A fully connected ReLU network over flattened inputs.

use tch::Tensor;
use tch::nn::{self, Module};

use super::{ModelError, linear};

#[derive(Debug)]
pub(super) struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    pub(super) fn new(
        p: &nn::Path,
        input: usize,
        hidden: &[usize],
        classes: usize,
    ) -> Result<Mlp, ModelError> {
        if let Some(zero) = hidden.iter().position(|&h| h == 0) {
            return Err(ModelError::BadSize(format!(
                "--hidden sizes must be >= 1 (got 0 at position {zero})"
            )));
        }
        let mut sizes = vec![input];
        sizes.extend_from_slice(hidden);
        sizes.push(classes);
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear(p, &format!("fc{i}"), w[0] as i64, w[1] as i64, true))
            .collect();
        Ok(Mlp { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = xs.flatten(1, -1);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h);
            if i < last {
                h = h.relu();
            }
        }
        h
    }
}
