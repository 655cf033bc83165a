//! The model zoo: networks selected by name, built on a `tch::nn::VarStore`.
//!
//! A model owns its variables and knows its task (classification or
//! next-character prediction); the trainer only calls `forward` and `loss`.
//! Initial values come from the run seed so that every node of a run starts
//! from the same parameters and their models stay mergeable.

mod chargpt;
mod lenet;
mod mlp;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

use crate::params::{FlatParams, ParamLayout, ParamsError};

pub use chargpt::CharGptSpec;

/// Which network to build, with its sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum ModelSpec {
    /// Fully connected ReLU network over flattened inputs.
    Mlp { hidden: Vec<usize> },
    /// A LeNet-style conv net for small images (`[C, H, W]`, H and W >= 12).
    Lenet,
    /// A small causal transformer over characters.
    Chargpt(CharGptSpec),
}

/// What the data asks of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Inputs of `sample_shape`, one label of `classes` per example.
    Classify { sample_shape: Vec<usize>, classes: usize },
    /// Token ids below `vocab`; predict the next one.
    NextChar { vocab: usize },
}

/// A model that does not fit the data, or sizes that make no sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("model {model} needs {needs} (got {got})")]
    Mismatch { model: &'static str, needs: &'static str, got: String },
    #[error("{0}")]
    BadSize(String),
}

/// A built network, its variables and the layout of its flat parameters.
#[derive(Debug)]
pub struct Model {
    pub spec: ModelSpec,
    pub task: Task,
    pub vs: VarStore,
    net: Box<dyn Module>,
    layout: Arc<ParamLayout>,
}

impl Model {
    /// Builds `spec` for `task` on `device`, initialised from `seed`.
    pub fn build(
        spec: &ModelSpec,
        task: &Task,
        device: Device,
        seed: u64,
    ) -> Result<Model, ModelError> {
        // libtorch's generator is global: two models built at once on two
        // threads (tests, the simulator) would draw from each other's seed.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = INIT.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(seed as i64);
        let vs = VarStore::new(device);
        let root = vs.root();
        let net: Box<dyn Module> = match (spec, task) {
            (ModelSpec::Mlp { hidden }, Task::Classify { sample_shape, classes }) => {
                let input = sample_shape.iter().product();
                Box::new(mlp::Mlp::new(&root, input, hidden, *classes)?)
            }
            (ModelSpec::Lenet, Task::Classify { sample_shape, classes }) => {
                Box::new(lenet::Lenet::new(&root, sample_shape, *classes)?)
            }
            (ModelSpec::Chargpt(s), Task::NextChar { vocab }) => {
                Box::new(chargpt::CharGpt::new(&root, s, *vocab)?)
            }
            (ModelSpec::Chargpt(_), Task::Classify { sample_shape, .. }) => {
                return Err(ModelError::Mismatch {
                    model: "chargpt",
                    needs: "text data (--data text:FILE)",
                    got: format!("examples of shape {sample_shape:?}"),
                });
            }
            (s, Task::NextChar { .. }) => {
                return Err(ModelError::Mismatch {
                    model: s.name(),
                    needs: "labelled examples (synthetic, mnist or cifar10)",
                    got: "text".into(),
                });
            }
        };
        let layout = Arc::new(ParamLayout::of(&spec.arch(task), &vs));
        Ok(Model { spec: spec.clone(), task: task.clone(), vs, net, layout })
    }

    /// Logits: `[B, classes]` for classification, `[B, T, vocab]` for text.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.net.forward(xs)
    }

    /// Mean cross-entropy of `logits` against `targets` (flattened for text).
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        let classes = logits.size().last().copied().unwrap_or(1);
        logits.reshape([-1, classes]).cross_entropy_for_logits(&targets.reshape([-1]))
    }

    pub fn layout(&self) -> &Arc<ParamLayout> {
        &self.layout
    }

    /// Trainable variables in layout (name-sorted) order.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let vars = self.vs.variables();
        self.layout
            .entries
            .iter()
            .filter_map(|e| vars.get(&e.name).map(|t| (e.name.clone(), t.shallow_clone())))
            .collect()
    }

    pub fn params(&self) -> Result<FlatParams, ParamsError> {
        FlatParams::from_var_store(self.layout.clone(), &self.vs)
    }

    pub fn set_params(&self, p: &FlatParams) -> Result<(), ParamsError> {
        p.write_to(&self.vs)
    }

    pub fn num_params(&self) -> usize {
        self.layout.total
    }

    /// Input dtype expected by `forward`.
    pub fn input_kind(&self) -> Kind {
        match self.task {
            Task::Classify { .. } => Kind::Float,
            Task::NextChar { .. } => Kind::Int64,
        }
    }
}

impl ModelSpec {
    pub fn name(&self) -> &'static str {
        match self {
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Lenet => "lenet",
            ModelSpec::Chargpt(_) => "chargpt",
        }
    }

    /// The architecture string hashed into the fingerprint.
    fn arch(&self, task: &Task) -> String {
        format!("{}:{:?}:{:?}", self.name(), self, task)
    }
}

/// `nn::Path` helper: a linear layer under `name`.
fn linear(p: &nn::Path, name: &str, i: i64, o: i64, bias: bool) -> nn::Linear {
    let cfg = nn::LinearConfig { bias, ..Default::default() };
    nn::linear(p / name, i, o, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(shape: &[usize]) -> Task {
        Task::Classify { sample_shape: shape.to_vec(), classes: 10 }
    }

    #[test]
    fn shapes_of_each_model() {
        let m =
            Model::build(&ModelSpec::Mlp { hidden: vec![16, 8] }, &classify(&[32]), Device::Cpu, 1)
                .unwrap();
        assert_eq!(m.forward(&Tensor::zeros([5, 32], (Kind::Float, Device::Cpu))).size(), [5, 10]);
        assert_eq!(m.num_params(), 32 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10);
        let l = Model::build(&ModelSpec::Lenet, &classify(&[1, 28, 28]), Device::Cpu, 1).unwrap();
        assert_eq!(
            l.forward(&Tensor::zeros([3, 1, 28, 28], (Kind::Float, Device::Cpu))).size(),
            [3, 10]
        );
        let c = Model::build(&ModelSpec::Lenet, &classify(&[3, 32, 32]), Device::Cpu, 1).unwrap();
        assert_eq!(
            c.forward(&Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu))).size(),
            [2, 10]
        );
        let spec = CharGptSpec { layers: 2, heads: 2, dim: 16, context: 8, tie_embeddings: true };
        let g =
            Model::build(&ModelSpec::Chargpt(spec), &Task::NextChar { vocab: 11 }, Device::Cpu, 1)
                .unwrap();
        let toks = Tensor::zeros([4, 8], (Kind::Int64, Device::Cpu));
        assert_eq!(g.forward(&toks).size(), [4, 8, 11]);
    }

    #[test]
    fn same_seed_same_init_and_fingerprint() {
        let spec = ModelSpec::Mlp { hidden: vec![8] };
        let a = Model::build(&spec, &classify(&[4]), Device::Cpu, 7).unwrap();
        let b = Model::build(&spec, &classify(&[4]), Device::Cpu, 7).unwrap();
        let c = Model::build(&spec, &classify(&[4]), Device::Cpu, 8).unwrap();
        assert_eq!(a.params().unwrap().values, b.params().unwrap().values);
        assert_ne!(a.params().unwrap().values, c.params().unwrap().values);
        assert_eq!(a.layout().fingerprint, c.layout().fingerprint);
    }

    #[test]
    fn mismatched_data_is_refused() {
        let err = Model::build(&ModelSpec::Lenet, &classify(&[32]), Device::Cpu, 1).unwrap_err();
        assert!(err.to_string().contains("lenet"), "{err}");
        let spec = CharGptSpec { layers: 1, heads: 1, dim: 8, context: 4, tie_embeddings: false };
        let err =
            Model::build(&ModelSpec::Chargpt(spec), &classify(&[32]), Device::Cpu, 1).unwrap_err();
        assert!(err.to_string().contains("text"), "{err}");
    }

    #[test]
    fn causal_model_ignores_the_future() {
        let spec = CharGptSpec { layers: 2, heads: 2, dim: 16, context: 6, tie_embeddings: false };
        let g =
            Model::build(&ModelSpec::Chargpt(spec), &Task::NextChar { vocab: 9 }, Device::Cpu, 3)
                .unwrap();
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).reshape([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 8, 8, 8]).reshape([1, 6]);
        let la = g.forward(&a).narrow(1, 0, 3);
        let lb = g.forward(&b).narrow(1, 0, 3);
        assert!(la.allclose(&lb, 1e-6, 1e-6, false));
        let late_a = g.forward(&a).narrow(1, 3, 1);
        let late_b = g.forward(&b).narrow(1, 3, 1);
        assert!(!late_a.allclose(&late_b, 1e-6, 1e-6, false));
    }
}
