//! Several real swarms in one process on 127.0.0.1: discovery, bulk
//! transfer, admission (swarm key, allowlist) and refusal of bad payloads.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use murmur_proto::wire::v1::{PayloadHeader, PayloadKind};
use tokio::sync::mpsc;

use super::encoding::Encoding;
use super::security::Security;
use super::service::{NetConfig, NetEvent, Network};
use super::wire;

const RUN: &str = "test-run";
const FP: &str = "fp";

fn config(elements: usize) -> NetConfig {
    let mut cfg = NetConfig::new(RUN, FP, elements);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.swarm.quic = false;
    cfg.heartbeat_every = Duration::from_millis(200);
    // These tests are about the wire; the one below is about membership.
    cfg.swarm.inbound.members_only = false;
    cfg
}

async fn start(cfg: NetConfig) -> (Network, mpsc::Receiver<NetEvent>) {
    Network::start(Keypair::generate_ed25519(), cfg).await.unwrap()
}

/// `addr/p2p/peer` of a started network, for bootstrapping.
fn dial_addr(n: &Network) -> Multiaddr {
    let addr = n.view().listen_addrs[0].clone();
    addr.with(libp2p::multiaddr::Protocol::P2p(n.local_peer))
}

/// A peer whose heartbeats are for another run: connected, never a member
/// of `RUN`. (Slow heartbeats no longer make one: a node greets every new
/// subscriber to its run's topic with an early heartbeat.)
fn stranger(elements: usize) -> NetConfig {
    let mut cfg = config(elements);
    cfg.swarm.run_id = "another-run".into();
    cfg
}

/// A node started with `cfg`, bootstrapped from `a`, once `a` sees it connected.
async fn connected_to(a: &Network, mut cfg: NetConfig) -> (Network, mpsc::Receiver<NetEvent>) {
    cfg.bootstrap = vec![dial_addr(a)];
    let (b, brx) = start(cfg).await;
    wait_until("b to connect", Duration::from_secs(20), || {
        a.view().connected.contains(&b.local_peer)
    })
    .await;
    (b, brx)
}

/// Waits until `a` and `b` each count the other a member.
async fn each_a_member_of_the_other(a: &Network, b: &Network, deadline: Duration) {
    let member =
        |n: &Network, of: &Network| n.view().members.iter().any(|m| m.peer == of.local_peer);
    wait_until("each to count the other a member", deadline, || member(a, b) && member(b, a)).await;
}

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header(from: &Network, values: &[f32], enc: Encoding) -> (PayloadHeader, Bytes) {
    let (h, body) = wire::encode_payload(
        wire::build_header(RUN, FP, from.sender_bytes(), PayloadKind::Params, 1),
        values,
        enc,
    );
    (h, Bytes::from(body))
}

async fn next_payload(rx: &mut mpsc::Receiver<NetEvent>) -> (PeerId, wire::Payload) {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(NetEvent::Payload { from, payload })) => return (from, payload),
            Ok(Some(_)) => continue,
            other => panic!("no payload arrived: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_find_each_other_through_one_bootstrap_node() {
    let (boot, _boot_rx) = start(config(4)).await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut cfg = config(4);
        cfg.bootstrap = vec![dial_addr(&boot)];
        nodes.push(start(cfg).await);
    }
    for (n, _) in &nodes {
        wait_until("every node to see the 3 others as members", Duration::from_secs(20), || {
            n.view().members.len() == 3
        })
        .await;
    }
    // Two nodes that only knew the bootstrap node talk directly.
    let (b, mut brx) = nodes.pop().unwrap();
    let a = &nodes[0].0;
    let values = [1.0f32, 2.0, 3.0, 4.0];
    let (h, body) = header(a, &values, Encoding::F32);
    a.send(b.local_peer, &h, &body).await.unwrap();
    let (from, payload) = next_payload(&mut brx).await;
    assert_eq!(from, a.local_peer);
    assert_eq!(payload.values, values);
    let counted = b.accounting().per_peer[&a.local_peer.to_base58()]["params"];
    assert_eq!(counted.bytes_received, wire::frame_len(&h) as u64);
    assert_eq!(counted.messages_received, 1);
    let sent = a.accounting().per_peer[&b.local_peer.to_base58()]["params"];
    assert_eq!(sent.bytes_sent, counted.bytes_received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_payload_arrives_bit_exact() {
    let n = 25 * 1024 * 1024;
    let (a, mut arx) = start(config(n)).await;
    let mut cfg = config(n);
    cfg.bootstrap = vec![dial_addr(&a)];
    let (b, _brx) = start(cfg).await;
    // Values with every bit pattern class: signs, tiny and huge exponents.
    let values: Vec<f32> = (0..n as u32)
        .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) & 0xbfff_ffff).min(1e30))
        .collect();
    let (h, body) = header(&b, &values, Encoding::F32);
    assert_eq!(body.len(), 100 * 1024 * 1024);
    b.send(a.local_peer, &h, &body).await.unwrap();
    drop(body);
    let (_, payload) = next_payload(&mut arx).await;
    assert_eq!(payload.values.len(), n);
    assert!(payload.values.iter().zip(&values).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_fault_loses_payloads_to_connected_peers_and_counts_only_those() {
    let (a, mut arx) = start(config(4)).await;
    let mut cfg = config(4);
    let faults = std::sync::Arc::new(crate::fault::Faults::new(0));
    faults.inject("drop:1:out".parse().unwrap(), Instant::now()).unwrap();
    cfg.faults = faults.clone();
    cfg.transfer_timeout = Duration::from_secs(5);
    let (b, _brx) = connected_to(&a, cfg).await;
    wait_until("b to see a", Duration::from_secs(20), || {
        b.view().connected.contains(&a.local_peer)
    })
    .await;
    let (h, body) = header(&b, &[1.0, 2.0, 3.0, 4.0], Encoding::F32);
    // Lost on the way: the sender believes it went, nothing arrives.
    b.send(a.local_peer, &h, &body).await.unwrap();
    let arrived = tokio::time::timeout(Duration::from_millis(500), next_payload(&mut arx)).await;
    assert!(arrived.is_err(), "a dropped payload arrived");
    assert_eq!(faults.effects()["dropped_out"], 1);
    // A peer with no connection fails the send as without the fault, and
    // is not counted (a retry of it would count again).
    let nobody = PeerId::random();
    assert!(b.send(nobody, &h, &body).await.is_err());
    assert_eq!(faults.effects()["dropped_out"], 1);
}

/// A node that speaks only `offered`, bootstrapped from `boot`.
async fn start_speaking(
    offered: &[Security],
    boot: &Network,
) -> (Network, mpsc::Receiver<NetEvent>) {
    let mut cfg = config(4);
    cfg.swarm.security = offered.to_vec();
    cfg.bootstrap = vec![dial_addr(boot)];
    start(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_noise_peers_connect_through_what_they_share() {
    use Security::{Noise, Tls};
    // The default node offers TLS then Noise; each single-handshake peer
    // connects through the one it speaks and a payload crosses.
    let (both, mut both_rx) = start(config(4)).await;
    let (tls_only, _t) = start_speaking(&[Tls], &both).await;
    let (noise_only, _n) = start_speaking(&[Noise], &both).await;
    for peer in [&tls_only, &noise_only] {
        let values = [0.5f32, -1.0, 2.0, 8.0];
        let (h, body) = header(peer, &values, Encoding::F32);
        peer.send(both.local_peer, &h, &body).await.unwrap();
        let (from, payload) = next_payload(&mut both_rx).await;
        assert_eq!((from, payload.values.as_slice()), (peer.local_peer, &values[..]));
    }
    // With nothing in common the handshake fails and is counted.
    let (stranger, _s) = start_speaking(&[Tls], &noise_only).await;
    wait_until("the TLS-only dial of a Noise-only node to fail", Duration::from_secs(20), || {
        noise_only.accounting().refusals("handshake_failed") >= 1
    })
    .await;
    assert!(!noise_only.view().connected.contains(&stranger.local_peer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_the_wrong_peer_id_is_dropped_after_the_tls_handshake() {
    // The address is right, the peer id is someone else's: the certificate
    // names the real peer, and the swarm refuses the connection.
    let (a, _arx) = start(config(4)).await;
    let impostor = PeerId::from(Keypair::generate_ed25519().public());
    let addr = a.view().listen_addrs[0].clone().with(libp2p::multiaddr::Protocol::P2p(impostor));
    let mut cfg = config(4);
    cfg.swarm.security = vec![Security::Tls];
    cfg.bootstrap = vec![addr];
    let (b, _brx) = start(cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(b.view().connected.is_empty(), "connected to {:?}", b.view().connected);
    assert!(a.view().members.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_peer_is_a_member_long_before_the_next_regular_heartbeat() {
    // Heartbeats once an hour: only the greeting of a new subscriber to the
    // run's topic can make either node the other's member in time.
    let mut slow = config(4);
    slow.heartbeat_every = Duration::from_secs(3600);
    let (a, _arx) = start(slow.clone()).await;
    let (b, _brx) = connected_to(&a, slow).await;
    each_a_member_of_the_other(&a, &b, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_is_dropped_by_its_peers_long_before_the_expiry() {
    let (a, mut arx) = start(config(4)).await;
    let (b, _brx) = connected_to(&a, config(4)).await;
    each_a_member_of_the_other(&a, &b, Duration::from_secs(10)).await;
    let left = Instant::now();
    b.leave().await;
    // Still connected, still heartbeating: only its goodbye can do this
    // inside the 10 s expiry.
    let gone = |a: &Network| !a.view().members.iter().any(|m| m.peer == b.local_peer);
    wait_until("a to drop b", Duration::from_secs(3), || gone(&a)).await;
    assert!(a.view().connected.contains(&b.local_peer));
    let said = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match arx.recv().await {
                Some(NetEvent::MemberLeft(p)) => break p,
                Some(_) => continue,
                None => panic!("a's events ended"),
            }
        }
    })
    .await
    .expect("a MemberLeft event");
    assert_eq!(said, b.local_peer);
    // Its later heartbeats say the same: it stays out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(gone(&a), "b came back {:?} after leaving", left.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_to_a_port_nobody_listens_on_counts_as_unreachable() {
    // A peer that has left: its port refuses the connection. That is no
    // handshake failure (which would point at a key or a security mismatch).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gone = PeerId::from(Keypair::generate_ed25519().public());
    let mut cfg = config(4);
    cfg.bootstrap = vec![format!("/ip4/127.0.0.1/tcp/{port}/p2p/{gone}").parse().unwrap()];
    let (b, _brx) = start(cfg).await;
    wait_until("the dial to fail", Duration::from_secs(20), || {
        let r = b.accounting();
        r.refusals("dial_unreachable") + r.refusals("dial_handshake_failed") >= 1
    })
    .await;
    assert_eq!(b.accounting().refusals("dial_handshake_failed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_swarm_key_cannot_connect() {
    let key = |b: u8| PreSharedKey::new([b; 32]);
    let mut cfg = config(4);
    cfg.swarm.swarm_key = Some(key(1));
    let (a, _arx) = start(cfg).await;
    let mut good = config(4);
    good.swarm.swarm_key = Some(key(1));
    good.bootstrap = vec![dial_addr(&a)];
    let (g, _grx) = start(good).await;
    let mut bad = config(4);
    bad.swarm.swarm_key = Some(key(2));
    bad.bootstrap = vec![dial_addr(&a)];
    let (x, _xrx) = start(bad).await;
    wait_until("the keyed peer to join", Duration::from_secs(20), || a.view().members.len() == 1)
        .await;
    wait_until("the wrong key to be refused", Duration::from_secs(20), || {
        a.accounting().refusals("handshake_failed") >= 1
    })
    .await;
    assert!(!a.view().connected.contains(&x.local_peer));
    assert!(a.view().members.iter().all(|m| m.peer == g.local_peer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_outside_the_allowlist_is_refused() {
    let friend = Keypair::generate_ed25519();
    let mut cfg = config(4);
    cfg.swarm.allowlist = Some(vec![friend.public().to_peer_id()]);
    let (a, _arx) = start(cfg).await;
    let mut fcfg = config(4);
    fcfg.bootstrap = vec![dial_addr(&a)];
    let (f, _frx) = Network::start(friend, fcfg).await.unwrap();
    let mut scfg = config(4);
    scfg.bootstrap = vec![dial_addr(&a)];
    let (stranger, _srx) = start(scfg).await;
    wait_until("the friend to join", Duration::from_secs(20), || a.view().members.len() == 1).await;
    wait_until("the stranger to be refused", Duration::from_secs(20), || {
        a.accounting().refusals("peer_not_allowed") >= 1
    })
    .await;
    assert!(a.view().connected.contains(&f.local_peer));
    assert!(!a.view().connected.contains(&stranger.local_peer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_refused_with_their_reason_and_good_ones_still_arrive() {
    let (a, mut arx) = start(config(8)).await;
    let (b, _brx) = connected_to(&a, config(8)).await;
    let good = [0.5f32; 8];
    let (h, body) = header(&b, &good, Encoding::F32);
    let mut cases: Vec<(&str, PayloadHeader, Bytes)> = Vec::new();
    let mut x = h.clone();
    x.run_id = "other-run".into();
    cases.push(("wrong_run", x, body.clone()));
    let mut x = h.clone();
    x.fingerprint = "other".into();
    cases.push(("wrong_fingerprint", x, body.clone()));
    let (x, xb) = header(&b, &[0.5f32; 9], Encoding::F32);
    cases.push(("wrong_length", x, xb));
    let (x, xb) = header(&b, &[f32::NAN; 8], Encoding::F32);
    cases.push(("non_finite", x, xb));
    let mut xb = body.to_vec();
    xb[3] ^= 0x40;
    cases.push(("bad_checksum", h.clone(), Bytes::from(xb)));
    let mut x = h.clone();
    x.encoding = 99;
    cases.push(("unknown_encoding", x, body.clone()));
    for (reason, hdr, bytes) in &cases {
        let err = b.send(a.local_peer, hdr, bytes).await.unwrap_err();
        assert!(err.to_string().contains("refused"), "{reason}: {err}");
        assert_eq!(
            a.accounting().refusals(reason),
            1,
            "{reason} not counted: {:?}",
            a.accounting().refusals
        );
    }
    // A header length prefix far beyond the bound, with nothing behind it.
    let mut raw = b.open_raw(a.local_peer).await.unwrap();
    raw.write_all(&(1u32 << 30).to_le_bytes()).await.unwrap();
    raw.flush().await.unwrap();
    wait_until("oversize header refusal", Duration::from_secs(10), || {
        a.accounting().refusals("oversize_header") == 1
    })
    .await;
    b.send(a.local_peer, &h, &body).await.unwrap();
    let (_, payload) = next_payload(&mut arx).await;
    assert_eq!(payload.values, good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_also_travel_over_quic() {
    let quic = |cfg: &mut NetConfig| {
        cfg.swarm.quic = true;
        cfg.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    };
    let mut acfg = config(1024);
    acfg.expect.encoding = Encoding::Bf16;
    quic(&mut acfg);
    let (a, mut arx) = start(acfg).await;
    assert!(a.view().listen_addrs[0].to_string().contains("quic-v1"));
    let mut bcfg = config(1024);
    quic(&mut bcfg);
    bcfg.bootstrap = vec![dial_addr(&a)];
    let (b, _brx) = start(bcfg).await;
    let values: Vec<f32> = (0..1024).map(|i| (i % 256) as f32 * 0.25).collect();
    let (h, body) = header(&b, &values, Encoding::Bf16);
    b.send(a.local_peer, &h, &body).await.unwrap();
    let (_, payload) = next_payload(&mut arx).await;
    // Multiples of 0.25 below 64 need at most 8 significant bits: exact in bf16.
    assert_eq!(payload.values, values);
}

/// `send` hands the body to the network thread in pieces: a sender that
/// stops waiting midway must reset its stream (the receiver refuses the
/// stub and is not left reading) and leave the connection fit for the next
/// payload, from a current-thread caller as well.
#[tokio::test(flavor = "current_thread")]
async fn a_send_abandoned_midway_is_refused_and_the_next_one_arrives() {
    let n = 16 * 1024 * 1024;
    let (a, mut arx) = start(config(n)).await;
    // Paced to 500 MB/s, 64 MiB takes about 130 ms whatever the machine;
    // the first bytes arrive well within 30 ms.
    let cfg = config(n);
    let cap = cfg.faults.inject("bandwidth:500MB/s".parse().unwrap(), Instant::now()).unwrap();
    let faults = cfg.faults.clone();
    let (b, _brx) = connected_to(&a, cfg).await;
    let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let (h, body) = header(&b, &values, Encoding::F32);
    let abandoned =
        tokio::time::timeout(Duration::from_millis(30), b.send(a.local_peer, &h, &body));
    assert!(abandoned.await.is_err(), "64 MiB arrived within 30 ms");
    faults.clear(&[cap.id]);
    wait_until("the stub to be refused", Duration::from_secs(20), || {
        let acc = a.accounting();
        acc.refusals("truncated") + acc.refusals("io") == 1
    })
    .await;
    b.send(a.local_peer, &h, &body).await.unwrap();
    let (from, payload) = next_payload(&mut arx).await;
    assert_eq!(from, b.local_peer);
    assert!(payload.values == values);
    let mut bad = h.clone();
    bad.body_len += 1;
    let err = b.send(a.local_peer, &bad, &body).await.unwrap_err();
    assert!(err.to_string().contains("body_len"), "{err}");
}

/// A ring's or an all-reduce's fan-in: many streams open at once, from
/// several peers and several per peer. Each arrives on its first attempt
/// (libp2p-stream's one-slot inbound channel used to drop all but one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_from_many_peers_all_arrive_at_once() {
    let (a, mut arx) = start(config(1024)).await;
    let mut senders = Vec::new();
    for _ in 0..4 {
        let mut cfg = config(1024);
        cfg.bootstrap = vec![dial_addr(&a)];
        senders.push(start(cfg).await);
    }
    wait_until("4 peers to connect", Duration::from_secs(20), || a.view().connected.len() == 4)
        .await;
    let sends = senders.iter().flat_map(|(s, _)| {
        (0..8).map(move |k| {
            let values = vec![k as f32; 1024];
            let (h, body) = header(s, &values, Encoding::F32);
            async move { s.send(a.local_peer, &h, &body).await }
        })
    });
    let results = futures::future::join_all(sends).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let mut got = std::collections::BTreeMap::<PeerId, usize>::new();
    for _ in 0..32 {
        *got.entry(next_payload(&mut arx).await.0).or_default() += 1;
    }
    assert!(got.values().all(|&n| n == 8), "{got:?}");
    assert_eq!(a.accounting().refusals(super::admission::QUEUE_FULL), 0);
}

/// A hostile peer that opens a stream and goes silent must not hold one of
/// the node's few read permits for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_is_timed_out_and_frees_its_read() {
    let mut cfg = config(8);
    cfg.transfer_timeout = Duration::from_millis(500);
    cfg.max_inbound_reads = 1;
    let (a, mut arx) = start(cfg).await;
    let (b, _brx) = connected_to(&a, config(8)).await;
    let mut stalled = b.open_raw(a.local_peer).await.unwrap();
    stalled.write_all(&[1, 0]).await.unwrap();
    stalled.flush().await.unwrap();
    wait_until("the stall to time out", Duration::from_secs(10), || {
        a.accounting().refusals("timed_out") == 1
    })
    .await;
    // With one read permit, this payload passes only because the stall let go of it.
    let (h, body) = header(&b, &[0.5f32; 8], Encoding::F32);
    b.send(a.local_peer, &h, &body).await.unwrap();
    assert_eq!(next_payload(&mut arx).await.1.values, [0.5f32; 8]);
    drop(stalled);
}

/// A node of a run reads payloads only from its members: a connected peer
/// that has not announced itself is refused before its body is read, and
/// the same peer is read once its heartbeats make it a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_from_a_peer_that_is_not_a_member_are_refused_unread() {
    let mut acfg = config(64);
    acfg.swarm.inbound.members_only = true;
    // B announces itself in another run only: it is never A's member.
    let (a, mut arx) = start(acfg).await;
    let (b, _brx) = connected_to(&a, stranger(64)).await;
    let values = vec![1.0f32; 64];
    let (h, body) = header(&b, &values, Encoding::F32);
    let err = b.send(a.local_peer, &h, &body).await.unwrap_err();
    assert!(matches!(err, super::service::SendError::NotAMember { .. }), "{err}");
    assert_eq!(a.accounting().refusals(super::admission::NOT_A_MEMBER), 1);
    assert!(a.view().members.is_empty());
    while let Ok(ev) = arx.try_recv() {
        assert!(!matches!(ev, NetEvent::Payload { .. }), "nothing from a stranger: {ev:?}");
    }
    // A peer whose heartbeats arrive is a member, and is read.
    let (c, _crx) = connected_to(&a, config(64)).await;
    wait_until("c to become a member", Duration::from_secs(20), || {
        a.view().members.iter().any(|m| m.peer == c.local_peer)
    })
    .await;
    let (h, body) = header(&c, &values, Encoding::F32);
    c.send(a.local_peer, &h, &body).await.unwrap();
    let (from, payload) = next_payload(&mut arx).await;
    assert_eq!((from, payload.values), (c.local_peer, values));
}

/// A refusal reaches the sender while it is still writing: a payload larger
/// than a stream's window (256 KiB) used to wait for credit the refusing
/// receiver never gave, until the transfer timed out (and a gossip ring
/// with it, for every round the sender was not yet a member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payload_from_a_non_member_is_refused_while_it_is_written() {
    const ELEMENTS: usize = 200_000;
    let mut acfg = config(ELEMENTS);
    acfg.swarm.inbound.members_only = true;
    let (a, _arx) = start(acfg).await;
    let (b, _brx) = connected_to(&a, stranger(ELEMENTS)).await;
    let (h, body) = header(&b, &vec![1.0f32; ELEMENTS], Encoding::F32);
    let started = Instant::now();
    let err = b.send(a.local_peer, &h, &body).await.unwrap_err();
    assert!(matches!(err, super::service::SendError::NotAMember { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "refused after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_by_name_without_a_peer_id_is_dialled_and_its_peer_learned() {
    let (a, _arx) = start(config(4)).await;
    let port = a.view().listen_addrs[0]
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    let by_name: Multiaddr = format!("/dns4/localhost/tcp/{port}").parse().unwrap();
    let mut cfg = config(4);
    cfg.bootstrap = vec![by_name.clone()];
    let (b, _brx) = start(cfg).await;
    wait_until("b to learn who answers by name", Duration::from_secs(20), || {
        b.peer_at(&by_name).is_some()
    })
    .await;
    assert_eq!(b.peer_at(&by_name), Some(a.local_peer));
    assert!(b.view().connected.contains(&a.local_peer));
    // Membership follows as with a peer id.
    each_a_member_of_the_other(&a, &b, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_by_name_is_still_held_to_the_allowlist() {
    let (a, _arx) = start(config(4)).await;
    let port = a.view().listen_addrs[0].to_string().rsplit('/').next().unwrap().to_string();
    let by_name: Multiaddr = format!("/dns4/localhost/tcp/{port}").parse().unwrap();
    let mut cfg = config(4);
    cfg.bootstrap = vec![by_name.clone()];
    // Someone else is the only peer allowed: whoever answers is refused.
    cfg.swarm.allowlist = Some(vec![PeerId::from(Keypair::generate_ed25519().public())]);
    let (b, _brx) = start(cfg).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b.peer_at(&by_name), None);
    assert!(!b.view().connected.contains(&a.local_peer));
}

/// What a bare peer saw of its connection to the node while it published
/// heartbeats for `watch`.
#[derive(Debug, Default)]
struct BarePeerSaw {
    /// The node counted it a member.
    member: bool,
    /// Its last connection to the node closed.
    closed: bool,
    /// The node dialled it again after that.
    dialled_back: bool,
}

/// A bare libp2p peer (TCP, Noise, Yamux, gossipsub) that dials `a` and
/// publishes valid heartbeats of `RUN`, subscribed to the run's topic or
/// not. Unsubscribed, the node hears it but gossip lists no subscription
/// of it: the state of a member whose subscription message was lost.
async fn bare_peer(a: &Network, subscribe: bool, watch: Duration) -> BarePeerSaw {
    use libp2p::swarm::SwarmEvent;
    use libp2p::{gossipsub, noise, tcp, yamux};
    use prost::Message;
    let key = Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    let cfg = gossipsub::ConfigBuilder::default().build().unwrap();
    let gossip: gossipsub::Behaviour =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), cfg)
            .unwrap();
    let mut x = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| gossip)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let topic = super::swarm::members_topic(RUN);
    if subscribe {
        x.behaviour_mut().subscribe(&topic).unwrap();
    }
    x.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
    x.dial(dial_addr(a)).unwrap();
    let mut saw = BarePeerSaw::default();
    let mut beat = tokio::time::interval(Duration::from_millis(200));
    let mut seq = 0;
    let end = tokio::time::sleep(watch);
    tokio::pin!(end);
    while !saw.dialled_back {
        tokio::select! {
            ev = futures::StreamExt::select_next_some(&mut x) => match ev {
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. }
                    if peer_id == a.local_peer => saw.closed = true,
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. }
                    if peer_id == a.local_peer && saw.closed && endpoint.is_listener() =>
                {
                    saw.dialled_back = true
                }
                _ => {}
            },
            _ = beat.tick() => {
                seq += 1;
                let hb = murmur_proto::wire::v1::Heartbeat {
                    run_id: RUN.into(),
                    peer_id: me.to_bytes(),
                    addrs: x.listeners().map(ToString::to_string).collect(),
                    role: "node".into(),
                    fingerprint: FP.into(),
                    seq,
                    elements: 4,
                    ..Default::default()
                };
                let _ = x.behaviour_mut().publish(topic.clone(), hb.encode_to_vec());
                saw.member |= a.view().members.iter().any(|m| m.peer == me);
            }
            _ = &mut end => break,
        }
    }
    saw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_gossip_does_not_list_on_the_topic_is_reconnected() {
    let (a, _arx) = start(config(4)).await;
    // Subscribed, as every murmur node is: heard and reached, left alone
    // for many times the three beats (200 ms here) a reset waits.
    let saw = bare_peer(&a, true, Duration::from_secs(3)).await;
    assert!(saw.member && !saw.closed, "{saw:?}");
    // Not subscribed: heard, but this node's heartbeats never go to it.
    // The node closes the connection and dials it again.
    let saw = bare_peer(&a, false, Duration::from_secs(15)).await;
    assert!(saw.member && saw.closed && saw.dialled_back, "{saw:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_nobodys_member_until_it_announces_itself() {
    let (a, _arx) = start(config(4)).await;
    let mut quiet = config(4);
    quiet.silent = true;
    let (b, _brx) = connected_to(&a, quiet).await;
    let member_of_a = || a.view().members.iter().any(|m| m.peer == b.local_peer);
    // Connected, and hearing a's heartbeats, but five of its own beats
    // (200 ms here) pass without one going out.
    wait_until("b to hear a", Duration::from_secs(5), || {
        b.view().members.iter().any(|m| m.peer == a.local_peer)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!member_of_a(), "a counts b before b announced itself");
    b.announce().await;
    wait_until("a to count b once announced", Duration::from_secs(2), member_of_a).await;
}
