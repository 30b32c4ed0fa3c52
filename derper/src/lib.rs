//! `derper`: a Tailscale-compatible DERP relay (server and client).
//!
//! The wire protocol follows `shared/docs/derp-protocol.md`.
//!
//! Module map:
//! * [`proto`]: pure framing and handshake (spec §4, §5).
//! * [`key`]: node keys and the server key file.
//! * [`server`]: registry, per-connection reader/writer, accept loops (spec §6).
//! * [`http`]: the HTTP surface: `/derp` upgrade (plain, fast start, WebSocket) and
//!   the small endpoints (spec §1).
//! * [`client`]: a DERP client (tests, mesh, probes, load generation).
//! * [`metrics`]: Prometheus metrics served on the admin listener only.
//! * [`certs`], [`tls`], [`stun`]: certificates, rustls configuration and STUN.
//! * [`pin`]: `sha256-raw:` pins and the one pinned-certificate verifier (mesh, probes,
//!   clients).
//! * [`tls_stream`]: the server TLS stream (rustls unbuffered API, no buffers while idle).
//! * [`udp`]: batched UDP receive and send (`recvmmsg`/`sendmmsg`) for STUN.

pub mod certs;
pub mod client;
pub mod stun;
pub mod tls;
pub mod tls_stream;
pub mod udp;

pub mod admission;
pub mod args;
pub mod bench;
pub mod config;
pub mod defaults;
pub mod http;
pub mod key;
pub mod localapi;
pub mod mesh;
pub mod metrics;
pub mod pin;
pub mod probe;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod telemetry;
pub mod ws;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
