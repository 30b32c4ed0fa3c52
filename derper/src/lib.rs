//! `derper`: a Tailscale-compatible DERP relay (server and client), and the tools around it
//! (`derpprobe`, `derp-bench`).
//!
//! The wire protocol follows `shared/docs/derp-protocol.md` (cited as "spec §…").
//!
//! Module map. The relay's layers run one way, each using only those below it (no module
//! imports one that imports it back; `tests/layering.rs` checks it):
//!
//! 1. [`listeners`]: where every connection starts. Binds the main, plain-HTTP, STUN and
//!    admin listeners, applies the accept rate limit and the handshake caps, completes TLS
//!    and hands the stream to the HTTP surface; graceful shutdown (spec §1.1, §2).
//!    * [`tls`]: the rustls server config, certificate selection, metacert and reload
//!      (spec §2); `tls_stream` (crate-private): the server TLS stream on rustls'
//!      unbuffered API (no buffers while idle), with the KeyUpdate limits.
//!    * [`stun`]: the STUN responder (spec §7); [`udp`]: batched UDP I/O for it.
//! 2. [`http`]: the HTTP surface: the `/derp` upgrade (plain, fast start, WebSocket) and the
//!    small endpoints (spec §1); [`ws`]: WebSocket framing for it (spec §1.6).
//! 3. [`server`]: the DERP core: one connection (handshake, admission, reader, writer) →
//!    the registry of connected keys → forwarding to other relays (spec §6).
//!    * [`admission`]: client admission checks after ClientInfo (spec §6.9);
//!      [`localapi`]: asking tailscaled whether a key is in the tailnet (`--verify-clients`);
//!      [`ratelimit`]: token buckets for accepts and per-client receive, and log limiting.
//! 4. [`mesh`]: mesh peers (spec §6.10), above the registry: it dials the other relays with
//!    the [`client`], watches their connections and registers forwarders in the registry.
//!
//! Clients and tools, on top of the same leaves:
//! * [`client`]: a DERP client (mesh, probes, tests, load generation).
//! * [`derpmap`]: the `tailcfg.DERPMap` model, its three published formats and parsers
//!   (spec §9), shared with the operator.
//! * [`probe`]: probing a derpMap as a Tailscale client uses it (`derpprobe`, the operator).
//! * `bench` (feature `bench`): load-generation helpers for `derp-bench`, not part of the
//!   relay.
//! * `testing` (feature `test-utils`): an in-process relay on 127.0.0.1 for tests.
//! * `fuzzing` (feature `fuzzing`, hidden): entry points for the fuzz targets.
//! * [`args`], [`config`], [`telemetry`]: the `derper` binary's flags, validated
//!   configuration and tracing set-up (they wire the layers above).
//!
//! Leaves, used by the layers above and using none of them:
//! * [`proto`]: pure framing and handshake frames (spec §4, §5); no I/O.
//! * [`key`]: node keys, their text forms and the server key file (spec §5.5, §8.3).
//! * [`pin`]: the `Pin` type and the one pinned-certificate check (spec §3.1, §2.4) every
//!   dialer uses; [`certs`]: manual-mode certificate files, the self-signed IP certificate
//!   and its `sha256-raw:` pin (spec §3).
//! * `roots` (private): the system CA bundle for dialers of CA-issued certificates.
//! * [`metrics`]: Prometheus metrics, counted by every layer, and the admin listener's
//!   server (never on the public ports; started by [`listeners`]).
//! * [`defaults`]: ports, queue depths, timeouts and size limits, each with its spec §.
//! * [`duration`]: Go duration strings, the one parser for every duration flag and field.
//! * `atomic_file` (private): exclusive-temp-file-and-rename writes for keys and certificates.

pub mod admission;
pub mod args;
mod atomic_file;
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
pub mod listeners;
pub mod localapi;
pub mod mesh;
pub mod metrics;
pub mod pin;
pub mod probe;
pub mod proto;
pub mod ratelimit;
mod roots;
pub mod server;
pub mod stun;
pub mod telemetry;
pub mod tls;
pub(crate) mod tls_stream;
pub mod udp;
pub mod ws;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
