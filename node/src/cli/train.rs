//! `murmur train`: one node, no network. Loads options (saved run, TOML
//! file, flags), validates them and the data before writing anything, trains
//! with periodic evaluation and checkpoints, and writes `summary.json`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::CliError;
use super::progress::Progress;
use crate::train::checkpoint;
use crate::train::config::{TrainConfig, TrainOptions};
use crate::train::dataset::HoldoutNote;
use crate::train::eval::EvalMetrics;
use crate::train::load;
use crate::train::trainer::Trainer;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Output directory: checkpoint/ and summary.json go here
    #[arg(long, env = "MURMUR_OUT")]
    out: PathBuf,
    /// TOML file of options (keys are the flag names); flags override it
    #[arg(long, env = "MURMUR_CONFIG")]
    config: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint, up to --steps
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    options: TrainOptions,
}

/// One held-out evaluation during the run.
#[derive(Debug, Serialize)]
struct EvalPoint {
    step: u64,
    #[serde(flatten)]
    metrics: EvalMetrics,
}

#[derive(Debug, Serialize)]
struct FinalMetrics {
    train_loss: Option<f64>,
    eval_loss: f64,
    eval_accuracy: Option<f64>,
    eval_perplexity: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    murmur_version: &'static str,
    steps: u64,
    resumed_from_step: Option<u64>,
    wall_seconds: f64,
    steps_per_second: f64,
    parameters: usize,
    fingerprint: String,
    shard_examples: usize,
    holdout: &'a HoldoutNote,
    config: &'a TrainConfig,
    options: &'a TrainOptions,
    evals: &'a [EvalPoint],
    #[serde(rename = "final")]
    final_metrics: FinalMetrics,
}

pub fn run(args: TrainArgs) -> Result<(), CliError> {
    let options = merged_options(&args)?;
    let config = options.resolve().map_err(CliError::usage)?;
    let split = load::load(&config.data_spec(), config.holdout).map_err(CliError::usage)?;
    let mut trainer = Trainer::new(config, &split).map_err(CliError::usage)?;
    let ck_dir = checkpoint::dir_in(&args.out);
    let resumed_from = if args.resume {
        let ck = checkpoint::load(&ck_dir).map_err(CliError::usage)?;
        trainer.restore(&ck).map_err(CliError::usage)?;
        Some(trainer.steps_done())
    } else {
        None
    };
    std::fs::create_dir_all(&args.out).map_err(|e| {
        CliError::failed(format!("cannot create --out {}: {e}", args.out.display()))
    })?;
    let saved_options = serde_json::to_value(&options).map_err(CliError::failed)?;
    crate::memory::keep_freed_heap();
    train_loop(
        &mut trainer,
        &ck_dir,
        &saved_options,
        resumed_from,
        &split.holdout,
        &options,
        &args.out,
    )
}

/// Saved run options (with --resume), then the --config file, then flags.
fn merged_options(args: &TrainArgs) -> Result<TrainOptions, CliError> {
    let ck_dir = checkpoint::dir_in(&args.out);
    let base = if args.resume {
        let meta = checkpoint::read_meta(&ck_dir).map_err(CliError::usage)?;
        serde_json::from_value(meta.options).map_err(|e| {
            CliError::usage(format!(
                "checkpoint {} holds options this murmur cannot read: {e}",
                ck_dir.display()
            ))
        })?
    } else {
        if let Ok(meta) = checkpoint::read_meta(&ck_dir) {
            return Err(CliError::usage(format!(
                "--out {} already holds a run (checkpoint at step {}); pass --resume to continue it or choose another --out",
                args.out.display(),
                meta.step
            )));
        }
        TrainOptions::default()
    };
    let file = match &args.config {
        Some(path) => TrainOptions::from_toml_file(path).map_err(CliError::usage)?,
        None => TrainOptions::default(),
    };
    Ok(base.overridden_by(&file).overridden_by(&args.options))
}

fn train_loop(
    trainer: &mut Trainer,
    ck_dir: &Path,
    saved_options: &serde_json::Value,
    resumed_from: Option<u64>,
    holdout: &HoldoutNote,
    options: &TrainOptions,
    out: &Path,
) -> Result<(), CliError> {
    let cfg = trainer.config.clone();
    let first = trainer.steps_done();
    let progress = Progress::new(first, cfg.steps, cfg.log_every);
    progress.line(format!(
        "murmur train: {} ({} parameters) on {} [{} train / {} held out, shard {}/{}: {} examples], {} steps from step {first}, device {:?}",
        cfg.model.name(),
        trainer.model.num_params(),
        cfg.data,
        holdout.train_examples,
        holdout.heldout_examples,
        cfg.node,
        cfg.nodes,
        trainer.shard_examples(),
        cfg.steps,
        trainer.device(),
    ));
    let started = Instant::now();
    let mut evals = Vec::new();
    while trainer.steps_done() < cfg.steps {
        let report = trainer.step().map_err(CliError::failed)?;
        progress.step(&report);
        if cfg.eval_every > 0 && report.step % cfg.eval_every == 0 && report.step < cfg.steps {
            let m = trainer.evaluate();
            progress.eval(report.step, &m);
            evals.push(EvalPoint { step: report.step, metrics: m });
        }
        if cfg.checkpoint_every > 0 && report.step % cfg.checkpoint_every == 0 {
            trainer
                .save_checkpoint(ck_dir, saved_options.clone(), None)
                .map_err(CliError::failed)?;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let m = trainer.evaluate();
    evals.push(EvalPoint { step: trainer.steps_done(), metrics: m });
    progress.finish();
    trainer.save_checkpoint(ck_dir, saved_options.clone(), None).map_err(CliError::failed)?;
    let summary = Summary {
        murmur_version: env!("CARGO_PKG_VERSION"),
        steps: trainer.steps_done(),
        resumed_from_step: resumed_from,
        wall_seconds: wall,
        steps_per_second: (trainer.steps_done() - first) as f64 / wall.max(1e-9),
        parameters: trainer.model.num_params(),
        fingerprint: trainer.model.layout().fingerprint.to_string(),
        shard_examples: trainer.shard_examples(),
        holdout,
        config: &cfg,
        options,
        evals: &evals,
        final_metrics: FinalMetrics {
            train_loss: trainer.train_loss(),
            eval_loss: m.loss,
            eval_accuracy: m.accuracy,
            eval_perplexity: m.perplexity,
        },
    };
    let path = out.join("summary.json");
    let json = serde_json::to_vec_pretty(&summary).map_err(CliError::failed)?;
    std::fs::write(&path, json)
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))?;
    println!(
        "done: {} steps in {wall:.1}s; train loss {}; {m}; summary in {}",
        trainer.steps_done(),
        trainer.train_loss().map(|l| format!("{l:.4}")).unwrap_or_else(|| "n/a".into()),
        path.display()
    );
    Ok(())
}
