//! Checkpoints: parameters and optimizer state as safetensors, plus a JSON
//! meta file with the step, the fingerprint and the options needed to resume.
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
}

/// What a checkpoint holds.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub params: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
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

/// Reads a whole checkpoint.
pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let meta = read_meta(dir)?;
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path).map_err(|source| CheckpointError::Torch { path, source })
    };
    Ok(Checkpoint { meta, params: read(PARAMS_FILE)?, optimizer: read(OPTIMIZER_FILE)? })
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
        };
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        save(&dir, &meta, &[("w".into(), t.shallow_clone())], &[]).unwrap();
        let meta2 = CheckpointMeta { step: 9, ..meta.clone() };
        save(&dir, &meta2, &[("w".into(), t * 2.0)], &[]).unwrap();
        let ck = load(&dir).unwrap();
        assert_eq!(ck.meta, meta2);
        assert_eq!(Vec::<f32>::try_from(&ck.params[0].1).unwrap(), vec![2.0, 4.0]);
        assert!(!dir.with_extension("partial").exists() && !dir.with_extension("old").exists());
        assert!(matches!(load(tmp.path()), Err(CheckpointError::Missing(..))));
    }
}
