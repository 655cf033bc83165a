//! `murmur-attacker`: a hostile libp2p peer, written for the test suite.
//!
//! It speaks what a murmur node speaks (TCP, Noise, Yamux, gossipsub
//! heartbeats, `/murmur/params/1` payload frames) from stock libp2p and the
//! wire messages of `murmur-proto`, and abuses it in one of several ways
//! against one live node for `--secs` seconds, then prints what it did as
//! one JSON line. It links no libtorch and shares no code with the node
//! beyond the protobuf messages, so the node's own checks cannot be relied
//! on by accident.
//!
//! Attacks (the subcommands):
//! - `silent-streams N`: holds N payload streams open and writes nothing,
//!   reopening those the node closes (`--as-member` joins first, as a
//!   rejoining member: admitted, but in no exchange).
//! - `pull-flood`: announces itself as a rejoining node and sends pull
//!   requests as fast as the node takes them, on 32 streams at once.
//! - `payloads`: payloads for rounds far ahead and an all-reduce shard with
//!   a sample weight of 1e300, first as a stranger, then (halfway) as a
//!   rejoining member.
//! - `sybil K`: K more identities whose heartbeats reach the node only
//!   through this peer's one connection (`--direct`: each connects itself).
//! - `double-send`: a member that sends every member, for each of its next
//!   gossip slots, a payload it refuses (NaN) and then a valid one (that
//!   member's own last values, back).
//! - `pull-source`: a training member that answers every pull request
//!   with a model of its own making (every value 5.0), to a rejoining node.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, Swarm, gossipsub, noise, tcp, yamux};
use murmur_proto::wire::v1::{Encoding, Heartbeat, PayloadHeader, PayloadKind};
use prost::Message;

const PROTOCOL: &str = "/murmur/params/1";
/// The all-reduce slot of merge's final average.
const FINAL_SLOT: u64 = u64::MAX - 1;

#[derive(Debug, Clone, Parser)]
struct Args {
    /// The node to attack: its multiaddr ending in /p2p/PEER_ID
    #[arg(long)]
    target: Multiaddr,
    #[arg(long, default_value = "murmur")]
    run_id: String,
    /// How long the attack lasts
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// The model's parameter count (payload lengths)
    #[arg(long, default_value_t = 1)]
    elements: u64,
    /// Announce this peer as a member (a rejoining one, which takes no part
    /// in exchanges) before attacking
    #[arg(long)]
    as_member: bool,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Debug, Clone, Subcommand)]
enum Attack {
    SilentStreams {
        count: usize,
    },
    PullFlood,
    Payloads,
    Sybil {
        identities: usize,
        #[arg(long)]
        direct: bool,
    },
    DoubleSend,
    PullSource,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// What the attack learnt of the node, and what it did.
#[derive(Debug, Default)]
struct Shared {
    /// The node's last heartbeat.
    node: Option<Heartbeat>,
    /// The last heartbeat of every member that trains (role node).
    members: std::collections::BTreeMap<PeerId, Heartbeat>,
    /// The last parameters each member sent this peer.
    values_from: std::collections::BTreeMap<PeerId, Vec<f32>>,
    /// Pull requests to answer: who asked, for which round.
    pull_requests: Vec<(PeerId, u64)>,
    /// The role this peer's heartbeats announce; `None`: none sent.
    role: Option<&'static str>,
    counts: std::collections::BTreeMap<&'static str, u64>,
}

type State = Arc<Mutex<Shared>>;

fn lock(state: &State) -> std::sync::MutexGuard<'_, Shared> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node's round, as its last heartbeat said (0 before one came).
fn node_round(state: &State) -> u64 {
    lock(state).node.as_ref().map_or(0, |h| h.round)
}

fn count(state: &State, what: &'static str, n: u64) {
    *lock(state).counts.entry(what).or_default() += n;
}

fn build(key: Keypair) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error>> {
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .build()?;
    let gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg)?;
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)?
        .with_behaviour(|_| Behaviour { gossipsub, stream: libp2p_stream::Behaviour::new() })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

fn topic(run_id: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("murmur/{run_id}/members/1"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let Some(Protocol::P2p(target)) = args.target.iter().last() else {
        return Err(format!("--target {} needs a /p2p/PEER_ID suffix", args.target).into());
    };
    let state: State = Arc::default();
    let until = Instant::now() + Duration::from_secs(args.secs);
    let mut swarm = build(Keypair::generate_ed25519())?;
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    swarm.dial(args.target.clone())?;
    swarm.behaviour_mut().gossipsub.subscribe(&topic(&args.run_id))?;
    let me = *swarm.local_peer_id();
    let control = swarm.behaviour().stream.new_control();
    let incoming = control.clone().accept(StreamProtocol::new(PROTOCOL))?;
    tokio::spawn(read_incoming(incoming, state.clone()));
    let role = match &args.attack {
        Attack::PullFlood => Some("joining"),
        Attack::DoubleSend | Attack::PullSource => Some("node"),
        // With --as-member the one connected identity trains-in as a member
        // too (and never sends a payload); otherwise it announces nothing.
        Attack::Sybil { .. } if args.as_member => Some("node"),
        Attack::Sybil { .. } => None,
        // A member that does not train: admitted to the node's capacity,
        // left out of its exchanges.
        _ if args.as_member => Some("joining"),
        _ => None,
    };
    lock(&state).role = role;
    let attack = {
        let (state, args) = (state.clone(), args.clone());
        let control = control.clone();
        tokio::spawn(async move { run_attack(args, target, me, control, state, until).await })
    };
    let mut beat = tokio::time::interval(Duration::from_millis(500));
    let mut seq = 1u64;
    while Instant::now() < until && !attack.is_finished() {
        tokio::select! {
            ev = swarm.select_next_some() => on_event(ev, target, &state),
            _ = beat.tick() => {
                seq += 1;
                publish_heartbeat(&mut swarm, &args.run_id, &state, seq);
            }
        }
    }
    attack.abort();
    let counts = lock(&state).counts.clone();
    let line: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
    println!("{}", serde_json::Value::Object(line));
    Ok(())
}

fn on_event(ev: SwarmEvent<BehaviourEvent>, target: PeerId, state: &State) {
    match ev {
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
            message,
            ..
        })) => {
            let Some(source) = message.source else { return };
            let Ok(hb) = Heartbeat::decode(message.data.as_slice()) else { return };
            let mut s = lock(state);
            if hb.role == "node" {
                s.members.insert(source, hb.clone());
            }
            if source == target {
                s.node = Some(hb);
            }
        }
        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
            count(state, "connected", 1);
        }
        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } if peer_id == target => {
            count(state, "disconnected", 1);
        }
        _ => {}
    }
}

/// A heartbeat in the role the attack plays, once the node's own
/// heartbeat has told the run's fingerprint and round.
fn publish_heartbeat(swarm: &mut Swarm<Behaviour>, run_id: &str, state: &State, seq: u64) {
    let (role, node) = {
        let s = lock(state);
        (s.role, s.node.clone())
    };
    let (Some(role), Some(node)) = (role, node) else { return };
    let hb = Heartbeat {
        run_id: run_id.to_string(),
        peer_id: swarm.local_peer_id().to_bytes(),
        addrs: swarm.listeners().map(ToString::to_string).collect(),
        round: node.round,
        role: role.into(),
        fingerprint: node.fingerprint,
        seq,
        entry_round: 0,
        elements: 0,
        leaving: false,
    };
    let _ = swarm.behaviour_mut().gossipsub.publish(topic(run_id), hb.encode_to_vec());
}

/// Reads every payload the node sends this peer (pull replies, gossip
/// parameters), keeps the last parameters, and acknowledges each.
async fn read_incoming(mut incoming: libp2p_stream::IncomingStreams, state: State) {
    while let Some((from, mut stream)) = incoming.next().await {
        let state = state.clone();
        tokio::spawn(async move {
            let Ok((header, body)) = read_frame(&mut stream).await else { return };
            let kind = PayloadKind::try_from(header.kind).unwrap_or(PayloadKind::Unspecified);
            count(&state, "bytes_received", body.len() as u64);
            match kind {
                PayloadKind::PullReply => count(&state, "pull_replies", 1),
                PayloadKind::PullRequest => {
                    lock(&state).pull_requests.push((from, header.round));
                    count(&state, "pull_requests_received", 1);
                }
                PayloadKind::Params if header.encoding == Encoding::F32 as i32 => {
                    let values: Vec<f32> = body
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    lock(&state).values_from.insert(from, values);
                    count(&state, "params_received", 1);
                }
                _ => count(&state, "other_received", 1),
            }
            let _ = stream.write_all(&[0]).await;
            let _ = stream.close().await;
        });
    }
}

async fn read_frame(stream: &mut Stream) -> std::io::Result<(PayloadHeader, Vec<u8>)> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > 4096 {
        return Err(std::io::Error::other("header too long"));
    }
    let mut head = vec![0u8; len];
    stream.read_exact(&mut head).await?;
    let header = PayloadHeader::decode(head.as_slice()).map_err(std::io::Error::other)?;
    let body_len = usize::try_from(header.body_len).unwrap_or(usize::MAX);
    if body_len > 1 << 30 {
        return Err(std::io::Error::other("body too long"));
    }
    let mut body = vec![0u8; body_len];
    stream.read_exact(&mut body).await?;
    Ok((header, body))
}

/// One payload frame of f32 `values`, sealed as a node seals it.
fn frame(
    run_id: &str,
    fingerprint: &str,
    me: PeerId,
    kind: PayloadKind,
    round: u64,
    weight: f64,
    values: &[f32],
) -> Vec<u8> {
    let body: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header = PayloadHeader {
        run_id: run_id.to_string(),
        round,
        kind: kind as i32,
        sender: me.to_bytes(),
        sample_weight: weight,
        encoding: Encoding::F32 as i32,
        fingerprint: fingerprint.to_string(),
        element_count: values.len() as u64,
        element_offset: 0,
        body_len: body.len() as u64,
        checksum: crc32c::crc32c(&body),
        ..PayloadHeader::default()
    };
    let mut out = (header.encoded_len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&header.encode_to_vec());
    out.extend_from_slice(&body);
    out
}

/// Sends one frame on a new stream; counts the node's answer.
async fn send(control: &mut libp2p_stream::Control, target: PeerId, bytes: &[u8], state: &State) {
    let Ok(mut stream) = control.open_stream(target, StreamProtocol::new(PROTOCOL)).await else {
        count(state, "open_failed", 1);
        // No connection (the node cut this peer off): an open fails here,
        // without reaching the node. Retrying in a tight loop would only
        // burn this process's share of the cores the nodes run on, and the
        // bench would measure that instead of the node.
        tokio::time::sleep(Duration::from_millis(5)).await;
        return;
    };
    let mut ack = [9u8; 1];
    let sent = async {
        stream.write_all(bytes).await?;
        stream.flush().await?;
        stream.read_exact(&mut ack).await
    };
    match tokio::time::timeout(Duration::from_secs(10), sent).await {
        Ok(Ok(())) if ack[0] == 0 => count(state, "accepted", 1),
        Ok(Ok(())) => count(state, "refused", 1),
        _ => count(state, "reset", 1),
    }
    let _ = stream.close().await;
}

/// Waits for the node's first heartbeat; its fingerprint and round.
async fn node_heartbeat(state: &State, until: Instant) -> Option<Heartbeat> {
    while Instant::now() < until {
        if let Some(hb) = lock(state).node.clone() {
            return Some(hb);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn run_attack(
    args: Args,
    target: PeerId,
    me: PeerId,
    mut control: libp2p_stream::Control,
    state: State,
    until: Instant,
) {
    let Some(first) = node_heartbeat(&state, until).await else { return };
    let (run, fp) = (args.run_id.clone(), first.fingerprint.clone());
    let n = usize::try_from(args.elements).unwrap_or(1).max(1);
    if lock(&state).role.is_some() {
        // Heartbeats every 500 ms: give the node a few to count this peer in.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    match args.attack {
        Attack::SilentStreams { count: want } => {
            let mut open: Vec<Stream> = Vec::new();
            while Instant::now() < until {
                // Streams the node closed or answered are gone: reopen them.
                let before = open.len();
                open.retain_mut(|s| {
                    let mut b = [0u8; 1];
                    s.read(&mut b).now_or_never().is_none()
                });
                count(&state, "closed_by_node", (before - open.len()) as u64);
                while open.len() < want && Instant::now() < until {
                    match control.open_stream(target, StreamProtocol::new(PROTOCOL)).await {
                        Ok(s) => {
                            open.push(s);
                            count(&state, "opened", 1);
                        }
                        Err(_) => {
                            count(&state, "open_failed", 1);
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Attack::PullFlood => {
            let flooders: Vec<_> = (0..32)
                .map(|_| {
                    let (mut control, state) = (control.clone(), state.clone());
                    let (run, fp) = (run.clone(), fp.clone());
                    tokio::spawn(async move {
                        while Instant::now() < until {
                            let round = node_round(&state) + 1;
                            let req =
                                frame(&run, &fp, me, PayloadKind::PullRequest, round, 1.0, &[0.0]);
                            send(&mut control, target, &req, &state).await;
                            count(&state, "pull_requests", 1);
                        }
                    })
                })
                .collect();
            for f in flooders {
                let _ = f.await;
            }
        }
        Attack::Payloads => {
            let values = vec![0.5f32; n];
            let mut as_member = false;
            while Instant::now() < until {
                let round = node_round(&state);
                for (slot, kind, weight) in [
                    (u64::MAX - 5, PayloadKind::Params, 1.0),
                    (round.saturating_add(10_000), PayloadKind::Params, 1.0),
                    (round.saturating_add(3), PayloadKind::Params, 1.0),
                    (FINAL_SLOT, PayloadKind::Shard, 1e300),
                ] {
                    let bytes = frame(&run, &fp, me, kind, slot, weight, &values);
                    send(&mut control, target, &bytes, &state).await;
                }
                // Halfway, turn member and go on.
                if !as_member && Instant::now() + Duration::from_secs(args.secs / 2) > until {
                    as_member = true;
                    lock(&state).role = Some("joining");
                    count(&state, "became_member", 1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Attack::Sybil { identities, direct } => {
            sybils(&args.run_id, identities, direct, &args.target, &state, until).await;
        }
        Attack::PullSource => {
            let own = vec![5.0f32; n];
            while Instant::now() < until {
                let asked = std::mem::take(&mut lock(&state).pull_requests);
                for (peer, round) in asked {
                    let reply = frame(&run, &fp, me, PayloadKind::PullReply, round, 1.0, &own);
                    send(&mut control, peer, &reply, &state).await;
                    count(&state, "pull_answered", 1);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Attack::DoubleSend => {
            // To every member: for the next slots it will reach, a payload it
            // refuses (a NaN), then a valid one (its own last values back).
            let mut sent: BTreeSet<(PeerId, u64)> = BTreeSet::new();
            while Instant::now() < until {
                let targets: Vec<(PeerId, u64, Vec<f32>)> = {
                    let s = lock(&state);
                    s.members
                        .iter()
                        .filter_map(|(p, hb)| Some((*p, hb.round, s.values_from.get(p)?.clone())))
                        .collect()
                };
                for (peer, round, values) in targets {
                    for slot in [round + 2, round + 3] {
                        if !sent.insert((peer, slot)) {
                            continue;
                        }
                        let mut bad = values.clone();
                        bad[0] = f32::NAN;
                        let nan = frame(&run, &fp, me, PayloadKind::Params, slot, 1.0, &bad);
                        send(&mut control, peer, &nan, &state).await;
                        let good = frame(&run, &fp, me, PayloadKind::Params, slot, 1.0, &values);
                        send(&mut control, peer, &good, &state).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `k` more identities that publish member heartbeats. Without `direct`
/// they connect only to a relay swarm, which alone connects to the node
/// (one connection, many identities); with `direct` each dials the node
/// itself.
async fn sybils(
    run_id: &str,
    k: usize,
    direct: bool,
    target: &Multiaddr,
    state: &State,
    until: Instant,
) {
    let Ok(mut relay) = build(Keypair::generate_ed25519()) else { return };
    let Ok(addr) = "/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>() else { return };
    if relay.listen_on(addr).is_err() || relay.dial(target.clone()).is_err() {
        return;
    }
    let _ = relay.behaviour_mut().gossipsub.subscribe(&topic(run_id));
    let relay_addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = relay.select_next_some().await {
            break address.with(Protocol::P2p(*relay.local_peer_id()));
        }
    };
    let mut tasks = vec![tokio::spawn(async move {
        loop {
            relay.select_next_some().await;
        }
    })];
    for _ in 0..k {
        let Ok(mut s) = build(Keypair::generate_ed25519()) else { return };
        let _ = s.behaviour_mut().gossipsub.subscribe(&topic(run_id));
        let _ = s.dial(if direct { target.clone() } else { relay_addr.clone() });
        let (state, run_id) = (state.clone(), run_id.to_string());
        tasks.push(tokio::spawn(async move {
            let mut beat = tokio::time::interval(Duration::from_millis(500));
            let mut seq = 1u64;
            loop {
                tokio::select! {
                    _ = s.select_next_some() => {}
                    _ = beat.tick() => {
                        seq += 1;
                        let node = lock(&state).node.clone();
                        let Some(node) = node else { continue };
                        let hb = Heartbeat {
                            run_id: run_id.clone(),
                            peer_id: s.local_peer_id().to_bytes(),
                            addrs: Vec::new(),
                            round: node.round,
                            role: "node".into(),
                            fingerprint: node.fingerprint,
                            seq,
                            entry_round: 0,
                            elements: 0,
                            leaving: false,
                        };
                        let topic = topic(&run_id);
                        if s.behaviour_mut().gossipsub.publish(topic, hb.encode_to_vec()).is_ok() {
                            count(&state, "sybil_heartbeats", 1);
                        }
                    }
                }
            }
        }));
    }
    count(state, "identities", k as u64);
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
}
