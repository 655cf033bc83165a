//! Connection slots kept for members and bootstrap peers.
//!
//! `connection_limits` caps established connections (512) but treats every
//! peer alike, so strangers opening connections could take every slot and
//! lock the run's own members out. This behaviour turns away a new inbound
//! connection from a peer that is neither a member nor a bootstrap peer once
//! `max - reserved` connections are established: the last `reserved` slots
//! are for the run. Outbound dials are this node's own choice and are not
//! limited here.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

use super::admission::Admission;

/// Why a connection was turned away.
#[derive(Debug, thiserror::Error)]
#[error("{established} connections: the remaining slots are kept for members and bootstrap peers")]
pub struct ReservedForMembers {
    pub established: usize,
}

pub struct Behaviour {
    max: usize,
    reserved: usize,
    established: usize,
    /// Whose connections always fit: the run's members (the admission's
    /// member set) and the bootstrap peers.
    members: Arc<Admission>,
    bootstrap: HashSet<PeerId>,
}

impl Behaviour {
    pub fn new(
        max: usize,
        reserved: usize,
        members: Arc<Admission>,
        bootstrap: HashSet<PeerId>,
    ) -> Behaviour {
        Behaviour { max, reserved, established: 0, members, bootstrap }
    }

    /// Whether an inbound connection from `peer` may be established now.
    pub fn admits(&self, peer: &PeerId) -> Result<(), ReservedForMembers> {
        let trusted = self.bootstrap.contains(peer) || self.members.is_member(peer);
        if trusted || self.established < self.max.saturating_sub(self.reserved) {
            Ok(())
        } else {
            Err(ReservedForMembers { established: self.established })
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.admits(&peer).map_err(ConnectionDenied::new)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    /// Counted from the swarm's events: a connection another behaviour
    /// denied was never established.
    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(_) => self.established += 1,
            FromSwarm::ConnectionClosed(ConnectionClosed { .. }) => {
                self.established = self.established.saturating_sub(1);
            }
            _ => {}
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::admission::AdmissionLimits;

    #[test]
    fn the_last_slots_are_for_members_and_bootstrap_peers() {
        let admission = Admission::new(AdmissionLimits::default());
        let (member, boot, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        admission.set_members([member]);
        let mut b = Behaviour::new(4, 2, admission, HashSet::from([boot]));
        assert!(b.admits(&stranger).is_ok());
        b.established = 2;
        let refusal = b.admits(&stranger).unwrap_err();
        assert_eq!(refusal.established, 2);
        assert!(b.admits(&member).is_ok() && b.admits(&boot).is_ok());
    }
}
