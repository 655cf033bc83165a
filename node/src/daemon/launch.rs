//! Starting a node: its network, status board, API and metrics servers and
//! trainer thread, handed to the driver; and stopping the servers after.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::identity::Keypair;
use murmur_proto::v1::Phase;
use tokio::sync::mpsc;
use tracing::info;

use super::config::RunConfig;
use super::driver::Driver;
use super::events::Inputs;
use super::report::Reporter;
use super::summary::{NodeSummary, SummaryError};
use super::worker::{Worker, WorkerError};
use crate::api::ApiServer;
use crate::api::metrics::{MetricsServer, serve_metrics};
use crate::fault::Faults;
use crate::mix::mixer::StrategyState;
use crate::mix::strategy::StrategyError;
use crate::net::membership::MemberLimits;
use crate::net::membership::Role;
use crate::net::service::{NetConfig, Network};
use crate::status::{NodeState, StatusBoard, model_hash};
use crate::train::config::TrainConfig;
use crate::train::trainer::Trainer;

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
    /// When resuming: the round the checkpoint was written in, and the
    /// strategy state it holds (if the strategy keeps one).
    pub resume: Option<Resume>,
    /// The node's faults, holding those given at start (`--fault`).
    pub faults: Faults,
}

/// What a resumed node continues from.
#[derive(Debug, Clone)]
pub struct Resume {
    pub round: u64,
    pub state: Option<StrategyState>,
}

/// Why a node stopped early.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Net(#[from] crate::net::service::NetError),
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    #[error("trainer: {0}")]
    Trainer(#[from] WorkerError),
    #[error(transparent)]
    Summary(#[from] SummaryError),
    #[error(transparent)]
    Api(#[from] crate::api::server::ApiError),
    #[error("the network stopped")]
    NetworkGone,
    #[error(
        "no peer answered at --coordinator {addr} within the join timeout ({timeout:?}); is murmur-coordinator running there?"
    )]
    NoCoordinator { addr: String, timeout: Duration },
    #[error(
        "no run formed: {members} of --min-members {min} members after the join timeout ({peers} of {expected} peers joined; {refused})"
    )]
    TooFewMembers { members: usize, min: usize, peers: usize, expected: usize, refused: String },
}

/// Runs one node to the end of its run (or a signal, or a Shutdown call)
/// and writes its summary.
pub async fn run_node(setup: NodeSetup) -> Result<NodeSummary, NodeError> {
    let layout = setup.trainer.model.layout().as_ref().clone();
    let fingerprint = layout.fingerprint.to_string();
    let mut run = setup.run.clone();
    // A coordinator that weighs answers weighs a member by its examples.
    if let Some(c) = run.strategy.coordinator.as_mut() {
        c.weight = setup.trainer.shard_examples().max(1) as f64;
    }
    let faults = Arc::new(setup.faults);
    let mut net_cfg = NetConfig::new(&run.run_id, &fingerprint, layout.total);
    net_cfg.listen = run.listen.clone();
    net_cfg.bootstrap = run.bootstrap.clone();
    // The coordinator is dialled again whenever it is gone (it may restart).
    net_cfg.redial = run
        .bootstrap
        .iter()
        .filter(|a| {
            let coordinator = run.strategy.coordinator.as_ref().map(|c| c.coordinator);
            run.coordinator_at.as_ref() == Some(*a)
                || matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(p)) if Some(p) == coordinator)
        })
        .cloned()
        .collect();
    net_cfg.swarm.quic = run.quic;
    net_cfg.swarm.security = run.security.clone();
    net_cfg.swarm.mdns = run.mdns;
    net_cfg.swarm.swarm_key = run.swarm_key;
    net_cfg.swarm.allowlist = run.allowlist.clone();
    net_cfg.transfer_timeout = run.strategy.timeout.max(Duration::from_secs(5));
    net_cfg.faults = faults.clone();
    net_cfg.expect.encoding = run.strategy.encoding;
    net_cfg.member_limits =
        MemberLimits { max_members: run.max_members, max_round: run.strategy.rounds };
    // A resuming node, or one joining a run under way, takes no part in
    // exchanges until it has the run's state.
    let joining = setup.resume.is_some() || run.join_running;
    net_cfg.role = if joining { Role::Joining } else { Role::Node };
    // A node that looks for its coordinator by name is silent until it
    // has found it: its peers wait for it rather than train without it.
    let silent = run.coordinator_at.is_some();
    net_cfg.silent = silent;
    let (network, net_events) = Network::start(setup.key.clone(), net_cfg).await?;
    if let (Some(addr), Some(c)) = (&run.coordinator_at, run.strategy.coordinator.as_mut()) {
        c.coordinator = find_coordinator(&network, addr, run.join_timeout).await?;
    }
    if silent {
        network.announce().await;
    }
    let network = Arc::new(network);
    let initial = setup.trainer.model.params().map(|p| p.values).unwrap_or_default();
    let board = StatusBoard::new(
        NodeState {
            run_id: run.run_id.clone(),
            strategy: run.strategy.kind.to_string(),
            phase: Phase::Joining,
            round: setup.resume.as_ref().map_or(0, |r| r.round),
            rounds: run.strategy.rounds,
            steps_planned: run.strategy.rounds * run.strategy.local_steps,
            model_hash: model_hash(&initial),
            node_index: setup.train.node as u32,
            nodes: setup.train.nodes as u32,
            ..NodeState::default()
        },
        network.clone(),
        faults.clone(),
    );
    let (control_tx, control_rx) = mpsc::channel(16);
    let api = match run.api {
        Some(addr) => Some(
            crate::api::serve(
                addr,
                run.api_token.clone(),
                run.api_tls.clone(),
                board.clone(),
                control_tx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let metrics = match run.metrics {
        Some(addr) => Some(serve_metrics(addr, board.clone()).await?),
        None => None,
    };
    let reporter = Reporter { format: run.progress };
    announce(&reporter, &network, &setup.train, api.as_ref(), metrics.as_ref());
    let (worker, replies) = Worker::spawn(setup.trainer, faults.clone());
    let inputs = Inputs::new(replies, net_events, (control_tx, control_rx), faults.clone());
    let driver = Driver::new(super::driver::Parts {
        network,
        inputs,
        worker,
        run,
        train: setup.train,
        reporter,
        layout,
        initial,
        data_dir: setup.data_dir,
        options: setup.options,
        board: board.clone(),
        faults,
    });
    let summary = driver.run(setup.resume).await;
    board.update(|s| s.phase = Phase::Done);
    stop_servers(api, metrics).await;
    summary
}

/// The peer that answers at `addr` (`--coordinator` given by name, without
/// its id), waited for up to `timeout`: the coordinator may start later.
async fn find_coordinator(
    network: &Network,
    addr: &libp2p::Multiaddr,
    timeout: Duration,
) -> Result<libp2p::PeerId, NodeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(peer) = network.peer_at(addr) {
            info!(%addr, %peer, "coordinator found");
            return Ok(peer);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NodeError::NoCoordinator { addr: addr.to_string(), timeout });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first line a node prints: who it is and where it listens.
fn announce(
    reporter: &Reporter,
    network: &Network,
    train: &TrainConfig,
    api: Option<&ApiServer>,
    metrics: Option<&MetricsServer>,
) {
    let me = network.local_peer;
    let addrs: Vec<String> =
        network.view().listen_addrs.iter().map(|a| format!("{a}/p2p/{me}")).collect();
    let api_addr = api.map(|a| match a.tls {
        true => format!("https://{}", a.addr),
        false => a.addr.to_string(),
    });
    let metrics_addr = metrics.map(|m| m.addr.to_string());
    reporter.emit(
        serde_json::json!({"event": "listening", "peer_id": me.to_string(), "addrs": addrs,
            "api": api_addr, "metrics": metrics_addr}),
        || {
            let mut line = format!(
                "murmur run: node {} of {}, peer {me}, listening on {}",
                train.node,
                train.nodes,
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
}

/// Ends the API and metrics servers; a client still watching cannot hold
/// the node up for more than a moment.
async fn stop_servers(api: Option<ApiServer>, metrics: Option<MetricsServer>) {
    drop(metrics);
    if let Some(api) = api {
        let _ = tokio::time::timeout(Duration::from_secs(1), api.stop()).await;
    }
}
