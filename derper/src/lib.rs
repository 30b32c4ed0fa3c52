//! `derper`: a Tailscale-compatible DERP relay (server and client).
//!
//! The wire protocol follows `shared/docs/derp-protocol.md`.

pub mod certs;
pub mod stun;
pub mod tls;
