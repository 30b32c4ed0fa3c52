//! What a probe found, as the `derpprobe --json` document ([`Report`], schema
//! [`REPORT_VERSION`]) and the operator's per-node status read it: pass/fail/skip checks with
//! human messages and latencies, per node, per region and across nodes (mesh).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Worked.
    Pass,
    /// Failed; the message says why.
    Fail,
    /// Not applicable or not reached (an earlier step failed); never a failure by itself.
    Skip,
}

/// One check: pass/fail/skip, a message a person can act on, and its latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Outcome.
    pub status: Status,
    /// Human explanation.
    pub message: String,
    /// Latency of the step in milliseconds, when it was measured.
    pub latency_ms: Option<f64>,
}

impl Check {
    /// A passed check.
    pub fn pass(message: impl Into<String>, latency: Option<Duration>) -> Self {
        Self {
            status: Status::Pass,
            message: message.into(),
            latency_ms: latency.map(|d| d.as_secs_f64() * 1000.0),
        }
    }

    /// A failed check.
    pub fn fail(message: impl Into<String>) -> Self {
        Self {
            status: Status::Fail,
            message: message.into(),
            latency_ms: None,
        }
    }

    /// A skipped check.
    pub fn skip(message: impl Into<String>) -> Self {
        Self {
            status: Status::Skip,
            message: message.into(),
            latency_ms: None,
        }
    }

    /// True unless failed.
    pub fn ok(&self) -> bool {
        self.status != Status::Fail
    }
}

/// The per-node checks, in the order they run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeChecks {
    /// TCP connect to the DERP port.
    pub tcp: Check,
    /// TLS handshake and pin verification.
    pub tls: Check,
    /// DERP upgrade + ServerKey/ClientInfo/ServerInfo.
    pub derp: Check,
    /// A packet from one probe client to another on this node and back.
    pub round_trip: Check,
    /// STUN binding request/response.
    pub stun: Check,
}

impl NodeChecks {
    /// `(name, check)` pairs in order.
    pub fn iter(&self) -> [(&'static str, &Check); 5] {
        [
            ("tcp", &self.tcp),
            ("tls", &self.tls),
            ("derp", &self.derp),
            ("round_trip", &self.round_trip),
            ("stun", &self.stun),
        ]
    }
}

/// The checks repeated over a node's second address family (IPv6 when both IPv4 and IPv6
/// literals are published).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FamilyChecks {
    /// The DERP address dialled.
    pub address: String,
    /// TCP connect.
    pub tcp: Check,
    /// TLS and pin.
    pub tls: Check,
    /// DERP handshake.
    pub derp: Check,
    /// STUN binding.
    pub stun: Check,
}

impl FamilyChecks {
    /// `(name, check)` pairs in order.
    pub fn iter(&self) -> [(&'static str, &Check); 4] {
        [
            ("tcp", &self.tcp),
            ("tls", &self.tls),
            ("derp", &self.derp),
            ("stun", &self.stun),
        ]
    }
}

/// A metacert seen in the presented chain (spec §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetacertInfo {
    /// Its subject CN (`derpkey<64 hex>`).
    pub common_name: String,
    /// Whether the key in the CN equals the server key of the DERP handshake.
    pub matches_server_key: Option<bool>,
    /// Which clients it breaks for this node ("" when none).
    pub breaks: String,
}

/// What the TLS handshake showed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// Negotiated version, e.g. `TLSv1.3`.
    pub version: String,
    /// The pin from the map (`CertName`), when it is a `sha256-raw:` pin.
    pub expected_pin: Option<String>,
    /// `sha256-raw:` of the presented leaf.
    pub presented_pin: Option<String>,
    /// Number of certificates presented (metacert included).
    pub chain_len: usize,
    /// Leaf NotAfter (RFC 3339), when parseable.
    pub leaf_not_after: Option<String>,
    /// The metacert, when one was presented.
    pub metacert: Option<MetacertInfo>,
}

/// Result for one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node name.
    pub name: String,
    /// Region ID.
    pub region_id: i64,
    /// HostName from the map.
    pub host_name: String,
    /// The DERP address dialled.
    pub address: Option<String>,
    /// The STUN address probed.
    pub stun_address: Option<String>,
    /// True when no check failed.
    pub ok: bool,
    /// The checks.
    pub checks: NodeChecks,
    /// The server's DERP key (`nodekey:…`), when the handshake worked.
    pub server_key: Option<String>,
    /// Whether the client used fast start (TLS 1.3 + metacert, spec §1.4).
    pub fast_start: Option<bool>,
    /// TLS details.
    pub tls: Option<TlsInfo>,
    /// The address STUN reported for us.
    pub stun_mapped_address: Option<String>,
    /// The same checks over IPv6 when the node publishes both an IPv4 and an IPv6 literal
    /// (the main checks then use IPv4).
    pub ipv6: Option<FamilyChecks>,
    /// Observations that are not failures (metacert, SAN, expiry soon…).
    pub notes: Vec<String>,
}

/// One direction of the cross-node check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshCheck {
    /// Node the sending probe client is connected to.
    pub from: String,
    /// Node the receiving probe client is connected to.
    pub to: String,
    /// The outcome.
    #[serde(flatten)]
    pub check: Check,
}

/// Result for one region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionReport {
    /// Region ID.
    pub region_id: i64,
    /// Region code.
    pub region_code: String,
    /// True when nothing failed.
    pub ok: bool,
    /// Per-node results in map order.
    pub nodes: Vec<NodeReport>,
    /// Cross-node checks for every ordered pair of DERP nodes (empty for one node).
    pub mesh: Vec<MeshCheck>,
    /// Region-level problems (e.g. no nodes).
    pub problems: Vec<String>,
}

/// Result for a whole map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Schema version of this JSON document.
    pub version: u32,
    /// True when nothing failed.
    pub ok: bool,
    /// Per-region results.
    pub regions: Vec<RegionReport>,
}

/// JSON schema version of [`Report`].
pub const REPORT_VERSION: u32 = 1;

impl Report {
    /// Every failed check as `region/node check: message` (mesh as `region/a->b mesh`).
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.regions {
            for p in &r.problems {
                out.push(format!("{}: {p}", r.region_id));
            }
            for n in &r.nodes {
                for (name, c) in n.checks.iter() {
                    if c.status == Status::Fail {
                        out.push(format!("{}/{} {name}: {}", r.region_id, n.name, c.message));
                    }
                }
                for (name, c) in n.ipv6.iter().flat_map(|f| f.iter()) {
                    if c.status == Status::Fail {
                        out.push(format!(
                            "{}/{} ipv6 {name}: {}",
                            r.region_id, n.name, c.message
                        ));
                    }
                }
            }
            for m in &r.mesh {
                if m.check.status == Status::Fail {
                    out.push(format!(
                        "{}/{}->{} mesh: {}",
                        r.region_id, m.from, m.to, m.check.message
                    ));
                }
            }
        }
        out
    }
}
