//! Default values: ports, queue depths, timeouts and size limits.
//!
//! Every constant cites the section of `shared/docs/derp-protocol.md` it comes from.
//! Nothing here does I/O.

use std::time::Duration;

// Ports: the one home for the workspace's default port numbers (the relay's flags, the
// derpMap's `0 = default` sentinels, the operator's CRD defaults). A port is a `u16`; the
// plain HTTP port is an `i32` only because its flag takes -1 to disable it (spec §8.1) and
// that flag is typed by it. Callers with sentinel-bearing `i32` fields (tailcfg, the CRD)
// widen with `i32::from`.

/// Default DERP TLS port (spec §8.1 `-a :443`; `DERPPort` 0 means 443, spec §9.3).
pub const DEFAULT_DERP_PORT: u16 = 443;
/// Default plain HTTP port (spec §8.1 `-http-port 80`; -1 disables).
pub const DEFAULT_HTTP_PORT: i32 = 80;
/// Default UDP STUN port (spec §8.1 `-stun-port 3478`; `STUNPort` 0 means 3478, spec §9.3).
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// Default admin (metrics/health) port, the port of [`DEFAULT_ADMIN_ADDR`] and of a
/// `DerpRegion`'s `spec.ports.admin`. Not 9090 (the default of Prometheus and Cockpit, often
/// running on the relay hosts themselves) and not in 9100–9999 (Prometheus' exporter range,
/// node_exporter's 9100): relays bind it with host networking, so it must be free on every
/// relay node. 3480 sits next to STUN's 3478.
pub const DEFAULT_ADMIN_PORT: u16 = 3480;

/// Default main HTTPS listen address (spec §8.1 `-a :443`).
pub const DEFAULT_ADDR: &str = ":443";
/// Default admin (metrics/health) listener. Loopback only: metrics are never served on the
/// public ports (house-style §4.3).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:3480";
/// Default TLS host name (spec §8.1 `-hostname`).
pub const DEFAULT_HOSTNAME: &str = "derp.tailscale.com";

/// Per-client data queue depth (spec §4.2, 32 packets).
pub const PER_CLIENT_SEND_QUEUE_DEPTH: usize = 32;
/// Per-client disco queue depth (spec §4.2, 32 packets).
pub const PER_CLIENT_DISCO_QUEUE_DEPTH: usize = 32;
/// Attempts to enqueue with head-drop before tail-dropping the new packet (spec §6.4).
pub const ENQUEUE_ATTEMPTS: usize = 3;

/// Keepalive base interval (spec §4.2 / §6.7: 60 s).
pub const KEEPALIVE: Duration = Duration::from_secs(60);
/// Keepalive jitter upper bound, exclusive (spec §6.7: uniform in [0, 5 s)).
pub const KEEPALIVE_JITTER: Duration = Duration::from_secs(5);
/// Write timeout for normal clients (spec §4.2, `-tcp-write-timeout` 2 s).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Write timeout for mesh-key clients (spec §4.2: 30 s).
pub const MESH_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline to send the ServerKey frame (spec §5.1: 10 s).
pub const SERVER_KEY_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline to receive ClientInfo (spec §5.1: 10 s).
pub const CLIENT_INFO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline to receive the HTTP request head (spec §1.1: 30 s ReadTimeout).
pub const HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// TLS handshake deadline (spec §1.1: covered by Go's 30 s ReadTimeout).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default TCP keepalive (spec §8.1 `-tcp-keepalive-time` 10 min).
pub const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(600);
/// Default TCP_USER_TIMEOUT (spec §8.1 `-tcp-user-timeout` 15 s).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// PeerGone(NotHere) token bucket: refill rate per second (spec §6.5).
pub const NOT_HERE_PER_SEC: f64 = 1.0;
/// PeerGone(NotHere) token bucket burst (spec §6.5).
pub const NOT_HERE_BURST: f64 = 3.0;

/// Admin listener: time to receive a request head, also between kept-alive requests (not
/// in the spec: upstream has no admin listener; a slowloris bound).
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin listener: lifetime of one connection (not in the spec; scrapers reconnect).
pub const ADMIN_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Most connections still handshaking (TLS, HTTP head, DERP handshake up to admission)
/// at once (not in the spec: upstream has no cap). `--handshake-connection-limit`.
pub const HANDSHAKE_LIMIT: usize = 4096;
/// Most connections still handshaking from one IPv4 address or IPv6 /64 (not in the
/// spec). `--handshake-connection-limit-per-ip`.
pub const HANDSHAKE_LIMIT_PER_IP: usize = 128;

/// Maximum size of an HTTP request head we parse ourselves.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Default `Restarting` frame values sent on graceful shutdown: reconnect in (ms).
pub const RESTART_RECONNECT_IN_MS: u32 = 1_000;
/// Default `Restarting` frame values sent on graceful shutdown: try for (ms).
pub const RESTART_TRY_FOR_MS: u32 = 30_000;
/// How long graceful shutdown waits for connections to drain.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_use_the_default_ports() {
        assert_eq!(DEFAULT_ADDR, format!(":{DEFAULT_DERP_PORT}"));
        assert_eq!(
            DEFAULT_ADMIN_ADDR,
            format!("127.0.0.1:{DEFAULT_ADMIN_PORT}")
        );
    }
}
