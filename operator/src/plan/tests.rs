//! Plan tests, linkerd style: feed objects in, assert the plan; one behaviour per test.

use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::{
    api::core::v1::{PodCondition, PodStatus},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::*;
use crate::{
    certs::RcgenIssuer,
    fixtures::{node, region},
};

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

/// Counts issuances and delegates to rcgen.
#[derive(Default)]
struct CountingIssuer(AtomicUsize);

impl CertIssuer for CountingIssuer {
    fn issue(
        &self,
        cn: &str,
        ips: &[std::net::IpAddr],
        nb: OffsetDateTime,
        v: time::Duration,
    ) -> Result<crate::certs::IssuedCert, crate::certs::CertError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        RcgenIssuer.issue(cn, ips, nb, v)
    }
}

fn psk() -> String {
    "ab".repeat(32)
}

fn three_nodes() -> Vec<Node> {
    (1..=3)
        .map(|i| {
            node(&format!("n{i}"))
                .label("relay", "yes")
                .external(&format!("203.0.113.{i}"))
                .internal(&format!("10.0.0.{i}"))
                .build()
        })
        .collect()
}

fn run(region: &DerpRegion, nodes: &[Node], existing: &Existing, issuer: &dyn CertIssuer) -> Plan {
    run_probed(region, nodes, existing, issuer, &BTreeMap::new())
}

fn run_probed(
    region: &DerpRegion,
    nodes: &[Node],
    existing: &Existing,
    issuer: &dyn CertIssuer,
    probes: &BTreeMap<String, ProbeView>,
) -> Plan {
    let refs: Vec<&Node> = nodes.iter().collect();
    plan(&Inputs {
        region,
        nodes: &refs,
        claims: &[],
        existing,
        now: now(),
        issuer,
        new_psk: &psk,
        probes,
        relay_image: crate::crd::DEFAULT_RELAY_IMAGE,
        relay_image_pull_secrets: &[],
        region_id_winner: None,
    })
    .unwrap()
}

/// Pretend the apiserver stored every applied object (status of Pods as given).
fn apply_all(existing: &mut Existing, p: &Plan, ready: bool) {
    for w in &p.writes {
        match w {
            Write::ApplySecret(s) => {
                existing.secrets.insert(s.name_any(), s.clone());
            }
            Write::ApplyConfigMap(c) => {
                existing.config_maps.insert(c.name_any(), c.clone());
            }
            Write::CreatePod(pod) => {
                let mut pod = (**pod).clone();
                if ready {
                    pod.status = Some(ready_status());
                }
                existing.pods.insert(pod.name_any(), pod);
            }
            Write::DeletePod { name, .. } => {
                existing.pods.remove(name);
            }
            Write::DeleteSecret(n) => {
                existing.secrets.remove(n);
            }
            Write::DeleteConfigMap(n) => {
                existing.config_maps.remove(n);
            }
            Write::ApplyPdb(pdb) => {
                existing.pdbs.insert(pdb.name_any(), (**pdb).clone());
            }
        }
    }
}

fn ready_status() -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn with_status(mut r: DerpRegion, p: &Plan) -> DerpRegion {
    r.status = Some(p.status.clone());
    r
}

#[test]
fn first_plan_creates_secrets_mesh_pods_and_derpmap_in_order() {
    let r = region();
    let issuer = CountingIssuer::default();
    let p = run(&r, &three_nodes(), &Existing::default(), &issuer);
    let kinds: Vec<&str> = p
        .writes
        .iter()
        .map(|w| match w {
            Write::ApplySecret(_) => "secret",
            Write::ApplyConfigMap(_) => "cm",
            Write::CreatePod(_) => "pod",
            Write::ApplyPdb(_) => "pdb",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "secret", "secret", "secret", "secret", "cm", "pdb", "pod", "pod", "pod", "cm"
        ]
    );
    assert_eq!(issuer.0.load(Ordering::SeqCst), 3);
    assert_eq!(p.certs_issued, 3);
    let Write::ApplyConfigMap(peers) = &p.writes[4] else {
        panic!()
    };
    let body = &peers.data.as_ref().unwrap()["peers"];
    assert_eq!(body.lines().count(), 3);
    assert!(body.starts_with("203.0.113.1:443 sha256-raw:"));
    let Write::ApplySecret(mesh) = &p.writes[3] else {
        panic!()
    };
    assert_eq!(mesh.data.as_ref().unwrap()["psk"].0, psk().into_bytes());
    assert_eq!(p.status.nodes.len(), 3);
    assert_eq!(p.status.nodes_ready.as_deref(), Some("0/3"));
    let map = &p.derp_map.as_ref().unwrap().regions[&900];
    assert_eq!(map.region_code, "home");
    assert_eq!(map.nodes.len(), 3);
    assert_eq!(map.nodes[0].cert_name, p.status.nodes[0].cert_name);
    assert_eq!(map.nodes[0].ipv6, "none");
    assert!(map.nodes[0].can_port80);
}

#[test]
fn second_plan_over_stored_objects_writes_nothing_and_keeps_pins() {
    let issuer = CountingIssuer::default();
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    let r = with_status(region(), &p1);
    let p2 = run(&r, &nodes, &existing, &issuer);
    // pods became ready → status changes, but no object writes
    assert!(p2.writes.is_empty(), "{:?}", p2.writes);
    assert_eq!(issuer.0.load(Ordering::SeqCst), 3);
    let pins1: Vec<_> = p1.status.nodes.iter().map(|n| &n.cert_name).collect();
    let pins2: Vec<_> = p2.status.nodes.iter().map(|n| &n.cert_name).collect();
    assert_eq!(pins1, pins2);
    // third time: status identical too → the controller patches nothing
    let r = with_status(region(), &p2);
    let p3 = run(&r, &nodes, &existing, &issuer);
    assert!(p3.writes.is_empty());
    assert_eq!(p3.status, p2.status);
    assert!(p3.events.is_empty(), "{:?}", p3.events);
    assert_eq!(p3.status.nodes_ready.as_deref(), Some("3/3"));
    let ready = p3
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
}

#[test]
fn changed_node_ip_reissues_only_that_certificate_and_replaces_its_pod() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    nodes[1] = node("n2")
        .label("relay", "yes")
        .external("198.51.100.2")
        .build();
    let r = with_status(region(), &p1);
    let p2 = run(&r, &nodes, &existing, &issuer);
    assert_eq!(issuer.0.load(Ordering::SeqCst), 4);
    assert_ne!(p2.status.nodes[1].cert_name, p1.status.nodes[1].cert_name);
    assert_eq!(p2.status.nodes[0].cert_name, p1.status.nodes[0].cert_name);
    assert!(
        p2.writes.iter().any(
            |w| matches!(w, Write::DeletePod { name, reason: "Replace" } if name == "home-n2")
        )
    );
    assert!(p2.events.iter().any(|e| e.reason == "PinChanged"
        && e.warning
        && e.note.contains("pin changed from")
        && e.note.contains("from [203.0.113.2] to [198.51.100.2]")));
    assert_eq!(p2.pin_changes, 1);
    assert_eq!(
        p2.derp_map.as_ref().unwrap().regions[&900].nodes[1].host_name,
        "198.51.100.2"
    );
}

#[test]
fn deleted_secret_is_reissued_with_a_new_pin_announced() {
    let issuer = CountingIssuer::default();
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    existing.secrets.remove("home-n3-tls");
    let p2 = run(&with_status(region(), &p1), &nodes, &existing, &issuer);
    assert_eq!(p2.certs_issued, 1);
    assert!(p2.events.iter().any(
        |e| e.note.contains("SecretMissing") && e.note.contains(&p1.status.nodes[2].cert_name)
    ));
}

#[test]
fn expiring_certificate_is_rotated() {
    let issuer = CountingIssuer::default();
    let nodes = three_nodes();
    let mut r = region();
    r.spec.certificate.validity = "800h".into(); // < 30 days of margin after 81 hours
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    // requeue no later than the renewal point (800h - 720h = 80h)
    assert_eq!(p1.requeue_after, MAX_REQUEUE);
    let refs: Vec<&Node> = nodes.iter().collect();
    let later = now() + time::Duration::hours(81);
    let p2 = plan(&Inputs {
        region: &with_status(r, &p1),
        nodes: &refs,
        claims: &[],
        existing: &existing,
        now: later,
        issuer: &issuer,
        new_psk: &psk,
        probes: &BTreeMap::new(),
        relay_image: crate::crd::DEFAULT_RELAY_IMAGE,
        relay_image_pull_secrets: &[],
        region_id_winner: None,
    })
    .unwrap();
    assert_eq!(p2.certs_issued, 3);
    assert!(p2.events.iter().any(|e| e.note.contains("Expiring")));
}

#[test]
fn unlabelled_node_is_pruned_and_map_updated() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    nodes[2] = node("n3").external("203.0.113.3").build();
    let p2 = run(&with_status(region(), &p1), &nodes, &existing, &issuer);
    assert!(
        p2.writes
            .contains(&Write::DeleteSecret("home-n3-tls".into()))
    );
    assert_eq!(p2.derp_map.as_ref().unwrap().regions[&900].nodes.len(), 2);
    assert!(p2.events.iter().any(|e| e.reason == "NodeRemoved"));
    // the relay stops only once the map without n3 is stored
    let prune_n3 = Write::DeletePod {
        name: "home-n3".into(),
        reason: "Prune",
    };
    assert!(!p2.writes.contains(&prune_n3));
    apply_all(&mut existing, &p2, true);
    let p3 = run(&with_status(region(), &p2), &nodes, &existing, &issuer);
    assert!(p3.writes.contains(&prune_n3));
}

#[test]
fn cordoned_node_leaves_the_published_map_before_its_relay_is_stopped() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    // tolerating every taint: the cordon itself must withdraw the node
    let mut r = region();
    r.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
        operator: Some("Exists".into()),
        ..Default::default()
    }];
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    nodes[1]
        .spec
        .get_or_insert_with(Default::default)
        .unschedulable = Some(true);

    let p2 = run(&with_status(r.clone(), &p1), &nodes, &existing, &issuer);
    assert_eq!(published(&p2), ["n1", "n3"]);
    assert!(
        p2.writes
            .iter()
            .any(|w| matches!(w, Write::ApplyConfigMap(c) if c.name_any() == "home-derpmap"))
    );
    assert!(
        !p2.writes
            .iter()
            .any(|w| matches!(w, Write::DeletePod { name, .. } if name == "home-n2")),
        "the relay must keep running while the stored map still lists n2: {:?}",
        p2.writes
    );
    assert!(p2.requeue_after <= ROLLOUT_REQUEUE);
    assert!(
        p2.status
            .skipped_nodes
            .iter()
            .any(|s| s.name == "n2" && s.reason == "Cordoned")
    );

    apply_all(&mut existing, &p2, true);
    let p3 = run(&with_status(r.clone(), &p2), &nodes, &existing, &issuer);
    assert!(p3.writes.contains(&Write::DeletePod {
        name: "home-n2".into(),
        reason: "Prune"
    }));

    // uncordoned: back in the region
    apply_all(&mut existing, &p3, true);
    nodes[1]
        .spec
        .get_or_insert_with(Default::default)
        .unschedulable = None;
    let p4 = run(&with_status(r, &p3), &nodes, &existing, &issuer);
    assert!(
        p4.writes
            .iter()
            .any(|w| matches!(w, Write::CreatePod(p) if p.name_any() == "home-n2"))
    );
}

/// The pin (`CertName`) the plan's status gives `node`, if it lists the node.
fn published_pin(p: &Plan, node: &str) -> Option<String> {
    p.status
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.cert_name.clone())
}

/// Node n2, its taints gone, is published again with the pin it had (`before`): no certificate
/// issued beyond the first three, no `PinChanged` Event.
fn back_with_the_same_pin(
    r: &DerpRegion,
    nodes: &[Node],
    existing: &Existing,
    issuer: &CountingIssuer,
    before: &str,
) {
    let p = run(r, nodes, existing, issuer);
    assert_eq!(published_pin(&p, "n2").as_deref(), Some(before));
    assert_eq!(
        issuer.0.load(Ordering::SeqCst),
        3,
        "no certificate issued again"
    );
    assert!(!p.events.iter().any(|e| e.reason == "PinChanged"));
}

#[test]
fn a_cordoned_node_keeps_its_certificate_and_comes_back_with_the_same_pin() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    let r = region();
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    let pin = |p: &Plan| published_pin(p, "n2");
    let before = pin(&p1).unwrap();
    let cordon = |nodes: &mut Vec<Node>, on: Option<bool>| {
        nodes[1]
            .spec
            .get_or_insert_with(Default::default)
            .unschedulable = on;
    };

    cordon(&mut nodes, Some(true));
    let mut r = with_status(r, &p1);
    for _ in 0..3 {
        let p = run(&r, &nodes, &existing, &issuer);
        assert!(
            !p.writes
                .contains(&Write::DeleteSecret("home-n2-tls".into())),
            "the cordoned node's certificate must stay: {:?}",
            p.writes
        );
        apply_all(&mut existing, &p, true);
        r = with_status(r, &p);
    }
    assert!(
        !existing.pods.contains_key("home-n2"),
        "its relay is stopped"
    );

    // uncordoned: the cordon's taint stays a moment longer (node lifecycle controller)
    cordon(&mut nodes, None);
    nodes[1].spec.get_or_insert_with(Default::default).taints =
        Some(vec![k8s_openapi::api::core::v1::Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]);
    let p = run(&r, &nodes, &existing, &issuer);
    assert!(
        !p.writes
            .contains(&Write::DeleteSecret("home-n2-tls".into())),
        "the certificate must stay while the cordon's taint remains: {:?}",
        p.writes
    );
    apply_all(&mut existing, &p, true);
    let r = with_status(r, &p);
    nodes[1].spec.get_or_insert_with(Default::default).taints = None;
    back_with_the_same_pin(&r, &nodes, &existing, &issuer, &before);
}

#[test]
fn a_node_whose_kubelet_stopped_is_withdrawn_and_keeps_its_certificate() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    let r = region();
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    let pin = |p: &Plan| published_pin(p, "n2");
    let before = pin(&p1).unwrap();
    let mut r = with_status(r, &p1);
    // The node lifecycle controller taints a node whose kubelet stopped reporting: first
    // unreachable:NoSchedule, then NoExecute as well.
    for effects in [&["NoSchedule"][..], &["NoSchedule", "NoExecute"]] {
        nodes[1].spec.get_or_insert_with(Default::default).taints = Some(
            effects
                .iter()
                .map(|e| k8s_openapi::api::core::v1::Taint {
                    key: "node.kubernetes.io/unreachable".into(),
                    effect: (*e).into(),
                    ..Default::default()
                })
                .collect(),
        );
        let p = run(&r, &nodes, &existing, &issuer);
        assert!(
            !p.writes
                .contains(&Write::DeleteSecret("home-n2-tls".into())),
            "a node that stopped reporting keeps its certificate: {:?}",
            p.writes
        );
        let skipped = p.status.skipped_nodes.iter().find(|s| s.name == "n2");
        assert_eq!(
            skipped.map(|s| s.reason.as_str()),
            Some(nodes::NODE_NOT_READY),
            "{:?}",
            p.status.skipped_nodes
        );
        apply_all(&mut existing, &p, true);
        r = with_status(r, &p);
    }
    // It reports Ready again: the taints go, and it comes back with the same pin.
    nodes[1].spec.get_or_insert_with(Default::default).taints = None;
    back_with_the_same_pin(&r, &nodes, &existing, &issuer, &before);
}

#[test]
fn a_relay_rollout_withdraws_one_node_at_a_time_and_never_empties_the_map() {
    let issuer = CountingIssuer::default();
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    let mut r = with_status(region(), &p1);
    // the example region's setting: only Ready relays serving the current pin are published
    r.spec.derp_map.publish_unhealthy = false;
    r.spec.relay.image = Some("example/derper:2".into());
    let mut replaced = Vec::new();
    for _ in 0..10 {
        let p = run(&r, &nodes, &existing, &issuer);
        for w in &p.writes {
            if let Write::DeletePod { name, .. } = w {
                // the node whose relay is replaced left the map this plan publishes
                let node = name.trim_start_matches("home-");
                assert!(!published(&p).contains(&node), "{node} still published");
                replaced.push(name.clone());
            }
        }
        assert!(
            published(&p).len() >= 2,
            "published {:?} during the rollout",
            published(&p)
        );
        r = with_status(r, &p);
        apply_all(&mut existing, &p, true);
    }
    assert_eq!(replaced, ["home-n1", "home-n2", "home-n3"]);
    assert_eq!(published(&run(&r, &nodes, &existing, &issuer)).len(), 3);
}

#[test]
fn ready_pods_are_replaced_one_at_a_time() {
    let issuer = CountingIssuer::default();
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    let mut r = with_status(region(), &p1);
    r.spec.relay.image = Some("example/derper:2".into());
    let p2 = run(&r, &nodes, &existing, &issuer);
    let deletes: Vec<_> = p2
        .writes
        .iter()
        .filter(|w| matches!(w, Write::DeletePod { .. }))
        .collect();
    assert_eq!(deletes.len(), 1);
    assert_eq!(p2.requeue_after, ROLLOUT_REQUEUE);
    // recreated but not ready yet → nothing else is replaced
    apply_all(&mut existing, &p2, false);
    let p3 = run(&r, &nodes, &existing, &issuer);
    assert!(matches!(p3.writes.as_slice(), [Write::CreatePod(_)]));
    apply_all(&mut existing, &p3, false);
    let p4 = run(&r, &nodes, &existing, &issuer);
    assert!(p4.writes.is_empty());
    // it becomes ready → the next one goes
    existing.pods.get_mut("home-n1").unwrap().status = Some(ready_status());
    let p5 = run(&r, &nodes, &existing, &issuer);
    assert_eq!(
        p5.writes,
        vec![Write::DeletePod {
            name: "home-n2".into(),
            reason: "Replace"
        }]
    );
}

#[test]
fn no_matching_nodes_is_a_condition_not_an_error() {
    let p = run(&region(), &[], &Existing::default(), &RcgenIssuer);
    let ready = &p.status.conditions[0];
    assert_eq!(ready.type_, "Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "NoNodes");
    assert!(ready.message.contains("spec.nodeSelector"));
    // the derpMap is still published (empty region) and the relays' budget is in place before
    // any relay; no mesh for zero nodes
    assert_eq!(p.writes.len(), 2, "{:?}", p.writes);
    assert_eq!(pdb_writes(&p).len(), 1);
}

#[test]
fn single_node_has_no_mesh_and_mesh_objects_are_pruned_later() {
    let issuer = CountingIssuer::default();
    let mut nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &issuer);
    apply_all(&mut existing, &p1, true);
    nodes.truncate(1);
    let p2 = run(&with_status(region(), &p1), &nodes, &existing, &issuer);
    assert!(p2.writes.contains(&Write::DeleteSecret("home-mesh".into())));
    assert!(
        p2.writes
            .contains(&Write::DeleteConfigMap("home-mesh-peers".into()))
    );
}

#[test]
fn port_conflict_becomes_node_condition() {
    let nodes = three_nodes();
    let refs: Vec<&Node> = nodes.iter().collect();
    let claims = vec![PortClaim {
        region: "other/older".into(),
        node: "n1".into(),
        ports: nodes::PortSet::of(&Default::default()),
    }];
    let p = plan(&Inputs {
        region: &region(),
        nodes: &refs,
        claims: &claims,
        existing: &Existing::default(),
        now: now(),
        issuer: &RcgenIssuer,
        new_psk: &psk,
        probes: &BTreeMap::new(),
        relay_image: crate::crd::DEFAULT_RELAY_IMAGE,
        relay_image_pull_secrets: &[],
        region_id_winner: None,
    })
    .unwrap();
    assert_eq!(p.status.nodes.len(), 2);
    let c = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "NodesHealthy")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "PortConflict")
    );
    assert!(c.message.contains("other/older"));
}

#[test]
fn foreign_objects_with_our_label_are_not_pruned() {
    let mut existing = Existing::default();
    let mut foreign = mesh_secret(&region(), &psk());
    foreign.metadata.name = Some("home-stranger".into());
    foreign.metadata.owner_references = None;
    existing.secrets.insert("home-stranger".into(), foreign);
    let p = run(&region(), &three_nodes(), &existing, &RcgenIssuer);
    assert!(
        !p.writes
            .contains(&Write::DeleteSecret("home-stranger".into()))
    );
}

#[test]
fn unhealthy_nodes_are_left_out_when_publish_unhealthy_is_false() {
    let mut r = region();
    r.spec.derp_map.publish_unhealthy = false;
    let p = run(&r, &three_nodes(), &Existing::default(), &RcgenIssuer);
    assert!(p.derp_map.as_ref().unwrap().regions[&900].nodes.is_empty());
}

#[test]
fn region_id_outside_custom_range_warns_once_per_generation() {
    let mut r = region();
    r.spec.region_id = 5;
    let p1 = run(&r, &three_nodes(), &Existing::default(), &RcgenIssuer);
    assert!(
        p1.events
            .iter()
            .any(|e| e.warning && e.reason == "RegionIDOutsideCustomRange")
    );
    let p2 = run(
        &with_status(r, &p1),
        &three_nodes(),
        &Existing::default(),
        &RcgenIssuer,
    );
    assert!(
        !p2.events
            .iter()
            .any(|e| e.reason == "RegionIDOutsideCustomRange")
    );
}

fn view(result: &str, withheld: bool) -> ProbeView {
    ProbeView {
        result: result.into(),
        healthy: result == "ok",
        latency_ms: (result == "ok").then_some(4),
        time: now(),
        withheld,
    }
}

/// A region of three Ready relays, planned once more with `probes`.
fn probed(publish_unhealthy: bool, probes: &[(&str, ProbeView)]) -> Plan {
    let mut r = region();
    r.spec.derp_map.publish_unhealthy = publish_unhealthy;
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    let probes = probes
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect();
    run_probed(
        &with_status(r, &p1),
        &nodes,
        &existing,
        &RcgenIssuer,
        &probes,
    )
}

fn cond<'a>(p: &'a Plan, t: &str) -> &'a Condition {
    p.status.conditions.iter().find(|c| c.type_ == t).unwrap()
}

fn published(p: &Plan) -> Vec<&str> {
    p.derp_map.as_ref().unwrap().regions[&900]
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect()
}

#[test]
fn passing_probes_fill_node_status_and_nodes_healthy() {
    let p = probed(
        false,
        &[
            ("n1", view("ok", false)),
            ("n2", view("ok", false)),
            ("n3", view("ok", false)),
        ],
    );
    for n in &p.status.nodes {
        assert_eq!(n.probe_result.as_deref(), Some("ok"));
        assert_eq!(n.probe_latency_ms, Some(4));
        assert_eq!(n.last_probe_time.as_deref(), Some("2027-01-15T08:00:00Z"));
    }
    let c = cond(&p, "NodesHealthy");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ProbesPassing")
    );
    assert_eq!(published(&p), ["n1", "n2", "n3"]);
}

#[test]
fn a_failing_node_is_named_and_withheld_only_when_publish_unhealthy_is_false() {
    let failing = [
        ("n1", view("ok", false)),
        ("n2", view("tls: TLS handshake timed out after 5s", true)),
        ("n3", view("ok", false)),
    ];
    let p = probed(false, &failing);
    let c = cond(&p, "NodesHealthy");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "ProbesFailing")
    );
    assert!(
        c.message
            .contains("node n2 fails probes: tls: TLS handshake timed out")
            && c.message.contains("left out of the derpMap"),
        "{}",
        c.message
    );
    assert_eq!(published(&p), ["n1", "n3"]);
    // Ready is about the relays, not the probes
    assert_eq!(cond(&p, "Ready").status, "True");

    // with publishUnhealthy (the default) the node stays published, the condition still says
    let p = probed(true, &failing);
    assert_eq!(cond(&p, "NodesHealthy").status, "False");
    assert!(!cond(&p, "NodesHealthy").message.contains("left out"));
    assert_eq!(published(&p), ["n1", "n2", "n3"]);

    // failing but not yet past unhealthyAfter: named, still published
    let p = probed(false, &[("n2", view("tcp: connection refused", false))]);
    assert_eq!(cond(&p, "NodesHealthy").status, "False");
    assert_eq!(published(&p), ["n1", "n2", "n3"]);
}

#[test]
fn when_every_node_fails_probes_all_stay_published_and_the_condition_says_so() {
    let p = probed(
        false,
        &[
            ("n1", view("tcp: refused", true)),
            ("n2", view("tcp: refused", true)),
            ("n3", view("tcp: refused", true)),
        ],
    );
    assert_eq!(published(&p), ["n1", "n2", "n3"]);
    let c = cond(&p, "NodesHealthy");
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains("every Ready node fails probes"),
        "{}",
        c.message
    );
}

#[test]
fn unchanged_probe_views_plan_no_writes_and_the_same_status() {
    let probes = [
        ("n1", view("ok", false)),
        ("n2", view("tls: timed out", true)),
        ("n3", view("ok", false)),
    ];
    let mut r = region();
    r.spec.derp_map.publish_unhealthy = false;
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    let probes: BTreeMap<String, ProbeView> = probes
        .iter()
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect();
    let r = with_status(r, &p1);
    let p2 = run_probed(&r, &nodes, &existing, &RcgenIssuer, &probes);
    apply_all(&mut existing, &p2, true);
    let r = with_status(r, &p2);
    let p3 = run_probed(&r, &nodes, &existing, &RcgenIssuer, &probes);
    assert!(p3.writes.is_empty(), "{:?}", p3.writes);
    assert_eq!(p3.status, p2.status);
}

// ---------------------------------------------------------------------------------------
// NAT / port-forward overrides (Node annotations)
// ---------------------------------------------------------------------------------------

use crate::crd::{
    ANNOTATION_DERP_PORT, ANNOTATION_PUBLIC_IPV4, ANNOTATION_PUBLIC_IPV6, ANNOTATION_STUN_PORT,
};

/// `three_nodes()` with n1 behind a port forward: public 198.51.100.7, DERP 8443, STUN 3479.
fn nodes_with_forward(ipv4: &str, derp: &str) -> Vec<Node> {
    let mut nodes = three_nodes();
    nodes[0] = node("n1")
        .label("relay", "yes")
        .internal("10.0.0.1")
        .annotate(ANNOTATION_PUBLIC_IPV4, ipv4)
        .annotate(ANNOTATION_DERP_PORT, derp)
        .annotate(ANNOTATION_STUN_PORT, "3479")
        .build();
    nodes
}

fn cert_ips(existing: &Existing, secret: &str) -> Vec<std::net::IpAddr> {
    parse_cert_pem(&existing.secrets[secret].data.as_ref().unwrap()["tls.crt"].0)
        .unwrap()
        .ips
}

#[test]
fn override_annotations_reach_the_map_the_certificate_and_the_status() {
    let nodes = nodes_with_forward("198.51.100.7", "8443");
    let mut existing = Existing::default();
    let p = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p, true);
    let n1 = &p.derp_map.as_ref().unwrap().regions[&900].nodes[0];
    assert_eq!(n1.ipv4, "198.51.100.7");
    assert_eq!(n1.host_name, "198.51.100.7");
    assert_eq!((n1.derp_port, n1.stun_port), (8443, 3479));
    let n2 = &p.derp_map.as_ref().unwrap().regions[&900].nodes[1];
    assert_eq!(
        (n2.derp_port, n2.stun_port),
        (443, 3478),
        "others keep the region's"
    );
    assert_eq!(
        cert_ips(&existing, "home-n1-tls"),
        vec!["198.51.100.7".parse::<std::net::IpAddr>().unwrap()]
    );
    let st = &p.status.nodes[0];
    assert_eq!(st.ipv4.as_deref(), Some("198.51.100.7"));
    assert_eq!((st.derp_port, st.stun_port), (Some(8443), Some(3479)));
    assert_eq!(
        (p.status.nodes[1].derp_port, p.status.nodes[1].stun_port),
        (None, None)
    );
    // the relay binds the region's port; the other relays mesh with the node's own address
    let pod = &existing.pods["home-n1"];
    let args = pod.spec.as_ref().unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.contains(&":443".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--hostname=198.51.100.7".to_owned()),
        "{args:?}"
    );
    let peers = &existing.config_maps["home-mesh-peers"]
        .data
        .as_ref()
        .unwrap()["peers"];
    assert!(peers.starts_with("10.0.0.1:443 sha256-raw:"), "{peers}");
}

#[test]
fn port_only_override_change_keeps_the_certificate_and_the_relay() {
    let issuer = CountingIssuer::default();
    let mut existing = Existing::default();
    let p1 = run(
        &region(),
        &nodes_with_forward("198.51.100.7", "8443"),
        &existing,
        &issuer,
    );
    apply_all(&mut existing, &p1, true);
    let p2 = run(
        &with_status(region(), &p1),
        &nodes_with_forward("198.51.100.7", "9443"),
        &existing,
        &issuer,
    );
    assert_eq!(p2.certs_issued, 0, "ports are not in the certificate");
    assert_eq!(p2.pin_changes, 0);
    assert_eq!(p2.status.nodes[0].cert_name, p1.status.nodes[0].cert_name);
    assert!(
        p2.writes
            .iter()
            .all(|w| matches!(w, Write::ApplyConfigMap(c) if c.name_any() == "home-derpmap")),
        "only the derpMap changes: {:?}",
        p2.writes
    );
    assert_eq!(
        p2.derp_map.as_ref().unwrap().regions[&900].nodes[0].derp_port,
        9443
    );
    let e = p2
        .events
        .iter()
        .find(|e| e.reason == "PublishedPortsChanged")
        .expect("event");
    assert!(
        e.note.contains("node n1") && e.note.contains("DERP 9443"),
        "{}",
        e.note
    );
    assert!(e.note.contains("certificate is unchanged"), "{}", e.note);
}

#[test]
fn address_override_change_reissues_with_the_sans_named_and_counts_a_pin_change() {
    let mut existing = Existing::default();
    let p1 = run(
        &region(),
        &nodes_with_forward("198.51.100.7", "8443"),
        &existing,
        &RcgenIssuer,
    );
    apply_all(&mut existing, &p1, true);
    let p2 = run(
        &with_status(region(), &p1),
        &nodes_with_forward("198.51.100.8", "8443"),
        &existing,
        &RcgenIssuer,
    );
    assert_eq!((p2.certs_issued, p2.pin_changes), (1, 1));
    apply_all(&mut existing, &p2, true);
    assert_eq!(
        cert_ips(&existing, "home-n1-tls"),
        vec!["198.51.100.8".parse::<std::net::IpAddr>().unwrap()]
    );
    let e = p2
        .events
        .iter()
        .find(|e| e.reason == "PinChanged")
        .expect("event");
    assert!(e.warning);
    assert!(
        e.note.contains("from [198.51.100.7] to [198.51.100.8]"),
        "{}",
        e.note
    );
    assert!(
        e.note.contains("paste the policy snippet again"),
        "{}",
        e.note
    );
    assert!(e.note.contains("update_frequency"), "{}", e.note);
}

#[test]
fn malformed_override_leaves_the_node_out_keeps_its_certificate_and_says_why() {
    let mut existing = Existing::default();
    let good = nodes_with_forward("198.51.100.7", "8443");
    let p1 = run(&region(), &good, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    let bad = nodes_with_forward("198.51.100.7", "84430");
    let p2 = run(&with_status(region(), &p1), &bad, &existing, &RcgenIssuer);
    let names: Vec<_> = p2.status.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["n2", "n3"]);
    assert_eq!(p2.derp_map.as_ref().unwrap().regions[&900].nodes.len(), 2);
    // Withdrawn from the stored map first; the relay is stopped by the next plan.
    let prune = Write::DeletePod {
        name: "home-n1".into(),
        reason: "Prune",
    };
    assert!(!p2.writes.contains(&prune), "{:?}", p2.writes);
    apply_all(&mut existing, &p2, true);
    let p3 = run(&with_status(region(), &p2), &bad, &existing, &RcgenIssuer);
    assert!(p3.writes.contains(&prune), "{:?}", p3.writes);
    assert!(
        !p2.writes
            .contains(&Write::DeleteSecret("home-n1-tls".into())),
        "the certificate is kept: {:?}",
        p2.writes
    );
    let c = p2
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "NodesHealthy")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidNodeOverride")
    );
    assert!(
        c.message.contains("node n1") && c.message.contains("kubederp.io/derp-port=\"84430\""),
        "{}",
        c.message
    );
    let e = p2
        .events
        .iter()
        .find(|e| e.reason == "InvalidNodeOverride")
        .expect("event");
    assert!(
        e.warning && e.note.contains("kubederp.io/derp-port"),
        "{}",
        e.note
    );
    // fixing the annotation brings the node back with the same pin
    apply_all(&mut existing, &p3, true);
    let p4 = run(&with_status(region(), &p3), &good, &existing, &RcgenIssuer);
    assert_eq!(p4.certs_issued, 0);
    assert_eq!(p4.status.nodes[0].cert_name, p1.status.nodes[0].cert_name);
}

#[test]
fn ipv6_override_is_published_and_in_the_sans() {
    let mut nodes = three_nodes();
    nodes[0] = node("n1")
        .label("relay", "yes")
        .internal("10.0.0.1")
        .annotate(ANNOTATION_PUBLIC_IPV6, "2001:db8::7")
        .build();
    let mut existing = Existing::default();
    let p = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p, true);
    let n1 = &p.derp_map.as_ref().unwrap().regions[&900].nodes[0];
    assert_eq!(
        (n1.ipv4.as_str(), n1.ipv6.as_str()),
        ("10.0.0.1", "2001:db8::7")
    );
    assert_eq!(
        cert_ips(&existing, "home-n1-tls"),
        vec![
            "10.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "2001:db8::7".parse().unwrap()
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Region ID conflicts and pin changes
// ---------------------------------------------------------------------------------------

fn run_conflicted(
    region: &DerpRegion,
    nodes: &[Node],
    existing: &Existing,
    winner: Option<&str>,
) -> Plan {
    let refs: Vec<&Node> = nodes.iter().collect();
    plan(&Inputs {
        region,
        nodes: &refs,
        claims: &[],
        existing,
        now: now(),
        issuer: &RcgenIssuer,
        new_psk: &psk,
        probes: &BTreeMap::new(),
        relay_image: crate::crd::DEFAULT_RELAY_IMAGE,
        relay_image_pull_secrets: &[],
        region_id_winner: winner,
    })
    .unwrap()
}

#[test]
fn region_id_loser_publishes_nothing_and_says_who_holds_the_id() {
    let nodes = three_nodes();
    let mut existing = Existing::default();
    // published first, then another (older) region claims the ID
    let p1 = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    let p2 = run_conflicted(
        &with_status(region(), &p1),
        &nodes,
        &existing,
        Some("ns/first"),
    );
    assert!(p2.derp_map.is_none(), "left out of /derpmap.json");
    assert!(
        p2.writes
            .contains(&Write::DeleteConfigMap("home-derpmap".into()))
    );
    assert!(
        !p2.writes
            .iter()
            .any(|w| matches!(w, Write::DeletePod { .. } | Write::DeleteSecret(_))),
        "relays and certificates stay: {:?}",
        p2.writes
    );
    assert!(p2.status.derp_map.is_none());
    for ty in ["Ready", "DerpMapPublished"] {
        let c = p2.status.conditions.iter().find(|c| c.type_ == ty).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "RegionIDConflict")
        );
        assert!(
            c.message.contains("ns/first") && c.message.contains("900"),
            "{}",
            c.message
        );
    }
    let warned: Vec<_> = p2
        .events
        .iter()
        .filter(|e| e.reason == "RegionIDConflict")
        .collect();
    assert_eq!(warned.len(), 1);
    assert!(warned[0].warning && warned[0].note.contains("ns/first"));
    // steady: no second Event, no writes
    apply_all(&mut existing, &p2, true);
    let p3 = run_conflicted(
        &with_status(region(), &p2),
        &nodes,
        &existing,
        Some("ns/first"),
    );
    assert!(p3.writes.is_empty(), "{:?}", p3.writes);
    assert!(p3.events.is_empty(), "{:?}", p3.events);
    assert_eq!(p3.status, p2.status);
    // the winner goes away: published again, Ready, announced
    let p4 = run_conflicted(&with_status(region(), &p3), &nodes, &existing, None);
    assert!(p4.derp_map.is_some());
    assert!(
        p4.writes
            .iter()
            .any(|w| matches!(w, Write::ApplyConfigMap(c) if c.name_any() == "home-derpmap"))
    );
    let ready = p4
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert!(
        p4.events
            .iter()
            .any(|e| e.reason == "RegionIDConflictResolved" && !e.warning)
    );
}

#[test]
fn region_id_change_is_a_warning_event() {
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    assert_eq!(p1.status.region_id, Some(900));
    let mut r = with_status(region(), &p1);
    r.spec.region_id = 901;
    let p2 = run(&r, &nodes, &existing, &RcgenIssuer);
    let e = p2
        .events
        .iter()
        .find(|e| e.reason == "RegionIDChanged")
        .expect("event");
    assert!(
        e.warning && e.note.contains("from 900 to 901"),
        "{}",
        e.note
    );
    assert_eq!(p2.status.region_id, Some(901));
    assert!(p2.derp_map.as_ref().unwrap().regions.contains_key(&901));
}

// ---------------------------------------------------------------------------------------
// Relays that cannot start: a port taken on the node
// ---------------------------------------------------------------------------------------

#[test]
fn relay_that_cannot_bind_its_admin_port_makes_a_port_in_use_condition() {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    };
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    // what the kubelet reports for a relay that exits at start (FallbackToLogsOnError)
    let log = "INFO derper: server public key\n\
               ERROR derper: bind admin listener on 10.0.0.2:3480: Address already in use (os error 98)\n\
               derper: bind admin listener on 10.0.0.2:3480: Address already in use (os error 98)\n";
    existing.pods.get_mut("home-n2").unwrap().status = Some(PodStatus {
        phase: Some("Running".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "derper".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            last_state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 1,
                    reason: Some("Error".into()),
                    message: Some(log.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let p2 = run(&with_status(region(), &p1), &nodes, &existing, &RcgenIssuer);
    for ty in ["RelaysReady", "Ready"] {
        let c = p2.status.conditions.iter().find(|c| c.type_ == ty).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "PortInUse"),
            "{ty}"
        );
        assert!(
            c.message.contains("node n2")
                && c.message.contains("10.0.0.2:3480")
                && c.message.contains("spec.ports.admin"),
            "{}",
            c.message
        );
    }
    let warned: Vec<_> = p2
        .events
        .iter()
        .filter(|e| e.reason == "PortInUse")
        .collect();
    assert_eq!(warned.len(), 1);
    // once: the same failure on the next look is not a new Event
    let p3 = run(&with_status(region(), &p2), &nodes, &existing, &RcgenIssuer);
    assert!(!p3.events.iter().any(|e| e.reason == "PortInUse"));
    // a relay that becomes Ready again clears it
    existing.pods.get_mut("home-n2").unwrap().status = Some(ready_status());
    let p4 = run(&with_status(region(), &p3), &nodes, &existing, &RcgenIssuer);
    let c = p4
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "RelaysReady")
        .unwrap();
    assert_eq!(c.status, "True");
}

fn pdb_writes(p: &Plan) -> Vec<&PodDisruptionBudget> {
    p.writes
        .iter()
        .filter_map(|w| match w {
            Write::ApplyPdb(pdb) => Some(&**pdb),
            _ => None,
        })
        .collect()
}

#[test]
fn a_region_owns_a_disruption_budget_that_refuses_evicting_its_ready_relays() {
    let r = region();
    let p = run(&r, &three_nodes(), &Existing::default(), &RcgenIssuer);
    let [pdb] = pdb_writes(&p)[..] else {
        panic!("one PodDisruptionBudget per region: {:?}", p.writes)
    };
    assert_eq!(pdb.name_any(), "home-relays");
    let owner = &pdb.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("DerpRegion", Some(true)),
        "garbage-collected with its region"
    );
    let spec = pdb.spec.as_ref().unwrap();
    // an integer minAvailable above any relay count: no disruption is ever allowed while the
    // relays are Ready, and the disruption controller needs no scale subresource for it
    assert_eq!(spec.min_available, Some(IntOrString::Int(i32::MAX)));
    assert_eq!(spec.max_unavailable, None);
    // a relay that is not Ready is not published: evicting it withdraws nothing
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    let want = spec
        .selector
        .as_ref()
        .unwrap()
        .match_labels
        .clone()
        .unwrap();
    let selects = |pod: &Pod| {
        want.iter()
            .all(|(k, v)| pod.labels().get(k).is_some_and(|have| have == v))
    };
    let pods: Vec<&Pod> = p
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::CreatePod(pod) => Some(&**pod),
            _ => None,
        })
        .collect();
    assert_eq!(pods.len(), 3);
    assert!(
        pods.iter().all(|pod| selects(pod)),
        "selects every relay Pod"
    );
    let mut other = region();
    other.metadata.name = Some("other".into());
    other.metadata.uid = Some("other-uid".into());
    let q = run(&other, &three_nodes(), &Existing::default(), &RcgenIssuer);
    assert!(
        q.writes
            .iter()
            .all(|w| !matches!(w, Write::CreatePod(pod) if selects(pod))),
        "selects no relay of another region"
    );
}

#[test]
fn a_deleted_or_edited_disruption_budget_is_applied_again_and_an_intact_one_is_left_alone() {
    let r = region();
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p1 = run(&r, &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p1, true);
    let r = with_status(r, &p1);
    assert!(pdb_writes(&run(&r, &nodes, &existing, &RcgenIssuer)).is_empty());

    let edited = existing.pdbs.get_mut("home-relays").unwrap();
    edited.spec.as_mut().unwrap().min_available = Some(IntOrString::Int(1));
    let p2 = run(&r, &nodes, &existing, &RcgenIssuer);
    assert_eq!(pdb_writes(&p2).len(), 1, "{:?}", p2.writes);

    existing.pdbs.clear();
    let p3 = run(&r, &nodes, &existing, &RcgenIssuer);
    assert_eq!(pdb_writes(&p3).len(), 1, "{:?}", p3.writes);
}

mod steps;
