//! The seven steps of [`plan`] fed directly: one behaviour per test.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;

/// Run `f` with the Inputs of `region` over `nodes` and `existing` at [`now`].
fn with_inputs<T>(
    region: &DerpRegion,
    nodes: &[Node],
    existing: &Existing,
    probes: &BTreeMap<String, ProbeView>,
    f: impl FnOnce(&Inputs<'_>) -> T,
) -> T {
    let refs: Vec<&Node> = nodes.iter().collect();
    f(&Inputs {
        region,
        nodes: &refs,
        claims: &[],
        existing,
        now: now(),
        issuer: &RcgenIssuer,
        new_psk: &psk,
        probes,
        relay_image: crate::crd::DEFAULT_RELAY_IMAGE,
        relay_image_pull_secrets: &[],
        region_id_winner: None,
    })
}

/// Three nodes planned and stored once (Pods Ready), the region carrying that plan's status.
fn stored() -> (DerpRegion, Vec<Node>, Existing) {
    let nodes = three_nodes();
    let mut existing = Existing::default();
    let p = run(&region(), &nodes, &existing, &RcgenIssuer);
    apply_all(&mut existing, &p, true);
    (with_status(region(), &p), nodes, existing)
}

fn prev(r: &DerpRegion) -> DerpRegionStatus {
    r.status.clone().unwrap_or_default()
}

fn lifetime() -> CertLifetime {
    CertLifetime::from_policy(&region().spec.certificate).unwrap()
}

/// Step 1 over `nodes` and `existing`.
fn certs_of(r: &DerpRegion, nodes: &[Node], existing: &Existing) -> Certificates {
    with_inputs(r, nodes, existing, &BTreeMap::new(), |inp| {
        let sel = select_nodes(&r.spec, inp.nodes, &[]);
        certificates(inp, &prev(r), &sel.selected, &sel.skipped, lifetime()).unwrap()
    })
}

fn names(writes: &[Write]) -> Vec<String> {
    writes
        .iter()
        .map(|w| match w {
            Write::ApplySecret(s) => format!("apply {}", s.name_any()),
            Write::ApplyConfigMap(c) => format!("apply {}", c.name_any()),
            Write::CreatePod(p) => format!("create {}", p.name_any()),
            Write::ApplyPdb(p) => format!("apply {}", p.name_any()),
            Write::DeletePod { name, reason } => format!("delete {name} ({reason})"),
            Write::DeleteSecret(n) | Write::DeleteConfigMap(n) => format!("delete {n}"),
        })
        .collect()
}

// 1. certificates

#[test]
fn cert_lifetime_names_the_invalid_field_rotate_before_first() {
    let mut policy = region().spec.certificate;
    policy.validity = "forever".into();
    let err = CertLifetime::from_policy(&policy).unwrap_err();
    assert!(
        matches!(err, PlanError::InvalidDuration { field: "validity", ref value } if value == "forever")
    );
    policy.rotate_before = "soon".into();
    let err = CertLifetime::from_policy(&policy).unwrap_err();
    assert!(matches!(
        err,
        PlanError::InvalidDuration {
            field: "rotateBefore",
            ..
        }
    ));
    let ok = lifetime();
    assert!(ok.rotate_before < ok.validity);
}

#[test]
fn certificates_reuse_sound_secrets_and_issue_only_the_missing_one() {
    let (r, nodes, mut existing) = stored();
    existing.secrets.remove("home-n2-tls");
    let old = prev(&r);
    let certs = certs_of(&r, &nodes, &existing);
    assert_eq!(certs.issued, 1);
    assert_eq!(names(&certs.writes), ["apply home-n2-tls"]);
    assert_eq!(
        certs.wanted_secrets,
        ["home-n1-tls", "home-n2-tls", "home-n3-tls"]
    );
    let pins: Vec<&str> = certs.nodes.iter().map(|c| c.pin.as_str()).collect();
    assert_eq!(pins[0], old.nodes[0].cert_name);
    assert_ne!(pins[1], old.nodes[1].cert_name);
    assert_eq!(pins[2], old.nodes[2].cert_name);
    // n2's pin was published: replacing it is a pin change
    assert_eq!(certs.pin_changes, 1);
    let reasons: Vec<&str> = certs.events.iter().map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["PinChanged"]);
}

#[test]
fn certificates_issued_for_a_new_region_are_announced_without_pin_changes() {
    let r = region();
    let certs = certs_of(&r, &three_nodes(), &Existing::default());
    assert_eq!(certs.issued, 3);
    assert_eq!(certs.pin_changes, 0);
    assert_eq!(certs.writes.len(), 3);
    assert!(
        certs
            .events
            .iter()
            .all(|e| e.reason == "CertificateIssued" && !e.warning)
    );
}

#[test]
fn certificates_are_due_for_renewal_rotate_before_their_earliest_expiry() {
    let certs = certs_of(&region(), &three_nodes(), &Existing::default());
    let lt = lifetime();
    let earliest = certs.nodes.iter().map(|c| c.not_after).min().unwrap();
    assert_eq!(certs.next_renewal, Some(earliest - lt.rotate_before));
    assert!(certs.next_renewal.unwrap() > now());
    assert!(certs.next_renewal.unwrap() <= now() + lt.validity - lt.rotate_before);
}

#[test]
fn certificates_keep_the_secret_of_a_node_skipped_for_a_malformed_override() {
    let mut existing = Existing::default();
    let p1 = run(
        &region(),
        &nodes_with_forward("198.51.100.7", "8443"),
        &existing,
        &RcgenIssuer,
    );
    apply_all(&mut existing, &p1, true);
    let r = with_status(region(), &p1);
    let certs = certs_of(&r, &nodes_with_forward("198.51.100.7", "84430"), &existing);
    let planned: Vec<&str> = certs.nodes.iter().map(|c| c.node.name.as_str()).collect();
    assert_eq!(planned, ["n2", "n3"]);
    assert!(certs.wanted_secrets.contains(&"home-n1-tls".to_owned()));
    assert_eq!(certs.issued, 0);
}

#[test]
fn issued_event_is_a_pin_change_only_when_it_replaces_another_published_pin() {
    let mut old = DerpRegionStatus::default();
    let (e, changed) = issued_event(&old, "n1", "SecretMissing", "sha256-raw:bb");
    assert!(!changed);
    assert_eq!(e.reason, "CertificateIssued");
    assert!(e.note.contains("SecretMissing") && e.note.contains("sha256-raw:bb"));
    old.nodes.push(NodeStatus {
        name: "n1".into(),
        cert_name: "sha256-raw:aa".into(),
        ..NodeStatus::default()
    });
    let (e, changed) = issued_event(&old, "n1", "Expiring", "sha256-raw:bb");
    assert!(changed && e.warning);
    assert_eq!(e.reason, "PinChanged");
    assert!(e.note.contains("from sha256-raw:aa to sha256-raw:bb"));
    let (e, changed) = issued_event(&old, "n1", "Expiring", "sha256-raw:aa");
    assert!(!changed);
    assert_eq!(e.reason, "CertificateIssued");
    let (_, changed) = issued_event(&old, "n2", "SecretMissing", "sha256-raw:bb");
    assert!(!changed);
}

// 2. mesh Secret + peers ConfigMap

#[test]
fn mesh_children_keep_a_well_formed_psk_and_replace_a_malformed_one() {
    let (r, nodes, mut existing) = stored();
    let certs = certs_of(&r, &nodes, &existing);
    let mesh_name = mesh_secret_name("home");
    let set_psk = |existing: &mut Existing, psk: &str| {
        let s = existing.secrets.get_mut(&mesh_name).unwrap();
        s.data.as_mut().unwrap().insert(
            children::MESH_PSK_KEY.into(),
            k8s_openapi::ByteString(psk.as_bytes().to_vec()),
        );
    };
    // a stored PSK other than the fresh one stays: nothing to write
    set_psk(&mut existing, &"cd".repeat(32));
    let out = with_inputs(&r, &nodes, &existing, &BTreeMap::new(), |inp| {
        mesh_children(inp, &certs.nodes)
    });
    assert!(out.writes.is_empty(), "{:?}", names(&out.writes));
    assert_eq!(out.wanted_secrets, std::slice::from_ref(&mesh_name));
    assert_eq!(out.wanted_config_maps, [mesh_peers_name("home")]);
    // a malformed one is replaced by a fresh PSK
    set_psk(&mut existing, "not-hex");
    let out = with_inputs(&r, &nodes, &existing, &BTreeMap::new(), |inp| {
        mesh_children(inp, &certs.nodes)
    });
    let [Write::ApplySecret(s)] = &out.writes[..] else {
        panic!("{:?}", names(&out.writes))
    };
    assert_eq!(
        s.data.as_ref().unwrap()[children::MESH_PSK_KEY].0,
        psk().into_bytes()
    );
}

#[test]
fn mesh_peers_list_every_relay_with_its_pin() {
    let r = region();
    let nodes = three_nodes();
    let existing = Existing::default();
    let certs = certs_of(&r, &nodes, &existing);
    let out = with_inputs(&r, &nodes, &existing, &BTreeMap::new(), |inp| {
        mesh_children(inp, &certs.nodes)
    });
    assert_eq!(
        names(&out.writes),
        [
            format!("apply {}", mesh_secret_name("home")),
            format!("apply {}", mesh_peers_name("home"))
        ]
    );
    let Write::ApplyConfigMap(cm) = &out.writes[1] else {
        panic!()
    };
    let lines: Vec<&str> = cm.data.as_ref().unwrap()["peers"].lines().collect();
    let want: Vec<String> = certs
        .nodes
        .iter()
        .enumerate()
        .map(|(i, c)| format!("203.0.113.{}:443 {}", i + 1, c.pin))
        .collect();
    assert_eq!(lines, want);
}

// 3. relay Pods

fn relays(r: &DerpRegion, nodes: &[Node], existing: &Existing) -> RelayPods {
    let certs = certs_of(r, nodes, existing);
    with_inputs(r, nodes, existing, &BTreeMap::new(), |inp| {
        relay_pods(inp, &certs.nodes, true)
    })
}

#[test]
fn relay_pods_create_every_missing_pod() {
    let out = relays(&region(), &three_nodes(), &Existing::default());
    assert_eq!(
        names(&out.writes),
        [
            "apply home-relays",
            "create home-n1",
            "create home-n2",
            "create home-n3"
        ]
    );
    assert_eq!(out.wanted, ["home-n1", "home-n2", "home-n3"]);
    assert!(out.replacing.is_empty() && out.events.is_empty() && !out.rollout_pending);
}

#[test]
fn relay_pods_of_a_stored_region_plan_nothing() {
    let (r, nodes, existing) = stored();
    let out = relays(&r, &nodes, &existing);
    assert!(out.writes.is_empty() && out.events.is_empty() && !out.rollout_pending);
    assert_eq!(out.wanted, ["home-n1", "home-n2", "home-n3"]);
}

#[test]
fn relay_pods_replace_ready_pods_one_at_a_time() {
    let (mut r, nodes, existing) = stored();
    r.spec.relay.log_level = Some("debug".into());
    let out = relays(&r, &nodes, &existing);
    assert_eq!(names(&out.writes), ["delete home-n1 (Replace)"]);
    assert_eq!(out.replacing, ["home-n1"]);
    assert!(out.rollout_pending);
    assert_eq!(out.events.len(), 1);
    assert!(out.events[0].note.contains("one node at a time"));
}

#[test]
fn relay_pods_replace_unready_changed_pods_at_once() {
    let (mut r, nodes, mut existing) = stored();
    r.spec.relay.log_level = Some("debug".into());
    for pod in existing.pods.values_mut() {
        pod.status = None;
    }
    let out = relays(&r, &nodes, &existing);
    assert_eq!(
        names(&out.writes),
        [
            "delete home-n1 (Replace)",
            "delete home-n2 (Replace)",
            "delete home-n3 (Replace)"
        ]
    );
    assert_eq!(out.replacing, ["home-n1", "home-n2", "home-n3"]);
    assert_eq!(out.events.len(), 3);
    assert!(out.rollout_pending);
}

#[test]
fn relay_pods_replace_no_ready_pod_while_another_relay_is_missing() {
    let (mut r, nodes, mut existing) = stored();
    r.spec.relay.log_level = Some("debug".into());
    existing.pods.remove("home-n3");
    let out = relays(&r, &nodes, &existing);
    assert_eq!(names(&out.writes), ["create home-n3"]);
    assert!(out.replacing.is_empty());
    assert!(out.rollout_pending);
}

#[test]
fn relay_pods_wait_for_a_terminating_pod() {
    let (r, nodes, mut existing) = stored();
    existing
        .pods
        .get_mut("home-n2")
        .unwrap()
        .metadata
        .deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let out = relays(&r, &nodes, &existing);
    assert!(out.writes.is_empty(), "{:?}", names(&out.writes));
    assert!(out.rollout_pending);
}

// 4. derpMap

fn statuses(
    r: &DerpRegion,
    nodes: &[Node],
    existing: &Existing,
    replacing: &[String],
) -> (Certificates, Vec<NodeStatus>) {
    let certs = certs_of(r, nodes, existing);
    let st = with_inputs(r, nodes, existing, &BTreeMap::new(), |inp| {
        node_statuses(inp, &certs.nodes, replacing)
    });
    (certs, st)
}

fn ready(st: &[NodeStatus]) -> Vec<bool> {
    st.iter().map(|n| n.ready).collect()
}

#[test]
fn node_status_is_ready_only_for_a_ready_pod_serving_the_current_pin_and_not_replaced() {
    let (r, nodes, mut existing) = stored();
    let (certs, st) = statuses(&r, &nodes, &existing, &[]);
    assert_eq!(ready(&st), [true, true, true]);
    assert_eq!(st[0].cert_name, certs.nodes[0].pin);
    assert_eq!(st[0].pod_phase.as_deref(), Some("Running"));
    let (_, st) = statuses(&r, &nodes, &existing, &["home-n1".to_owned()]);
    assert_eq!(ready(&st), [false, true, true]);
    existing
        .pods
        .get_mut("home-n2")
        .unwrap()
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(ANNOTATION_PIN.into(), "sha256-raw:old".into());
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    assert_eq!(ready(&st), [true, false, true]);
}

#[test]
fn node_status_phase_is_missing_without_a_pod_and_pending_without_a_phase() {
    let (r, nodes, mut existing) = stored();
    existing.pods.remove("home-n1");
    existing.pods.get_mut("home-n2").unwrap().status = None;
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    let phases: Vec<_> = st.iter().map(|n| n.pod_phase.as_deref()).collect();
    assert_eq!(phases, [Some("Missing"), Some("Pending"), Some("Running")]);
    assert_eq!(ready(&st), [false, false, true]);
}

fn probes_withholding(names: &[&str]) -> BTreeMap<String, ProbeView> {
    names
        .iter()
        .map(|n| ((*n).to_owned(), view("tcp: refused", true)))
        .collect()
}

#[test]
fn probe_health_withholds_failing_ready_nodes_unless_every_one_fails() {
    let (r, nodes, existing) = stored();
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    let h = probe_health(false, &st, &probes_withholding(&["n2"]));
    assert_eq!(h.withheld, ["n2"]);
    assert!(!h.kept_all);
    let h = probe_health(false, &st, &probes_withholding(&["n1", "n2", "n3"]));
    assert!(h.withheld.is_empty());
    assert!(h.kept_all);
    let h = probe_health(true, &st, &probes_withholding(&["n2"]));
    assert!(h.withheld.is_empty() && !h.kept_all);
}

#[test]
fn derp_map_lists_ready_nodes_the_probes_do_not_withhold() {
    let (mut r, nodes, mut existing) = stored();
    r.spec.derp_map.publish_unhealthy = false;
    existing.pods.remove("home-n1");
    let (certs, st) = statuses(&r, &nodes, &existing, &[]);
    let h = probe_health(false, &st, &probes_withholding(&["n2"]));
    let map = derp_map(&r, &certs.nodes, &st, &h);
    let region = &map.regions[&900];
    let listed: Vec<&str> = region.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(listed, ["n3"]);
    let n3 = &region.nodes[0];
    assert_eq!(n3.cert_name, certs.nodes[2].pin);
    assert_eq!(n3.ipv4, "203.0.113.3");
    assert_eq!(n3.ipv6, "none");
    assert_eq!(
        (n3.derp_port, n3.stun_port),
        (r.spec.ports.derp, r.spec.ports.stun)
    );
    assert_eq!(region.region_code, "home");
    // publishUnhealthy (the default): every node, Ready or not
    r.spec.derp_map.publish_unhealthy = true;
    let h = probe_health(true, &st, &probes_withholding(&["n2"]));
    let map = derp_map(&r, &certs.nodes, &st, &h);
    assert_eq!(map.regions[&900].nodes.len(), 3);
}

#[test]
fn publish_derp_map_writes_and_announces_only_a_changed_map() {
    let r = region();
    let nodes = three_nodes();
    let existing = Existing::default();
    let (certs, st) = statuses(&r, &nodes, &existing, &[]);
    let h = probe_health(false, &st, &BTreeMap::new());
    let publish = |r: &DerpRegion, existing: &Existing| {
        with_inputs(r, &nodes, existing, &BTreeMap::new(), |inp| {
            publish_derp_map(inp, &prev(r), derp_map(r, &certs.nodes, &st, &h))
        })
    };
    let first = publish(&r, &existing);
    let dm = derpmap_name(&r);
    assert_eq!(names(&first.writes), [format!("apply {dm}")]);
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].reason, "DerpMapPublished");
    assert!(first.events[0].note.contains("lists 3 node(s)"));
    assert_eq!(first.wanted_config_map.as_deref(), Some(dm.as_str()));
    assert_eq!(first.status.config_map_name, dm);
    // stored, and the status names its hash: nothing to write or say
    let mut existing = existing;
    let Write::ApplyConfigMap(cm) = &first.writes[0] else {
        panic!()
    };
    existing.config_maps.insert(dm.clone(), cm.clone());
    let mut r2 = r.clone();
    r2.status = Some(DerpRegionStatus {
        derp_map: Some(first.status.clone()),
        ..DerpRegionStatus::default()
    });
    let again = publish(&r2, &existing);
    assert!(again.writes.is_empty() && again.events.is_empty());
    assert_eq!(again.status, first.status);
    // the ConfigMap lost but the same hash published: rewritten without an Event
    let lost = publish(&r2, &Existing::default());
    assert_eq!(lost.writes.len(), 1);
    assert!(lost.events.is_empty());
}

#[test]
fn publish_derp_map_of_a_region_id_loser_writes_nothing_and_wants_no_config_map() {
    let r = region();
    let nodes = three_nodes();
    let existing = Existing::default();
    let (certs, st) = statuses(&r, &nodes, &existing, &[]);
    let h = probe_health(false, &st, &BTreeMap::new());
    let out = with_inputs(&r, &nodes, &existing, &BTreeMap::new(), |inp| {
        let loser = Inputs {
            region_id_winner: Some("ns/other"),
            ..*inp
        };
        publish_derp_map(&loser, &prev(&r), derp_map(&r, &certs.nodes, &st, &h))
    });
    assert!(out.writes.is_empty() && out.events.is_empty());
    assert_eq!(out.wanted_config_map, None);
}

// 5. prune

fn everything_wanted(existing: &Existing) -> Wanted {
    Wanted {
        secrets: existing.secrets.keys().cloned().collect(),
        config_maps: existing.config_maps.keys().cloned().collect(),
        pods: existing.pods.keys().cloned().collect(),
    }
}

#[test]
fn prune_keeps_an_unwanted_relay_while_the_stored_map_lists_its_node() {
    let (r, _, mut existing) = stored();
    let mut wanted = everything_wanted(&existing);
    wanted.pods.retain(|p| p != "home-n3");
    let out = prune(&r, &existing, &wanted);
    assert!(out.writes.is_empty(), "{:?}", names(&out.writes));
    assert!(out.relays_kept);
    // once the map without n3 is stored, the relay goes
    existing.config_maps.remove(&derpmap_name(&r));
    let out = prune(&r, &existing, &wanted);
    assert_eq!(names(&out.writes), ["delete home-n3 (Prune)"]);
    assert!(!out.relays_kept);
}

#[test]
fn prune_deletes_only_owned_children_not_already_being_deleted() {
    let (r, _, mut existing) = stored();
    existing.config_maps.remove(&derpmap_name(&r));
    let mut foreign = existing.secrets["home-n1-tls"].clone();
    foreign.metadata.owner_references = None;
    existing.secrets.insert("foreign".into(), foreign);
    existing
        .secrets
        .get_mut("home-n2-tls")
        .unwrap()
        .metadata
        .deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let out = prune(&r, &existing, &Wanted::default());
    let deleted = names(&out.writes);
    assert!(deleted.contains(&"delete home-n1 (Prune)".to_owned()));
    assert!(deleted.contains(&"delete home-n1-tls".to_owned()));
    assert!(deleted.contains(&format!("delete {}", mesh_peers_name("home"))));
    assert!(!deleted.contains(&"delete foreign".to_owned()));
    assert!(!deleted.contains(&"delete home-n2-tls".to_owned()));
    // nothing unwanted, nothing deleted
    assert!(
        prune(&r, &existing, &everything_wanted(&existing))
            .writes
            .is_empty()
    );
}

// 6. node membership and skip events

fn skipped(name: &str, reason: &str) -> SkippedNode {
    SkippedNode {
        name: name.into(),
        reason: reason.into(),
        message: format!("{reason} details"),
    }
}

#[test]
fn membership_events_name_joined_and_left_nodes_and_newly_skipped_ones() {
    let (r, mut nodes, existing) = stored();
    let mut old = prev(&r);
    old.skipped_nodes = vec![skipped("n8", "Untolerated")];
    nodes[2] = node("n4")
        .label("relay", "yes")
        .external("203.0.113.4")
        .build();
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let sel = select_nodes(&r.spec, &refs, &[]);
    let skip = [
        skipped("n7", "PortConflict"),
        skipped("n8", "Untolerated"),
        skipped("n9", "MaxNodes"),
    ];
    let events = membership_events(&old, &sel.selected, &skip, &st);
    let got: Vec<(&str, bool)> = events
        .iter()
        .map(|e| (e.reason.as_str(), e.warning))
        .collect();
    assert_eq!(
        got,
        [
            ("NodeAdded", false),
            ("NodeRemoved", false),
            ("PortConflict", true)
        ]
    );
    assert!(events[0].note.contains("n4") && events[1].note.contains("n3"));
    assert!(events[2].note.contains("n7"));
    // the same membership again says nothing
    let (_, st) = statuses(&r, &three_nodes(), &existing, &[]);
    let refs_same: Vec<Node> = three_nodes();
    let refs_same: Vec<&Node> = refs_same.iter().collect();
    let sel = select_nodes(&r.spec, &refs_same, &[]);
    assert!(membership_events(&prev(&r), &sel.selected, &[], &st).is_empty());
}

#[test]
fn membership_events_announce_a_changed_published_port() {
    let (r, nodes, existing) = stored();
    let (_, mut st) = statuses(&r, &nodes, &existing, &[]);
    st[1].derp_port = Some(8443);
    let refs: Vec<&Node> = nodes.iter().collect();
    let sel = select_nodes(&r.spec, &refs, &[]);
    let events = membership_events(&prev(&r), &sel.selected, &[], &st);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "PublishedPortsChanged");
    assert!(events[0].note.contains("node n2") && events[0].note.contains("DERP 8443"));
}

#[test]
fn region_id_range_warning_comes_once_per_generation_and_never_inside_900_999() {
    let mut r = region();
    r.spec.region_id = 12;
    let mut old = DerpRegionStatus::default();
    let e = region_id_range_event(&r, &old).unwrap();
    assert!(e.warning && e.note.contains("spec.regionID 12"));
    old.observed_generation = r.metadata.generation;
    assert_eq!(region_id_range_event(&r, &old), None);
    r.spec.region_id = 999;
    assert_eq!(
        region_id_range_event(&r, &DerpRegionStatus::default()),
        None
    );
}

// 7. status

#[test]
fn region_status_counts_ready_relays_and_names_the_derpmap() {
    let (r, nodes, existing) = stored();
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    let dm = DerpMapStatus {
        config_map_name: derpmap_name(&r),
        content_hash: "sha256:test".into(),
    };
    let health = ProbeHealth {
        withheld: Vec::new(),
        kept_all: false,
    };
    let (status, events) = with_inputs(&r, &nodes, &existing, &BTreeMap::new(), |inp| {
        region_status(inp, &prev(&r), &health, st, Vec::new(), dm.clone())
    });
    assert_eq!(status.nodes_ready.as_deref(), Some("3/3"));
    assert_eq!(status.derp_map, Some(dm));
    assert_eq!(status.nodes.len(), 3);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True");
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn requeue_is_the_soonest_of_renewal_rollout_and_the_maximum() {
    let t = now();
    assert_eq!(requeue_after(t, None, false), MAX_REQUEUE);
    assert_eq!(
        requeue_after(t, Some(t + time::Duration::seconds(60)), false),
        Duration::from_secs(60)
    );
    assert_eq!(
        requeue_after(t, Some(t + time::Duration::days(3)), false),
        MAX_REQUEUE
    );
    // a renewal already due: look again in a second, not in a busy loop
    assert_eq!(
        requeue_after(t, Some(t - time::Duration::hours(1)), false),
        Duration::from_secs(1)
    );
    assert_eq!(requeue_after(t, None, true), ROLLOUT_REQUEUE);
    assert_eq!(
        requeue_after(t, Some(t + time::Duration::seconds(2)), true),
        Duration::from_secs(2)
    );
}

#[test]
fn no_nodes_message_names_each_skipped_node_with_its_reason() {
    assert!(no_nodes_message(&[]).starts_with("no Node matches spec.nodeSelector"));
    assert_eq!(
        no_nodes_message(&[skipped("n1", "PortConflict"), skipped("n2", "MaxNodes")]),
        "no usable Node: n1 (PortConflict), n2 (MaxNodes)"
    );
}

#[test]
fn readiness_conditions_count_ready_relays_and_name_the_ones_waited_for() {
    let (r, nodes, mut existing) = stored();
    existing.pods.get_mut("home-n2").unwrap().status = None;
    let (_, st) = statuses(&r, &nodes, &existing, &[]);
    let relays = relays_ready(&st, "none");
    assert_eq!(
        (relays.status.as_str(), relays.reason.as_str()),
        ("False", "RelaysNotReady")
    );
    assert_eq!(relays.message, "2/3 relay Pods are Ready; waiting for n2");
    let ready = region_ready(&st, "none");
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("False", "2/3 relays Ready")
    );
    let certs = certificates_ready(&st, "none");
    assert_eq!(certs.status, "True");
    let earliest = st.iter().map(|n| n.not_after.as_str()).min().unwrap();
    assert!(
        certs
            .message
            .ends_with(&format!("earliest notAfter {earliest}"))
    );
    for c in [
        relays_ready(&[], "no Node"),
        region_ready(&[], "no Node"),
        certificates_ready(&[], "no Node"),
    ] {
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            ("False", "NoNodes", "no Node")
        );
    }
}
