//! `Network`: a running swarm and the handle the rest of the node uses.
//!
//! One task owns the swarm and handles every `SwarmEvent` (discovery,
//! membership heartbeats, admission refusals). Bulk payloads bypass it: a
//! cloned `libp2p_stream::Control` opens `/murmur/params/1` streams, and an
//! accept loop takes inbound streams off the queue of `inbound` and hands
//! them to tasks that read and validate them (`wire`) and pass good payloads
//! to the node as `NetEvent`s.
//!
//! Threads. The swarm, its connection tasks (TLS or Noise, Yamux) and every
//! stream's reads and writes run on one network thread with a current-thread
//! tokio runtime, whatever runtime the caller uses. Yamux hands a stream's
//! bytes to its connection task in 16 KiB frames; with the two on different
//! threads each frame is a cross-thread wake-up, and the sender of a 64 MiB
//! payload spent about 90 ms of CPU instead of 60 (scripts/bench_transfer.py).
//! `send` therefore hands the whole frame to a task on the network thread;
//! the body travels as shared `Bytes`, never copied.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, gossipsub, identify, kad, mdns};
use murmur_proto::wire::v1::{Heartbeat, PayloadHeader};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::accounting::{Accounting, Direction, Snapshot};
use super::admission::{self, Admission};
use super::buffers::BufferPool;
use super::gossip_reach::GossipReach;
use super::inbound::InboundStream;
use super::log_limit::LogLimiter;
use super::membership::{Member, MemberEvent, MemberLimits, Membership, Observed, Role, Verdict};
use super::swarm::{self, Behaviour, BehaviourEvent, SwarmSettings};
use super::wire::{self, Expectation, Payload};
use crate::fault::Faults;

/// Receive buffers kept for reuse: enough for a round's fan-in.
const SPARE_BUFFERS: usize = 8;

/// Validated payloads (and membership events) waiting for the node.
pub const EVENT_QUEUE: usize = 64;

/// Refusal warnings logged per window, over the whole node and per peer
/// (`LogLimiter`).
const REFUSAL_LOG_BURST: u32 = 20;
const REFUSAL_LOG_PER_PEER: u32 = 3;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Member joined/left lines per window, over the node and per peer.
const MEMBER_LOG_BURST: u32 = 20;
const MEMBER_LOG_PER_PEER: u32 = 2;
/// A peer whose valid heartbeats arrive without a connection is dialled at
/// most this often (a heartbeat's addresses are claims: no dial storms).
const REDIAL_EVERY: Duration = Duration::from_secs(10);
/// How often a `redial` address (a node's coordinator) is dialled while
/// not connected: a node waits for its coordinator before it trains, and
/// its peers for it, so a late coordinator is found within seconds.
const REDIAL_KEPT_EVERY: Duration = Duration::from_secs(2);

/// How long a leaving node keeps its swarm running for its leaving
/// heartbeat to go out (gossip sends on the next poll; this is slack for a
/// loaded machine).
const LEAVE_FLUSH: Duration = Duration::from_millis(300);

/// Byte the receiver writes back after reading a payload.
const ACK_OK: u8 = 0;
const ACK_REFUSED: u8 = 1;
/// Refused unread: the sender is not (yet) a member here. Worth sending
/// again: the receiver may not have had the sender's heartbeat yet.
const ACK_NOT_A_MEMBER: u8 = 2;

/// Everything a `Network` needs to start.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub swarm: SwarmSettings,
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start and whenever none of them is connected. An
    /// address without `/p2p/<peer id>` (`/dns4/node-0/tcp/4001`) takes
    /// whichever peer answers there (the allowlist still applies); the
    /// node learns its id in the handshake.
    pub bootstrap: Vec<Multiaddr>,
    /// Peers dialled again, at most every `REDIAL_KEPT_EVERY`, whenever they are
    /// not connected (a node's coordinator: it may restart, and it is no
    /// use to the node unless connected).
    pub redial: Vec<Multiaddr>,
    pub heartbeat_every: Duration,
    pub member_expiry: Duration,
    /// How many members, and what rounds, heartbeats may claim.
    pub member_limits: MemberLimits,
    /// Deadline for one payload transfer, open to acknowledgement.
    pub transfer_timeout: Duration,
    pub role: Role,
    /// Publishes no heartbeat until [`Network::announce`]: a node waiting
    /// for its coordinator is then nobody's member, so no peer starts
    /// training with it (and trains on alone) before it can train too.
    pub silent: bool,
    /// What inbound payloads must match.
    pub expect: Expectation,
    /// Inbound payloads read at once; each may hold one model's worth of values.
    pub max_inbound_reads: usize,
    /// The node's injected faults; the network carries out drops, delays,
    /// bandwidth caps, partitions and pauses.
    pub faults: Arc<Faults>,
}

impl NetConfig {
    /// Defaults for a node of `run_id` whose model has `fingerprint` and `elements` values.
    pub fn new(run_id: &str, fingerprint: &str, elements: usize) -> NetConfig {
        NetConfig {
            swarm: SwarmSettings::for_run(run_id),
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().unwrap_or_else(|_| Multiaddr::empty())],
            bootstrap: Vec::new(),
            redial: Vec::new(),
            heartbeat_every: Duration::from_secs(1),
            member_expiry: Duration::from_secs(10),
            member_limits: MemberLimits::default(),
            transfer_timeout: Duration::from_secs(60),
            role: Role::Node,
            silent: false,
            expect: Expectation {
                run_id: run_id.to_string(),
                fingerprint: fingerprint.to_string(),
                total_elements: elements,
                encoding: super::encoding::Encoding::F32,
            },
            max_inbound_reads: 32,
            faults: Arc::new(Faults::new(0)),
        }
    }
}

/// What the network tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// A validated payload from a peer.
    Payload {
        from: PeerId,
        payload: Payload,
    },
    /// A peer's payload was refused; `header` is its header if it decoded
    /// and named this run and that peer (so the message it was is known).
    Refused {
        from: PeerId,
        header: Option<PayloadHeader>,
    },
    MemberJoined(PeerId),
    MemberLeft(PeerId),
    /// The last connection to a peer closed (it may still be a member
    /// until its heartbeats stop).
    Disconnected(PeerId),
}

/// Why a payload could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot open a stream to {peer}: {reason}")]
    Open { peer: PeerId, reason: String },
    #[error("sending to {peer} failed: {source}")]
    Io { peer: PeerId, source: std::io::Error },
    #[error("{peer} refused the payload (see its refusal counters)")]
    Refused { peer: PeerId },
    #[error("{peer} does not count this node a member (yet)")]
    NotAMember { peer: PeerId },
    #[error("sending to {peer} took longer than {timeout:?}")]
    Timeout { peer: PeerId, timeout: Duration },
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Swarm(#[from] swarm::SwarmError),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial bootstrap {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("the network thread failed: {0}")]
    Thread(String),
}

/// What the swarm task shares with readers.
#[derive(Debug, Clone, Default)]
pub struct NetView {
    pub listen_addrs: Vec<Multiaddr>,
    pub connected: BTreeSet<PeerId>,
    pub members: Vec<Member>,
    /// The peers found at addresses given without `/p2p/<peer id>`.
    pub named: HashMap<Multiaddr, PeerId>,
}

enum Command {
    SetRound(u64),
    SetRole(Role, u64),
    Announce,
    Leave(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A running network.
pub struct Network {
    pub local_peer: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
    view: Arc<Mutex<NetView>>,
    accounting: Accounting,
    transfer_timeout: Duration,
    sender_bytes: Vec<u8>,
    /// The network thread's runtime: transfers run there.
    runtime: tokio::runtime::Handle,
    faults: Arc<Faults>,
    /// One clock for every transfer's bytes, so a bandwidth cap holds for
    /// the node as a whole, not per payload.
    pacer: Arc<Pacer>,
    /// Spare receive buffers.
    buffers: Arc<BufferPool>,
    /// What inbound payloads must match, shared with the readers.
    expect: Arc<RwLock<Arc<Expectation>>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("local_peer", &self.local_peer).finish_non_exhaustive()
    }
}

type Started = (Network, mpsc::Receiver<NetEvent>);

impl Network {
    /// Starts the swarm on a network thread of its own. Returns once it listens.
    pub async fn start(key: Keypair, cfg: NetConfig) -> Result<Started, NetError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("murmur-net".into())
            .spawn(move || network_thread(key, cfg, ready_tx))
            .map_err(|e| NetError::Thread(e.to_string()))?;
        ready_rx.await.map_err(|_| NetError::Thread("it ended while starting".into()))?
    }

    /// Builds and starts everything on the network thread's runtime; the
    /// returned driver is what that thread then runs until shutdown.
    async fn setup(
        key: Keypair,
        cfg: NetConfig,
    ) -> Result<(Started, SwarmDriver, mpsc::Receiver<Command>), NetError> {
        let local_peer = key.public().to_peer_id();
        let accounting = Accounting::default();
        let admission = Admission::new(cfg.swarm.inbound);
        let mut cfg = cfg;
        // Bootstrap peers always find a connection slot.
        cfg.swarm.trusted.extend(cfg.bootstrap.iter().filter_map(|a| match a.iter().last() {
            Some(Protocol::P2p(peer)) => Some(peer),
            _ => None,
        }));
        let (mut swarm, inbound) =
            swarm::build(key, &cfg.swarm, accounting.clone(), admission.clone())?;
        let mut listening = Vec::new();
        for addr in &cfg.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        }
        // Wait for the listeners so that callers can print real addresses.
        while listening.len() < cfg.listen.len() {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => listening.push(address),
                SwarmEvent::ListenerError { error, .. }
                | SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                    return Err(NetError::Listen {
                        addr: cfg.listen[listening.len()].clone(),
                        reason: error.to_string(),
                    });
                }
                _ => {}
            }
        }
        let topic = swarm::members_topic(&cfg.swarm.run_id);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| NetError::Swarm(swarm::SwarmError::Gossip(e.to_string())))?;
        let mut naming = HashMap::new();
        for addr in &cfg.bootstrap {
            if let Some(id) = dial(&mut swarm, addr)? {
                naming.insert(id, addr.clone());
            }
        }
        let view = Arc::new(Mutex::new(NetView { listen_addrs: listening, ..Default::default() }));
        // Each event may hold a model's worth of values; a full channel holds
        // readers (and their senders' acknowledgements) back, never memory.
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (commands, commands_rx) = mpsc::channel(64);
        let control = swarm.behaviour().stream.new_control();
        let buffers = Arc::new(BufferPool::new(SPARE_BUFFERS));
        let refusal_logs =
            Arc::new(LogLimiter::new(REFUSAL_LOG_BURST, REFUSAL_LOG_PER_PEER, REFUSAL_LOG_WINDOW));
        let expect = Arc::new(RwLock::new(Arc::new(cfg.expect.clone())));
        let reader = Reader {
            pulls: Mutex::new(std::collections::HashMap::new()),
            admission: admission.clone(),
            refusal_logs: refusal_logs.clone(),
            expect: expect.clone(),
            accounting: accounting.clone(),
            events: events_tx.clone(),
            faults: cfg.faults.clone(),
            buffers: buffers.clone(),
            timeout: cfg.transfer_timeout,
        };
        tokio::spawn(accept_loop(inbound, Arc::new(reader), cfg.max_inbound_reads));
        let driver = SwarmDriver {
            swarm,
            membership: Membership::new(
                cfg.swarm.run_id.clone(),
                cfg.member_expiry,
                cfg.member_limits,
            ),
            topic,
            cfg: cfg.clone(),
            accounting: accounting.clone(),
            view: view.clone(),
            events: events_tx,
            round: 0,
            entry_round: 0,
            seq: first_seq(),
            leaving: false,
            faults: cfg.faults.clone(),
            blocked: BTreeSet::new(),
            refusal_logs,
            member_logs: LogLimiter::new(MEMBER_LOG_BURST, MEMBER_LOG_PER_PEER, REFUSAL_LOG_WINDOW),
            admission,
            dialled: std::collections::HashMap::new(),
            redialled: HashMap::new(),
            named: HashMap::new(),
            naming,
            expect: expect.clone(),
            greet: false,
            last_heartbeat: None,
            reach: GossipReach::default(),
        };
        let network = Network {
            local_peer,
            control,
            commands,
            view,
            accounting,
            transfer_timeout: cfg.transfer_timeout,
            sender_bytes: local_peer.to_bytes(),
            runtime: tokio::runtime::Handle::current(),
            faults: cfg.faults.clone(),
            pacer: Arc::new(Pacer::default()),
            buffers,
            expect,
        };
        Ok(((network, events_rx), driver, commands_rx))
    }

    /// This node's peer id as it goes into payload headers.
    pub fn sender_bytes(&self) -> &[u8] {
        &self.sender_bytes
    }

    /// Sends one payload to `peer` and waits for its acknowledgement.
    ///
    /// Injected faults act here: a pause holds the send until it ends, a
    /// partition refuses it, a delay holds it back (within the timeout), a
    /// drop loses it silently (the sender believes it went, as over a lossy
    /// link), and a bandwidth cap paces its bytes.
    pub async fn send(
        &self,
        peer: PeerId,
        header: &PayloadHeader,
        body: &Bytes,
    ) -> Result<(), SendError> {
        // A header that does not describe the body is refused before anything.
        let head = wire::frame_head(header, body.len())
            .map_err(|source| SendError::Io { peer, source })?;
        self.faults.wait_unpaused().await;
        let now = Instant::now();
        if self.faults.blocks(&peer, now) {
            return Err(SendError::Open {
                peer,
                reason: "partitioned by an injected fault".into(),
            });
        }
        let timeout = self.transfer_timeout;
        let delay = self.faults.send_delay(now);
        let pacing = self.faults.bandwidth(now).map(|r| (self.pacer.clone(), r));
        // Only a payload that could have gone is lost: one to a peer with
        // no connection fails as it would without the fault, so it is not
        // counted as dropped (each retry of it would draw again).
        if self.is_connected(&peer) && self.faults.drop_outgoing(now) {
            return Ok(());
        }
        let frame = Frame { head, body: body.clone(), delay, pacing };
        let net = self.runtime.spawn(transfer(self.control.clone(), peer, frame));
        let mut net = AbortOnDrop(net);
        let transfer = async move {
            (&mut net.0).await.unwrap_or_else(|e| {
                Err(SendError::Open { peer, reason: format!("the network thread stopped: {e}") })
            })
        };
        let result = tokio::time::timeout(timeout, transfer)
            .await
            .unwrap_or(Err(SendError::Timeout { peer, timeout }));
        // A refused payload still crossed the wire in full.
        if matches!(result, Ok(()) | Err(SendError::Refused { .. })) {
            self.accounting.record(
                &peer,
                kind_label(header.kind),
                Direction::Sent,
                wire::frame_len(header) as u64,
            );
        }
        result
    }

    /// Gives back a payload's values once the node is done with them: the
    /// next payload of at most that size is read into them.
    pub fn recycle(&self, values: Vec<f32>) {
        self.buffers.put_values(values);
    }

    /// A bare `/murmur/params/1` stream, for tests that write hostile bytes.
    #[cfg(test)]
    pub(crate) async fn open_raw(&self, peer: PeerId) -> Result<libp2p::Stream, SendError> {
        self.control
            .clone()
            .open_stream(peer, StreamProtocol::new(wire::PROTOCOL))
            .await
            .map_err(|e| SendError::Open { peer, reason: e.to_string() })
    }

    /// Announces the round this node is in (carried by its heartbeats).
    /// Never waits: a full command queue drops it (the next round's wins).
    pub fn set_round(&self, round: u64) {
        let _ = self.commands.try_send(Command::SetRound(round));
    }

    /// Announces the role this node's heartbeats carry and the first round
    /// it takes part in.
    pub async fn set_role(&self, role: Role, entry_round: u64) {
        let _ = self.commands.send(Command::SetRole(role, entry_round)).await;
    }

    /// Ends the silence of a node started `silent`: its first heartbeat
    /// goes out now.
    pub async fn announce(&self) {
        let _ = self.commands.send(Command::Announce).await;
    }

    /// Changes what inbound payloads must match: a coordinator learns the
    /// run's model from its members' heartbeats, after it started.
    pub fn set_expectation(&self, expect: Expectation) {
        if let Ok(mut e) = self.expect.write() {
            *e = Arc::new(expect);
        }
    }

    /// Whether `peer` is a member in `role` now (without copying the view).
    pub fn has_member(&self, peer: &PeerId, role: Role) -> bool {
        self.view.lock().is_ok_and(|v| v.members.iter().any(|m| m.peer == *peer && m.role == role))
    }

    /// Whether the swarm holds a connection to `peer` (as of its last event).
    fn is_connected(&self, peer: &PeerId) -> bool {
        self.view.lock().is_ok_and(|v| v.connected.contains(peer))
    }

    /// The peer found at `addr`, given without its id, once one answered there.
    pub fn peer_at(&self, addr: &Multiaddr) -> Option<PeerId> {
        self.view.lock().ok()?.named.get(addr).copied()
    }

    pub fn view(&self) -> NetView {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn accounting(&self) -> Snapshot {
        self.accounting.snapshot()
    }

    /// Tells the run's members this node is stopping (a leaving
    /// heartbeat), so that they drop it now rather than after the expiry;
    /// returns once it had `LEAVE_FLUSH` to go out (the swarm task sends it
    /// meanwhile). Nothing this node sends afterwards makes it a member again.
    pub async fn leave(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Leave(tx)).await.is_ok() && rx.await.is_ok() {
            tokio::time::sleep(LEAVE_FLUSH).await;
        }
    }

    /// Stops the swarm and waits until its task has ended.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Runs the network until shutdown: builds it on this thread's runtime,
/// hands the handle to `start` through `ready`, then drives the swarm.
/// Ending the runtime ends the accept loop and every transfer with it.
fn network_thread(key: Keypair, cfg: NetConfig, ready: oneshot::Sender<Result<Started, NetError>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(NetError::Thread(format!("cannot build its runtime: {e}"))));
            return;
        }
    };
    runtime.block_on(async move {
        match Network::setup(key, cfg).await {
            Ok((started, driver, commands)) => {
                if ready.send(Ok(started)).is_ok() {
                    driver.run(commands).await;
                }
            }
            Err(e) => {
                let _ = ready.send(Err(e));
            }
        }
    });
}

/// What one transfer writes, and how.
struct Frame {
    /// Length prefix and header.
    head: Vec<u8>,
    body: Bytes,
    /// Hold the frame back this long first (an injected delay).
    delay: Option<Duration>,
    /// Pace the bytes through this link at this rate (an injected cap).
    pacing: Option<(Arc<Pacer>, u64)>,
}

/// One payload's stream, on the network thread: opens it, writes the frame,
/// then waits for the receiver's verdict. A sender that stops waiting aborts
/// this task; the stream is then dropped, which resets it.
async fn transfer(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    frame: Frame,
) -> Result<(), SendError> {
    if let Some(d) = frame.delay {
        tokio::time::sleep(d).await;
    }
    debug!(%peer, bytes = frame.body.len(), "opening a payload stream");
    let stream = control
        .open_stream(peer, StreamProtocol::new(wire::PROTOCOL))
        .await
        .map_err(|e| SendError::Open { peer, reason: e.to_string() })?;
    let io = |source| SendError::Io { peer, source };
    // The verdict is read while the frame is written: a receiver refuses a
    // sender it does not (yet) count as a member after the first bytes and
    // stops reading, so a payload larger than the stream's window (256 KiB)
    // would wait for credit that never comes, until the transfer timeout
    // (10 s), and the whole ring with it. An early verdict ends the write.
    let (mut reader, mut writer) = stream.split();
    let mut ack = [0u8; 1];
    let early = {
        let write = async {
            writer.write_all(&frame.head).await?;
            match &frame.pacing {
                None => writer.write_all(&frame.body).await?,
                Some((pacer, rate)) => {
                    for piece in frame.body.chunks(PACED_PIECE) {
                        pacer.wait(piece.len(), *rate).await;
                        writer.write_all(piece).await?;
                    }
                }
            }
            writer.flush().await
        };
        let verdict = reader.read_exact(&mut ack);
        futures::pin_mut!(write, verdict);
        match futures::future::select(write, verdict).await {
            futures::future::Either::Left((written, verdict)) => {
                written.map_err(io)?;
                debug!(%peer, "payload written");
                verdict.await.map_err(io)?;
                false
            }
            futures::future::Either::Right((verdict, _)) => {
                verdict.map_err(io)?;
                true
            }
        }
    };
    debug!(%peer, ack = ack[0], early, "payload acknowledged");
    if !early {
        let _ = writer.close().await;
    }
    match ack[0] {
        ACK_OK => Ok(()),
        ACK_NOT_A_MEMBER => Err(SendError::NotAMember { peer }),
        _ => Err(SendError::Refused { peer }),
    }
}

/// Bytes written at a time under a bandwidth cap.
const PACED_PIECE: usize = 4 * 1024;

/// A link of limited rate shared by all transfers: each piece books the
/// link for len / rate after the previous booking ends, and is written when
/// its booking ends, as a slow link would deliver it.
#[derive(Debug, Default)]
struct Pacer {
    free_at: Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    async fn wait(&self, len: usize, rate: u64) {
        let due = {
            let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let start = free_at.map_or(now, |t| t.max(now));
            let due = start + Duration::from_secs_f64(len as f64 / rate.max(1) as f64);
            *free_at = Some(due);
            due
        };
        tokio::time::sleep_until(due).await;
    }
}

/// Ends a transfer on the network thread when its sender stops waiting.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Label for the accounting of a payload kind (`MsgKind` owns the mapping).
pub fn kind_label(kind: i32) -> &'static str {
    crate::mix::mixer::MsgKind::from_wire(kind).map_or("unknown", |k| k.label())
}

/// The peer an address names with its `/p2p/<peer id>` suffix, if it has one.
fn named_peer(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// Dials `addr`. One without a peer id takes whoever answers: the
/// returned connection id is how the caller learns who that was.
fn dial(swarm: &mut Swarm<Behaviour>, addr: &Multiaddr) -> Result<Option<ConnectionId>, NetError> {
    let failed = |e: DialError| NetError::Dial { addr: addr.clone(), reason: e.to_string() };
    match named_peer(addr) {
        Some(peer) => {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            swarm.add_peer_address(peer, addr.clone());
            swarm.dial(addr.clone()).map_err(failed).map(|()| None)
        }
        None => {
            let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
            let id = opts.connection_id();
            swarm.dial(opts).map_err(failed).map(|()| Some(id))
        }
    }
}

/// What reading one inbound payload needs; shared by the accept loop's tasks.
struct Reader {
    admission: Arc<Admission>,
    /// When each peer's last pull request was taken.
    pulls: Mutex<std::collections::HashMap<PeerId, Instant>>,
    expect: Arc<RwLock<Arc<Expectation>>>,
    accounting: Accounting,
    events: mpsc::Sender<NetEvent>,
    faults: Arc<Faults>,
    buffers: Arc<BufferPool>,
    /// A read that takes longer is refused as `timed_out`.
    timeout: Duration,
    refusal_logs: Arc<LogLimiter>,
}

/// Reads inbound `/murmur/params/1` streams, one task each, at most
/// `max_reads` at a time over the node and `reads_per_peer` per peer: each
/// read may hold a model-sized buffer, so this bounds what peers can make
/// the node allocate, and one peer's silent streams cannot hold every read.
/// Streams beyond the caps wait (their senders wait for the
/// acknowledgement); how many may wait is the admission's business.
///
/// Injected faults act here too: a pause holds reading until it ends, and a
/// partition drops the stream unread.
async fn accept_loop(
    mut incoming: mpsc::Receiver<InboundStream>,
    reader: Arc<Reader>,
    max_reads: usize,
) {
    let reads = Arc::new(tokio::sync::Semaphore::new(max_reads.max(1)));
    while let Some((peer, stream, ticket)) = incoming.recv().await {
        reader.faults.wait_unpaused().await;
        if reader.faults.blocks(&peer, Instant::now()) {
            continue;
        }
        let (reader, reads) = (reader.clone(), reads.clone());
        tokio::spawn(async move {
            // The peer's own permit first: a peer at its cap waits without
            // holding one of the node's.
            let Ok(_own) = ticket.reads.clone().acquire_owned().await else { return };
            let Ok(_permit) = reads.acquire_owned().await else { return };
            reader.read(peer, stream).await;
            drop(ticket);
        });
    }
}

/// Pull requests taken from one peer: at most one per this interval.
const PULL_REQUEST_EVERY: Duration = Duration::from_secs(1);
const PULL_RATE_LIMITED: &str = "pull_rate_limited";

impl Reader {
    /// Whether a payload of `kind` from `peer` may go on to the node: pull
    /// requests at most one per `PULL_REQUEST_EVERY` per peer.
    fn pulls_due(&self, peer: &PeerId, kind: i32) -> bool {
        if kind != murmur_proto::wire::v1::PayloadKind::PullRequest as i32 {
            return true;
        }
        let now = Instant::now();
        let mut last = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(peer).is_some_and(|t| now.saturating_duration_since(*t) < PULL_REQUEST_EVERY) {
            return false;
        }
        // Old entries go as new ones come: the map holds only recent askers.
        last.retain(|_, t| now.saturating_duration_since(*t) < PULL_REQUEST_EVERY);
        last.insert(*peer, now);
        true
    }

    /// Reads, validates and acknowledges one payload, and hands it on. A
    /// drop fault loses a good payload after acknowledging it (as if it had
    /// vanished on the way).
    async fn read(&self, peer: PeerId, mut stream: libp2p::Stream) {
        // A stranger's payload is not read at all: no buffer, no body.
        if !self.admission.may_send(&peer) {
            self.refusal_logs.warn(&peer, "refused payload", &"the sender is not a member");
            self.accounting.refuse(admission::NOT_A_MEMBER);
            let _ = stream.write_all(&[ACK_NOT_A_MEMBER]).await;
            let _ = stream.close().await;
            return;
        }
        let mut seen = None;
        let sender = peer.to_bytes();
        // An Arc clone per payload: the model changes only when a
        // coordinator learns it.
        let expect = self.expect.read().map_or_else(|p| p.into_inner().clone(), |e| e.clone());
        // A peer that opens streams and never finishes them must not hold
        // the read permits for good.
        let read =
            wire::read_payload_noting(&mut stream, &expect, &sender, &mut seen, &self.buffers);
        let result = tokio::time::timeout(self.timeout, read)
            .await
            .unwrap_or(Err(wire::Refusal::TimedOut(self.timeout)));
        let ack = match result {
            Ok(lost) if self.faults.drop_incoming(Instant::now()) => {
                self.buffers.put_values(lost.values);
                ACK_OK
            }
            Ok(payload) if !self.pulls_due(&peer, payload.header.kind) => {
                // A flood of pull requests stops here, not in the node's
                // event loop: an honest joiner asks every 2 s. The refusal
                // comes a pull interval late (a tarpit): a flooding peer
                // then gets through no more than its few read slots a
                // second, whose streams the per-peer caps bound, instead of
                // spending the node's CPU as fast as it can open streams.
                self.accounting.refuse(PULL_RATE_LIMITED);
                self.buffers.put_values(payload.values);
                tokio::time::sleep(PULL_REQUEST_EVERY).await;
                ACK_REFUSED
            }
            Ok(payload) => {
                let kind = kind_label(payload.header.kind);
                let len = wire::frame_len(&payload.header) as u64;
                self.accounting.record(&peer, kind, Direction::Received, len);
                debug!(%peer, slot = payload.header.round, kind, bytes = len, "payload read");
                let _ = self.events.send(NetEvent::Payload { from: peer, payload }).await;
                ACK_OK
            }
            Err(refusal) => {
                self.refusal_logs.warn(&peer, "refused payload", &refusal);
                self.accounting.refuse(refusal.reason());
                let _ = self.events.send(NetEvent::Refused { from: peer, header: seen }).await;
                ACK_REFUSED
            }
        };
        let _ = stream.write_all(&[ack]).await;
        let _ = stream.close().await;
    }
}

/// The task that owns the swarm.
struct SwarmDriver {
    swarm: Swarm<Behaviour>,
    membership: Membership,
    topic: gossipsub::IdentTopic,
    cfg: NetConfig,
    accounting: Accounting,
    view: Arc<Mutex<NetView>>,
    events: mpsc::Sender<NetEvent>,
    round: u64,
    /// The first round this node takes part in (its heartbeats say).
    entry_round: u64,
    seq: u64,
    /// Whether this node said it is stopping: every heartbeat from then on says so.
    leaving: bool,
    faults: Arc<Faults>,
    /// Peers blocked for an injected partition.
    blocked: BTreeSet<PeerId>,
    refusal_logs: Arc<LogLimiter>,
    member_logs: LogLimiter,
    /// Inbound capacity; its member set follows the membership view.
    admission: Arc<Admission>,
    /// When each not-yet-connected heartbeat signer was last dialled.
    dialled: std::collections::HashMap<PeerId, Instant>,
    /// When each `redial` address was last dialled.
    redialled: HashMap<Multiaddr, Instant>,
    /// The peers found at addresses given without a peer id.
    named: HashMap<Multiaddr, PeerId>,
    /// Dials in flight to such addresses.
    naming: HashMap<ConnectionId, Multiaddr>,
    /// The model heartbeats announce (what payloads must match).
    expect: Arc<RwLock<Arc<Expectation>>>,
    /// A peer subscribed to the run's topic since the last heartbeat: the
    /// next one comes early (see `GREET_AFTER`).
    greet: bool,
    /// When the last heartbeat was published.
    last_heartbeat: Option<Instant>,
    /// Members whose subscription gossip lost, reconnected.
    reach: GossipReach,
}

/// How soon a heartbeat follows a new subscriber to the run's topic, and
/// at most how often such early heartbeats go out. Without them a node that
/// joins hears of a member only at that member's next beat (up to
/// `heartbeat_every` later), and refuses its payloads meanwhile as from a
/// non-member: the member's first exchange waits on retries, and the
/// joiner starts behind. The floor keeps a peer that subscribes and
/// unsubscribes in a loop from making this node publish more than ten
/// times a second.
const GREET_AFTER: Duration = Duration::from_millis(20);
const GREET_EVERY: Duration = Duration::from_millis(100);

/// The first heartbeat sequence number: microseconds since the epoch, so a
/// restarted node's heartbeats are newer than its last life's (members
/// refuse a sequence number that does not rise).
fn first_seq() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl SwarmDriver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_every);
        let mut bootstrap = tokio::time::interval(Duration::from_secs(30));
        let mut faults = self.faults.subscribe();
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    self.on_swarm_event(event).await;
                    if std::mem::take(&mut self.greet) {
                        let since = self.last_heartbeat.map(|t| t.elapsed());
                        let wait = GREET_EVERY.saturating_sub(since.unwrap_or(GREET_EVERY));
                        heartbeat.reset_after(wait.max(GREET_AFTER));
                    }
                }
                _ = heartbeat.tick() => {
                    self.apply_partitions();
                    // A paused node is silent: its peers see it go quiet.
                    if !self.faults.paused(Instant::now()) && !self.cfg.silent {
                        self.publish_heartbeat();
                        self.reconnect_unreached();
                    }
                    self.expire_members().await;
                    let now = Instant::now();
                    self.dialled.retain(|_, t| now.saturating_duration_since(*t) < 6 * REDIAL_EVERY);
                    self.redial_bootstrap();
                    self.redial_kept();
                }
                _ = faults.changed() => self.apply_partitions(),
                _ = bootstrap.tick() => {
                    // Fails only while the routing table is empty; the next tick retries.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::SetRound(r)) => self.round = r,
                    Some(Command::SetRole(role, entry_round)) => {
                        self.cfg.role = role;
                        self.entry_round = entry_round;
                        // Others learn of the change now, not a beat later.
                        if !self.cfg.silent {
                            self.publish_heartbeat();
                        }
                    }
                    Some(Command::Announce) => {
                        self.cfg.silent = false;
                        self.publish_heartbeat();
                    }
                    Some(Command::Leave(published)) => {
                        self.leaving = true;
                        self.publish_heartbeat();
                        let _ = published.send(());
                    }
                    Some(Command::Shutdown(done)) => {
                        let _ = done.send(());
                        break;
                    }
                    None => break,
                },
            }
        }
        debug!("swarm task ended");
    }

    /// Blocks the peers an injected partition names (closing their
    /// connections and refusing new ones) and unblocks those it no longer does.
    fn apply_partitions(&mut self) {
        let want = self.faults.partitioned(Instant::now());
        let block = &mut self.swarm.behaviour_mut().partition;
        for p in want.difference(&self.blocked) {
            info!(peer = %p, "partitioned from a peer (injected fault)");
            block.block_peer(*p);
        }
        for p in self.blocked.difference(&want) {
            info!(peer = %p, "partition from a peer ended");
            block.unblock_peer(*p);
        }
        self.blocked = want;
    }

    /// The peer at `addr`: the one it names, or the one found there.
    fn peer_at(&self, addr: &Multiaddr) -> Option<PeerId> {
        named_peer(addr).or_else(|| self.named.get(addr).copied())
    }

    fn connected_at(&self, addr: &Multiaddr) -> bool {
        self.peer_at(addr).is_some_and(|p| self.swarm.is_connected(&p))
    }

    /// Dials `addr` again (a name is resolved again on every dial).
    fn redial(&mut self, addr: &Multiaddr) {
        if let Ok(Some(id)) = dial(&mut self.swarm, addr) {
            self.naming.insert(id, addr.clone());
        }
    }

    /// Bootstrap nodes may start after us or restart: while none is
    /// connected, dial them again on every heartbeat.
    fn redial_bootstrap(&mut self) {
        if self.cfg.bootstrap.iter().any(|a| self.connected_at(a)) {
            return;
        }
        for addr in self.cfg.bootstrap.clone() {
            self.redial(&addr);
        }
    }

    /// Dials the `redial` peers that are not connected, each at most every
    /// `REDIAL_KEPT_EVERY`.
    fn redial_kept(&mut self) {
        let now = Instant::now();
        for addr in self.cfg.redial.clone() {
            let due = self.redialled.get(&addr).is_none_or(|t| now >= *t + REDIAL_KEPT_EVERY);
            if due && !self.connected_at(&addr) {
                self.redialled.insert(addr.clone(), now);
                self.redial(&addr);
            }
        }
    }

    /// Learns who answered at an address given without a peer id.
    fn on_named_connection(&mut self, id: ConnectionId, peer: PeerId) {
        let Some(addr) = self.naming.remove(&id) else { return };
        if self.named.get(&addr) != Some(&peer) {
            info!(%addr, %peer, "found a peer at an address given without its id");
        }
        self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        self.named.insert(addr, peer);
    }

    fn publish_heartbeat(&mut self) {
        self.last_heartbeat = Some(Instant::now());
        self.seq += 1;
        let hb = Heartbeat {
            run_id: self.cfg.swarm.run_id.clone(),
            peer_id: self.swarm.local_peer_id().to_bytes(),
            addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
            round: self.round,
            role: self.cfg.role.as_str().into(),
            fingerprint: self.expect.read().map(|e| e.fingerprint.clone()).unwrap_or_default(),
            seq: self.seq,
            entry_round: self.entry_round,
            elements: match self.cfg.role {
                Role::Coordinator => 0,
                _ => self.expect.read().map_or(0, |e| e.total_elements as u64),
            },
            leaving: self.leaving,
        };
        let bytes = hb.encode_to_vec();
        let len = bytes.len() as u64;
        // Publishing fails while no peer subscribes yet; the next heartbeat
        // retries. Failing while members are in the view means they do not
        // hear this node: worth a warning.
        match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), bytes) {
            Ok(_) => {
                let peers: Vec<PeerId> =
                    self.swarm.behaviour().gossipsub.all_peers().map(|(p, _)| *p).collect();
                for p in peers {
                    self.accounting.record(&p, "heartbeat", Direction::Sent, len);
                }
            }
            Err(e) => {
                if let Some(m) = self.membership.members().next() {
                    self.refusal_logs.warn(&m.peer, "heartbeat not published to members", &e);
                }
            }
        }
    }

    /// Connected members that gossip does not list on the run's topic
    /// get no heartbeat of this node: their connections are closed and
    /// dialled again, so that both sides send their subscriptions anew
    /// (see `gossip_reach`).
    fn reconnect_unreached(&mut self) {
        let topic = self.topic.hash();
        let listed: BTreeSet<PeerId> = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&&topic))
            .map(|(p, _)| *p)
            .collect();
        let unreached: Vec<PeerId> = self
            .membership
            .members()
            .map(|m| m.peer)
            .filter(|p| self.swarm.is_connected(p) && !listed.contains(p))
            .collect();
        for peer in self.reach.beat(&unreached, Instant::now()) {
            warn!(
                %peer,
                "gossip does not list this member on the run's topic, so it gets no heartbeat of this node: reconnecting"
            );
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let swarm = &self.swarm;
        for peer in self.reach.redial(|p| swarm.is_connected(p)) {
            let addrs = self.membership.get(&peer).map(|m| m.addrs.clone()).unwrap_or_default();
            self.dial_at(peer, addrs);
        }
    }

    /// Dials `peer` at these addresses only (a heartbeat's, or a member's).
    fn dial_at(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
    }

    async fn expire_members(&mut self) {
        let gone = self.membership.expire(Instant::now());
        self.refresh_view();
        for ev in gone {
            self.emit_member(ev).await;
        }
    }

    async fn emit_member(&mut self, ev: MemberEvent) {
        let ev = match ev {
            MemberEvent::Joined(p) => {
                self.member_logs.info(&p, "member joined");
                NetEvent::MemberJoined(p)
            }
            MemberEvent::Left(p) => {
                self.member_logs.info(&p, "member left");
                NetEvent::MemberLeft(p)
            }
        };
        let _ = self.events.send(ev).await;
    }

    fn refresh_view(&self) {
        self.admission.set_members(self.membership.members().map(|m| m.peer));
        if let Ok(mut v) = self.view.lock() {
            v.listen_addrs = self.swarm.listeners().cloned().collect();
            v.connected = self.swarm.connected_peers().copied().collect();
            v.members = self.membership.members().cloned().collect();
            v.named.clone_from(&self.named);
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => self.on_gossip(ev).await,
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            })) => self.dial_if_new(peer),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    self.swarm.add_peer_address(peer, addr);
                    self.dial_if_new(peer);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, num_established, connection_id, ..
            } => {
                self.on_named_connection(connection_id, peer_id);
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, "connected");
                }
                self.refresh_view();
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                debug!(peer = %peer_id, remaining = num_established, "connection closed: {cause:?}");
                self.refresh_view();
                if num_established == 0 {
                    let _ = self.events.send(NetEvent::Disconnected(peer_id)).await;
                }
            }
            SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                let reason = listen_error_reason(&error);
                debug!(addr = %send_back_addr, reason, "inbound connection refused: {error}");
                self.accounting.refuse(reason);
            }
            SwarmEvent::OutgoingConnectionError { error, peer_id, connection_id } => {
                // A dial by name that reached an authenticated peer and was
                // refused only for a limit (it is connected already, say)
                // still says who answers there; an allowlist refusal does not count.
                if let (DialError::Denied { cause }, Some(peer)) = (&error, peer_id)
                    && matches!(denial_reason(cause), "connection_limit" | "connection_reserved")
                {
                    self.on_named_connection(connection_id, peer);
                }
                self.naming.remove(&connection_id);
                match &error {
                    DialError::Denied { cause } => self.accounting.refuse(denial_reason(cause)),
                    DialError::Transport(errors) => self.accounting.refuse(dial_reason(errors)),
                    _ => {}
                }
                debug!(peer = ?peer_id, "dial failed: {error}");
            }
            SwarmEvent::NewListenAddr { .. } | SwarmEvent::ExpiredListenAddr { .. } => {
                self.refresh_view()
            }
            _ => {}
        }
    }

    /// Connects to a peer the DHT just told us about, so that gossip and
    /// payloads can flow directly.
    fn dial_if_new(&mut self, peer: PeerId) {
        if !self.swarm.is_connected(&peer) && peer != *self.swarm.local_peer_id() {
            let _ = self.swarm.dial(peer);
        }
    }

    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        let kad_protocol = self.swarm.behaviour().kad.protocol_names().first().cloned();
        let speaks_kad = kad_protocol.is_some_and(|p| info.protocols.contains(&p));
        for addr in info.listen_addrs {
            if speaks_kad {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            self.swarm.add_peer_address(peer, addr);
        }
    }

    async fn on_gossip(&mut self, ev: gossipsub::Event) {
        let (message, propagation_source, message_id) = match ev {
            gossipsub::Event::Message { message, propagation_source, message_id } => {
                (message, propagation_source, message_id)
            }
            gossipsub::Event::Subscribed { topic, .. } if topic == self.topic.hash() => {
                self.greet = true;
                return;
            }
            // Heartbeats to this peer cannot go out on this connection (it
            // refused gossip, or cannot take it in time): say so, since the
            // peer's view then lacks this node while this node's has it.
            gossipsub::Event::GossipsubNotSupported { peer_id } => {
                self.refusal_logs.warn(&peer_id, "gossip", &"not spoken on this connection");
                return;
            }
            gossipsub::Event::SlowPeer { peer_id, failed_messages } => {
                self.refusal_logs.warn(
                    &peer_id,
                    "gossip to a slow peer",
                    &format!("{failed_messages:?}"),
                );
                return;
            }
            _ => return,
        };
        let len = message.data.len() as u64;
        self.accounting.record(&propagation_source, "heartbeat", Direction::Received, len);
        let verdict = self.check_heartbeat(&message, propagation_source).await;
        // Gossip relays only what this node took; an invalid heartbeat
        // counts against the peer that relayed it (peer scoring).
        let acceptance = match verdict {
            None => gossipsub::MessageAcceptance::Accept,
            Some(Verdict::Ignore) => gossipsub::MessageAcceptance::Ignore,
            Some(Verdict::Reject) => gossipsub::MessageAcceptance::Reject,
        };
        self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
            &message_id,
            &propagation_source,
            acceptance,
        );
    }

    /// Takes a heartbeat into the membership view; `None` when it was
    /// valid, else what gossip should do with it.
    async fn check_heartbeat(
        &mut self,
        message: &gossipsub::Message,
        relayed_by: PeerId,
    ) -> Option<Verdict> {
        let Some(source) = message.source else {
            self.accounting.refuse("heartbeat_anonymous");
            return Some(Verdict::Reject);
        };
        let hb = match Heartbeat::decode(message.data.as_slice()) {
            Ok(hb) => hb,
            Err(e) => {
                self.refusal_logs.warn(&relayed_by, "undecodable heartbeat", &e);
                self.accounting.refuse("heartbeat_malformed");
                return Some(Verdict::Reject);
            }
        };
        let connected = self.swarm.is_connected(&source);
        match self.membership.observe(&hb, source, connected, Instant::now()) {
            Ok(Observed::NotConnected) => {
                // Valid, but a member only once it connects: dial it, now
                // and then, at the addresses it lists. Relayed, but counted:
                // many of these from one connection are Sybil claims.
                self.accounting.refuse("heartbeat_not_connected");
                let now = Instant::now();
                let due = self.dialled.get(&source).is_none_or(|t| now >= *t + REDIAL_EVERY);
                if due && self.dialled.len() < self.cfg.member_limits.max_members {
                    self.dialled.insert(source, now);
                    // Its listed addresses only (at most MAX_ADDRS, checked),
                    // kept out of the DHT until it is a member.
                    let addrs: Vec<Multiaddr> =
                        hb.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    self.dial_at(source, addrs);
                }
                None
            }
            Ok(Observed::NotAMember) => None,
            Ok(Observed::Left(p)) => {
                self.refresh_view();
                self.emit_member(MemberEvent::Left(p)).await;
                None
            }
            Ok(observed) => {
                self.dialled.remove(&source);
                // Kademlia keeps the addresses, so that opening a stream to
                // a member can dial it.
                if let Some(m) = self.membership.get(&source) {
                    for addr in m.addrs.clone() {
                        self.swarm.behaviour_mut().kad.add_address(&source, addr.clone());
                        self.swarm.add_peer_address(source, addr);
                    }
                }
                if let Observed::Joined(p) = observed {
                    // The view first: whoever reacts to the event reads it.
                    self.refresh_view();
                    self.emit_member(MemberEvent::Joined(p)).await;
                }
                None
            }
            Err(refusal) => {
                if refusal.is_routine() {
                    debug!(%source, "refused heartbeat: {refusal}");
                } else {
                    self.refusal_logs.warn(&source, "refused heartbeat", &refusal);
                }
                self.accounting.refuse(refusal.reason());
                Some(refusal.verdict())
            }
        }
    }
}

fn listen_error_reason(e: &ListenError) -> &'static str {
    match e {
        ListenError::Denied { cause } => denial_reason(cause),
        ListenError::Transport(_) => "handshake_failed",
        _ => "connection_failed",
    }
}

/// Why a dial failed: nobody listening (or nothing answering) there, or a
/// connection that broke during its handshake (another swarm key, another
/// security protocol, or a peer that refused this node).
fn dial_reason(errors: &[(Multiaddr, libp2p::TransportError<std::io::Error>)]) -> &'static str {
    let unreachable = errors.iter().all(|(_, e)| match e {
        libp2p::TransportError::Other(io) => unanswered(io),
        libp2p::TransportError::MultiaddrNotSupported(_) => true,
    });
    if unreachable { "dial_unreachable" } else { "dial_handshake_failed" }
}

/// Whether a dial's error comes from a socket that nobody answered
/// (refused, timed out, no route). The transport stack (DNS, the choice of
/// TCP or QUIC, the upgrade) wraps the socket's error in several layers of
/// kind `Other`, and its `Either` layers forward their inner error's
/// source rather than the inner error, so neither the kind at the top nor
/// the source chain reaches the socket's: its debug form names every
/// layer's kind.
fn unanswered(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionRefused, HostUnreachable, NetworkUnreachable, TimedOut};
    let layers = format!("{e:?}");
    [ConnectionRefused, TimedOut, HostUnreachable, NetworkUnreachable]
        .iter()
        .any(|kind| layers.contains(&format!("kind: {kind:?}")))
}

/// Which behaviour turned a connection down.
fn denial_reason(cause: &libp2p::swarm::ConnectionDenied) -> &'static str {
    if cause.downcast_ref::<libp2p::allow_block_list::NotAllowed>().is_some() {
        "peer_not_allowed"
    } else if cause.downcast_ref::<libp2p::allow_block_list::Blocked>().is_some() {
        "partitioned"
    } else if cause.downcast_ref::<super::reserve::ReservedForMembers>().is_some() {
        "connection_reserved"
    } else {
        "connection_limit"
    }
}
