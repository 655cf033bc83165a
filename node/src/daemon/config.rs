//! Options of `murmur run` beyond training: the strategy, the network and
//! the node's directory. Like `TrainOptions`, every field is optional so a
//! TOML file, `MURMUR_*` variables and flags can be layered; `resolve`
//! validates once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use crate::api::ApiToken;
use crate::fault::FaultSpec;
use crate::mix::aggregate::{Aggregator, NormBound};
use crate::mix::comm::CommSchedule;
use crate::mix::coordinated::CoordinatedConfig;
pub use crate::mix::strategy::StrategyKind;
use crate::mix::strategy::{OuterOptions, OuterSettings, StrategySpec};
use crate::mix::topology::TopologySpec;
use crate::net::encoding::Encoding;
use crate::net::membership::MemberLimits;
use crate::net::security::Security;
use crate::net::swarm::{parse_allowlist, read_swarm_key};
use crate::train::config::{ConfigError, TrainConfig, bad, positive};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProgressFormat {
    Text,
    Json,
}

/// `--coordinator` given without a value: `murmur cluster` starts one.
pub const START_COORDINATOR: &str = "start";

/// Strategy and network options as given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunOptions {
    /// Mixing strategy: gossip, merge, diloco, semidec (gossip plus a coordinator's averages) or fedavg (the coordinator's average every round, no gossip) [default: gossip]
    #[arg(long, env = "MURMUR_STRATEGY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<StrategyKind>,
    /// Name shared by the nodes of one run; other runs are ignored [default: murmur]
    #[arg(long, env = "MURMUR_RUN_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Local steps between two mixing rounds (H) [default: 10]
    #[arg(long, env = "MURMUR_LOCAL_STEPS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_steps: Option<i64>,
    /// Mixing rounds; --steps is then rounds x local steps [default: steps / local steps]
    #[arg(long, env = "MURMUR_ROUNDS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds: Option<i64>,
    /// Gossip topology: ring, torus, exponential, regular:D, erdos-renyi:P, barabasi-albert:M, complete, file:PATH, one-peer-exp, regular-per-round:D, rings:C (C disjoint rings, for semidec) [default: ring]
    #[arg(long, env = "MURMUR_TOPOLOGY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// Gossip steps per communicating round (Q) [default: 1]
    #[arg(long, env = "MURMUR_GOSSIP_STEPS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_steps: Option<i64>,
    /// How gossip combines its own and its neighbours' vectors: mean, median, trimmed-mean:BETA (BETA in [0, 0.5)), krum:F [default: mean]
    #[arg(long, env = "MURMUR_AGGREGATOR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregator: Option<String>,
    /// Refuse a neighbour's vector farther from this node's than FACTOR x this node's own update since its last mix; 0 = off [default: 0]
    #[arg(long, env = "MURMUR_NORM_BOUND", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
    /// When to communicate: every:K rounds, or late:B (a budget of B rounds concentrated late) [default: every:1]
    #[arg(long, env = "MURMUR_COMM")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// merge: expected pairwise exchanges per node per round, 0 = none [default: 0]
    #[arg(long, env = "MURMUR_EXCHANGE_PROB", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange_prob: Option<f64>,
    /// Deadline of one exchange, in milliseconds [default: 10000]
    #[arg(long, env = "MURMUR_ROUND_TIMEOUT_MS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round_timeout_ms: Option<i64>,
    /// Gossip: wait for a neighbour this fraction of the local phase (at least 5 ms) after the last answer, and beyond that only as long as it earned by answering in time (this fraction of each round, up to the deadline); off = always the full deadline [default: 0.2]
    #[arg(long, env = "MURMUR_STRAGGLER_GRACE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub straggler_grace: Option<String>,
    /// Gossip: train the next local phase while the last one's exchange runs, and add the mix's change when that phase ends (CoCoD-SGD): the trainer does not wait for its neighbours [default: false]
    #[arg(long, env = "MURMUR_OVERLAP", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<bool>,
    /// How long to wait at start for --nodes members, in milliseconds [default: 60000]
    #[arg(long, env = "MURMUR_JOIN_TIMEOUT_MS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_timeout_ms: Option<i64>,
    /// The most members this node counts; heartbeats of more are refused [default: max(256, 2 x --nodes)]
    #[arg(long, env = "MURMUR_MAX_MEMBERS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_members: Option<i64>,
    /// Exit non-zero when fewer members (this node included) have joined by the join timeout [default: 1]
    #[arg(long, env = "MURMUR_MIN_MEMBERS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_members: Option<i64>,
    /// Start training once this many members (this node included) have joined, not all --nodes; the others may join later (--join-running) [default: --nodes]
    #[arg(long, env = "MURMUR_START_MEMBERS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_members: Option<i64>,
    /// Join a run already under way: enter at the run's round with a member's state (as a resumed node does, with nothing saved), not at round 0 [default: false]
    #[arg(long, env = "MURMUR_JOIN_RUNNING", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join_running: Option<bool>,
    /// How parameters travel: f32, bf16, f16, int8[:BLOCK]; diloco's deltas also topk:K (the K largest, with error feedback) [default: f32]
    #[arg(long, env = "MURMUR_ENCODING")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    /// diloco: the outer learning rate [default: 0.7]
    #[arg(long, env = "MURMUR_OUTER_LR", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// diloco: the outer Nesterov momentum, in [0, 1) [default: 0.9]
    #[arg(long, env = "MURMUR_OUTER_MOMENTUM", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// diloco: when a round's average is applied: blocking (wait for it), eager (overlap it, own fresh delta as proxy) or delayed (apply it a round late) [default: blocking]
    #[arg(long, env = "MURMUR_OUTER_SYNC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_sync: Option<String>,
    /// diloco: streaming fragments P, synchronised in turn every local-steps / P steps [default: 1]
    #[arg(long, env = "MURMUR_FRAGMENTS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragments: Option<i64>,
    /// diloco: local steps that overlap a fragment's exchange (streaming) [default: 0]
    #[arg(long, env = "MURMUR_FRAGMENT_DELAY", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragment_delay: Option<i64>,
    /// Multiaddr to listen on, repeatable [default: /ip4/0.0.0.0/tcp/0]
    #[arg(long, env = "MURMUR_LISTEN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<Vec<String>>,
    /// Multiaddr of a node to join through: /ip4/10.0.0.5/tcp/4001/p2p/PEER_ID, or by name and without the id (/dns4/node-0/tcp/4001: whichever peer answers there, --allow-peer still applies); repeatable
    #[arg(long, env = "MURMUR_BOOTSTRAP", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<Vec<String>>,
    /// semidec, fedavg: the coordinator's multiaddr, ending in /p2p/PEER_ID as murmur-coordinator prints it, or without the id (/dns4/coordinator/tcp/4001: the peer answering there at launch, waited for up to --join-timeout-ms); it is dialled like a bootstrap node and only its requests and averages are heard. `murmur cluster --coordinator` alone starts one
    #[arg(long, env = "MURMUR_COORDINATOR", num_args = 0..=1, default_missing_value = START_COORDINATOR)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// semidec, fedavg: how long a member waits at a round's end for the average the coordinator asked its parameters for, in milliseconds; then it goes on alone [default: --round-timeout-ms]
    #[arg(long, env = "MURMUR_COORDINATOR_WAIT_MS", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator_wait_ms: Option<i64>,
    /// Find peers on the LAN with mDNS [default: false]
    #[arg(long, env = "MURMUR_MDNS", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mdns: Option<bool>,
    /// Security handshakes for TCP connections, preferred first: tls, noise, or both [default: tls,noise]
    #[arg(long, env = "MURMUR_SECURITY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security: Option<String>,
    /// Also listen on QUIC (disabled with a swarm key) [default: false]
    #[arg(long, env = "MURMUR_QUIC", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<bool>,
    /// Pre-shared key file of a private swarm (see `murmur swarm-key`)
    #[arg(long, env = "MURMUR_SWARM_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swarm_key: Option<PathBuf>,
    /// Only these peer ids may connect; repeatable
    #[arg(long, env = "MURMUR_ALLOW_PEER", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_peer: Option<Vec<String>>,
    /// Progress lines on stdout: text or json [default: text]
    #[arg(long, env = "MURMUR_PROGRESS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressFormat>,
    /// Serve the gRPC node API on HOST:PORT, or `off` [default: 127.0.0.1:0, a free port, printed at start]
    #[arg(long, env = "MURMUR_API")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// File whose first line is the token control calls must present (see also --api-token)
    #[arg(long, env = "MURMUR_API_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token_file: Option<PathBuf>,
    /// Serve the API over TLS with this certificate chain (PEM; with --api-tls-key; see `murmur api-cert`)
    #[arg(long, env = "MURMUR_API_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_tls_cert: Option<PathBuf>,
    /// The private key of --api-tls-cert (PEM)
    #[arg(long, env = "MURMUR_API_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics [default: off]
    #[arg(long, env = "MURMUR_METRICS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Allow the API beyond 127.0.0.1 without a token (anyone who reaches it can inject faults and stop the node) [default: false]
    #[arg(long, env = "MURMUR_API_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_insecure: Option<bool>,
    /// Inject a fault, repeatable: crash[:R], pause[:D], drop:P[:in|out], delay:D[~J], bandwidth:RATE, partition:PEER[+PEER...], noise:S, sign-flip, scale:C, nan, label-flip; then ,for=D and/or ,from=ROUND (e.g. drop:0.3,for=30s)
    #[arg(long = "fault", env = "MURMUR_FAULT", value_delimiter = ';')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Vec<String>>,
}

/// Validated strategy and network settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The strategy and its options (one spec for `murmur run` and `murmur sim`).
    pub strategy: StrategySpec,
    pub run_id: String,
    pub join_timeout: Duration,
    /// Members (this node included) below which the node gives up after
    /// the join timeout instead of training with too few.
    pub min_members: usize,
    /// Members (this node included) the node waits for at start.
    pub start_members: usize,
    /// The node joins a run under way (`--join-running`): it enters at the
    /// run's round with a member's state, as a resumed node does.
    pub join_running: bool,
    /// The most members the node counts (others' heartbeats are refused).
    pub max_members: usize,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// `--coordinator` given without `/p2p/<peer id>`: the node takes the
    /// peer that answers at this address for its coordinator, at launch.
    pub coordinator_at: Option<Multiaddr>,
    pub mdns: bool,
    pub security: Vec<Security>,
    pub quic: bool,
    pub swarm_key: Option<PreSharedKey>,
    pub allowlist: Option<Vec<PeerId>>,
    pub progress: ProgressFormat,
    /// Where the gRPC API listens; `None`: off.
    pub api: Option<SocketAddr>,
    /// The token control calls need; `None`: they need none.
    pub api_token: Option<ApiToken>,
    /// The API's certificate and key; `None`: plain HTTP/2.
    pub api_tls: Option<crate::api::ApiTls>,
    /// Where `/metrics` is served; `None`: off.
    pub metrics: Option<SocketAddr>,
    /// The API may listen beyond loopback without a token.
    pub api_insecure: bool,
    /// Faults to inject at start.
    pub faults: Vec<FaultSpec>,
}

/// `HOST:PORT` for a server to listen on (`localhost` is 127.0.0.1).
fn listen_addr(flag: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    crate::api::server::parse_listen(flag, text).map_err(bad)
}

fn millis(flag: &str, v: i64) -> Result<Duration, ConfigError> {
    positive(flag, v).map(Duration::from_millis)
}

fn addrs(flag: &str, list: &Option<Vec<String>>) -> Result<Vec<Multiaddr>, ConfigError> {
    list.iter()
        .flatten()
        .map(|a| a.parse().map_err(|e| bad(format!("{flag} {a:?} is not a multiaddr ({e})"))))
        .collect()
}

impl RunOptions {
    /// `self` with every option that `over` sets replaced by `over`'s value.
    pub fn overridden_by(&self, over: &RunOptions) -> RunOptions {
        crate::train::config::overlay(self, over)
    }

    /// These options less everything a checkpoint must not carry: faults,
    /// security (handshakes, swarm key, allowlist, transports, discovery),
    /// listen addresses and the API and metrics endpoints.
    pub fn without_trust(&self) -> RunOptions {
        RunOptions {
            fault: None,
            listen: None,
            mdns: None,
            security: None,
            quic: None,
            swarm_key: None,
            allow_peer: None,
            api: None,
            api_token_file: None,
            api_tls_cert: None,
            api_tls_key: None,
            metrics: None,
            api_insecure: None,
            ..self.clone()
        }
    }

    /// Validates against the resolved training config (which fixes `--steps`).
    pub fn resolve(&self, train: &TrainConfig) -> Result<RunConfig, ConfigError> {
        let local_steps = positive("--local-steps", self.local_steps.unwrap_or(10))?;
        let rounds = match self.rounds {
            Some(r) => positive("--rounds", r)?,
            None => (train.steps / local_steps).max(1),
        };
        let run_id = self.run_id.clone().unwrap_or_else(|| "murmur".into());
        crate::net::swarm::check_run_id(&run_id).map_err(|e| bad(format!("--run-id: {e}")))?;
        let topology: TopologySpec = self
            .topology
            .as_deref()
            .unwrap_or("ring")
            .parse()
            .map_err(|e| bad(format!("--topology: {e}")))?;
        let (aggregator, norm_bound) = self.aggregation()?;
        let comm: Option<CommSchedule> =
            self.comm.as_deref().map(str::parse).transpose().map_err(|e| bad(format!("{e}")))?;
        let exchange_prob = self.exchange_prob.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&exchange_prob) {
            return Err(bad(format!("--exchange-prob must be in [0, 1] (got {exchange_prob})")));
        }
        let encoding: Encoding = self
            .encoding
            .as_deref()
            .unwrap_or("f32")
            .parse()
            .map_err(|e| bad(format!("--encoding: {e}")))?;
        let kind = self.strategy.unwrap_or_default();
        relays_fit(train, kind).map_err(bad)?;
        let outer = self.outer(kind)?;
        let swarm_key = self.swarm_key.as_deref().map(read_swarm_key).transpose().map_err(bad)?;
        let allowlist = self.allow_peer.as_deref().map(parse_allowlist).transpose().map_err(bad)?;
        let timeout = millis("--round-timeout-ms", self.round_timeout_ms.unwrap_or(10_000))?;
        let coordinator = self.coordinator(timeout)?;
        let mut bootstrap = addrs("--bootstrap", &self.bootstrap)?;
        let mut coordinator_at = None;
        if let Some((addr, _)) = &coordinator {
            bootstrap.push(addr.clone());
            if !matches!(addr.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                coordinator_at = Some(addr.clone());
            }
        }
        let mut listen = addrs("--listen", &self.listen)?;
        if listen.is_empty() {
            listen.push("/ip4/0.0.0.0/tcp/0".parse().map_err(|_| bad("default listen address"))?);
        }
        let strategy = StrategySpec {
            kind,
            seed: train.seed,
            rounds,
            local_steps,
            timeout,
            aggregator,
            norm_bound,
            encoding,
            topology,
            gossip_steps: positive("--gossip-steps", self.gossip_steps.unwrap_or(1))?,
            comm,
            exchange_prob,
            outer,
            samples_per_step: train.batch_size as u64,
            straggler_grace: match self.straggler_grace.as_deref() {
                None => Some(crate::mix::patience::DEFAULT_STRAGGLER_GRACE),
                Some(g) => crate::mix::patience::parse_grace(g).map_err(bad)?,
            },
            overlap: self.overlap.unwrap_or(false),
            coordinator: coordinator.map(|(_, c)| c),
        };
        strategy.check_coordinator().map_err(|e| bad(e.to_string()))?;
        strategy.check_overlap().map_err(|e| bad(e.to_string()))?;
        let min_members = positive("--min-members", self.min_members.unwrap_or(1))? as usize;
        let start_members = positive(
            "--start-members",
            self.start_members.unwrap_or(i64::try_from(train.nodes).unwrap_or(i64::MAX)),
        )? as usize;
        if start_members > train.nodes {
            return Err(bad(format!(
                "--start-members {start_members} is more than --nodes {}",
                train.nodes
            )));
        }
        if min_members > train.nodes {
            return Err(bad(format!(
                "--min-members {min_members} is more than --nodes {}: the run could never start",
                train.nodes
            )));
        }
        let max_members = match self.max_members {
            Some(m) => positive("--max-members", m)? as usize,
            None => (2 * train.nodes).max(MemberLimits::default().max_members),
        };
        if max_members + 1 < train.nodes {
            return Err(bad(format!(
                "--max-members {max_members} leaves no room for --nodes {} (this node and {} others)",
                train.nodes,
                train.nodes - 1
            )));
        }
        // What needs the model's layers is checked once it is built.
        if matches!(encoding, Encoding::TopK { .. }) {
            strategy.check(1, &[], 0).map_err(|e| bad(e.to_string()))?;
        }
        Ok(RunConfig {
            strategy,
            run_id,
            join_timeout: millis("--join-timeout-ms", self.join_timeout_ms.unwrap_or(60_000))?,
            min_members,
            start_members,
            join_running: self.join_running.unwrap_or(false),
            max_members,
            listen,
            bootstrap,
            coordinator_at,
            mdns: self.mdns.unwrap_or(false),
            security: match &self.security {
                None => Security::DEFAULT.to_vec(),
                Some(s) => Security::parse_list(s).map_err(|e| bad(format!("--security: {e}")))?,
            },
            quic: self.quic.unwrap_or(false),
            swarm_key,
            allowlist,
            progress: self.progress.unwrap_or(ProgressFormat::Text),
            api: match self.api.as_deref().map(str::trim) {
                Some("off") => None,
                Some(a) => Some(listen_addr("--api", a)?),
                None => Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            },
            api_token: self
                .api_token_file
                .as_deref()
                .map(ApiToken::from_file)
                .transpose()
                .map_err(|e| bad(format!("--api-token-file: {e}")))?,
            api_tls: match (&self.api_tls_cert, &self.api_tls_key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(crate::api::ApiTls::load(cert, key).map_err(bad)?),
                (Some(_), None) => return Err(bad("--api-tls-cert needs --api-tls-key")),
                (None, Some(_)) => return Err(bad("--api-tls-key needs --api-tls-cert")),
            },
            metrics: self.metrics.as_deref().map(|m| listen_addr("--metrics", m)).transpose()?,
            api_insecure: self.api_insecure.unwrap_or(false),
            faults: self
                .fault
                .iter()
                .flatten()
                .map(|f| f.parse::<FaultSpec>().map_err(|e| bad(format!("--fault: {e}"))))
                .collect::<Result<_, _>>()?,
        })
    }

    /// `--coordinator` and `--coordinator-wait-ms`: its address and what
    /// a member needs of it (the weight it declares is set at launch).
    fn coordinator(
        &self,
        timeout: Duration,
    ) -> Result<Option<(Multiaddr, CoordinatedConfig)>, ConfigError> {
        let wait = match self.coordinator_wait_ms {
            Some(ms) => millis("--coordinator-wait-ms", ms)?,
            None => timeout,
        };
        if self.coordinator.as_deref() == Some(START_COORDINATOR) {
            return Err(bad(
                "--coordinator needs the coordinator's multiaddr, such as /ip4/10.0.0.9/tcp/4001/p2p/PEER_ID or /dns4/coordinator/tcp/4001 (`murmur cluster --coordinator` alone starts one)",
            ));
        }
        let Some(text) = self.coordinator.as_deref() else {
            if self.coordinator_wait_ms.is_some() {
                return Err(bad("--coordinator-wait-ms needs --coordinator"));
            }
            return Ok(None);
        };
        let addr: Multiaddr = text
            .trim()
            .parse()
            .map_err(|e| bad(format!("--coordinator {text:?} is not a multiaddr ({e})")))?;
        // Without a peer id, the peer found at the address at launch (the
        // random id is replaced then, before anything reads it).
        let peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => peer,
            _ => PeerId::random(),
        };
        Ok(Some((addr, CoordinatedConfig { coordinator: peer, wait, weight: 1.0 })))
    }

    /// DiLoCo's outer settings; refused with another strategy.
    fn outer(&self, kind: StrategyKind) -> Result<OuterSettings, ConfigError> {
        let given = OuterOptions {
            lr: self.outer_lr,
            momentum: self.outer_momentum,
            sync: self.outer_sync.as_deref(),
            fragments: self.fragments,
            fragment_delay: self.fragment_delay,
        };
        OuterSettings::for_strategy(kind, given).map_err(|e| bad(e.to_string()))
    }

    /// `--aggregator` and `--norm-bound` (gossip's mix, merge's exchanges
    /// and final all-reduce, DiLoCo's all-reduce owners).
    fn aggregation(&self) -> Result<(Aggregator, f64), ConfigError> {
        let aggregator: Aggregator = self
            .aggregator
            .as_deref()
            .unwrap_or("mean")
            .parse()
            .map_err(|e| bad(format!("--aggregator: {e}")))?;
        let norm_bound = NormBound::new(self.norm_bound.unwrap_or(0.0))
            .map_err(|e| bad(format!("--norm-bound: {e}")))?
            .factor();
        Ok((aggregator, norm_bound))
    }
}

/// Whether `train`'s relays (if any) can take part in strategy `kind`.
/// Gossip only: every other strategy averages what each member trained as
/// if it had trained, and a relay's untouched model (merge, the
/// coordinator's mean) or its zero pseudo-gradient (diloco) would pull the
/// result back.
pub fn relays_fit(train: &TrainConfig, kind: StrategyKind) -> Result<(), String> {
    if train.relays.is_empty() || kind == StrategyKind::Gossip {
        return Ok(());
    }
    Err(format!(
        "--relays take part in gossip only (the strategy is {kind}): a relay's untrained model would be averaged in as if it had trained"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::diloco::OuterSync;
    use crate::train::config::TrainOptions;

    fn train() -> TrainConfig {
        TrainOptions { steps: Some(100), ..Default::default() }.resolve().unwrap()
    }

    #[test]
    fn rounds_follow_steps_and_local_steps() {
        let r =
            RunOptions { local_steps: Some(20), ..Default::default() }.resolve(&train()).unwrap();
        assert_eq!((r.strategy.rounds, r.strategy.local_steps), (5, 20));
        assert_eq!(r.strategy.topology, TopologySpec::Ring);
        assert_eq!(r.security, Security::DEFAULT);
        assert_eq!((r.strategy.aggregator, r.strategy.norm_bound), (Aggregator::Mean, 0.0));
        assert_eq!(r.strategy.outer, OuterSettings::default());
    }

    #[test]
    fn api_metrics_and_faults_resolve() {
        let r = RunOptions::default().resolve(&train()).unwrap();
        assert_eq!(r.api, Some(SocketAddr::from(([127, 0, 0, 1], 0))), "on, loopback, by default");
        assert_eq!((r.metrics, r.faults.len()), (None, 0));
        let o = RunOptions {
            api: Some("off".into()),
            metrics: Some("localhost:9100".into()),
            fault: Some(vec!["drop:0.3,for=30s".into(), "sign-flip".into()]),
            ..Default::default()
        };
        let r = o.resolve(&train()).unwrap();
        assert_eq!(r.api, None);
        assert_eq!(r.metrics, Some(SocketAddr::from(([127, 0, 0, 1], 9100))));
        let shown: Vec<String> = r.faults.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["drop:0.3,for=30s", "sign-flip"]);
    }

    #[test]
    fn aggregation_options_parse() {
        let o = RunOptions {
            aggregator: Some("trimmed-mean:0.2".into()),
            norm_bound: Some(3.0),
            ..Default::default()
        };
        let r = o.resolve(&train()).unwrap();
        assert_eq!(
            (r.strategy.aggregator, r.strategy.norm_bound),
            (Aggregator::TrimmedMean { beta: 0.2 }, 3.0)
        );
    }

    #[test]
    fn diloco_options_resolve_and_belong_to_diloco() {
        let o = RunOptions {
            strategy: Some(StrategyKind::Diloco),
            outer_lr: Some(1.0),
            outer_momentum: Some(0.0),
            outer_sync: Some("eager".into()),
            encoding: Some("topk:100".into()),
            ..Default::default()
        };
        let r = o.resolve(&train()).unwrap();
        let outer = r.strategy.outer;
        assert_eq!((outer.lr, outer.momentum, outer.sync), (1.0, 0.0, OuterSync::Eager));
        assert_eq!(r.strategy.encoding, Encoding::TopK { k: 100 });
        assert_eq!(r.strategy.samples_per_step, 64, "the batch size bounds a peer's weight");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (RunOptions { topology: Some("star".into()), ..Default::default() }, "star"),
            (RunOptions { run_id: Some("a b".into()), ..Default::default() }, "a b"),
            (
                RunOptions { bootstrap: Some(vec!["nowhere".into()]), ..Default::default() },
                "nowhere",
            ),
            (RunOptions { allow_peer: Some(vec!["bob".into()]), ..Default::default() }, "bob"),
            (RunOptions { straggler_grace: Some("-0.1".into()), ..Default::default() }, "-0.1"),
            (RunOptions { security: Some("tls,ssl".into()), ..Default::default() }, "\"ssl\""),
            (RunOptions { exchange_prob: Some(1.5), ..Default::default() }, "1.5"),
            (RunOptions { start_members: Some(0), ..Default::default() }, "--start-members"),
            (RunOptions { start_members: Some(99), ..Default::default() }, "--start-members 99"),
            (
                RunOptions { encoding: Some("topk:10".into()), ..Default::default() },
                "--encoding topk:10 needs error feedback on a delta, which gossip does not send",
            ),
            (
                RunOptions { outer_lr: Some(0.5), ..Default::default() },
                "--outer-lr is a diloco option; pass --strategy diloco",
            ),
            (
                RunOptions {
                    strategy: Some(StrategyKind::Diloco),
                    outer_momentum: Some(1.0),
                    ..Default::default()
                },
                "--outer-momentum must be in [0, 1) (got 1)",
            ),
            (
                RunOptions {
                    strategy: Some(StrategyKind::Diloco),
                    outer_sync: Some("lazy".into()),
                    ..Default::default()
                },
                "--outer-sync \"lazy\" is not one of blocking, eager, delayed",
            ),
            (
                RunOptions {
                    strategy: Some(StrategyKind::Diloco),
                    fragments: Some(0),
                    ..Default::default()
                },
                "--fragments must be >= 1 (got 0)",
            ),
            (
                RunOptions {
                    strategy: Some(StrategyKind::Diloco),
                    overlap: Some(true),
                    ..Default::default()
                },
                "--overlap is for --strategy gossip; diloco overlaps its outer step with --outer-sync eager",
            ),
            (
                RunOptions {
                    strategy: Some(StrategyKind::Merge),
                    overlap: Some(true),
                    ..Default::default()
                },
                "--overlap is for --strategy gossip (strategy is merge)",
            ),
            (
                RunOptions { local_steps: Some(0), ..Default::default() },
                "--local-steps must be >= 1 (got 0)",
            ),
            (RunOptions { comm: Some("late:0".into()), ..Default::default() }, "late:0"),
            (
                RunOptions { aggregator: Some("trimmed-mean:0.5".into()), ..Default::default() },
                "--aggregator: aggregator \"trimmed-mean:0.5\"",
            ),
            (RunOptions { aggregator: Some("krum:-1".into()), ..Default::default() }, "krum:-1"),
            (
                RunOptions { norm_bound: Some(-2.0), ..Default::default() },
                "--norm-bound: the norm bound must be a finite number >= 0, 0 to disable (got -2)",
            ),
            (
                RunOptions { swarm_key: Some("/nonexistent/key".into()), ..Default::default() },
                "/nonexistent/key",
            ),
            (RunOptions { api: Some("7070".into()), ..Default::default() }, "--api \"7070\""),
            (
                RunOptions { metrics: Some("example.org:9090".into()), ..Default::default() },
                "--metrics \"example.org:9090\"",
            ),
            (
                RunOptions { fault: Some(vec!["drop:2".into()]), ..Default::default() },
                "--fault: fault \"drop:2\": the drop fraction must be in (0, 1] (got 2)",
            ),
            (
                RunOptions {
                    api_token_file: Some("/nonexistent/token".into()),
                    ..Default::default()
                },
                "cannot read the API token file /nonexistent/token",
            ),
        ];
        for (opts, needle) in cases {
            let err = opts.resolve(&train()).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }
}
