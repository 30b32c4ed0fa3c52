//! The probe's options (limits per step, cross-node checks, trust anchors).

use std::time::Duration;

use rustls::pki_types::CertificateDer;

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
