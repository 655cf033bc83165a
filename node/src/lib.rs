//! murmur: a peer-to-peer training daemon.
//!
//! Every node trains its own copy of a model with libtorch and mixes it with
//! its peers. This crate holds the node: local training (`train`), the flat
//! parameter vector it exchanges (`params`), one node's event loop
//! (`daemon`) and the command line (`cli`). Mixing, networking, faults,
//! status and the API live in the libtorch-free `murmur-core`, re-exported
//! here under their own names.

pub use murmur_core::{api, fault, mix, net, status};

pub mod cli;
pub mod daemon;
pub mod memory;
pub mod params;
pub mod train;
