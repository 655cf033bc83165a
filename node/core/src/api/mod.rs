//! The node's API: the gRPC `murmur.v1.NodeService` (with gRPC health and
//! server reflection), the Prometheus `/metrics` endpoint, and the client
//! that `murmur status`, `murmur fault` and `murmur cluster` use.
//!
//! Both servers read the one `StatusBoard`; control calls reach the driver
//! as `Control` requests (checkpoint, shutdown) or change the shared
//! `Faults`. Nothing here trains or touches the network.

pub mod client;
pub mod metrics;
pub mod server;
pub mod tls;
pub mod token;

use tokio::sync::oneshot;

pub use server::{ApiServer, serve};
pub use tls::ApiTls;
pub use token::ApiToken;

/// What the API asks of the driver.
#[derive(Debug)]
pub enum Control {
    /// Write a checkpoint now; the reply carries where and how far.
    SaveCheckpoint(oneshot::Sender<Result<SavedCheckpoint, String>>),
    /// Stop as SIGTERM does.
    Shutdown,
}

/// Where a checkpoint went and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCheckpoint {
    pub path: String,
    pub step: u64,
    pub round: u64,
}
