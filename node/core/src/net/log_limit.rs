//! Rate limit for warnings a peer can cause. A hostile or broken peer can
//! send refused payloads and bad heartbeats as fast as the link allows;
//! one warning each would fill the node's log (and its disk) while the
//! counters already say how many there were. So at most `burst` warnings
//! go out per `window`, and the next one that does says how many were
//! held back.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tracing::{info, warn};

/// Lines about keys of type `K` (peers by default; API clients by address).
#[derive(Debug)]
pub struct LogLimiter<K = PeerId> {
    burst: u32,
    /// Warnings one peer may cause per window: a flooding peer uses its
    /// share, not the whole burst, so warnings about others still appear.
    per_peer: u32,
    window: Duration,
    state: Mutex<State<K>>,
}

#[derive(Debug)]
struct State<K> {
    window_start: Option<Instant>,
    logged: u32,
    held_back: u64,
    /// Warnings logged per peer in this window (cleared with it).
    by_peer: HashMap<K, u32>,
}

/// The most of a peer-supplied string a log line shows.
const PEER_TEXT_CHARS: usize = 64;

/// A string a peer sent, fit for a log line: control characters and quotes
/// escaped, cut to 64 characters with the length it had.
pub fn peer_text(s: &str) -> String {
    let shown: String = s.chars().take(PEER_TEXT_CHARS).collect();
    let escaped: String = shown.escape_debug().collect();
    if s.chars().count() > PEER_TEXT_CHARS {
        format!("\"{escaped}\"... ({} bytes)", s.len())
    } else {
        format!("\"{escaped}\"")
    }
}

impl<K: std::hash::Hash + Eq + Clone + std::fmt::Display> LogLimiter<K> {
    /// At most `burst` lines per `window`, at most `per_peer` of them about
    /// any one peer.
    pub fn new(burst: u32, per_peer: u32, window: Duration) -> LogLimiter<K> {
        let state = State { window_start: None, logged: 0, held_back: 0, by_peer: HashMap::new() };
        LogLimiter { burst, per_peer, window, state: Mutex::new(state) }
    }

    /// `Some(n)` when a line about `peer` may be logged at `now`, `n` being
    /// how many were held back since the last one that was; `None` to hold
    /// it back.
    pub fn admit(&self, peer: &K, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.window_start.is_none_or(|start| now.duration_since(start) >= self.window) {
            s.window_start = Some(now);
            s.logged = 0;
            s.by_peer.clear();
        }
        let from_peer = s.by_peer.get(peer).copied().unwrap_or(0);
        if s.logged < self.burst && from_peer < self.per_peer {
            s.logged += 1;
            s.by_peer.insert(peer.clone(), from_peer + 1);
            Some(std::mem::take(&mut s.held_back))
        } else {
            s.held_back += 1;
            None
        }
    }

    /// Warns `what: detail` about `peer`, unless held back.
    pub fn warn(&self, peer: &K, what: &str, detail: &dyn Display) {
        if let Some(held_back) = self.admit(peer, Instant::now()) {
            warn!(%peer, held_back, "{what}: {detail}");
        }
    }

    /// Logs `what` about `peer` at info level, unless held back.
    pub fn info(&self, peer: &K, what: &str) {
        if let Some(held_back) = self.admit(peer, Instant::now()) {
            info!(%peer, held_back, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_wait_for_the_next_window_and_are_counted() {
        let limit = LogLimiter::new(3, 3, Duration::from_secs(10));
        let (t0, p) = (Instant::now(), PeerId::random());
        let first: Vec<Option<u64>> = (0..5).map(|_| limit.admit(&p, t0)).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        let later = t0 + Duration::from_secs(9);
        assert_eq!(limit.admit(&p, later), None, "still the first window");
        let next = t0 + Duration::from_secs(10);
        assert_eq!(limit.admit(&p, next), Some(3), "the next window reports the 3 held back");
        assert_eq!(limit.admit(&p, next), Some(0));
    }

    #[test]
    fn one_flooding_peer_cannot_hide_the_others() {
        let limit = LogLimiter::new(10, 2, Duration::from_secs(10));
        let t0 = Instant::now();
        let (loud, quiet) = (PeerId::random(), PeerId::random());
        let loud_lines = (0..100).filter(|_| limit.admit(&loud, t0).is_some()).count();
        assert_eq!(loud_lines, 2);
        assert_eq!(limit.admit(&quiet, t0), Some(98), "and it says how many were held back");
        // Many peers together stay under the global cap.
        let many = (0..50).filter(|_| limit.admit(&PeerId::random(), t0).is_some()).count();
        assert_eq!(many, 7);
    }

    #[test]
    fn peer_strings_are_escaped_and_cut() {
        assert_eq!(peer_text("run-1"), "\"run-1\"");
        assert_eq!(peer_text("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let long = "x".repeat(4096);
        let shown = peer_text(&long);
        assert!(shown.len() < 100 && shown.ends_with("(4096 bytes)"), "{shown}");
    }
}
