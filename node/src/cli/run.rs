//! `murmur run`: one node daemon. Validates options, data and checkpoint
//! before anything is written, then hands off to `daemon::run_node`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::CliError;
use crate::api::ApiToken;
use crate::daemon::config::{RunConfig, RunOptions};
use crate::daemon::{NodeSetup, Resume, run_node};
use crate::fault::Faults;
use crate::net::identity;
use crate::train::batch::mix_seed;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::config::{TrainOptions, split_known};
use crate::train::load;
use crate::train::trainer::Trainer;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The node's directory: identity key, checkpoint/ and summary.json
    #[arg(long, env = "MURMUR_NODE_DIR")]
    pub data_dir: PathBuf,
    /// TOML file of options (keys are the flag names); flags override it
    #[arg(long, env = "MURMUR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Continue from the checkpoint in --data-dir and rejoin the run; --resume=auto does so when there is a checkpoint and starts afresh when there is none (for restarts under systemd, compose or Kubernetes)
    #[arg(long, env = "MURMUR_RESUME", num_args = 0..=1, default_missing_value = "always", value_name = "always|auto")]
    pub resume: Option<ResumeWhen>,
    /// Token that control calls (InjectFault, ClearFaults, SaveCheckpoint, Shutdown) must present; never saved
    #[arg(long, env = "MURMUR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    #[command(flatten)]
    pub train: TrainOptions,
    #[command(flatten)]
    pub run: RunOptions,
}

/// Both option sets, as saved in checkpoints.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct SavedOptions {
    train: TrainOptions,
    run: RunOptions,
    #[serde(default)]
    round: Option<u64>,
}

/// When `--resume` continues from a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ResumeWhen {
    /// Always: a missing checkpoint is an error.
    Always,
    /// When the node directory holds one.
    Auto,
}

pub fn run(args: RunArgs) -> Result<(), CliError> {
    let resuming = match args.resume {
        None => false,
        Some(ResumeWhen::Always) => true,
        Some(ResumeWhen::Auto) => {
            checkpoint::read_meta(&checkpoint::dir_in(&args.data_dir)).is_ok()
        }
    };
    let mut saved = saved_options(&args.data_dir, resuming)?;
    // A checkpoint is a file anyone with the directory could have written:
    // what it may set is how to train, never whom to trust, where to listen
    // or what to break. Those come from this command line, file and
    // environment only.
    saved.run = saved.run.without_trust();
    let (file_train, file_run) = match &args.config {
        Some(path) => read_config(path)?,
        None => Default::default(),
    };
    let train_opts = saved.train.overridden_by(&file_train).overridden_by(&args.train);
    let run_opts = saved.run.overridden_by(&file_run).overridden_by(&args.run);
    let train = train_opts.resolve().map_err(CliError::usage)?;
    let mut run = run_opts.resolve(&train).map_err(CliError::usage)?;
    if let Some(text) = &args.api_token {
        run.api_token =
            Some(ApiToken::new(text).map_err(|e| CliError::usage(format!("--api-token: {e}")))?);
    }
    if let Some(addr) = run.api
        && !addr.ip().is_loopback()
        && run.api_token.is_none()
        && !run.api_insecure
    {
        return Err(CliError::usage(format!(
            "--api {addr} listens beyond this machine without a token: anyone who reaches it could inject faults and stop the node; give --api-token/--api-token-file, or --api-insecure to accept that"
        )));
    }
    let split = load::load(&train.data_spec(), train.holdout).map_err(CliError::usage)?;
    let mut trainer = Trainer::new(train.clone(), &split).map_err(CliError::usage)?;
    // The trainer holds its shard and the held-out set as tensors; the whole
    // data set as loaded (31 MB of floats for MNIST) is not needed again.
    drop(split);
    crate::memory::release_free_heap();
    crate::memory::keep_freed_heap();
    let layout = trainer.model.layout();
    run.strategy.check(train.nodes, &layout.layers(), layout.total).map_err(CliError::usage)?;
    let resume = if resuming {
        let ck = checkpoint::load(&checkpoint::dir_in(&args.data_dir)).map_err(CliError::usage)?;
        trainer.restore(&ck).map_err(CliError::usage)?;
        let state = ck.strategy_state().map_err(CliError::usage)?;
        let round = saved.round.unwrap_or(0);
        if round > run.strategy.rounds {
            return Err(CliError::usage(format!(
                "the checkpoint says round {round}, beyond this run's {} rounds",
                run.strategy.rounds
            )));
        }
        Some(Resume { round, state })
    } else {
        None
    };
    let faults = start_faults(&train, &run, &trainer)?;
    let key = identity::load_or_create(&args.data_dir).map_err(CliError::usage)?;
    // Faults, security and endpoints are not saved (and would not be taken
    // back): a node resumed after an injected crash must not crash again.
    let saved_run = run_opts.without_trust();
    let options =
        serde_json::to_value(SavedOptions { train: train_opts, run: saved_run, round: None })
            .map_err(CliError::failed)?;
    let setup =
        NodeSetup { train, run, trainer, key, data_dir: args.data_dir, options, resume, faults };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(run_node(setup)).map(|_| ()).map_err(CliError::failed)
}

/// The node's fault injector, holding the `--fault`s; refuses one that
/// cannot apply to this node (label-flip on text).
fn start_faults(
    train: &TrainConfig,
    run: &RunConfig,
    trainer: &Trainer,
) -> Result<Faults, CliError> {
    let seed = mix_seed(train.seed, 0xfa17_0000 + train.node as u64);
    let mut faults = Faults::new(seed);
    if !trainer.has_labels() {
        faults = faults.without_labels(
            "label-flip needs labelled data (mnist, cifar10, synthetic); this node trains on text",
        );
    }
    for spec in &run.faults {
        faults
            .inject(spec.clone(), Instant::now())
            .map_err(|e| CliError::usage(format!("--fault: {e}")))?;
    }
    Ok(faults)
}

/// The options saved with the checkpoint (`--resume`), or none.
fn saved_options(dir: &Path, resume: bool) -> Result<SavedOptions, CliError> {
    let ck_dir = checkpoint::dir_in(dir);
    match (resume, checkpoint::read_meta(&ck_dir)) {
        (true, Ok(meta)) => serde_json::from_value(meta.options).map_err(|e| {
            CliError::usage(format!(
                "checkpoint {} was not written by `murmur run` ({e})",
                ck_dir.display()
            ))
        }),
        (true, Err(e)) => Err(CliError::usage(e)),
        (false, Ok(meta)) => Err(CliError::usage(format!(
            "--data-dir {} already holds a run (checkpoint at step {}); pass --resume to rejoin it or choose another --data-dir",
            dir.display(),
            meta.step
        ))),
        (false, Err(_)) => Ok(SavedOptions::default()),
    }
}

/// A TOML file holding training and run options side by side.
pub(super) fn read_config(path: &Path) -> Result<(TrainOptions, RunOptions), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read --config {}: {e}", path.display())))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| CliError::usage(format!("--config {}: {}", path.display(), e.message())))?;
    config_from_table(table)
        .map_err(|m| CliError::usage(format!("--config {}: {m}", path.display())))
}

/// The options a config table holds; the error names the bad key or value.
pub(super) fn config_from_table(table: toml::Table) -> Result<(TrainOptions, RunOptions), String> {
    let (train, run) = split_known::<TrainOptions>(table);
    let bad = |e: toml::de::Error| e.message().to_string();
    Ok((train.try_into().map_err(bad)?, run.try_into().map_err(bad)?))
}
