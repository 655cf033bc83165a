//! Mixing: how nodes combine their models with their peers'. Strategies here
//! are sans-IO state machines (`Mixer`); this module also owns the
//! communication topology, mixing weights, communication schedules, the
//! compression of updates, the coordinator's side of a member (`coordinated`),
//! and the one builder of strategies.

pub mod aggregate;
pub mod allreduce;
pub mod comm;
pub mod compress;
pub mod consensus;
pub mod coordinated;
pub mod diloco;
pub mod event_queue;
pub mod gossip;
pub mod merge;
pub mod mixer;
pub mod overlap;
pub mod patience;
pub mod sim;
mod sim_shard;
pub mod slot_inbox;
pub mod strategy;
pub mod topology;
pub mod vec_map;
