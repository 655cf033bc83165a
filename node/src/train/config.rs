//! Training configuration: the options a user gives (TOML file, `MURMUR_*`
//! environment, flags) and the validated, resolved `TrainConfig` the trainer
//! runs with.
//!
//! `TrainOptions` has every field optional so that layers can be merged:
//! a resumed run's saved options, then the `--config` file, then flags and
//! environment. `resolve` fills defaults and checks everything once, with
//! errors that name the bad value.

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dataset::DataSpec;
use super::device::DeviceSpec;
use super::model::{CharGptSpec, ModelSpec};
use super::optim::OptimizerSpec;
use super::partition::Scheme;
use super::schedule::{Schedule, ScheduleKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mlp,
    Lenet,
    Chargpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adamw,
}

/// Training options as given; keys in a TOML file are the flag names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrainOptions {
    /// Network: mlp, lenet or chargpt [default: mlp for synthetic, lenet for mnist/cifar10, chargpt for text]
    #[arg(long, env = "MURMUR_MODEL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelKind>,
    /// mlp hidden layer sizes, comma separated [default: 128,128]
    #[arg(long, env = "MURMUR_HIDDEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden: Option<String>,
    /// chargpt: transformer blocks [default: 4]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_LAYERS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<i64>,
    /// chargpt: attention heads [default: 4]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_HEADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<i64>,
    /// chargpt: embedding width [default: 128]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_DIM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dim: Option<i64>,
    /// chargpt: context length in characters [default: 64]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_CONTEXT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<i64>,
    /// chargpt: use the token embedding as the output head [default: false]
    #[arg(long, env = "MURMUR_TIE_EMBEDDINGS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,

    /// Data: synthetic, mnist:DIR, cifar10:DIR or text:FILE [default: synthetic]
    #[arg(long, env = "MURMUR_DATA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Fraction held out when the files carry no test split [default: 0.2, text 0.1]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_HOLDOUT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout: Option<f64>,
    /// How examples are split among nodes: iid, dirichlet:ALPHA, classes:K [default: iid]
    #[arg(long, env = "MURMUR_PARTITION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Number of shards the data is split into [default: 1]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_NODES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<i64>,
    /// This node's shard, 0-based [default: 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_NODE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<i64>,
    /// Nodes that hold no data and take no local steps, only mix (data-less
    /// relays), comma separated; the data is split among the others. The
    /// same list on every node [default: none]
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true, env = "MURMUR_RELAYS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relays: Option<Vec<i64>>,

    /// Training steps in total (a resumed run continues up to this) [default: 1000]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_STEPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<i64>,
    /// Examples (or text windows) per step [default: 64]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_BATCH_SIZE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<i64>,
    /// sgd or adamw [default: adamw]
    #[arg(long, env = "MURMUR_OPTIMIZER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerKind>,
    /// Peak learning rate [default: adamw 1e-3, sgd 0.05]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_LR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// sgd momentum [default: 0.9]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_MOMENTUM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// sgd: Nesterov momentum [default: false]
    #[arg(long, env = "MURMUR_NESTEROV", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nesterov: Option<bool>,
    /// Weight decay (decoupled for adamw) [default: adamw 0.01, sgd 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_WEIGHT_DECAY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// adamw beta1 [default: 0.9]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_BETA1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// adamw beta2 [default: 0.999]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_BETA2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// adamw epsilon [default: 1e-8]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_EPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// Learning-rate schedule: constant or cosine [default: constant]
    #[arg(long, env = "MURMUR_SCHEDULE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleKind>,
    /// Linear warm-up steps [default: 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_WARMUP_STEPS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<i64>,
    /// Rate at the end of a cosine schedule [default: 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_MIN_LR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    /// Clip the global gradient norm to this; 0 turns clipping off [default: 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_CLIP_GRAD_NORM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,

    /// Seed for initial parameters, partitions and batch order [default: 0]
    #[arg(long, env = "MURMUR_SEED")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// auto, cpu or cuda:N [default: auto]
    #[arg(long, env = "MURMUR_DEVICE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// libtorch intra-op threads [default: all cores]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_THREADS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<i64>,
    /// Evaluate on held-out data every N steps; 0 = only at the end [default: steps/5]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_EVAL_EVERY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<i64>,
    /// Print a progress line every N steps when not on a terminal [default: steps/20]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_LOG_EVERY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_every: Option<i64>,
    /// Write a checkpoint every N steps; one is always written at the end [default: 0]
    #[arg(long, allow_negative_numbers = true, env = "MURMUR_CHECKPOINT_EVERY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<i64>,
}

/// An option that is out of range or cannot be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

impl TrainOptions {
    /// Reads a TOML file of options.
    pub fn from_toml_file(path: &Path) -> Result<TrainOptions, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read --config {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            let msg = e.message().to_string();
            bad(format!("--config {}: {msg}", path.display()))
        })
    }

    /// `self` with every option that `over` sets replaced by `over`'s value.
    pub fn overridden_by(&self, over: &TrainOptions) -> TrainOptions {
        overlay(self, over)
    }

    /// Fills defaults and validates everything.
    pub fn resolve(&self) -> Result<TrainConfig, ConfigError> {
        let data: DataSpec =
            self.data.as_deref().unwrap_or("synthetic").parse().map_err(|e| bad(format!("{e}")))?;
        let model = self.model_spec(&data)?;
        let steps = positive("--steps", self.steps.unwrap_or(1000))?;
        let batch_size = positive("--batch-size", self.batch_size.unwrap_or(64))? as usize;
        let nodes = positive("--nodes", self.nodes.unwrap_or(1))? as usize;
        let node = self.node.unwrap_or(0);
        if node < 0 || node as usize >= nodes {
            return Err(bad(format!(
                "--node must be in 0..{nodes} for --nodes {nodes} (got {node})"
            )));
        }
        let relays = self.relays(nodes)?;
        let partition: Scheme =
            self.partition.as_deref().unwrap_or("iid").parse().map_err(|e| bad(format!("{e}")))?;
        if let Some(h) = self.holdout.filter(|h| !(*h > 0.0 && *h < 1.0)) {
            return Err(bad(format!("--holdout must be in (0, 1) (got {h})")));
        }
        let device: DeviceSpec =
            self.device.as_deref().unwrap_or("auto").parse().map_err(|e| bad(format!("{e}")))?;
        let threads = match self.threads {
            Some(t) => positive("--threads", t)? as usize,
            None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        };
        let clip = self.clip_grad_norm.unwrap_or(0.0);
        if !(clip >= 0.0 && clip.is_finite()) {
            return Err(bad(format!("--clip-grad-norm must be >= 0 (got {clip})")));
        }
        let every = |flag: &str, v: Option<i64>, default: u64| match v {
            Some(v) if v < 0 => Err(bad(format!("{flag} must be >= 0 (got {v})"))),
            Some(v) => Ok(v as u64),
            None => Ok(default),
        };
        Ok(TrainConfig {
            model,
            data: data.to_string(),
            holdout: self.holdout,
            partition,
            nodes,
            node,
            relays,
            steps,
            batch_size,
            optimizer: self.optimizer_spec()?,
            schedule: self.schedule(steps)?,
            clip_grad_norm: (clip > 0.0).then_some(clip),
            seed: self.seed.unwrap_or(0),
            device: device.to_string(),
            threads,
            eval_every: every("--eval-every", self.eval_every, (steps / 5).max(1))?,
            log_every: every("--log-every", self.log_every, (steps / 20).max(1))?,
            checkpoint_every: every("--checkpoint-every", self.checkpoint_every, 0)?,
        })
    }

    fn model_spec(&self, data: &DataSpec) -> Result<ModelSpec, ConfigError> {
        let kind = self.model.unwrap_or(match data {
            DataSpec::Text(_) => ModelKind::Chargpt,
            DataSpec::Mnist(_) | DataSpec::Cifar10(_) => ModelKind::Lenet,
            DataSpec::Synthetic => ModelKind::Mlp,
        });
        Ok(match kind {
            ModelKind::Mlp => {
                ModelSpec::Mlp { hidden: parse_sizes(self.hidden.as_deref().unwrap_or("128,128"))? }
            }
            ModelKind::Lenet => ModelSpec::Lenet,
            ModelKind::Chargpt => {
                let spec = CharGptSpec {
                    layers: positive("--layers", self.layers.unwrap_or(4))? as usize,
                    heads: positive("--heads", self.heads.unwrap_or(4))? as usize,
                    dim: positive("--dim", self.dim.unwrap_or(128))? as usize,
                    context: positive("--context", self.context.unwrap_or(64))? as usize,
                    tie_embeddings: self.tie_embeddings.unwrap_or(false),
                };
                ModelSpec::Chargpt(spec)
            }
        })
    }

    /// The relays, checked: each a node of the run, at least one node
    /// left to hold the data.
    fn relays(&self, nodes: usize) -> Result<BTreeSet<usize>, ConfigError> {
        let mut relays = BTreeSet::new();
        for &r in self.relays.iter().flatten() {
            if r < 0 || r as usize >= nodes {
                return Err(bad(format!(
                    "--relays names node {r}, which is not in 0..{nodes} for --nodes {nodes}"
                )));
            }
            if !relays.insert(r as usize) {
                return Err(bad(format!("--relays names node {r} twice")));
            }
        }
        if relays.len() == nodes {
            return Err(bad(format!(
                "--relays names all {nodes} nodes; at least one must hold the data"
            )));
        }
        Ok(relays)
    }

    fn optimizer_spec(&self) -> Result<OptimizerSpec, ConfigError> {
        // An option of the other optimizer would be ignored without a word:
        // `momentum = 0.9` under the default adamw once left a shipped
        // config training with Adam at an SGD learning rate.
        let kind = self.optimizer.unwrap_or(OptimizerKind::Adamw);
        let foreign: &[(&str, bool)] = match kind {
            OptimizerKind::Adamw => {
                &[("--momentum", self.momentum.is_some()), ("--nesterov", self.nesterov.is_some())]
            }
            OptimizerKind::Sgd => &[
                ("--beta1", self.beta1.is_some()),
                ("--beta2", self.beta2.is_some()),
                ("--eps", self.eps.is_some()),
            ],
        };
        if let Some((flag, _)) = foreign.iter().find(|(_, set)| *set) {
            let (other, this) = match (kind, self.optimizer.is_none()) {
                (OptimizerKind::Adamw, true) => ("sgd", "adamw (the default)"),
                (OptimizerKind::Adamw, false) => ("sgd", "adamw"),
                (OptimizerKind::Sgd, _) => ("adamw", "sgd"),
            };
            return Err(bad(format!(
                "{flag} is an option of --optimizer {other}, and the optimizer is {this}; set --optimizer {other} or drop {flag}"
            )));
        }
        let wd_default = match kind {
            OptimizerKind::Adamw => 0.01,
            OptimizerKind::Sgd => 0.0,
        };
        let weight_decay = non_negative("--weight-decay", self.weight_decay.unwrap_or(wd_default))?;
        Ok(match kind {
            OptimizerKind::Sgd => OptimizerSpec::Sgd {
                momentum: unit("--momentum", self.momentum.unwrap_or(0.9))?,
                nesterov: self.nesterov.unwrap_or(false),
                weight_decay,
            },
            OptimizerKind::Adamw => OptimizerSpec::Adamw {
                beta1: unit("--beta1", self.beta1.unwrap_or(0.9))?,
                beta2: unit("--beta2", self.beta2.unwrap_or(0.999))?,
                eps: {
                    let eps = self.eps.unwrap_or(1e-8);
                    if !(eps > 0.0 && eps.is_finite()) {
                        return Err(bad(format!("--eps must be > 0 (got {eps})")));
                    }
                    eps
                },
                weight_decay,
            },
        })
    }

    fn schedule(&self, steps: u64) -> Result<Schedule, ConfigError> {
        let lr_default = match self.optimizer.unwrap_or(OptimizerKind::Adamw) {
            OptimizerKind::Adamw => 1e-3,
            OptimizerKind::Sgd => 0.05,
        };
        let lr = self.lr.unwrap_or(lr_default);
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(bad(format!("--lr must be > 0 (got {lr})")));
        }
        let min_lr = non_negative("--min-lr", self.min_lr.unwrap_or(0.0))?;
        let warmup = self.warmup_steps.unwrap_or(0);
        if warmup < 0 {
            return Err(bad(format!("--warmup-steps must be >= 0 (got {warmup})")));
        }
        Ok(Schedule {
            kind: self.schedule.unwrap_or(ScheduleKind::Constant),
            lr,
            warmup_steps: warmup as u64,
            min_lr,
            total_steps: steps,
        })
    }
}

/// Layers two option sets of the same type: every field `over` sets wins.
/// Works through the serde form, where an unset field is an absent key.
pub fn overlay<T: Serialize + serde::de::DeserializeOwned + Clone>(base: &T, over: &T) -> T {
    let mut merged = serde_json::to_value(base).unwrap_or_default();
    if let (Some(m), Ok(serde_json::Value::Object(o))) =
        (merged.as_object_mut(), serde_json::to_value(over))
    {
        m.extend(o);
    }
    serde_json::from_value(merged).unwrap_or_else(|_| over.clone())
}

/// Splits a TOML table into the keys `T` knows and the rest.
pub fn split_known<T: serde::de::DeserializeOwned>(
    table: toml::Table,
) -> (toml::Table, toml::Table) {
    table.into_iter().partition(|(k, v)| {
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        // A key T does not know fails as an unknown field; a known key with a
        // bad value also fails, so tell the two apart by the message.
        match one.try_into::<T>() {
            Ok(_) => true,
            Err(e) => !e.to_string().contains("unknown field"),
        }
    })
}

/// `v` as a count that must be at least 1, or an error naming `flag`.
pub(crate) fn positive(flag: &str, v: i64) -> Result<u64, ConfigError> {
    if v <= 0 {
        return Err(bad(format!("{flag} must be >= 1 (got {v})")));
    }
    Ok(v as u64)
}

fn non_negative(flag: &str, v: f64) -> Result<f64, ConfigError> {
    if !(v >= 0.0 && v.is_finite()) {
        return Err(bad(format!("{flag} must be >= 0 (got {v})")));
    }
    Ok(v)
}

fn unit(flag: &str, v: f64) -> Result<f64, ConfigError> {
    if !(0.0..1.0).contains(&v) {
        return Err(bad(format!("{flag} must be in [0, 1) (got {v})")));
    }
    Ok(v)
}

fn parse_sizes(s: &str) -> Result<Vec<usize>, ConfigError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| match p.trim().parse::<i64>() {
            Ok(v) if v >= 1 => Ok(v as usize),
            _ => Err(bad(format!("--hidden takes sizes >= 1 separated by commas (got {s:?})"))),
        })
        .collect()
}

/// A validated training configuration; recorded in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub model: ModelSpec,
    pub data: String,
    pub holdout: Option<f64>,
    pub partition: Scheme,
    pub nodes: usize,
    pub node: i64,
    /// Data-less nodes: no shard, no local steps (see `shard_of`).
    pub relays: BTreeSet<usize>,
    pub steps: u64,
    pub batch_size: usize,
    pub optimizer: OptimizerSpec,
    pub schedule: Schedule,
    pub clip_grad_norm: Option<f64>,
    pub seed: u64,
    pub device: String,
    pub threads: usize,
    pub eval_every: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
}

impl TrainConfig {
    /// Whether this node is a data-less relay.
    pub fn is_relay(&self) -> bool {
        self.relays.contains(&(self.node as usize))
    }

    /// This node's shard and the number of shards: the data is split among
    /// the nodes that are not relays, in index order. `None` for a relay.
    pub fn shard_of(&self) -> Option<(usize, usize)> {
        let node = self.node as usize;
        if self.is_relay() {
            return None;
        }
        let below = self.relays.range(..node).count();
        Some((node - below, self.nodes - self.relays.len()))
    }

    pub fn data_spec(&self) -> DataSpec {
        self.data.parse().unwrap_or(DataSpec::Synthetic)
    }

    pub fn device_spec(&self) -> DeviceSpec {
        self.device.parse().unwrap_or(DeviceSpec::Cpu)
    }

    /// Context length for text models (0 for classifiers).
    pub fn context(&self) -> usize {
        match &self.model {
            ModelSpec::Chargpt(s) => s.context,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(toml: &str) -> TrainOptions {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn defaults_resolve() {
        let c = TrainOptions::default().resolve().unwrap();
        assert_eq!(c.model, ModelSpec::Mlp { hidden: vec![128, 128] });
        assert_eq!(c.steps, 1000);
        assert_eq!(c.eval_every, 200);
        assert!(matches!(c.optimizer, OptimizerSpec::Adamw { .. }));
    }

    #[test]
    fn flags_override_file() {
        let file = opts("steps = 10\nlr = 0.5\nbatch-size = 8");
        let flags = TrainOptions { steps: Some(20), ..Default::default() };
        let merged = file.overridden_by(&flags);
        assert_eq!(merged.steps, Some(20));
        assert_eq!(merged.lr, Some(0.5));
        assert_eq!(merged.batch_size, Some(8));
    }

    #[test]
    fn relays_take_no_shard_and_the_others_split_the_data() {
        let cfg =
            |node| opts(&format!("nodes = 5\nnode = {node}\nrelays = [1, 3]")).resolve().unwrap();
        let shards: Vec<_> = (0..5).map(|i| cfg(i).shard_of()).collect();
        assert_eq!(shards, [Some((0, 3)), None, Some((1, 3)), None, Some((2, 3))]);
        assert!(cfg(3).is_relay() && !cfg(4).is_relay());
        assert_eq!(opts("nodes = 2\nnode = 1").resolve().unwrap().shard_of(), Some((1, 2)));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        assert!(
            toml::from_str::<TrainOptions>("stepz = 3").unwrap_err().to_string().contains("stepz")
        );
        let cases = [
            ("steps = 0", "--steps must be >= 1 (got 0)"),
            ("batch-size = -4", "--batch-size must be >= 1 (got -4)"),
            ("lr = -1.0", "--lr must be > 0 (got -1)"),
            ("holdout = 1.5", "--holdout must be in (0, 1) (got 1.5)"),
            ("partition = \"dirichlet:0\"", "0"),
            ("data = \"imagenet:/x\"", "imagenet"),
            ("device = \"tpu\"", "tpu"),
            ("hidden = \"64,0\"", "64,0"),
            ("nodes = 2\nnode = 2", "--node must be in 0..2 for --nodes 2 (got 2)"),
            (
                "nodes = 4\nrelays = [1, 4]",
                "--relays names node 4, which is not in 0..4 for --nodes 4",
            ),
            ("nodes = 4\nrelays = [1, 1]", "--relays names node 1 twice"),
            (
                "nodes = 2\nrelays = [0, 1]",
                "--relays names all 2 nodes; at least one must hold the data",
            ),
            (
                "momentum = 0.9",
                "--momentum is an option of --optimizer sgd, and the optimizer is adamw (the default)",
            ),
            (
                "optimizer = \"adamw\"\nnesterov = true",
                "--nesterov is an option of --optimizer sgd, and the optimizer is adamw;",
            ),
            (
                "optimizer = \"sgd\"\nbeta2 = 0.99",
                "--beta2 is an option of --optimizer adamw, and the optimizer is sgd",
            ),
        ];
        for (toml, want) in cases {
            let err = opts(toml).resolve().unwrap_err().to_string();
            assert!(err.contains(want), "{toml:?}: {err}");
        }
    }
}
