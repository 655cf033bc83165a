//! What a node tells a person (progress lines) and a script (JSON progress
//! lines); the metrics that `summary.json` also carries.

use serde::Serialize;

use super::config::ProgressFormat;
use crate::train::eval::EvalMetrics;

/// One evaluation of the node's model during the run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalPoint {
    pub round: u64,
    pub step: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    #[serde(flatten)]
    pub metrics: EvalMetrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalMetrics {
    pub train_loss: Option<f64>,
    pub eval_loss: f64,
    pub eval_accuracy: Option<f64>,
    pub eval_perplexity: Option<f64>,
}

impl FinalMetrics {
    pub fn new(train_loss: Option<f64>, m: &EvalMetrics) -> FinalMetrics {
        FinalMetrics {
            train_loss,
            eval_loss: m.loss,
            eval_accuracy: m.accuracy,
            eval_perplexity: m.perplexity,
        }
    }
}

/// Prints progress lines in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    pub format: ProgressFormat,
}

impl Reporter {
    /// A JSON object line, or a human line.
    pub fn emit(&self, json: serde_json::Value, text: impl FnOnce() -> String) {
        match self.format {
            ProgressFormat::Json => println!("{json}"),
            ProgressFormat::Text => println!("{}", text()),
        }
    }
}

/// `1.2 MB`-style sizes for progress lines.
pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
