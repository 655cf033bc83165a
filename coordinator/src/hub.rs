//! The sampler's actions as messages on the wire, and the sampler as a
//! participant of a simulated run (`murmur sim --strategy semidec`): one
//! translation, which the coordinator's loop and the simulator share.

use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use murmur_core::mix::coordinated::{ASK_KEEP, ASK_NOTHING, ASK_SEND};
use murmur_core::mix::mixer::{Message, MsgKind};
use murmur_core::mix::sim::Hub;

use crate::sampling::{Action, Sampler, Target};

/// The messages that carry out `action` (`Message::peer` is the
/// destination). A request tells every member what to do at the end of
/// the round, and H_s: a member waits at a sampling round's end until it
/// knows which it is in.
pub fn messages(action: Action, sample_every: u64, target: Target) -> Vec<Message> {
    match action {
        Action::Request { round, sampled, noticed } => {
            let every = sample_every as f32;
            let others = match target {
                Target::All => ASK_KEEP,
                Target::Sampled => ASK_NOTHING,
            };
            let (send, keep) = (Arc::new(vec![ASK_SEND, every]), Arc::new(vec![others, every]));
            let asks = sampled.into_iter().map(|p| (p, send.clone()));
            asks.chain(noticed.into_iter().map(|p| (p, keep.clone())))
                .map(|(p, body)| Message::new(p, MsgKind::SampleRequest, round, body))
                .collect()
        }
        Action::Send { peers, round, values } => {
            let values = Arc::new(values);
            peers
                .into_iter()
                .map(|p| Message::new(p, MsgKind::Average, round, values.clone()))
                .collect()
        }
    }
}

/// The sampler in a simulated run, under the peer id `peer`.
#[derive(Debug)]
pub struct SimCoordinator {
    pub peer: PeerId,
    pub sampler: Sampler,
}

impl Hub for SimCoordinator {
    fn peer(&self) -> PeerId {
        self.peer
    }

    fn observe(&mut self, peer: PeerId, round: u64, now: Instant) {
        self.sampler.observe(peer, round, now);
    }

    fn receive(&mut self, m: Message, now: Instant) {
        if m.kind == MsgKind::SampledParams {
            let values = Arc::unwrap_or_clone(m.values);
            let _ = self.sampler.receive(m.peer, m.slot, m.weight, values, now);
        }
    }

    fn tick(&mut self, now: Instant) -> Vec<Message> {
        let (every, target) = (self.sampler.config().sample_every, self.sampler.config().target);
        self.sampler.tick(now).into_iter().flat_map(|a| messages(a, every, target)).collect()
    }

    fn deadline(&self) -> Option<Instant> {
        self.sampler.deadline()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use murmur_core::mix::aggregate::Aggregator;
    use murmur_core::mix::coordinated::CoordinatedConfig;
    use murmur_core::mix::sim::{self, NoTraining, SimConfig, SimNode, SimReport, Simulator};
    use murmur_core::mix::strategy::{self, StrategyKind, StrategySpec};
    use murmur_core::mix::topology::TopologySpec;

    use super::*;
    use crate::sampling::SamplerConfig;

    /// A hub that counts what it hears, and passes everything on.
    struct Counting {
        hub: SimCoordinator,
        observed: Arc<AtomicU64>,
    }

    impl Hub for Counting {
        fn peer(&self) -> PeerId {
            self.hub.peer()
        }
        fn observe(&mut self, peer: PeerId, round: u64, now: Instant) {
            self.observed.fetch_add(1, Ordering::Relaxed);
            self.hub.observe(peer, round, now);
        }
        fn receive(&mut self, m: Message, now: Instant) {
            self.hub.receive(m, now);
        }
        fn tick(&mut self, now: Instant) -> Vec<Message> {
            self.hub.tick(now)
        }
        fn deadline(&self) -> Option<Instant> {
            self.hub.deadline()
        }
    }

    /// 12 nodes averaging random vectors in 3 rings for 10 rounds, with a
    /// coordinator sampling 4 every 5 rounds to `target` (none: rings alone).
    fn rings(target: Option<Target>) -> SimReport {
        rings_of(12, target, Arc::default())
    }

    /// `n` nodes as in `rings`; `observed` counts the heartbeats the
    /// coordinator hears.
    fn rings_of(n: usize, target: Option<Target>, observed: Arc<AtomicU64>) -> SimReport {
        let ids = sim::peer_ids(n, 3);
        let hub_peer = sim::peer_ids(1, 99)[0];
        let kind = if target.is_some() { StrategyKind::Semidec } else { StrategyKind::Gossip };
        let spec = StrategySpec {
            rounds: 10,
            topology: TopologySpec::Rings(3),
            timeout: Duration::from_millis(200),
            coordinator: target.map(|_| CoordinatedConfig {
                coordinator: hub_peer,
                wait: Duration::from_millis(200),
                weight: 1.0,
            }),
            ..StrategySpec::new(kind)
        };
        let init = sim::random_params(n, 8, 3);
        let nodes: Vec<SimNode> = ids
            .iter()
            .zip(init)
            .map(|(&id, params)| SimNode {
                id,
                mixer: strategy::build(&spec, id, ids.clone(), 0, &[], 8).unwrap(),
                params,
            })
            .collect();
        let mut simulator = Simulator::new(SimConfig::default(), nodes).unwrap();
        if let Some(target) = target {
            let cfg = SamplerConfig {
                seed: 3,
                sample_every: 5,
                sample_size: 4,
                target,
                deadline: Duration::from_millis(200),
                min_members: n,
                patience: Duration::from_secs(20),
                member_expiry: Duration::from_secs(10),
                aggregator: Aggregator::Mean,
                elements: 8,
                max_weight: None,
            };
            let hub = SimCoordinator { peer: hub_peer, sampler: Sampler::new(cfg) };
            simulator = simulator.with_hub(Box::new(Counting { hub, observed }));
        }
        simulator.run(&mut NoTraining).unwrap()
    }

    #[test]
    fn a_simulated_coordinator_joins_the_rings() {
        let alone = rings(None);
        let s2s = rings(Some(Target::Sampled));
        let s2a = rings(Some(Target::All));
        assert!(alone.final_consensus_distance > 0.1, "{}", alone.final_consensus_distance);
        // Round 9 is a sampling round: S2A ends with one model everywhere.
        assert!(s2a.final_consensus_distance < 1e-5, "{}", s2a.final_consensus_distance);
        assert!(
            s2s.final_consensus_distance < alone.final_consensus_distance,
            "S2S {} vs {}",
            s2s.final_consensus_distance,
            alone.final_consensus_distance
        );
        assert!(s2a.messages.sent > alone.messages.sent, "the coordinator's messages count");
    }

    #[test]
    fn the_coordinator_hears_of_each_round_once_not_of_every_node_at_every_event() {
        // 600 nodes, 10 rounds: a node's round moves 10 times, and every
        // live node is heard once a second of virtual time besides. Hearing
        // every node after every event, as before, was 13.7 million here,
        // and made a run cost n^2.
        let (n, observed) = (600, Arc::new(AtomicU64::new(0)));
        let s2a = rings_of(n, Some(Target::All), observed.clone());
        assert_eq!(s2a.end, sim::EndReason::AllFinished);
        assert!(s2a.final_consensus_distance < 1e-5, "{}", s2a.final_consensus_distance);
        let beats = s2a.virtual_seconds.ceil() as u64 + 1;
        let bound = n as u64 * (10 + beats);
        let heard = observed.load(Ordering::Relaxed);
        assert!(heard <= bound, "heard {heard} rounds, more than {bound}");
        assert!(heard >= n as u64 * 10, "heard {heard}: every node's every round is heard");
    }
}
