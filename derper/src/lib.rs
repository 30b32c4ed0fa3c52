//! `derper`: a Tailscale-compatible DERP relay (server and client).
//!
//! The wire protocol follows `shared/docs/derp-protocol.md`.
