//! `murmur bench-transfer` (hidden): the two ends of the transfer benchmark
//! that `scripts/bench_transfer.py` runs. One process receives, the other
//! sends `--repeat` payloads of `--mib` MiB worth of f32 parameters, either as
//! `/murmur/params/1` payloads over the real `Network` (TCP + TLS or Noise + Yamux)
//! or, with `--raw-tcp`, as the same body bytes over a plain TCP socket (the
//! baseline). Both print one JSON line per payload on stdout.
//!
//! Timing is the receiver's. The sender stamps each payload with the wall
//! clock (microseconds since the Unix epoch) just before its first byte goes
//! out: in the header's `round` for murmur (the bench has no rounds), in an
//! 8-byte prefix for raw TCP. The receiver subtracts the stamp from the moment
//! it holds the validated, decoded values. Both ends run on one host, so they
//! read the same clock. Encoding happens before the stamp; the sender reports
//! its time separately.
//!
//! Wire bytes are what TCP carried: `ss`'s `bytes_sent` on the sender's
//! socket after the last acknowledgement, so TLS or Noise, Yamux,
//! multistream-select, identify, ping and heartbeats are all in them. The
//! receiver therefore stays until the sender has hung up.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use murmur_proto::wire::v1::{PayloadHeader, PayloadKind};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::CliError;
use crate::net::encoding::{self, Encoding};
use crate::net::security::Security;
use crate::net::service::{NetConfig, NetEvent, Network};
use crate::net::wire::{self, Payload};

const RUN: &str = "bench-transfer";
const FINGERPRINT: &str = "bench-transfer";
/// How long the sender waits for its connection to the receiver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the receiver waits for the next payload (or shard) before it
/// gives up: a sender that failed does not leave it hanging.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the receiver waits for the sender to hang up after the last payload.
const HANG_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most shards one payload may be split into.
const MAX_SHARDS: usize = 64;
/// Raw TCP prefix: send stamp and body length, both u64 little-endian.
const RAW_PREFIX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Send,
    Recv,
}

#[derive(Debug, clap::Args)]
pub struct BenchTransferArgs {
    /// Which end this process is
    #[arg(long)]
    role: Role,
    /// Address the receiver listens on
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    listen: Multiaddr,
    /// The receiver's address as it printed it (sender only)
    #[arg(long, required_if_eq("role", "send"))]
    peer: Option<Multiaddr>,
    /// Payload size in MiB of f32 values (both ends must agree)
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// How the sender encodes the values: f32, bf16, f16, int8[:BLOCK], topk:K
    /// (both ends must agree: a receiver accepts only its own and f32)
    #[arg(long, default_value = "f32")]
    encoding: Encoding,
    /// Payloads to move (both ends must agree)
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Split each payload into this many shards (`element_offset`), sent
    /// over parallel substreams (sender only)
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// A plain TCP socket instead of libp2p: the baseline
    #[arg(long)]
    raw_tcp: bool,
    /// Raw TCP receiver: read every payload into a new buffer instead of
    /// reusing one (the page faults a receiver without a pool pays)
    #[arg(long)]
    fresh_buffer: bool,
    /// Tokio worker threads; 0 runs a current-thread runtime
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Security handshakes offered, preferred first: tls, noise, or tls,noise
    #[arg(long, default_value = "tls,noise", value_delimiter = ',')]
    security: Vec<Security>,
}

pub fn run(args: BenchTransferArgs) -> Result<(), CliError> {
    let elements = check(&args)?;
    let runtime = match args.threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    }
    .map_err(|e| CliError::failed(format!("cannot start the tokio runtime: {e}")))?;
    runtime.block_on(async {
        match (args.role, args.raw_tcp) {
            (Role::Recv, false) => recv_murmur(&args, elements).await,
            (Role::Send, false) => send_murmur(&args, elements).await,
            (Role::Recv, true) => recv_raw(&args, elements).await,
            (Role::Send, true) => send_raw(&args, elements).await,
        }
    })
}

/// Validates the flags; returns the element count of one payload.
fn check(args: &BenchTransferArgs) -> Result<usize, CliError> {
    if !(1..=4096).contains(&args.mib) {
        return Err(CliError::usage(format!("--mib must be 1-4096 (got {})", args.mib)));
    }
    if args.repeat == 0 {
        return Err(CliError::usage("--repeat must be at least 1 (got 0)"));
    }
    if !(1..=MAX_SHARDS).contains(&args.shards) {
        let n = args.shards;
        return Err(CliError::usage(format!("--shards must be 1-{MAX_SHARDS} (got {n})")));
    }
    if args.fresh_buffer && !args.raw_tcp {
        return Err(CliError::usage(
            "--fresh-buffer applies to --raw-tcp (murmur's receiver reads into recycled buffers)",
        ));
    }
    if args.shards > 1 && args.raw_tcp {
        return Err(CliError::usage("--shards applies to murmur payloads, not --raw-tcp"));
    }
    Ok(args.mib * 1024 * 1024 / 4)
}

fn emit(line: Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the harness is gone; nothing to report to.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Seconds from a sender's stamp to now.
fn since_stamp(stamp: u64) -> f64 {
    now_micros().saturating_sub(stamp) as f64 / 1e6
}

/// CPU time this process has used so far, summed over its live threads
/// (`/proc/self/task/*/schedstat`, nanoseconds); 0 where that is unreadable.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// Finite, varied values (bf16 and int8 must not be trivially exact).
fn sample_values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i % 65_521) as f32 * 0.013).sin() * 0.1).collect()
}

fn receipt(transport: &str, index: usize, elements: usize, body: usize, secs: f64) -> Value {
    json!({
        "role": "recv", "transport": transport, "index": index, "elements": elements,
        "body_bytes": body, "seconds": secs,
        "mb_per_s": body as f64 / secs / 1e6, "params_per_s": elements as f64 / secs,
    })
}

fn net_config(args: &BenchTransferArgs, elements: usize) -> NetConfig {
    let mut cfg = NetConfig::new(RUN, FINGERPRINT, elements);
    cfg.swarm.quic = false;
    cfg.swarm.security = args.security.clone();
    cfg.listen = Vec::new();
    cfg.expect.encoding = args.encoding;
    // A bench exchanges payloads without a run's membership.
    cfg.swarm.inbound.members_only = false;
    cfg
}

async fn recv_murmur(args: &BenchTransferArgs, elements: usize) -> Result<(), CliError> {
    let mut cfg = net_config(args, elements);
    cfg.listen = vec![args.listen.clone()];
    let (net, mut events) =
        Network::start(Keypair::generate_ed25519(), cfg).await.map_err(CliError::failed)?;
    let addr = net.view().listen_addrs.first().cloned();
    let addr = addr.ok_or_else(|| CliError::failed("the network reports no listen address"))?;
    emit(json!(addr.with(Protocol::P2p(net.local_peer)).to_string()));
    let mut pending = Assembler::new(elements);
    let mut done = 0;
    let mut cpu = cpu_seconds();
    while done < args.repeat {
        let event = match tokio::time::timeout(PAYLOAD_TIMEOUT, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => return Err(CliError::failed("the network stopped before every payload")),
            Err(_) => {
                return Err(CliError::failed(format!(
                    "received {done} of {} payloads, then nothing for {PAYLOAD_TIMEOUT:?}",
                    args.repeat
                )));
            }
        };
        let NetEvent::Payload { payload, .. } = event else { continue };
        if let Some(whole) = pending.add(payload) {
            let secs = since_stamp(whole.stamp);
            let mut line = receipt("murmur", done, whole.values.len(), whole.body_bytes, secs);
            line["shards"] = json!(whole.shards);
            line["encoding"] = json!(whole.encoding);
            line["frame_bytes"] = json!(whole.frame_bytes);
            line["cpu_seconds"] = json!(cpu_seconds() - cpu);
            emit(line);
            // Done with the values, as a node is after mixing them.
            net.recycle(whole.values);
            cpu = cpu_seconds();
            done += 1;
        }
    }
    wait_hung_up(&net).await;
    net.shutdown().await;
    Ok(())
}

/// One payload put back together from its shards.
struct Whole {
    stamp: u64,
    values: Vec<f32>,
    filled: usize,
    shards: usize,
    body_bytes: usize,
    frame_bytes: usize,
    encoding: String,
}

/// Collects the shards of each payload, keyed by their stamp. The bench's
/// own sender is trusted to send disjoint shards; `Network` has already
/// checked that each lies inside the vector.
struct Assembler {
    elements: usize,
    partial: HashMap<u64, Whole>,
}

impl Assembler {
    fn new(elements: usize) -> Assembler {
        Assembler { elements, partial: HashMap::new() }
    }

    /// Adds a shard; returns the payload once its last shard is in.
    fn add(&mut self, p: Payload) -> Option<Whole> {
        let h = &p.header;
        let whole = self.partial.entry(h.round).or_insert_with(|| Whole {
            stamp: h.round,
            values: Vec::new(),
            filled: 0,
            shards: 0,
            body_bytes: 0,
            frame_bytes: 0,
            encoding: encoding::from_proto(h.encoding, h.block_size, h.top_k)
                .map_or_else(|_| "unknown".to_string(), |e| e.to_string()),
        });
        let (start, n) = (h.element_offset as usize, p.values.len());
        whole.shards += 1;
        whole.body_bytes += h.body_len as usize;
        whole.frame_bytes += wire::frame_len(h);
        whole.filled += n;
        if n == self.elements {
            // Unsharded: the values are the payload, no copy.
            whole.values = p.values;
        } else {
            whole.values.resize(self.elements, 0.0);
            whole.values[start..start + n].copy_from_slice(&p.values);
        }
        let stamp = h.round;
        if whole.filled < self.elements {
            return None;
        }
        self.partial.remove(&stamp)
    }
}

async fn send_murmur(args: &BenchTransferArgs, elements: usize) -> Result<(), CliError> {
    let target = args.peer.clone().ok_or_else(|| CliError::usage("--role send needs --peer"))?;
    let Some(Protocol::P2p(peer)) = target.iter().last() else {
        return Err(CliError::usage(format!("--peer {target} needs a /p2p/<peer id> suffix")));
    };
    let mut cfg = net_config(args, elements);
    cfg.bootstrap = vec![target.clone()];
    let (net, mut events) =
        Network::start(Keypair::generate_ed25519(), cfg).await.map_err(CliError::failed)?;
    // Membership events would fill the channel and stall the swarm task.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    wait_connected(&net, peer).await?;
    let values = Arc::new(sample_values(elements));
    for index in 0..args.repeat {
        let started = Instant::now();
        let mut shards = encode_shards(&net, &values, args.encoding, args.shards);
        let encode_seconds = started.elapsed().as_secs_f64();
        let stamp = now_micros();
        // The stamp is not covered by the checksum, which is over the body.
        shards.iter_mut().for_each(|(h, _)| h.round = stamp);
        let (started, cpu) = (Instant::now(), cpu_seconds());
        let sends = shards.iter().map(|(h, body)| net.send(peer, h, body));
        futures::future::try_join_all(sends).await.map_err(CliError::failed)?;
        let body: usize = shards.iter().map(|(_, b)| b.len()).sum();
        emit(json!({
            "role": "send", "transport": "murmur", "index": index, "body_bytes": body,
            "encode_seconds": encode_seconds, "acked_seconds": started.elapsed().as_secs_f64(),
            "cpu_seconds": cpu_seconds() - cpu,
        }));
    }
    let sent = net.accounting().with_peer(&peer);
    emit(json!({
        "role": "send", "transport": "murmur", "summary": true,
        "frame_bytes": sent.bytes_sent, "tcp_bytes": tcp_bytes_sent(&target),
    }));
    net.shutdown().await;
    Ok(())
}

async fn wait_connected(net: &Network, peer: PeerId) -> Result<(), CliError> {
    let start = Instant::now();
    while !net.view().connected.contains(&peer) {
        if start.elapsed() > CONNECT_TIMEOUT {
            return Err(CliError::failed(format!(
                "no connection to {peer} after {CONNECT_TIMEOUT:?}; is the receiver running?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Waits (bounded) until no peer is connected any more.
async fn wait_hung_up(net: &Network) {
    let start = Instant::now();
    while !net.view().connected.is_empty() && start.elapsed() < HANG_UP_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `shards` contiguous pieces of `values`, each a sealed payload.
/// A single shard is encoded as a node sends it: f32 bodies share the values.
fn encode_shards(
    net: &Network,
    values: &Arc<Vec<f32>>,
    enc: Encoding,
    shards: usize,
) -> Vec<(PayloadHeader, Bytes)> {
    let per = values.len().div_ceil(shards);
    let template = wire::build_header(RUN, FINGERPRINT, net.sender_bytes(), PayloadKind::Params, 0);
    if shards <= 1 {
        return vec![wire::encode_shared(template, values.clone(), enc)];
    }
    values
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let header = PayloadHeader { element_offset: (i * per) as u64, ..template.clone() };
            let (header, body) = wire::encode_payload(header, chunk, enc);
            (header, Bytes::from(body))
        })
        .collect()
}

/// The TCP address of a `/ip4|ip6/…/tcp/…` multiaddr.
fn socket_addr(addr: &Multiaddr) -> Result<SocketAddr, CliError> {
    let mut ip = None;
    for part in addr.iter() {
        match part {
            Protocol::Ip4(a) => ip = Some(IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::V6(a)),
            Protocol::Tcp(port) => {
                if let Some(ip) = ip {
                    return Ok(SocketAddr::new(ip, port));
                }
            }
            _ => {}
        }
    }
    Err(CliError::usage(format!("{addr} is not an /ip4|ip6/<address>/tcp/<port> address")))
}

async fn recv_raw(args: &BenchTransferArgs, elements: usize) -> Result<(), CliError> {
    let listener = TcpListener::bind(socket_addr(&args.listen)?)
        .await
        .map_err(|e| CliError::failed(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = listener.local_addr().map_err(CliError::failed)?;
    let addr = Multiaddr::from(local.ip()).with(Protocol::Tcp(local.port()));
    emit(json!(addr.to_string()));
    let (mut sock, _) = listener.accept().await.map_err(CliError::failed)?;
    sock.set_nodelay(true).map_err(CliError::failed)?;
    // No encoding carries more than 8 bytes per element (top-k at k = n).
    let limit = elements.saturating_mul(8) as u64;
    // One buffer for every payload, as a tuned socket copy would do, unless
    // --fresh-buffer asks for the page faults of a new one each time.
    let mut body = Vec::new();
    let mut cpu = cpu_seconds();
    for index in 0..args.repeat {
        let mut prefix = [0u8; RAW_PREFIX];
        sock.read_exact(&mut prefix).await.map_err(CliError::failed)?;
        let (stamp, len) = split_prefix(&prefix);
        if len > limit {
            return Err(CliError::failed(format!("raw body of {len} bytes exceeds {limit}")));
        }
        if args.fresh_buffer {
            body = vec![0u8; len as usize];
        } else {
            body.resize(len as usize, 0);
        }
        sock.read_exact(&mut body).await.map_err(CliError::failed)?;
        let secs = since_stamp(stamp);
        sock.write_all(&[0]).await.map_err(CliError::failed)?;
        let mut line = receipt("raw_tcp", index, elements, body.len(), secs);
        line["cpu_seconds"] = json!(cpu_seconds() - cpu);
        emit(line);
        cpu = cpu_seconds();
    }
    // Wait for the sender's end-of-stream so that it can read its counters first.
    let _ = tokio::time::timeout(HANG_UP_TIMEOUT, sock.read(&mut [0u8; 1])).await;
    Ok(())
}

fn split_prefix(prefix: &[u8; RAW_PREFIX]) -> (u64, u64) {
    let (mut stamp, mut len) = ([0u8; 8], [0u8; 8]);
    stamp.copy_from_slice(&prefix[..8]);
    len.copy_from_slice(&prefix[8..]);
    (u64::from_le_bytes(stamp), u64::from_le_bytes(len))
}

async fn send_raw(args: &BenchTransferArgs, elements: usize) -> Result<(), CliError> {
    let target = args.peer.clone().ok_or_else(|| CliError::usage("--role send needs --peer"))?;
    let mut sock = TcpStream::connect(socket_addr(&target)?)
        .await
        .map_err(|e| CliError::failed(format!("cannot connect to {target}: {e}")))?;
    sock.set_nodelay(true).map_err(CliError::failed)?;
    let values = sample_values(elements);
    for index in 0..args.repeat {
        let started = Instant::now();
        let body = encoding::encode(&values, args.encoding);
        let encode_seconds = started.elapsed().as_secs_f64();
        let mut prefix = now_micros().to_le_bytes().to_vec();
        prefix.extend_from_slice(&(body.len() as u64).to_le_bytes());
        let (started, cpu) = (Instant::now(), cpu_seconds());
        sock.write_all(&prefix).await.map_err(CliError::failed)?;
        sock.write_all(&body).await.map_err(CliError::failed)?;
        let mut ack = [0u8; 1];
        sock.read_exact(&mut ack).await.map_err(CliError::failed)?;
        emit(json!({
            "role": "send", "transport": "raw_tcp", "index": index, "body_bytes": body.len(),
            "encode_seconds": encode_seconds, "acked_seconds": started.elapsed().as_secs_f64(),
            "cpu_seconds": cpu_seconds() - cpu,
        }));
    }
    emit(json!({
        "role": "send", "transport": "raw_tcp", "summary": true,
        "tcp_bytes": tcp_bytes_sent(&target),
    }));
    Ok(())
}

/// Bytes TCP sent on this host's connections to `target`'s port, from
/// `ss -ti` (`bytes_sent`, retransmissions included); `None` where `ss` is
/// missing.
fn tcp_bytes_sent(target: &Multiaddr) -> Option<u64> {
    let port = socket_addr(target).ok()?.port();
    let filter = format!("( dport = :{port} )");
    let out = std::process::Command::new("ss").args(["-tinH", &filter]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let sent = text.split_whitespace().filter_map(|w| w.strip_prefix("bytes_sent:"));
    Some(sent.filter_map(|v| v.parse::<u64>().ok()).sum())
}
