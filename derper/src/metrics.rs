//! Prometheus metrics for the relay (names modelled on spec §10 with a `derper_` prefix),
//! and the admin listener that serves them (`/metrics`, `/healthz`, `/readyz`).
//!
//! Metrics are never served on the public ports (house-style §4.3). The hot path does not
//! touch these atomics per packet: connections keep local counts and flush them per batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = Vec<(&'static str, &'static str)>;

/// Drop reasons (spec §10 `derp_packets_dropped{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Destination key not connected.
    UnknownDest,
    /// Forwarded packet's destination not connected.
    UnknownDestOnFwd,
    /// Destination disconnected while the packet was queued.
    GoneDisconnected,
    /// Oldest queued packet dropped to make room.
    QueueHead,
    /// New packet dropped because the queue stayed full.
    QueueTail,
    /// The write of the packet failed.
    WriteError,
    /// Duplicate connections without an active one.
    DupClient,
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        Self::UnknownDest,
        Self::UnknownDestOnFwd,
        Self::GoneDisconnected,
        Self::QueueHead,
        Self::QueueTail,
        Self::WriteError,
        Self::DupClient,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::UnknownDest => "unknown_dest",
            Self::UnknownDestOnFwd => "unknown_dest_on_fwd",
            Self::GoneDisconnected => "gone_disconnected",
            Self::QueueHead => "queue_head",
            Self::QueueTail => "queue_tail",
            Self::WriteError => "write_error",
            Self::DupClient => "dup_client",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// All relay metrics. Cheap to share as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    /// DERP handshakes started.
    pub accepts: Counter,
    /// Registered connections that ended.
    pub disconnects: Counter,
    /// Registered connections (incl. duplicates).
    pub current_connections: Gauge,
    /// Connections that sent NotePreferred(1).
    pub current_home_connections: Gauge,
    /// Connections with an `Ideal-Node` header.
    pub current_notideal_connections: Gauge,
    /// Distinct keys connected locally.
    pub clients_local: Gauge,
    /// Keys with ≥ 2 connections.
    pub current_dup_client_keys: Gauge,
    /// Connections in duplicate sets.
    pub current_dup_client_conns: Gauge,
    /// Connections that arrived while their key was already connected.
    pub total_dup_client_conns: Counter,
    /// SendPacket frames received, disco.
    pub packets_received_disco: Counter,
    /// SendPacket frames received, other.
    pub packets_received_other: Counter,
    /// SendPacket payload bytes received.
    pub bytes_received: Counter,
    /// RecvPacket frames written.
    pub packets_sent: Counter,
    /// RecvPacket packet bytes written.
    pub bytes_sent: Counter,
    dropped_packets: [[Counter; 2]; 7],
    dropped_bytes: [[Counter; 2]; 7],
    /// ForwardPacket frames accepted from mesh peers.
    pub packets_forwarded_in: Counter,
    /// ForwardPacket frames queued to mesh peers.
    pub packets_forwarded_out: Counter,
    /// Packets for remote keys dropped because the mesh peer's queue was full or closed.
    pub mesh_forward_drops: Counter,
    /// Distinct keys known only through mesh peers.
    pub clients_remote: Gauge,
    /// Outbound mesh connections currently up (watching).
    pub mesh_peers_up: Gauge,
    /// Configured mesh peers (excluding ourselves once detected).
    pub mesh_peers_configured: Gauge,
    /// Successful outbound mesh connections (including reconnects).
    pub mesh_connects: Counter,
    /// Outbound mesh connection attempts that failed or were refused.
    pub mesh_connect_failures: Counter,
    /// Clients that presented a mesh key that does not match ours (no privileges).
    pub mesh_key_mismatches: Counter,
    /// Connections closed by the accept rate limit.
    pub accept_rejected: Counter,
    /// Frames for which a connection waited on its receive rate limit.
    pub rate_limit_waited: Counter,
    /// Connections accepted but not admitted yet (TLS, HTTP head, DERP handshake).
    pub handshaking_connections: Gauge,
    handshake_limit_rejections: Family<Labels, Counter>,
    admission_rejections: Family<Labels, Counter>,
    /// PeerGone(Disconnected) frames written.
    pub peer_gone_disconnected_frames: Counter,
    /// PeerGone(NotHere) frames written.
    pub peer_gone_not_here_frames: Counter,
    /// Pings received.
    pub got_ping: Counter,
    /// Pongs written.
    pub sent_pong: Counter,
    /// Keepalive frames written.
    pub keepalives_sent: Counter,
    /// Home moves in (NotePreferred(1) > 5 s after connect).
    pub home_moves_in: Counter,
    /// Home moves out.
    pub home_moves_out: Counter,
    /// Mesh watchers.
    pub watchers: Gauge,
    /// Connections ended by a write deadline.
    pub sclient_write_timeouts: Counter,
    /// Unknown / ignored frames received from clients.
    pub unknown_frames: Counter,
    /// Accepted WebSocket DERP connections.
    pub websocket_accepts: Counter,
    handshake_failures: Family<Labels, Counter>,
    disconnect_reasons: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// TCP connections accepted on the public listeners.
    pub tcp_accepts: Counter,
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    r.register(name, help, g.clone());
    g
}

impl Metrics {
    /// Registers every metric in `registry` (which should carry the `derper` prefix).
    pub fn register(r: &mut Registry) -> Arc<Self> {
        let received: Family<Labels, Counter> = Family::default();
        r.register(
            "packets_received_kind",
            "SendPacket frames received from clients, by disco classification",
            received.clone(),
        );
        let dropped_p: Family<Labels, Counter> = Family::default();
        r.register(
            "packets_dropped",
            "Packets dropped, by reason and kind",
            dropped_p.clone(),
        );
        let dropped_b: Family<Labels, Counter> = Family::default();
        r.register(
            "bytes_dropped",
            "Packet bytes dropped, by reason and kind",
            dropped_b.clone(),
        );
        let mk = |f: &Family<Labels, Counter>| -> [[Counter; 2]; 7] {
            DropReason::ALL.map(|reason| {
                ["disco", "other"].map(|kind| {
                    f.get_or_create_owned(&vec![("reason", reason.as_str()), ("kind", kind)])
                })
            })
        };
        let handshake_failures = Family::default();
        r.register(
            "handshake_failures",
            "DERP handshakes that failed, by reason",
            handshake_failures.clone(),
        );
        let disconnect_reasons = Family::default();
        r.register(
            "disconnect_reasons",
            "Registered connections that ended, by reason",
            disconnect_reasons.clone(),
        );
        let http_requests = Family::default();
        r.register(
            "http_requests",
            "HTTP requests on the public listeners, by endpoint",
            http_requests.clone(),
        );
        let handshake_limit_rejections: Family<Labels, Counter> = Family::default();
        r.register(
            "handshake_limit_rejections",
            "Connections closed at accept because too many were still handshaking, by scope \
             (total, per_ip)",
            handshake_limit_rejections.clone(),
        );
        for scope in ["total", "per_ip"] {
            let _ = handshake_limit_rejections.get_or_create_owned(&vec![("scope", scope)]);
        }
        let admission_rejections = Family::default();
        r.register(
            "admission_rejections",
            "Clients refused by admission (--verify-clients, --verify-client-url), by reason",
            admission_rejections.clone(),
        );
        Arc::new(Self {
            packets_forwarded_out: counter(
                r,
                "packets_forwarded_out",
                "ForwardPacket frames queued to mesh peers",
            ),
            mesh_forward_drops: counter(
                r,
                "mesh_forward_drops",
                "Packets for remote keys dropped (mesh peer queue full or closed)",
            ),
            clients_remote: gauge(
                r,
                "clients_remote",
                "Distinct client keys known only through mesh peers",
            ),
            mesh_peers_up: gauge(r, "mesh_peers_up", "Outbound mesh connections up"),
            mesh_peers_configured: gauge(r, "mesh_peers_configured", "Configured mesh peers"),
            mesh_connects: counter(r, "mesh_connects", "Successful outbound mesh connections"),
            mesh_connect_failures: counter(
                r,
                "mesh_connect_failures",
                "Outbound mesh connection attempts that failed or were refused",
            ),
            mesh_key_mismatches: counter(
                r,
                "mesh_key_mismatches",
                "Clients that presented a wrong mesh key (treated as regular clients)",
            ),
            accept_rejected: counter(
                r,
                "accept_rejected_connections",
                "TCP connections closed by the accept rate limit",
            ),
            rate_limit_waited: counter(
                r,
                "rate_limit_waited",
                "Frames for which a connection waited on its receive rate limit",
            ),
            handshaking_connections: gauge(
                r,
                "handshaking_connections",
                "Connections accepted but not admitted yet (TLS, HTTP head, DERP handshake)",
            ),
            handshake_limit_rejections,
            admission_rejections,
            accepts: counter(r, "accepts", "DERP handshakes started"),
            disconnects: counter(r, "disconnects", "Registered DERP connections that ended"),
            current_connections: gauge(
                r,
                "current_connections",
                "Registered DERP connections, including duplicates",
            ),
            current_home_connections: gauge(
                r,
                "current_home_connections",
                "Connections whose last NotePreferred was 1",
            ),
            current_notideal_connections: gauge(
                r,
                "current_notideal_connections",
                "Connections that sent a non-empty Ideal-Node header",
            ),
            clients_local: gauge(
                r,
                "clients_local",
                "Distinct client keys connected to this server",
            ),
            current_dup_client_keys: gauge(
                r,
                "current_dup_client_keys",
                "Keys with two or more connections",
            ),
            current_dup_client_conns: gauge(
                r,
                "current_dup_client_conns",
                "Connections belonging to keys with two or more connections",
            ),
            total_dup_client_conns: counter(
                r,
                "dup_client_conns",
                "Connections that registered while their key was already connected",
            ),
            packets_received_disco: received.get_or_create_owned(&vec![("kind", "disco")]),
            packets_received_other: received.get_or_create_owned(&vec![("kind", "other")]),
            bytes_received: counter(
                r,
                "bytes_received",
                "SendPacket packet bytes received from clients",
            ),
            packets_sent: counter(r, "packets_sent", "RecvPacket frames written to clients"),
            bytes_sent: counter(
                r,
                "bytes_sent",
                "RecvPacket packet bytes written to clients",
            ),
            dropped_packets: mk(&dropped_p),
            dropped_bytes: mk(&dropped_b),
            packets_forwarded_in: counter(
                r,
                "packets_forwarded_in",
                "ForwardPacket frames accepted from mesh peers",
            ),
            peer_gone_disconnected_frames: counter(
                r,
                "peer_gone_disconnected_frames",
                "PeerGone frames with reason Disconnected written",
            ),
            peer_gone_not_here_frames: counter(
                r,
                "peer_gone_not_here_frames",
                "PeerGone frames with reason NotHere written",
            ),
            got_ping: counter(r, "got_ping", "Ping frames received from clients"),
            sent_pong: counter(r, "sent_pong", "Pong frames written to clients"),
            keepalives_sent: counter(r, "keepalives_sent", "KeepAlive frames written to clients"),
            home_moves_in: counter(
                r,
                "home_moves_in",
                "NotePreferred(1) received more than 5 s after connect",
            ),
            home_moves_out: counter(
                r,
                "home_moves_out",
                "NotePreferred(0) received more than 5 s after connect while preferred",
            ),
            watchers: gauge(r, "watchers", "Mesh connections that sent WatchConns"),
            sclient_write_timeouts: counter(
                r,
                "sclient_write_timeouts",
                "Connections closed because a write exceeded the write timeout",
            ),
            unknown_frames: counter(
                r,
                "unknown_frames",
                "Frames of unknown or ignored types received from clients and discarded",
            ),
            websocket_accepts: counter(
                r,
                "websocket_accepts",
                "Accepted WebSocket DERP connections",
            ),
            handshake_failures,
            disconnect_reasons,
            http_requests,
            tls_handshake_failures: counter(
                r,
                "tls_handshake_failures",
                "TLS handshakes that failed or timed out",
            ),
            tcp_accepts: counter(
                r,
                "tcp_accepts",
                "TCP connections accepted on the public listeners",
            ),
        })
    }

    /// Creates metrics in a private registry (tests, embedding without an admin listener).
    pub fn unregistered() -> Arc<Self> {
        Self::register(&mut Registry::default())
    }

    /// Counts a dropped packet.
    pub fn drop_packet(&self, reason: DropReason, disco: bool, bytes: usize) {
        let k = usize::from(!disco);
        if let (Some(p), Some(b)) = (
            self.dropped_packets
                .get(reason.index())
                .and_then(|r| r.get(k)),
            self.dropped_bytes
                .get(reason.index())
                .and_then(|r| r.get(k)),
        ) {
            p.inc();
            b.inc_by(bytes as u64);
        }
    }

    /// Total dropped packets for a reason (both kinds).
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped_packets
            .get(reason.index())
            .map(|r| r.iter().map(Counter::get).sum())
            .unwrap_or(0)
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Handshake failures for a reason.
    pub fn handshake_failures(&self, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// Counts a registered connection ending.
    pub fn disconnect(&self, reason: &'static str) {
        self.disconnects.inc();
        self.disconnect_reasons
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Disconnects for a reason.
    pub fn disconnects_for(&self, reason: &'static str) -> u64 {
        self.disconnect_reasons
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// Counts a connection closed at accept by a handshake cap (`total` or `per_ip`).
    pub fn handshake_limit_rejection(&self, scope: &'static str) {
        self.handshake_limit_rejections
            .get_or_create(&vec![("scope", scope)])
            .inc();
    }

    /// Connections closed at accept by the handshake cap `scope` (`total` or `per_ip`).
    pub fn handshake_limit_rejections(&self, scope: &'static str) -> u64 {
        self.handshake_limit_rejections
            .get_or_create(&vec![("scope", scope)])
            .get()
    }

    /// Counts an admission rejection by reason.
    pub fn admission_rejection(&self, reason: &'static str) {
        self.admission_rejections
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Admission rejections for a reason.
    pub fn admission_rejections(&self, reason: &'static str) -> u64 {
        self.admission_rejections
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// Counts an HTTP request by endpoint.
    pub fn http_request(&self, endpoint: &'static str) {
        self.http_requests
            .get_or_create(&vec![("endpoint", endpoint)])
            .inc();
    }
}

/// Encodes a registry in Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut s, registry);
    s
}

/// Readiness flag shared with the admin listener.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks ready / not ready.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    /// Current state.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Deadlines on admin connections, so a slow or idle client (slowloris) cannot hold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminTimeouts {
    /// Time to receive a request's complete head, also while a kept-alive connection waits
    /// for its next request.
    pub header: std::time::Duration,
    /// Lifetime of a connection, whatever it is doing (a trickled body, a response nobody
    /// reads); scrapers simply reconnect.
    pub connection: std::time::Duration,
}

impl Default for AdminTimeouts {
    fn default() -> Self {
        Self {
            header: crate::defaults::ADMIN_HEADER_TIMEOUT,
            connection: crate::defaults::ADMIN_CONNECTION_TIMEOUT,
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `cancel` fires, with
/// the default [`AdminTimeouts`].
pub async fn serve_admin(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
) {
    serve_admin_with(listener, registry, ready, cancel, AdminTimeouts::default()).await;
}

/// Like [`serve_admin`], with explicit timeouts.
pub async fn serve_admin_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
    timeouts: AdminTimeouts,
) {
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let registry = registry.clone();
                let ready = ready.clone();
                async move { Ok::<_, std::convert::Infallible>(admin_response(&req, &registry, &ready)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeouts.header)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(timeouts.connection) => {}
            }
        });
    }
}

fn admin_response(
    req: &Request<hyper::body::Incoming>,
    registry: &Registry,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            encode(registry),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" if ready.get() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_are_precreated_and_encoded() {
        let mut r = Registry::with_prefix("derper");
        let m = Metrics::register(&mut r);
        m.drop_packet(DropReason::QueueHead, true, 100);
        assert_eq!(m.dropped(DropReason::QueueHead), 1);
        let text = encode(&r);
        assert!(
            text.contains("derper_packets_dropped_total{reason=\"queue_head\",kind=\"disco\"} 1")
        );
        assert!(
            text.contains("derper_packets_dropped_total{reason=\"dup_client\",kind=\"other\"} 0")
        );
        assert!(text.contains("derper_current_connections 0"));
    }
}
