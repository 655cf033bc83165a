//! Rate limit for warnings a peer can cause. A hostile or broken peer can
//! send refused payloads and bad heartbeats as fast as the link allows;
//! one warning each would fill the node's log (and its disk) while the
//! counters already say how many there were. So at most `burst` warnings
//! go out per `window`, and the next one that does says how many were
//! held back.

use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tracing::warn;

#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    logged: u32,
    held_back: u64,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> LogLimiter {
        let state = State { window_start: None, logged: 0, held_back: 0 };
        LogLimiter { burst, window, state: Mutex::new(state) }
    }

    /// `Some(n)` when a warning may be logged at `now`, `n` being how many
    /// were held back since the last one that was; `None` to hold it back.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.window_start.is_none_or(|start| now.duration_since(start) >= self.window) {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged < self.burst {
            s.logged += 1;
            Some(std::mem::take(&mut s.held_back))
        } else {
            s.held_back += 1;
            None
        }
    }

    /// Warns `what: detail` about `peer`, unless held back.
    pub fn warn(&self, peer: &PeerId, what: &str, detail: &dyn Display) {
        if let Some(held_back) = self.admit(Instant::now()) {
            warn!(%peer, held_back, "{what}: {detail}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_wait_for_the_next_window_and_are_counted() {
        let limit = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let first: Vec<Option<u64>> = (0..5).map(|_| limit.admit(t0)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        let later = t0 + Duration::from_secs(9);
        assert_eq!(limit.admit(later), None, "still the first window");
        let next = t0 + Duration::from_secs(10);
        assert_eq!(limit.admit(next), Some(3), "the next window reports the 3 held back");
        assert_eq!(limit.admit(next), Some(0));
    }
}
