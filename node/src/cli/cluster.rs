//! `murmur cluster`: a local cluster in one command. Starts N `murmur run`
//! processes on 127.0.0.1 (one bootstrap node, free ports, one libtorch
//! thread each), shows one progress line per node (read from each node's
//! gRPC status, through the client `murmur status` uses), and when they
//! finish writes `cluster.json`, an SVG of accuracy against round and
//! bytes, and a table of the result. `--node-fault I=SPEC` gives node I a
//! fault; a node that crashes by an injected crash does not fail the cluster.
//! With `--coordinator` alone (or a semidec or fedavg strategy and no
//! coordinator address) it starts a `murmur-coordinator` beside the nodes,
//! shows it in the progress and stops it at the end.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::CliError;
use super::plot::{Series, svg};
use crate::api::client::NodeClient;
use crate::daemon::config::{RunOptions, START_COORDINATOR};
use crate::fault::{CRASH_EXIT_CODE, FaultKind, FaultSpec};
use crate::mix::consensus;
use crate::train::config::{TrainConfig, TrainOptions};
use crate::train::eval::EvalMetrics;
use crate::train::load;
use crate::train::trainer::Trainer;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Directory for the cluster: one node-I/ per node, cluster.json, accuracy.svg
    #[arg(long, env = "MURMUR_OUT")]
    out: PathBuf,
    /// TOML file of options for every node; flags override it
    #[arg(long, env = "MURMUR_CONFIG")]
    config: Option<PathBuf>,
    /// Give node I a fault at start, in --fault syntax (e.g. 2=sign-flip, 0=crash:5); repeatable
    #[arg(long = "node-fault", value_name = "I=SPEC")]
    node_fault: Vec<String>,
    /// The started coordinator: members sampled per sampling round (K) [default: 4]
    #[arg(long, allow_negative_numbers = true)]
    sample: Option<i64>,
    /// The started coordinator: rounds between two sampling rounds (H_s) [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    sample_every: Option<i64>,
    /// The started coordinator: where averages go, s2s or s2a [default: s2a]
    #[arg(long)]
    target: Option<String>,
    #[command(flatten)]
    train: TrainOptions,
    #[command(flatten)]
    run: RunOptions,
}

/// A cluster's training options: 4 nodes unless told, none of them fixed
/// (each process gets its own `--node`).
pub(super) fn as_cluster(train: &mut TrainOptions) {
    train.nodes = Some(train.nodes.unwrap_or(4));
    train.node = None;
}

/// `I=SPEC` as (node index, spec), checked against the cluster's size.
fn node_fault(text: &str, n: usize) -> Result<(usize, FaultSpec), CliError> {
    let (i, spec) = text.split_once('=').ok_or_else(|| {
        CliError::usage(format!("--node-fault {text:?} must be I=SPEC, as in 2=sign-flip"))
    })?;
    let i: usize = i.trim().parse().ok().filter(|&i| i < n).ok_or_else(|| {
        CliError::usage(format!("--node-fault {text:?}: node {i:?} is not one of 0..{n}"))
    })?;
    let spec = spec.parse().map_err(|e| CliError::usage(format!("--node-fault: {e}")))?;
    Ok((i, spec))
}

/// What the cluster knows of one node while it runs.
#[derive(Debug, Default, Clone)]
pub(super) struct NodeLine {
    pub peer: String,
    pub round: u64,
    pub rounds: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub bytes_sent: u64,
    pub state: String,
    pub api: Option<String>,
    pub faults: Vec<String>,
}

pub fn run(args: ClusterArgs) -> Result<(), CliError> {
    let (file_train, file_run) = match &args.config {
        Some(path) => super::run::read_config(path)?,
        None => Default::default(),
    };
    let mut train = file_train.overridden_by(&args.train);
    as_cluster(&mut train);
    let mut run = file_run.overridden_by(&args.run);
    let train_cfg = train.resolve().map_err(CliError::usage)?;
    let coordinated = run.strategy.is_some_and(|k| k.coordinated());
    let start_coordinator = match run.coordinator.as_deref() {
        Some(START_COORDINATOR) => true,
        Some(_) => false,
        None => coordinated,
    };
    let coordinator_args = coordinator_args(&args, start_coordinator)?;
    if start_coordinator {
        // Checked with a stand-in address until the real one is known.
        run.coordinator = Some(format!("/ip4/127.0.0.1/tcp/1/p2p/{}", libp2p::PeerId::random()));
    }
    let run_cfg = run.resolve(&train_cfg).map_err(CliError::usage)?;
    let split = load::load(&train_cfg.data_spec(), train_cfg.holdout).map_err(CliError::usage)?;
    if args.out.join("cluster.json").exists() || args.out.join("node-0").exists() {
        return Err(CliError::usage(format!(
            "--out {} already holds a cluster; choose another --out",
            args.out.display()
        )));
    }
    // Nodes are driven through the file; their own flags place them.
    run.listen = None;
    run.bootstrap = None;
    run.progress = None;
    let n = train_cfg.nodes;
    let mut faults: Vec<Vec<FaultSpec>> = vec![Vec::new(); n];
    for text in &args.node_fault {
        let (i, spec) = node_fault(text, n)?;
        faults[i].push(spec);
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| CliError::failed(format!("cannot create {}: {e}", args.out.display())))?;
    let coordinator = match coordinator_args {
        Some(extra) => {
            let mut c = Coordinator::spawn(&args.out, &run_cfg, train_cfg.seed, n, &extra)?;
            run.coordinator = Some(c.addr.clone());
            c.line.state = "waiting".into();
            Some(c)
        }
        None => None,
    };
    // What evaluates the average at the end: a trainer holds the held-out
    // set as a tensor, so the data as loaded need not stay for the whole run.
    let evaluator = Trainer::new(TrainConfig { threads: 1, ..train_cfg.clone() }, &split).ok();
    drop(split);
    let config_path = args.out.join("cluster.toml");
    write_config(&config_path, &train, &run)?;
    let started = Instant::now();
    let (children, lines) = spawn_nodes(&args.out, &config_path, &faults)?;
    // With --api-tls-cert (self-signed) the nodes' APIs are read trusting it.
    let (statuses, apis, coordinator) =
        watch(children, lines, n, run.api_tls_cert.clone(), coordinator);
    let wall = started.elapsed().as_secs_f64();
    let evaluate_average = |avg: &[f32]| -> Option<EvalMetrics> {
        let mut t = evaluator?;
        t.set_flat(avg).ok()?;
        Some(t.evaluate())
    };
    let nodes = NodeRecords { exits: statuses, apis, faults };
    report(&args.out, n, nodes, coordinator, wall, train_cfg.model.name(), evaluate_average)
}

/// The started coordinator's own flags, checked: `None` when none is
/// started (then its flags are refused).
fn coordinator_args(args: &ClusterArgs, start: bool) -> Result<Option<Vec<String>>, CliError> {
    let given = [
        ("--sample", args.sample.map(|v| v.to_string())),
        ("--sample-every", args.sample_every.map(|v| v.to_string())),
        ("--target", args.target.clone()),
    ];
    if !start {
        if let Some((flag, _)) = given.iter().find(|(_, v)| v.is_some()) {
            return Err(CliError::usage(format!(
                "{flag} is an option of the coordinator the cluster starts; add --coordinator (alone) or --strategy semidec or fedavg"
            )));
        }
        return Ok(None);
    }
    for (flag, v) in [("--sample", args.sample), ("--sample-every", args.sample_every)] {
        if let Some(v) = v.filter(|v| *v < 1) {
            return Err(CliError::usage(format!("{flag} must be > 0 (got {v})")));
        }
    }
    if let Some(t) = args.target.as_deref().filter(|t| !matches!(*t, "s2s" | "s2a")) {
        return Err(CliError::usage(format!("--target {t:?} must be s2s or s2a")));
    }
    Ok(Some(given.into_iter().filter_map(|(f, v)| Some([f.to_string(), v?])).flatten().collect()))
}

/// A `murmur-coordinator` the cluster started.
struct Coordinator {
    child: Child,
    /// Its multiaddr, for the nodes' --coordinator.
    addr: String,
    api: Option<String>,
    line: CoordinatorLine,
    client: Option<NodeClient>,
    last: Option<murmur_proto::coordinator::v1::CoordinatorStatus>,
}

#[derive(Debug, Default, Clone)]
struct CoordinatorLine {
    peer: String,
    state: String,
}

impl Coordinator {
    /// Starts it beside this `murmur` (the same directory) and waits for
    /// the line that says where it listens.
    fn spawn(
        out: &Path,
        run: &crate::daemon::config::RunConfig,
        seed: u64,
        nodes: usize,
        extra: &[String],
    ) -> Result<Coordinator, CliError> {
        let exe = std::env::current_exe()
            .map_err(|e| CliError::failed(format!("cannot find the murmur binary: {e}")))?
            .with_file_name("murmur-coordinator");
        if !exe.exists() {
            return Err(CliError::failed(format!(
                "--coordinator starts murmur-coordinator, which is not at {} (build it: cargo build --release --workspace)",
                exe.display()
            )));
        }
        let log = std::fs::File::create(out.join("coordinator.log"))
            .map_err(|e| CliError::failed(format!("cannot create coordinator log: {e}")))?;
        let mut child = Command::new(&exe)
            .arg("--dir")
            .arg(out.join("coordinator"))
            .args(["--run-id", &run.run_id, "--seed", &seed.to_string()])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"])
            .args(["--progress", "json", "--min-members", &nodes.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| CliError::failed(format!("cannot start {}: {e}", exe.display())))?;
        let failed = || {
            CliError::failed(format!(
                "the coordinator did not start; see {}",
                out.join("coordinator.log").display()
            ))
        };
        let Some(stdout) = child.stdout.take() else { return Err(failed()) };
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let v: Value = serde_json::from_str(&first).unwrap_or(Value::Null);
        let Some(addr) = v["addrs"][0].as_str().map(str::to_string) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed());
        };
        // Its progress lines go to a file of their own.
        let mut record = std::fs::File::create(out.join("coordinator.jsonl"))
            .map_err(|e| CliError::failed(format!("cannot create coordinator.jsonl: {e}")))?;
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(record, "{line}");
            }
        });
        let peer = v["peer_id"].as_str().unwrap_or_default().to_string();
        Ok(Coordinator {
            child,
            addr,
            api: v["api"].as_str().map(str::to_string),
            line: CoordinatorLine { peer, state: "starting".into() },
            client: None,
            last: None,
        })
    }

    /// Reads its status (briefly).
    async fn poll(&mut self, ca: Option<&Path>) {
        const PATIENCE: Duration = Duration::from_millis(500);
        let Some(api) = self.api.clone() else { return };
        if self.client.is_none() {
            self.client = NodeClient::connect(&api, None, ca, PATIENCE).await.ok();
        }
        let Some(client) = self.client.as_mut() else { return };
        if let Ok(Ok(s)) = tokio::time::timeout(PATIENCE, client.coordinator_status()).await {
            self.line.state = match (s.collecting_round, s.samples.last()) {
                (Some(r), _) => format!(
                    "collecting round {r}: {}/{} answered",
                    s.collecting_answered,
                    s.collecting_sampled.len()
                ),
                (None, Some(last)) => format!("round {} averaged", last.round),
                (None, None) => format!("{} members", s.members.len()),
            };
            self.last = Some(s);
        }
    }

    fn render(&self) -> String {
        let peer = self.line.peer.get(self.line.peer.len().saturating_sub(8)..).unwrap_or("");
        let (rounds, averaged) =
            self.last.as_ref().map_or((0, 0), |s| (s.rounds_sampled, s.rounds_aggregated));
        format!(
            "coordinator ..{peer:<8} sampling rounds {rounds} ({averaged} averaged), {}",
            self.line.state
        )
    }

    /// Stops it (Shutdown through its API; killed if that fails).
    async fn stop(&mut self) {
        let stopped = match self.client.as_mut() {
            Some(c) => c.coordinator_shutdown().await.is_ok(),
            None => false,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while stopped && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What cluster.json says of it.
    fn entry(&self) -> Value {
        let Some(s) = &self.last else { return json!({"addr": self.addr, "api": self.api}) };
        json!({
            "addr": self.addr,
            "api": self.api,
            "peer_id": s.peer_id,
            "target": s.target,
            "sample_size": s.sample_size,
            "sample_every": s.sample_every,
            "rounds_sampled": s.rounds_sampled,
            "rounds_aggregated": s.rounds_aggregated,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "refusals": s.refusals,
        })
    }
}

/// What the cluster recorded of its nodes.
struct NodeRecords {
    exits: Vec<Option<i32>>,
    apis: Vec<Option<String>>,
    faults: Vec<Vec<FaultSpec>>,
}

impl NodeRecords {
    /// A node failed unless it exited 0 or crashed by the crash it was given.
    fn failed(&self, i: usize) -> bool {
        let crash_given = self.faults[i].iter().any(|f| matches!(f.kind, FaultKind::Crash { .. }));
        match self.exits[i] {
            Some(0) => false,
            Some(CRASH_EXIT_CODE) => !crash_given,
            _ => true,
        }
    }
}

pub(super) fn write_config(
    path: &Path,
    train: &TrainOptions,
    run: &RunOptions,
) -> Result<(), CliError> {
    let mut table = toml::Table::try_from(train).map_err(CliError::failed)?;
    table.extend(toml::Table::try_from(run).map_err(CliError::failed)?);
    let text = toml::to_string(&table).map_err(CliError::failed)?;
    std::fs::write(path, text)
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
}

pub(super) type Lines = mpsc::Receiver<(usize, Value)>;

/// Starts the nodes: node 0 first, on a port of its own choosing, and the
/// others once it says where it listens (no port is picked in advance, so
/// none can be taken by someone else in between).
fn spawn_nodes(
    out: &Path,
    config: &Path,
    faults: &[Vec<FaultSpec>],
) -> Result<(Vec<Child>, Lines), CliError> {
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::with_capacity(faults.len());
    let mut boot_addr: Option<String> = None;
    for (i, node_faults) in faults.iter().enumerate() {
        let mut extra = Vec::new();
        for f in node_faults {
            extra.extend(["--fault".to_string(), f.to_string()]);
        }
        let (child, first) =
            spawn_node(out, config, i, &Place::Loopback, boot_addr.as_deref(), &extra, &tx)?;
        if let Some(v) = first {
            boot_addr = v["addrs"][0].as_str().map(str::to_string);
            let _ = tx.send((i, v));
        }
        children.push(child);
    }
    Ok((children, rx))
}

/// Where a node runs.
#[derive(Debug, Clone)]
pub(super) enum Place {
    /// Here, on 127.0.0.1.
    Loopback,
    /// In network namespace `ns`, listening (and serving its API) on `ip`.
    Netns { ns: String, ip: std::net::Ipv4Addr },
}

/// Starts node `i` at `place`: `murmur run` with the cluster's config
/// file, its own directory and log (appended to, for a restart), one
/// libtorch thread, and `extra` flags. Its progress lines go to `tx`. Without `boot` it is
/// the bootstrap node: its first line (where it listens) is read here and
/// returned, and it is an error if that line does not say.
pub(super) fn spawn_node(
    out: &Path,
    config: &Path,
    i: usize,
    place: &Place,
    boot: Option<&str>,
    extra: &[String],
    tx: &mpsc::Sender<(usize, Value)>,
) -> Result<(Child, Option<Value>), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(format!("cannot find the murmur binary: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(format!("node-{i}.log")))
        .map_err(|e| CliError::failed(format!("cannot create node log: {e}")))?;
    let (mut cmd, ip) = match place {
        Place::Loopback => (Command::new(&exe), std::net::Ipv4Addr::LOCALHOST),
        Place::Netns { ns, ip } => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&exe);
            (c, *ip)
        }
    };
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(out.join(format!("node-{i}")))
        .args(["--node", &i.to_string(), "--listen", &format!("/ip4/{ip}/tcp/0")])
        .args(["--progress", "json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if let Some(addr) = boot {
        cmd.arg("--bootstrap").arg(addr);
    }
    if matches!(place, Place::Netns { .. }) {
        cmd.args(["--api", &format!("{ip}:0")]);
    }
    if std::env::var_os("MURMUR_THREADS").is_none() {
        cmd.env("MURMUR_THREADS", "1");
    }
    let mut child =
        cmd.spawn().map_err(|e| CliError::failed(format!("cannot start node {i}: {e}")))?;
    let Some(stdout) = child.stdout.take() else { return Ok((child, None)) };
    let mut lines = BufReader::new(stdout).lines();
    let mut first = None;
    if boot.is_none() {
        // The bootstrap node's first line says where it listens.
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["addrs"][0].as_str().is_none() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CliError::failed(format!(
                "node {i} did not start; see {}",
                out.join(format!("node-{i}.log")).display()
            )));
        }
        first = Some(v);
    }
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send((i, v));
            }
        }
    });
    Ok((child, first))
}

/// Follows the nodes until all have exited; returns their exit codes and
/// API addresses. Progress comes from each node's GetStatus once its API is
/// known (its first progress line says where), from its progress lines before.
fn watch(
    mut children: Vec<Child>,
    lines: Lines,
    n: usize,
    ca: Option<std::path::PathBuf>,
    mut coordinator: Option<Coordinator>,
) -> (Vec<Option<i32>>, Vec<Option<String>>, Option<Coordinator>) {
    let mut state = vec![NodeLine { state: "starting".into(), ..Default::default() }; n];
    let mut status: Vec<Option<Option<i32>>> = vec![None; n];
    let mut clients: Vec<Option<NodeClient>> = vec![None; n];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
    let tty = std::io::stdout().is_terminal();
    let mut drawn = false;
    let mut last_print = Instant::now();
    let mut last_decile = 0;
    let started = Instant::now();
    while status.iter().any(Option::is_none) {
        while let Ok((i, v)) = lines.recv_timeout(Duration::from_millis(200)) {
            update(&mut state[i], &v);
        }
        if let Some(rt) = &runtime {
            rt.block_on(poll_statuses(&mut state, &mut clients, &status, ca.as_deref()));
            if let Some(c) = coordinator.as_mut() {
                rt.block_on(c.poll(ca.as_deref()));
            }
        }
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none()
                && let Ok(Some(s)) = c.try_wait()
            {
                status[i] = Some(s.code());
                state[i].state = match s.code() {
                    Some(0) => "done".into(),
                    Some(CRASH_EXIT_CODE) => "crashed".into(),
                    _ => "failed".into(),
                };
            }
        }
        let shown = n + usize::from(coordinator.is_some());
        if tty {
            if drawn {
                print!("\x1b[{shown}A");
            }
            for (i, s) in state.iter().enumerate() {
                println!("\x1b[2K{}", render(i, s));
            }
            if let Some(c) = &coordinator {
                println!("\x1b[2K{}", c.render());
            }
            drawn = true;
        } else {
            // Off a terminal: a block of lines every tenth of the run (by the
            // slowest node), every 30 s, and at the end.
            let slowest = state.iter().map(|s| s.round * 10 / s.rounds.max(1)).min().unwrap_or(0);
            let all_done = status.iter().all(Option::is_some);
            if slowest > last_decile || last_print.elapsed() > Duration::from_secs(30) || all_done {
                println!("-- {:.0}s", started.elapsed().as_secs_f64());
                for (i, s) in state.iter().enumerate() {
                    println!("{}", render(i, s));
                }
                if let Some(c) = &coordinator {
                    println!("{}", c.render());
                }
                last_print = Instant::now();
                last_decile = slowest;
            }
        }
        let _ = std::io::stdout().flush();
    }
    if let (Some(rt), Some(c)) = (&runtime, coordinator.as_mut()) {
        rt.block_on(c.stop());
    }
    let apis = state.into_iter().map(|s| s.api).collect();
    (status.into_iter().map(Option::flatten).collect(), apis, coordinator)
}

/// Reads every running node's status through its API (briefly: a node that
/// does not answer keeps its last line).
async fn poll_statuses(
    state: &mut [NodeLine],
    clients: &mut [Option<NodeClient>],
    exited: &[Option<Option<i32>>],
    ca: Option<&std::path::Path>,
) {
    const PATIENCE: Duration = Duration::from_millis(500);
    for (i, line) in state.iter_mut().enumerate() {
        let Some(api) = line.api.clone().filter(|_| exited[i].is_none()) else { continue };
        if clients[i].is_none() {
            clients[i] = NodeClient::connect(&api, None, ca, PATIENCE).await.ok();
        }
        let Some(client) = clients[i].as_mut() else { continue };
        if let Ok(Ok(s)) = tokio::time::timeout(PATIENCE, client.status()).await {
            line.take_status(&s);
        }
    }
}

impl NodeLine {
    /// What a status read says of the node's progress.
    pub(super) fn take_status(&mut self, s: &murmur_proto::v1::NodeStatus) {
        self.state = super::status::phase_name(s.phase);
        self.round = s.round;
        self.rounds = s.rounds;
        // A relay has no loss (NaN): shown as none.
        self.loss = s.train_loss.filter(|l| l.is_finite());
        self.accuracy = s.eval_accuracy.or(self.accuracy);
        self.bytes_sent = s.traffic.map_or(self.bytes_sent, |t| t.bytes_sent);
        self.faults = s.active_faults.iter().map(|f| f.spec.clone()).collect();
    }
}

pub(super) fn update(line: &mut NodeLine, v: &Value) {
    match v["event"].as_str() {
        Some("listening") => {
            line.peer = v["peer_id"].as_str().unwrap_or_default().to_string();
            line.api = v["api"].as_str().map(str::to_string);
            line.state = "joining".into();
        }
        Some("round") => {
            line.round = v["round"].as_u64().unwrap_or(line.round) + 1;
            line.rounds = v["rounds"].as_u64().unwrap_or(line.rounds);
            line.loss = v["loss"].as_f64();
            line.bytes_sent = v["bytes_sent"].as_u64().unwrap_or(line.bytes_sent);
            line.state = "training".into();
        }
        Some("eval") => line.accuracy = v["metrics"]["accuracy"].as_f64().or(line.accuracy),
        Some("done") => {
            line.accuracy = v["final"]["eval_accuracy"].as_f64().or(line.accuracy);
            line.state = "finishing".into();
        }
        _ => {}
    }
}

pub(super) fn render(i: usize, s: &NodeLine) -> String {
    let peer = s.peer.get(s.peer.len().saturating_sub(8)..).unwrap_or("");
    let faults = if s.faults.is_empty() {
        String::new()
    } else {
        format!("  faults {}", s.faults.join(" "))
    };
    format!(
        "node {i:>2} ..{peer:<8} {:<9} round {:>4}/{:<4} loss {:>7} acc {:>7} sent {}{faults}",
        s.state,
        s.round,
        s.rounds,
        s.loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
        s.accuracy.map(|a| format!("{:.2}%", a * 100.0)).unwrap_or_else(|| "-".into()),
        crate::daemon::human_bytes(s.bytes_sent)
    )
}

fn report(
    out: &Path,
    n: usize,
    records: NodeRecords,
    coordinator: Option<Coordinator>,
    wall: f64,
    model: &str,
    evaluate_average: impl FnOnce(&[f32]) -> Option<EvalMetrics>,
) -> Result<(), CliError> {
    let summaries: Vec<Option<Value>> = (0..n)
        .map(|i| std::fs::read_to_string(out.join(format!("node-{i}/summary.json"))).ok())
        .map(|t| t.and_then(|t| serde_json::from_str(&t).ok()))
        .collect();
    let params: Vec<Vec<f32>> = (0..n)
        .filter_map(|i| read_model(&out.join(format!("node-{i}/checkpoint/model.safetensors"))))
        .collect();
    let consensus = consensus_distance(&params);
    // The average of the final models, evaluated on the held-out set.
    let average = mean_model(&params).and_then(|avg| evaluate_average(&avg));
    let nodes: Vec<Value> = summaries
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.clone().unwrap_or(Value::Null);
            json!({
                "index": i,
                "peer_id": s["peer_id"],
                "data_dir": out.join(format!("node-{i}")),
                "api": records.apis[i],
                "faults": records.faults[i].iter().map(ToString::to_string).collect::<Vec<_>>(),
                "exit_status": records.exits[i],
                "refusals": s["refusals"],
                "strategy_drops": s["strategy_drops"],
                "fault_effects": s["fault_effects"],
                "final": s["final"],
                "local": s["local"],
                "bytes_sent": s["bytes"]["bytes_sent"],
                "bytes_received": s["bytes"]["bytes_received"],
                "rounds": s["rounds"],
                "wall_seconds": s["wall_seconds"],
                "peak_rss_bytes": s["peak_rss_bytes"],
                "file_rss_bytes": s["file_rss_bytes"],
                "timing": s["timing"],
                "outer": s["outer"],
                "bytes_per_outer_step": s["bytes_per_outer_step"],
                "pulled_from": s["pulled_from"],
                "coordinator": s["coordinator"],
            })
        })
        .collect();
    let strategy =
        summaries.iter().flatten().next().map(|s| s["strategy"].clone()).unwrap_or(Value::Null);
    let mut doc = json!({
        "nodes": nodes,
        "strategy": strategy,
        "model": model,
        "consensus_distance": consensus,
        "average": average.map(|m| json!({"eval_loss": m.loss, "eval_accuracy": m.accuracy, "eval_perplexity": m.perplexity})),
        "wall_seconds": wall,
    });
    if strategy == "merge" {
        doc["merged"] = merged_entry(&summaries);
    }
    if strategy == "diloco" {
        doc["diloco"] = diloco_entry(&summaries);
    }
    if let Some(c) = &coordinator {
        doc["coordinator"] = c.entry();
    }
    let path = out.join("cluster.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).map_err(CliError::failed)?)
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))?;
    let chart = out.join("accuracy.svg");
    std::fs::write(&chart, charts(&summaries))
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", chart.display())))?;
    print_table(&doc);
    println!("wrote {} and {}", path.display(), chart.display());
    match (0..n).filter(|&i| records.failed(i)).count() {
        0 => Ok(()),
        k => Err(CliError::failed(format!(
            "{k} of {n} nodes failed; see {}/node-*.log",
            out.display()
        ))),
    }
}

/// For `merge`: the merged model's metrics and the mean local model's.
fn merged_entry(summaries: &[Option<Value>]) -> Value {
    let done: Vec<&Value> = summaries.iter().flatten().collect();
    let mean = |f: &dyn Fn(&Value) -> Option<f64>| {
        let v: Vec<f64> = done.iter().filter_map(|s| f(s)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    json!({
        "eval_accuracy": mean(&|s| s["final"]["eval_accuracy"].as_f64()),
        "eval_loss": mean(&|s| s["final"]["eval_loss"].as_f64()),
        "local_mean_accuracy": mean(&|s| s["local"]["eval_accuracy"].as_f64()),
        "local_mean_loss": mean(&|s| s["local"]["eval_loss"].as_f64()),
    })
}

fn charts(summaries: &[Option<Value>]) -> String {
    let series = |x_key: &str, scale: f64| -> Vec<Series> {
        summaries
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
            .map(|(i, s)| Series {
                name: format!("node {i}"),
                points: s["evals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        Some((
                            e[x_key].as_f64()? / scale,
                            e["accuracy"].as_f64().or(e["loss"].as_f64())?,
                        ))
                    })
                    .collect(),
            })
            .collect()
    };
    svg(&[
        (
            "held-out accuracy by round".into(),
            "round".into(),
            "accuracy".into(),
            series("round", 1.0),
        ),
        (
            "held-out accuracy by bytes sent".into(),
            "MB sent".into(),
            "accuracy".into(),
            series("bytes_sent", 1e6),
        ),
    ])
}

fn nodes_of(doc: &Value) -> impl Iterator<Item = &Value> {
    doc["nodes"].as_array().into_iter().flatten()
}

fn print_table(doc: &Value) {
    println!(
        "{:<5} {:<14} {:>6} {:>10} {:>10} {:>11} {:>11}",
        "node", "peer", "exit", "loss", "accuracy", "sent", "received"
    );
    for n in nodes_of(doc) {
        let peer = n["peer_id"].as_str().unwrap_or("-");
        let b =
            |k: &str| n[k].as_u64().map(crate::daemon::human_bytes).unwrap_or_else(|| "-".into());
        println!(
            "{:<5} ..{:<12} {:>6} {:>10} {:>10} {:>11} {:>11}",
            n["index"],
            peer.get(peer.len().saturating_sub(12)..).unwrap_or("-"),
            n["exit_status"].as_i64().map(|c| c.to_string()).unwrap_or_else(|| "killed".into()),
            n["final"]["eval_loss"]
                .as_f64()
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            n["final"]["eval_accuracy"]
                .as_f64()
                .map(|a| format!("{:.2}%", a * 100.0))
                .unwrap_or_else(|| "-".into()),
            b("bytes_sent"),
            b("bytes_received"),
        );
    }
    if let Some(a) = doc["average"]["eval_accuracy"].as_f64() {
        println!("average of the final models: accuracy {:.2}%", a * 100.0);
    } else if let Some(l) = doc["average"]["eval_loss"].as_f64() {
        println!("average of the final models: held-out loss {l:.4}");
    }
    println!(
        "consensus distance: {}",
        doc["consensus_distance"].as_f64().map(|d| format!("{d:.6}")).unwrap_or_else(|| "-".into())
    );
    // The lowest and highest of a byte count over the nodes, in MB.
    let range_mb = |key: &str| {
        let bytes = || nodes_of(doc).filter_map(|n| n[key].as_u64());
        Some((bytes().min()? as f64 / 1e6, bytes().max()? as f64 / 1e6))
    };
    if let Some((lo, hi)) = range_mb("peak_rss_bytes") {
        let shared = range_mb("file_rss_bytes")
            .map(|(f0, f1)| format!(", of which {f0:.0} to {f1:.0} MB maps shared code"))
            .unwrap_or_default();
        println!("peak memory per node: {lo:.0} to {hi:.0} MB (RSS{shared})");
    }
    if let Some(d) = doc.get("diloco") {
        println!(
            "diloco: {} outer steps, outer lr {}, {} sent per outer step by each node",
            d["outer_steps"],
            d["outer_lr"],
            d["bytes_per_outer_step"]
                .as_f64()
                .map(|b| crate::daemon::human_bytes(b as u64))
                .unwrap_or_else(|| "-".into()),
        );
    }
    if let Some(m) = doc.get("merged") {
        println!(
            "merged model accuracy {}, mean local model accuracy {}",
            m["eval_accuracy"]
                .as_f64()
                .map(|a| format!("{:.2}%", a * 100.0))
                .unwrap_or_else(|| "-".into()),
            m["local_mean_accuracy"]
                .as_f64()
                .map(|a| format!("{:.2}%", a * 100.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
}

/// For `diloco`: outer steps, the outer learning rate and the bytes sent
/// per outer step, over the nodes that finished.
fn diloco_entry(summaries: &[Option<Value>]) -> Value {
    let done: Vec<&Value> = summaries.iter().flatten().collect();
    let mean = |f: &dyn Fn(&Value) -> Option<f64>| {
        let v: Vec<f64> = done.iter().filter_map(|s| f(s)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    json!({
        "outer_steps": done.iter().filter_map(|s| s["outer"]["steps"].as_u64()).max(),
        "outer_lr": done.iter().find_map(|s| s["outer"]["lr"].as_f64()),
        "outer_momentum": done.iter().find_map(|s| s["outer"]["momentum"].as_f64()),
        "bytes_per_outer_step": mean(&|s: &Value| s["bytes_per_outer_step"].as_f64()),
        "bytes_sent": done.iter().filter_map(|s| s["bytes"]["bytes_sent"].as_u64()).sum::<u64>(),
    })
}

/// A checkpoint's parameters in canonical (name-sorted) order.
pub(super) fn read_model(path: &Path) -> Option<Vec<f32>> {
    let mut tensors = tch::Tensor::read_safetensors(path).ok()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (_, t) in tensors {
        out.extend(Vec::<f32>::try_from(t.flatten(0, -1)).ok()?);
    }
    Some(out)
}

/// The models as slices, if they all have the same length.
fn same_length(models: &[Vec<f32>]) -> Option<Vec<&[f32]>> {
    let d = models.first()?.len();
    models.iter().all(|m| m.len() == d).then(|| models.iter().map(Vec::as_slice).collect())
}

/// The element-wise mean of equally long models.
pub(super) fn mean_model(models: &[Vec<f32>]) -> Option<Vec<f32>> {
    Some(consensus::mean(&same_length(models)?).into_iter().map(|v| v as f32).collect())
}

/// sqrt((1/n) * sum_i ||x_i - mean||^2): how far the models are from agreeing.
pub fn consensus_distance(models: &[Vec<f32>]) -> Option<f64> {
    Some(consensus::consensus_distance(&same_length(models)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consensus_distance_is_rms_distance_to_the_mean() {
        assert_eq!(consensus_distance(&[vec![1.0, 1.0], vec![1.0, 1.0]]), Some(0.0));
        // Mean (0, 0); each model at distance sqrt(2).
        let d = consensus_distance(&[vec![1.0, 1.0], vec![-1.0, -1.0]]).unwrap();
        assert!((d - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(consensus_distance(&[vec![1.0], vec![1.0, 2.0]]), None);
    }
}
