//! Probing a derpMap the way a real Tailscale client uses it (used by the `derpprobe` binary
//! and, later, by the operator's status probing).
//!
//! Owns:
//! * the per-node checks: TCP connect, TLS with the `sha256-raw:` pin (spec §3; mismatches
//!   explained with both pins, a presented metacert noted with the client versions it breaks,
//!   spec §2.4 / §11 P1), the DERP handshake, a packet round trip between two probe clients on
//!   the node, STUN binding with the mapped address (spec §7), each with its latency;
//! * the cross-node (mesh, spec §6.10) check: a packet from a probe client on node A to one on
//!   node B, for every ordered pair of nodes in a region;
//! * a Tailscale-style STUN binding request builder and a response parser (the server side in
//!   [`crate::stun`] only parses requests).
//!
//! * [`load`]: reading the map to probe from a file, a URL or the operator's ConfigMap.
//!
//! Does not own: the derpMap model and its parsers ([`crate::derpmap`]), output formatting
//! and metrics (the `derpprobe` binary), or any retry policy across runs.
//!
//! The TLS handshake is done here (tokio-rustls with a verifier that records the presented
//! chain), then the established stream is handed to [`crate::client::Client::connect_stream`]: the client's
//! own dialer does not expose the presented chain, which is needed to explain a pin mismatch
//! and to notice a metacert.

pub mod load;
mod node;
mod options;
mod report;
mod stun;
mod tls;

pub use node::{probe_map, probe_node, probe_region};
pub use options::ProbeOptions;
pub use report::{
    Check, FamilyChecks, MeshCheck, MetacertInfo, NodeChecks, NodeReport, REPORT_VERSION,
    RegionReport, Report, Status, TlsInfo,
};
pub use stun::{StunResponseError, parse_binding_response, stun_binding_request, stun_probe};
