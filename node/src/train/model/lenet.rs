//! A LeNet-style conv net: two 5x5 conv + max-pool stages, then two fully
//! connected layers. Works for any `[C, H, W]` input with H, W >= 12
//! (MNIST 1x28x28, CIFAR-10 3x32x32).

use tch::Tensor;
use tch::nn::{self, Module};

use super::{ModelError, linear};

const C1: i64 = 16;
const C2: i64 = 32;
const FC: i64 = 128;

#[derive(Debug)]
pub(super) struct Lenet {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Lenet {
    pub(super) fn new(p: &nn::Path, shape: &[usize], classes: usize) -> Result<Lenet, ModelError> {
        let &[c, h, w] = shape else {
            return Err(ModelError::Mismatch {
                model: "lenet",
                needs: "image examples of shape [C, H, W]",
                got: format!("examples of shape {shape:?}"),
            });
        };
        if h < 12 || w < 12 {
            return Err(ModelError::Mismatch {
                model: "lenet",
                needs: "images at least 12x12",
                got: format!("{h}x{w}"),
            });
        }
        // conv1 keeps the size (padding 2), pool halves; conv2 loses 4, pool halves.
        let (h2, w2) = (((h / 2) - 4) / 2, ((w / 2) - 4) / 2);
        let pad = nn::ConvConfig { padding: 2, ..Default::default() };
        Ok(Lenet {
            conv1: nn::conv2d(p / "conv1", c as i64, C1, 5, pad),
            conv2: nn::conv2d(p / "conv2", C1, C2, 5, Default::default()),
            fc1: linear(p, "fc1", C2 * (h2 * w2) as i64, FC, true),
            fc2: linear(p, "fc2", FC, classes as i64, true),
        })
    }
}

impl Module for Lenet {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.conv1.forward(xs).relu().max_pool2d_default(2);
        let h = self.conv2.forward(&h).relu().max_pool2d_default(2);
        let h = self.fc1.forward(&h.flatten(1, -1)).relu();
        self.fc2.forward(&h)
    }
}
