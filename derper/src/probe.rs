//! Probing a derpMap the way a real Tailscale client uses it (used by the `derpprobe` binary
//! and, later, by the operator's status probing).
//!
//! Owns:
//! * the derpMap model and its parsers for the three formats the operator publishes
//!   (`derpmap.json` = `tailcfg.DERPMap` JSON, `policy.hujson` = the `"derpMap": {…}` block of a
//!   tailnet policy file, `headscale.yaml` = headscale's lower-case YAML; spec §9), with errors
//!   that name the source, the line (syntax) or the field path (content);
//! * the per-node checks: TCP connect, TLS with the `sha256-raw:` pin (spec §3; mismatches
//!   explained with both pins, a presented metacert noted with the client versions it breaks,
//!   spec §2.4 / §11 P1), the DERP handshake, a packet round trip between two probe clients on
//!   the node, STUN binding with the mapped address (spec §7), each with its latency;
//! * the cross-node (mesh, spec §6.10) check: a packet from a probe client on node A to one on
//!   node B, for every ordered pair of nodes in a region;
//! * a Tailscale-style STUN binding request builder and a response parser (the server side in
//!   [`crate::stun`] only parses requests).
//!
//! Does not own: output formatting, metrics, reading files / URLs / ConfigMaps (the
//! `derpprobe` binary does that), or any retry policy across runs.
//!
//! The TLS handshake is done here (tokio-rustls with a verifier that records the presented
//! chain), then the established stream is handed to [`Client::connect_stream`]: the client's
//! own dialer does not expose the presented chain, which is needed to explain a pin mismatch
//! and to notice a metacert.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use crate::client::{Client, ClientConfig, TlsMode, UpgradeMode};
use crate::key::{NodePrivateKey, NodePublicKey};
use crate::pin::{PIN_PREFIX, Pin, common_name, parse_metacert};
use crate::proto::codec::ServerFrame;
use crate::stun::{MAGIC_COOKIE, TxId};

// ---------------------------------------------------------------------------------------
// derpMap model

/// `tailcfg.DERPMap` (spec §9.1), the fields a probe needs. Serialises with tailcfg names.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DerpMap {
    /// Regions by region ID.
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<i64, DerpRegion>,
    /// `omitDefaultRegions` (lower-case in tailcfg).
    #[serde(rename = "omitDefaultRegions")]
    pub omit_default_regions: bool,
}

/// `tailcfg.DERPRegion` (spec §9.2).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DerpRegion {
    /// Region ID.
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Short code.
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    /// Long name.
    #[serde(rename = "RegionName")]
    pub region_name: String,
    /// Nodes in priority order.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPNode` (spec §9.3).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DerpNode {
    /// Unique node name.
    #[serde(rename = "Name")]
    pub name: String,
    /// Region ID.
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Host name (TLS name unless an IP literal; DNS name when IPv4/IPv6 are empty).
    #[serde(rename = "HostName")]
    pub host_name: String,
    /// `""`, `sha256-raw:<hex>` (pin) or a domain-fronting name.
    #[serde(rename = "CertName")]
    pub cert_name: String,
    /// `""` = DNS, an IPv4 literal = dial it, anything else = no IPv4.
    #[serde(rename = "IPv4")]
    pub ipv4: String,
    /// Same for IPv6.
    #[serde(rename = "IPv6")]
    pub ipv6: String,
    /// 0 = 3478, -1 = no STUN.
    #[serde(rename = "STUNPort")]
    pub stun_port: i64,
    /// STUN only; never dialled for DERP.
    #[serde(rename = "STUNOnly")]
    pub stun_only: bool,
    /// TLS port, 0 = 443.
    #[serde(rename = "DERPPort")]
    pub derp_port: i64,
    /// Skip TLS verification (tests only).
    #[serde(rename = "InsecureForTests")]
    pub insecure_for_tests: bool,
    /// STUN target IP override.
    #[serde(rename = "STUNTestIP")]
    pub stun_test_ip: String,
    /// Port 80 reachable.
    #[serde(rename = "CanPort80")]
    pub can_port80: bool,
}

impl DerpMap {
    /// Keeps only the regions whose ID or code equals one of `selectors` (all when empty).
    /// Errors when a selector matches no region.
    pub fn filter_regions(&self, selectors: &[String]) -> Result<DerpMap, String> {
        if selectors.is_empty() {
            return Ok(self.clone());
        }
        let mut out = DerpMap {
            regions: BTreeMap::new(),
            omit_default_regions: self.omit_default_regions,
        };
        for sel in selectors {
            let found: Vec<_> = self
                .regions
                .iter()
                .filter(|(id, r)| id.to_string() == *sel || r.region_code == *sel)
                .collect();
            if found.is_empty() {
                let known: Vec<String> = self
                    .regions
                    .values()
                    .map(|r| format!("{} ({})", r.region_id, r.region_code))
                    .collect();
                return Err(format!(
                    "region {sel:?} is not in the map (regions: {})",
                    known.join(", ")
                ));
            }
            for (id, r) in found {
                out.regions.insert(*id, r.clone());
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// derpMap parsing

/// The three published renderings of a derpMap (design §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapFormat {
    /// `derpmap.json`: `tailcfg.DERPMap` JSON.
    Json,
    /// `policy.hujson`: a `"derpMap": {…}` block (or a whole policy file), HuJSON.
    Policy,
    /// `headscale.yaml`: `regions: 900: {regionid, …, nodes: [...]}`.
    Headscale,
}

impl MapFormat {
    /// The ConfigMap key the operator publishes this format under (design §4).
    pub fn configmap_key(self) -> &'static str {
        match self {
            Self::Json => "derpmap.json",
            Self::Policy => "policy.hujson",
            Self::Headscale => "headscale.yaml",
        }
    }
}

impl fmt::Display for MapFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Json => "json",
            Self::Policy => "policy",
            Self::Headscale => "headscale",
        })
    }
}

impl FromStr for MapFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "json" | "derpmap" | "derpmap.json" | "tailcfg" => Ok(Self::Json),
            "policy" | "hujson" | "policy.hujson" => Ok(Self::Policy),
            "headscale" | "yaml" | "headscale.yaml" => Ok(Self::Headscale),
            _ => Err(format!(
                "unknown derpMap format {s:?} (expected json, policy or headscale)"
            )),
        }
    }
}

/// A derpMap that cannot be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}{}{}: {message}", location(*line, *column), field.as_ref().map(|f| format!(": field {f}")).unwrap_or_default())]
pub struct MapError {
    /// Which file / URL / ConfigMap key.
    pub source_name: String,
    /// 1-based line of a syntax error.
    pub line: Option<usize>,
    /// 1-based column of a syntax error.
    pub column: Option<usize>,
    /// Field path of a content error, e.g. `Regions.900.Nodes[0].DERPPort`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl MapError {
    fn syntax(source: &str, line: usize, column: usize, message: String) -> Self {
        Self {
            source_name: source.to_owned(),
            line: Some(line),
            column: Some(column),
            field: None,
            message,
        }
    }

    fn field(source: &str, field: &str, message: impl Into<String>) -> Self {
        Self {
            source_name: source.to_owned(),
            line: None,
            column: None,
            field: (!field.is_empty()).then(|| field.to_owned()),
            message: message.into(),
        }
    }
}

/// Replaces HuJSON comments (`//…`, `/*…*/`) and trailing commas with spaces, keeping every
/// newline so that JSON error positions still point into the original text.
pub fn standardize_hujson(text: &str) -> String {
    let b = text.as_bytes();
    let mut out: Vec<u8> = b.to_vec();
    let mut i = 0;
    let mut in_str = false;
    // Index of the last significant ',' seen outside strings and comments.
    let mut last_comma: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                last_comma = None;
                i += 1;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                out[i] = b' ';
                out[i + 1] = b' ';
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] != b'\n' {
                        out[i] = b' ';
                    }
                    i += 1;
                }
                if i < b.len() {
                    out[i] = b' ';
                    out[i + 1] = b' ';
                    i += 2;
                }
            }
            b',' => {
                last_comma = Some(i);
                i += 1;
            }
            b'}' | b']' => {
                if let Some(p) = last_comma.take() {
                    out[p] = b' ';
                }
                i += 1;
            }
            c if c.is_ascii_whitespace() => i += 1,
            _ => {
                last_comma = None;
                i += 1;
            }
        }
    }
    // Only ASCII bytes outside strings were replaced by ASCII spaces: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| text.to_owned())
}

fn json_syntax(source: &str, e: &serde_json::Error) -> MapError {
    MapError::syntax(source, e.line(), e.column(), e.to_string())
}

/// Parses a derpMap in `format` (auto-detected when `None`); `source` names it in errors.
/// Returns the map and the format it was read as.
///
/// Auto-detection: a document whose first significant character is `{` is JSON (a policy
/// file when it has a top-level `derpMap` key); one starting with `"derpMap"` is a policy
/// snippet; anything else is headscale YAML. JSON is always read as HuJSON (comments and
/// trailing commas allowed), and keys are matched case-insensitively as Go does.
pub fn parse_map(
    text: &str,
    format: Option<MapFormat>,
    source: &str,
) -> Result<(DerpMap, MapFormat), MapError> {
    let std = standardize_hujson(text);
    let first = std.trim_start().chars().next();
    let format = match format {
        Some(f) => f,
        None => match first {
            Some('{') => MapFormat::Json,
            Some('"') => MapFormat::Policy,
            None => return Err(MapError::field(source, "", "the document is empty")),
            _ => MapFormat::Headscale,
        },
    };
    let value = match format {
        MapFormat::Json | MapFormat::Policy => {
            let doc = if first == Some('"') {
                // A bare `"derpMap": {…},` block: make it an object without moving lines.
                format!("{{{std}}}")
            } else {
                std
            };
            let doc = standardize_hujson(&doc);
            serde_json::from_str::<Value>(&doc).map_err(|e| json_syntax(source, &e))?
        }
        MapFormat::Headscale => {
            let y: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
                let (l, c) = e
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((0, 0));
                MapError::syntax(source, l, c, e.to_string())
            })?;
            yaml_to_json(y, "").map_err(|(path, m)| MapError::field(source, &path, m))?
        }
    };
    let (map_value, prefix, found_format) = match (&value, format) {
        (Value::Object(o), MapFormat::Json | MapFormat::Policy) => match get_ci(o, "derpMap") {
            Some(v) => (v, "derpMap.", MapFormat::Policy),
            None if format == MapFormat::Policy => {
                return Err(MapError::field(
                    source,
                    "derpMap",
                    "no top-level \"derpMap\" key in the policy document",
                ));
            }
            None => (&value, "", MapFormat::Json),
        },
        _ => (&value, "", format),
    };
    let map = decode_map(map_value, prefix).map_err(|(p, m)| MapError::field(source, &p, m))?;
    Ok((map, found_format))
}

type FieldErr = (String, String);

fn yaml_to_json(y: serde_yaml::Value, path: &str) -> Result<Value, FieldErr> {
    use serde_yaml::Value as Y;
    Ok(match y {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(seq) => Value::Array(
            seq.into_iter()
                .enumerate()
                .map(|(i, v)| yaml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut o = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => {
                        return Err((path.to_owned(), format!("unsupported map key {other:?}")));
                    }
                };
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                o.insert(key, yaml_to_json(v, &sub)?);
            }
            Value::Object(o)
        }
        Y::Tagged(t) => yaml_to_json(t.value, path)?,
    })
}

/// Case-insensitive object lookup (Go's encoding/json matches keys this way, spec §9).
fn get_ci<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).or_else(|| {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, FieldErr> {
    v.as_object().ok_or_else(|| {
        (
            path.to_owned(),
            format!("expected an object, found {}", kind(v)),
        )
    })
}

fn opt_str(o: &Map<String, Value>, key: &str, path: &str) -> Result<String, FieldErr> {
    match get_ci(o, key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err((
            format!("{path}{key}"),
            format!("expected a string, found {}", kind(v)),
        )),
    }
}

fn opt_int(o: &Map<String, Value>, key: &str, path: &str) -> Result<i64, FieldErr> {
    match get_ci(o, key) {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64().unwrap_or_default()),
        Some(v) => Err((
            format!("{path}{key}"),
            format!("expected an integer, found {}", kind(v)),
        )),
    }
}

fn opt_bool(o: &Map<String, Value>, key: &str, path: &str) -> Result<bool, FieldErr> {
    match get_ci(o, key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err((
            format!("{path}{key}"),
            format!("expected true or false, found {}", kind(v)),
        )),
    }
}

fn decode_map(v: &Value, prefix: &str) -> Result<DerpMap, FieldErr> {
    let o = as_object(v, prefix.trim_end_matches('.'))?;
    let regions_path = format!("{prefix}Regions");
    let regions_v = get_ci(o, "Regions").ok_or_else(|| {
        (
            regions_path.clone(),
            "missing: the map has no \"Regions\" object".to_owned(),
        )
    })?;
    let regions_o = as_object(regions_v, &regions_path)?;
    if regions_o.is_empty() {
        return Err((regions_path, "no regions in the map".into()));
    }
    let mut regions = BTreeMap::new();
    for (key, rv) in regions_o {
        let rpath = format!("{regions_path}.{key}");
        let id: i64 = key.parse().map_err(|_| {
            (
                rpath.clone(),
                format!("region key {key:?} is not an integer region ID"),
            )
        })?;
        let ro = as_object(rv, &rpath)?;
        let p = format!("{rpath}.");
        let region_id = match opt_int(ro, "RegionID", &p)? {
            0 => id,
            r if r == id => r,
            r => {
                return Err((
                    format!("{p}RegionID"),
                    format!("RegionID {r} differs from its key {id}"),
                ));
            }
        };
        let nodes_path = format!("{p}Nodes");
        let nodes_v = get_ci(ro, "Nodes").unwrap_or(&Value::Null);
        let nodes_a: &[Value] = match nodes_v {
            Value::Null => &[],
            Value::Array(a) => a,
            other => {
                return Err((
                    nodes_path,
                    format!("expected an array, found {}", kind(other)),
                ));
            }
        };
        let mut nodes = Vec::new();
        for (i, nv) in nodes_a.iter().enumerate() {
            let npath = format!("{nodes_path}[{i}]");
            let no = as_object(nv, &npath)?;
            let np = format!("{npath}.");
            let node = DerpNode {
                name: opt_str(no, "Name", &np)?,
                region_id: match opt_int(no, "RegionID", &np)? {
                    0 => region_id,
                    r => r,
                },
                host_name: opt_str(no, "HostName", &np)?,
                cert_name: opt_str(no, "CertName", &np)?,
                ipv4: opt_str(no, "IPv4", &np)?,
                ipv6: opt_str(no, "IPv6", &np)?,
                stun_port: opt_int(no, "STUNPort", &np)?,
                stun_only: opt_bool(no, "STUNOnly", &np)?,
                derp_port: opt_int(no, "DERPPort", &np)?,
                insecure_for_tests: opt_bool(no, "InsecureForTests", &np)?,
                stun_test_ip: opt_str(no, "STUNTestIP", &np)?,
                can_port80: opt_bool(no, "CanPort80", &np)?,
            };
            if node.name.is_empty() {
                return Err((format!("{np}Name"), "missing or empty".into()));
            }
            if node.host_name.is_empty() {
                return Err((format!("{np}HostName"), "missing or empty".into()));
            }
            if !(0..=65535).contains(&node.derp_port) {
                return Err((
                    format!("{np}DERPPort"),
                    format!("{} is not a port", node.derp_port),
                ));
            }
            if !(-1..=65535).contains(&node.stun_port) {
                return Err((
                    format!("{np}STUNPort"),
                    format!("{} is not a port (or -1)", node.stun_port),
                ));
            }
            if let Some(hex) = node.cert_name.strip_prefix(PIN_PREFIX)
                && (hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err((
                    format!("{np}CertName"),
                    format!("{PIN_PREFIX} must be followed by 64 hex digits, got {hex:?}"),
                ));
            }
            if node.region_id != region_id {
                return Err((
                    format!("{np}RegionID"),
                    format!("{} differs from the region's {region_id}", node.region_id),
                ));
            }
            nodes.push(node);
        }
        regions.insert(
            id,
            DerpRegion {
                region_id,
                region_code: opt_str(ro, "RegionCode", &p)?,
                region_name: opt_str(ro, "RegionName", &p)?,
                nodes,
            },
        );
    }
    Ok(DerpMap {
        regions,
        omit_default_regions: opt_bool(o, "omitDefaultRegions", prefix)?,
    })
}

// ---------------------------------------------------------------------------------------
// STUN client side (spec §7)

/// SOFTWARE attribute type (spec §7.1).
const STUN_ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT attribute type (spec §7.1).
const STUN_ATTR_FINGERPRINT: u16 = 0x8028;
/// XOR-MAPPED-ADDRESS (spec §7.2).
const STUN_ATTR_XOR_MAPPED: u16 = 0x0020;
/// Non-standard XOR-MAPPED-ADDRESS type Go clients also accept (spec §7.2).
const STUN_ATTR_XOR_MAPPED_ALT: u16 = 0x8020;
/// Plain MAPPED-ADDRESS, Go's fallback (spec §7.2).
const STUN_ATTR_MAPPED: u16 = 0x0001;

/// Builds the 40-byte binding request Tailscale clients send (spec §7.1): SOFTWARE
/// `tailnode`, then FINGERPRINT. Go's derper answers nothing else.
pub fn stun_binding_request(tx: TxId) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&[0x00, 0x01, 0x00, 0x14]);
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(&tx.0);
    m.extend_from_slice(&STUN_ATTR_SOFTWARE.to_be_bytes());
    m.extend_from_slice(&[0x00, 0x08]);
    m.extend_from_slice(b"tailnode");
    let fp = crate::stun::fingerprint(&m);
    m.extend_from_slice(&STUN_ATTR_FINGERPRINT.to_be_bytes());
    m.extend_from_slice(&[0x00, 0x04]);
    m.extend_from_slice(&fp.to_be_bytes());
    m
}

/// Why a STUN response was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunResponseError {
    /// Too short, not a Binding Success Response, or no magic cookie.
    #[error("not a STUN binding success response")]
    NotResponse,
    /// The transaction ID is not ours.
    #[error("transaction ID mismatch")]
    WrongTxId,
    /// Attributes run past the end.
    #[error("malformed attributes")]
    Malformed,
    /// No (XOR-)MAPPED-ADDRESS attribute.
    #[error("no mapped address in the response")]
    NoAddress,
}

/// Parses a binding success response to `tx` and returns the mapped address (an
/// IPv4-mapped IPv6 address is un-mapped, as Go does). Never panics.
pub fn parse_binding_response(buf: &[u8], tx: TxId) -> Result<SocketAddr, StunResponseError> {
    let hdr = buf.get(..20).ok_or(StunResponseError::NotResponse)?;
    if hdr.get(..2) != Some(&[0x01, 0x01]) || hdr.get(4..8) != Some(&MAGIC_COOKIE) {
        return Err(StunResponseError::NotResponse);
    }
    if hdr.get(8..20) != Some(&tx.0) {
        return Err(StunResponseError::WrongTxId);
    }
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let attrs = buf.get(20..20 + len).ok_or(StunResponseError::Malformed)?;
    let mut fallback = None;
    let mut i = 0;
    while i + 4 <= attrs.len() {
        let typ = u16::from_be_bytes([attrs[i], attrs[i + 1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[i + 2], attrs[i + 3]]));
        let val = attrs
            .get(i + 4..i + 4 + alen)
            .ok_or(StunResponseError::Malformed)?;
        match typ {
            STUN_ATTR_XOR_MAPPED | STUN_ATTR_XOR_MAPPED_ALT => {
                if let Some(a) = decode_address(val, Some(&tx)) {
                    return Ok(a);
                }
            }
            STUN_ATTR_MAPPED => fallback = fallback.or_else(|| decode_address(val, None)),
            _ => {}
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    fallback.ok_or(StunResponseError::NoAddress)
}

fn decode_address(val: &[u8], xor_tx: Option<&TxId>) -> Option<SocketAddr> {
    let family = *val.get(1)?;
    let mut port = u16::from_be_bytes([*val.get(2)?, *val.get(3)?]);
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE);
    if let Some(tx) = xor_tx {
        port ^= 0x2112;
        mask[4..].copy_from_slice(&tx.0);
    } else {
        mask = [0; 16];
    }
    let ip = match family {
        1 => {
            let a = val.get(4..8)?;
            let mut o = [0u8; 4];
            for (k, b) in o.iter_mut().enumerate() {
                *b = a[k] ^ mask[k];
            }
            IpAddr::from(o)
        }
        2 => {
            let a = val.get(4..20)?;
            let mut o = [0u8; 16];
            for (k, b) in o.iter_mut().enumerate() {
                *b = a[k] ^ mask[k];
            }
            let v6 = std::net::Ipv6Addr::from(o);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Sends binding requests to `target` (three attempts spread over `timeout`) and returns
/// the mapped address and the round-trip time of the answered request.
pub async fn stun_probe(
    target: SocketAddr,
    timeout: Duration,
) -> Result<(SocketAddr, Duration), String> {
    let bind: SocketAddr = if target.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("binding a UDP socket: {e}"))?;
    let attempts = 3u32;
    let per = timeout / attempts;
    let mut buf = [0u8; 1024];
    for _ in 0..attempts {
        let tx = TxId(rand::random());
        let req = stun_binding_request(tx);
        let start = Instant::now();
        sock.send_to(&req, target)
            .await
            .map_err(|e| format!("sending to {target}: {e}"))?;
        let deadline = start + per;
        loop {
            let r = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await;
            match r {
                Err(_) => break,
                Ok(Err(e)) => {
                    // ICMP port unreachable surfaces as ECONNREFUSED on some systems.
                    return Err(format!("no STUN answer from {target}: {e}"));
                }
                Ok(Ok((n, from))) => {
                    if from != target {
                        continue;
                    }
                    match parse_binding_response(buf.get(..n).unwrap_or_default(), tx) {
                        Ok(mapped) => return Ok((mapped, start.elapsed())),
                        Err(StunResponseError::WrongTxId) => continue,
                        Err(e) => return Err(format!("bad STUN answer from {target}: {e}")),
                    }
                }
            }
        }
    }
    Err(format!(
        "no STUN answer from {target} within {} ({attempts} requests)",
        fmt_duration(timeout)
    ))
}

// ---------------------------------------------------------------------------------------
// Result types

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

// ---------------------------------------------------------------------------------------
// TLS

/// What the verifier must check.
#[derive(Debug)]
enum Expect {
    /// The pinned end-entity certificate ([`crate::pin::check_chain`]).
    Pin(Pin),
    /// WebPKI against the given roots, for this name (CertName when domain fronting).
    Roots(Arc<WebPkiServerVerifier>, ServerName<'static>),
    /// Nothing (InsecureForTests, or no roots available).
    Nothing,
}

/// Records the presented chain, then verifies it as `expect` says. Signatures are always
/// checked.
#[derive(Debug)]
struct RecordingVerifier {
    expect: Expect,
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    algs: WebPkiSupportedAlgorithms,
}

fn is_metacert(der: &[u8]) -> bool {
    parse_metacert(der).is_some()
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        {
            // No await while locked.
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        match &self.expect {
            Expect::Nothing => Ok(ServerCertVerified::assertion()),
            Expect::Roots(v, name) => {
                let _ = server_name;
                v.verify_server_cert(end_entity, intermediates, name, ocsp_response, now)
            }
            Expect::Pin(pin) => {
                crate::pin::verify_rustls(pin, end_entity, intermediates, server_name, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// One established TLS connection plus what it showed.
struct TlsOutcome {
    check: Check,
    info: Option<TlsInfo>,
    notes: Vec<String>,
    stream: Option<TlsStream>,
    metacert_key: Option<NodePublicKey>,
}

fn tls_version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "unknown".into(),
    }
}

/// Explains a pin that differs from the presented end-entity certificate's.
fn pin_mismatch(expected: &str, presented: &str) -> String {
    let mut m = format!(
        "pinned certificate mismatch: the map expects {expected} (CertName) but the node \
         presented {presented}"
    );
    if expected.eq_ignore_ascii_case(presented) {
        m.push_str(
            "; they differ only in letter case and clients compare lowercase hex exactly \
             (spec §3.1): write the pin in lowercase",
        );
    } else {
        m.push_str("; publish the presented pin in the map or serve the pinned certificate");
    }
    m
}

async fn tls_connect(
    node: &DerpNode,
    tcp: TcpStream,
    opts: &ProbeOptions,
    with_notes: bool,
) -> TlsOutcome {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Clients compare the lowercase hex exactly (spec §3.1): a pin written in another case
    // is parsed here so that the failure can be explained, then reported after the handshake.
    let pin = node
        .cert_name
        .strip_prefix(PIN_PREFIX)
        .and_then(|hex| Pin::parse_hex(hex).ok());
    let fronting = !node.cert_name.is_empty() && pin.is_none();
    let verify_name = if fronting {
        node.cert_name.as_str()
    } else {
        node.host_name.as_str()
    };
    let mut unverified = false;
    let expect = if node.insecure_for_tests {
        Expect::Nothing
    } else if let Some(p) = pin {
        Expect::Pin(p)
    } else if opts.roots.is_empty() {
        unverified = true;
        Expect::Nothing
    } else {
        let mut store = rustls::RootCertStore::empty();
        for c in &opts.roots {
            let _ = store.add(c.clone());
        }
        match WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone()).build()
        {
            Ok(v) => match server_name_of(verify_name) {
                Ok(n) => Expect::Roots(v, n),
                Err(e) => return tls_fail(e),
            },
            Err(e) => return tls_fail(format!("building the WebPKI verifier: {e}")),
        }
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = RecordingVerifier {
        expect,
        seen: seen.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
    {
        Ok(b) => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
        Err(e) => return tls_fail(format!("TLS configuration: {e}")),
    };
    // SNI = HostName unless it is an IP literal (spec §9.3); domain fronting verifies for
    // CertName but still sends HostName.
    let sni = match server_name_of(&node.host_name) {
        Ok(n) => n,
        Err(e) => return tls_fail(e),
    };
    let start = Instant::now();
    let res = tokio::time::timeout(
        opts.timeout,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(sni, tcp),
    )
    .await;
    let latency = start.elapsed();
    let chain: Vec<CertificateDer<'static>> =
        seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let expected_pin = pin.is_some().then(|| node.cert_name.clone());
    let meta_der = chain.iter().find(|c| is_metacert(c));
    // Certificates after the end entity that are not metacerts (pinned clients refuse them).
    let extra = chain.iter().skip(1).filter(|c| !is_metacert(c)).count();
    let leaf = chain.first();
    let presented_pin = leaf.map(|l| Pin::of_der(l).to_string());
    let mut notes = Vec::new();
    let metacert = meta_der.map(|m| {
        let cn = common_name(m).unwrap_or_default();
        let breaks = if pin.is_some() {
            "Tailscale v1.82.0–v1.82.5 clients reject this pinned node: with a sha256-raw \
             CertName they refuse any chain of more than one certificate ('unexpected multiple \
             certs presented'; spec §2.4, §11 P1). v1.84+ skip the metacert and use fast start."
                .to_owned()
        } else {
            String::new()
        };
        MetacertInfo {
            common_name: cn,
            matches_server_key: None,
            breaks,
        }
    });
    if let Some(m) = &metacert
        && with_notes
    {
        if m.breaks.is_empty() {
            notes.push(format!(
                "metacert presented (CN {}…): TLS 1.3 clients use fast start; harmless for \
                 WebPKI verification",
                m.common_name.get(..15).unwrap_or(&m.common_name)
            ));
        } else {
            notes.push(format!(
                "metacert presented (CN {}…): {}",
                m.common_name.get(..15).unwrap_or(&m.common_name),
                m.breaks
            ));
        }
    }
    let mut leaf_not_after = None;
    let mut expired = None;
    if let Some(l) = leaf
        && let Ok((_, x)) = x509_parser::parse_x509_certificate(l)
    {
        let na = x.validity().not_after.to_datetime();
        leaf_not_after = na
            .format(&time::format_description::well_known::Rfc3339)
            .ok();
        if !x.validity().is_valid() {
            expired = Some(format!(
                "the leaf certificate is outside its validity period (NotBefore {}, NotAfter {}); \
                 clients of every version reject it",
                x.validity().not_before,
                x.validity().not_after
            ));
        } else if with_notes {
            let left = na - time::OffsetDateTime::now_utc();
            if left < time::Duration::days(14) {
                notes.push(format!(
                    "the leaf certificate expires in {} days",
                    left.whole_days()
                ));
            }
        }
        if with_notes
            && pin.is_some()
            && let Ok(ip) = node.host_name.parse::<IpAddr>()
        {
            let has_ip_san = x
                .subject_alternative_name()
                .ok()
                .flatten()
                .is_some_and(|san| {
                    san.value.general_names.iter().any(|g| match g {
                        x509_parser::extensions::GeneralName::IPAddress(b) => match ip {
                            IpAddr::V4(v4) => *b == v4.octets().as_slice(),
                            IpAddr::V6(v6) => *b == v6.octets().as_slice(),
                        },
                        _ => false,
                    })
                });
            if !has_ip_san {
                notes.push(format!(
                    "the leaf has no IP SAN for {ip}: Tailscale v1.82–v1.84.x pinned clients \
                     reject it (spec §11 P2)"
                ));
            }
        }
    }
    let metacert_key = meta_der.and_then(|m| parse_metacert(m)).map(|m| m.key);
    let info = (!chain.is_empty()).then(|| TlsInfo {
        version: String::new(),
        expected_pin: expected_pin.clone(),
        presented_pin: presented_pin.clone(),
        chain_len: chain.len(),
        leaf_not_after,
        metacert,
    });
    let stream = match res {
        Err(_) => {
            return TlsOutcome {
                check: Check::fail(format!(
                    "TLS handshake timed out after {}",
                    fmt_duration(opts.timeout)
                )),
                info,
                notes,
                stream: None,
                metacert_key: None,
            };
        }
        Ok(Err(e)) => {
            let msg = match (&expected_pin, &presented_pin) {
                (Some(exp), Some(got)) if exp != got => pin_mismatch(exp, got),
                (Some(_), _) if extra > 0 => format!(
                    "the node presented {extra} certificate(s) after the leaf that are not \
                     metacerts; with a sha256-raw pin clients accept exactly one (no \
                     intermediates, spec §2.4)"
                ),
                _ => format!("TLS handshake failed: {e}"),
            };
            return TlsOutcome {
                check: Check::fail(msg),
                info,
                notes,
                stream: None,
                metacert_key: None,
            };
        }
        Ok(Ok(s)) => s,
    };
    // The chain verified against the pin parsed in any letter case; clients would not.
    if let (Some(exp), Some(got)) = (&expected_pin, &presented_pin)
        && exp != got
    {
        return TlsOutcome {
            check: Check::fail(pin_mismatch(exp, got)),
            info,
            notes,
            stream: None,
            metacert_key: None,
        };
    }
    let version = tls_version_name(stream.get_ref().1.protocol_version());
    let info = info.map(|mut i| {
        i.version = version.clone();
        i
    });
    let check = if let Some(why) = expired {
        Check::fail(why)
    } else if let Some(p) = &presented_pin
        && pin.is_some()
    {
        Check::pass(format!("{version}, pin matches ({p})"), Some(latency))
    } else if node.insecure_for_tests {
        Check::pass(
            format!("{version}, not verified (InsecureForTests)"),
            Some(latency),
        )
    } else if unverified {
        Check::pass(
            format!(
                "{version}, certificate NOT verified: no sha256-raw pin and no trust anchors \
                 (pass --ca-file to verify WebPKI nodes)"
            ),
            Some(latency),
        )
    } else {
        Check::pass(
            format!("{version}, chain verified for {verify_name}"),
            Some(latency),
        )
    };
    TlsOutcome {
        check,
        info,
        notes,
        stream: Some(stream),
        metacert_key,
    }
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, String> {
    match name.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => {
            ServerName::try_from(name.to_owned()).map_err(|e| format!("TLS name {name:?}: {e}"))
        }
    }
}

fn tls_fail(msg: String) -> TlsOutcome {
    TlsOutcome {
        check: Check::fail(msg),
        info: None,
        notes: Vec::new(),
        stream: None,
        metacert_key: None,
    }
}

// ---------------------------------------------------------------------------------------
// Node probing

/// Formats a duration for messages (`250ms`, `3s`, `1.5s`).
pub fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The DERP port (0 = 443, spec §9.3).
fn derp_port(node: &DerpNode) -> u16 {
    match node.derp_port {
        0 => 443,
        p => u16::try_from(p).unwrap_or(443),
    }
}

/// Picks the address to dial for `port`: the IPv4 literal, else the IPv6 literal, else DNS
/// of HostName restricted to the families whose field is empty (spec §9.3).
async fn resolve(node: &DerpNode, ip_override: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(ip) = ip_override.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if let Ok(ip) = node.ipv4.parse::<std::net::Ipv4Addr>() {
        return Ok(SocketAddr::new(ip.into(), port));
    }
    if let Ok(ip) = node.ipv6.parse::<std::net::Ipv6Addr>() {
        return Ok(SocketAddr::new(ip.into(), port));
    }
    if let Ok(ip) = node.host_name.parse::<IpAddr>() {
        let allowed = match ip {
            IpAddr::V4(_) => node.ipv4.is_empty(),
            IpAddr::V6(_) => node.ipv6.is_empty(),
        };
        if allowed {
            return Ok(SocketAddr::new(ip, port));
        }
    }
    let (v4, v6) = (node.ipv4.is_empty(), node.ipv6.is_empty());
    if !v4 && !v6 {
        return Err(format!(
            "no usable address: IPv4 {:?} and IPv6 {:?} are neither addresses nor empty",
            node.ipv4, node.ipv6
        ));
    }
    let addrs = tokio::net::lookup_host((node.host_name.as_str(), port))
        .await
        .map_err(|e| format!("resolving {}: {e}", node.host_name))?;
    addrs
        .into_iter()
        .find(|a| (a.is_ipv4() && v4) || (a.is_ipv6() && v6))
        .ok_or_else(|| format!("{} has no address of an allowed family", node.host_name))
}

/// One full probe connection and the check results of its steps.
struct Dialed {
    tcp: Check,
    tls: Check,
    derp: Check,
    address: Option<SocketAddr>,
    tls_info: Option<TlsInfo>,
    notes: Vec<String>,
    client: Option<Client>,
}

async fn dial(node: &DerpNode, opts: &ProbeOptions, with_notes: bool) -> Dialed {
    dial_at(node, None, opts, with_notes).await
}

/// [`dial`] to `at` instead of the address [`resolve`] picks.
async fn dial_at(
    node: &DerpNode,
    at: Option<SocketAddr>,
    opts: &ProbeOptions,
    with_notes: bool,
) -> Dialed {
    let mut d = Dialed {
        tcp: Check::skip("not reached"),
        tls: Check::skip("not reached"),
        derp: Check::skip("not reached"),
        address: None,
        tls_info: None,
        notes: Vec::new(),
        client: None,
    };
    let port = derp_port(node);
    let resolved = match at {
        Some(a) => Ok(a),
        None => resolve(node, "", port).await,
    };
    let addr = match resolved {
        Ok(a) => a,
        Err(e) => {
            d.tcp = Check::fail(e);
            return d;
        }
    };
    d.address = Some(addr);
    let start = Instant::now();
    let tcp = match tokio::time::timeout(opts.timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            d.tcp = Check::fail(format!(
                "connecting to {addr} timed out after {}",
                fmt_duration(opts.timeout)
            ));
            return d;
        }
        Ok(Err(e)) => {
            d.tcp = Check::fail(format!("connecting to {addr}: {e}"));
            return d;
        }
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    d.tcp = Check::pass(format!("connected to {addr}"), Some(start.elapsed()));
    let t = tls_connect(node, tcp, opts, with_notes).await;
    d.tls = t.check;
    d.tls_info = t.info;
    d.notes = t.notes;
    let Some(stream) = t.stream else {
        return d;
    };
    let tls13 = stream.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    // Like Go (spec §2.3, §11 P4): fast start only with TLS 1.3 and a usable metacert.
    let upgrade = match (tls13, t.metacert_key) {
        (true, Some(k)) if !k.is_zero() => UpgradeMode::FastStart(k),
        _ => UpgradeMode::Plain,
    };
    let mut cfg = ClientConfig::new(addr);
    cfg.host = node.host_name.clone();
    cfg.tls = TlsMode::Plain;
    cfg.upgrade = upgrade;
    cfg.is_prober = true;
    cfg.connect_timeout = opts.timeout;
    let key = NodePrivateKey::generate();
    let start = Instant::now();
    match tokio::time::timeout(opts.timeout, Client::connect_stream(stream, &cfg, &key)).await {
        Err(_) => {
            d.derp = Check::fail(format!(
                "DERP handshake timed out after {} (no 101 / ServerKey / ServerInfo)",
                fmt_duration(opts.timeout)
            ));
        }
        Ok(Err(e)) => d.derp = Check::fail(format!("DERP handshake failed: {e}")),
        Ok(Ok(c)) => {
            let fast = c.used_fast_start();
            if let (Some(info), Some(mk)) = (d.tls_info.as_mut(), t.metacert_key) {
                if let Some(m) = info.metacert.as_mut() {
                    m.matches_server_key = Some(mk == c.server_key());
                }
                if mk != c.server_key() && with_notes {
                    d.notes
                        .push("the metacert names a different key than the ServerKey frame".into());
                }
            }
            d.derp = Check::pass(
                format!(
                    "server key {}, {}",
                    c.server_key().to_nodekey_string(),
                    if fast {
                        "fast start"
                    } else {
                        "101 Switching Protocols"
                    }
                ),
                Some(start.elapsed()),
            );
            d.client = Some(c);
        }
    }
    d
}

/// Waits on `to` for a RecvPacket carrying exactly `payload` (answering server pings).
async fn wait_for_packet(to: &mut Client, payload: &[u8]) -> Result<NodePublicKey, String> {
    loop {
        match to.recv().await {
            Ok(ServerFrame::RecvPacket { src, packet }) if packet.as_ref() == payload => {
                return Ok(src);
            }
            Ok(ServerFrame::Ping(d)) => {
                let _ = to.writer().send_pong(d).await;
            }
            Ok(_) => {}
            Err(e) => return Err(format!("receiving: {e}")),
        }
    }
}

/// Interval between re-sends while waiting for delivery (the receiver may be registered
/// with a short delay, or a mesh peer may still be learning about it).
const RESEND_EVERY: Duration = Duration::from_millis(250);

/// Sends a fresh payload from `from` to `to`'s key until it arrives or `limit` passes;
/// returns the delivery time measured from the send that arrived.
async fn deliver(from: &mut Client, to: &mut Client, limit: Duration) -> Result<Duration, String> {
    let mut payload = b"derpprobe ".to_vec();
    payload.extend_from_slice(&rand::random::<[u8; 16]>());
    let dst = to.public_key();
    let deadline = Instant::now() + limit;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("nothing arrived within {}", fmt_duration(limit)));
        }
        let sent = Instant::now();
        match tokio::time::timeout_at(deadline, from.send_packet(&dst, &payload)).await {
            Err(_) => return Err("sending timed out".into()),
            Ok(Err(e)) => return Err(format!("sending: {e}")),
            Ok(Ok(())) => {}
        }
        let wait_until = (sent + RESEND_EVERY).min(deadline);
        match tokio::time::timeout_at(wait_until, wait_for_packet(to, &payload)).await {
            Ok(Ok(src)) if src == from.public_key() => return Ok(sent.elapsed()),
            Ok(Ok(src)) => {
                return Err(format!(
                    "the packet arrived from {} instead of the sender",
                    src.short()
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {}
        }
    }
}

/// Probe clients kept open after a node's checks, for the cross-node checks.
struct NodeClients {
    sender: Client,
    receiver: Client,
}

async fn probe_node_inner(
    node: &DerpNode,
    opts: &ProbeOptions,
) -> (NodeReport, Option<NodeClients>) {
    let stun_fut = probe_stun(node, None, opts);
    let derp_fut = async {
        if node.stun_only {
            return None;
        }
        let a = dial(node, opts, true).await;
        Some(a)
    };
    let v6_fut = async {
        match second_family(node) {
            Some(v6) => Some(Box::pin(probe_ipv6(node, v6, opts)).await),
            None => None,
        }
    };
    let ((stun, stun_address, mapped), a, ipv6) = tokio::join!(stun_fut, derp_fut, v6_fut);
    let mut report = NodeReport {
        name: node.name.clone(),
        region_id: node.region_id,
        host_name: node.host_name.clone(),
        address: None,
        stun_address,
        ok: false,
        checks: NodeChecks {
            tcp: Check::skip("STUNOnly node: not dialled for DERP"),
            tls: Check::skip("STUNOnly node"),
            derp: Check::skip("STUNOnly node"),
            round_trip: Check::skip("STUNOnly node"),
            stun,
        },
        server_key: None,
        fast_start: None,
        tls: None,
        stun_mapped_address: mapped,
        ipv6,
        notes: Vec::new(),
    };
    let mut clients = None;
    if let Some(a) = a {
        report.address = a.address.map(|x| x.to_string());
        report.checks.tcp = a.tcp;
        report.checks.tls = a.tls;
        report.checks.derp = a.derp;
        report.tls = a.tls_info;
        report.notes = a.notes;
        report.checks.round_trip = Check::skip("not reached (DERP handshake failed)");
        if let Some(mut ca) = a.client {
            report.server_key = Some(ca.server_key().to_nodekey_string());
            report.fast_start = Some(ca.used_fast_start());
            let b = dial(node, opts, false).await;
            match b.client {
                None => {
                    let why = [b.tcp, b.tls, b.derp]
                        .into_iter()
                        .find(|c| c.status == Status::Fail)
                        .map(|c| c.message)
                        .unwrap_or_default();
                    report.checks.round_trip =
                        Check::fail(format!("a second probe client could not connect: {why}"));
                }
                Some(mut cb) => {
                    if cb.server_key() != ca.server_key() {
                        report.notes.push(format!(
                            "two connections saw different server keys ({} and {}): several \
                             relays behind one address? (spec §2.6)",
                            ca.server_key().short(),
                            cb.server_key().short()
                        ));
                    }
                    let there = deliver(&mut ca, &mut cb, opts.timeout).await;
                    let back = match &there {
                        Ok(_) => deliver(&mut cb, &mut ca, opts.timeout).await,
                        Err(_) => Err(String::new()),
                    };
                    match (there, back) {
                        (Ok(t1), Ok(t2)) => {
                            report.checks.round_trip = Check::pass(
                                "packet relayed between two probe clients in both directions",
                                Some(t1 + t2),
                            );
                            clients = Some(NodeClients {
                                sender: ca,
                                receiver: cb,
                            });
                        }
                        (Err(e), _) => {
                            report.checks.round_trip =
                                Check::fail(format!("client A -> client B: {e}"));
                        }
                        (Ok(_), Err(e)) => {
                            report.checks.round_trip =
                                Check::fail(format!("client B -> client A: {e}"));
                        }
                    }
                }
            }
        }
    }
    report.ok = report.checks.iter().iter().all(|(_, c)| c.ok())
        && report
            .ipv6
            .as_ref()
            .is_none_or(|f| f.iter().iter().all(|(_, c)| c.ok()));
    (report, clients)
}

/// Runs the STUN check; returns (check, probed address, mapped address).
async fn probe_stun(
    node: &DerpNode,
    at: Option<IpAddr>,
    opts: &ProbeOptions,
) -> (Check, Option<String>, Option<String>) {
    let port = match node.stun_port {
        -1 => return (Check::skip("STUN disabled (STUNPort -1)"), None, None),
        0 => 3478,
        p => match u16::try_from(p) {
            Ok(p) => p,
            Err(_) => {
                return (
                    Check::fail(format!("STUNPort {p} is not a port")),
                    None,
                    None,
                );
            }
        },
    };
    let resolved = match at {
        Some(ip) => Ok(SocketAddr::new(ip, port)),
        None => resolve(node, &node.stun_test_ip, port).await,
    };
    let target = match resolved {
        Ok(t) => t,
        Err(e) => return (Check::fail(e), None, None),
    };
    match stun_probe(target, opts.stun_timeout).await {
        Ok((mapped, rtt)) => (
            Check::pass(format!("mapped address {mapped}"), Some(rtt)),
            Some(target.to_string()),
            Some(mapped.to_string()),
        ),
        Err(e) => (Check::fail(e), Some(target.to_string()), None),
    }
}

/// The node's IPv6 literal when the primary checks used its IPv4 literal (both families
/// published, spec §9.3): clients use either, so both are checked.
fn second_family(node: &DerpNode) -> Option<std::net::Ipv6Addr> {
    node.ipv4.parse::<std::net::Ipv4Addr>().ok()?;
    node.ipv6.parse().ok()
}

/// TCP, TLS, DERP handshake and STUN over the node's IPv6 address.
async fn probe_ipv6(node: &DerpNode, v6: std::net::Ipv6Addr, opts: &ProbeOptions) -> FamilyChecks {
    let addr = SocketAddr::new(v6.into(), derp_port(node));
    let derp_fut = async {
        if node.stun_only {
            return None;
        }
        Some(dial_at(node, Some(addr), opts, false).await)
    };
    let stun_fut = async {
        if node.stun_test_ip.is_empty() {
            probe_stun(node, Some(v6.into()), opts).await.0
        } else {
            Check::skip("STUNTestIP overrides the STUN target")
        }
    };
    let (d, stun) = tokio::join!(derp_fut, stun_fut);
    let (tcp, tls, derp) = match d {
        Some(d) => (d.tcp, d.tls, d.derp),
        None => (
            Check::skip("STUNOnly node"),
            Check::skip("STUNOnly node"),
            Check::skip("STUNOnly node"),
        ),
    };
    FamilyChecks {
        address: addr.to_string(),
        tcp,
        tls,
        derp,
        stun,
    }
}

/// Probes one node (all checks except the cross-node ones) and closes its clients.
pub async fn probe_node(node: &DerpNode, opts: &ProbeOptions) -> NodeReport {
    Box::pin(probe_node_inner(node, opts)).await.0
}

/// Probes every node of a region concurrently, then (with `opts.mesh` and more than one
/// DERP node) every ordered pair of nodes: a packet from a probe client on `from` to a probe
/// client on `to`, which only arrives when the two relays are meshed (spec §6.10).
pub async fn probe_region(region: &DerpRegion, opts: &ProbeOptions) -> RegionReport {
    let results =
        futures::future::join_all(region.nodes.iter().map(|n| probe_node_inner(n, opts))).await;
    let mut nodes = Vec::new();
    let mut clients: Vec<(String, bool, Option<NodeClients>)> = Vec::new();
    for (node, (report, c)) in region.nodes.iter().zip(results) {
        clients.push((node.name.clone(), node.stun_only, c));
        nodes.push(report);
    }
    let mut problems = Vec::new();
    if region.nodes.is_empty() {
        problems.push("the region has no nodes".to_owned());
    }
    let mut mesh = Vec::new();
    let derp_nodes: Vec<usize> = (0..clients.len()).filter(|&i| !clients[i].1).collect();
    if opts.mesh && derp_nodes.len() > 1 {
        for &i in &derp_nodes {
            for &j in &derp_nodes {
                if i == j {
                    continue;
                }
                let (from, to) = (clients[i].0.clone(), clients[j].0.clone());
                let check = mesh_check(&mut clients, i, j, opts.mesh_timeout).await;
                mesh.push(MeshCheck { from, to, check });
            }
        }
    }
    let ok = problems.is_empty() && nodes.iter().all(|n| n.ok) && mesh.iter().all(|m| m.check.ok());
    RegionReport {
        region_id: region.region_id,
        region_code: region.region_code.clone(),
        ok,
        nodes,
        mesh,
        problems,
    }
}

async fn mesh_check(
    clients: &mut [(String, bool, Option<NodeClients>)],
    i: usize,
    j: usize,
    limit: Duration,
) -> Check {
    let (from_name, to_name) = (clients[i].0.clone(), clients[j].0.clone());
    // Borrow two distinct elements mutably.
    let (a, b) = if i < j {
        let (l, r) = clients.split_at_mut(j);
        (&mut l[i], &mut r[0])
    } else {
        let (l, r) = clients.split_at_mut(i);
        (&mut r[0], &mut l[j])
    };
    let (Some(ca), Some(cb)) = (a.2.as_mut(), b.2.as_mut()) else {
        let down: Vec<&str> = [(&a.0, &a.2), (&b.0, &b.2)]
            .into_iter()
            .filter(|(_, c)| c.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        return Check::fail(format!(
            "cannot check {from_name} -> {to_name}: no working probe clients on {} (see its \
             node checks)",
            down.join(" and ")
        ));
    };
    match deliver(&mut ca.sender, &mut cb.receiver, limit).await {
        Ok(t) => Check::pass(
            format!("packet from a client on {from_name} reached a client on {to_name}"),
            Some(t),
        ),
        Err(e) => Check::fail(format!(
            "a packet from a client on {from_name} to a client on {to_name} was not delivered \
             ({e}): the relays are not meshed, or the mesh link {from_name} -> {to_name} is \
             down (check the mesh key and the mesh-with/peers list)"
        )),
    }
}

/// Probes every region of `map` (regions one after another, nodes of a region
/// concurrently).
pub async fn probe_map(map: &DerpMap, opts: &ProbeOptions) -> Report {
    let mut regions = Vec::new();
    for r in map.regions.values() {
        regions.push(probe_region(r, opts).await);
    }
    Report {
        version: REPORT_VERSION,
        ok: regions.iter().all(|r| r.ok),
        regions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_request_matches_spec_vector() {
        let tx = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(
            hex::encode(stun_binding_request(tx)),
            "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f"
        );
        assert_eq!(
            crate::stun::parse_binding_request(&stun_binding_request(tx)),
            Ok(tx)
        );
    }

    #[test]
    fn stun_response_vectors_parse() {
        let tx = TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let v4 = hex::decode("0101000c2112a4420102030405060708090a0b0c00200008000183bbea12d545")
            .unwrap();
        assert_eq!(
            parse_binding_response(&v4, tx).unwrap(),
            "203.0.113.7:41641".parse().unwrap()
        );
        let v6 = hex::decode(
            "010100182112a4420102030405060708090a0b0c00200014000283bb0113a9fa0102030405060708090a0b0d",
        )
        .unwrap();
        assert_eq!(
            parse_binding_response(&v6, tx).unwrap(),
            "[2001:db8::1]:41641".parse().unwrap()
        );
        let other = TxId([9; 12]);
        assert_eq!(
            parse_binding_response(&v4, other),
            Err(StunResponseError::WrongTxId)
        );
        for n in 0..v6.len() {
            let _ = parse_binding_response(&v6[..n], tx);
        }
    }

    #[test]
    fn hujson_comments_and_trailing_commas_are_blanked_in_place() {
        let src = "{\n // c\n \"a\": [1, 2,], /* x\n y */ \"b\": \"//not\",\n}";
        let s = standardize_hujson(src);
        assert_eq!(s.len(), src.len());
        assert_eq!(s.lines().count(), src.lines().count());
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["b"], "//not");
        assert_eq!(v["a"][1], 2);
    }
}
