//! Held-out evaluation: loss and accuracy for classification, loss and
//! perplexity for text. Runs without gradients, in fixed order, so the
//! numbers depend only on the parameters.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::dataset::{ClassData, Dataset, TextData};
use super::model::Model;

/// Examples per forward pass when evaluating a classifier. Its activations
/// are what a node's memory peaks on: lenet holds about 150 KB per image
/// (two 16x28x28 maps and more), so 1000 images put 150 MB on top of a
/// node's 220 MB for the final evaluation; 64 (about a training batch) cost
/// 10 MB, which the training steps' freed activations already cover.
const EVAL_IMAGES: i64 = 64;
/// Tokens per forward pass when evaluating text (windows of context + 1).
const EVAL_TOKENS: i64 = 1000;
/// Cap on text windows evaluated (enough for a stable estimate, bounded time).
const MAX_TEXT_WINDOWS: usize = 4096;

/// Held-out metrics of one model.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct EvalMetrics {
    pub loss: f64,
    /// Fraction correct, for classification.
    pub accuracy: Option<f64>,
    /// exp(loss), for text.
    pub perplexity: Option<f64>,
    pub examples: usize,
}

impl std::fmt::Display for EvalMetrics {
    /// `held-out loss 0.1234, accuracy 97.10%` or `..., perplexity 4.56`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "held-out loss {:.4}", self.loss)?;
        if let Some(a) = self.accuracy {
            write!(f, ", accuracy {:.2}%", a * 100.0)?;
        }
        if let Some(p) = self.perplexity {
            write!(f, ", perplexity {p:.3}")?;
        }
        Ok(())
    }
}

/// A held-out set already on the model's device.
#[derive(Debug)]
pub enum EvalSet {
    Class {
        x: Tensor,
        y: Tensor,
    },
    /// Non-overlapping windows `[W, context + 1]`.
    Text {
        windows: Tensor,
    },
}

impl EvalSet {
    pub fn new(data: &Dataset, context: usize, device: Device) -> EvalSet {
        match data {
            Dataset::Class(c) => {
                let (x, y) = class_tensors(c, device);
                EvalSet::Class { x, y }
            }
            Dataset::Text(t) => EvalSet::Text { windows: text_windows(t, context, device) },
        }
    }

    pub fn evaluate(&self, model: &Model) -> EvalMetrics {
        tch::no_grad(|| match self {
            EvalSet::Class { x, y } => {
                let n = y.size()[0];
                let (mut loss, mut correct) = (0.0, 0i64);
                for start in (0..n).step_by(EVAL_IMAGES as usize) {
                    let len = EVAL_IMAGES.min(n - start);
                    let logits = model.forward(&x.narrow(0, start, len));
                    let yy = y.narrow(0, start, len);
                    loss += Model::loss(&logits, &yy).double_value(&[]) * len as f64;
                    correct +=
                        logits.argmax(-1, false).eq_tensor(&yy).sum(Kind::Int64).int64_value(&[]);
                }
                let n = n.max(1) as f64;
                EvalMetrics {
                    loss: loss / n,
                    accuracy: Some(correct as f64 / n),
                    perplexity: None,
                    examples: n as usize,
                }
            }
            EvalSet::Text { windows } => {
                let (w, len) = windows.size2().unwrap_or((0, 1));
                let chunk = (EVAL_TOKENS / len).max(1);
                let mut loss = 0.0;
                for start in (0..w).step_by(chunk as usize) {
                    let n = chunk.min(w - start);
                    let win = windows.narrow(0, start, n);
                    let logits = model.forward(&win.narrow(1, 0, len - 1));
                    loss += Model::loss(&logits, &win.narrow(1, 1, len - 1)).double_value(&[])
                        * n as f64;
                }
                let loss = loss / w.max(1) as f64;
                EvalMetrics {
                    loss,
                    accuracy: None,
                    perplexity: Some(loss.exp()),
                    examples: w as usize,
                }
            }
        })
    }
}

/// Features `[N, ...shape]` and labels `[N]` on `device`.
pub fn class_tensors(c: &ClassData, device: Device) -> (Tensor, Tensor) {
    let mut shape = vec![c.len() as i64];
    shape.extend(c.sample_shape.iter().map(|&d| d as i64));
    let x = Tensor::from_slice(&c.features).reshape(shape).to_device(device);
    let y = Tensor::from_slice(&c.labels).to_device(device);
    (x, y)
}

fn text_windows(t: &TextData, context: usize, device: Device) -> Tensor {
    let len = context + 1;
    let count = (t.tokens.len() / len).min(MAX_TEXT_WINDOWS);
    let tokens: Vec<i64> = t.tokens[..count * len].iter().map(|&v| v as i64).collect();
    Tensor::from_slice(&tokens).reshape([count as i64, len as i64]).to_device(device)
}
