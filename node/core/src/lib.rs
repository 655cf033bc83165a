//! murmur's core: everything a member of a run does except train.
//!
//! Strategies (`mix`, sans-IO), the libp2p layer (`net`), fault injection
//! (`fault`), the shared status (`status`) and the gRPC API with its client
//! (`api`). It links no libtorch, so the coordinator, which joins a run
//! without a model, runs on small hosts and in a small image; the node
//! (`murmur-node`) adds training on top.

pub mod api;
pub mod fault;
pub mod mix;
pub mod net;
pub mod status;
