//! What a node records of its run as it goes (evaluations, losses, steps,
//! timing, where it rejoined from) and tells as it records it: progress
//! lines and the status board. `summary.json` is made from it at the end.

use libp2p::PeerId;
use murmur_proto::v1::Phase;

use super::report::{EvalPoint, FinalMetrics, Reporter, human_bytes};
use super::timing::PhaseTiming;
use super::worker::PhaseDone;
use crate::net::accounting::Counts;
use crate::status::{StatusBoard, model_hash};
use crate::train::eval::EvalMetrics;

/// What an evaluation was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalFor {
    /// The mixed model at the end of `round`.
    Round(u64),
    /// What the strategy asked for under its label (e.g. "local").
    Label(&'static str, u64),
    /// The model the node ends with.
    Final,
}

#[derive(Debug, Default)]
pub struct Record {
    pub evals: Vec<EvalPoint>,
    pub local_metrics: Option<FinalMetrics>,
    pub final_eval: Option<EvalMetrics>,
    pub final_steps: Option<u64>,
    pub last_loss: Option<f64>,
    pub steps_done: u64,
    /// Steps done when the last round ended (round-end policy).
    pub steps_at_round_end: u64,
    pub timing: PhaseTiming,
    pub pulled_from: Option<PeerId>,
    /// The parts of the pulled state, and the round it was for.
    pub pulled: Option<(Vec<String>, u64)>,
    /// Whether other members' states confirmed the pulled one (`None`:
    /// there was no second member to ask).
    pub pull_witnessed: Option<bool>,
    /// How the pulled states differed, when they did.
    pub pull_disagreed: Option<String>,
    /// How many members' states the taken one is the coordinate-wise median of.
    pub pulled_median_of: Option<usize>,
    /// Members (this node included) when training started.
    pub members_at_start: usize,
}

impl Record {
    /// An evaluation came back; `round` is the node's round now.
    pub fn evaluated(
        &mut self,
        why: EvalFor,
        m: EvalMetrics,
        round: u64,
        bytes: Counts,
        (reporter, board): (&Reporter, &StatusBoard),
    ) {
        let round = match why {
            EvalFor::Label(label, round) => {
                reporter.emit(
                    serde_json::json!({"event": "eval", "label": label, "round": round, "metrics": m}),
                    || format!("eval ({label}) round {round}: {m}"),
                );
                if label == "local" {
                    self.local_metrics = Some(FinalMetrics::new(self.last_loss, &m));
                }
                return;
            }
            EvalFor::Round(r) => r,
            EvalFor::Final => {
                self.final_eval = Some(m);
                round
            }
        };
        reporter.emit(
            serde_json::json!({"event": "eval", "label": "model", "round": round, "step": self.steps_done,
                "metrics": m, "bytes_sent": bytes.bytes_sent, "bytes_received": bytes.bytes_received}),
            || format!("eval  round {round}: {m}"),
        );
        board.update(|s| {
            s.eval_loss = Some(m.loss);
            s.eval_accuracy = m.accuracy;
            s.eval_round = Some(round);
        });
        self.evals.push(EvalPoint {
            round,
            step: self.steps_done,
            bytes_sent: bytes.bytes_sent,
            bytes_received: bytes.bytes_received,
            metrics: m,
        });
    }

    /// A local phase ended in `round` of `rounds`, among `members`.
    pub fn phase_done(
        &mut self,
        done: &PhaseDone,
        (round, rounds, members): (u64, u64, usize),
        bytes: Counts,
        (reporter, board): (&Reporter, &StatusBoard),
    ) {
        // A relay trains on no examples: it has no loss (its steps report
        // NaN), unlike a node whose training diverged, whose NaN shows.
        let loss = (done.samples > 0).then_some(done.loss);
        self.last_loss = loss;
        self.steps_done = done.steps_done;
        let hash = model_hash(&done.params);
        board.update(|s| {
            s.phase = Phase::Mixing;
            s.step = done.steps_done;
            s.train_loss = loss;
            s.samples_seen += done.samples;
            s.model_hash = hash;
        });
        reporter.emit(
            serde_json::json!({"event": "round", "round": round, "rounds": rounds, "step": done.steps_done,
                "loss": done.loss, "members": members, "bytes_sent": bytes.bytes_sent,
                "bytes_received": bytes.bytes_received}),
            || {
                format!(
                    "round {}/{rounds}  step {}  loss {:.4}  members {members}  sent {}  received {}",
                    round + 1,
                    done.steps_done,
                    done.loss,
                    human_bytes(bytes.bytes_sent),
                    human_bytes(bytes.bytes_received)
                )
            },
        );
    }
}
