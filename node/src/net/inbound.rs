//! Inbound `/murmur/params/1` streams, queued.
//!
//! libp2p-stream hands inbound streams to the application through a channel
//! with a single slot and silently drops a second stream that arrives while
//! the first is still in it (rust-libp2p #5651). A ring's fan-in hits that
//! every round. This behaviour only listens for the params protocol (outbound
//! streams still open through libp2p-stream) and puts every inbound stream
//! into a bounded queue of `capacity` streams, shared by all connections.
//! A stream that finds the queue full is dropped, which resets it for the
//! sender, and counted: that takes a flood of streams, not a busy round.
//!
//! This module owns no reading: `service` takes streams off the queue and
//! reads them.

use std::convert::Infallible;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::accounting::Accounting;

/// The refusal counted for a stream that found the queue full.
pub const QUEUE_FULL: &str = "inbound_queue_full";

/// A stream some peer opened, and who.
pub type InboundStream = (PeerId, Stream);

/// Listens for one protocol and queues every inbound stream of it.
pub struct Behaviour {
    protocol: StreamProtocol,
    queue: mpsc::Sender<InboundStream>,
    accounting: Accounting,
}

impl Behaviour {
    /// The behaviour and the receiving end of its queue of `capacity`
    /// streams; overflows are counted in `accounting` as `QUEUE_FULL`.
    pub fn new(
        protocol: StreamProtocol,
        capacity: usize,
        accounting: Accounting,
    ) -> (Behaviour, mpsc::Receiver<InboundStream>) {
        let (queue, rx) = mpsc::channel(capacity.max(1));
        (Behaviour { protocol, queue, accounting }, rx)
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            protocol: self.protocol.clone(),
            queue: self.queue.clone(),
            accounting: self.accounting.clone(),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// One connection's end: hands each negotiated inbound stream to the queue.
pub struct Handler {
    peer: PeerId,
    protocol: StreamProtocol,
    queue: mpsc::Sender<InboundStream>,
    accounting: Accounting,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(self.protocol.clone()), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: stream,
            ..
        }) = event
            && self.queue.try_send((self.peer, stream)).is_err()
        {
            // Full (or the node is shutting down): dropping resets the stream.
            self.accounting.refuse(QUEUE_FULL);
        }
    }
}
