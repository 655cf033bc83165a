//! Transfer accounting: bytes and messages sent and received per peer and
//! per message kind, and refusals per reason. Every byte murmur puts on or
//! takes off a `/murmur/params/1` stream or a gossip topic is counted here;
//! the status API and metrics read snapshots of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use serde::Serialize;

/// Which direction a count is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

/// Counts for one (peer, kind) pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
}

impl Counts {
    fn add(&mut self, dir: Direction, bytes: u64) {
        match dir {
            Direction::Sent => {
                self.bytes_sent += bytes;
                self.messages_sent += 1;
            }
            Direction::Received => {
                self.bytes_received += bytes;
                self.messages_received += 1;
            }
        }
    }

    fn merge(&mut self, o: &Counts) {
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
        self.messages_sent += o.messages_sent;
        self.messages_received += o.messages_received;
    }
}

/// A point-in-time copy of all counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// peer id (base58) -> kind -> counts.
    pub per_peer: BTreeMap<String, BTreeMap<String, Counts>>,
    /// reason -> refusals.
    pub refusals: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Totals over all peers and kinds.
    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        self.per_peer.values().flat_map(|k| k.values()).for_each(|c| t.merge(c));
        t
    }

    /// Totals per peer (base58) over all kinds.
    pub fn by_peer(&self) -> BTreeMap<String, Counts> {
        self.per_peer
            .iter()
            .map(|(peer, kinds)| {
                let mut t = Counts::default();
                kinds.values().for_each(|c| t.merge(c));
                (peer.clone(), t)
            })
            .collect()
    }

    /// Totals with one peer over all kinds.
    pub fn with_peer(&self, peer: &PeerId) -> Counts {
        let mut t = Counts::default();
        if let Some(kinds) = self.per_peer.get(&peer.to_base58()) {
            kinds.values().for_each(|c| t.merge(c));
        }
        t
    }

    pub fn refusals(&self, reason: &str) -> u64 {
        self.refusals.get(reason).copied().unwrap_or(0)
    }
}

/// Shared, cheaply cloned counters.
#[derive(Debug, Clone, Default)]
pub struct Accounting {
    inner: Arc<Mutex<Snapshot>>,
}

impl Accounting {
    pub fn record(&self, peer: &PeerId, kind: &str, dir: Direction, bytes: u64) {
        let mut s = self.lock();
        s.per_peer
            .entry(peer.to_base58())
            .or_default()
            .entry(kind.to_string())
            .or_default()
            .add(dir, bytes);
    }

    pub fn refuse(&self, reason: &str) {
        *self.lock().refusals.entry(reason.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        // A panic while holding this lock cannot leave counters inconsistent
        // in a way that matters, so a poisoned lock is still used.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_peer_kind_and_reason() {
        let acc = Accounting::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        acc.record(&a, "params", Direction::Sent, 100);
        acc.record(&a, "params", Direction::Sent, 50);
        acc.record(&a, "heartbeat", Direction::Received, 7);
        acc.record(&b, "params", Direction::Received, 1000);
        acc.refuse("wrong_run");
        acc.refuse("wrong_run");
        let s = acc.snapshot();
        assert_eq!(
            s.with_peer(&a),
            Counts { bytes_sent: 150, bytes_received: 7, messages_sent: 2, messages_received: 1 }
        );
        assert_eq!(s.total().bytes_received, 1007);
        assert_eq!(s.refusals("wrong_run"), 2);
        assert_eq!(s.refusals("bad_checksum"), 0);
    }
}
