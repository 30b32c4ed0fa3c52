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
//! chain), then the established stream is handed to [`Client::connect_stream`]: the client's
//! own dialer does not expose the presented chain, which is needed to explain a pin mismatch
//! and to notice a metacert.

use std::time::Duration;

use rustls::pki_types::CertificateDer;

pub mod load;
mod node;
mod report;
mod stun;
mod tls;

pub use node::{probe_map, probe_node, probe_region};
pub use report::{
    Check, FamilyChecks, MeshCheck, MetacertInfo, NodeChecks, NodeReport, REPORT_VERSION,
    RegionReport, Report, Status, TlsInfo,
};
pub use stun::{StunResponseError, parse_binding_response, stun_binding_request, stun_probe};

// ---------------------------------------------------------------------------------------
// Options

/// Probe options.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Limit for each step (TCP, TLS, DERP handshake, one packet delivery).
    pub timeout: Duration,
    /// Limit for the STUN check (three requests spread over it).
    pub stun_timeout: Duration,
    /// Limit for each cross-node delivery.
    pub mesh_timeout: Duration,
    /// Run cross-node checks in regions with more than one DERP node.
    pub mesh: bool,
    /// Trust anchors for nodes without a `sha256-raw:` pin; when empty, such nodes' chains
    /// are recorded but not verified (and the TLS message says so).
    pub roots: Vec<CertificateDer<'static>>,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            stun_timeout: Duration::from_secs(3),
            mesh_timeout: Duration::from_secs(3),
            mesh: true,
            roots: Vec::new(),
        }
    }
}
