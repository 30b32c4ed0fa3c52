//! The connected-client registry (spec §6.1–§6.5): connections by key, duplicate-key
//! rules ("last writer is active"), routing lookups, PeerGone fan-out and mesh watchers.
//!
//! Sharded: each shard is a `std::sync::Mutex<HashMap>`; no `.await` ever happens while a
//! shard or the watcher lock is held, and fan-out (PeerGone to recipients, PeerPresent to
//! watchers) happens after shard guards are released.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::forward::Forwarder;
use super::queue::{ConnShared, Ctrl};
use crate::key::NodePublicKey;
use crate::metrics::Metrics;
use crate::proto::PeerGoneReason;

/// Seeded per process: client keys are attacker-chosen, so no fixed or identity hash
/// (hash flooding); foldhash is much cheaper than SipHash on 32-byte keys.
pub(crate) type KeyHasher = foldhash::fast::RandomState;

const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct KeyEntry {
    /// Connections in "heard-from" order; the last one is the active one (spec §6.2).
    conns: Vec<Arc<ConnShared>>,
    /// Keys that received packets from this key (spec §6.5).
    recipients: HashSet<NodePublicKey, KeyHasher>,
    /// Mesh peers that announced this key, in registration order; the first one is used
    /// when there is no local connection (spec §6.10).
    fwd: Vec<Arc<Forwarder>>,
}

type Shard = Mutex<HashMap<NodePublicKey, KeyEntry, KeyHasher>>;

/// The registry. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Box<[Shard]>,
    /// Mesh watchers. Broadcasts are made while holding this lock so a watcher's initial
    /// snapshot and later updates stay ordered (spec §6.10).
    watchers: Mutex<Vec<Arc<ConnShared>>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update; the maps stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Result of a routing lookup.
#[derive(Debug)]
pub(crate) enum Lookup<R> {
    /// The active connection was found and the closure ran.
    Found(R),
    /// The key has connections but none is active (never with our policy).
    NoActive,
    /// The key is not connected here but a mesh peer announced it.
    Remote(Arc<Forwarder>),
    /// The key is unknown.
    Unknown,
}

impl Registry {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| Mutex::new(HashMap::default()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                shards,
                watchers: Mutex::new(Vec::new()),
                metrics,
            }),
        }
    }

    fn shard(&self, key: &NodePublicKey) -> &Shard {
        let b = key.as_bytes();
        let h = usize::from(b[0]) ^ (usize::from(b[7]) << 3) ^ usize::from(b[31]);
        // SHARDS is non-zero so the index is always in range.
        &self.inner.shards[h % SHARDS]
    }

    /// Registers a connection (after a successful handshake).
    pub(crate) fn register(&self, conn: &Arc<ConnShared>) {
        let m = &self.inner.metrics;
        {
            let mut shard = lock(self.shard(&conn.key));
            let entry = shard.entry(conn.key).or_default();
            entry.conns.push(conn.clone());
            let n = entry.conns.len();
            if n == 1 {
                m.clients_local.inc();
                if !entry.fwd.is_empty() {
                    m.clients_remote.dec();
                }
            } else {
                m.total_dup_client_conns.inc();
                if n == 2 {
                    m.current_dup_client_keys.inc();
                    m.current_dup_client_conns.inc_by(2);
                } else {
                    m.current_dup_client_conns.inc();
                }
                for c in &entry.conns {
                    c.dup.store(true, Ordering::Relaxed);
                }
            }
        }
        m.current_connections.inc();
        let watchers = lock(&self.inner.watchers);
        for w in watchers.iter() {
            w.push_ctrl(Ctrl::PeerPresent {
                key: conn.key,
                addr: conn.remote,
                flags: conn.present_flags,
            });
        }
    }

    /// Unregisters a connection. Idempotent.
    pub(crate) fn unregister(&self, conn: &Arc<ConnShared>) {
        let m = &self.inner.metrics;
        let gone_recipients = {
            let mut shard = lock(self.shard(&conn.key));
            let Some(entry) = shard.get_mut(&conn.key) else {
                return;
            };
            let Some(pos) = entry.conns.iter().position(|c| Arc::ptr_eq(c, conn)) else {
                return;
            };
            entry.conns.remove(pos);
            let n = entry.conns.len();
            if n == 0 {
                m.clients_local.dec();
                if entry.fwd.is_empty() {
                    shard.remove(&conn.key).map(|e| Some(e.recipients))
                } else {
                    // Still reachable through a mesh peer: watchers hear PeerGone, but
                    // its recipients keep their route (spec §6.1).
                    m.clients_remote.inc();
                    Some(None)
                }
            } else {
                if n == 1 {
                    m.current_dup_client_keys.dec();
                    m.current_dup_client_conns.dec_by(2);
                    for c in &entry.conns {
                        c.dup.store(false, Ordering::Relaxed);
                    }
                } else {
                    m.current_dup_client_conns.dec();
                }
                None
            }
        };
        m.current_connections.dec();
        let Some(recipients) = gone_recipients else {
            return;
        };
        // Fan-out after the shard guard is released (spec §6.5).
        {
            let watchers = lock(&self.inner.watchers);
            for w in watchers.iter() {
                w.push_ctrl(Ctrl::PeerGone(conn.key, PeerGoneReason::Disconnected));
            }
        }
        if let Some(recipients) = recipients {
            self.notify_recipients(&conn.key, recipients);
        }
    }

    /// Sends PeerGone(Disconnected) for `gone` to every local recipient (spec §6.5).
    fn notify_recipients(
        &self,
        gone: &NodePublicKey,
        recipients: HashSet<NodePublicKey, KeyHasher>,
    ) {
        for r in recipients {
            let _ = self.with_local(&r, |c| {
                c.push_ctrl(Ctrl::PeerGone(*gone, PeerGoneReason::Disconnected))
            });
        }
    }

    /// Registers `fwd` as a forwarder for the remote key `key` (PeerPresent from a mesh
    /// peer). The first registered forwarder stays in use (spec §6.10).
    pub(crate) fn add_forwarder(&self, key: NodePublicKey, fwd: &Arc<Forwarder>) {
        let m = &self.inner.metrics;
        let mut shard = lock(self.shard(&key));
        let entry = shard.entry(key).or_default();
        if entry.fwd.iter().any(|f| Arc::ptr_eq(f, fwd)) {
            return;
        }
        entry.fwd.push(fwd.clone());
        if entry.fwd.len() == 1 && entry.conns.is_empty() {
            m.clients_remote.inc();
        }
    }

    /// Removes `fwd` for `key` (PeerGone from the mesh peer, or its connection was lost).
    /// When the key is then unknown region-wide, its recipients get PeerGone (spec §6.5).
    pub(crate) fn remove_forwarder(&self, key: &NodePublicKey, fwd: &Arc<Forwarder>) {
        let m = &self.inner.metrics;
        let recipients = {
            let mut shard = lock(self.shard(key));
            let Some(entry) = shard.get_mut(key) else {
                return;
            };
            let before = entry.fwd.len();
            entry.fwd.retain(|f| !Arc::ptr_eq(f, fwd));
            if entry.fwd.len() == before || !entry.fwd.is_empty() {
                return;
            }
            if !entry.conns.is_empty() {
                return;
            }
            m.clients_remote.dec();
            shard.remove(key).map(|e| e.recipients)
        };
        if let Some(r) = recipients {
            self.notify_recipients(key, r);
        }
    }

    /// Runs `f` on the active local connection of `key`, ignoring mesh forwarders.
    pub(crate) fn with_local<R>(
        &self,
        key: &NodePublicKey,
        f: impl FnOnce(&Arc<ConnShared>) -> R,
    ) -> Option<R> {
        let shard = lock(self.shard(key));
        shard.get(key).and_then(|e| e.conns.last()).map(f)
    }

    /// Marks `conn` as the most recently heard-from connection of its key, making it the
    /// active one (spec §6.2).
    pub(crate) fn note_heard(&self, conn: &Arc<ConnShared>) {
        let mut shard = lock(self.shard(&conn.key));
        if let Some(entry) = shard.get_mut(&conn.key) {
            let last = entry.conns.len().saturating_sub(1);
            if let Some(pos) = entry.conns.iter().position(|c| Arc::ptr_eq(c, conn))
                && pos != last
            {
                let c = entry.conns.remove(pos);
                entry.conns.push(c);
            }
        }
    }

    /// Runs `f` on the active connection of `key` while the shard lock is held (the closure
    /// must be short and must not block).
    pub(crate) fn with_active<R>(
        &self,
        key: &NodePublicKey,
        f: impl FnOnce(&Arc<ConnShared>) -> R,
    ) -> Lookup<R> {
        let shard = lock(self.shard(key));
        match shard.get(key) {
            Some(e) => match (e.conns.last(), e.fwd.first()) {
                (Some(c), _) => Lookup::Found(f(c)),
                (None, Some(fw)) => Lookup::Remote(fw.clone()),
                (None, None) => Lookup::NoActive,
            },
            None => Lookup::Unknown,
        }
    }

    /// Records that `src` delivered a packet to `dst` (spec §6.5). `src` may be a remote
    /// key (forwarded packets): its entry exists while a mesh peer announces it.
    pub(crate) fn note_sent_to(&self, src: &NodePublicKey, dst: NodePublicKey) {
        let mut shard = lock(self.shard(src));
        if let Some(e) = shard.get_mut(src) {
            e.recipients.insert(dst);
        }
    }

    /// Closes every local connection of `key` (ClosePeer, spec §6.10).
    pub(crate) fn close_key(&self, key: &NodePublicKey) {
        let conns: Vec<_> = lock(self.shard(key))
            .get(key)
            .map(|e| e.conns.clone())
            .unwrap_or_default();
        for c in conns {
            c.cancel.cancel();
        }
    }

    /// Number of connections registered for `key`.
    pub(crate) fn conn_count(&self, key: &NodePublicKey) -> usize {
        lock(self.shard(key)).get(key).map_or(0, |e| e.conns.len())
    }

    /// Adds a mesh watcher and queues PeerPresent for every key with an active connection.
    pub(crate) fn add_watcher(&self, w: &Arc<ConnShared>) {
        let mut watchers = lock(&self.inner.watchers);
        if watchers.iter().any(|x| Arc::ptr_eq(x, w)) {
            return;
        }
        for shard in self.inner.shards.iter() {
            let shard = lock(shard);
            for (k, e) in shard.iter() {
                // Only locally connected keys (never re-announce remote ones: no loops).
                if let Some(c) = e.conns.last() {
                    w.push_ctrl(Ctrl::PeerPresent {
                        key: *k,
                        addr: c.remote,
                        flags: c.present_flags,
                    });
                }
            }
        }
        watchers.push(w.clone());
        self.inner.metrics.watchers.inc();
    }

    /// Removes a watcher (on disconnect).
    pub(crate) fn remove_watcher(&self, w: &Arc<ConnShared>) {
        let mut watchers = lock(&self.inner.watchers);
        let before = watchers.len();
        watchers.retain(|x| !Arc::ptr_eq(x, w));
        if watchers.len() != before {
            self.inner.metrics.watchers.dec();
        }
    }

    /// Every registered connection (for shutdown).
    pub(crate) fn all_conns(&self) -> Vec<Arc<ConnShared>> {
        let mut out = Vec::new();
        for shard in self.inner.shards.iter() {
            for e in lock(shard).values() {
                out.extend(e.conns.iter().cloned());
            }
        }
        out
    }
}
