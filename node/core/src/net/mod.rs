//! The peer-to-peer layer: libp2p swarm, the `/murmur/params/1` payload
//! protocol, wire framing and encodings, membership and transfer accounting.

pub mod accounting;
pub mod admission;
pub mod buffers;
pub mod encoding;
pub mod gossip_reach;
mod hugepages;
pub mod identity;
pub mod inbound;
pub mod log_limit;
pub mod membership;
pub mod outbox;
pub mod reserve;
pub mod security;
pub mod service;
pub mod swarm;
pub mod tls;
pub mod widen;
pub mod wire;

#[cfg(test)]
mod tests;
