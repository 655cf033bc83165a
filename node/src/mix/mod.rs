//! Mixing: how nodes combine their models with their peers'. Strategies here
//! are sans-IO state machines (`Mixer`); this module also owns the
//! communication topology, mixing weights and communication schedules.

pub mod aggregate;
pub mod allreduce;
pub mod comm;
pub mod consensus;
pub mod gossip;
pub mod merge;
pub mod mixer;
pub mod sim;
pub mod topology;
