//! Local training: datasets and their partitions, the model zoo, optimizers
//! and schedules, the step loop, evaluation and checkpoints.
//!
//! Everything here is synchronous and owns its tensors; the daemon runs it on
//! a dedicated OS thread and talks to it through channels.

pub mod batch;
pub mod checkpoint;
pub mod cifar;
pub mod config;
pub mod dataset;
pub mod device;
pub mod eval;
pub mod idx;
pub mod load;
pub mod model;
pub mod optim;
pub mod partition;
pub mod schedule;
pub mod sim_training;
pub mod synthetic;
pub mod text;
pub mod trainer;
