//! `murmur sim`: many nodes' strategies in this one process, over a simulated
//! network with seeded loss and delay, in virtual time (see `mix::sim`).
//!
//! Pure averaging of random vectors by default (`--dim`), which shows how a
//! topology and a loss rate shape consensus in a second; with `--model` or
//! `--data` (the `murmur train` flags) every node trains a real model on its
//! own shard. Everything is checked before the run starts; bad input is one
//! line and exit 2.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::CliError;
use murmur_coordinator::hub::SimCoordinator;
use murmur_coordinator::sampling::{Sampler, SamplerConfig, Target};

use crate::mix::comm::CommSchedule;
use crate::mix::coordinated::CoordinatedConfig;
use crate::mix::mixer::Mixer;
use crate::mix::sim::{
    self, Crash, DelayRange, LocalUpdate, NoTraining, RoundStat, SimConfig, SimNode, SimReport,
    Simulator,
};
use crate::mix::strategy::{self, OuterOptions, OuterSettings, StrategyKind, StrategySpec};
use crate::mix::topology::TopologySpec;
use crate::net::encoding::Encoding;
use crate::train::config::{TrainConfig, TrainOptions};
use crate::train::load;
use crate::train::sim_training::TorchTraining;

/// Nodes when `--nodes` is not given.
const DEFAULT_NODES: i64 = 16;
/// Vector length of pure averaging when `--dim` is not given.
const DEFAULT_DIM: i64 = 100;
/// `murmur train` options that mean nothing here: the simulator runs every
/// node, evaluates per round and writes no checkpoints.
const TRAIN_ONLY: [&str; 4] = ["node", "eval-every", "log-every", "checkpoint-every"];
/// Options that pure averaging uses or can ignore (how torch would run);
/// any other training option needs `--model` or `--data`.
const AVERAGING: [&str; 5] = ["nodes", "seed", "dim", "threads", "device"];

#[derive(Debug, clap::Args)]
#[command(
    mut_arg("nodes", |a| a.help("Nodes to simulate (each its own shard when training) [default: 16]")),
    mut_arg("dim", |a| a.help("Pure averaging: vector length [default: 100]; chargpt: embedding width [default: 128]")),
    mut_arg("seed", |a| a.help("Seed of the network, the topology, peer ids and initial values (and of training) [default: 0]")),
)]
pub struct SimArgs {
    /// Mixing strategy: gossip, merge, diloco, semidec or fedavg (with a simulated coordinator)
    #[arg(long, env = "MURMUR_STRATEGY", default_value = "gossip")]
    strategy: StrategyKind,
    /// Gossip topology: ring, torus, exponential, regular:D, erdos-renyi:P, barabasi-albert:M, complete, file:PATH, one-peer-exp, regular-per-round:D, rings:C
    #[arg(long, env = "MURMUR_TOPOLOGY", default_value = "ring")]
    topology: String,
    /// Mixing rounds
    #[arg(long, env = "MURMUR_ROUNDS", default_value_t = 20, allow_negative_numbers = true)]
    rounds: u64,
    /// Local steps per round (H)
    #[arg(long, env = "MURMUR_LOCAL_STEPS", default_value_t = 10, allow_negative_numbers = true)]
    local_steps: u64,
    /// Gossip steps per communicating round (Q)
    #[arg(long, env = "MURMUR_GOSSIP_STEPS", default_value_t = 1, allow_negative_numbers = true)]
    gossip_steps: u64,
    /// When to communicate: every:K or late:B; with merge, the rounds whose pairs exchange [default: every:1 for gossip, none for merge]
    #[arg(long, env = "MURMUR_COMM")]
    comm: Option<String>,
    /// merge: expected pairwise exchanges per node per round, in [0, 1] [default: 0]
    #[arg(long, env = "MURMUR_EXCHANGE_PROB", allow_negative_numbers = true)]
    exchange_prob: Option<f64>,
    /// How vectors travel: f32, bf16, f16, int8[:BLOCK], or topk:K (diloco's deltas, with error feedback); the simulator rounds values as the wire would and counts the bytes
    #[arg(long, env = "MURMUR_ENCODING", default_value = "f32")]
    encoding: String,
    /// diloco: the outer learning rate [default: 0.7]
    #[arg(long, env = "MURMUR_OUTER_LR", allow_negative_numbers = true)]
    outer_lr: Option<f64>,
    /// diloco: the outer Nesterov momentum, in [0, 1) [default: 0.9]
    #[arg(long, env = "MURMUR_OUTER_MOMENTUM", allow_negative_numbers = true)]
    outer_momentum: Option<f64>,
    /// diloco: when a round's average is applied: blocking, eager or delayed [default: blocking]
    #[arg(long, env = "MURMUR_OUTER_SYNC")]
    outer_sync: Option<String>,
    /// diloco: fragments synchronised in turn (streaming DiLoCo); averaging splits the vector into this many equal layers [default: 1]
    #[arg(long, env = "MURMUR_FRAGMENTS", allow_negative_numbers = true)]
    fragments: Option<i64>,
    /// diloco: local steps that overlap a fragment's exchange [default: 0]
    #[arg(long, env = "MURMUR_FRAGMENT_DELAY", allow_negative_numbers = true)]
    fragment_delay: Option<i64>,
    /// semidec, fedavg: where the coordinator's averages go, s2s or s2a [default: s2a]
    #[arg(long)]
    target: Option<String>,
    /// semidec, fedavg: members the coordinator samples per sampling round (K) [default: 4]
    #[arg(long, allow_negative_numbers = true)]
    sample: Option<i64>,
    /// semidec, fedavg: rounds between two sampling rounds (H_s) [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    sample_every: Option<i64>,
    /// Probability that a message is lost, in [0, 1]
    #[arg(long, env = "MURMUR_SIM_LOSS", default_value_t = 0.0, allow_negative_numbers = true)]
    loss: f64,
    /// Message delay range in virtual milliseconds, MIN..MAX, drawn uniformly
    #[arg(long, env = "MURMUR_SIM_DELAY_MS", default_value = "1..10")]
    delay_ms: String,
    /// Virtual compute time of one local step, in milliseconds
    #[arg(long, env = "MURMUR_SIM_STEP_MS", default_value_t = 10.0, allow_negative_numbers = true)]
    step_ms: f64,
    /// Per-node step-time spread: each node's step takes step-ms * (1 + J*u), u in [-1, 1] drawn once per node; J in [0, 1)
    #[arg(
        long,
        env = "MURMUR_SIM_STEP_JITTER",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    step_jitter: f64,
    /// Deadline of one exchange, in virtual milliseconds
    #[arg(
        long,
        env = "MURMUR_ROUND_TIMEOUT_MS",
        default_value_t = 200,
        allow_negative_numbers = true
    )]
    round_timeout_ms: u64,
    /// Gossip: wait for a neighbour this fraction of the local phase (at least 5 ms) after the last answer, and beyond that only as long as it earned by answering in time (this fraction of each round, up to the deadline); off = always the full deadline
    #[arg(long, env = "MURMUR_STRAGGLER_GRACE", default_value = "0.2")]
    straggler_grace: String,
    /// Gossip: train the next local phase while the last one's exchange runs, and add the mix's change when that phase ends (CoCoD-SGD)
    #[arg(long, env = "MURMUR_OVERLAP")]
    overlap: bool,
    /// Stop at this much virtual time, in seconds [default: twice what every round timing out would take]
    #[arg(long, env = "MURMUR_SIM_TIME_LIMIT_S", allow_negative_numbers = true)]
    time_limit_s: Option<f64>,
    /// Tell the survivors of a crash after this many virtual milliseconds [default: never; they time out on it]
    #[arg(long, env = "MURMUR_SIM_MEMBERSHIP_DELAY_MS", allow_negative_numbers = true)]
    membership_delay_ms: Option<u64>,
    /// Threads that run the simulated nodes, each a shard of them [default: all cores]; pure averaging without a coordinator or --membership-delay-ms (training runs on one thread)
    #[arg(long, env = "MURMUR_SIM_WORKERS", allow_negative_numbers = true)]
    workers: Option<i64>,
    /// Crash node NODE when it reaches round ROUND, as NODE@ROUND; repeatable
    #[arg(long = "crash", value_name = "NODE@ROUND")]
    crashes: Vec<String>,
    /// When training, evaluate every node every N rounds (0: only at the end)
    #[arg(
        long,
        env = "MURMUR_SIM_EVAL_ROUNDS",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    eval_rounds: u64,
    /// Directory to write sim.json (the report) into
    #[arg(long, env = "MURMUR_OUT")]
    out: Option<PathBuf>,
    /// The `murmur train` options; --model or --data trains real models, otherwise nodes average random vectors of length --dim [default: 100]
    #[command(flatten)]
    options: TrainOptions,
}

/// The validated settings of one simulation.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    strategy: StrategyKind,
    topology: TopologySpec,
    nodes: usize,
    rounds: u64,
    local_steps: u64,
    gossip_steps: u64,
    comm: Option<CommSchedule>,
    exchange_prob: Option<f64>,
    encoding: Encoding,
    /// DiLoCo's outer optimizer, when the strategy is diloco.
    outer: Option<OuterSettings>,
    /// The simulated coordinator, when the strategy is semidec or fedavg.
    coordinator: Option<SimCoordinatorSettings>,
    loss: f64,
    delay_ms: String,
    step_ms: f64,
    step_jitter: f64,
    round_timeout_ms: u64,
    straggler_grace: Option<f64>,
    overlap: bool,
    time_limit_s: f64,
    membership_delay_ms: Option<u64>,
    crashes: Vec<Crash>,
    /// Threads asked for (`SimReport::workers` says how many ran).
    workers: usize,
    seed: u64,
    /// Vector length of pure averaging; `None` when training.
    dim: Option<usize>,
    training: Option<TrainConfig>,
    #[serde(skip)]
    sim: SimConfig,
}

/// The simulated coordinator's settings.
#[derive(Debug, Clone, Copy, Serialize)]
struct SimCoordinatorSettings {
    target: &'static str,
    sample: usize,
    sample_every: u64,
}

/// `--target`, `--sample` and `--sample-every`: refused unless the
/// strategy has a coordinator.
fn coordinator_settings(args: &SimArgs) -> Result<Option<SimCoordinatorSettings>, CliError> {
    if !args.strategy.coordinated() {
        let given = [
            ("--target", args.target.is_some()),
            ("--sample", args.sample.is_some()),
            ("--sample-every", args.sample_every.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(CliError::usage(format!(
                "{flag} is an option of the coordinator; pass --strategy semidec or fedavg (strategy is {})",
                args.strategy
            )));
        }
        return Ok(None);
    }
    let target = match args.target.as_deref().unwrap_or("s2a") {
        "s2s" => "s2s",
        "s2a" => "s2a",
        t => return Err(CliError::usage(format!("--target {t:?} must be s2s or s2a"))),
    };
    let positive = |flag: &str, v: i64| {
        u64::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| CliError::usage(format!("{flag} must be > 0 (got {v})")))
    };
    Ok(Some(SimCoordinatorSettings {
        target,
        sample: positive("--sample", args.sample.unwrap_or(4))? as usize,
        sample_every: positive("--sample-every", args.sample_every.unwrap_or(1))?,
    }))
}

/// The peer id of the simulated coordinator (none of the nodes').
fn coordinator_peer(seed: u64) -> libp2p::PeerId {
    sim::peer_ids(1, seed ^ 0x636f_6f72_6469_6e61) // "coordina"
        .pop()
        .unwrap_or_else(libp2p::PeerId::random)
}

/// The coordinator that takes part in a semidec or fedavg simulation.
fn hub(s: &Settings, elements: usize) -> Option<SimCoordinator> {
    let c = s.coordinator?;
    let cfg = SamplerConfig {
        seed: s.seed,
        sample_every: c.sample_every,
        sample_size: c.sample,
        target: if c.target == "s2s" { Target::Sampled } else { Target::All },
        deadline: Duration::from_millis(s.round_timeout_ms),
        min_members: s.nodes,
        patience: Duration::from_millis(s.round_timeout_ms) * 100,
        member_expiry: Duration::from_secs(10),
        aggregator: crate::mix::aggregate::Aggregator::Mean,
        elements,
        max_weight: None,
    };
    Some(SimCoordinator { peer: coordinator_peer(s.seed), sampler: Sampler::new(cfg) })
}

/// What `sim.json` holds.
#[derive(Debug, Serialize)]
struct Summary<'a> {
    murmur_version: &'static str,
    settings: &'a Settings,
    #[serde(flatten)]
    report: &'a SimReport,
    process: Process,
}

/// What the simulation cost this machine: how far it scales is a question a
/// user asks of `murmur sim`, so the answer is in its report.
#[derive(Debug, Clone, Copy, Serialize)]
struct Process {
    /// From the start of `murmur sim` to the end of the run.
    wall_seconds: f64,
    /// The process's peak resident memory (`VmHWM`), where Linux tells it.
    peak_rss_bytes: Option<u64>,
}

impl Process {
    fn since(start: std::time::Instant) -> Process {
        let peak_rss_bytes = crate::memory::peak_rss_bytes();
        Process { wall_seconds: start.elapsed().as_secs_f64(), peak_rss_bytes }
    }

    fn line(&self, workers: usize) -> String {
        let memory = self
            .peak_rss_bytes
            .map_or(String::new(), |b| format!(", peak memory {:.0} MB", b as f64 / 1e6));
        let threads =
            if workers == 1 { "1 thread".to_string() } else { format!("{workers} threads") };
        format!("ran {:.1} s of wall time on {threads}{memory}", self.wall_seconds)
    }
}

pub fn run(args: SimArgs) -> Result<(), CliError> {
    let start = std::time::Instant::now();
    crate::memory::keep_freed_heap();
    let settings = settings(&args)?;
    let Local { update: mut local, init, layers } = local_update(&settings)?;
    let elements = init.first().map_or(0, Vec::len);
    let nodes = strategies(&settings, init, &layers)?;
    let mut simulator = Simulator::new(settings.sim.clone(), nodes).map_err(CliError::usage)?;
    if let Some(hub) = hub(&settings, elements) {
        simulator = simulator.with_hub(Box::new(hub));
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .map_err(|e| CliError::failed(format!("cannot create --out {}: {e}", out.display())))?;
    }
    println!("{}", header(&settings));
    let metric = local.metric_name();
    let rounds = settings.rounds;
    let report = simulator
        .run_observed(local.as_mut(), |s| println!("{}", round_line(s, rounds, metric)))
        .map_err(CliError::failed)?;
    println!("{}", summary_line(&report));
    let process = Process::since(start);
    println!("{}", process.line(report.workers));
    if let Some(out) = &args.out {
        write_report(&out.join("sim.json"), &settings, &report, process)?;
    }
    Ok(())
}

fn settings(args: &SimArgs) -> Result<Settings, CliError> {
    let set = options_set(&args.options)?;
    if let Some(flag) = TRAIN_ONLY.iter().find(|f| set.iter().any(|s| s == *f)) {
        return Err(CliError::usage(format!(
            "--{flag} (or {}) is a `murmur train` option; murmur sim runs every node and evaluates every --eval-rounds",
            env_name(flag)
        )));
    }
    let nodes = args.options.nodes.unwrap_or(DEFAULT_NODES);
    if nodes < 1 {
        return Err(CliError::usage(format!("--nodes must be >= 1 (got {nodes})")));
    }
    let (dim, training) = training(args, &set, nodes)?;
    let crashes = crashes(&args.crashes, nodes as usize)?;
    let mut s = Settings {
        strategy: args.strategy,
        topology: args.topology.parse().map_err(CliError::usage)?,
        nodes: nodes as usize,
        rounds: at_least_one("--rounds", args.rounds)?,
        local_steps: at_least_one("--local-steps", args.local_steps)?,
        gossip_steps: at_least_one("--gossip-steps", args.gossip_steps)?,
        comm: args.comm.as_deref().map(str::parse).transpose().map_err(CliError::usage)?,
        exchange_prob: args.exchange_prob,
        encoding: args.encoding.parse().map_err(|e| CliError::usage(format!("--encoding: {e}")))?,
        outer: outer(args)?,
        coordinator: coordinator_settings(args)?,
        loss: args.loss,
        delay_ms: args.delay_ms.clone(),
        step_ms: args.step_ms,
        step_jitter: args.step_jitter,
        round_timeout_ms: at_least_one("--round-timeout-ms", args.round_timeout_ms)?,
        straggler_grace: crate::mix::patience::parse_grace(&args.straggler_grace)
            .map_err(CliError::usage)?,
        overlap: args.overlap,
        time_limit_s: 0.0,
        membership_delay_ms: args.membership_delay_ms,
        crashes,
        workers: 1,
        seed: args.options.seed.unwrap_or(0),
        dim,
        training,
        sim: SimConfig::default(),
    };
    check_strategy(&s)?;
    s.workers = workers(&s, args.workers)?;
    with_sim_config(s, args)
}

/// The keys (flag names) of the training options given.
fn options_set(options: &TrainOptions) -> Result<Vec<String>, CliError> {
    match serde_json::to_value(options).map_err(CliError::failed)? {
        serde_json::Value::Object(m) => Ok(m.keys().cloned().collect()),
        _ => Ok(Vec::new()),
    }
}

/// Pure averaging's vector length, or the training config for `nodes`.
fn training(
    args: &SimArgs,
    set: &[String],
    nodes: i64,
) -> Result<(Option<usize>, Option<TrainConfig>), CliError> {
    let o = &args.options;
    if o.model.is_none() && o.data.is_none() {
        if let Some(flag) = set.iter().find(|k| !AVERAGING.contains(&k.as_str())) {
            return Err(CliError::usage(format!(
                "--{flag} (or {}) configures training, which needs --model or --data (without them murmur sim averages random vectors)",
                env_name(flag)
            )));
        }
        let dim = o.dim.unwrap_or(DEFAULT_DIM);
        if dim < 1 {
            return Err(CliError::usage(format!("--dim must be >= 1 (got {dim})")));
        }
        return Ok((Some(dim as usize), None));
    }
    let steps = args.rounds.saturating_mul(args.local_steps).min(i64::MAX as u64) as i64;
    let options = TrainOptions {
        nodes: Some(nodes),
        steps: Some(o.steps.unwrap_or(steps)),
        threads: Some(o.threads.unwrap_or(1)),
        ..o.clone()
    };
    Ok((None, Some(options.resolve().map_err(CliError::usage)?)))
}

/// The environment variable of a training flag.
fn env_name(flag: &str) -> String {
    format!("MURMUR_{}", flag.to_uppercase().replace('-', "_"))
}

fn crashes(given: &[String], nodes: usize) -> Result<Vec<Crash>, CliError> {
    given
        .iter()
        .map(|s| {
            let c: Crash = s.parse().map_err(CliError::usage)?;
            if c.node >= nodes {
                return Err(CliError::usage(format!(
                    "--crash {s}: there is no node {} (nodes are 0..{nodes})",
                    c.node
                )));
            }
            Ok(c)
        })
        .collect()
}

fn at_least_one(flag: &str, v: u64) -> Result<u64, CliError> {
    if v == 0 {
        return Err(CliError::usage(format!("{flag} must be >= 1 (got 0)")));
    }
    Ok(v)
}

/// DiLoCo's outer settings when the strategy is diloco; any of its flags
/// with another strategy is refused.
fn outer(args: &SimArgs) -> Result<Option<OuterSettings>, CliError> {
    let given = OuterOptions {
        lr: args.outer_lr,
        momentum: args.outer_momentum,
        sync: args.outer_sync.as_deref(),
        fragments: args.fragments,
        fragment_delay: args.fragment_delay,
    };
    let outer = OuterSettings::for_strategy(args.strategy, given).map_err(CliError::usage)?;
    Ok((args.strategy == StrategyKind::Diloco).then_some(outer))
}

/// Options that only one strategy understands, and what the strategy
/// itself refuses (a topology that cannot be built for `--nodes`, fragments
/// that do not divide the local steps...).
fn check_strategy(s: &Settings) -> Result<(), CliError> {
    if let Some(t) = &s.training {
        crate::daemon::config::relays_fit(t, s.strategy).map_err(CliError::usage)?;
    }
    spec(s).check_overlap().map_err(|e| CliError::usage(e.to_string()))?;
    match s.strategy {
        StrategyKind::Gossip
        | StrategyKind::Diloco
        | StrategyKind::Semidec
        | StrategyKind::Fedavg => {
            if let Some(p) = s.exchange_prob {
                return Err(CliError::usage(format!(
                    "--exchange-prob {p} is a merge option; pass --strategy merge or drop it"
                )));
            }
        }
        StrategyKind::Merge => {
            if let (Some(p), Some(c)) = (s.exchange_prob, s.comm) {
                return Err(CliError::usage(format!(
                    "--exchange-prob {p} and --comm {c} both choose merge's exchanges; give one"
                )));
            }
            if let Some(p) = s.exchange_prob.filter(|p| !(0.0..=1.0).contains(p)) {
                return Err(CliError::usage(format!(
                    "--exchange-prob must be in [0, 1] (got {p})"
                )));
            }
        }
    }
    if s.training.is_none() {
        let dim = s.dim.unwrap_or(DEFAULT_DIM as usize);
        spec(s).check(s.nodes, &averaging_layers(s, dim), dim).map_err(CliError::usage)?;
    }
    Ok(())
}

/// Fills in the simulator's config; checks loss, delays, times.
fn with_sim_config(mut s: Settings, args: &SimArgs) -> Result<Settings, CliError> {
    let delay: DelayRange = args.delay_ms.parse().map_err(CliError::usage)?;
    if !(0.0..=1.0).contains(&s.loss) {
        return Err(CliError::usage(format!("--loss must be in [0, 1] (got {})", s.loss)));
    }
    if !(s.step_ms >= 0.0 && s.step_ms < 1e9) {
        return Err(CliError::usage(format!(
            "--step-ms must be >= 0 and < 1e9 (got {})",
            s.step_ms
        )));
    }
    if !(0.0..1.0).contains(&s.step_jitter) {
        return Err(CliError::usage(format!(
            "--step-jitter must be in [0, 1) (got {})",
            s.step_jitter
        )));
    }
    let timeout = Duration::from_millis(s.round_timeout_ms);
    let step_time = Duration::from_secs_f64(s.step_ms / 1000.0);
    s.time_limit_s = match args.time_limit_s {
        Some(t) if t > 0.0 && t < 1e12 => t,
        Some(t) => {
            return Err(CliError::usage(format!("--time-limit-s must be > 0 (got {t})")));
        }
        None => default_time_limit(&s, step_time, timeout, delay),
    };
    s.sim = SimConfig {
        seed: s.seed,
        loss: s.loss,
        delay,
        step_time,
        step_jitter: s.step_jitter,
        time_limit: Duration::from_secs_f64(s.time_limit_s),
        crashes: s.crashes.clone(),
        membership_delay: s.membership_delay_ms.map(Duration::from_millis),
        workers: s.workers,
        // 0 evaluates at the last boundary only (and in the final metrics).
        eval_every: match (&s.training, args.eval_rounds) {
            (None, _) => 0,
            (Some(_), 0) => s.rounds,
            (Some(_), k) => k,
        },
    };
    Ok(s)
}

/// `--workers`: all cores unless given; more than one only where the
/// nodes can run apart (the simulator takes fewer where the nodes are few).
fn workers(s: &Settings, asked: Option<i64>) -> Result<usize, CliError> {
    let Some(w) = asked else {
        return Ok(std::thread::available_parallelism().map_or(1, usize::from));
    };
    let w = usize::try_from(w)
        .ok()
        .filter(|w| *w >= 1)
        .ok_or_else(|| CliError::usage(format!("--workers must be at least 1 (got {w})")))?;
    let alone = if s.training.is_some() {
        Some("libtorch training runs every node on one thread")
    } else if s.coordinator.is_some() {
        Some("the simulated coordinator hears every node at every event")
    } else if s.membership_delay_ms.is_some() {
        Some("--membership-delay-ms tells every node at once")
    } else {
        None
    };
    match alone {
        Some(why) if w > 1 => {
            Err(CliError::usage(format!("--workers {w}: this run needs one thread ({why})")))
        }
        _ => Ok(w),
    }
}

/// Twice the virtual time of a run in which every exchange waits out its
/// deadline (merge: two all-reduce phases at the end), plus a minute.
fn default_time_limit(
    s: &Settings,
    step_time: Duration,
    timeout: Duration,
    delay: DelayRange,
) -> f64 {
    let compute = step_time.as_secs_f64() * (1.0 + s.step_jitter) * s.local_steps as f64;
    let wait = (timeout + delay.max).as_secs_f64();
    // A DiLoCo exchange has two deadlines (reduce, gather) per fragment.
    let waits = match (s.strategy, s.outer) {
        (StrategyKind::Diloco, Some(o)) => 2 * o.fragments as u64,
        _ => s.gossip_steps,
    };
    let per_round = compute + wait * waits as f64;
    2.0 * (s.rounds as f64 * per_round + 2.0 * wait) + 60.0
}

/// How nodes train, and every node's initial parameters.
struct Local {
    update: Box<dyn LocalUpdate>,
    init: Vec<Vec<f32>>,
    /// The model's layers (streaming DiLoCo deals them to fragments).
    layers: Vec<std::ops::Range<usize>>,
}

fn local_update(s: &Settings) -> Result<Local, CliError> {
    let Some(config) = &s.training else {
        let dim = s.dim.unwrap_or(DEFAULT_DIM as usize);
        return Ok(Local {
            update: Box::new(NoTraining),
            init: sim::random_params(s.nodes, dim, s.seed),
            layers: averaging_layers(s, dim),
        });
    };
    tracing::warn!(
        nodes = s.nodes,
        threads = config.threads,
        "all {} models share this process, each training with {} libtorch thread(s)",
        s.nodes,
        config.threads
    );
    let split = load::load(&config.data_spec(), config.holdout).map_err(CliError::usage)?;
    let torch = TorchTraining::new(config, &split).map_err(CliError::usage)?;
    let init = torch.initial_params().map_err(CliError::failed)?;
    let layers = torch.layers();
    Ok(Local { update: Box::new(torch), init: vec![init; s.nodes], layers })
}

/// The strategy settings every simulated node shares.
fn spec(s: &Settings) -> StrategySpec {
    StrategySpec {
        seed: s.seed,
        rounds: s.rounds,
        local_steps: s.local_steps,
        timeout: Duration::from_millis(s.round_timeout_ms),
        encoding: s.encoding,
        topology: s.topology.clone(),
        gossip_steps: s.gossip_steps,
        comm: s.comm,
        exchange_prob: s.exchange_prob.unwrap_or(0.0),
        outer: s.outer.unwrap_or_default(),
        samples_per_step: s.training.as_ref().map_or(1, |t| t.batch_size as u64),
        straggler_grace: s.straggler_grace,
        overlap: s.overlap,
        coordinator: s.coordinator.map(|_| CoordinatedConfig {
            coordinator: coordinator_peer(s.seed),
            wait: Duration::from_millis(s.round_timeout_ms),
            weight: 1.0,
        }),
        ..StrategySpec::new(s.strategy)
    }
}

/// Pure averaging has no layers: streaming deals out `--fragments` equal
/// pieces of the vector.
fn averaging_layers(s: &Settings, dim: usize) -> Vec<std::ops::Range<usize>> {
    let p = s.outer.map_or(1, |o| o.fragments).max(1);
    (0..p).map(|j| crate::mix::allreduce::shard(dim, p, j)).collect()
}

fn strategies(
    s: &Settings,
    init: Vec<Vec<f32>>,
    layers: &[std::ops::Range<usize>],
) -> Result<Vec<SimNode>, CliError> {
    let ids = sim::peer_ids(s.nodes, s.seed);
    let spec = spec(s);
    let len = init.first().map_or(0, Vec::len);
    spec.check(s.nodes, layers, len).map_err(CliError::usage)?;
    // One roster and topology for all: a node costs its own state.
    let swarm = strategy::Swarm::new(&spec, ids[0], ids.clone()).map_err(CliError::usage)?;
    ids.iter()
        .zip(init)
        .map(|(&id, params)| {
            let mixer: Box<dyn Mixer> =
                strategy::build_in(&spec, &swarm, &id, 0, layers, len).map_err(CliError::usage)?;
            Ok(SimNode { id, mixer, params })
        })
        .collect()
}

fn header(s: &Settings) -> String {
    let what = match (&s.training, s.dim) {
        (Some(c), _) => format!("training {} on {} ({} shards)", c.model.name(), c.data, c.nodes),
        (None, dim) => format!("averaging random vectors of length {}", dim.unwrap_or(0)),
    };
    let strategy = match (s.strategy, s.outer) {
        (StrategyKind::Gossip, _) => format!("gossip on {}", s.topology),
        (StrategyKind::Semidec | StrategyKind::Fedavg, _) => {
            let c = s.coordinator.map_or(String::new(), |c| {
                format!(" ({}, K = {} every {} round(s))", c.target, c.sample, c.sample_every)
            });
            match s.strategy {
                StrategyKind::Semidec => format!("semidec{c} on {}", s.topology),
                _ => format!("fedavg{c}"),
            }
        }
        (StrategyKind::Diloco, Some(o)) => format!(
            "diloco ({}, outer lr {} momentum {}, {} fragment(s)), {}",
            o.sync, o.lr, o.momentum, o.fragments, s.encoding
        ),
        (kind, _) => kind.to_string(),
    };
    format!(
        "murmur sim: {} nodes, {strategy}, {} rounds x {} local steps, {what}; loss {}, delay {} ms, seed {}",
        s.nodes, s.rounds, s.local_steps, s.loss, s.delay_ms, s.seed
    )
}

fn round_line(s: &RoundStat, rounds: u64, metric: &str) -> String {
    let mut line = format!(
        "round {}/{rounds}  t={:.3}s  live {}  consensus distance {:.4e}",
        s.round + 1,
        s.virtual_seconds,
        s.live,
        s.consensus_distance
    );
    if let Some(m) = s.mean_metric {
        line.push_str(&format!("  mean {metric} {m:.4}"));
    }
    line
}

fn summary_line(r: &SimReport) -> String {
    let m = &r.messages;
    let lost = if m.sent > 0 { 100.0 * m.dropped as f64 / m.sent as f64 } else { 0.0 };
    let mut line = format!(
        "done ({}) after {:.3}s virtual: consensus distance {:.4e} -> {:.4e}; messages sent {}, lost {} ({lost:.1}%), delivered {}, to crashed nodes {}; {} payload bytes",
        r.end,
        r.virtual_seconds,
        r.initial_consensus_distance,
        r.final_consensus_distance,
        m.sent,
        m.dropped,
        m.delivered,
        m.to_crashed,
        m.payload_bytes
    );
    if let Some(f) = &r.final_metrics {
        line.push_str(&format!(
            "; mean node {0} {1:.4}, averaged model {0} {2:.4}",
            f.name, f.mean_node, f.averaged_model
        ));
    }
    line
}

fn write_report(
    path: &std::path::Path,
    settings: &Settings,
    report: &SimReport,
    process: Process,
) -> Result<(), CliError> {
    let summary = Summary { murmur_version: env!("CARGO_PKG_VERSION"), settings, report, process };
    let json = serde_json::to_vec_pretty(&summary).map_err(CliError::failed)?;
    std::fs::write(path, json)
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))?;
    println!("report in {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        args: SimArgs,
    }

    fn parse(args: &[&str]) -> SimArgs {
        Wrap::try_parse_from(std::iter::once("sim").chain(args.iter().copied())).unwrap().args
    }

    fn usage(args: &[&str]) -> String {
        match settings(&parse(args)) {
            Err(CliError::Usage(msg)) => msg,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_flags_do_not_clash_with_the_train_flags() {
        Wrap::command().debug_assert();
    }

    #[test]
    fn defaults_average_16_vectors_on_a_ring() {
        let s = settings(&parse(&[])).unwrap();
        assert_eq!((s.nodes, s.dim, s.topology.clone()), (16, Some(100), TopologySpec::Ring));
        assert!(s.training.is_none());
        assert_eq!(s.sim.eval_every, 0);
        // 2 * (20 rounds * (0.1 s compute + 0.21 s wait) + 0.42 s) + 60 s.
        assert!((s.time_limit_s - 73.24).abs() < 1e-9, "{}", s.time_limit_s);
    }

    #[test]
    fn training_runs_rounds_times_local_steps_on_one_thread() {
        let s = settings(&parse(&["--data", "synthetic", "--rounds", "5", "--local-steps", "20"]))
            .unwrap();
        let t = s.training.unwrap();
        assert_eq!((t.steps, t.threads, t.nodes), (100, 1, 16));
        assert_eq!(s.dim, None);
        assert_eq!(s.sim.eval_every, 1);
    }

    #[test]
    fn workers_default_to_every_core_and_more_than_one_needs_nodes_that_run_apart() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(settings(&parse(&[])).unwrap().sim.workers, cores);
        assert_eq!(settings(&parse(&["--workers", "3"])).unwrap().sim.workers, 3);
        assert_eq!(usage(&["--workers", "0"]), "--workers must be at least 1 (got 0)");
        assert_eq!(usage(&["--workers", "-2"]), "--workers must be at least 1 (got -2)");
        let training = usage(&["--workers", "2", "--data", "synthetic"]);
        assert!(training.starts_with("--workers 2: this run needs one thread"), "{training}");
        let news = usage(&["--workers", "2", "--membership-delay-ms", "100"]);
        assert!(news.contains("--membership-delay-ms"), "{news}");
        // One is always fine, and training takes one by default.
        let one = settings(&parse(&["--workers", "1", "--data", "synthetic"])).unwrap();
        assert_eq!(one.sim.workers, 1);
    }

    #[test]
    fn options_of_another_strategy_or_command_are_refused() {
        assert!(usage(&["--exchange-prob", "0.5"]).contains("--strategy merge"));
        let both = usage(&["--strategy", "merge", "--exchange-prob", "0.5", "--comm", "every:2"]);
        assert!(both.contains("give one"), "{both}");
        assert!(usage(&["--data", "synthetic", "--eval-every", "5"]).starts_with("--eval-every"));
        assert!(usage(&["--batch-size", "8"]).contains("needs --model or --data"));
        assert_eq!(
            usage(&["--crash", "16@1"]),
            "--crash 16@1: there is no node 16 (nodes are 0..16)"
        );
    }
}
