//! PURE node selection: which Nodes become relay nodes of a region and with which IPs.
//!
//! Order of checks for every Node matching `nodeSelector` (in name order): being deleted,
//! cordoned (`spec.unschedulable`, whatever the region tolerates), untolerated
//! NoSchedule/NoExecute taints, the admin's public-address/port annotations
//! ([`node_overrides`]; a malformed one leaves the node out), a usable address per family
//! (the annotation, else address types in the region's order of preference), a port claimed
//! by a region that takes precedence, and finally `maxNodes`. Every node that is matched but
//! not used gets a reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};

use crate::crd::{
    ANNOTATION_DERP_PORT, ANNOTATION_PUBLIC_IPV4, ANNOTATION_PUBLIC_IPV6, ANNOTATION_STUN_PORT,
    AddressType, DerpRegionSpec, IpFamily, Ports, SkippedNode,
};

/// Reason of a node left out because one of its override annotations is malformed.
pub const INVALID_NODE_OVERRIDE: &str = "InvalidNodeOverride";
/// Reason of a node left out because it is cordoned (`spec.unschedulable`, e.g. `kubectl drain`).
pub const CORDONED: &str = "Cordoned";
/// Reason of a node left out because the node lifecycle controller marked it not ready or
/// unreachable (its kubelet stopped reporting) and the region does not tolerate that.
pub const NODE_NOT_READY: &str = "NodeNotReady";

/// Whether a node skipped for `reason` keeps its certificate, so it comes back with the same
/// pin: a cordon (maintenance), a node that stopped reporting for a while, or a typo in an
/// override annotation is temporary.
pub fn keeps_certificate(reason: &str) -> bool {
    reason == INVALID_NODE_OVERRIDE || reason == CORDONED || reason == NODE_NOT_READY
}

/// A node chosen as a relay node, with the addresses to publish.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SelectedNode {
    /// Node name.
    pub name: String,
    /// IPv4 address to publish (the `kubederp.io/public-ipv4` annotation, else the Node's).
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address to publish (the `kubederp.io/public-ipv6` annotation, else the Node's).
    pub ipv6: Option<Ipv6Addr>,
    /// The node's own address from `Node.status.addresses` (IPv4 preferred), which the other
    /// relays of the region mesh with; `None` when only annotations give it an address.
    pub node_ip: Option<IpAddr>,
    /// Published DERP port when the `kubederp.io/derp-port` annotation overrides the region's.
    pub derp_port: Option<i32>,
    /// Published STUN port when the `kubederp.io/stun-port` annotation overrides the region's.
    pub stun_port: Option<i32>,
}

/// Public addresses and ports a cluster admin set on a Node with annotations, for nodes whose
/// clients reach them through 1:1 NAT or a port forward.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeOverrides {
    /// `kubederp.io/public-ipv4`.
    pub ipv4: Option<Ipv4Addr>,
    /// `kubederp.io/public-ipv6`.
    pub ipv6: Option<Ipv6Addr>,
    /// `kubederp.io/derp-port`.
    pub derp_port: Option<i32>,
    /// `kubederp.io/stun-port`.
    pub stun_port: Option<i32>,
}

fn parse_public_ipv4(v: &str) -> Result<Ipv4Addr, &'static str> {
    match v.parse::<Ipv4Addr>() {
        Ok(ip) if !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()) => Ok(ip),
        _ => Err("is not an IPv4 unicast address"),
    }
}

fn parse_public_ipv6(v: &str) -> Result<Ipv6Addr, &'static str> {
    match v.parse::<Ipv6Addr>() {
        Ok(ip)
            if !(ip.is_unspecified()
                || ip.is_multicast()
                || ip.is_unicast_link_local()
                || ip.to_ipv4_mapped().is_some()) =>
        {
            Ok(ip)
        }
        _ => Err(
            "is not an IPv6 unicast address (link-local and IPv4-mapped addresses cannot be dialled)",
        ),
    }
}

fn parse_port(v: &str) -> Result<i32, &'static str> {
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(i32::from(p)),
        _ => Err("is not a port number between 1 and 65535"),
    }
}

/// The override annotations of `node`, or one message per malformed annotation (naming the
/// annotation and its value). Loopback addresses are accepted (local test clusters use them).
pub fn node_overrides(node: &Node) -> Result<NodeOverrides, Vec<String>> {
    let ann = node.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(|v| v.trim());
    let mut out = NodeOverrides::default();
    let mut bad = Vec::new();
    let mut check = |key: &str, r: Result<(), &'static str>| {
        if let Err(why) = r {
            bad.push(format!(
                "annotation {key}={:?} {why}",
                get(key).unwrap_or_default()
            ));
        }
    };
    if let Some(v) = get(ANNOTATION_PUBLIC_IPV4) {
        check(
            ANNOTATION_PUBLIC_IPV4,
            parse_public_ipv4(v).map(|ip| out.ipv4 = Some(ip)),
        );
    }
    if let Some(v) = get(ANNOTATION_PUBLIC_IPV6) {
        check(
            ANNOTATION_PUBLIC_IPV6,
            parse_public_ipv6(v).map(|ip| out.ipv6 = Some(ip)),
        );
    }
    if let Some(v) = get(ANNOTATION_DERP_PORT) {
        check(
            ANNOTATION_DERP_PORT,
            parse_port(v).map(|p| out.derp_port = Some(p)),
        );
    }
    if let Some(v) = get(ANNOTATION_STUN_PORT) {
        check(
            ANNOTATION_STUN_PORT,
            parse_port(v).map(|p| out.stun_port = Some(p)),
        );
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

impl SelectedNode {
    /// The relay's `--hostname`: the IPv4 address when there is one, else the IPv6 one.
    pub fn hostname(&self) -> String {
        match (self.ipv4, self.ipv6) {
            (Some(v4), _) => v4.to_string(),
            (None, Some(v6)) => v6.to_string(),
            (None, None) => String::new(),
        }
    }

    /// All published IPs (the certificate's SANs), sorted.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
            .collect();
        v.sort();
        v
    }
}

/// Host ports a region binds on each of its nodes, for clash detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSet {
    /// TCP ports.
    pub tcp: Vec<u16>,
    /// UDP ports.
    pub udp: Vec<u16>,
}

impl PortSet {
    /// Ports a region with these `ports` binds (disabled ones omitted).
    pub fn of(ports: &Ports) -> Self {
        let to_port = |p: i32| u16::try_from(p).ok().filter(|p| *p > 0);
        let tcp = [ports.derp, ports.http, ports.admin]
            .into_iter()
            .filter_map(to_port)
            .collect();
        let udp = [ports.stun].into_iter().filter_map(to_port).collect();
        Self { tcp, udp }
    }

    /// Ports both sets bind, rendered like `tcp/443`.
    pub fn overlap(&self, other: &PortSet) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.tcp {
            if other.tcp.contains(p) {
                out.push(format!("tcp/{p}"));
            }
        }
        for p in &self.udp {
            if other.udp.contains(p) {
                out.push(format!("udp/{p}"));
            }
        }
        out
    }
}

/// A node claimed by another region that takes precedence over this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortClaim {
    /// `namespace/name` of the claiming region.
    pub region: String,
    /// Node name.
    pub node: String,
    /// Ports it binds there.
    pub ports: PortSet,
}

/// Result of node selection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// Relay nodes in name order.
    pub selected: Vec<SelectedNode>,
    /// Nodes matched by the selector but not used.
    pub skipped: Vec<SkippedNode>,
}

/// Whether `labels` satisfy every `selector` entry (an empty selector matches every node).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    let op = t.operator.as_deref().unwrap_or("Equal");
    match t.key.as_deref() {
        None | Some("") => op == "Exists",
        Some(k) if k != taint.key => false,
        Some(_) => match op {
            "Exists" => true,
            _ => t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        },
    }
}

/// The first taint that repels a Pod with `tolerations` (NoSchedule / NoExecute only).
/// Taint the node lifecycle controller mirrors `spec.unschedulable` with; it is removed a
/// moment after `kubectl uncordon`.
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// Taints the node lifecycle controller puts on a node whose kubelet stopped reporting (Ready
/// False or Unknown); it removes them when the node reports Ready again.
const NOT_READY_TAINTS: [&str; 2] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// Cordoned, or just uncordoned and still carrying the cordon's taint (which would otherwise
/// make it `Untolerated` for a moment, and lose its certificate).
fn is_cordoned(node: &Node) -> bool {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.unschedulable) == Some(true)
        || spec
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == UNSCHEDULABLE_TAINT))
}

fn untolerated_taint<'a>(node: &'a Node, tolerations: &[Toleration]) -> Option<&'a Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
}

/// Address per family, by the region's type preference.
fn pick_addresses(
    node: &Node,
    types: &[AddressType],
    families: &[IpFamily],
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut v4 = None;
    let mut v6 = None;
    for ty in types {
        let want = match ty {
            AddressType::ExternalIP => "ExternalIP",
            AddressType::InternalIP => "InternalIP",
        };
        for a in addrs.iter().filter(|a| a.type_ == want) {
            match a.address.trim().parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) if v4.is_none() && families.contains(&IpFamily::IPv4) => {
                    v4 = Some(ip);
                }
                Ok(IpAddr::V6(ip)) if v6.is_none() && families.contains(&IpFamily::IPv6) => {
                    v6 = Some(ip);
                }
                _ => {}
            }
        }
    }
    (v4, v6)
}

/// Select relay nodes for `spec` among `nodes`; `claims` are nodes and ports taken by regions
/// that take precedence (older), which this region must leave alone.
pub fn select_nodes(spec: &DerpRegionSpec, nodes: &[&Node], claims: &[PortClaim]) -> Selection {
    let mut matched: Vec<&Node> = nodes
        .iter()
        .copied()
        .filter(|n| selector_matches(&spec.node_selector, n.metadata.labels.as_ref()))
        .collect();
    matched.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let ours = PortSet::of(&spec.ports);
    let cap = spec
        .max_nodes
        .and_then(|m| usize::try_from(m).ok())
        .unwrap_or(usize::MAX);
    let mut out = Selection::default();
    for node in matched {
        let name = node.metadata.name.clone().unwrap_or_default();
        let skip = |reason: &str, message: String| SkippedNode {
            name: name.clone(),
            reason: reason.to_owned(),
            message,
        };
        if node.metadata.deletion_timestamp.is_some() {
            out.skipped
                .push(skip("NodeDeleting", "the Node is being deleted".into()));
            continue;
        }
        if is_cordoned(node) {
            out.skipped.push(skip(
                CORDONED,
                "the Node is cordoned (spec.unschedulable): withdrawn from the derpMap, then its \
                 relay is stopped; its certificate is kept"
                    .into(),
            ));
            continue;
        }
        if let Some(taint) = untolerated_taint(node, &spec.tolerations) {
            if NOT_READY_TAINTS.contains(&taint.key.as_str()) {
                out.skipped.push(skip(
                    NODE_NOT_READY,
                    format!(
                        "the Node is not ready (taint {}:{}): withdrawn from the derpMap until it \
                         reports Ready again; its certificate is kept",
                        taint.key, taint.effect
                    ),
                ));
                continue;
            }
            out.skipped.push(skip(
                "Untolerated",
                format!(
                    "taint {}={}:{} is not tolerated; add a toleration to spec.tolerations",
                    taint.key,
                    taint.value.as_deref().unwrap_or(""),
                    taint.effect
                ),
            ));
            continue;
        }
        let over = match node_overrides(node) {
            Ok(o) => o,
            Err(bad) => {
                out.skipped.push(skip(
                    INVALID_NODE_OVERRIDE,
                    format!(
                        "{}; fix or remove it (the node is left out of the region until then; \
                         its certificate is kept)",
                        bad.join("; ")
                    ),
                ));
                continue;
            }
        };
        let (own4, own6) = pick_addresses(node, &spec.addresses.types, &spec.addresses.families);
        let node_ip = own4.map(IpAddr::V4).or(own6.map(IpAddr::V6));
        let ipv4 = over
            .ipv4
            .filter(|_| spec.addresses.families.contains(&IpFamily::IPv4))
            .or(own4);
        let ipv6 = over
            .ipv6
            .filter(|_| spec.addresses.families.contains(&IpFamily::IPv6))
            .or(own6);
        if ipv4.is_none() && ipv6.is_none() {
            out.skipped.push(skip(
                "NoUsableAddress",
                format!(
                    "the Node has no {:?} address of family {:?} in status.addresses",
                    spec.addresses.types, spec.addresses.families
                ),
            ));
            continue;
        }
        if let Some((claim, overlap)) = claims
            .iter()
            .filter(|c| c.node == name)
            .map(|c| (c, ours.overlap(&c.ports)))
            .find(|(_, o)| !o.is_empty())
        {
            out.skipped.push(skip(
                "PortConflict",
                format!(
                    "region {} already uses {} on this node; change spec.ports or the node selector",
                    claim.region,
                    overlap.join(", ")
                ),
            ));
            continue;
        }
        if out.selected.len() >= cap {
            out.skipped.push(skip(
                "MaxNodes",
                format!("spec.maxNodes ({cap}) relay nodes are already chosen"),
            ));
            continue;
        }
        out.selected.push(SelectedNode {
            name,
            ipv4,
            ipv6,
            node_ip,
            derp_port: over.derp_port,
            // a region with STUN off publishes STUNPort -1 whatever the node says
            stun_port: over.stun_port.filter(|_| spec.ports.stun > 0),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, region_spec};

    #[test]
    fn external_ip_is_preferred_over_internal_per_family() {
        let n = node("a")
            .label("relay", "yes")
            .internal("10.0.0.1")
            .external("203.0.113.1")
            .internal("fd00::1")
            .build();
        let sel = select_nodes(&region_spec(), &[&n], &[]);
        assert_eq!(sel.selected.len(), 1);
        let s = &sel.selected[0];
        assert_eq!(s.ipv4, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(s.ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(s.hostname(), "203.0.113.1");
    }

    #[test]
    fn internal_only_preference_and_ipv6_only_family() {
        let n = node("a")
            .label("relay", "yes")
            .internal("10.0.0.1")
            .external("203.0.113.1")
            .external("2001:db8::1")
            .build();
        let mut spec = region_spec();
        spec.addresses.types = vec![AddressType::InternalIP];
        let sel = select_nodes(&spec, &[&n], &[]);
        assert_eq!(sel.selected[0].ipv4, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(sel.selected[0].ipv6, None);
        spec.addresses.types = vec![AddressType::ExternalIP];
        spec.addresses.families = vec![IpFamily::IPv6];
        let sel = select_nodes(&spec, &[&n], &[]);
        assert_eq!(sel.selected[0].ipv4, None);
        assert_eq!(sel.selected[0].hostname(), "2001:db8::1");
    }

    #[test]
    fn unlabelled_nodes_are_ignored_and_order_is_by_name() {
        let c = node("c").label("relay", "yes").internal("10.0.0.3").build();
        let a = node("a").label("relay", "yes").internal("10.0.0.1").build();
        let x = node("x").internal("10.0.0.9").build();
        let sel = select_nodes(&region_spec(), &[&c, &x, &a], &[]);
        let names: Vec<_> = sel.selected.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert!(sel.skipped.is_empty());
    }

    #[test]
    fn node_without_address_is_skipped_with_reason() {
        let n = node("a").label("relay", "yes").hostname_addr("a").build();
        let sel = select_nodes(&region_spec(), &[&n], &[]);
        assert!(sel.selected.is_empty());
        assert_eq!(sel.skipped[0].reason, "NoUsableAddress");
    }

    #[test]
    fn taints_need_tolerations() {
        let n = node("a")
            .label("relay", "yes")
            .internal("10.0.0.1")
            .taint("dedicated", "edge", "NoSchedule")
            .build();
        let pref = node("b")
            .label("relay", "yes")
            .internal("10.0.0.2")
            .taint("soft", "x", "PreferNoSchedule")
            .build();
        let mut spec = region_spec();
        let sel = select_nodes(&spec, &[&n, &pref], &[]);
        assert_eq!(sel.selected.len(), 1);
        assert_eq!(sel.skipped[0].reason, "Untolerated");
        spec.tolerations = vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("edge".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }];
        assert_eq!(select_nodes(&spec, &[&n, &pref], &[]).selected.len(), 2);
        spec.tolerations = vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        assert_eq!(select_nodes(&spec, &[&n, &pref], &[]).selected.len(), 2);
    }

    #[test]
    fn max_nodes_keeps_the_first_by_name() {
        let nodes: Vec<Node> = ["d", "b", "a", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                node(n)
                    .label("relay", "yes")
                    .internal(&format!("10.0.0.{i}"))
                    .build()
            })
            .collect();
        let refs: Vec<&Node> = nodes.iter().collect();
        let mut spec = region_spec();
        spec.max_nodes = Some(2);
        let sel = select_nodes(&spec, &refs, &[]);
        let names: Vec<_> = sel.selected.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(sel.skipped.len(), 2);
        assert!(sel.skipped.iter().all(|s| s.reason == "MaxNodes"));
    }

    #[test]
    fn port_claim_by_older_region_skips_node_only_when_ports_overlap() {
        let n = node("a").label("relay", "yes").internal("10.0.0.1").build();
        let mut claim = PortClaim {
            region: "ns/other".into(),
            node: "a".into(),
            ports: PortSet::of(&Ports::default()),
        };
        let sel = select_nodes(&region_spec(), &[&n], std::slice::from_ref(&claim));
        assert_eq!(sel.skipped[0].reason, "PortConflict");
        assert!(sel.skipped[0].message.contains("ns/other"));
        assert!(sel.skipped[0].message.contains("tcp/443"));
        claim.ports = PortSet {
            tcp: vec![8443],
            udp: vec![3479],
        };
        assert_eq!(
            select_nodes(&region_spec(), &[&n], &[claim]).selected.len(),
            1
        );
    }

    #[test]
    fn disabled_ports_are_not_bound() {
        let p = PortSet::of(&Ports {
            derp: 443,
            http: 0,
            stun: -1,
            admin: 0,
        });
        assert_eq!(p.tcp, vec![443]);
        assert!(p.udp.is_empty());
    }

    #[test]
    fn override_annotations_are_validated_and_name_the_annotation() {
        let with = |k: &str, v: &str| node_overrides(&node("a").annotate(k, v).build());
        assert_eq!(
            with(ANNOTATION_PUBLIC_IPV4, " 198.51.100.7 ").unwrap().ipv4,
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(
            with(ANNOTATION_PUBLIC_IPV6, "2001:db8::7").unwrap().ipv6,
            Some("2001:db8::7".parse().unwrap())
        );
        assert_eq!(
            with(ANNOTATION_DERP_PORT, "8443").unwrap().derp_port,
            Some(8443)
        );
        assert_eq!(
            with(ANNOTATION_STUN_PORT, "65535").unwrap().stun_port,
            Some(65535)
        );
        for (k, v) in [
            (ANNOTATION_PUBLIC_IPV4, "300.1.1.1"),
            (ANNOTATION_PUBLIC_IPV4, "2001:db8::1"),
            (ANNOTATION_PUBLIC_IPV4, "0.0.0.0"),
            (ANNOTATION_PUBLIC_IPV4, "224.0.0.1"),
            (ANNOTATION_PUBLIC_IPV4, "255.255.255.255"),
            (ANNOTATION_PUBLIC_IPV4, ""),
            (ANNOTATION_PUBLIC_IPV6, "198.51.100.7"),
            (ANNOTATION_PUBLIC_IPV6, "fe80::1"),
            (ANNOTATION_PUBLIC_IPV6, "ff02::1"),
            (ANNOTATION_PUBLIC_IPV6, "::ffff:198.51.100.7"),
            (ANNOTATION_PUBLIC_IPV6, "::"),
            (ANNOTATION_DERP_PORT, "0"),
            (ANNOTATION_DERP_PORT, "65536"),
            (ANNOTATION_DERP_PORT, "-1"),
            (ANNOTATION_STUN_PORT, "3478/udp"),
        ] {
            let err = with(k, v).expect_err(&format!("{k}={v:?} must be refused"));
            assert_eq!(err.len(), 1);
            assert!(
                err[0].starts_with(&format!("annotation {k}={v:?} ")),
                "{err:?}"
            );
        }
        // every malformed annotation is named, not just the first
        let n = node("a")
            .annotate(ANNOTATION_PUBLIC_IPV4, "x")
            .annotate(ANNOTATION_DERP_PORT, "y")
            .build();
        assert_eq!(node_overrides(&n).unwrap_err().len(), 2);
    }

    #[test]
    fn overrides_replace_the_published_addresses_within_the_region_families() {
        let n = node("a")
            .label("relay", "yes")
            .internal("10.0.0.1")
            .annotate(ANNOTATION_PUBLIC_IPV4, "198.51.100.7")
            .annotate(ANNOTATION_PUBLIC_IPV6, "2001:db8::7")
            .annotate(ANNOTATION_DERP_PORT, "8443")
            .annotate(ANNOTATION_STUN_PORT, "3479")
            .build();
        let mut spec = region_spec();
        let s = &select_nodes(&spec, &[&n], &[]).selected[0];
        assert_eq!(s.ipv4, Some("198.51.100.7".parse().unwrap()));
        assert_eq!(s.ipv6, Some("2001:db8::7".parse().unwrap()));
        assert_eq!(s.node_ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!((s.derp_port, s.stun_port), (Some(8443), Some(3479)));
        // a region publishing IPv4 only ignores the IPv6 annotation; STUN off ignores its port
        spec.addresses.families = vec![IpFamily::IPv4];
        spec.ports.stun = -1;
        let s = &select_nodes(&spec, &[&n], &[]).selected[0];
        assert_eq!(s.ipv6, None);
        assert_eq!(s.stun_port, None);
        // an annotation alone makes a node without a usable status address usable
        let bare = node("b")
            .label("relay", "yes")
            .hostname_addr("b")
            .annotate(ANNOTATION_PUBLIC_IPV4, "198.51.100.8")
            .build();
        let s = &select_nodes(&region_spec(), &[&bare], &[]).selected[0];
        assert_eq!(s.hostname(), "198.51.100.8");
        assert_eq!(s.node_ip, None);
    }

    #[test]
    fn malformed_override_leaves_the_node_out_naming_node_and_annotation() {
        let n = node("a")
            .label("relay", "yes")
            .internal("10.0.0.1")
            .annotate(ANNOTATION_PUBLIC_IPV4, "198.51.100.300")
            .build();
        let sel = select_nodes(&region_spec(), &[&n], &[]);
        assert!(sel.selected.is_empty());
        assert_eq!(sel.skipped[0].name, "a");
        assert_eq!(sel.skipped[0].reason, INVALID_NODE_OVERRIDE);
        assert!(
            sel.skipped[0]
                .message
                .contains("annotation kubederp.io/public-ipv4=\"198.51.100.300\""),
            "{}",
            sel.skipped[0].message
        );
    }

    #[test]
    fn admin_port_clashes_with_another_regions_ports_on_the_node() {
        let n = node("a").label("relay", "yes").internal("10.0.0.1").build();
        // the other region's DERP port is our admin port
        let claim = PortClaim {
            region: "ns/other".into(),
            node: "a".into(),
            ports: PortSet::of(&Ports {
                derp: 8443,
                http: 0,
                stun: -1,
                admin: 0,
            }),
        };
        let mut spec = region_spec();
        spec.ports = Ports {
            derp: 9443,
            http: 0,
            stun: 3479,
            admin: 8443,
        };
        let sel = select_nodes(&spec, &[&n], std::slice::from_ref(&claim));
        assert_eq!(sel.skipped[0].reason, "PortConflict");
        assert!(sel.skipped[0].message.contains("tcp/8443"));
        spec.ports.admin = 0;
        assert_eq!(select_nodes(&spec, &[&n], &[claim]).selected.len(), 1);
    }
}
