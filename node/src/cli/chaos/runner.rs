//! Runs a scenario's cluster and applies its events while it trains.
//!
//! The nodes are `murmur run` processes started as `murmur cluster` starts
//! them. Every ~250 ms the runner reads each live node's status over gRPC
//! (a `Sample`), and fires the next event once it is due: events fire in
//! the order written, a round event when the furthest live node has
//! completed that round, a time event that long after the first round
//! ended. Kills and stops are signals to the process; a restart starts the
//! node again with `--resume` from its directory, bootstrapping from a live
//! node; faults and partitions go through the node's API (`InjectFault`)
//! and are cleared the same way. With netns every node runs in a namespace
//! of its own (`netns::Hosts`); link events reshape, cut and restore its
//! link there, and partitions are nftables drops. Every event is logged with the round and
//! time it took effect and what it did to each node.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use serde::Serialize;
use serde_json::Value;

use super::netns::{Drops, Hosts, Shape};
use super::scenario::{Action, AttachFile, Event, LinkChange, Scenario, Selection, When};
use crate::api::ApiToken;
use crate::api::client::NodeClient;
use crate::cli::CliError;
use crate::cli::cluster::{self, NodeLine, Place};
use crate::daemon::config::RunOptions;
use crate::fault::{FaultKind, FaultSpec};
use crate::mix::topology::{Topology, TopologySpec};
use crate::net::identity;
use crate::train::config::{TrainConfig, TrainOptions};

/// How often the nodes' statuses are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How long one status read or fault call may take.
const PATIENCE: Duration = Duration::from_millis(500);

/// A scenario resolved against its cluster's options.
pub struct Plan {
    pub nodes: usize,
    pub rounds: u64,
    pub topology: TopologySpec,
    pub seed: u64,
    /// One network namespace per node.
    pub netns: bool,
    /// Running nodes' API addresses: nothing is started, events go through
    /// the APIs.
    pub attach: Option<Vec<String>>,
    /// The data-less relays, chosen when a run starts (`relay_nodes`).
    pub relays: Option<Selection>,
    pub events: Vec<Event>,
    /// Nodes a `join` event starts (all start at once in the baseline).
    pub late: BTreeSet<usize>,
    pub train_cfg: TrainConfig,
    train: TrainOptions,
    run: RunOptions,
    token: Option<ApiToken>,
    ca: Option<PathBuf>,
}

impl Plan {
    pub fn new(s: &Scenario, mut train: TrainOptions, mut run: RunOptions) -> Result<Plan, String> {
        cluster::as_cluster(&mut train);
        let train_cfg = train.resolve().map_err(|e| format!("[cluster]: {e}"))?;
        if run.strategy.is_some_and(|k| k.coordinated()) || run.coordinator.is_some() {
            return Err(
                "[cluster]: murmur chaos does not start a coordinator; use gossip, merge or diloco"
                    .into(),
            );
        }
        if let Some(sel) = &s.relays {
            if train.relays.is_some() {
                return Err("relays: given at the top and in [cluster]; give one".into());
            }
            // Checked as the nodes will see it: which nodes is known only
            // once their ids are, how many now.
            let k = sel.count().unwrap_or(0) as i64;
            let probe = TrainOptions { relays: Some((0..k).collect()), ..train.clone() };
            let probe = probe.resolve().map_err(|e| format!("relays: {e}"))?;
            run.resolve(&probe).map_err(|e| format!("relays: {e}"))?;
        }
        let run_cfg = run.resolve(&train_cfg).map_err(|e| format!("[cluster]: {e}"))?;
        // Nodes are placed by the runner's own flags.
        (run.listen, run.bootstrap, run.progress) = (None, None, None);
        let strategy = &run_cfg.strategy;
        Ok(Plan {
            nodes: train_cfg.nodes,
            rounds: strategy.rounds,
            topology: strategy.topology.clone(),
            seed: strategy.seed,
            netns: s.netns,
            attach: None,
            relays: s.relays.clone(),
            events: s.events.clone(),
            late: s.late.clone(),
            token: run_cfg.api_token.clone(),
            ca: run.api_tls_cert.clone(),
            train_cfg,
            train,
            run,
        })
    }

    /// A plan for nodes already running at `a.apis`: no cluster, so no
    /// topology, rounds or model known here (the nodes' statuses say
    /// their rounds).
    pub fn attached(s: &Scenario, a: &AttachFile) -> Result<Plan, String> {
        let token = a
            .api_token_file
            .as_deref()
            .map(ApiToken::from_file)
            .transpose()
            .map_err(|e| format!("[attach] api-token-file: {e}"))?;
        let train = TrainOptions { nodes: Some(a.apis.len() as i64), ..TrainOptions::default() };
        let train_cfg = train.resolve().map_err(|e| format!("[attach]: {e}"))?;
        Ok(Plan {
            nodes: a.apis.len(),
            rounds: 0,
            topology: TopologySpec::Ring,
            seed: 0,
            netns: false,
            attach: Some(a.apis.clone()),
            relays: None,
            events: s.events.clone(),
            late: BTreeSet::new(),
            token,
            ca: a.api_tls_cert.clone(),
            train_cfg,
            train,
            run: RunOptions::default(),
        })
    }
}

/// How long an attached node may go unheard before the runner counts it
/// gone (it may have been stopped or lost by someone else).
const ATTACHED_SILENCE: Duration = Duration::from_secs(30);

/// One read of one node's status.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    pub node: usize,
    pub round: u64,
    pub eval_round: Option<u64>,
    pub accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Mean L2 distance to the neighbours mixed in the last exchange.
    pub consensus: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub live_members: u32,
}

/// An event as it took effect.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// Its place in the scenario, from 1.
    pub event: usize,
    pub label: String,
    pub action: String,
    pub planned: String,
    /// The furthest live node's completed rounds when it took effect, and
    /// seconds since the run started.
    pub round: u64,
    pub secs: f64,
    /// The nodes it acted on, and each one's round then.
    pub nodes: Vec<usize>,
    pub node_rounds: Vec<(usize, u64)>,
    /// "ok", or what it could not do.
    pub outcome: String,
}

/// How a node ended.
#[derive(Debug, Clone, Serialize)]
pub struct NodeEnd {
    pub index: usize,
    pub peer_id: String,
    /// finished, killed, stopped or failed.
    pub state: String,
    pub exit_status: Option<i32>,
    pub starts: u32,
    pub round: u64,
    /// A data-less relay (the scenario's `relays`).
    pub relay: bool,
    /// Its own final model's held-out accuracy, from its summary.json.
    pub accuracy: Option<f64>,
    /// From its summary.json, when it wrote one: seconds between local
    /// phases (exchanging and mixing) and bytes sent and received.
    pub communication_seconds: Option<f64>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    /// netns: its address and what nftables dropped on its ingress.
    pub ip: Option<String>,
    pub drops: Option<Drops>,
}

/// What one run of the cluster recorded.
pub struct RunRecord {
    pub dir: PathBuf,
    pub samples: Vec<Sample>,
    pub applied: Vec<Applied>,
    pub nodes: Vec<NodeEnd>,
    pub wall: f64,
    /// The rounds the furthest node completed.
    pub last_round: u64,
}

/// One node's process and what the runner knows of it.
struct Proc {
    child: Option<Child>,
    line: NodeLine,
    addr: Option<String>,
    client: Option<NodeClient>,
    /// Set by a kill or stop (and cleared by a restart).
    down: Option<&'static str>,
    exit: Option<Option<i32>>,
    faults: Vec<u64>,
    partitions: Vec<u64>,
    starts: u32,
    /// A node the runner did not start: when its status was last read.
    attached: Option<Instant>,
}

impl Proc {
    /// A node just started (its `starts`-th time).
    fn started(child: Child, line: NodeLine, starts: u32) -> Proc {
        Proc { line, starts, ..Proc::new(Some(child)) }
    }

    /// A node with `child` (if the runner started it), nothing known yet.
    fn new(child: Option<Child>) -> Proc {
        Proc {
            child,
            line: NodeLine::default(),
            addr: None,
            client: None,
            down: None,
            exit: None,
            faults: Vec::new(),
            partitions: Vec::new(),
            starts: 1,
            attached: None,
        }
    }

    /// A running node at API address `api`, heard of now.
    fn attached(api: &str) -> Proc {
        Proc {
            child: None,
            line: NodeLine {
                state: "attaching".into(),
                api: Some(api.into()),
                ..Default::default()
            },
            starts: 0,
            attached: Some(Instant::now()),
            ..Proc::new(None)
        }
    }

    /// Whether the run still waits on it: a process not yet exited, or an
    /// attached node still running.
    fn live(&self) -> bool {
        match self.attached {
            Some(_) => self.running(),
            None => self.child.is_some() && self.exit.is_none(),
        }
    }

    /// An attached node that said it was done, or reached its last round
    /// (its API closes as it exits, often before a read sees "done").
    fn attached_done(&self) -> bool {
        self.line.state == "done" || (self.line.rounds > 0 && self.line.round >= self.line.rounds)
    }

    fn running(&self) -> bool {
        match self.attached {
            Some(heard) => {
                self.down.is_none() && !self.attached_done() && heard.elapsed() < ATTACHED_SILENCE
            }
            None => self.child.is_some() && self.exit.is_none() && self.down.is_none(),
        }
    }
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
}

/// The nodes in the order their topology places them (by peer id, as
/// every node orders its roster; `peers[i]` is node i's), and each
/// position's degree.
fn topology_order(plan: &Plan, peers: Vec<PeerId>) -> Result<(Vec<usize>, Vec<usize>), String> {
    let mut by_peer: Vec<(PeerId, usize)> = peers.into_iter().zip(0..).collect();
    by_peer.sort();
    let t = Topology::new(&plan.topology, by_peer.len(), plan.seed).map_err(|e| e.to_string())?;
    let degree = (0..by_peer.len()).map(|p| t.out_neighbours(p, 0).len()).collect();
    Ok((by_peer.into_iter().map(|(_, i)| i).collect(), degree))
}

/// The plan's relays for a run in `dir`. A degree selection needs the
/// nodes' peer ids before they start: their keys are made here, in the
/// directories the nodes will run in, and the nodes load them.
fn relay_nodes(plan: &Plan, dir: &Path) -> Result<BTreeSet<usize>, CliError> {
    let Some(sel) = &plan.relays else { return Ok(BTreeSet::new()) };
    let mut peers = Vec::with_capacity(plan.nodes);
    for i in 0..plan.nodes {
        let key = identity::load_or_create(&dir.join(format!("node-{i}")))
            .map_err(|e| CliError::failed(format!("node {i}'s key: {e}")))?;
        peers.push(key.public().to_peer_id());
    }
    let (order, degree) = topology_order(plan, peers).map_err(CliError::failed)?;
    Ok(sel.resolve(plan.nodes, &order, &degree, &BTreeSet::new(), plan.seed))
}

/// Runs the plan's cluster in `dir`, with its events when `events`.
pub fn run(plan: &Plan, dir: &Path, events: bool) -> Result<RunRecord, CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::failed(format!("cannot create {}: {e}", dir.display())))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start a runtime: {e}")))?;
    if let Some(apis) = &plan.attach {
        let runner = Runner::attach(plan, dir, apis);
        return Ok(drive(runner, &rt, events));
    }
    let config = dir.join("cluster.toml");
    let mut run_options = plan.run.clone();
    let mut token = plan.token.clone();
    if plan.netns && token.is_none() {
        // In a namespace a node's API listens on its own address, not
        // 127.0.0.1, and a node refuses that without a token: one is made
        // for this run, readable by root only.
        let path = dir.join("api-token");
        let text: String = rand::random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect();
        write_private(&path, &text)?;
        token = Some(ApiToken::new(&text).map_err(CliError::failed)?);
        run_options.api_token_file = Some(path);
    }
    let mut train = plan.train.clone();
    let relays = relay_nodes(plan, dir)?;
    if !relays.is_empty() {
        println!("relays (no data, no local steps): {relays:?}");
        train.relays = Some(relays.iter().map(|&i| i as i64).collect());
    }
    let late = if events { plan.late.clone() } else { BTreeSet::new() };
    if !late.is_empty() {
        // The run starts without the nodes a join event starts later.
        run_options.start_members = Some((plan.nodes - late.len()) as i64);
    }
    cluster::write_config(&config, &train, &run_options)?;
    let hosts = match plan.netns {
        true => Some(Hosts::create(plan.nodes).map_err(CliError::failed)?),
        false => None,
    };
    let runner = Runner::start(Runner::new(plan, dir, &config, hosts, token, relays), &late)?;
    Ok(drive(runner, &rt, events))
}

/// Samples the nodes and fires the plan's events (when `events`) until
/// every node has ended; what the run recorded.
fn drive(mut runner: Runner<'_>, rt: &tokio::runtime::Runtime, events: bool) -> RunRecord {
    let plan = runner.plan;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut last_sample = Instant::now();
    let mut next = 0;
    let mut first_round_at = None;
    loop {
        // Progress lines as they come (a node's rounds are seen the moment
        // it reports them), statuses every SAMPLE_EVERY.
        runner.read_lines(SAMPLE_EVERY.saturating_sub(last_sample.elapsed()));
        if last_sample.elapsed() >= SAMPLE_EVERY {
            last_sample = Instant::now();
            rt.block_on(runner.sample(started));
            runner.reap();
        }
        let frontier = runner.frontier();
        if first_round_at.is_none() && frontier >= 1 {
            first_round_at = Some(Instant::now());
        }
        // No event before every node has said where its API is: a fault
        // at round 0 must reach every node it names.
        while events && next < plan.events.len() && runner.all_listening() {
            let due = match plan.events[next].when {
                When::Round(r) => frontier >= r,
                When::After(d) => first_round_at.is_some_and(|t: Instant| t.elapsed() >= d),
            };
            if !due {
                break;
            }
            let applied = rt.block_on(runner.apply(next, started));
            println!(
                "  [round {}, {:.1}s] {}: {}",
                applied.round, applied.secs, applied.label, applied.outcome
            );
            runner.applied.push(applied);
            next += 1;
        }
        if !runner.procs.iter().any(Proc::live) {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            runner.print_block(started);
            last_print = Instant::now();
        }
    }
    runner.print_block(started);
    for (k, e) in plan.events.iter().enumerate().skip(next).filter(|_| events) {
        runner.applied.push(Applied {
            event: k + 1,
            label: e.label.clone(),
            action: e.action.name().into(),
            planned: e.when.to_string(),
            round: runner.frontier(),
            secs: started.elapsed().as_secs_f64(),
            nodes: Vec::new(),
            node_rounds: Vec::new(),
            outcome: "not reached: every node had ended".into(),
        });
    }
    runner.finish(started)
}

struct Runner<'a> {
    plan: &'a Plan,
    dir: &'a Path,
    config: &'a Path,
    procs: Vec<Proc>,
    hosts: Option<Hosts>,
    /// What control calls present: the run's token, or one made for netns.
    token: Option<ApiToken>,
    /// The data-less relays among the nodes.
    relays: BTreeSet<usize>,
    lines: cluster::Lines,
    tx: mpsc::Sender<(usize, Value)>,
    samples: Vec<Sample>,
    applied: Vec<Applied>,
}

impl<'a> Runner<'a> {
    /// A runner with no node yet.
    fn new(
        plan: &'a Plan,
        dir: &'a Path,
        config: &'a Path,
        hosts: Option<Hosts>,
        token: Option<ApiToken>,
        relays: BTreeSet<usize>,
    ) -> Runner<'a> {
        let (tx, lines) = mpsc::channel();
        Runner {
            plan,
            dir,
            config,
            procs: Vec::with_capacity(plan.nodes),
            hosts,
            token,
            relays,
            lines,
            tx,
            samples: Vec::new(),
            applied: Vec::new(),
        }
    }

    /// Starts every node but the `late` ones (held back for a join
    /// event): the first first, the others bootstrapping from it.
    fn start(mut self, late: &BTreeSet<usize>) -> Result<Runner<'a>, CliError> {
        let mut boot: Option<String> = None;
        for i in 0..self.plan.nodes {
            if late.contains(&i) {
                let line = NodeLine { state: "not joined".into(), ..Default::default() };
                self.procs.push(Proc { line, starts: 0, ..Proc::new(None) });
                continue;
            }
            let place = self.hosts.as_ref().map_or(Place::Loopback, |h| h.place(i));
            let (child, first) = cluster::spawn_node(
                self.dir,
                self.config,
                i,
                &place,
                boot.as_deref(),
                &[],
                &self.tx,
            )?;
            if let Some(v) = first {
                boot = v["addrs"][0].as_str().map(str::to_string);
                let _ = self.tx.send((i, v));
            }
            let line = NodeLine { state: "starting".into(), ..Default::default() };
            self.procs.push(Proc::started(child, line, 1));
        }
        Ok(self)
    }

    /// Watches the nodes running at `apis` (their lines come from their
    /// statuses alone; there is no config file, `dir` stands for it).
    fn attach(plan: &'a Plan, dir: &'a Path, apis: &[String]) -> Runner<'a> {
        let mut r = Runner::new(plan, dir, dir, None, plan.token.clone(), BTreeSet::new());
        r.procs = apis.iter().map(|a| Proc::attached(a)).collect();
        r
    }

    /// Takes the progress lines that arrive within `wait` (at least one
    /// if any comes), then those already queued.
    fn read_lines(&mut self, wait: Duration) {
        let first = self.lines.recv_timeout(wait).ok();
        for (i, v) in first.into_iter().chain(std::iter::from_fn(|| self.lines.try_recv().ok())) {
            let p = &mut self.procs[i];
            if v["event"] == "listening" {
                p.addr = v["addrs"][0].as_str().map(str::to_string);
                p.client = None;
            }
            cluster::update(&mut p.line, &v);
        }
    }

    /// Reads every running node's status once.
    async fn sample(&mut self, started: Instant) {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let Some(api) = p.line.api.clone().filter(|_| p.running()) else { continue };
            if p.client.is_none() {
                p.client = NodeClient::connect(
                    &api,
                    self.token.clone(),
                    self.plan.ca.as_deref(),
                    PATIENCE,
                )
                .await
                .ok();
            }
            let Some(client) = p.client.as_mut() else { continue };
            let Ok(Ok(s)) = tokio::time::timeout(PATIENCE, client.status()).await else {
                // A connection that failed once is made afresh next time.
                p.client = None;
                continue;
            };
            p.line.take_status(&s);
            if p.attached.is_some() {
                p.attached = Some(Instant::now());
                p.line.peer.clone_from(&s.peer_id);
            }
            let traffic = s.traffic.unwrap_or_default();
            self.samples.push(Sample {
                t: started.elapsed().as_secs_f64(),
                node: i,
                round: s.round,
                eval_round: s.eval_round,
                accuracy: s.eval_accuracy,
                eval_loss: s.eval_loss,
                consensus: s.consensus_distance,
                bytes_sent: traffic.bytes_sent,
                bytes_received: traffic.bytes_received,
                live_members: s.live_members,
            });
        }
    }

    /// Notes the nodes that exited.
    fn reap(&mut self) {
        for p in &mut self.procs {
            if p.exit.is_none()
                && let Some(c) = p.child.as_mut()
                && let Ok(Some(s)) = c.try_wait()
            {
                p.exit = Some(s.code());
                p.line.state = match (p.down, s.code()) {
                    (Some(d), _) => d.into(),
                    (None, Some(0)) => "done".into(),
                    _ => "failed".into(),
                };
            }
        }
    }

    /// Whether every running node has said where its API listens.
    fn all_listening(&self) -> bool {
        self.procs.iter().filter(|p| p.running()).all(|p| p.line.api.is_some())
    }

    /// The rounds the furthest running node has completed.
    fn frontier(&self) -> u64 {
        self.procs.iter().filter(|p| p.running()).map(|p| p.line.round).max().unwrap_or(0)
    }

    fn print_block(&self, started: Instant) {
        let furthest = self.procs.iter().map(|p| p.line.round).max().unwrap_or(0);
        println!("-- {:.0}s, furthest round {furthest}", started.elapsed().as_secs_f64());
        for (i, p) in self.procs.iter().enumerate() {
            println!("{}", cluster::render(i, &p.line));
        }
        let _ = std::io::stdout().flush();
    }

    /// Which nodes `sel` names now.
    fn resolve(&self, sel: &Selection) -> Result<BTreeSet<usize>, String> {
        let down: BTreeSet<usize> =
            (0..self.procs.len()).filter(|&i| self.procs[i].down.is_some()).collect();
        let (order, degree) = if matches!(sel, Selection::Hubs(_) | Selection::Leaves(_)) {
            self.topology_order()?
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(sel.resolve(self.procs.len(), &order, &degree, &down, self.plan.seed))
    }

    /// The nodes in their topology's order, and each position's degree.
    fn topology_order(&self) -> Result<(Vec<usize>, Vec<usize>), String> {
        let mut peers = Vec::new();
        for (i, p) in self.procs.iter().enumerate() {
            peers.push(
                p.line.peer.parse().map_err(|_| format!("node {i}'s peer id is not known yet"))?,
            );
        }
        topology_order(self.plan, peers)
    }

    async fn apply(&mut self, k: usize, started: Instant) -> Applied {
        let e = &self.plan.events[k];
        let round = self.frontier();
        let mut notes: Vec<String> = Vec::new();
        let nodes: BTreeSet<usize> = match (&e.action, e.action.selection()) {
            (_, Some(s)) => self.resolve(s).unwrap_or_else(|m| {
                notes.push(m);
                BTreeSet::new()
            }),
            (Action::Join(nodes), _) => nodes.clone(),
            (Action::Partition(groups), _) => groups.iter().flatten().copied().collect(),
            // Heal: every node.
            _ => (0..self.procs.len()).collect(),
        };
        let node_rounds = nodes.iter().map(|&i| (i, self.procs[i].line.round)).collect();
        for &i in &nodes {
            if let Err(m) = self.act(&e.action, i).await {
                notes.push(format!("node {i}: {m}"));
            }
        }
        Applied {
            event: k + 1,
            label: e.label.clone(),
            action: e.action.name().into(),
            planned: e.when.to_string(),
            round,
            secs: started.elapsed().as_secs_f64(),
            nodes: nodes.into_iter().collect(),
            node_rounds,
            outcome: if notes.is_empty() { "ok".into() } else { notes.join("; ") },
        }
    }

    /// Does `action` to node `i`.
    async fn act(&mut self, action: &Action, i: usize) -> Result<(), String> {
        let running = self.procs[i].running();
        match action {
            Action::Kill(_) | Action::Stop(_) if !running => Err("not running".into()),
            Action::Kill(_) => {
                let p = &mut self.procs[i];
                p.down = Some("killed");
                p.line.state = "killed".into();
                if let Some(c) = p.child.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait().map(|s| p.exit = Some(s.code()));
                }
                Ok(())
            }
            Action::Stop(_) if self.procs[i].attached.is_some() => {
                let c = self.client(i).await?;
                tokio::time::timeout(PATIENCE * 4, c.shutdown())
                    .await
                    .map_err(|_| "Shutdown timed out".to_string())?
                    .map_err(|e| e.to_string())?;
                let p = &mut self.procs[i];
                p.down = Some("stopped");
                p.line.state = "stopping".into();
                Ok(())
            }
            Action::Stop(_) => {
                let p = &mut self.procs[i];
                p.down = Some("stopped");
                p.line.state = "stopping".into();
                let pid = p.child.as_ref().map(Child::id).ok_or("no process")?;
                // kill(1), not kill(2): this crate has no unsafe code.
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .map_err(|e| format!("cannot run kill: {e}"))?;
                if !sent.success() {
                    return Err(format!("kill -TERM {pid} failed ({sent})"));
                }
                Ok(())
            }
            Action::Restart(_) => self.restart(i),
            Action::Join(_) => self.join(i),
            // Links are there whether the node runs or not.
            Action::Link(_, change) => self.reshape(i, change),
            Action::Cut(_) | Action::Restore(_) => {
                let up = matches!(action, Action::Restore(_));
                self.hosts.as_ref().ok_or("no netns")?.link(i, up)
            }
            Action::Partition(groups) if self.hosts.is_some() => {
                let mine = groups.iter().find(|g| g.contains(&i)).cloned().unwrap_or_default();
                let others: Vec<usize> =
                    groups.iter().flatten().copied().filter(|j| !mine.contains(j)).collect();
                self.hosts.as_mut().ok_or("no netns")?.block(i, &others)
            }
            Action::Heal if self.hosts.is_some() => {
                self.hosts.as_mut().ok_or("no netns")?.block(i, &[])
            }
            Action::Fault(_, spec) if running => {
                let id = self.inject(i, spec).await?;
                self.procs[i].faults.push(id);
                Ok(())
            }
            Action::Clear(_) if running => {
                let ids = std::mem::take(&mut self.procs[i].faults);
                self.clear(i, ids).await
            }
            Action::Partition(groups) if running => {
                let mine = groups.iter().find(|g| g.contains(&i)).cloned().unwrap_or_default();
                let others: Vec<PeerId> = groups
                    .iter()
                    .flatten()
                    .filter(|j| !mine.contains(j))
                    .filter_map(|&j| self.procs[j].line.peer.parse().ok())
                    .collect();
                let spec = FaultSpec {
                    kind: FaultKind::Partition { peers: others },
                    duration: None,
                    from_round: None,
                };
                let id = self.inject(i, &spec).await?;
                self.procs[i].partitions.push(id);
                Ok(())
            }
            Action::Heal if running => {
                let ids = std::mem::take(&mut self.procs[i].partitions);
                if ids.is_empty() { Ok(()) } else { self.clear(i, ids).await }
            }
            Action::Heal => Ok(()),
            _ => Err("not running".into()),
        }
    }

    /// Applies a link event's change over node `i`'s current shape.
    fn reshape(&mut self, i: usize, change: &LinkChange) -> Result<(), String> {
        let hosts = self.hosts.as_mut().ok_or("no netns")?;
        let now = hosts.shape_of(i);
        let shape = Shape {
            loss: change.loss.unwrap_or(now.loss),
            rate_bits: change.rate_bits.unwrap_or(now.rate_bits),
        };
        hosts.shape(i, shape)
    }

    async fn client(&mut self, i: usize) -> Result<&mut NodeClient, String> {
        let p = &mut self.procs[i];
        let api = p.line.api.clone().ok_or("its API is not known yet")?;
        if p.client.is_none() {
            let c =
                NodeClient::connect(&api, self.token.clone(), self.plan.ca.as_deref(), PATIENCE)
                    .await
                    .map_err(|e| e.to_string())?;
            p.client = Some(c);
        }
        p.client.as_mut().ok_or_else(|| "no API client".into())
    }

    async fn inject(&mut self, i: usize, spec: &FaultSpec) -> Result<u64, String> {
        let c = self.client(i).await?;
        let f = tokio::time::timeout(PATIENCE * 4, c.inject(spec))
            .await
            .map_err(|_| "InjectFault timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(f.id)
    }

    async fn clear(&mut self, i: usize, ids: Vec<u64>) -> Result<(), String> {
        if ids.is_empty() {
            return Ok(());
        }
        let c = self.client(i).await?;
        tokio::time::timeout(PATIENCE * 4, c.clear(ids))
            .await
            .map_err(|_| "ClearFaults timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Starts a held-back node into the run under way (--join-running),
    /// bootstrapping from a running node.
    fn join(&mut self, i: usize) -> Result<(), String> {
        if self.procs[i].starts > 0 {
            return Err("already started".into());
        }
        let boot = self.boot_addr()?;
        let place = self.hosts.as_ref().map_or(Place::Loopback, |h| h.place(i));
        let extra = ["--join-running".to_string()];
        let (child, _) =
            cluster::spawn_node(self.dir, self.config, i, &place, Some(&boot), &extra, &self.tx)
                .map_err(|e| e.to_string())?;
        let line = NodeLine { state: "joining".into(), ..Default::default() };
        self.procs[i] = Proc::started(child, line, 1);
        Ok(())
    }

    /// A running node's address, for a starting node to bootstrap from.
    fn boot_addr(&self) -> Result<String, String> {
        self.procs
            .iter()
            .filter(|p| p.running())
            .find_map(|p| p.addr.clone())
            .ok_or_else(|| "no running node to bootstrap from".into())
    }

    /// Starts node `i` again with --resume, bootstrapping from a running node.
    fn restart(&mut self, i: usize) -> Result<(), String> {
        if self.procs[i].running() {
            return Err("still running".into());
        }
        let checkpoint = self.dir.join(format!("node-{i}/checkpoint/meta.json"));
        if !checkpoint.exists() && self.procs[i].down == Some("killed") {
            return Err(
                "no checkpoint to resume from (killed before its first; set checkpoint-every)"
                    .into(),
            );
        }
        if self.procs[i].starts == 0 {
            return Err("not joined yet".into());
        }
        let boot = self.boot_addr()?;
        let p = &mut self.procs[i];
        if let Some(mut c) = p.child.take() {
            // A stopped node may still be saving its checkpoint.
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let place = self.hosts.as_ref().map_or(Place::Loopback, |h| h.place(i));
        let (child, _) = cluster::spawn_node(
            self.dir,
            self.config,
            i,
            &place,
            Some(&boot),
            &["--resume".into()],
            &self.tx,
        )
        .map_err(|e| e.to_string())?;
        let line = NodeLine { state: "restarting".into(), api: None, ..p.line.clone() };
        *p = Proc::started(child, line, p.starts + 1);
        Ok(())
    }

    fn finish(self, started: Instant) -> RunRecord {
        let last_round = self.samples.iter().map(|s| s.round).max().unwrap_or(0);
        let nodes = self
            .procs
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let summary =
                    std::fs::read_to_string(self.dir.join(format!("node-{index}/summary.json")))
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                        .unwrap_or(Value::Null);
                NodeEnd {
                    index,
                    peer_id: p.line.peer.clone(),
                    state: match (p.down, p.exit) {
                        _ if p.starts == 0 && p.attached.is_none() => "never joined".into(),
                        (Some(d), _) => d.to_string(),
                        (None, Some(Some(0))) => "finished".into(),
                        // An attached node that said it was done finished;
                        // one that fell silent is not known to have.
                        (None, None) if p.attached.is_some() && p.attached_done() => {
                            "finished".into()
                        }
                        (None, None) if p.attached.is_some() => "unreachable".into(),
                        _ => "failed".into(),
                    },
                    exit_status: p.exit.flatten(),
                    starts: p.starts,
                    round: p.line.round,
                    relay: self.relays.contains(&index),
                    accuracy: summary["final"]["eval_accuracy"]
                        .as_f64()
                        .or(p.attached.and(p.line.accuracy)),
                    communication_seconds: summary["timing"]["communication_seconds"].as_f64(),
                    bytes_sent: summary["bytes"]["bytes_sent"].as_u64(),
                    bytes_received: summary["bytes"]["bytes_received"].as_u64(),
                    ip: self.hosts.as_ref().map(|h| h.ip(index).to_string()),
                    drops: self.hosts.as_ref().map(|h| h.drops(index)),
                }
            })
            .collect();
        RunRecord {
            dir: self.dir.to_path_buf(),
            samples: self.samples,
            applied: self.applied,
            nodes,
            wall: started.elapsed().as_secs_f64(),
            last_round,
        }
    }
}
