//! The messages that came for one exchange slot, one per sender.
//!
//! Why not a `BTreeMap<PeerId, Message>`: a node holds a few dozen
//! messages per slot, and every insert into a map keyed by 80-byte peer ids
//! compared and shifted whole entries (with 100,000 simulated nodes, the
//! map's inserts, moves and compares took a fifth of the simulator's time).
//! Here a message is pushed at the end, and a sender is found by a scan of
//! 8-byte keys (`peer_key`), confirmed on the full id.

use libp2p::PeerId;

use super::mixer::Message;

/// The last (at most) 8 bytes of `peer`'s multihash digest: the key
/// bytes of an inline public key or the end of a hash, so ids that differ
/// nearly always differ here (a match is always confirmed on the full id).
pub fn peer_key(peer: &PeerId) -> u64 {
    let digest = peer.as_ref().digest();
    let tail = &digest[digest.len().saturating_sub(8)..];
    let mut bytes = [0u8; 8];
    bytes[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(bytes)
}

/// The place among `keys` (each `peer_key` of `id(i)`) of `peer`: a scan
/// of the small keys, each match confirmed on the full id.
pub fn find_peer<'a>(
    keys: &[u64],
    peer: &PeerId,
    id: impl Fn(usize) -> &'a PeerId,
) -> Option<usize> {
    let key = peer_key(peer);
    (0..keys.len()).find(|&i| keys[i] == key && id(i) == peer)
}

/// One slot's messages by sender (`Message::peer`), in arrival order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotInbox {
    /// `peer_key` of each message's sender.
    keys: Vec<u64>,
    msgs: Vec<Message>,
}

impl SlotInbox {
    fn position(&self, peer: &PeerId) -> Option<usize> {
        find_peer(&self.keys, peer, |i| &self.msgs[i].peer)
    }

    pub fn contains_key(&self, peer: &PeerId) -> bool {
        self.position(peer).is_some()
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Message> {
        self.position(peer).map(|i| &self.msgs[i])
    }

    /// Keeps `m` as its sender's message, returning the one it replaces.
    pub fn insert(&mut self, m: Message) -> Option<Message> {
        match self.position(&m.peer) {
            Some(i) => Some(std::mem::replace(&mut self.msgs[i], m)),
            None => {
                self.keys.push(peer_key(&m.peer));
                self.msgs.push(m);
                None
            }
        }
    }

    /// Keeps only the messages `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&Message) -> bool) {
        let mut i = 0;
        while i < self.msgs.len() {
            if keep(&self.msgs[i]) {
                i += 1;
            } else {
                self.keys.swap_remove(i);
                self.msgs.swap_remove(i);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Message> {
        self.msgs.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mix::mixer::MsgKind;

    fn msg(peer: PeerId, x: f32) -> Message {
        Message::new(peer, MsgKind::Params, 0, Arc::new(vec![x]))
    }

    #[test]
    fn a_sender_has_one_message_and_a_second_replaces_the_first() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut inbox = SlotInbox::default();
        assert!(inbox.insert(msg(a, 1.0)).is_none());
        assert!(inbox.insert(msg(b, 2.0)).is_none());
        assert_eq!(inbox.insert(msg(a, 3.0)).map(|m| m.values[0]), Some(1.0));
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox.get(&a).map(|m| m.values[0]), Some(3.0));
        assert!(inbox.contains_key(&b) && !inbox.contains_key(&c));
        inbox.retain(|m| m.peer != a);
        assert!(!inbox.contains_key(&a) && inbox.get(&b).is_some_and(|m| m.values[0] == 2.0));
        assert_eq!(inbox.iter().count(), 1);
    }

    #[test]
    fn ids_that_share_their_last_eight_bytes_are_told_apart() {
        // Two sha256-hashed ids can only share a key by chance; identity ids
        // of keys that end alike share it by construction, so build those.
        let id = |first: u8| {
            let mut digest = [7u8; 40];
            digest[0] = first;
            PeerId::from_multihash(libp2p::multihash::Multihash::wrap(0x00, &digest).unwrap())
                .unwrap()
        };
        let (a, b) = (id(1), id(2));
        assert_eq!(peer_key(&a), peer_key(&b));
        let mut inbox = SlotInbox::default();
        inbox.insert(msg(a, 1.0));
        inbox.insert(msg(b, 2.0));
        assert_eq!(inbox.len(), 2);
        assert_eq!(inbox.get(&a).map(|m| m.values[0]), Some(1.0));
        assert_eq!(inbox.get(&b).map(|m| m.values[0]), Some(2.0));
    }
}
