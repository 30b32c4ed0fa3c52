//! The per-connection send queues (spec §6.4): what a registered connection shares with
//! the registry and with other connections' readers, which queue packets and control
//! messages for its writer. Below both the connection ([`super::conn`]) and the registry
//! ([`super::registry`]), so neither needs the other's types.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::key::NodePublicKey;
use crate::proto::PeerGoneReason;

/// A queued packet.
#[derive(Debug)]
pub(crate) struct Pkt {
    pub(super) src: NodePublicKey,
    pub(super) data: Bytes,
}

/// Queued control messages.
#[derive(Debug)]
pub(crate) enum Ctrl {
    PeerGone(NodePublicKey, PeerGoneReason),
    PeerPresent {
        key: NodePublicKey,
        addr: Option<SocketAddr>,
        flags: u8,
    },
    Health(String),
}

#[derive(Debug, Default)]
pub(super) struct SendState {
    pub(super) data: VecDeque<Pkt>,
    pub(super) disco: VecDeque<Pkt>,
    pub(super) ctrl: VecDeque<Ctrl>,
    pub(super) pong: Option<[u8; 8]>,
    pub(super) closed: bool,
}

/// State of a registered connection shared with the registry and other connections.
#[derive(Debug)]
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) key: NodePublicKey,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) present_flags: u8,
    pub(crate) cancel: CancellationToken,
    /// True while the key has ≥ 2 connections (spec §6.2).
    pub(crate) dup: AtomicBool,
    pub(super) state: Mutex<SendState>,
    pub(super) notify: Notify,
    pub(super) data_depth: usize,
    pub(super) disco_depth: usize,
}

pub(super) fn lock(m: &Mutex<SendState>) -> MutexGuard<'_, SendState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Outcome of queueing a packet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    Queued,
    /// Queued after dropping the oldest packet (its length).
    QueuedHeadDrop(usize),
    Gone,
}

impl ConnShared {
    /// Queues a packet (spec §6.4: head-drop when full). Never blocks.
    pub(crate) fn enqueue(&self, src: NodePublicKey, data: Bytes, disco: bool) -> Enqueued {
        let mut st = lock(&self.state);
        if st.closed {
            return Enqueued::Gone;
        }
        let (q, depth) = if disco {
            (&mut st.disco, self.disco_depth)
        } else {
            (&mut st.data, self.data_depth)
        };
        let mut res = Enqueued::Queued;
        if q.len() >= depth
            && let Some(old) = q.pop_front()
        {
            res = Enqueued::QueuedHeadDrop(old.data.len());
        }
        q.push_back(Pkt { src, data });
        // The writer waits only after finding every queue empty (under this lock), so only
        // the push that ends "all empty" needs to wake it; later pushes ride along.
        let wake = st.data.len() + st.disco.len() == 1 && st.ctrl.is_empty() && st.pong.is_none();
        drop(st);
        if wake {
            self.notify.notify_one();
        }
        res
    }

    pub(crate) fn push_ctrl(&self, c: Ctrl) {
        let mut st = lock(&self.state);
        if st.closed {
            return;
        }
        st.ctrl.push_back(c);
        drop(st);
        self.notify.notify_one();
    }

    pub(super) fn set_pong(&self, data: [u8; 8]) -> bool {
        let mut st = lock(&self.state);
        if st.closed || st.pong.is_some() {
            return false;
        }
        st.pong = Some(data);
        drop(st);
        self.notify.notify_one();
        true
    }
}
