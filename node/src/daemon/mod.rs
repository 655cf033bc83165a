//! One node: the trainer thread, the network and the mixing strategy wired
//! together, plus what the node reports (progress lines, `summary.json`).
//!
//! The driver is a single async loop. It owns the strategy (a sans-IO
//! `Mixer`) and turns its actions into trainer commands and network sends;
//! it turns trainer results, peer messages, membership changes and deadlines
//! into strategy inputs. It never touches a tensor.

pub mod config;
mod driver;
mod report;
pub mod worker;

pub use driver::{NodeSetup, run_node};
pub use report::{NodeSummary, human_bytes};
