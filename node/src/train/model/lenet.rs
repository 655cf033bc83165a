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

    /// The net on `xs` in whatever layout it comes.
    fn layers(&self, xs: &Tensor) -> Tensor {
        let h = self.conv1.forward(xs).relu().max_pool2d_default(2);
        let h = self.conv2.forward(&h).relu().max_pool2d_default(2);
        let h = self.fc1.forward(&h.flatten(1, -1)).relu();
        self.fc2.forward(&h)
    }
}

impl Module for Lenet {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.layers(&channels_last(xs))
    }
}

/// The same images laid out channels-last: shape `[N, C, H, W]`, memory
/// NHWC. libtorch's convolutions take their layout from the input's, and the
/// layers after the first keep it, so the whole net runs channels-last while
/// the weights, and with them the flat parameters, checkpoints and the wire,
/// stay in the default layout. The values are the same (to rounding), the
/// time less: 1,000 steps of batch 32 on MNIST, one thread, took 6.0 s of
/// `murmur train` against 7.4 s in the default layout (whole process,
/// medians of 6 paired runs), oneDNN's NHWC kernels being the faster.
fn channels_last(xs: &Tensor) -> Tensor {
    let size = xs.size();
    let &[_, c, h, w] = size.as_slice() else { return xs.shallow_clone() };
    let mut out = Tensor::empty_strided(&size, [h * w * c, 1, w * c, c], (xs.kind(), xs.device()));
    out.copy_(xs);
    out
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn the_channels_last_net_computes_what_the_default_layout_does() {
        for (c, side) in [(1, 28), (3, 32)] {
            tch::manual_seed(5);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Lenet::new(&vs.root(), &[c, side, side], 10).unwrap();
            let xs =
                Tensor::randn([4, c as i64, side as i64, side as i64], (Kind::Float, Device::Cpu));
            let laid = channels_last(&xs);
            let (s, ch) = (side as i64, c as i64);
            assert_eq!(laid.stride(), [s * s * ch, 1, s * ch, ch]);
            assert!(laid.equal(&xs), "the same values, laid out anew");

            // Forward and backward through both layouts: the same logits, and
            // the same gradients for the (default-layout) weights.
            let grads = |logits: Tensor| {
                vs.trainable_variables().iter_mut().for_each(Tensor::zero_grad);
                logits.sum(Kind::Float).backward();
                let mut g: Vec<_> = vs.variables().into_iter().collect();
                g.sort_by(|a, b| a.0.cmp(&b.0));
                (logits, g.into_iter().map(|(n, t)| (n, t.grad().copy())).collect::<Vec<_>>())
            };
            let (fast, fast_grads) = grads(net.forward(&xs));
            let (plain, plain_grads) = grads(net.layers(&xs));
            assert!(fast.allclose(&plain, 1e-5, 1e-5, false), "c={c}: logits differ");
            for ((name, a), (_, b)) in fast_grads.iter().zip(&plain_grads) {
                assert!(a.is_contiguous(), "{name}'s gradient keeps the weight's layout");
                assert!(a.allclose(b, 1e-4, 1e-5, false), "c={c}: {name}'s gradients differ");
            }
        }
    }
}
