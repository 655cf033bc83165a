//! The node's status: one value the driver keeps current, which the gRPC
//! API, the Prometheus endpoint and `murmur status` all read.
//!
//! The driver owns `NodeState` (phase, round, losses, model hash...) and
//! changes it through `StatusBoard::update`; the network's live figures
//! (bytes, peers, members, refusals) and the active faults are read at the
//! moment a snapshot is taken, so no copy of them goes stale. This module
//! reads; it never changes the network or the faults.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use murmur_proto::v1 as pb;
use tokio::sync::watch;

use crate::fault::Faults;
use crate::mix::coordinated::Coordination;
use crate::net::accounting::Counts;
use crate::net::membership::Role;
use crate::net::service::Network;

/// What the driver knows of its node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeState {
    pub run_id: String,
    pub strategy: String,
    pub phase: pb::Phase,
    pub round: u64,
    pub rounds: u64,
    pub step: u64,
    pub steps_planned: u64,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_round: Option<u64>,
    pub samples_seen: u64,
    pub model_hash: String,
    pub consensus_distance: Option<f64>,
    pub strategy_drops: BTreeMap<String, u64>,
    pub send_failures: u64,
    pub last_error: String,
    pub node_index: u32,
    pub nodes: u32,
    /// The outer optimizer's figures (DiLoCo).
    pub outer: Option<crate::mix::mixer::OuterStatus>,
    /// The coordinator a semidec or fedavg node answers, and how that went.
    pub coordinator: Option<(PeerId, Coordination)>,
}

/// Whether `peer` is a live coordinator in `view`: its heartbeats arrive.
fn coordinator_live(view: &crate::net::service::NetView, peer: &PeerId) -> bool {
    view.members.iter().any(|m| m.peer == *peer && m.role == Role::Coordinator)
}

/// The hash `NodeStatus.model_hash` shows: CRC32C of the values'
/// little-endian bytes, as 8 hex digits.
pub fn model_hash(values: &[f32]) -> String {
    format!("{:08x}", crc32c::crc32c(bytemuck::cast_slice(values)))
}

struct Board {
    state: watch::Sender<NodeState>,
    network: Arc<Network>,
    faults: Arc<Faults>,
    started: Instant,
}

/// The shared status of one node; cheap to clone.
#[derive(Clone)]
pub struct StatusBoard {
    inner: Arc<Board>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusBoard").finish_non_exhaustive()
    }
}

impl StatusBoard {
    pub fn new(state: NodeState, network: Arc<Network>, faults: Arc<Faults>) -> StatusBoard {
        StatusBoard {
            inner: Arc::new(Board {
                state: watch::Sender::new(state),
                network,
                faults,
                started: Instant::now(),
            }),
        }
    }

    /// Changes the driver's part; watchers wake only if something changed.
    pub fn update(&self, f: impl FnOnce(&mut NodeState)) {
        self.inner.state.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// Wakes on every change of the driver's part.
    /// The round the driver last published.
    pub fn round(&self) -> u64 {
        self.inner.state.borrow().round
    }

    /// The phase the driver last published.
    pub fn phase(&self) -> pb::Phase {
        self.inner.state.borrow().phase
    }

    pub fn subscribe(&self) -> watch::Receiver<NodeState> {
        self.inner.state.subscribe()
    }

    pub fn faults(&self) -> &Arc<Faults> {
        &self.inner.faults
    }

    pub fn network(&self) -> &Arc<Network> {
        &self.inner.network
    }

    /// The whole status now.
    pub fn snapshot(&self) -> pb::NodeStatus {
        let s = self.inner.state.borrow().clone();
        let net = &self.inner.network;
        let view = net.view();
        let acc = net.accounting();
        let now = Instant::now();
        let members = view.members.iter().filter(|m| m.role == Role::Node).count() + 1;
        let coordinator = s.coordinator.map(|(peer, c)| pb::CoordinatorLink {
            peer_id: peer.to_string(),
            state: if coordinator_live(&view, &peer) { "ok" } else { "lost" }.into(),
            sampled: c.sampled,
            noticed: c.noticed,
            averages: c.averages,
            corrections: c.corrections,
            timeouts: c.timeouts,
            last_round: c.last_round,
            waiting: c.waiting,
        });
        let sent = acc.total().bytes_sent;
        pb::NodeStatus {
            peer_id: net.local_peer.to_string(),
            run_id: s.run_id,
            strategy: s.strategy,
            phase: s.phase as i32,
            round: s.round,
            rounds: s.rounds,
            step: s.step,
            steps_planned: s.steps_planned,
            train_loss: s.train_loss,
            eval_loss: s.eval_loss,
            eval_accuracy: s.eval_accuracy,
            samples_seen: s.samples_seen,
            traffic: Some(traffic(acc.total())),
            refusals: acc.refusals.clone(),
            strategy_drops: s.strategy_drops,
            connected_peers: view.connected.len() as u32,
            live_members: members as u32,
            model_hash: s.model_hash,
            consensus_distance: s.consensus_distance,
            active_faults: self.inner.faults.list(now).iter().map(|f| f.to_proto()).collect(),
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            last_error: s.last_error,
            node_index: s.node_index,
            nodes: s.nodes,
            listen_addrs: view.listen_addrs.iter().map(ToString::to_string).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            fault_effects: self.inner.faults.effects(),
            send_failures: s.send_failures,
            eval_round: s.eval_round,
            outer_steps: s.outer.map(|o| o.steps),
            outer_lr: s.outer.map(|o| o.lr),
            bytes_per_outer_step: s
                .outer
                .filter(|o| o.steps > 0)
                .map(|o| sent as f64 / o.steps as f64),
            coordinator,
        }
    }

    /// Every peer the node is connected to or knows as a member, by peer id.
    pub fn peers(&self) -> Vec<pb::Peer> {
        let net = &self.inner.network;
        let view = net.view();
        let acc = net.accounting();
        let now = Instant::now();
        let mut peers: BTreeMap<PeerId, pb::Peer> = BTreeMap::new();
        for p in &view.connected {
            peers.entry(*p).or_insert_with(|| bare_peer(p)).connected = true;
        }
        for m in &view.members {
            let entry = peers.entry(m.peer).or_insert_with(|| bare_peer(&m.peer));
            entry.member = true;
            entry.addrs = m.addrs.iter().map(ToString::to_string).collect();
            entry.round = m.round;
            entry.role = m.role.as_str().into();
            entry.last_seen_seconds_ago =
                Some(now.saturating_duration_since(m.last_seen).as_secs_f64());
        }
        for (peer, p) in peers.iter_mut() {
            p.traffic = Some(traffic(acc.with_peer(peer)));
        }
        peers.into_values().collect()
    }
}

fn bare_peer(p: &PeerId) -> pb::Peer {
    pb::Peer { peer_id: p.to_string(), ..Default::default() }
}

fn traffic(c: Counts) -> pb::Traffic {
    pb::Traffic {
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_received,
        messages_sent: c.messages_sent,
        messages_received: c.messages_received,
    }
}
