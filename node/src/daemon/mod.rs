//! One node: the trainer thread, the network and the mixing strategy wired
//! together, plus what the node reports (progress lines, `summary.json`).
//!
//! `launch` starts the node's services; `driver` is its event loop, which
//! reads every source through `events` (one `select`), queues trainer jobs
//! on `worker` without waiting, sends through `outbox`, and leaves
//! decisions to pure functions (`round_end`, `rejoin`). `shutdown` is why
//! a node stops early; `record`, `timing`, `report` and `summary` are what
//! it keeps and tells.

pub mod config;
mod driver;
mod events;
mod launch;
mod record;
mod rejoin;
mod report;
mod round_end;
mod shutdown;
mod summary;
mod timing;
pub mod worker;

pub use launch::{NodeError, NodeSetup, Resume, run_node};
pub use report::human_bytes;
pub use summary::NodeSummary;
