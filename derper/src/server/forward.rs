//! Forwarding: where the registry sends packets for keys that live on another relay (spec
//! §6.10). The registry stores [`Forwarder`]s; the mesh ([`crate::mesh`]) creates one per
//! outbound peer connection and drains its queue. Defined here, below the registry, so
//! that the registry never depends on the mesh.

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::key::NodePublicKey;

/// A packet waiting to be forwarded to a mesh peer.
#[derive(Debug)]
pub(crate) struct Fwd {
    pub(crate) src: NodePublicKey,
    pub(crate) dst: NodePublicKey,
    pub(crate) data: Bytes,
}

/// The sending side of one outbound mesh connection, registered in the registry for every
/// key the peer announced.
#[derive(Debug)]
pub(crate) struct Forwarder {
    tx: mpsc::Sender<Fwd>,
}

impl Forwarder {
    /// A forwarder that queues packets on `tx` (the mesh peer's writer drains the other end).
    pub(crate) fn new(tx: mpsc::Sender<Fwd>) -> Self {
        Self { tx }
    }

    /// Queues a ForwardPacket; false if the queue is full or the connection is gone.
    pub(crate) fn forward(&self, src: NodePublicKey, dst: NodePublicKey, data: Bytes) -> bool {
        self.tx.try_send(Fwd { src, dst, data }).is_ok()
    }
}
