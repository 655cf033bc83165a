//! Why a node stops before its run is over, as one type: SIGINT, SIGTERM
//! or the API's Shutdown call all become a `StopReason`, and every stage of
//! the driver (joining, rejoining, training, finishing) reads them from the
//! same place. A stopping node still writes its checkpoint and summary.

use std::fmt;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What asked the node to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal(&'static str),
    /// A `Shutdown` call on the node's API.
    Api,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Signal(name) => write!(f, "{name}"),
            StopReason::Api => f.write_str("a Shutdown call"),
        }
    }
}

/// SIGINT and SIGTERM as one stream of stop requests.
#[derive(Debug)]
pub struct Shutdown {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Shutdown {
    /// Listens for the signals (one that cannot be hooked is never seen).
    pub fn new() -> Shutdown {
        Shutdown {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next signal.
    pub async fn recv(&mut self) -> StopReason {
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.term) => StopReason::Signal("SIGTERM"),
            _ = next(&mut self.int) => StopReason::Signal("SIGINT"),
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}
