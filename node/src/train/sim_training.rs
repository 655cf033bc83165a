//! Real models for the simulator: one `Trainer` per simulated node, each on
//! its own shard, all in this process. It is the simulator's `LocalUpdate`
//! when `murmur sim` is given a model or data; the strategies and the
//! simulator themselves never see libtorch.

use std::fmt;

use crate::mix::sim::{LocalUpdate, SimError};
use crate::params::FlatParams;
use crate::train::config::TrainConfig;
use crate::train::dataset::Split;
use crate::train::model::ModelSpec;
use crate::train::trainer::{TrainError, Trainer};

/// Real models: one `Trainer` per node on its own shard, all in this process.
#[derive(Debug)]
pub struct TorchTraining {
    trainers: Vec<Trainer>,
}

impl TorchTraining {
    /// One trainer per shard `0..base.nodes` of `split` (`base.node` is
    /// ignored). All start from the same initial parameters (`base.seed`).
    pub fn new(base: &TrainConfig, split: &Split) -> Result<TorchTraining, TrainError> {
        let trainers = (0..base.nodes)
            .map(|i| Trainer::new(TrainConfig { node: i as i64, ..base.clone() }, split))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TorchTraining { trainers })
    }

    /// The model's layers as ranges of the flat vector (streaming DiLoCo
    /// deals them to fragments).
    pub fn layers(&self) -> Vec<std::ops::Range<usize>> {
        self.trainers.first().map(|t| t.model.layout().layers()).unwrap_or_default()
    }

    /// The common initial parameters (node 0's; every node's are the same).
    pub fn initial_params(&self) -> Result<Vec<f32>, SimError> {
        let t = self.trainers.first().ok_or(SimError::NoNodes)?;
        Ok(t.model.params().map_err(|e| local(0, e))?.values)
    }

    fn load(&mut self, node: usize, params: &[f32]) -> Result<&mut Trainer, SimError> {
        let nodes = self.trainers.len();
        let t = self.trainers.get_mut(node).ok_or_else(|| {
            local(node, format!("no trainer for node {node} (there are {nodes})"))
        })?;
        let flat = FlatParams { layout: t.model.layout().clone(), values: params.to_vec() };
        t.model.set_params(&flat).map_err(|e| local(node, e))?;
        Ok(t)
    }
}

fn local(node: usize, e: impl fmt::Display) -> SimError {
    SimError::Local { node, reason: e.to_string() }
}

impl LocalUpdate for TorchTraining {
    fn train(&mut self, node: usize, params: &mut [f32], steps: u64) -> Result<u64, SimError> {
        let t = self.load(node, params)?;
        for _ in 0..steps {
            t.step().map_err(|e| local(node, e))?;
        }
        let trained = t.model.params().map_err(|e| local(node, e))?;
        params.copy_from_slice(&trained.values);
        Ok(steps * t.examples_per_step())
    }

    fn evaluate(&mut self, node: usize, params: &[f32]) -> Result<Option<f64>, SimError> {
        let m = self.load(node, params)?.evaluate();
        Ok(m.accuracy.or(m.perplexity))
    }

    fn metric_name(&self) -> &'static str {
        match self.trainers.first().map(|t| &t.config.model) {
            Some(ModelSpec::Chargpt(_)) => "perplexity",
            _ => "accuracy",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mix::sim::{SimConfig, SimNode, Simulator, peer_ids};
    use crate::mix::strategy::{self, StrategyKind, StrategySpec};
    use crate::train::config::TrainOptions;
    use crate::train::load;

    #[test]
    fn torch_training_learns_and_reports_accuracy_per_round() {
        let n = 4;
        let (rounds, local_steps) = (6, 50);
        let options = TrainOptions {
            hidden: Some("64".into()),
            nodes: Some(n as i64),
            steps: Some(rounds * local_steps),
            batch_size: Some(32),
            lr: Some(1e-2),
            threads: Some(1),
            device: Some("cpu".into()),
            ..TrainOptions::default()
        };
        let config = options.resolve().unwrap();
        let split = load::load(&config.data_spec(), config.holdout).unwrap();
        let mut torch = TorchTraining::new(&config, &split).unwrap();
        let init = torch.initial_params().unwrap();
        let spec = StrategySpec {
            seed: 7,
            rounds: rounds as u64,
            local_steps: local_steps as u64,
            timeout: Duration::from_millis(50),
            ..StrategySpec::new(StrategyKind::Gossip)
        };
        let ids = peer_ids(n, 3);
        let nodes = ids
            .iter()
            .map(|&id| SimNode {
                id,
                mixer: strategy::build(&spec, id, ids.clone(), 0, &[], init.len()).unwrap(),
                params: init.clone(),
            })
            .collect();
        let cfg = SimConfig { eval_every: 1, ..SimConfig::default() };
        let r = Simulator::new(cfg, nodes).unwrap().run(&mut torch).unwrap();
        assert_eq!(r.initial_consensus_distance, 0.0, "every node starts from the same model");
        assert!(r.rounds.iter().all(|s| s.consensus_distance > 0.0), "shards differ");
        let acc: Vec<f64> = r.rounds.iter().map(|s| s.mean_metric.unwrap()).collect();
        // Ten classes: chance is 0.1. Measured 0.39, 0.68, 0.84, 0.91, 0.94, 0.95.
        assert!(acc[5] > 0.8 && acc[5] > acc[0], "{acc:?}");
        let fin = r.final_metrics.unwrap();
        assert_eq!(fin.name, "accuracy");
        assert!((fin.mean_node - acc[5]).abs() < 1e-12);
    }
}
