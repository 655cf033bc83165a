//! Checkpoints: parameters and optimizer state as safetensors, the mixing
//! strategy's own state when it keeps one (DiLoCo's theta and outer
//! momentum), plus a JSON meta file with the step, the fingerprint and the
//! options needed to resume.
//!
//! A checkpoint is written into a sibling directory and renamed into place,
//! so a crash mid-write leaves the previous checkpoint intact.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::params::Fingerprint;

/// Bumped when the layout of a checkpoint changes.
pub const FORMAT: u32 = 1;

const PARAMS_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STRATEGY_FILE: &str = "strategy.safetensors";
const META_FILE: &str = "meta.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    pub format: u32,
    /// Training steps completed.
    pub step: u64,
    pub optimizer_steps: u64,
    pub fingerprint: Fingerprint,
    /// The run's options as given (file and flags merged), to resume with.
    pub options: serde_json::Value,
    /// Recent training losses, so the reported train loss continues smoothly.
    pub recent_losses: Vec<f64>,
    /// The round the strategy's state is for, and its parts in order (the
    /// tensors are in `strategy.safetensors`); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_round: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strategy_parts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no checkpoint in {0} (expected {1}); train without --resume first")]
    Missing(PathBuf, &'static str),
    #[error("checkpoint {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("checkpoint {path}: format {got}, this murmur reads format {FORMAT}")]
    Format { path: PathBuf, got: u32 },
    #[error("checkpoint {path}: {source}")]
    Torch { path: PathBuf, source: tch::TchError },
    #[error("checkpoint {path} has no tensor {part:?}, which its meta.json lists")]
    Part { path: PathBuf, part: String },
    #[error("checkpoint {path}: part {part:?} holds a non-finite value at {index}")]
    NonFinite { path: PathBuf, part: String, index: usize },
}

/// What a checkpoint holds.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub params: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    /// The strategy's state tensors, by part name (empty without one).
    pub strategy: Vec<(String, Tensor)>,
}

/// The checkpoint directory inside a run's output directory.
pub fn dir_in(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Writes a checkpoint to `dir`, replacing any previous one atomically.
pub fn save(
    dir: &Path,
    meta: &CheckpointMeta,
    params: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    strategy: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    let partial = dir.with_extension("partial");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io(&partial))?;
    let torch = |path: PathBuf| move |source| CheckpointError::Torch { path, source };
    let p = partial.join(PARAMS_FILE);
    Tensor::write_safetensors(params, &p).map_err(torch(p.clone()))?;
    let o = partial.join(OPTIMIZER_FILE);
    Tensor::write_safetensors(optimizer, &o).map_err(torch(o.clone()))?;
    if !strategy.is_empty() {
        let st = partial.join(STRATEGY_FILE);
        Tensor::write_safetensors(strategy, &st).map_err(torch(st.clone()))?;
    }
    let m = partial.join(META_FILE);
    let json = serde_json::to_vec_pretty(meta)
        .map_err(|source| CheckpointError::Json { path: m.clone(), source })?;
    fs::write(&m, json).map_err(io(&m))?;
    let old = dir.with_extension("old");
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        fs::rename(dir, &old).map_err(io(dir))?;
    }
    fs::rename(&partial, dir).map_err(io(dir))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Reads only the meta file (to learn a run's options before building it).
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let m = dir.join(META_FILE);
    if !m.exists() {
        return Err(CheckpointError::Missing(dir.to_path_buf(), META_FILE));
    }
    let bytes = fs::read(&m).map_err(|source| CheckpointError::Io { path: m.clone(), source })?;
    let meta: CheckpointMeta = serde_json::from_slice(&bytes)
        .map_err(|source| CheckpointError::Json { path: m.clone(), source })?;
    if meta.format != FORMAT {
        return Err(CheckpointError::Format { path: m, got: meta.format });
    }
    Ok(meta)
}

impl Checkpoint {
    /// The strategy's saved state, in the order the meta file lists its
    /// parts, if the checkpoint holds one. A part the file lacks, or one
    /// that is not f32, is an error naming it.
    pub fn strategy_state(
        &self,
    ) -> Result<Option<crate::mix::mixer::StrategyState>, CheckpointError> {
        let Some(round) = self.meta.strategy_round else { return Ok(None) };
        let path = PathBuf::from(STRATEGY_FILE);
        let mut parts = Vec::with_capacity(self.meta.strategy_parts.len());
        for name in &self.meta.strategy_parts {
            let tensor =
                self.strategy.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
                    CheckpointError::Part { path: path.clone(), part: name.clone() }
                })?;
            let values = Vec::<f32>::try_from(&tensor.flatten(0, -1))
                .map_err(|source| CheckpointError::Torch { path: path.clone(), source })?;
            if let Some(at) = crate::net::wire::first_non_finite(&values) {
                return Err(CheckpointError::NonFinite { path, part: name.clone(), index: at });
            }
            parts.push((name.as_str(), values));
        }
        Ok(Some(crate::mix::mixer::StrategyState::new(round, parts)))
    }
}

/// Reads a whole checkpoint.
pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let meta = read_meta(dir)?;
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Torch { path, source })
    };
    let strategy = if dir.join(STRATEGY_FILE).exists() { read(STRATEGY_FILE)? } else { Vec::new() };
    Ok(Checkpoint { meta, params: read(PARAMS_FILE)?, optimizer: read(OPTIMIZER_FILE)?, strategy })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = dir_in(tmp.path());
        let meta = CheckpointMeta {
            format: FORMAT,
            step: 7,
            optimizer_steps: 7,
            fingerprint: Fingerprint("abc".into()),
            options: serde_json::json!({"steps": 7}),
            recent_losses: vec![1.5],
            strategy_round: None,
            strategy_parts: Vec::new(),
        };
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        save(&dir, &meta, &[("w".into(), t.shallow_clone())], &[], &[]).unwrap();
        assert!(load(&dir).unwrap().strategy.is_empty());
        let meta2 = CheckpointMeta {
            step: 9,
            strategy_round: Some(4),
            strategy_parts: vec!["params".into()],
            ..meta.clone()
        };
        let st = [("params".to_string(), Tensor::from_slice(&[0.5f32, 0.25]))];
        save(&dir, &meta2, &[("w".into(), t * 2.0)], &[], &st).unwrap();
        let ck = load(&dir).unwrap();
        assert_eq!(ck.meta, meta2);
        assert_eq!(Vec::<f32>::try_from(&ck.params[0].1).unwrap(), vec![2.0, 4.0]);
        assert_eq!(Vec::<f32>::try_from(&ck.strategy[0].1).unwrap(), vec![0.5, 0.25]);
        let state = ck.strategy_state().unwrap().unwrap();
        assert_eq!((state.round, state.names()), (4, vec!["params".to_string()]));
        assert_eq!(*state.parts[0].values, vec![0.5, 0.25]);
        assert!(!dir.with_extension("partial").exists() && !dir.with_extension("old").exists());
        assert!(matches!(load(tmp.path()), Err(CheckpointError::Missing(..))));
    }
}
