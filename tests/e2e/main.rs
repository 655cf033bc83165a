//! End-to-end tests: real `murmur` processes on real data.
//!
//! One test binary for the whole suite (a binary per file would each link
//! libtorch-sized dependencies). Data comes from `MURMUR_DATA_DIR`.

mod harness;
mod identity;
mod train;
