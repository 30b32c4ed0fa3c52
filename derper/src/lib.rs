//! `derper`: a Tailscale-compatible DERP relay (server and client), and the tools around it
//! (`derpprobe`, `derp-bench`).
//!
//! The wire protocol follows `shared/docs/derp-protocol.md` (cited as "spec §…").
//!
//! Module map, from the wire up:
//! * [`proto`]: pure framing and handshake frames (spec §4, §5); no I/O.
//! * [`key`]: node keys, their text forms and the server key file (spec §5.5, §8.3).
//! * [`defaults`]: ports, queue depths, timeouts and size limits, each with its spec §.
//! * [`server`]: the DERP core (registry, per-connection reader and writer) and the
//!   listeners around it (accept loops, graceful shutdown) (spec §6).
//! * [`http`]: the HTTP surface: the `/derp` upgrade (plain, fast start, WebSocket) and the
//!   small endpoints (spec §1); [`ws`]: WebSocket framing for it (spec §1.6).
//! * [`tls`]: the rustls server config, certificate selection, metacert and reload (spec §2);
//!   [`tls_stream`]: the server TLS stream on rustls' unbuffered API (no buffers while idle);
//!   [`certs`]: manual-mode certificate files, the self-signed IP certificate and its
//!   `sha256-raw:` pin (spec §3); [`pin`]: the `Pin` type and the one pinned-certificate
//!   check (spec §3.1, §2.4) every dialer uses.
//! * [`admission`]: client admission checks after ClientInfo (spec §6.9);
//!   [`localapi`]: asking tailscaled whether a key is in the tailnet (`--verify-clients`);
//!   [`ratelimit`]: token buckets for accepts and per-client receive, and log limiting.
//! * [`mesh`]: mesh peers (spec §6.10): WatchConns and forwarding to other relays.
//! * [`stun`]: the STUN responder (spec §7); [`udp`]: batched UDP I/O for it.
//! * [`metrics`]: Prometheus metrics and the admin listener (never on the public ports).
//! * [`client`]: a DERP client (mesh, probes, tests, load generation).
//! * [`derpmap`]: the `tailcfg.DERPMap` model, its three published formats and parsers
//!   (spec §9), shared with the operator.
//! * [`probe`]: probing a derpMap as a Tailscale client uses it (`derpprobe`, the operator).
//! * [`duration`]: Go duration strings, the one parser for every duration flag and field.
//! * [`args`], [`config`], [`telemetry`]: the `derper` binary's flags, validated
//!   configuration and tracing set-up.
//! * `bench` (feature `bench`): load-generation helpers for `derp-bench`, not part of the
//!   relay.
//! * `testing` (feature `test-utils`): an in-process relay on 127.0.0.1 for tests.

pub mod admission;
pub mod args;
#[cfg(any(test, feature = "bench"))]
pub mod bench;
pub mod certs;
pub mod client;
pub mod config;
pub mod defaults;
pub mod derpmap;
pub mod duration;
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
pub mod stun;
pub mod telemetry;
pub mod tls;
pub mod tls_stream;
pub mod udp;
pub mod ws;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
