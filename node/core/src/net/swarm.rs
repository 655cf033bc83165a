//! The libp2p swarm: transports (TCP + TLS or Noise + Yamux, optionally
//! behind a pre-shared key; QUIC) and the composed behaviour (admission, limits,
//! identify, ping, Kademlia, mDNS, gossipsub, and the stream protocol that
//! carries `/murmur/params/1`: opened through libp2p-stream, accepted into
//! the queue of `inbound`).
//!
//! Every limit and timeout is set here from `SwarmSettings`, not left to a
//! library default by accident.

use std::sync::Arc;
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::kad::store::MemoryStore;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, Swarm, SwarmBuilder, Transport, allow_block_list, connection_limits,
    gossipsub, identify, kad, mdns, ping, quic, tcp, yamux,
};
use tokio::sync::mpsc;

use super::accounting::Accounting;
use super::admission::{Admission, AdmissionLimits};
use super::inbound::{self, InboundStream};
use super::reserve;
use super::security::{Security, SecurityError, SecurityUpgrade};
use super::wire;

/// Largest gossip message: heartbeats and announcements only.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// How the swarm is put together.
#[derive(Debug, Clone)]
pub struct SwarmSettings {
    pub run_id: String,
    /// Security handshakes TCP connections may use, preferred first.
    pub security: Vec<Security>,
    pub quic: bool,
    pub mdns: bool,
    pub swarm_key: Option<PreSharedKey>,
    /// When set, only these peers may connect.
    pub allowlist: Option<Vec<PeerId>>,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: u32,
    /// Of `max_connections`, the ones only members and `trusted` peers get.
    pub reserved_connections: u32,
    /// Peers whose connections always fit (the bootstrap peers).
    pub trusted: Vec<PeerId>,
    pub max_connections_per_peer: u32,
    pub max_pending: u32,
    pub gossip_heartbeat: Duration,
    /// Caps on inbound payload streams, over all peers and per peer.
    pub inbound: AdmissionLimits,
}

impl SwarmSettings {
    /// Settings for `run_id` with the defaults a node uses.
    pub fn for_run(run_id: &str) -> SwarmSettings {
        SwarmSettings {
            run_id: run_id.to_string(),
            security: Security::DEFAULT.to_vec(),
            quic: true,
            mdns: false,
            swarm_key: None,
            allowlist: None,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(20),
            max_connections: 512,
            reserved_connections: 64,
            trusted: Vec::new(),
            max_connections_per_peer: 2,
            max_pending: 64,
            gossip_heartbeat: Duration::from_millis(500),
            inbound: AdmissionLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    #[error("run id {0:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    BadRunId(String),
    #[error("security handshake set-up failed: {0}")]
    Security(#[from] SecurityError),
    #[error("gossipsub set-up failed: {0}")]
    Gossip(String),
    #[error("mDNS set-up failed: {0}")]
    Mdns(std::io::Error),
    #[error("swarm set-up failed: {0}")]
    Build(String),
}

/// murmur's behaviour: standard libp2p parts plus one stream protocol.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// Peers cut off by an injected partition fault.
    pub partition: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    /// The last connection slots, kept for members and bootstrap peers.
    pub reserve: reserve::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub stream: libp2p_stream::Behaviour,
    pub params_inbound: inbound::Behaviour,
}

/// Checks that a run id can scope protocol and topic names.
pub fn check_run_id(run_id: &str) -> Result<(), SwarmError> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 64
        && run_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(SwarmError::BadRunId(run_id.to_string())) }
}

/// The gossip topic for membership heartbeats of a run.
/// Gossipsub peer scoring for the members topic: a peer that relays
/// invalid heartbeats (P4, squared) falls below the graylist within a
/// handful and is ignored until its score decays. Delivery-rate and
/// IP-colocation penalties are off: heartbeats are one a second, and local
/// clusters share one address.
fn peer_scoring(run_id: &str) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 10.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.5,
        ..Default::default()
    };
    let mut params =
        gossipsub::PeerScoreParams { ip_colocation_factor_weight: 0.0, ..Default::default() };
    params.topics.insert(members_topic(run_id).hash(), topic);
    (params, gossipsub::PeerScoreThresholds::default())
}

/// The private swarm key in `path` (`--swarm-key`).
pub fn read_swarm_key(path: &std::path::Path) -> Result<libp2p::pnet::PreSharedKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --swarm-key {}: {e}", path.display()))?;
    text.parse().map_err(|e| {
        format!(
            "--swarm-key {} is not a swarm key file ({e}); make one with `murmur swarm-key FILE`",
            path.display()
        )
    })
}

/// The peer ids of `--allow-peer`.
pub fn parse_allowlist(list: &[String]) -> Result<Vec<PeerId>, String> {
    list.iter()
        .map(|p| {
            p.trim()
                .parse::<PeerId>()
                .map_err(|e| format!("--allow-peer {p:?} is not a peer id ({e})"))
        })
        .collect()
}

pub fn members_topic(run_id: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("murmur/{run_id}/members/1"))
}

/// Builds the swarm for `key` with `s`, and the queue its inbound payload
/// streams arrive on (overflows counted in `accounting`).
pub fn build(
    key: Keypair,
    s: &SwarmSettings,
    accounting: Accounting,
    admission: Arc<Admission>,
) -> Result<(Swarm<Behaviour>, mpsc::Receiver<InboundStream>), SwarmError> {
    check_run_id(&s.run_id)?;
    let transport = with_dns(&key, s)?;
    let reserve = reserve::Behaviour::new(
        s.max_connections as usize,
        s.reserved_connections as usize,
        admission.clone(),
        s.trusted.iter().copied().collect(),
    );
    let (params_inbound, queue) =
        inbound::Behaviour::new(StreamProtocol::new(wire::PROTOCOL), admission, accounting);
    let behaviour = behaviour(&key, s, params_inbound, reserve)?;
    let idle = s.idle_timeout;
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|_| transport)
        .map_err(|e| SwarmError::Build(e.to_string()))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| SwarmError::Build(e.to_string()))?
        // Every payload opens a stream. With multistream-select's plain V1
        // the opener waits for the listener to confirm the protocol before
        // its first byte: a round trip per payload, between two network
        // threads that each wait their turn on a busy machine. Lazy V1
        // sends the payload right behind the proposal; a peer that does not
        // speak the protocol still refuses it (the write or the verdict fails).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                .with_substream_upgrade_protocol_override(Version::V1Lazy)
        })
        .build();
    Ok((swarm, queue))
}

/// The transport behind the system's resolver, so that `/dns`, `/dns4` and
/// `/dns6` addresses dial (compose services, StatefulSet pods, hosts by
/// name), resolved again on every dial. Without a readable resolver
/// configuration (/etc/resolv.conf) names cannot dial and IPs still do.
///
/// The resolver keeps no answers: a service that starts after this node
/// has no name yet, and a cached "no such name" (about 30 s under podman's
/// DNS) made nodes that dialled their coordinator too early find it that
/// much later than a node started after it, which trained on alone.
fn with_dns(
    key: &Keypair,
    s: &SwarmSettings,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, SwarmError> {
    let system = hickory_resolver::system_conf::read_system_conf().map(|(cfg, mut opts)| {
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        (cfg, opts)
    });
    match system {
        Ok((cfg, opts)) => {
            Ok(libp2p::dns::tokio::Transport::custom(transport(key, s)?, cfg, opts).boxed())
        }
        Err(e) => {
            tracing::warn!("no DNS resolver ({e}): /dns addresses will not dial");
            transport(key, s)
        }
    }
}

fn transport(
    key: &Keypair,
    s: &SwarmSettings,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, SwarmError> {
    let tcp_base = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let secure = SecurityUpgrade::new(key, &s.security)?;
    let mut yamux = yamux::Config::default();
    yamux.set_max_num_streams(256);
    let tcp = match s.swarm_key {
        Some(psk) => tcp_base
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(secure)
            .multiplex(yamux)
            .timeout(s.handshake_timeout)
            .boxed(),
        None => tcp_base
            .upgrade(Version::V1Lazy)
            .authenticate(secure)
            .multiplex(yamux)
            .timeout(s.handshake_timeout)
            .boxed(),
    };
    // A pre-shared key protects TCP only; QUIC would let outsiders in.
    if !s.quic || s.swarm_key.is_some() {
        return Ok(tcp);
    }
    let quic = quic::tokio::Transport::new(quic::Config::new(key))
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
    Ok(OrTransport::new(quic, tcp)
        .map(|either, _| match either {
            futures::future::Either::Left(x) | futures::future::Either::Right(x) => x,
        })
        .boxed())
}

fn behaviour(
    key: &Keypair,
    s: &SwarmSettings,
    params_inbound: inbound::Behaviour,
    reserve: reserve::Behaviour,
) -> Result<Behaviour, SwarmError> {
    let peer = key.public().to_peer_id();
    let allow = s.allowlist.as_ref().map(|list| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        list.iter().for_each(|p| {
            b.allow_peer(*p);
        });
        // A node always admits itself (dialling its own address is refused elsewhere).
        b.allow_peer(peer);
        b
    });
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(s.max_connections))
        .with_max_established_per_peer(Some(s.max_connections_per_peer))
        .with_max_pending_incoming(Some(s.max_pending))
        .with_max_pending_outgoing(Some(s.max_pending));
    let identify = identify::Behaviour::new(
        identify::Config::new(format!("/murmur/1/{}", s.run_id), key.public())
            .with_agent_version(format!("murmur/{}", env!("CARGO_PKG_VERSION"))),
    );
    let kad_protocol = StreamProtocol::try_from_owned(format!("/murmur/{}/kad/1", s.run_id))
        .map_err(|_| SwarmError::BadRunId(s.run_id.clone()))?;
    let mut kad_cfg = kad::Config::new(kad_protocol);
    kad_cfg.set_query_timeout(Duration::from_secs(30));
    let mut kad = kad::Behaviour::with_config(peer, MemoryStore::new(peer), kad_cfg);
    // Serve the DHT even without a confirmed external address (LANs, loopback).
    kad.set_mode(Some(kad::Mode::Server));
    let mdns = match s.mdns {
        true => Some(
            mdns::tokio::Behaviour::new(mdns::Config::default(), peer).map_err(SwarmError::Mdns)?,
        ),
        false => None,
    };
    // Every heartbeat waits for the node's verdict (membership checks)
    // before gossip relays it.
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(s.gossip_heartbeat)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .build()
        .map_err(|e| SwarmError::Gossip(e.to_string()))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg)
            .map_err(|e| SwarmError::Gossip(e.to_string()))?;
    let (params, thresholds) = peer_scoring(&s.run_id);
    gossipsub.with_peer_score(params, thresholds).map_err(SwarmError::Gossip)?;
    Ok(Behaviour {
        allow: allow.into(),
        partition: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        reserve,
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
        kad,
        mdns: mdns.into(),
        gossipsub,
        stream: libp2p_stream::Behaviour::new(),
        params_inbound,
    })
}
