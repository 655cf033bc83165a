//! Messages between a strategy and the wire. Outgoing: a `Message` becomes a
//! payload header (kind, slot, weight, offset, part, encoding) and a body,
//! a Byzantine fault corrupts what goes out (never the model), and the send
//! runs in the background, retried with backoff until its patience runs
//! out. Incoming: a validated payload becomes a `Message` again.
//!
//! The driver owns one `Outbox` and reads finished sends as events; nothing
//! here waits on a peer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use tokio::task::JoinSet;
use tracing::debug;

use crate::fault::Faults;
use crate::mix::mixer::{Message, MsgKind};
use crate::net::encoding;
use crate::net::service::{Network, SendError};
use crate::net::wire;

/// A send that did not reach its peer.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    #[error("{kind} for slot {slot} to {peer}: {source}")]
    Send {
        kind: &'static str,
        slot: u64,
        peer: PeerId,
        #[source]
        source: SendError,
    },
    #[error("a send task ended: {0}")]
    Task(String),
}

/// Sends in flight, and how many failed.
pub struct Outbox {
    network: Arc<Network>,
    run_id: String,
    fingerprint: String,
    faults: Arc<Faults>,
    sends: JoinSet<Result<(), SendFailure>>,
    failures: u64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("in_flight", &self.sends.len()).finish()
    }
}

impl Outbox {
    pub fn new(
        network: Arc<Network>,
        run_id: &str,
        fingerprint: &str,
        faults: Arc<Faults>,
    ) -> Self {
        Outbox {
            network,
            run_id: run_id.to_string(),
            fingerprint: fingerprint.to_string(),
            faults,
            sends: JoinSet::new(),
            failures: 0,
        }
    }

    /// Sends failed after their retries.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    pub fn is_idle(&self) -> bool {
        self.sends.is_empty()
    }

    /// Starts sending `m` to `m.peer`, retrying failed attempts (not
    /// refusals) for up to `patience`.
    pub fn send(&mut self, m: Message, patience: Duration) {
        let network = self.network.clone();
        let mut header = wire::build_header(
            &self.run_id,
            &self.fingerprint,
            network.sender_bytes(),
            m.kind.to_wire(),
            m.slot,
        );
        header.sample_weight = m.weight;
        header.element_offset = m.offset as u64;
        header.part = m.part;
        let now = Instant::now();
        let give_up = now + patience;
        // A Byzantine fault changes what goes on the wire, never the model.
        let values = if self.faults.corrupts(now) {
            let mut v = m.values.to_vec();
            self.faults.corrupt(&mut v, now);
            Arc::new(v)
        } else {
            m.values.clone()
        };
        let (kind, slot, peer, enc) = (m.kind.label(), m.slot, m.peer, m.encoding);
        self.sends.spawn(async move {
            let (header, body) = wire::encode_shared(header, values, enc);
            let mut attempt = 0u32;
            loop {
                match network.send(peer, &header, &body).await {
                    Ok(()) => return Ok(()),
                    // A refusal is final; anything else (a connection being
                    // set up, a peer restarting, a receiver that has not
                    // had this node's heartbeat yet) is retried with
                    // backoff until the exchange's deadline.
                    Err(source @ SendError::Refused { .. }) => {
                        return Err(SendFailure::Send { kind, slot, peer, source });
                    }
                    Err(source) if Instant::now() + retry_delay(attempt) >= give_up => {
                        debug!(%peer, slot, attempt, "send failed: {source}");
                        return Err(SendFailure::Send { kind, slot, peer, source });
                    }
                    Err(e) => {
                        debug!(%peer, slot, attempt, "send failed, retrying: {e}");
                        tokio::time::sleep(retry_delay(attempt)).await;
                        attempt += 1;
                    }
                }
            }
        });
    }

    /// The next send to end (pending forever while none is in flight).
    pub async fn next_done(&mut self) -> Result<(), SendFailure> {
        match self.sends.join_next().await {
            Some(Ok(done)) => done,
            Some(Err(e)) => Err(SendFailure::Task(e.to_string())),
            None => std::future::pending().await,
        }
    }

    /// Counts a finished send; returns the failure's text, if it failed.
    pub fn record(&mut self, done: Result<(), SendFailure>) -> Option<String> {
        let e = done.err()?;
        self.failures += 1;
        Some(e.to_string())
    }
}

/// Backoff before retry `attempt` (0-based): 20 ms doubling, capped at 1 s.
fn retry_delay(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(6)).min(1000))
}

/// A validated payload as a strategy message (`None` for a kind this
/// build does not know, or an offset beyond this machine's address space).
pub fn to_message(from: PeerId, p: wire::Payload) -> Option<Message> {
    let h = &p.header;
    let kind = MsgKind::from_wire(h.kind)?;
    let encoding = encoding::from_proto(h.encoding, h.block_size, h.top_k).ok()?;
    Some(Message {
        peer: from,
        kind,
        slot: h.round,
        weight: h.sample_weight,
        offset: usize::try_from(h.element_offset).ok()?,
        encoding,
        part: h.part,
        values: Arc::new(p.values),
    })
}

#[cfg(test)]
mod tests {
    use murmur_proto::wire::v1::PayloadHeader;

    use super::*;
    use crate::net::encoding::Encoding;

    #[test]
    fn every_kind_crosses_the_wire_and_back() {
        for kind in MsgKind::ALL {
            assert_eq!(MsgKind::from_wire(kind.to_wire() as i32), Some(kind));
        }
        assert_eq!(MsgKind::from_wire(0), None, "unspecified");
        assert_eq!(MsgKind::from_wire(99), None);
        let labels: std::collections::BTreeSet<&str> =
            MsgKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), MsgKind::ALL.len(), "labels are distinct");
    }

    #[test]
    fn a_payload_becomes_the_message_it_was() {
        let from = PeerId::random();
        let header = PayloadHeader {
            kind: MsgKind::PullReply.to_wire() as i32,
            round: 7,
            sample_weight: 2.5,
            element_offset: 3,
            part: 1,
            ..wire::encode_payload(PayloadHeader::default(), &[1.0, 2.0], Encoding::Bf16).0
        };
        let m = to_message(from, wire::Payload { header, values: vec![1.0, 2.0] }).unwrap();
        assert_eq!((m.peer, m.kind, m.slot, m.weight), (from, MsgKind::PullReply, 7, 2.5));
        assert_eq!((m.offset, m.part, m.encoding), (3, 1, Encoding::Bf16));
        assert_eq!(*m.values, vec![1.0, 2.0]);
    }

    #[test]
    fn retries_back_off_to_a_second() {
        let d: Vec<u64> = (0..8).map(|a| retry_delay(a).as_millis() as u64).collect();
        assert_eq!(d, [20, 40, 80, 160, 320, 640, 1000, 1000]);
    }
}
