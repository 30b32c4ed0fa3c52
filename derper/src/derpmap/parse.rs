//! Parsing a derpMap from any of the three formats the operator publishes (spec §9):
//! `derpmap.json` (`tailcfg.DERPMap` JSON), `policy.hujson` (the `"derpMap": {…}` block of a
//! tailnet policy file, or a whole policy file) and `headscale.yaml` (headscale's
//! lower-case YAML). Keys match case-insensitively, as Go's `encoding/json` does. Errors
//! name the source, the line (syntax) or the field path (content).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::{DerpMap, DerpNode, DerpRegion};
use crate::pin::{PIN_PREFIX, Pin};

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
        let nodes = nodes_a
            .iter()
            .enumerate()
            .map(|(i, nv)| decode_node(nv, &format!("{nodes_path}[{i}]"), region_id))
            .collect::<Result<Vec<_>, _>>()?;
        regions.insert(
            id,
            DerpRegion {
                region_id,
                region_code: opt_str(ro, "RegionCode", &p)?,
                region_name: opt_str(ro, "RegionName", &p)?,
                avoid: opt_bool(ro, "Avoid", &p)?,
                no_measure_no_home: opt_bool(ro, "NoMeasureNoHome", &p)?,
                nodes,
            },
        );
    }
    Ok(DerpMap {
        regions,
        omit_default_regions: opt_bool(o, "omitDefaultRegions", prefix)?,
    })
}

/// One `Nodes[i]` entry at `npath`, in region `region_id` (a missing RegionID inherits it).
fn decode_node(nv: &Value, npath: &str, region_id: i64) -> Result<DerpNode, FieldErr> {
    let no = as_object(nv, npath)?;
    let np = format!("{npath}.");
    let name = opt_str(no, "Name", &np)?;
    let node_region_id = match opt_int(no, "RegionID", &np)? {
        0 => region_id,
        r => r,
    };
    let host_name = opt_str(no, "HostName", &np)?;
    let cert_name = opt_str(no, "CertName", &np)?;
    let ipv4 = opt_str(no, "IPv4", &np)?;
    let ipv6 = opt_str(no, "IPv6", &np)?;
    let stun_port = opt_int(no, "STUNPort", &np)?;
    let stun_only = opt_bool(no, "STUNOnly", &np)?;
    let derp_port = opt_int(no, "DERPPort", &np)?;
    let insecure_for_tests = opt_bool(no, "InsecureForTests", &np)?;
    let stun_test_ip = opt_str(no, "STUNTestIP", &np)?;
    let can_port80 = opt_bool(no, "CanPort80", &np)?;
    if name.is_empty() {
        return Err((format!("{np}Name"), "missing or empty".into()));
    }
    if host_name.is_empty() {
        return Err((format!("{np}HostName"), "missing or empty".into()));
    }
    let derp_port = match i32::try_from(derp_port) {
        Ok(p) if (0..=65535).contains(&p) => p,
        _ => {
            return Err((
                format!("{np}DERPPort"),
                format!("{derp_port} is not a port"),
            ));
        }
    };
    let stun_port = match i32::try_from(stun_port) {
        Ok(p) if (-1..=65535).contains(&p) => p,
        _ => {
            return Err((
                format!("{np}STUNPort"),
                format!("{stun_port} is not a port (or -1)"),
            ));
        }
    };
    // Any letter case parses here; the probe explains a non-lowercase pin (spec §3.1).
    if let Some(hex) = cert_name.strip_prefix(PIN_PREFIX)
        && Pin::parse_hex(hex).is_err()
    {
        return Err((
            format!("{np}CertName"),
            format!("{PIN_PREFIX} must be followed by 64 hex digits, got {hex:?}"),
        ));
    }
    if node_region_id != region_id {
        return Err((
            format!("{np}RegionID"),
            format!("{node_region_id} differs from the region's {region_id}"),
        ));
    }
    Ok(DerpNode {
        name,
        region_id,
        host_name,
        cert_name,
        ipv4,
        ipv6,
        stun_port,
        stun_only,
        derp_port,
        insecure_for_tests,
        stun_test_ip,
        can_port80,
    })
}
