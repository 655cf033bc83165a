//! `murmur status ADDR...`: what one or many nodes are doing, from their
//! gRPC API, as a table (`--watch` follows, `--json` is for scripts); an
//! address that serves a coordinator's API is shown as one. And
//! the small control commands that share its client: `murmur fault`,
//! `murmur checkpoint`, `murmur shutdown`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use murmur_proto::coordinator::v1 as cpb;
use murmur_proto::v1 as pb;
use serde_json::{Value, json};

use super::CliError;
use crate::api::ApiToken;
use crate::api::client::NodeClient;
use crate::daemon::human_bytes;
use crate::fault::FaultSpec;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a client proves it may make control calls.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenArgs {
    /// The node's API token (for control calls)
    #[arg(long, global = true, env = "MURMUR_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File whose first line is the node's API token
    #[arg(long, global = true, env = "MURMUR_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    #[command(flatten)]
    ca: CaArgs,
}

/// What a client trusts for `https://` addresses.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CaArgs {
    /// For https:// addresses: trust this certificate (PEM; the node's self-signed one, or its CA) [default: the system's roots]
    #[arg(long, global = true, env = "MURMUR_API_CA")]
    api_ca: Option<PathBuf>,
}

impl CaArgs {
    fn path(&self) -> Option<&std::path::Path> {
        self.api_ca.as_deref()
    }
}

impl TokenArgs {
    fn token(&self) -> Result<Option<ApiToken>, CliError> {
        match (&self.api_token, &self.api_token_file) {
            (Some(t), _) => ApiToken::new(t).map(Some).map_err(CliError::usage),
            (None, Some(f)) => ApiToken::from_file(f).map(Some).map_err(CliError::usage),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// API addresses of the nodes (HOST:PORT), as `murmur run` prints them
    #[arg(required = true)]
    addrs: Vec<String>,
    /// Keep following: redraw whenever a node's status changes
    #[arg(long)]
    watch: bool,
    /// JSON instead of a table (with --watch, one line per change)
    #[arg(long)]
    json: bool,
    /// Also list each node's peers
    #[arg(long)]
    peers: bool,
    /// With --watch, least time between two updates of one node, in milliseconds
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    #[command(flatten)]
    ca: CaArgs,
}

#[derive(Debug, clap::Args)]
pub struct FaultArgs {
    #[command(subcommand)]
    action: FaultAction,
    #[command(flatten)]
    token: TokenArgs,
}

#[derive(Debug, clap::Subcommand)]
enum FaultAction {
    /// Start a fault on a node, in --fault syntax (e.g. drop:0.3,for=30s)
    Inject { addr: String, spec: String },
    /// End faults on a node: the ids given, or all of them
    Clear { addr: String, ids: Vec<u64> },
    /// List a node's faults
    List { addr: String },
}

#[derive(Debug, clap::Args)]
pub struct NodeCallArgs {
    /// API address of the node (HOST:PORT)
    addr: String,
    #[command(flatten)]
    token: TokenArgs,
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))
}

async fn connect(
    addr: &str,
    token: Option<ApiToken>,
    ca: Option<&std::path::Path>,
) -> Result<NodeClient, CliError> {
    NodeClient::connect(addr, token, ca, CONNECT_TIMEOUT).await.map_err(|e| match e {
        crate::api::client::ClientError::BadAddress { .. }
        | crate::api::client::ClientError::Tls(_) => CliError::usage(e),
        other => CliError::failed(other),
    })
}

pub fn status(args: StatusArgs) -> Result<(), CliError> {
    runtime()?
        .block_on(async move { if args.watch { watch(&args).await } else { once(&args).await } })
}

/// One look at every node (and coordinator); fails (exit 1) if any could
/// not be read.
async fn once(args: &StatusArgs) -> Result<(), CliError> {
    let mut rows = Vec::new();
    let mut coordinators = Vec::new();
    for addr in &args.addrs {
        let row = match connect(addr, None, args.ca.path()).await {
            Ok(mut c) => match (c.status().await, args.peers) {
                (Ok(s), true) => c.peers().await.map(|p| (s, p)).map_err(|e| e.to_string()),
                (Ok(s), false) => Ok((s, Vec::new())),
                // Not a node: perhaps a coordinator.
                (Err(e), _) if e.unimplemented() => match c.coordinator_status().await {
                    Ok(s) => {
                        coordinators.push((addr.clone(), s));
                        continue;
                    }
                    Err(_) => Err(e.to_string()),
                },
                (Err(e), _) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        rows.push((addr.clone(), row));
    }
    if args.json {
        let mut all: Vec<Value> = rows.iter().map(|(a, r)| row_json(a, r)).collect();
        all.extend(coordinators.iter().map(|(a, s)| coordinator_json(a, s)));
        println!("{}", serde_json::to_string_pretty(&all).map_err(CliError::failed)?);
    } else {
        if !rows.is_empty() {
            print!("{}", table(&rows));
        }
        for (addr, s) in &coordinators {
            print!("{}", coordinator_lines(addr, s));
        }
    }
    match rows.iter().filter(|(_, r)| r.is_err()).count() {
        0 => Ok(()),
        n => Err(CliError::failed(format!("{n} of {} nodes could not be read", rows.len()))),
    }
}

/// Follows every node's WatchStatus stream and redraws on each change.
async fn watch(args: &StatusArgs) -> Result<(), CliError> {
    let interval = Duration::from_millis(args.interval_ms.max(100));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Result<pb::NodeStatus, String>)>(64);
    for (i, addr) in args.addrs.iter().enumerate() {
        let (tx, addr, ca) = (tx.clone(), addr.clone(), args.ca.clone());
        tokio::spawn(async move {
            let stream = match connect(&addr, None, ca.path()).await {
                Ok(mut c) => c.watch(interval).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send((i, Err(e))).await;
                    return;
                }
            };
            while let Some(item) = stream.next().await {
                let item = item.map_err(|e| format!("{addr}: {}", e.message()));
                let ended = item.is_err();
                if tx.send((i, item)).await.is_err() || ended {
                    return;
                }
            }
            let _ = tx.send((i, Err(format!("{addr}: the node closed its status stream")))).await;
        });
    }
    drop(tx);
    let mut rows: Vec<Row> =
        args.addrs.iter().map(|a| (a.clone(), Err("waiting".to_string()))).collect();
    let tty = std::io::stdout().is_terminal() && !args.json;
    let mut drawn_lines = 0;
    while let Some((i, update)) = rx.recv().await {
        rows[i].1 = update.map(|s| (s, Vec::new()));
        if args.json {
            println!("{}", row_json(&rows[i].0, &rows[i].1));
            continue;
        }
        let text = table(&rows);
        if tty && drawn_lines > 0 {
            print!("\x1b[{drawn_lines}A\x1b[J");
        }
        print!("{text}");
        if !tty {
            println!();
        }
        drawn_lines = text.lines().count();
        let _ = std::io::stdout().flush();
    }
    Ok(())
}

type Row = (String, Result<(pb::NodeStatus, Vec<pb::Peer>), String>);

/// The table `murmur status` and `murmur cluster` print.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<22} {:<4} {:<14} {:<9} {:>9} {:>11} {:>8} {:>7} {:>5} {:>9} {:>9} {:>7} {:<}\n",
        "ADDR",
        "NODE",
        "PEER",
        "PHASE",
        "ROUND",
        "STEP",
        "LOSS",
        "ACC",
        "PEERS",
        "SENT",
        "RECEIVED",
        "REFUSED",
        "FAULTS"
    );
    for (addr, row) in rows {
        match row {
            Err(e) => out += &format!("{addr:<22} {e}\n"),
            Ok((s, peers)) => {
                out += &status_line(addr, s);
                if let Some(line) = outer_line(s) {
                    out += &line;
                }
                if let Some(line) = coordinator_link_line(s) {
                    out += &line;
                }
                for p in peers {
                    out += &peer_line(p);
                }
            }
        }
    }
    out
}

/// A coordinator: what it samples, whom it knows, how its last rounds went.
pub fn coordinator_lines(addr: &str, s: &cpb::CoordinatorStatus) -> String {
    let mut out = format!(
        "{addr:<22} coordinator {} of run {}: {} K={} every {} round(s), {}, {} members, {} sampling rounds ({} averaged), sent {} received {}\n",
        short_peer(&s.peer_id),
        s.run_id,
        s.target,
        s.sample_size,
        s.sample_every,
        s.aggregator,
        s.members.len(),
        s.rounds_sampled,
        s.rounds_aggregated,
        human_bytes(s.bytes_sent),
        human_bytes(s.bytes_received),
    );
    if let Some(round) = s.collecting_round {
        out += &format!(
            "{:<22} collecting round {round}: {} of {} answered\n",
            "",
            s.collecting_answered,
            s.collecting_sampled.len()
        );
    }
    if let Some(last) = s.samples.last() {
        out += &format!(
            "{:<22} last round {}: sampled {}, answered {}, average sent to {} in {:.2} s\n",
            "",
            last.round,
            last.sampled.len(),
            last.answered.len(),
            last.sent_to.len(),
            last.seconds
        );
    }
    out
}

fn coordinator_json(addr: &str, s: &cpb::CoordinatorStatus) -> Value {
    json!({
        "addr": addr, "role": "coordinator", "peer_id": s.peer_id, "run_id": s.run_id,
        "target": s.target, "sample_size": s.sample_size, "sample_every": s.sample_every,
        "aggregator": s.aggregator, "fingerprint": s.fingerprint, "elements": s.elements,
        "members": s.members.iter().map(|m| json!({"peer_id": m.peer_id, "round": m.round,
            "last_seen_seconds_ago": m.last_seen_seconds_ago})).collect::<Vec<_>>(),
        "collecting_round": s.collecting_round,
        "samples": s.samples.iter().map(|r| json!({"round": r.round, "sampled": r.sampled,
            "answered": r.answered, "sent_to": r.sent_to, "seconds": r.seconds})).collect::<Vec<_>>(),
        "rounds_sampled": s.rounds_sampled, "rounds_aggregated": s.rounds_aggregated,
        "bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
        "refusals": s.refusals, "send_failures": s.send_failures,
        "connected_peers": s.connected_peers, "uptime_seconds": s.uptime_seconds,
        "listen_addrs": s.listen_addrs, "version": s.version,
    })
}

/// The coordinator a semidec or fedavg node answers, under its line.
fn coordinator_link_line(s: &pb::NodeStatus) -> Option<String> {
    let c = s.coordinator.as_ref()?;
    Some(format!(
        "{:<22} coordinator {} {}: sampled {}, averages {}, corrections {}, timeouts {}{}\n",
        "",
        short_peer(&c.peer_id),
        c.state,
        c.sampled,
        c.averages,
        c.corrections,
        c.timeouts,
        if c.waiting { ", waiting for it" } else { "" },
    ))
}

/// DiLoCo's outer optimizer under its node's line.
fn outer_line(s: &pb::NodeStatus) -> Option<String> {
    let steps = s.outer_steps?;
    let per_step = s.bytes_per_outer_step.map_or("-".into(), |b| human_bytes(b as u64));
    Some(format!(
        "{:<22} outer steps {steps}, outer lr {}, {per_step} sent per outer step\n",
        "",
        s.outer_lr.map_or("-".into(), |l| l.to_string()),
    ))
}

fn status_line(addr: &str, s: &pb::NodeStatus) -> String {
    let t = s.traffic.unwrap_or_default();
    let refused: u64 = s.refusals.values().sum();
    let faults: Vec<&str> = s.active_faults.iter().map(|f| f.spec.as_str()).collect();
    format!(
        "{addr:<22} {:<4} {:<14} {:<9} {:>9} {:>11} {:>8} {:>7} {:>5} {:>9} {:>9} {:>7} {}\n",
        s.node_index,
        short_peer(&s.peer_id),
        phase_name(s.phase),
        format!("{}/{}", s.round, s.rounds),
        format!("{}/{}", s.step, s.steps_planned),
        s.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.eval_accuracy.map_or("-".into(), |a| format!("{:.2}%", a * 100.0)),
        format!("{}/{}", s.connected_peers, s.live_members.saturating_sub(1)),
        human_bytes(t.bytes_sent),
        human_bytes(t.bytes_received),
        refused,
        if faults.is_empty() { "-".to_string() } else { faults.join(" ") },
    )
}

fn peer_line(p: &pb::Peer) -> String {
    let t = p.traffic.unwrap_or_default();
    format!(
        "    peer {:<52} {:<9} round {:<6} sent {:>9} received {:>9}{}\n",
        p.peer_id,
        if p.connected { "connected" } else { "-" },
        p.round,
        human_bytes(t.bytes_sent),
        human_bytes(t.bytes_received),
        p.last_seen_seconds_ago.map_or(String::new(), |s| format!("  seen {s:.1}s ago")),
    )
}

fn short_peer(p: &str) -> String {
    match p.len() {
        n if n > 12 => format!("{}..{}", &p[..6], &p[n - 6..]),
        _ => p.to_string(),
    }
}

/// `training`, `mixing`... for a `Phase` number.
pub fn phase_name(phase: i32) -> String {
    let p = pb::Phase::try_from(phase).unwrap_or_default();
    p.as_str_name().trim_start_matches("PHASE_").to_lowercase()
}

fn row_json(addr: &str, row: &Result<(pb::NodeStatus, Vec<pb::Peer>), String>) -> Value {
    match row {
        Err(e) => json!({"addr": addr, "error": e}),
        Ok((s, peers)) => {
            let mut v = status_json(s);
            v["addr"] = json!(addr);
            if !peers.is_empty() {
                v["peers"] = peers.iter().map(peer_json).collect();
            }
            v
        }
    }
}

fn traffic_json(t: Option<pb::Traffic>) -> Value {
    let t = t.unwrap_or_default();
    json!({"bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
        "messages_sent": t.messages_sent, "messages_received": t.messages_received})
}

/// A status as JSON, field names as in the .proto.
pub fn status_json(s: &pb::NodeStatus) -> Value {
    json!({
        "peer_id": s.peer_id, "run_id": s.run_id, "strategy": s.strategy,
        "phase": phase_name(s.phase), "round": s.round, "rounds": s.rounds,
        "step": s.step, "steps_planned": s.steps_planned, "train_loss": s.train_loss,
        "eval_loss": s.eval_loss, "eval_accuracy": s.eval_accuracy, "eval_round": s.eval_round,
        "samples_seen": s.samples_seen, "traffic": traffic_json(s.traffic),
        "refusals": s.refusals, "strategy_drops": s.strategy_drops,
        "connected_peers": s.connected_peers, "live_members": s.live_members,
        "model_hash": s.model_hash, "consensus_distance": s.consensus_distance,
        "active_faults": s.active_faults.iter().map(|f| json!({"id": f.id, "spec": f.spec,
            "active": f.active, "remaining_seconds": f.remaining_seconds})).collect::<Vec<_>>(),
        "fault_effects": s.fault_effects, "uptime_seconds": s.uptime_seconds,
        "last_error": s.last_error, "node_index": s.node_index, "nodes": s.nodes,
        "listen_addrs": s.listen_addrs, "version": s.version, "send_failures": s.send_failures,
        "outer_steps": s.outer_steps, "outer_lr": s.outer_lr,
        "bytes_per_outer_step": s.bytes_per_outer_step,
        "coordinator": s.coordinator.as_ref().map(coordinator_link_json),
    })
}

fn coordinator_link_json(c: &pb::CoordinatorLink) -> Value {
    json!({"peer_id": c.peer_id, "state": c.state, "sampled": c.sampled, "noticed": c.noticed,
        "averages": c.averages, "corrections": c.corrections, "timeouts": c.timeouts,
        "last_round": c.last_round, "waiting": c.waiting})
}

fn peer_json(p: &pb::Peer) -> Value {
    json!({"peer_id": p.peer_id, "connected": p.connected, "member": p.member, "addrs": p.addrs,
        "round": p.round, "role": p.role, "traffic": traffic_json(p.traffic),
        "last_seen_seconds_ago": p.last_seen_seconds_ago})
}

pub fn fault(args: FaultArgs) -> Result<(), CliError> {
    let token = args.token.token()?;
    let ca = args.token.ca.clone();
    runtime()?.block_on(async move {
        match args.action {
            FaultAction::Inject { addr, spec } => {
                let spec: FaultSpec = spec.parse().map_err(CliError::usage)?;
                let mut c = connect(&addr, token, ca.path()).await?;
                let f = c.inject(&spec).await.map_err(CliError::failed)?;
                println!(
                    "fault {} on {addr}: {}{}",
                    f.id,
                    f.spec,
                    if f.active { "" } else { " (waiting for its round)" }
                );
            }
            FaultAction::Clear { addr, ids } => {
                let mut c = connect(&addr, token, ca.path()).await?;
                let n = c.clear(ids).await.map_err(CliError::failed)?;
                println!("{n} fault(s) cleared on {addr}");
            }
            FaultAction::List { addr } => {
                let mut c = connect(&addr, token, ca.path()).await?;
                let s = c.status().await.map_err(CliError::failed)?;
                for f in &s.active_faults {
                    let left =
                        f.remaining_seconds.map_or(String::new(), |r| format!(", {r:.1}s left"));
                    let state = if f.active { "active" } else { "waiting" };
                    println!("{:>4}  {}  ({state}{left})", f.id, f.spec);
                }
                if s.active_faults.is_empty() {
                    println!("no faults on {addr}");
                }
                for (effect, n) in &s.fault_effects {
                    println!("      {effect}: {n}");
                }
            }
        }
        Ok(())
    })
}

pub fn checkpoint(args: NodeCallArgs) -> Result<(), CliError> {
    let token = args.token.token()?;
    runtime()?.block_on(async move {
        let mut c = connect(&args.addr, token, args.token.ca.path()).await?;
        let r = c.checkpoint().await.map_err(CliError::failed)?;
        println!("checkpoint of step {} (round {}) written to {}", r.step, r.round, r.path);
        Ok(())
    })
}

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// API address of the node or coordinator (HOST:PORT)
    addr: String,
    #[command(flatten)]
    ca: CaArgs,
}

/// `murmur health ADDR`: exit 0 when the node or coordinator at ADDR
/// reports SERVING over gRPC health, 1 otherwise. For container health
/// checks, where no gRPC probe is installed.
pub fn health(args: HealthArgs) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        let mut c = connect(&args.addr, None, args.ca.path()).await?;
        match c.serving().await.map_err(CliError::failed)? {
            true => {
                println!("{} is serving", args.addr);
                Ok(())
            }
            false => Err(CliError::failed(format!("{} is not serving", args.addr))),
        }
    })
}

pub fn shutdown(args: NodeCallArgs) -> Result<(), CliError> {
    let token = args.token.token()?;
    runtime()?.block_on(async move {
        let mut c = connect(&args.addr, token, args.token.ca.path()).await?;
        match c.shutdown().await {
            Ok(()) => println!("{} is shutting down (checkpoint and summary first)", args.addr),
            Err(e) if e.unimplemented() => {
                c.coordinator_shutdown().await.map_err(CliError::failed)?;
                println!("coordinator {} is shutting down", args.addr);
            }
            Err(e) => return Err(CliError::failed(e)),
        }
        Ok(())
    })
}
