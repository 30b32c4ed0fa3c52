//! The DERP core: [`Server`] (the server key, options, metrics, the registry of connected
//! clients and the tracked per-connection tasks, graceful shutdown) and [`ConnInfo`], what
//! the HTTP surface hands over with an upgraded stream ([`Server::handle_derp`]).
//!
//! Inside, one way: `conn` (one DERP connection: handshake, admission, reader, writer) →
//! `registry` (who is connected where) → `forward` (packets for keys on other relays,
//! filled by [`crate::mesh`]); `queue` (a connection's send queues) and `handshaking` (the
//! caps on connections not yet admitted) are leaves used by them.
//!
//! Does not accept connections (see [`crate::listeners`]), parse HTTP (see [`crate::http`])
//! or frames (see [`crate::proto`]).

pub(crate) mod conn;
pub(crate) mod forward;
pub(crate) mod handshaking;
pub(crate) mod queue;
pub(crate) mod registry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::defaults;
use crate::key::{MeshKey, NodePrivateKey, NodePublicKey};
use crate::metrics::Metrics;

/// Tunables of the DERP core. Defaults come from [`crate::defaults`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Per-write deadline for normal clients (`None` = no deadline) (spec §6.4).
    pub write_timeout: Option<Duration>,
    /// Per-write deadline for mesh-key clients (spec §4.2).
    pub mesh_write_timeout: Duration,
    /// Keepalive base interval (spec §6.7).
    pub keepalive: Duration,
    /// Keepalive jitter upper bound.
    pub keepalive_jitter: Duration,
    /// Data queue depth (spec §6.4).
    pub queue_depth: usize,
    /// Disco queue depth (spec §6.4).
    pub disco_queue_depth: usize,
    /// Deadline for writing ServerKey.
    pub server_key_timeout: Duration,
    /// Deadline for receiving ClientInfo.
    pub client_info_timeout: Duration,
    /// Mesh pre-shared key; clients presenting it get mesh privileges.
    pub mesh_key: Option<MeshKey>,
    /// Admission checks run after ClientInfo, before registering (spec §6.9); all must
    /// admit. Mesh-key holders skip them.
    pub admission: Vec<Arc<dyn crate::admission::Admit>>,
    /// Per-client receive rate limit (spec §6.8); mesh-key holders are exempt.
    pub recv_rate: Option<crate::ratelimit::RecvRateLimit>,
    /// Most connections accepted on the public listeners but not admitted yet (TLS, HTTP
    /// head, DERP handshake); more are closed at accept. 0 = no cap.
    pub handshake_limit: usize,
    /// Like `handshake_limit`, per source IPv4 address or IPv6 /64. 0 = no cap.
    pub handshake_limit_per_ip: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            write_timeout: Some(defaults::WRITE_TIMEOUT),
            mesh_write_timeout: defaults::MESH_WRITE_TIMEOUT,
            keepalive: defaults::KEEPALIVE,
            keepalive_jitter: defaults::KEEPALIVE_JITTER,
            queue_depth: defaults::PER_CLIENT_SEND_QUEUE_DEPTH,
            disco_queue_depth: defaults::PER_CLIENT_DISCO_QUEUE_DEPTH,
            server_key_timeout: defaults::SERVER_KEY_TIMEOUT,
            client_info_timeout: defaults::CLIENT_INFO_TIMEOUT,
            mesh_key: None,
            admission: Vec::new(),
            recv_rate: None,
            handshake_limit: defaults::HANDSHAKE_LIMIT,
            handshake_limit_per_ip: defaults::HANDSHAKE_LIMIT_PER_IP,
        }
    }
}

/// Per-connection information from the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// TCP peer address, if known.
    pub remote: Option<SocketAddr>,
    /// The request carried a non-empty `Ideal-Node` header.
    pub not_ideal: bool,
    /// Bytes to write before the ServerKey frame (e.g. the exact 101 response).
    pub prelude: Bytes,
    /// The connection's place under the handshake caps, released once it is admitted.
    pub(crate) handshake_slot: handshaking::SlotHolder,
}

/// The DERP core. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    key: NodePrivateKey,
    public: NodePublicKey,
    opts: ServerOptions,
    registry: registry::Registry,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handshaking: Arc<handshaking::HandshakeGate>,
}

impl Server {
    /// Creates the core with the server's private key.
    pub fn new(key: NodePrivateKey, opts: ServerOptions, metrics: Arc<Metrics>) -> Self {
        let handshaking = Arc::new(handshaking::HandshakeGate::new(
            opts.handshake_limit,
            opts.handshake_limit_per_ip,
            metrics.clone(),
        ));
        Self {
            inner: Arc::new(Inner {
                public: key.public(),
                key,
                opts,
                registry: registry::Registry::new(metrics.clone()),
                handshaking,
                metrics,
                cancel: CancellationToken::new(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// The server's public key (ServerKey frame, `Derp-Public-Key`, metacert CN).
    pub fn public_key(&self) -> NodePublicKey {
        self.inner.public
    }

    pub(crate) fn private_key(&self) -> &NodePrivateKey {
        &self.inner.key
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The options.
    pub fn options(&self) -> &ServerOptions {
        &self.inner.opts
    }

    pub(crate) fn registry(&self) -> &registry::Registry {
        &self.inner.registry
    }

    /// The gate that caps connections still handshaking (taken at accept, released at
    /// admission).
    pub(crate) fn handshaking(&self) -> &Arc<handshaking::HandshakeGate> {
        &self.inner.handshaking
    }

    /// The server-wide cancellation token (cancelled on shutdown).
    pub fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Number of registered connections for `key`.
    pub fn connections_for(&self, key: &NodePublicKey) -> usize {
        self.inner.registry.conn_count(key)
    }

    /// Sends a Health frame to every connection of `key` (empty text = healthy again).
    pub fn send_health(&self, key: &NodePublicKey, text: &str) {
        for c in self.inner.registry.all_conns() {
            if c.key == *key {
                c.push_ctrl(queue::Ctrl::Health(text.to_owned()));
            }
        }
    }

    /// Spawns a tracked task (waited for on shutdown).
    pub fn spawn_tracked<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tracker.spawn(fut);
    }

    /// Graceful shutdown: connections get a Restarting frame and are closed; waits up to
    /// `drain` for their tasks to finish.
    pub async fn shutdown(&self, drain: Duration) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(drain, self.inner.tracker.wait())
            .await
            .is_err()
        {
            warn!("shutdown drain timed out with connections still open");
        }
    }
}
