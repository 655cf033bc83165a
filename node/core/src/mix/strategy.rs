//! The one place that turns resolved strategy settings into a `Mixer`.
//! `murmur run` (through the daemon's config) and `murmur sim` both fill a
//! [`StrategySpec`] and call [`build`], so a strategy, its options and their
//! checks exist once.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::aggregate::{Aggregator, NormBound};
use super::comm::CommSchedule;
use super::coordinated::{Coordinated, CoordinatedConfig};
use super::diloco::{Diloco, DilocoConfig, DilocoError, OuterSync};
use super::gossip::{Gossip, GossipConfig};
use super::merge::{Exchange, Merge, MergeConfig, MergeError};
use super::mixer::{Mixer, Roster};
use super::overlap::Overlapped;
use super::topology::{Topology, TopologyError, TopologySpec};
use crate::net::encoding::Encoding;

/// Which mixing strategy a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum StrategyKind {
    #[default]
    Gossip,
    Merge,
    Diloco,
    /// Gossip every round plus the coordinator's averages (`--coordinator`).
    Semidec,
    /// No gossip: the coordinator's average every round (federated averaging).
    Fedavg,
}

impl StrategyKind {
    /// Whether it needs a coordinator.
    pub fn coordinated(self) -> bool {
        matches!(self, StrategyKind::Semidec | StrategyKind::Fedavg)
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyKind::Gossip => "gossip",
            StrategyKind::Merge => "merge",
            StrategyKind::Diloco => "diloco",
            StrategyKind::Semidec => "semidec",
            StrategyKind::Fedavg => "fedavg",
        })
    }
}

/// DiLoCo's outer optimizer and schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OuterSettings {
    pub lr: f64,
    pub momentum: f64,
    pub sync: OuterSync,
    pub fragments: usize,
    pub fragment_delay: u64,
}

impl Default for OuterSettings {
    /// DiLoCo's published defaults: outer lr 0.7, Nesterov momentum 0.9.
    fn default() -> Self {
        OuterSettings {
            lr: 0.7,
            momentum: 0.9,
            sync: OuterSync::Blocking,
            fragments: 1,
            fragment_delay: 0,
        }
    }
}

/// DiLoCo's outer options as given (flags, a config file), any absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct OuterOptions<'a> {
    pub lr: Option<f64>,
    pub momentum: Option<f64>,
    pub sync: Option<&'a str>,
    pub fragments: Option<i64>,
    pub fragment_delay: Option<i64>,
}

impl OuterOptions<'_> {
    /// The flag of the first option given, if any.
    fn first_given(&self) -> Option<&'static str> {
        [
            ("--outer-lr", self.lr.is_some()),
            ("--outer-momentum", self.momentum.is_some()),
            ("--outer-sync", self.sync.is_some()),
            ("--fragments", self.fragments.is_some()),
            ("--fragment-delay", self.fragment_delay.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }
}

impl OuterSettings {
    /// The settings of a `kind` run: DiLoCo's from `given`, each checked on
    /// its own (`DilocoConfig::check` checks them together); with another
    /// strategy, a DiLoCo option given is refused.
    pub fn for_strategy(
        kind: StrategyKind,
        given: OuterOptions,
    ) -> Result<OuterSettings, StrategyError> {
        if kind != StrategyKind::Diloco {
            return match given.first_given() {
                Some(flag) => Err(StrategyError::Option(format!(
                    "{flag} is a diloco option; pass --strategy diloco or drop it (strategy is {kind})"
                ))),
                None => Ok(OuterSettings::default()),
            };
        }
        let d = OuterSettings::default();
        let lr = given.lr.unwrap_or(d.lr);
        if !(lr.is_finite() && lr > 0.0) {
            return Err(DilocoError::OuterLr(lr).into());
        }
        let momentum = given.momentum.unwrap_or(d.momentum);
        if !(0.0..1.0).contains(&momentum) {
            return Err(DilocoError::OuterMomentum(momentum).into());
        }
        let sync = given.sync.map(str::parse).transpose()?.unwrap_or(d.sync);
        let fragments = match given.fragments {
            None => 1,
            Some(p) if p >= 1 => p as usize,
            Some(p) => {
                return Err(StrategyError::Option(format!("--fragments must be >= 1 (got {p})")));
            }
        };
        let fragment_delay = match given.fragment_delay {
            None => 0,
            Some(t) if t >= 0 => t as u64,
            Some(t) => {
                return Err(StrategyError::Option(format!(
                    "--fragment-delay must be >= 0 (got {t})"
                )));
            }
        };
        Ok(OuterSettings { lr, momentum, sync, fragments, fragment_delay })
    }
}

/// Why a strategy cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("--topology: {0}")]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    Diloco(#[from] DilocoError),
    #[error("{0}")]
    Option(String),
}

/// Everything a strategy needs, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategySpec {
    pub kind: StrategyKind,
    pub seed: u64,
    pub rounds: u64,
    pub local_steps: u64,
    /// Deadline of one exchange (each all-reduce phase).
    pub timeout: Duration,
    pub aggregator: Aggregator,
    /// The norm bound's factor; 0 = off.
    pub norm_bound: f64,
    /// How vectors travel.
    pub encoding: Encoding,
    pub topology: TopologySpec,
    pub gossip_steps: u64,
    /// None: gossip communicates every round, merge only by `exchange_prob`.
    pub comm: Option<CommSchedule>,
    pub exchange_prob: f64,
    pub outer: OuterSettings,
    /// Samples one local step processes (the batch size; 1 for pure
    /// averaging): with `local_steps` it bounds a peer's declared weight.
    pub samples_per_step: u64,
    /// Gossip's straggler grace, as a fraction of the training time; `None`
    /// waits the full deadline for everyone (see `patience`).
    pub straggler_grace: Option<f64>,
    /// Gossip: train the next local phase while the last one's exchange
    /// runs (see `overlap`).
    pub overlap: bool,
    /// The coordinator a semidec or fedavg member answers.
    pub coordinator: Option<CoordinatedConfig>,
}

impl StrategySpec {
    /// Defaults for `kind` (the daemon's and the simulator's defaults
    /// override what they name).
    pub fn new(kind: StrategyKind) -> StrategySpec {
        StrategySpec {
            kind,
            seed: 0,
            rounds: 1,
            local_steps: 10,
            timeout: Duration::from_secs(10),
            aggregator: Aggregator::Mean,
            norm_bound: 0.0,
            encoding: Encoding::F32,
            topology: TopologySpec::Ring,
            gossip_steps: 1,
            comm: None,
            exchange_prob: 0.0,
            outer: OuterSettings::default(),
            straggler_grace: Some(super::patience::DEFAULT_STRAGGLER_GRACE),
            overlap: false,
            samples_per_step: 1,
            coordinator: None,
        }
    }

    /// Checks what `build` would refuse, for a model of `len` values cut
    /// into `layers`, before anything starts.
    pub fn check(
        &self,
        nodes: usize,
        layers: &[Range<usize>],
        len: usize,
    ) -> Result<(), StrategyError> {
        self.check_coordinator()?;
        self.check_overlap()?;
        match self.kind {
            StrategyKind::Gossip | StrategyKind::Semidec => {
                Topology::new(&self.topology, nodes.max(1), self.seed)?;
            }
            StrategyKind::Merge | StrategyKind::Fedavg => {}
            StrategyKind::Diloco => self.diloco(0, layers).check(len)?,
        }
        if matches!(self.encoding, Encoding::TopK { .. }) && self.kind != StrategyKind::Diloco {
            return Err(StrategyError::Option(format!(
                "--encoding {} needs error feedback on a delta, which {} does not send; use f32, bf16, f16 or int8 (or --strategy diloco)",
                self.encoding, self.kind
            )));
        }
        Ok(())
    }

    /// A coordinator given exactly when the strategy needs one.
    pub fn check_coordinator(&self) -> Result<(), StrategyError> {
        match (self.kind.coordinated(), &self.coordinator) {
            (true, None) => Err(StrategyError::Option(format!(
                "--strategy {} needs --coordinator MULTIADDR, the address murmur-coordinator prints (or /dns4/HOST/tcp/PORT)",
                self.kind
            ))),
            (false, Some(_)) => Err(StrategyError::Option(format!(
                "--coordinator is for --strategy semidec or fedavg (strategy is {})",
                self.kind
            ))),
            _ => Ok(()),
        }
    }

    /// `--overlap` only with plain gossip: DiLoCo has its own overlapped
    /// outer step, and the others mix through a coordinator or once.
    pub fn check_overlap(&self) -> Result<(), StrategyError> {
        match (self.overlap, self.kind) {
            (true, StrategyKind::Diloco) => Err(StrategyError::Option(
                "--overlap is for --strategy gossip; diloco overlaps its outer step with --outer-sync eager".into(),
            )),
            (true, kind) if kind != StrategyKind::Gossip => Err(StrategyError::Option(format!(
                "--overlap is for --strategy gossip (strategy is {kind})"
            ))),
            _ => Ok(()),
        }
    }

    fn diloco(&self, start_round: u64, layers: &[Range<usize>]) -> DilocoConfig {
        DilocoConfig {
            rounds: self.rounds,
            local_steps: self.local_steps,
            outer_lr: self.outer.lr,
            outer_momentum: self.outer.momentum,
            sync: self.outer.sync,
            fragments: self.outer.fragments,
            fragment_delay: self.outer.fragment_delay,
            layers: layers.to_vec(),
            timeout: self.timeout,
            start_round,
            encoding: self.encoding,
            max_weight: (self.local_steps * self.samples_per_step.max(1)) as f64,
            aggregator: self.aggregator,
        }
    }
}

/// The strategy of member `me` among `members`, starting at `start_round`,
/// for a model of `len` values whose layers are `layers`.
pub fn build(
    spec: &StrategySpec,
    me: PeerId,
    members: Vec<PeerId>,
    start_round: u64,
    layers: &[Range<usize>],
    len: usize,
) -> Result<Box<dyn Mixer>, StrategyError> {
    build_in(spec, &Swarm::new(spec, me, members)?, &me, start_round, layers, len)
}

/// What the strategies of a swarm's members can share, built once: the
/// sorted member list and the gossip topology over it. The simulator builds
/// one for all its nodes, so that a node costs its own state (O(degree)),
/// not a copy of the swarm's.
#[derive(Debug, Clone)]
pub struct Swarm {
    roster: Roster,
    /// `None` for strategies that do not gossip.
    topology: Option<Topology>,
}

impl Swarm {
    /// The swarm of `members` (and `me`, added if missing).
    pub fn new(
        spec: &StrategySpec,
        me: PeerId,
        members: Vec<PeerId>,
    ) -> Result<Swarm, StrategyError> {
        let roster = Roster::new(me, members);
        let topology = match spec.kind {
            StrategyKind::Gossip | StrategyKind::Semidec | StrategyKind::Fedavg => {
                Some(Topology::new(&spec.topology, roster.len(), spec.seed)?)
            }
            StrategyKind::Merge | StrategyKind::Diloco => None,
        };
        Ok(Swarm { roster, topology })
    }
}

/// The strategy of member `me` of `swarm` (built from the same `spec`); see
/// [`build`].
pub fn build_in(
    spec: &StrategySpec,
    swarm: &Swarm,
    me: &PeerId,
    start_round: u64,
    layers: &[Range<usize>],
    len: usize,
) -> Result<Box<dyn Mixer>, StrategyError> {
    let roster = swarm
        .roster
        .of(me)
        .ok_or_else(|| StrategyError::Option(format!("{me} is not a member of the swarm")))?;
    Ok(match spec.kind {
        StrategyKind::Gossip | StrategyKind::Semidec | StrategyKind::Fedavg => {
            let cfg = GossipConfig {
                topology: spec.topology.clone(),
                seed: spec.seed,
                rounds: spec.rounds,
                local_steps: spec.local_steps,
                // Federated averaging mixes only through the coordinator.
                gossip_steps: if spec.kind == StrategyKind::Fedavg { 0 } else { spec.gossip_steps },
                comm: spec.comm.unwrap_or(CommSchedule::Every(1)),
                timeout: spec.timeout,
                start_round,
                aggregator: spec.aggregator,
                norm_bound: spec.norm_bound,
                encoding: spec.encoding,
                straggler_grace: spec.straggler_grace,
            };
            let topology = swarm.topology.clone().ok_or_else(|| {
                StrategyError::Option(format!(
                    "the swarm was built for another strategy than {}",
                    spec.kind
                ))
            })?;
            let gossip = Gossip::in_swarm(cfg, roster, topology);
            match &spec.coordinator {
                Some(c) if spec.kind.coordinated() => {
                    Box::new(Coordinated::new(Box::new(gossip), c.clone()))
                }
                _ if spec.overlap => Box::new(Overlapped::new(gossip, spec.rounds)),
                _ => Box::new(gossip),
            }
        }
        StrategyKind::Merge => {
            let exchange = match (spec.exchange_prob, spec.comm) {
                (p, _) if p > 0.0 => Exchange::Random(p),
                (_, Some(schedule)) => Exchange::Schedule(schedule),
                _ => Exchange::None,
            };
            let cfg = MergeConfig {
                seed: spec.seed,
                rounds: spec.rounds,
                local_steps: spec.local_steps,
                exchange,
                exchange_timeout: spec.timeout,
                final_timeout: spec.timeout,
                start_round,
                aggregator: spec.aggregator,
                norm_bound: NormBound::new(spec.norm_bound).unwrap_or_default(),
                encoding: spec.encoding,
            };
            Box::new(Merge::in_swarm(cfg, roster)?)
        }
        StrategyKind::Diloco => {
            let members = roster.members.to_vec();
            Box::new(Diloco::new(spec.diloco(start_round, layers), *me, members, len)?)
        }
    })
}
