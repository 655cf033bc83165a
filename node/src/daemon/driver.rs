//! The node's event loop (see the module doc of `daemon`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use murmur_proto::v1::Phase;
use murmur_proto::wire::v1::PayloadKind;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::config::{RunConfig, StrategyKind};
use super::report::{EvalPoint, FinalMetrics, NodeSummary, Reporter, human_bytes};
use super::worker::{PhaseDone, Worker, flatten};
use crate::api::metrics::{MetricsServer, serve_metrics};
use crate::api::{ApiServer, Control, SavedCheckpoint};
use crate::fault::{CRASH_EXIT_CODE, Faults};
use crate::mix::aggregate::NormBound;
use crate::mix::comm::CommSchedule;
use crate::mix::gossip::{Gossip, GossipConfig};
use crate::mix::merge::{Exchange, Merge, MergeConfig};
use crate::mix::mixer::{Action, Input, Message, Mixer, MsgKind};
use crate::net::service::{NetConfig, NetEvent, Network, SendError};
use crate::net::wire;
use crate::status::{NodeState, StatusBoard, model_hash};
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::trainer::Trainer;

/// Slot of a rejoining node's request for the current model.
pub const PULL_REQUEST_SLOT: u64 = u64::MAX - 100;
/// Slot of the answer to a pull request.
pub const PULL_REPLY_SLOT: u64 = u64::MAX - 101;
/// Least time a rejoining node waits for the model it pulled.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a node needs, validated.
#[derive(Debug)]
pub struct NodeSetup {
    pub train: TrainConfig,
    pub run: RunConfig,
    pub trainer: Trainer,
    pub key: Keypair,
    pub data_dir: PathBuf,
    /// Saved with checkpoints so `--resume` can rebuild the node.
    pub options: serde_json::Value,
    /// Round to continue from, when resuming.
    pub resume_round: Option<u64>,
    /// The node's faults, holding those given at start (`--fault`).
    pub faults: Faults,
}

/// Why a node stopped early.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Net(#[from] crate::net::service::NetError),
    #[error("strategy: {0}")]
    Strategy(String),
    #[error("trainer: {0}")]
    Trainer(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(transparent)]
    Api(#[from] crate::api::server::ApiError),
}

/// Runs one node to the end of its run (or a signal, or a Shutdown call)
/// and writes its summary.
pub async fn run_node(setup: NodeSetup) -> Result<NodeSummary, NodeError> {
    let fingerprint = setup.trainer.model.layout().fingerprint.to_string();
    let parameters = setup.trainer.model.num_params();
    let run = setup.run.clone();
    let faults = Arc::new(setup.faults);
    let mut net_cfg = NetConfig::new(&run.run_id, &fingerprint, parameters);
    net_cfg.listen = run.listen.clone();
    net_cfg.bootstrap = run.bootstrap.clone();
    net_cfg.swarm.quic = run.quic;
    net_cfg.swarm.security = run.security.clone();
    net_cfg.swarm.mdns = run.mdns;
    net_cfg.swarm.swarm_key = run.swarm_key;
    net_cfg.swarm.allowlist = run.allowlist.clone();
    net_cfg.transfer_timeout = run.round_timeout.max(Duration::from_secs(5));
    net_cfg.faults = faults.clone();
    let (network, events) = Network::start(setup.key.clone(), net_cfg).await?;
    let network = Arc::new(network);
    let initial_hash =
        setup.trainer.model.params().map(|p| model_hash(&p.values)).unwrap_or_default();
    let board = StatusBoard::new(
        NodeState {
            run_id: run.run_id.clone(),
            strategy: format!("{:?}", run.strategy).to_lowercase(),
            phase: Phase::Joining,
            round: setup.resume_round.unwrap_or(0),
            rounds: run.rounds,
            steps_planned: run.rounds * run.local_steps,
            model_hash: initial_hash,
            node_index: setup.train.node as u32,
            nodes: setup.train.nodes as u32,
            ..NodeState::default()
        },
        network.clone(),
        faults.clone(),
    );
    let (control_tx, control) = mpsc::channel(16);
    let api = match run.api {
        Some(addr) => Some(
            crate::api::serve(addr, run.api_token.clone(), board.clone(), control_tx.clone())
                .await?,
        ),
        None => None,
    };
    let metrics = match run.metrics {
        Some(addr) => Some(serve_metrics(addr, board.clone()).await?),
        None => None,
    };
    let reporter = Reporter { format: run.progress };
    let me = network.local_peer;
    let addrs: Vec<String> =
        network.view().listen_addrs.iter().map(|a| format!("{a}/p2p/{me}")).collect();
    let api_addr = api.as_ref().map(|a| a.addr.to_string());
    let metrics_addr = metrics.as_ref().map(|m| m.addr.to_string());
    reporter.emit(
        serde_json::json!({"event": "listening", "peer_id": me.to_string(), "addrs": addrs,
            "api": api_addr, "metrics": metrics_addr}),
        || {
            let mut line = format!(
                "murmur run: node {} of {}, peer {me}, listening on {}",
                setup.train.node,
                setup.train.nodes,
                addrs.join(" ")
            );
            if let Some(a) = &api_addr {
                line += &format!("; API on {a}");
            }
            if let Some(m) = &metrics_addr {
                line += &format!("; metrics on http://{m}/metrics");
            }
            line
        },
    );
    let worker = Worker::spawn(setup.trainer, faults.clone());
    let mut node = Node {
        me,
        network,
        events,
        worker,
        run,
        train: setup.train,
        reporter,
        fingerprint,
        parameters,
        data_dir: setup.data_dir,
        options: setup.options,
        sends: JoinSet::new(),
        send_failures: 0,
        backlog: Vec::new(),
        evals: Vec::new(),
        local_metrics: None,
        last_loss: None,
        steps_done: 0,
        started: Instant::now(),
        timing: PhaseTiming::default(),
        pulled_from: None,
        board,
        faults,
        control,
        _control_tx: control_tx,
        stop_requested: false,
        in_use: Vec::new(),
    };
    let summary = node.run(setup.resume_round).await;
    node.board.update(|s| s.phase = Phase::Done);
    stop_servers(api, metrics).await;
    summary
}

/// Ends the API and metrics servers; a client still watching cannot hold
/// the node up for more than a moment.
async fn stop_servers(api: Option<ApiServer>, metrics: Option<MetricsServer>) {
    drop(metrics);
    if let Some(api) = api {
        let _ = tokio::time::timeout(Duration::from_secs(1), api.stop()).await;
    }
}

struct Node {
    me: PeerId,
    network: Arc<Network>,
    events: mpsc::Receiver<NetEvent>,
    worker: Worker,
    run: RunConfig,
    train: TrainConfig,
    reporter: Reporter,
    fingerprint: String,
    parameters: usize,
    data_dir: PathBuf,
    options: serde_json::Value,
    sends: JoinSet<Result<(), String>>,
    send_failures: u64,
    /// Messages that arrived before the strategy existed.
    backlog: Vec<Message>,
    evals: Vec<EvalPoint>,
    local_metrics: Option<FinalMetrics>,
    last_loss: Option<f64>,
    steps_done: u64,
    started: Instant,
    timing: PhaseTiming,
    /// The peer whose model a rejoining node took.
    pulled_from: Option<PeerId>,
    board: StatusBoard,
    faults: Arc<Faults>,
    control: mpsc::Receiver<Control>,
    /// Keeps `control` open when no API serves (so it never reads as closed).
    _control_tx: mpsc::Sender<Control>,
    /// A Shutdown call came while the node could not stop at once.
    stop_requested: bool,
    /// Received values still held by the strategy; given back to the
    /// network's buffers once only this list holds them.
    in_use: Vec<Arc<Vec<f32>>>,
}

/// Where a node's wall time goes: local phases, and everything between the
/// end of one local phase and the start of the next (exchange and mixing).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PhaseTiming {
    pub compute_seconds: f64,
    pub communication_seconds: f64,
    #[serde(skip)]
    training_since: Option<Instant>,
    #[serde(skip)]
    mixing_since: Option<Instant>,
}

impl PhaseTiming {
    fn train_started(&mut self, now: Instant) {
        if let Some(t) = self.mixing_since.take() {
            self.communication_seconds += now.duration_since(t).as_secs_f64();
        }
        self.training_since = Some(now);
    }

    /// Leaves `d` (round-end evaluation and checkpoint) out of both buckets.
    fn skip(&mut self, d: Duration) {
        if let Some(t) = self.mixing_since.as_mut() {
            *t += d;
        }
    }

    fn train_ended(&mut self, now: Instant) {
        if let Some(t) = self.training_since.take() {
            self.compute_seconds += now.duration_since(t).as_secs_f64();
        }
        self.mixing_since = Some(now);
    }
}

/// How the main loop ended.
enum Ending {
    Finished,
    Interrupted,
}

impl Node {
    async fn run(&mut self, resume_round: Option<u64>) -> Result<NodeSummary, NodeError> {
        self.wait_for_members().await;
        let start_round = match resume_round {
            Some(saved) => self.rejoin(saved).await,
            None => 0,
        };
        let mut mixer = self.strategy(start_round)?;
        let ending = self.drive(mixer.as_mut()).await?;
        self.finish(mixer.as_ref(), resume_round, matches!(ending, Ending::Interrupted)).await
    }

    /// The live run members that train the same model, this node included.
    fn members(&self) -> Vec<PeerId> {
        let mut m: Vec<PeerId> = self
            .network
            .view()
            .members
            .iter()
            .filter(|m| m.role == "node" && m.fingerprint == self.fingerprint)
            .map(|m| m.peer)
            .collect();
        m.push(self.me);
        m.sort();
        m.dedup();
        m
    }

    async fn wait_for_members(&mut self) {
        let deadline = tokio::time::Instant::now() + self.run.join_timeout;
        while self.members().len() < self.train.nodes && !self.stop_requested {
            tokio::select! {
                c = self.control.recv() => self.on_control(c, 0).await,
                ev = self.events.recv() => match ev {
                    Some(NetEvent::Payload { from, payload }) => {
                        if let Some(m) = to_message(from, payload) {
                            self.backlog.push(m);
                        }
                    }
                    Some(_) => {}
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if tokio::time::Instant::now() >= deadline {
                        let found = self.members().len();
                        let msg = format!("join timeout: starting with {found} of {} members", self.train.nodes);
                        warn!("{msg}");
                        self.board.update(|s| s.last_error = msg);
                        return;
                    }
                }
            }
        }
    }

    fn strategy(&self, start_round: u64) -> Result<Box<dyn Mixer>, NodeError> {
        let members = self.members();
        match self.run.strategy {
            StrategyKind::Gossip => {
                let cfg = GossipConfig {
                    topology: self.run.topology.clone(),
                    seed: self.train.seed,
                    rounds: self.run.rounds,
                    local_steps: self.run.local_steps,
                    gossip_steps: self.run.gossip_steps,
                    comm: self.run.comm.unwrap_or(CommSchedule::Every(1)),
                    timeout: self.run.round_timeout,
                    start_round,
                    aggregator: self.run.aggregator,
                    norm_bound: self.run.norm_bound,
                };
                Ok(Box::new(
                    Gossip::new(cfg, self.me, members)
                        .map_err(|e| NodeError::Strategy(e.to_string()))?,
                ))
            }
            StrategyKind::Merge => {
                let exchange = match (self.run.exchange_prob, self.run.comm) {
                    (p, _) if p > 0.0 => Exchange::Random(p),
                    (_, Some(schedule)) => Exchange::Schedule(schedule),
                    _ => Exchange::None,
                };
                let cfg = MergeConfig {
                    seed: self.train.seed,
                    rounds: self.run.rounds,
                    local_steps: self.run.local_steps,
                    exchange,
                    exchange_timeout: self.run.round_timeout,
                    final_timeout: self.run.round_timeout,
                    start_round,
                    aggregator: self.run.aggregator,
                    norm_bound: NormBound::new(self.run.norm_bound).unwrap_or_default(),
                };
                Ok(Box::new(
                    Merge::new(cfg, self.me, members)
                        .map_err(|e| NodeError::Strategy(e.to_string()))?,
                ))
            }
        }
    }

    async fn drive(&mut self, mixer: &mut dyn Mixer) -> Result<Ending, NodeError> {
        let mut training: Option<oneshot::Receiver<Result<PhaseDone, String>>> = None;
        let mut finished = false;
        let params = self.worker.params().await.map_err(NodeError::Trainer)?;
        mixer.set_start_params(&params);
        let now = Instant::now();
        let start = mixer.start(now);
        let first = mixer.round();
        self.faults.set_round(first, Instant::now());
        self.crash_if_due(first);
        self.execute(mixer, start, &mut training, &mut finished, first).await?;
        for m in std::mem::take(&mut self.backlog) {
            let acts = mixer.handle(Input::Received(m), Instant::now());
            let before = mixer.round();
            self.execute(mixer, acts, &mut training, &mut finished, before).await?;
        }
        let mut members = self.members();
        let mut signals = Signals::new();
        let mut fault_changes = self.faults.subscribe();
        while !finished {
            if self.stop_requested {
                return Ok(Ending::Interrupted);
            }
            if self.faults.paused(Instant::now()) {
                if self.wait_out_pause(&mut signals, mixer.round(), training.is_some()).await {
                    return Ok(Ending::Interrupted);
                }
                continue;
            }
            let deadline = mixer.deadline().map(tokio::time::Instant::from_std);
            // Inputs below may end the round; compare after acting on them.
            let before = mixer.round();
            let actions = tokio::select! {
                done = async { training.as_mut().expect("guarded").await }, if training.is_some() => {
                    training = None;
                    self.timing.train_ended(Instant::now());
                    let done = flatten(done).map_err(NodeError::Trainer)?;
                    self.on_phase_done(&done, mixer.round());
                    mixer.handle(Input::LocalDone { params: done.params, samples: done.samples }, Instant::now())
                }
                ev = self.events.recv() => match ev {
                    Some(NetEvent::Payload { from, payload }) => match to_message(from, payload) {
                        Some(m) if m.slot == PULL_REQUEST_SLOT => { self.answer_pull(from).await; Vec::new() }
                        Some(m) if m.slot == PULL_REPLY_SLOT => Vec::new(),
                        Some(m) => {
                            self.in_use.push(m.values.clone());
                            mixer.handle(Input::Received(m), Instant::now())
                        }
                        None => Vec::new(),
                    },
                    Some(NetEvent::Refused { from, header: Some(h) }) => match msg_kind(h.kind) {
                        Some(kind) => mixer.handle(Input::Refused { peer: from, kind, slot: h.round }, Instant::now()),
                        None => Vec::new(),
                    },
                    Some(NetEvent::Refused { .. }) => Vec::new(),
                    Some(NetEvent::MemberJoined(_)) | Some(NetEvent::MemberLeft(_)) => {
                        let now_members = self.members();
                        if now_members != members {
                            members = now_members.clone();
                            mixer.handle(Input::Members(now_members), Instant::now())
                        } else { Vec::new() }
                    }
                    None => return Ok(Ending::Interrupted),
                },
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    mixer.handle(Input::Tick, Instant::now())
                }
                _ = signals.recv() => return Ok(Ending::Interrupted),
                c = self.control.recv() => {
                    self.on_control(c, mixer.round()).await;
                    Vec::new()
                }
                // A new pause must stop the loop even while it waits for peers.
                _ = fault_changes.changed() => Vec::new(),
            };
            self.execute(mixer, actions, &mut training, &mut finished, before).await?;
            self.recycle_unused();
        }
        Ok(Ending::Finished)
    }

    /// Gives the network back the received buffers the strategy let go of.
    fn recycle_unused(&mut self) {
        for values in std::mem::take(&mut self.in_use) {
            match Arc::try_unwrap(values) {
                Ok(v) => self.network.recycle(v),
                Err(still_held) => self.in_use.push(still_held),
            }
        }
    }

    /// Sits out an injected pause (training stops in the trainer, traffic in
    /// the network); the API still answers. Returns true if told to stop.
    async fn wait_out_pause(&mut self, signals: &mut Signals, round: u64, training: bool) -> bool {
        self.board.update(|s| s.phase = Phase::Paused);
        let faults = self.faults.clone();
        let stop = loop {
            tokio::select! {
                _ = faults.wait_unpaused() => break false,
                _ = signals.recv() => break true,
                c = self.control.recv() => {
                    self.on_control(c, round).await;
                    if self.stop_requested {
                        break true;
                    }
                }
            }
        };
        let phase = if training { Phase::Training } else { Phase::Mixing };
        self.board.update(|s| s.phase = phase);
        stop
    }

    /// Carries out an API request. A checkpoint waits for the trainer to
    /// finish the phase it is in; a shutdown ends the run at the next turn.
    async fn on_control(&mut self, c: Option<Control>, round: u64) {
        match c {
            Some(Control::SaveCheckpoint(reply)) => {
                let saved = self.checkpoint(round).await.map(|step| SavedCheckpoint {
                    path: checkpoint::dir_in(&self.data_dir).display().to_string(),
                    step,
                    round,
                });
                let _ = reply.send(saved.map_err(|e| e.to_string()));
            }
            Some(Control::Shutdown) => self.stop_requested = true,
            None => {}
        }
    }

    /// Exits as a crashed process would, if an injected crash is due as
    /// `round` begins: no checkpoint, no summary, a non-zero status.
    fn crash_if_due(&self, round: u64) {
        if self.faults.crash_due(round, Instant::now()) {
            error!(round, "injected crash");
            eprintln!(
                "murmur run: injected crash at round {round} (exit status {CRASH_EXIT_CODE})"
            );
            std::process::exit(CRASH_EXIT_CODE);
        }
    }

    /// Copies what the strategy knows into the status.
    fn publish(&self, mixer: &dyn Mixer) {
        let drops: BTreeMap<String, u64> =
            mixer.dropped().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let (round, distance, failures) =
            (mixer.round(), mixer.neighbour_distance(), self.send_failures);
        self.board.update(|s| {
            s.round = round;
            s.strategy_drops = drops;
            s.consensus_distance = distance;
            s.send_failures = failures;
        });
    }

    async fn execute(
        &mut self,
        mixer: &dyn Mixer,
        actions: Vec<Action>,
        training: &mut Option<oneshot::Receiver<Result<PhaseDone, String>>>,
        finished: &mut bool,
        round_before: u64,
    ) -> Result<(), NodeError> {
        let mut round_ended = mixer.round() == round_before;
        for a in actions {
            match a {
                Action::Send(m) => self.send(m),
                Action::SetParams(v) => {
                    let hash = model_hash(&v);
                    self.worker.set_params(v).await.map_err(NodeError::Trainer)?;
                    self.board.update(|s| s.model_hash = hash);
                }
                Action::Train { steps } => {
                    // Round-end work (evaluation, checkpoint) must see the
                    // mixed model, so it runs before the next phase is queued.
                    if !round_ended {
                        round_ended = true;
                        let t = Instant::now();
                        self.on_round_end(mixer.round()).await?;
                        self.timing.skip(t.elapsed());
                    }
                    self.timing.train_started(Instant::now());
                    *training = Some(self.worker.train(steps));
                    self.board.update(|s| s.phase = Phase::Training);
                }
                Action::Evaluate { label } => {
                    let m = self.worker.evaluate().await.map_err(NodeError::Trainer)?;
                    self.reporter.emit(
                        serde_json::json!({"event": "eval", "label": label, "round": mixer.round(), "metrics": m}),
                        || format!("eval ({label}) round {}: {}", mixer.round(), m),
                    );
                    if label == "local" {
                        self.local_metrics = Some(FinalMetrics::new(self.last_loss, &m));
                    }
                }
                Action::Finish => {
                    self.timing.train_started(Instant::now());
                    *finished = true;
                }
            }
        }
        self.publish(mixer);
        Ok(())
    }

    fn send(&mut self, m: Message) {
        self.send_within(m, self.run.round_timeout);
    }

    /// Sends in the background, retrying failed attempts for up to `patience`.
    fn send_within(&mut self, m: Message, patience: Duration) {
        let kind = match m.kind {
            MsgKind::Params => PayloadKind::Params,
            MsgKind::Delta => PayloadKind::Delta,
            MsgKind::Shard => PayloadKind::Shard,
            MsgKind::ShardResult => PayloadKind::ShardResult,
        };
        let network = self.network.clone();
        let mut header = wire::build_header(
            &self.run.run_id,
            &self.fingerprint,
            network.sender_bytes(),
            kind,
            m.slot,
        );
        header.sample_weight = m.weight;
        header.element_offset = m.offset as u64;
        let encoding = self.run.encoding;
        let now = Instant::now();
        let give_up = now + patience;
        // A Byzantine fault changes what goes on the wire, never the model.
        let values = if self.faults.corrupts(now) {
            let mut v = m.values.to_vec();
            self.faults.corrupt(&mut v, now);
            Arc::new(v)
        } else {
            m.values.clone()
        };
        self.sends.spawn(async move {
            let (header, body) = wire::encode_shared(header, values, encoding);
            let mut attempt = 0u32;
            loop {
                match network.send(m.peer, &header, &body).await {
                    Ok(()) => return Ok(()),
                    // A refusal is final; anything else (a connection being
                    // set up, a peer restarting) is retried with backoff
                    // until the exchange's deadline.
                    Err(e @ SendError::Refused { .. }) => return Err(e.to_string()),
                    Err(e) if Instant::now() + retry_delay(attempt) >= give_up => {
                        debug!(peer = %m.peer, slot = m.slot, attempt, "send failed: {e}");
                        return Err(e.to_string());
                    }
                    Err(e) => {
                        debug!(peer = %m.peer, slot = m.slot, attempt, "send failed, retrying: {e}");
                        tokio::time::sleep(retry_delay(attempt)).await;
                        attempt += 1;
                    }
                }
            }
        });
        while let Some(done) = self.sends.try_join_next() {
            self.count_send(done);
        }
    }

    fn count_send(&mut self, done: Result<Result<(), String>, tokio::task::JoinError>) {
        let failure = match done {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) => format!("a send task ended: {e}"),
        };
        self.send_failures += 1;
        self.board.update(|s| s.last_error = failure);
    }

    fn on_phase_done(&mut self, done: &PhaseDone, round: u64) {
        self.last_loss = Some(done.loss);
        self.steps_done = done.steps_done;
        let hash = model_hash(&done.params);
        self.board.update(|s| {
            s.phase = Phase::Mixing;
            s.step = done.steps_done;
            s.train_loss = Some(done.loss);
            s.samples_seen += done.samples;
            s.model_hash = hash;
        });
        let bytes = self.network.accounting().total();
        self.reporter.emit(
            serde_json::json!({"event": "round", "round": round, "rounds": self.run.rounds, "step": done.steps_done,
                "loss": done.loss, "members": self.members().len(), "bytes_sent": bytes.bytes_sent,
                "bytes_received": bytes.bytes_received}),
            || {
                format!(
                    "round {}/{}  step {}  loss {:.4}  members {}  sent {}  received {}",
                    round + 1,
                    self.run.rounds,
                    done.steps_done,
                    done.loss,
                    self.members().len(),
                    human_bytes(bytes.bytes_sent),
                    human_bytes(bytes.bytes_received)
                )
            },
        );
    }

    /// After mixing: evaluate, checkpoint and announce the round as due.
    async fn on_round_end(&mut self, round: u64) -> Result<(), NodeError> {
        self.network.set_round(round).await;
        self.faults.set_round(round, Instant::now());
        self.crash_if_due(round);
        let h = self.run.local_steps;
        let (now, before) = (self.steps_done, self.steps_done.saturating_sub(h));
        let crossed = |every: u64| every > 0 && now / every != before / every;
        if crossed(self.train.eval_every) && round < self.run.rounds {
            self.evaluate(round).await?;
        }
        if crossed(self.train.checkpoint_every) {
            self.checkpoint(round).await?;
        }
        Ok(())
    }

    async fn evaluate(&mut self, round: u64) -> Result<crate::train::eval::EvalMetrics, NodeError> {
        let m = self.worker.evaluate().await.map_err(NodeError::Trainer)?;
        let bytes = self.network.accounting().total();
        self.reporter.emit(
            serde_json::json!({"event": "eval", "label": "model", "round": round, "step": self.steps_done, "metrics": m,
                "bytes_sent": bytes.bytes_sent, "bytes_received": bytes.bytes_received}),
            || format!("eval  round {round}: {}", m),
        );
        self.board.update(|s| {
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
        Ok(m)
    }

    /// Writes a checkpoint; returns the steps it holds.
    async fn checkpoint(&self, round: u64) -> Result<u64, NodeError> {
        let mut options = self.options.clone();
        options["round"] = serde_json::json!(round);
        let dir = checkpoint::dir_in(&self.data_dir);
        self.worker
            .checkpoint(dir.clone(), options)
            .await
            .map_err(|reason| NodeError::Write { path: dir, reason })
    }

    /// A peer that comes back asks for the model; answer with ours.
    async fn answer_pull(&mut self, from: PeerId) {
        match self.worker.params().await {
            Ok(values) => self.send_within(
                Message {
                    peer: from,
                    kind: MsgKind::Params,
                    slot: PULL_REPLY_SLOT,
                    weight: 1.0,
                    offset: 0,
                    values: Arc::new(values),
                },
                PULL_TIMEOUT,
            ),
            Err(e) => warn!("cannot answer a pull from {from}: {e}"),
        }
    }

    /// Rejoins a running swarm: the current round is the most advanced
    /// member's, and the model is pulled from that member before training.
    async fn rejoin(&mut self, saved_round: u64) -> u64 {
        let view = self.network.view();
        let Some(ahead) = view
            .members
            .iter()
            .filter(|m| m.role == "node" && m.fingerprint == self.fingerprint)
            .max_by_key(|m| m.round)
        else {
            return saved_round;
        };
        let (peer, round) = (ahead.peer, ahead.round.max(saved_round));
        let params = match self.worker.params().await {
            Ok(p) => Arc::new(p),
            Err(_) => return round,
        };
        let request = Message {
            peer,
            kind: MsgKind::Params,
            slot: PULL_REQUEST_SLOT,
            weight: 1.0,
            offset: 0,
            values: params,
        };
        self.send_within(request, PULL_TIMEOUT);
        // A rejoin is rare and its model matters: wait longer than a round.
        let deadline = tokio::time::Instant::now() + self.run.round_timeout.max(PULL_TIMEOUT);
        loop {
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(NetEvent::Payload { from, payload }) => match to_message(from, payload) {
                        Some(m) if m.slot == PULL_REPLY_SLOT && from == peer => {
                            match self.worker.set_params(m.values.to_vec()).await {
                                Ok(()) => self.pulled_from = Some(peer),
                                Err(e) => warn!("cannot take the pulled model: {e}"),
                            }
                            self.reporter.emit(serde_json::json!({"event": "rejoined", "round": round, "from": peer.to_string()}),
                                || format!("rejoined at round {round} with the model of {peer}"));
                            return round;
                        }
                        Some(m) => self.backlog.push(m),
                        None => {}
                    },
                    Some(_) => {}
                    None => return round,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(%peer, "no answer to the model pull; continuing from the checkpoint");
                    return round;
                }
            }
        }
    }

    async fn finish(
        &mut self,
        mixer: &dyn Mixer,
        resumed: Option<u64>,
        interrupted: bool,
    ) -> Result<NodeSummary, NodeError> {
        self.board.update(|s| s.phase = Phase::Finishing);
        if interrupted {
            // A stopping node drops its faults: a pause must not keep it
            // from writing its checkpoint.
            self.faults.clear(&[]);
        }
        // Let in-flight sends reach peers that still wait for them.
        let grace = tokio::time::sleep(self.run.round_timeout);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = self.sends.join_next() => match done {
                    Some(done) => self.count_send(done),
                    None => break,
                },
                _ = &mut grace => break,
            }
        }
        let round = mixer.round();
        // An interrupt can leave a local phase running; the trainer finishes
        // it first, so the checkpoint says how many steps were really done.
        self.steps_done = self.checkpoint(round).await?;
        let final_eval = self.evaluate(round).await?;
        let acc = self.network.accounting();
        let summary = NodeSummary {
            murmur_version: env!("CARGO_PKG_VERSION"),
            peer_id: self.me.to_string(),
            run_id: self.run.run_id.clone(),
            strategy: format!("{:?}", self.run.strategy).to_lowercase(),
            node: self.train.node,
            nodes: self.train.nodes,
            rounds: round,
            steps: self.steps_done,
            resumed_from_round: resumed,
            pulled_from: self.pulled_from.map(|p| p.to_string()),
            interrupted,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            parameters: self.parameters,
            fingerprint: self.fingerprint.clone(),
            bytes: acc.total(),
            traffic_by_peer: acc.by_peer(),
            refusals: acc.refusals.clone(),
            strategy_drops: mixer
                .dropped()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect::<BTreeMap<_, _>>(),
            send_failures: self.send_failures,
            fault_effects: self.faults.effects(),
            timing: self.timing.clone(),
            evals: std::mem::take(&mut self.evals),
            local: self.local_metrics.clone(),
            final_metrics: FinalMetrics::new(self.last_loss, &final_eval),
            config: self.options.clone(),
        };
        let path = self.data_dir.join("summary.json");
        let json = serde_json::to_vec_pretty(&summary)
            .map_err(|e| NodeError::Write { path: path.clone(), reason: e.to_string() })?;
        std::fs::write(&path, json)
            .map_err(|e| NodeError::Write { path: path.clone(), reason: e.to_string() })?;
        self.reporter.emit(
            serde_json::json!({"event": "done", "summary": path, "final": summary.final_metrics}),
            || format!("done: round {round}, {}; summary in {}", final_eval, path.display()),
        );
        Ok(summary)
    }
}

/// Backoff before retry `attempt` (0-based): 20 ms doubling, capped at 1 s.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(6)).min(1000))
}

/// The strategy's name for a wire payload kind.
fn msg_kind(kind: i32) -> Option<MsgKind> {
    match PayloadKind::try_from(kind).ok()? {
        PayloadKind::Params => Some(MsgKind::Params),
        PayloadKind::Delta => Some(MsgKind::Delta),
        PayloadKind::Shard => Some(MsgKind::Shard),
        PayloadKind::ShardResult => Some(MsgKind::ShardResult),
        PayloadKind::Unspecified => None,
    }
}

/// A validated payload as a strategy message.
fn to_message(from: PeerId, p: wire::Payload) -> Option<Message> {
    let kind = msg_kind(p.header.kind)?;
    Some(Message {
        peer: from,
        kind,
        slot: p.header.round,
        weight: p.header.sample_weight,
        offset: usize::try_from(p.header.element_offset).ok()?,
        values: Arc::new(p.values),
    })
}

/// SIGINT and SIGTERM as one stream.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        Signals {
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn recv(&mut self) {
        let term = async {
            match &mut self.term {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
    }
}
