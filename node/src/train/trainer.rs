//! One node's local training: its shard of the data as tensors, the model,
//! the optimizer and the step counter. `step()` runs one optimizer step;
//! everything about a step is a function of the config and the step number,
//! which is what makes a resumed run continue exactly.

use std::collections::VecDeque;

use tch::{Device, Kind, Tensor};

use super::batch::{EpochSampler, mix_seed, text_window_starts};
use super::checkpoint::{self, Checkpoint, CheckpointError, CheckpointMeta};
use super::config::TrainConfig;
use super::dataset::{Dataset, Split};
use super::device::DeviceError;
use super::eval::{EvalMetrics, EvalSet, class_tensors};
use super::model::{Model, ModelError, Task};
use super::optim::{OptimStateError, Optimizer};
use super::partition::{self, PartitionError};

/// How many recent step losses make up the reported train loss.
const RECENT_LOSSES: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Partition(#[from] PartitionError),
    #[error(
        "node {node} of {nodes} got an empty shard of {examples} examples; use fewer --nodes or another --partition"
    )]
    EmptyShard { node: usize, nodes: usize, examples: usize },
    #[error("training diverged: loss is {loss} at step {step}; lower --lr or set --clip-grad-norm")]
    NonFinite { step: u64, loss: f64 },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("checkpoint does not fit this model: {0}")]
    Restore(String),
    #[error(transparent)]
    OptimState(#[from] OptimStateError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The node's training shard on the model's device.
#[derive(Debug)]
enum TrainData {
    Class {
        x: Tensor,
        y: Tensor,
        sampler: EpochSampler,
        classes: i64,
    },
    Text {
        tokens: Tensor,
        len: usize,
        context: usize,
        seed: u64,
    },
    /// A data-less relay (`--relays`): no examples, and its steps change
    /// nothing, so it only mixes what its neighbours send.
    Relay,
}

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps completed, including this one.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

#[derive(Debug)]
pub struct Trainer {
    pub config: TrainConfig,
    pub model: Model,
    optimizer: Optimizer,
    data: TrainData,
    heldout: EvalSet,
    shard_examples: usize,
    step: u64,
    recent: VecDeque<f64>,
    /// Train on flipped labels (an injected fault): class c becomes C - 1 - c.
    label_flip: bool,
}

impl Trainer {
    /// Builds the model and this node's shard of `split.train`.
    pub fn new(config: TrainConfig, split: &Split) -> Result<Trainer, TrainError> {
        let device = config.device_spec().resolve()?;
        tch::set_num_threads(config.threads as i32);
        let node = config.node as usize;
        let sampler_seed = mix_seed(config.seed, node as u64 + 1);
        let task = match &split.train {
            Dataset::Class(c) => {
                Task::Classify { sample_shape: c.sample_shape.clone(), classes: c.num_classes }
            }
            Dataset::Text(t) => Task::NextChar { vocab: t.vocab.len() },
        };
        let (data, shard_examples) = match (&split.train, config.shard_of()) {
            (_, None) => (TrainData::Relay, 0),
            (Dataset::Class(c), Some((shard, shards))) => {
                let idx = partition::shard(
                    &c.labels,
                    c.num_classes,
                    &config.partition,
                    config.seed,
                    shard,
                    shards,
                )?;
                if idx.is_empty() {
                    return Err(TrainError::EmptyShard { node, nodes: shards, examples: c.len() });
                }
                let (x, y) = class_tensors(&c.select(&idx), device);
                let sampler = EpochSampler::new(idx.len(), config.batch_size, sampler_seed);
                let classes = c.num_classes as i64;
                (TrainData::Class { x, y, sampler, classes }, idx.len())
            }
            (Dataset::Text(t), Some((shard, shards))) => {
                partition::check_text_scheme(&config.partition)?;
                let range = partition::text_range(t.len(), shard, shards);
                let context = config.context();
                if range.len() < context + 2 {
                    return Err(TrainError::EmptyShard { node, nodes: shards, examples: t.len() });
                }
                let shard: Vec<i64> = t.tokens[range.clone()].iter().map(|&v| v as i64).collect();
                let tokens = Tensor::from_slice(&shard).to_device(device);
                let data =
                    TrainData::Text { tokens, len: range.len(), context, seed: sampler_seed };
                (data, range.len())
            }
        };
        let model = Model::build(&config.model, &task, device, config.seed)?;
        let optimizer = Optimizer::new(config.optimizer.clone(), model.variables());
        let heldout = EvalSet::new(&split.heldout, config.context(), device);
        Ok(Trainer {
            config,
            model,
            optimizer,
            data,
            heldout,
            shard_examples,
            step: 0,
            recent: VecDeque::new(),
            label_flip: false,
        })
    }

    /// Whether this trainer's data has labels (label-flip needs them).
    pub fn has_labels(&self) -> bool {
        matches!(self.data, TrainData::Class { .. })
    }

    /// Turns label flipping on or off for the steps that follow; a no-op
    /// for text, which has no labels.
    pub fn set_label_flip(&mut self, on: bool) {
        self.label_flip = on && self.has_labels();
    }

    /// Steps completed so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Examples one step trains on: the batch, or none for a relay.
    pub fn examples_per_step(&self) -> u64 {
        if matches!(self.data, TrainData::Relay) { 0 } else { self.config.batch_size as u64 }
    }

    /// Examples (or tokens, for text) in this node's shard.
    pub fn shard_examples(&self) -> usize {
        self.shard_examples
    }

    /// One optimizer step on the next batch.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let lr = self.config.schedule.lr_at(self.step);
        let Some((inputs, targets)) = self.batch() else {
            // A relay: counted, so that its step count keeps pace with its
            // neighbours'; it has no loss to report.
            self.step += 1;
            return Ok(StepReport { step: self.step, loss: f64::NAN, lr });
        };
        let loss = Model::loss(&self.model.forward(&inputs), &targets);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(TrainError::NonFinite { step: self.step, loss: value });
        }
        self.optimizer.zero_grad();
        loss.backward();
        if let Some(max) = self.config.clip_grad_norm {
            self.optimizer.clip_grad_norm(max);
        }
        self.optimizer.step(lr);
        self.step += 1;
        if self.recent.len() == RECENT_LOSSES {
            self.recent.pop_front();
        }
        self.recent.push_back(value);
        Ok(StepReport { step: self.step, loss: value, lr })
    }

    /// The next batch's inputs and targets; `None` for a relay.
    fn batch(&mut self) -> Option<(Tensor, Tensor)> {
        Some(match &mut self.data {
            TrainData::Class { x, y, sampler, classes } => {
                let idx: Vec<i64> = sampler.indices(self.step).iter().map(|&i| i as i64).collect();
                let idx = Tensor::from_slice(&idx).to_device(x.device());
                let labels = y.index_select(0, &idx);
                let labels = if self.label_flip { (labels * -1) + (*classes - 1) } else { labels };
                (x.index_select(0, &idx), labels)
            }
            TrainData::Text { tokens, len, context, seed } => {
                let starts: Vec<i64> =
                    text_window_starts(*len, *context, self.config.batch_size, *seed, self.step)
                        .into_iter()
                        .map(|s| s as i64)
                        .collect();
                let device = tokens.device();
                let offsets =
                    Tensor::arange(*context as i64 + 1, (Kind::Int64, device)).unsqueeze(0);
                let idx = Tensor::from_slice(&starts).to_device(device).unsqueeze(1) + offsets;
                let windows = tokens.take(&idx);
                let t = *context as i64;
                (windows.narrow(1, 0, t), windows.narrow(1, 1, t))
            }
            TrainData::Relay => return None,
        })
    }

    /// Replaces the model's parameters with `values` (layout order).
    pub fn set_flat(&mut self, values: &[f32]) -> Result<(), crate::params::ParamsError> {
        let p = crate::params::FlatParams {
            layout: self.model.layout().clone(),
            values: values.to_vec(),
        };
        self.model.set_params(&p)
    }

    /// Adds `delta` to the parameters (an overlapped mix's change), in the
    /// f32 additions the strategy makes to know the result.
    pub fn shift_flat(&mut self, delta: &[f32]) -> Result<(), crate::params::ParamsError> {
        let mut p = self.model.params()?;
        if p.values.len() != delta.len() {
            let (expected, got) = (p.values.len(), delta.len());
            return Err(crate::params::ParamsError::LengthMismatch { expected, got });
        }
        for (v, d) in p.values.iter_mut().zip(delta) {
            *v += d;
        }
        self.model.set_params(&p)
    }

    /// Metrics on the held-out set.
    pub fn evaluate(&self) -> EvalMetrics {
        self.heldout.evaluate(&self.model)
    }

    /// Mean of the recent step losses, if any step ran.
    pub fn train_loss(&self) -> Option<f64> {
        (!self.recent.is_empty())
            .then(|| self.recent.iter().sum::<f64>() / self.recent.len() as f64)
    }

    pub fn device(&self) -> Device {
        self.model.vs.device()
    }

    /// Writes a checkpoint of the current state; `options` are saved for
    /// `--resume`, and so is the mixing strategy's `state` when given.
    pub fn save_checkpoint(
        &self,
        dir: &std::path::Path,
        options: serde_json::Value,
        strategy: Option<&crate::mix::mixer::StrategyState>,
    ) -> Result<(), TrainError> {
        let tensors: Vec<(String, Tensor)> = strategy
            .map(|s| {
                s.parts.iter().map(|p| (p.name.clone(), Tensor::from_slice(&p.values))).collect()
            })
            .unwrap_or_default();
        let meta = CheckpointMeta {
            format: checkpoint::FORMAT,
            step: self.step,
            optimizer_steps: self.optimizer.steps(),
            fingerprint: self.model.layout().fingerprint.clone(),
            options,
            recent_losses: self.recent.iter().copied().collect(),
            strategy_round: strategy.map(|s| s.round),
            strategy_parts: strategy.map(|s| s.names()).unwrap_or_default(),
        };
        let (vars, optim) = (self.model.variables(), self.optimizer.state());
        Ok(checkpoint::save(dir, &meta, &vars, &optim, &tensors)?)
    }

    /// Continues from a checkpoint of the same model.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<(), TrainError> {
        let want = &self.model.layout().fingerprint;
        if &ck.meta.fingerprint != want {
            return Err(TrainError::Restore(format!(
                "saved fingerprint {}, this model has {want}",
                ck.meta.fingerprint
            )));
        }
        // The fingerprint in meta.json is the file's claim: every tensor is
        // checked against this model itself (name, shape, dtype, finite),
        // so a crafted `[1]` tensor cannot broadcast into a layer.
        let vars = self.model.variables();
        if ck.params.len() != vars.len() {
            return Err(TrainError::Restore(format!(
                "the checkpoint holds {} tensors, this model has {}",
                ck.params.len(),
                vars.len()
            )));
        }
        // All checked before any is copied: a refused checkpoint leaves the
        // model as it was.
        let mut pairs = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            let src = ck
                .params
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| TrainError::Restore(format!("no tensor {name:?}")))?;
            if src.size() != var.size() || src.kind() != var.kind() {
                return Err(TrainError::Restore(format!(
                    "tensor {name:?} is {:?} {:?}, this model's is {:?} {:?}",
                    src.kind(),
                    src.size(),
                    var.kind(),
                    var.size()
                )));
            }
            if !bool::try_from(src.f_isfinite()?.f_all()?)? {
                return Err(TrainError::Restore(format!(
                    "tensor {name:?} holds a non-finite value"
                )));
            }
            pairs.push((var, src));
        }
        tch::no_grad(|| -> Result<(), TrainError> {
            for (mut var, src) in pairs {
                var.f_copy_(src)?;
            }
            Ok(())
        })?;
        self.optimizer.load_state(&ck.optimizer, ck.meta.optimizer_steps)?;
        self.step = ck.meta.step;
        self.recent = ck.meta.recent_losses.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::train::config::TrainOptions;
    use crate::train::load;

    fn trainer() -> Trainer {
        let options = TrainOptions {
            hidden: Some("8".into()),
            steps: Some(2),
            threads: Some(1),
            device: Some("cpu".into()),
            ..TrainOptions::default()
        };
        let config = options.resolve().unwrap();
        let split = load::load(&config.data_spec(), config.holdout).unwrap();
        Trainer::new(config, &split).unwrap()
    }

    fn saved(t: &Trainer) -> (tempfile::TempDir, Checkpoint) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = checkpoint::dir_in(tmp.path());
        t.save_checkpoint(&dir, serde_json::json!({}), None).unwrap();
        let ck = checkpoint::load(&dir).unwrap();
        (tmp, ck)
    }

    fn params(t: &Trainer) -> Vec<f32> {
        t.model.params().unwrap().values
    }

    #[test]
    fn a_relay_holds_no_data_and_its_steps_change_nothing() {
        let options = TrainOptions {
            hidden: Some("8".into()),
            nodes: Some(3),
            node: Some(1),
            relays: Some(vec![1]),
            threads: Some(1),
            device: Some("cpu".into()),
            ..TrainOptions::default()
        };
        let config = options.resolve().unwrap();
        let split = load::load(&config.data_spec(), config.holdout).unwrap();
        let mut relay = Trainer::new(config.clone(), &split).unwrap();
        let before = params(&relay);
        let report = relay.step().unwrap();
        assert_eq!((report.step, relay.steps_done()), (1, 1));
        assert!(report.loss.is_nan(), "a relay has no loss: {}", report.loss);
        assert_eq!(params(&relay), before);
        assert_eq!((relay.shard_examples(), relay.examples_per_step()), (0, 0));
        assert_eq!(relay.train_loss(), None);
        // The two others split all the training data between them.
        let shard = |node| {
            let t = Trainer::new(TrainConfig { node, ..config.clone() }, &split).unwrap();
            t.shard_examples()
        };
        assert_eq!(shard(0) + shard(2), split.train.len());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A checkpoint whose tensor was swapped for any other shape, dtype
        /// or values either restores exactly (same shape and dtype, finite)
        /// or is refused with the model untouched: never broadcast, never a
        /// non-finite parameter.
        #[test]
        fn restore_takes_only_tensors_that_fit_this_model(
            which in 0usize..4,
            dims in proptest::collection::vec(1i64..12, 0..3),
            fill in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), -3.0f64..3.0],
            as_double in any::<bool>(),
            drop_one in any::<bool>(),
        ) {
            let mut t = trainer();
            let before = params(&t);
            let (_tmp, mut ck) = saved(&t);
            let i = which % ck.params.len();
            let kind = if as_double { tch::Kind::Double } else { tch::Kind::Float };
            let fits = !drop_one
                && dims == ck.params[i].1.size()
                && !as_double
                && fill.is_finite();
            let replacement = Tensor::full(dims.as_slice(), fill, (kind, tch::Device::Cpu));
            if drop_one {
                drop(ck.params.remove(i));
            } else {
                ck.params[i].1 = replacement;
            }
            let result = t.restore(&ck);
            let after = params(&t);
            prop_assert!(after.iter().all(|v| v.is_finite()));
            if fits {
                prop_assert!(result.is_ok(), "{result:?}");
            } else {
                prop_assert!(result.is_err(), "took a tensor that does not fit");
                prop_assert_eq!(&after, &before, "a refused restore changed the model");
            }
        }
    }
}
