//! PURE node selection: which Nodes become relay nodes of a region and with which IPs.
//!
//! Order of checks for every Node matching `nodeSelector` (in name order): being deleted,
//! cordoned (`spec.unschedulable`, whatever the region tolerates), untolerated
//! NoSchedule/NoExecute taints, a usable address per family (address types in the
//! region's order of preference), a port claimed by a region that takes precedence, and
//! finally `maxNodes`. Every node that is matched but not used gets a reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::{Node, Taint, Toleration};

use crate::crd::{AddressType, DerpRegionSpec, IpFamily, Ports, SkippedNode};

/// A node chosen as a relay node, with the addresses to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedNode {
    /// Node name.
    pub name: String,
    /// IPv4 address to publish.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address to publish.
    pub ipv6: Option<Ipv6Addr>,
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
        if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            out.skipped.push(skip(
                "Cordoned",
                "the Node is cordoned (spec.unschedulable): withdrawn from the derpMap, then its \
                 relay is stopped"
                    .into(),
            ));
            continue;
        }
        if let Some(taint) = untolerated_taint(node, &spec.tolerations) {
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
        let (ipv4, ipv6) = pick_addresses(node, &spec.addresses.types, &spec.addresses.families);
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
        out.selected.push(SelectedNode { name, ipv4, ipv6 });
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
}
