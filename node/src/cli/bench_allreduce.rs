//! `murmur bench-allreduce` (hidden): one rank of the all-reduce benchmark
//! that `scripts/bench_allreduce.py` runs N of. Rank 0 prints its address;
//! the others join through it. Once all N are members, every rank runs
//! `--repeat` all-reduces of `--elements` f32 values with the shard-owner
//! all-reduce that DiLoCo and merge use (`mix::allreduce`), over the real
//! `Network` (TCP + TLS + Yamux), and prints one JSON line per all-reduce:
//! the seconds from its start on this rank to the averaged vector. A last,
//! tiny all-reduce is a barrier, so no rank leaves while others still wait
//! for its results.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde_json::json;
use tokio::task::JoinSet;

use super::CliError;
use crate::mix::allreduce::{AllReduce, AllReduceTimeouts};
use crate::mix::mixer::{Message, MsgKind, Roster};
use crate::net::encoding::Encoding;
use crate::net::outbox::to_message;
use crate::net::service::{NetConfig, NetEvent, Network};
use crate::net::wire;

const RUN: &str = "bench-allreduce";
const FINGERPRINT: &str = "bench-allreduce";
/// How long a rank waits for the others to join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Each phase's deadline: generous, a bench wants every shard.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct BenchAllReduceArgs {
    /// This rank, 0..ranks
    #[arg(long)]
    rank: usize,
    /// Ranks taking part
    #[arg(long)]
    ranks: usize,
    /// Rank 0's address as it printed it (every other rank needs it)
    #[arg(long)]
    peer: Option<Multiaddr>,
    /// Values in the vector (25 MB of f32 is 6,250,000)
    #[arg(long, default_value_t = 6_250_000)]
    elements: usize,
    /// All-reduces to time
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// How shards and results travel: f32, bf16, f16, int8[:BLOCK]
    #[arg(long, default_value = "f32")]
    encoding: Encoding,
    /// Tokio worker threads
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

pub fn run(args: BenchAllReduceArgs) -> Result<(), CliError> {
    if args.ranks == 0 || args.rank >= args.ranks {
        return Err(CliError::usage(format!(
            "--rank {} must be below --ranks {}",
            args.rank, args.ranks
        )));
    }
    if args.rank > 0 && args.peer.is_none() {
        return Err(CliError::usage(format!(
            "--rank {} needs --peer (rank 0's address)",
            args.rank
        )));
    }
    if args.elements < args.ranks {
        return Err(CliError::usage(format!(
            "--elements {} must be at least --ranks {}",
            args.elements, args.ranks
        )));
    }
    if matches!(args.encoding, Encoding::TopK { .. }) {
        return Err(CliError::usage(
            "--encoding topk needs error feedback (DiLoCo); use f32, bf16, f16 or int8",
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the tokio runtime: {e}")))?;
    runtime.block_on(bench(args))
}

fn emit(line: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// One rank's all-reduces in flight (or not yet begun, holding early shards).
struct Rank {
    net: Arc<Network>,
    roster: Roster,
    encoding: Encoding,
    reduces: BTreeMap<u64, AllReduce>,
    sends: JoinSet<Result<(), String>>,
}

impl Rank {
    fn reduce(&mut self, slot: u64) -> &mut AllReduce {
        let t = AllReduceTimeouts { reduce: PHASE_TIMEOUT, gather: PHASE_TIMEOUT };
        let enc = self.encoding;
        self.reduces.entry(slot).or_insert_with(|| AllReduce::new(slot, t).with_encoding(enc))
    }

    fn send(&mut self, out: Vec<Message>) {
        for m in out {
            let net = self.net.clone();
            let mut header =
                wire::build_header(RUN, FINGERPRINT, net.sender_bytes(), m.kind.to_wire(), m.slot);
            header.sample_weight = m.weight;
            header.element_offset = m.offset as u64;
            self.sends.spawn(async move {
                let (header, body) = wire::encode_shared(header, m.values.clone(), m.encoding);
                net.send(m.peer, &header, &body).await.map_err(|e| e.to_string())
            });
        }
    }

    /// Runs the all-reduce of `slot` on `values` to its end.
    async fn all_reduce(
        &mut self,
        events: &mut tokio::sync::mpsc::Receiver<NetEvent>,
        slot: u64,
        values: Vec<f32>,
    ) -> Result<(), CliError> {
        let roster = self.roster.clone();
        let out = self.reduce(slot).start(roster, values, 1.0, Instant::now());
        self.send(out);
        while self.reduces.get(&slot).and_then(AllReduce::result).is_none() {
            let deadline = self.reduces.get(&slot).and_then(AllReduce::deadline);
            let sleep =
                deadline.map_or(PHASE_TIMEOUT, |d| d.saturating_duration_since(Instant::now()));
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(NetEvent::Payload { from, payload }) => {
                        let Some(m) = to_message(from, payload) else { continue };
                        if matches!(m.kind, MsgKind::Shard | MsgKind::ShardResult) && m.slot >= slot {
                            let values = m.values.clone();
                            let out = self.reduce(m.slot).receive(m);
                            self.send(out);
                            // Done with the values, as a node is after mixing them.
                            if let Ok(v) = Arc::try_unwrap(values) {
                                self.net.recycle(v);
                            }
                        }
                    }
                    Some(_) => {}
                    None => return Err(CliError::failed("the network stopped")),
                },
                Some(done) = self.sends.join_next(), if !self.sends.is_empty() => {
                    if let Ok(Err(e)) = done {
                        return Err(CliError::failed(format!("a send failed: {e}")));
                    }
                }
                _ = tokio::time::sleep(sleep) => {
                    let out = self.reduce(slot).tick(Instant::now());
                    self.send(out);
                }
            }
        }
        let done = self.reduces.remove(&slot);
        if done.is_some_and(|r| r.fallbacks() > 0) {
            return Err(CliError::failed(format!("all-reduce {slot}: a range fell back")));
        }
        Ok(())
    }
}

async fn bench(args: BenchAllReduceArgs) -> Result<(), CliError> {
    let mut cfg = NetConfig::new(RUN, FINGERPRINT, args.elements);
    cfg.swarm.quic = false;
    cfg.transfer_timeout = PHASE_TIMEOUT;
    cfg.expect.encoding = args.encoding;
    // A bench exchanges payloads without a run's membership.
    cfg.swarm.inbound.members_only = false;
    if args.rank == 0 {
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().map_err(CliError::failed)?];
    } else {
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().map_err(CliError::failed)?];
        cfg.bootstrap = args.peer.iter().cloned().collect();
    }
    let (net, mut events) =
        Network::start(Keypair::generate_ed25519(), cfg).await.map_err(CliError::failed)?;
    let net = Arc::new(net);
    if args.rank == 0 {
        let addr = net.view().listen_addrs.first().cloned();
        let addr = addr.ok_or_else(|| CliError::failed("the network reports no listen address"))?;
        emit(json!(addr.with(Protocol::P2p(net.local_peer)).to_string()));
    }
    let (members, early) = wait_for_ranks(&net, &mut events, args.ranks).await?;
    let mut rank = Rank {
        roster: Roster::new(net.local_peer, members),
        net: net.clone(),
        encoding: args.encoding,
        reduces: BTreeMap::new(),
        sends: JoinSet::new(),
    };
    for m in early {
        let out = rank.reduce(m.slot).receive(m);
        rank.send(out);
    }
    let values: Vec<f32> = (0..args.elements)
        .map(|i| ((i % 65_521) as f32 * 0.013 + args.rank as f32).sin())
        .collect();
    // One untimed all-reduce first: connections, buffers.
    rank.all_reduce(&mut events, 0, values.clone()).await?;
    for index in 0..args.repeat {
        let sent = net.accounting().total().bytes_sent;
        let started = Instant::now();
        rank.all_reduce(&mut events, index as u64 + 1, values.clone()).await?;
        emit(json!({
            "rank": args.rank, "ranks": args.ranks, "index": index, "elements": args.elements,
            "encoding": args.encoding.to_string(), "seconds": started.elapsed().as_secs_f64(),
            "bytes_sent": net.accounting().total().bytes_sent - sent,
        }));
    }
    // The barrier, then the last sends out.
    let barrier = vec![0.0; args.ranks];
    rank.all_reduce(&mut events, args.repeat as u64 + 1, barrier).await?;
    while rank.sends.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// Waits until `ranks - 1` other members of this bench are known; returns
/// them and the shards that faster ranks sent meanwhile.
async fn wait_for_ranks(
    net: &Network,
    events: &mut tokio::sync::mpsc::Receiver<NetEvent>,
    ranks: usize,
) -> Result<(Vec<PeerId>, Vec<Message>), CliError> {
    let start = Instant::now();
    let mut early = Vec::new();
    loop {
        let members: Vec<PeerId> = net.view().members.iter().map(|m| m.peer).collect();
        if members.len() + 1 >= ranks {
            return Ok((members, early));
        }
        if start.elapsed() > JOIN_TIMEOUT {
            return Err(CliError::failed(format!(
                "{} of {ranks} ranks joined within {JOIN_TIMEOUT:?}",
                members.len() + 1
            )));
        }
        if let Ok(Some(NetEvent::Payload { from, payload })) =
            tokio::time::timeout(Duration::from_millis(50), events.recv()).await
        {
            early.extend(to_message(from, payload));
        }
    }
}
