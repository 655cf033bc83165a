//! End-to-end tests: real `murmur` processes on real data.
//!
//! One test binary for the whole suite (a binary per file would each link
//! libtorch-sized dependencies). Data comes from `MURMUR_DATA_DIR`.

// Every function here is test code: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod api;
mod attack;
mod chaos;
mod cluster;
mod coordinator;
mod deploy;
mod diloco;
mod faults;
mod harness;
mod identity;
mod names;
mod security;
mod sim;
mod swarm;
mod train;
