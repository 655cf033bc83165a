//! `summary.json`: what a `murmur run` node did, written when it stops
//! (finished or interrupted), for scripts and `murmur cluster`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::report::{EvalPoint, FinalMetrics};
use super::timing::PhaseTiming;
use crate::mix::mixer::OuterStatus;
use crate::net::accounting::Counts;

/// `summary.json` of a `murmur run` node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSummary {
    pub murmur_version: &'static str,
    pub peer_id: String,
    pub run_id: String,
    pub strategy: String,
    pub node: i64,
    pub nodes: usize,
    pub rounds: u64,
    pub steps: u64,
    pub resumed_from_round: Option<u64>,
    /// After `--resume`: the live peer whose current model this node took.
    pub pulled_from: Option<String>,
    /// The parts of the state it pulled (e.g. params, outer_momentum).
    pub pulled_parts: Vec<String>,
    /// The round the pulled state was for (the one the node trained next).
    pub pulled_round: Option<u64>,
    /// Whether a second member confirmed the pulled state (absent: no
    /// second member to ask).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_witnessed: Option<bool>,
    /// Why the pulled states were refused: how they differed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pull_disagreed: Option<String>,
    /// Of how many members' states the taken one is the coordinate-wise
    /// median (absent: one state was taken as sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulled_median_of: Option<usize>,
    /// Members (this node included) when training started.
    pub members_at_start: usize,
    pub interrupted: bool,
    pub wall_seconds: f64,
    /// The process's peak resident memory (`VmHWM`), where Linux tells it.
    pub peak_rss_bytes: Option<u64>,
    /// Of the resident memory at exit, what maps files (`RssFile`: the
    /// code of libtorch and murmur, shared with every node on the host);
    /// the peak less this is about the node's own (see `memory`).
    pub file_rss_bytes: Option<u64>,
    pub parameters: usize,
    pub fingerprint: String,
    pub bytes: Counts,
    /// Traffic with each peer (base58 peer id), all kinds together.
    pub traffic_by_peer: std::collections::BTreeMap<String, Counts>,
    pub refusals: std::collections::BTreeMap<String, u64>,
    pub strategy_drops: std::collections::BTreeMap<String, u64>,
    pub send_failures: u64,
    /// What injected faults did, by effect (dropped_out, corrupted...).
    pub fault_effects: std::collections::BTreeMap<String, u64>,
    /// Seconds in local phases and in exchanges.
    pub timing: PhaseTiming,
    pub evals: Vec<EvalPoint>,
    /// The local model before the final merge (merge strategy only).
    pub local: Option<FinalMetrics>,
    #[serde(rename = "final")]
    pub final_metrics: FinalMetrics,
    /// DiLoCo: outer steps, outer learning rate and momentum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer: Option<OuterStatus>,
    /// DiLoCo: bytes this node sent per outer step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_outer_step: Option<f64>,
    /// semidec, fedavg: what this node did with its coordinator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<crate::mix::coordinated::Coordination>,
    pub config: serde_json::Value,
}

impl NodeSummary {
    /// Writes the summary as pretty JSON to `path`.
    pub fn write(&self, path: &Path) -> Result<(), SummaryError> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| SummaryError { path: path.to_path_buf(), reason: e.to_string() })?;
        std::fs::write(path, json)
            .map_err(|e| SummaryError { path: path.to_path_buf(), reason: e.to_string() })
    }
}

/// The summary could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {reason}")]
pub struct SummaryError {
    pub path: PathBuf,
    pub reason: String,
}
