//! murmur: a peer-to-peer training daemon.
//!
//! Every node trains its own copy of a model with libtorch and mixes it with
//! its peers. This crate holds the node: local training (`train`), the flat
//! parameter vector every other part speaks (`params`) and the command line
//! (`cli`).

pub mod api;
pub mod cli;
pub mod daemon;
pub mod fault;
pub mod mix;
pub mod net;
pub mod params;
pub mod status;
pub mod train;
