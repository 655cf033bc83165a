//! murmur-coordinator: the optional coordinator of a run.
//!
//! Between gossip and a parameter server: every few rounds it samples some
//! of the run's training members, averages their models and sends the
//! average back to the sampled (sampled-to-sampled, S2S) or to every live
//! member (sampled-to-all, S2A); with no gossip and S2A every round this is
//! federated averaging. Training never needs it: nodes that lose it go on
//! gossiping. It is built on `murmur-core` and links no libtorch.
//!
//! `sampling` is its logic, a sans-IO state machine driven by `tick(now)`;
//! `daemon` runs it against the run's swarm, `hub` turns its actions into
//! messages (for the daemon and for `murmur sim`); `api` serves its status
//! over gRPC and Prometheus; `config` checks its options.

pub mod api;
pub mod config;
pub mod daemon;
pub mod hub;
pub mod sampling;
