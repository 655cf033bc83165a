//! Inbound `/murmur/params/1` streams, queued.
//!
//! libp2p-stream hands inbound streams to the application through a channel
//! with a single slot and silently drops a second stream that arrives while
//! the first is still in it (rust-libp2p #5651). A ring's fan-in hits that
//! every round. This behaviour only listens for the params protocol (outbound
//! streams still open through libp2p-stream) and puts every inbound stream
//! into a queue, each with a ticket from `admission` (per-peer and node-wide
//! caps, a reserve for members). A stream that gets no ticket is dropped,
//! which resets it for the sender, and counted by reason: that takes a
//! flood of streams, not a busy round.
//!
//! This module owns no reading: `service` takes streams off the queue and
//! reads them.

use std::convert::Infallible;
use std::sync::Arc;
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
use super::admission::{Admission, Ticket};

/// A stream some peer opened, who, and its share of the capacity.
pub type InboundStream = (PeerId, Stream, Ticket);

/// Listens for one protocol and queues every inbound stream of it.
pub struct Behaviour {
    protocol: StreamProtocol,
    queue: mpsc::Sender<InboundStream>,
    accounting: Accounting,
    admission: Arc<Admission>,
}

impl Behaviour {
    /// The behaviour and the receiving end of its queue; streams without a
    /// ticket from `admission` are counted in `accounting` by reason.
    pub fn new(
        protocol: StreamProtocol,
        admission: Arc<Admission>,
        accounting: Accounting,
    ) -> (Behaviour, mpsc::Receiver<InboundStream>) {
        // Every queued stream holds a ticket, so the queue never holds more.
        let (queue, rx) = mpsc::channel(admission.limits().queue.max(1));
        (Behaviour { protocol, queue, accounting, admission }, rx)
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            protocol: self.protocol.clone(),
            queue: self.queue.clone(),
            accounting: self.accounting.clone(),
            admission: self.admission.clone(),
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
    admission: Arc<Admission>,
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
        let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: stream,
            ..
        }) = event
        else {
            return;
        };
        // Dropping a stream resets it for the sender.
        match self.admission.admit(self.peer) {
            Ok(ticket) => {
                // Only fails while the node shuts down.
                let _ = self.queue.try_send((self.peer, stream, ticket));
            }
            Err(reason) => self.accounting.refuse(reason),
        }
    }
}
