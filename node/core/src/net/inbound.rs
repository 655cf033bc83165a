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
//! flood of streams, not a busy round. A peer that floods anyway is cut off
//! (`admission`'s `stream_flood`): this behaviour closes its connections
//! and denies new ones until its cooldown ends.
//!
//! This module owns no reading: `service` takes streams off the queue and
//! reads them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::accounting::Accounting;
use super::admission::{self, Admission, Ticket};

/// A stream some peer opened, who, and its share of the capacity.
pub type InboundStream = (PeerId, Stream, Ticket);

/// Listens for one protocol and queues every inbound stream of it.
pub struct Behaviour {
    protocol: StreamProtocol,
    queue: mpsc::Sender<InboundStream>,
    accounting: Accounting,
    admission: Arc<Admission>,
    /// Peers cut off whose connections are still to be closed.
    closing: VecDeque<PeerId>,
    waker: Option<Waker>,
}

/// Why a connection from a cut-off peer was denied.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} is cut off for flooding the node with streams")]
pub struct CutOff(PeerId);

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
        let b = Behaviour {
            protocol,
            queue,
            accounting,
            admission,
            closing: VecDeque::new(),
            waker: None,
        };
        (b, rx)
    }

    fn handler(&self, peer: PeerId) -> Result<Handler, ConnectionDenied> {
        if self.admission.cut_off(&peer) {
            self.accounting.refuse(admission::FLOODING);
            return Err(ConnectionDenied::new(CutOff(peer)));
        }
        Ok(Handler {
            peer,
            protocol: self.protocol.clone(),
            queue: self.queue.clone(),
            accounting: self.accounting.clone(),
            admission: self.admission.clone(),
            cut_off: false,
        })
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
        self.handler(peer)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.handler(peer)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        _cut_off: THandlerOutEvent<Self>,
    ) {
        if !self.closing.contains(&peer) {
            self.closing.push_back(peer);
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        match self.closing.pop_front() {
            Some(peer_id) => {
                Poll::Ready(ToSwarm::CloseConnection { peer_id, connection: CloseConnection::All })
            }
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// What a handler tells its behaviour: its peer was cut off.
#[derive(Debug)]
pub struct CutOffNow;

/// One connection's end: hands each negotiated inbound stream to the queue.
pub struct Handler {
    peer: PeerId,
    protocol: StreamProtocol,
    queue: mpsc::Sender<InboundStream>,
    accounting: Accounting,
    admission: Arc<Admission>,
    /// Set when this peer was cut off; told to the behaviour once.
    cut_off: bool,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = CutOffNow;
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
        if std::mem::take(&mut self.cut_off) {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(CutOffNow));
        }
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
            Err(reason) => {
                self.accounting.refuse(reason);
                self.cut_off |= reason == admission::FLOODING;
            }
        }
    }
}
