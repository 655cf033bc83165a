//! The coordinator's event loop: the run's swarm on one side, the sampling
//! state machine on the other. It joins the run as a peer with role
//! coordinator (the nodes' identity, admission and wire rules apply to it
//! as to any member), learns the model from the members' heartbeats, feeds
//! the sampler what it hears, carries out what `tick` says, and publishes
//! a status the API and `/metrics` read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use murmur_core::fault::Faults;
use murmur_core::mix::mixer::MsgKind;
use murmur_core::net::encoding::Encoding;
use murmur_core::net::identity;
use murmur_core::net::membership::{Member, MemberLimits, Role};
use murmur_core::net::outbox::{Outbox, to_message};
use murmur_core::net::service::{NetConfig, NetEvent, Network};
use murmur_core::net::wire::Expectation;
use murmur_proto::coordinator::v1 as cpb;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{CoordinatorConfig, ProgressFormat};
use crate::sampling::{Action, Outcome, Sampler};

/// How often the loop looks at the membership and the clock when nothing
/// else wakes it.
const TICK: Duration = Duration::from_millis(200);
/// How long a request or an average is retried.
const SEND_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Net(#[from] murmur_core::net::service::NetError),
    #[error(transparent)]
    Api(#[from] murmur_core::api::server::ApiError),
    #[error("the network stopped")]
    NetworkGone,
    #[error("cannot watch for SIGTERM: {0}")]
    Signal(std::io::Error),
}

/// The model the members train, by the majority of their heartbeats
/// (fingerprint, values); ties go to the smaller fingerprint.
pub fn learn_model<'a>(members: impl Iterator<Item = &'a Member>) -> Option<(String, usize)> {
    let mut votes: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for m in members.filter(|m| m.role == Role::Node && m.elements > 0) {
        *votes.entry((m.fingerprint.clone(), m.elements)).or_default() += 1;
    }
    let best = votes.values().copied().max()?;
    let ((fp, elements), _) = votes.into_iter().find(|(_, n)| *n == best)?;
    Some((fp, usize::try_from(elements).ok()?))
}

struct Coordinator {
    cfg: CoordinatorConfig,
    network: Arc<Network>,
    sampler: Sampler,
    /// Made once the model is known (payload headers carry its fingerprint).
    outbox: Option<Outbox>,
    model: Option<(String, usize)>,
    refusals: BTreeMap<String, u64>,
    started: Instant,
    status: watch::Sender<cpb::CoordinatorStatus>,
    /// Outcomes already reported.
    reported: u64,
}

/// Runs the coordinator until SIGINT, SIGTERM or a Shutdown call.
pub async fn run(cfg: CoordinatorConfig) -> Result<(), CoordinatorError> {
    let key = identity::load_or_create(&cfg.dir)?;
    let mut net = NetConfig::new(&cfg.run_id, "", 0);
    net.listen = cfg.listen.clone();
    net.bootstrap = cfg.bootstrap.clone();
    net.swarm.security = cfg.security.clone();
    net.swarm.swarm_key = cfg.swarm_key;
    net.swarm.allowlist = cfg.allowlist.clone();
    net.role = Role::Coordinator;
    net.member_limits = MemberLimits { max_members: cfg.max_members, max_round: u64::MAX };
    net.member_expiry = cfg.sampler.member_expiry;
    let (network, mut events) = Network::start(key, net).await?;
    let network = Arc::new(network);
    let (status_tx, status_rx) = watch::channel(cpb::CoordinatorStatus::default());
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let api = match cfg.api {
        Some(addr) => Some(
            crate::api::serve(
                addr,
                cfg.api_token.clone(),
                cfg.api_tls.clone(),
                status_rx.clone(),
                shutdown_tx,
            )
            .await?,
        ),
        None => None,
    };
    let metrics = match cfg.metrics {
        Some(addr) => Some(crate::api::serve_metrics(addr, status_rx).await?),
        None => None,
    };
    announce(&cfg, &network, api.as_ref(), metrics.as_ref());
    let mut c = Coordinator {
        sampler: Sampler::new(cfg.sampler.clone()),
        cfg,
        network,
        outbox: None,
        model: None,
        refusals: BTreeMap::new(),
        started: Instant::now(),
        status: status_tx,
        reported: 0,
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(CoordinatorError::Signal)?;
    loop {
        let wake =
            c.sampler.deadline().map_or(Instant::now() + TICK, |d| d.min(Instant::now() + TICK));
        let outbox = c.outbox.as_mut();
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => c.on_net(ev),
                None => return Err(CoordinatorError::NetworkGone),
            },
            done = async move {
                match outbox {
                    Some(o) => o.next_done().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(e) = c.outbox.as_mut().and_then(|o| o.record(done)) {
                    warn!("{e}");
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown_rx.recv() => { info!("stopping (Shutdown call)"); break; }
            _ = tokio::signal::ctrl_c() => { info!("stopping (SIGINT)"); break; }
            _ = terminate.recv() => { info!("stopping (SIGTERM)"); break; }
        }
        c.step(Instant::now());
    }
    if let Some(api) = api {
        let _ = tokio::time::timeout(Duration::from_secs(1), api.stop()).await;
    }
    drop(metrics);
    // Sends still in flight end with the outbox; the nodes hear that the
    // coordinator is gone (not a heartbeat expiry later); then the swarm stops.
    drop(c.outbox.take());
    c.network.leave().await;
    if let Ok(network) = Arc::try_unwrap(c.network) {
        network.shutdown().await;
    }
    Ok(())
}

/// The first line: who the coordinator is and the address nodes give as
/// `--coordinator`.
fn announce(
    cfg: &CoordinatorConfig,
    network: &Network,
    api: Option<&crate::api::CoordinatorApiServer>,
    metrics: Option<&murmur_core::api::metrics::MetricsServer>,
) {
    let me = network.local_peer;
    let addrs: Vec<String> =
        network.view().listen_addrs.iter().map(|a| format!("{a}/p2p/{me}")).collect();
    let api_addr = api.map(|a| match a.tls {
        true => format!("https://{}", a.addr),
        false => a.addr.to_string(),
    });
    let metrics_addr = metrics.map(|m| m.addr.to_string());
    match cfg.progress {
        ProgressFormat::Json => println!(
            "{}",
            serde_json::json!({"event": "listening", "peer_id": me.to_string(), "addrs": addrs,
                "api": api_addr, "metrics": metrics_addr})
        ),
        ProgressFormat::Text => {
            let mut line = format!(
                "murmur-coordinator: run {}, peer {me}, listening on {}",
                cfg.run_id,
                addrs.join(" ")
            );
            if let Some(a) = &api_addr {
                line += &format!("; API on {a}");
            }
            if let Some(m) = &metrics_addr {
                line += &format!("; metrics on http://{m}/metrics");
            }
            println!("{line}");
        }
    }
}

impl Coordinator {
    fn refuse(&mut self, reason: &str) {
        *self.refusals.entry(reason.to_string()).or_default() += 1;
    }

    fn on_net(&mut self, ev: NetEvent) {
        let NetEvent::Payload { from, payload } = ev else { return };
        let Some(m) = to_message(from, payload) else {
            self.refuse("unknown_kind");
            return;
        };
        if m.kind != MsgKind::SampledParams {
            self.refuse("unexpected_kind");
            return;
        }
        let values = Arc::unwrap_or_clone(m.values);
        if let Err(reason) = self.sampler.receive(from, m.slot, m.weight, values, Instant::now()) {
            self.refuse(reason);
        }
    }

    /// Membership into the sampler, the model learnt, the tick's actions
    /// carried out, and the status published.
    fn step(&mut self, now: Instant) {
        let view = self.network.view();
        if let Some(model) =
            learn_model(view.members.iter()).filter(|m| Some(m) != self.model.as_ref())
        {
            info!(fingerprint = %model.0, values = model.1, "the run's model");
            self.network.set_expectation(Expectation {
                run_id: self.cfg.run_id.clone(),
                fingerprint: model.0.clone(),
                total_elements: model.1,
                encoding: Encoding::F32,
            });
            self.sampler.set_elements(model.1);
            let faults = Arc::new(Faults::new(0));
            self.outbox =
                Some(Outbox::new(self.network.clone(), &self.cfg.run_id, &model.0, faults));
            self.model = Some(model);
        }
        if let Some((fp, _)) = &self.model {
            for m in view.members.iter().filter(|m| m.role == Role::Node && &m.fingerprint == fp) {
                self.sampler.observe(m.peer, m.round, m.last_seen);
            }
            for action in self.sampler.tick(now) {
                self.execute(action);
            }
        }
        self.report();
        self.publish(now);
    }

    fn execute(&mut self, action: Action) {
        let Some(outbox) = self.outbox.as_mut() else { return };
        if let Action::Request { round, sampled, noticed } = &action {
            info!(round, sampled = sampled.len(), noticed = noticed.len(), "sampling");
        }
        let (every, target) = (self.sampler.config().sample_every, self.sampler.config().target);
        for m in crate::hub::messages(action, every, target) {
            outbox.send(m, SEND_PATIENCE);
        }
    }

    /// One progress line per finished sampling round.
    fn report(&mut self) {
        let new = self.sampler.finished.saturating_sub(self.reported) as usize;
        self.reported = self.sampler.finished;
        let outcomes: Vec<Outcome> =
            self.sampler.outcomes.iter().rev().take(new).rev().cloned().collect();
        for o in outcomes {
            match self.cfg.progress {
                ProgressFormat::Json => println!(
                    "{}",
                    serde_json::json!({"event": "sampled", "round": o.round,
                        "sampled": o.sampled.len(), "answered": o.answered.len(),
                        "sent_to": o.sent_to.len(), "seconds": o.took.as_secs_f64()})
                ),
                ProgressFormat::Text => println!(
                    "round {}: sampled {}, answered {}, average sent to {} ({:.2} s)",
                    o.round,
                    o.sampled.len(),
                    o.answered.len(),
                    o.sent_to.len(),
                    o.took.as_secs_f64()
                ),
            }
        }
    }

    fn publish(&self, now: Instant) {
        let view = self.network.view();
        let acc = self.network.accounting();
        let cfg = self.sampler.config();
        let ids = |v: &[PeerId]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let mut refusals = self.refusals.clone();
        for (k, v) in &acc.refusals {
            *refusals.entry(k.clone()).or_default() += v;
        }
        let collecting = self.sampler.collecting();
        let status = cpb::CoordinatorStatus {
            peer_id: self.network.local_peer.to_string(),
            run_id: self.cfg.run_id.clone(),
            listen_addrs: view.listen_addrs.iter().map(ToString::to_string).collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            target: cfg.target.as_str().into(),
            sample_size: cfg.sample_size as u32,
            sample_every: cfg.sample_every,
            aggregator: cfg.aggregator.to_string(),
            fingerprint: self.model.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
            elements: self.model.as_ref().map_or(0, |m| m.1 as u64),
            members: view
                .members
                .iter()
                .filter(|m| m.role == Role::Node)
                .map(|m| cpb::Member {
                    peer_id: m.peer.to_string(),
                    round: m.round,
                    last_seen_seconds_ago: now.saturating_duration_since(m.last_seen).as_secs_f64(),
                })
                .collect(),
            collecting_round: collecting.map(|c| c.0),
            collecting_sampled: collecting.map(|c| ids(c.1)).unwrap_or_default(),
            collecting_answered: collecting.map_or(0, |c| c.2 as u32),
            samples: self
                .sampler
                .outcomes
                .iter()
                .map(|o| cpb::SampleRound {
                    round: o.round,
                    sampled: ids(&o.sampled),
                    answered: ids(&o.answered),
                    sent_to: ids(&o.sent_to),
                    seconds: o.took.as_secs_f64(),
                })
                .collect(),
            rounds_sampled: self.sampler.finished,
            rounds_aggregated: self.sampler.aggregated,
            bytes_sent: acc.total().bytes_sent,
            bytes_received: acc.total().bytes_received,
            refusals,
            send_failures: self.outbox.as_ref().map_or(0, Outbox::failures),
            connected_peers: view.connected.len() as u32,
        };
        self.status.send_replace(status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(fp: &str, elements: u64, role: Role) -> Member {
        Member {
            peer: PeerId::random(),
            addrs: Vec::new(),
            round: 0,
            role,
            fingerprint: fp.into(),
            entry_round: 0,
            elements,
            last_seen: Instant::now(),
            seq: 1,
        }
    }

    #[test]
    fn the_model_is_what_most_trainers_announce() {
        let members = [
            member("a", 10, Role::Node),
            member("b", 20, Role::Node),
            member("b", 20, Role::Node),
            member("c", 30, Role::Joining),
            member("c", 30, Role::Joining),
            member("c", 30, Role::Joining),
            member("", 0, Role::Node),
        ];
        assert_eq!(learn_model(members.iter()), Some(("b".into(), 20)));
        assert_eq!(learn_model(members[..1].iter()), Some(("a".into(), 10)));
        assert_eq!(learn_model(members[3..].iter()), None, "no trainer announced one");
    }
}
