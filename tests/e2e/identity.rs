//! `murmur id` and `murmur swarm-key`: identities persist, keys are not
//! overwritten.

use crate::harness::{murmur, ok, s};

#[test]
fn a_node_keeps_its_peer_id_across_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let first = ok(&murmur(&["id", "--data-dir", s(&dir)]));
    let again = ok(&murmur(&["id", "--data-dir", s(&dir)]));
    let other = ok(&murmur(&["id", "--data-dir", s(&tmp.path().join("other"))]));
    assert_eq!(first, again);
    assert_ne!(first, other);
    assert!(first.trim().starts_with("12D3KooW"), "ed25519 peer ids start with 12D3KooW: {first}");
}

#[test]
fn swarm_keys_are_written_once() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("swarm.key");
    ok(&murmur(&["swarm-key", s(&key)]));
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with("/key/swarm/psk/1.0.0/"), "{text}");
    let again = murmur(&["swarm-key", s(&key)]);
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
}
