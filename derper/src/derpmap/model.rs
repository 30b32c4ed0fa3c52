//! The model's types: `tailcfg.DERPMap`, `DERPRegion` and `DERPNode` (spec §9.1), and the
//! port sentinels. Used by the parser and the renderings next to it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::defaults::{DEFAULT_DERP_PORT, DEFAULT_STUN_PORT};

pub(super) fn is_false(b: &bool) -> bool {
    !*b
}
pub(super) fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// `tailcfg.DERPMap` (spec §9.1). Fields are omitted from JSON when empty, as Go's
/// `omitempty` does.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DerpMap {
    /// Regions keyed by region ID (JSON object keys are strings, e.g. `"900"`; the
    /// `BTreeMap` keeps them in numeric order, which makes rendering deterministic).
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<i64, DerpRegion>,
    /// Drop Tailscale's default regions (lower-case key in tailcfg).
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    pub omit_default_regions: bool,
}

/// `tailcfg.DERPRegion` (spec §9.2), the fields we use, in tailcfg's order.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct DerpRegion {
    /// Region ID (900–999 are for user-run DERPs).
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Short code.
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    /// Long name.
    #[serde(rename = "RegionName")]
    pub region_name: String,
    /// Deprecated: avoid as home.
    #[serde(rename = "Avoid", skip_serializing_if = "is_false")]
    pub avoid: bool,
    /// Never measured, never home.
    #[serde(rename = "NoMeasureNoHome", skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    /// Nodes in priority order.
    #[serde(rename = "Nodes")]
    pub nodes: Vec<DerpNode>,
}

/// `tailcfg.DERPNode` (spec §9.3), in tailcfg's field order.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, Default)]
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
    /// `""`, `sha256-raw:<hex>` (pin, spec §3.1) or a domain-fronting name.
    #[serde(rename = "CertName", skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// `""` = DNS, an IPv4 literal = dial it, anything else (e.g. `none`) = no IPv4.
    #[serde(rename = "IPv4", skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    /// Same for IPv6.
    #[serde(rename = "IPv6", skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// STUN port: 0 = 3478, -1 = no STUN.
    #[serde(rename = "STUNPort", skip_serializing_if = "is_zero")]
    pub stun_port: i32,
    /// STUN only; never dialled for DERP.
    #[serde(rename = "STUNOnly", skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// DERP TLS port: 0 = 443.
    #[serde(rename = "DERPPort", skip_serializing_if = "is_zero")]
    pub derp_port: i32,
    /// Skip TLS verification (tests only; never published by the operator).
    #[serde(rename = "InsecureForTests", skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    /// STUN target IP override (tests only; never published by the operator).
    #[serde(rename = "STUNTestIP", skip_serializing_if = "String::is_empty")]
    pub stun_test_ip: String,
    /// Port 80 reachable.
    #[serde(rename = "CanPort80", skip_serializing_if = "is_false")]
    pub can_port80: bool,
}

/// Why a node has no STUN port to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStunPort {
    /// `STUNPort` is -1: STUN is disabled on purpose.
    Disabled,
    /// `STUNPort` is outside 1–65535 (and not 0 or -1).
    Invalid(i32),
}

impl DerpNode {
    /// The TCP port to dial for DERP: `DERPPort`, with 0 (or a value that is not a port)
    /// meaning 443 (spec §9.3).
    pub fn derp_port_to_dial(&self) -> u16 {
        match self.derp_port {
            0 => DEFAULT_DERP_PORT,
            p => u16::try_from(p).unwrap_or(DEFAULT_DERP_PORT),
        }
    }

    /// The UDP port to send STUN to: `STUNPort`, with 0 meaning 3478 and -1 meaning none
    /// (spec §9.3).
    pub fn stun_port_to_probe(&self) -> Result<u16, NoStunPort> {
        match self.stun_port {
            -1 => Err(NoStunPort::Disabled),
            0 => Ok(DEFAULT_STUN_PORT),
            p => u16::try_from(p).map_err(|_| NoStunPort::Invalid(p)),
        }
    }
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
