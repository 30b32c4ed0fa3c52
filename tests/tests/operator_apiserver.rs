//! The operator against a real kube-apiserver (+ kube-controller-manager for garbage
//! collection): DerpRegion + Node objects → Secrets, relay Pods, mesh objects, the derpMap
//! ConfigMap and status.
//!
//! Each test runs its own in-process controller (`derp_operator::controller::run`) limited to
//! its own namespace, and creates cluster-scoped Nodes with a per-test label value, so tests
//! can run in parallel on the shared control plane without seeing each other.
//!
//! There is no kubelet: a small "fake kubelet" task marks relay Pods Running/Ready and
//! finishes graceful deletions (what a kubelet does once containers stopped).

use std::time::Duration;

use derp_operator::{certs::parse_cert_pem, crd::DerpRegion};
use derp_tests::admin_http;
use derp_tests::k8s::{tag, wait_for};
use derp_tests::nodes::{TestNodes, fake_kubelet, label_node, set_addresses};
use derp_tests::operator::{Operator, WAIT, setup};
use derp_tests::regions::{
    cond, create_region, derpmap_json, events, is_ready_with, names, pins, resource_versions,
    wait_region,
};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Pod, Secret},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, EvictParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_lifecycle_nodes_join_leave_change_ip_restart_and_gc() {
    let (client, ns) = setup("op-life").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-relay";
    let n = |i: u32| format!("life-{t}-n{i}");
    let mut nodes = TestNodes::new(&client);
    for i in 1..=4 {
        let labels = if i < 4 { json!({key: t}) } else { json!({}) };
        nodes
            .create(
                &n(i),
                labels,
                &[
                    ("InternalIP", &format!("127.0.10.{i}")),
                    ("ExternalIP", &format!("127.0.20.{i}")),
                ],
            )
            .await;
    }
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "home",
        json!({"regionID": 900, "nodeSelector": {key: t}, "ports": {"derp": 8443}}),
    )
    .await;

    // --- three nodes: Secrets, Pods, mesh, derpMap, status
    let (n1, n2, n3, n4) = (n(1), n(2), n(3), n(4));
    let r = wait_region(&client, &ns, "home", "region Ready over 3 nodes", |r| {
        is_ready_with(r, &[&n1, &n2, &n3])
    })
    .await;
    let st = r.status.clone().expect("status");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        names(&secrets, "home").await,
        vec![
            format!("home-{n1}-tls"),
            format!("home-{n2}-tls"),
            format!("home-{n3}-tls"),
            "home-mesh".to_owned(),
        ]
    );
    assert_eq!(
        names(&pods, "home").await,
        vec![
            format!("home-{n1}"),
            format!("home-{n2}"),
            format!("home-{n3}")
        ]
    );
    assert_eq!(
        names(&cms, "home").await,
        vec!["home-derpmap".to_owned(), "home-mesh-peers".to_owned()]
    );
    for ns_node in &st.nodes {
        let s = secrets
            .get(&format!("home-{}-tls", ns_node.name))
            .await
            .expect("tls secret");
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        let parsed = parse_cert_pem(&s.data.as_ref().expect("data")["tls.crt"].0).expect("cert");
        assert_eq!(
            parsed.pin, ns_node.cert_name,
            "status pin = sha256 of the stored cert"
        );
        let ext = ns_node.ipv4.clone().expect("ipv4");
        assert!(ext.starts_with("127.0.20."), "ExternalIP preferred: {ext}");
        assert_eq!(
            parsed.ips,
            vec![ext.parse::<std::net::IpAddr>().expect("ip")]
        );
        assert_eq!(
            s.annotations().get("kubederp.io/cert-name"),
            Some(&ns_node.cert_name)
        );
        let owner = &s.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("DerpRegion", "home")
        );
        let pod = pods
            .get(&format!("home-{}", ns_node.name))
            .await
            .expect("pod");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some(ns_node.name.as_str()));
        assert_eq!(spec.host_network, Some(true));
        let args = spec.containers[0].args.clone().unwrap_or_default();
        assert!(args.contains(&format!("--hostname={ext}")), "{args:?}");
        assert!(args.contains(&":8443".to_owned()), "{args:?}");
    }
    let peers = cms.get("home-mesh-peers").await.expect("peers");
    let peers = &peers.data.expect("data")["peers"];
    assert_eq!(peers.lines().count(), 3);
    assert!(peers.contains(&format!("127.0.20.1:8443 {}", st.nodes[0].cert_name)));
    let map = derpmap_json(&client, &ns, "home-derpmap").await;
    let region = &map["Regions"]["900"];
    assert_eq!(region["RegionCode"], "home");
    assert_eq!(region["Nodes"].as_array().expect("nodes").len(), 3);
    assert_eq!(
        region["Nodes"][0]["CertName"],
        st.nodes[0].cert_name.as_str()
    );
    assert_eq!(region["Nodes"][0]["DERPPort"], 8443);
    assert_eq!(
        st.derp_map.as_ref().map(|d| d.config_map_name.as_str()),
        Some("home-derpmap")
    );
    for c in [
        "Ready",
        "CertificatesReady",
        "RelaysReady",
        "DerpMapPublished",
        "NodesHealthy",
    ] {
        let c = cond(&r, c).unwrap_or_else(|| panic!("condition {c}"));
        assert_eq!(c.status, "True", "{c:?}");
    }
    assert_eq!(st.nodes_ready.as_deref(), Some("3/3"));
    let merged: Value = serde_json::from_str(&op.shared.merged_derp_map_json()).expect("json");
    assert_eq!(
        merged["Regions"]["900"]["Nodes"].as_array().map(Vec::len),
        Some(3)
    );
    let pins0 = pins(&r);

    // --- a fourth node joins
    label_node(&client, &n4, key, Some(&t)).await;
    let r = wait_region(&client, &ns, "home", "4th node joins", |r| {
        is_ready_with(r, &[&n1, &n2, &n3, &n4])
    })
    .await;
    for (k, v) in &pins0 {
        assert_eq!(
            pins(&r).get(k),
            Some(v),
            "existing pins unchanged when a node joins"
        );
    }
    let map = derpmap_json(&client, &ns, "home-derpmap").await;
    assert_eq!(
        map["Regions"]["900"]["Nodes"].as_array().map(Vec::len),
        Some(4)
    );

    // --- one node leaves: its Pod and Secret are pruned, the map shrinks
    label_node(&client, &n2, key, None).await;
    wait_region(&client, &ns, "home", "n2 leaves", |r| {
        is_ready_with(r, &[&n1, &n3, &n4])
    })
    .await;
    wait_for("n2's pod and secret pruned", WAIT, || {
        let (pods, secrets) = (pods.clone(), secrets.clone());
        let (p, s) = (format!("home-{n2}"), format!("home-{n2}-tls"));
        async move {
            (pods.get_opt(&p).await.ok()?.is_none() && secrets.get_opt(&s).await.ok()?.is_none())
                .then_some(())
        }
    })
    .await;
    let map = derpmap_json(&client, &ns, "home-derpmap").await;
    let hosts: Vec<&str> = map["Regions"]["900"]["Nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["Name"].as_str())
        .collect();
    assert_eq!(hosts, [n1.as_str(), n3.as_str(), n4.as_str()]);

    // --- a node's IP changes: new certificate and pin, its Pod is replaced
    let old_pin = pins(&r)[&n3].clone();
    set_addresses(&client, &n3, &[("ExternalIP", "127.0.30.3")]).await;
    let r = wait_region(&client, &ns, "home", "new pin for n3", |r| {
        is_ready_with(r, &[&n1, &n3, &n4])
            && r.status.as_ref().is_some_and(|s| {
                s.nodes
                    .iter()
                    .any(|n| n.name == n3 && n.ipv4.as_deref() == Some("127.0.30.3"))
            })
    })
    .await;
    let new_pin = pins(&r)[&n3].clone();
    assert_ne!(new_pin, old_pin);
    assert_eq!(pins(&r)[&n1], pins0[&n1]);
    let pod = pods.get(&format!("home-{n3}")).await.expect("pod");
    assert_eq!(
        pod.annotations().get("kubederp.io/cert-name"),
        Some(&new_pin),
        "the relay Pod was replaced for the new certificate"
    );
    wait_for("PinChanged event for the new IP", WAIT, || {
        let (client, ns, new_pin) = (client.clone(), ns.clone(), new_pin.clone());
        async move {
            let issued = events(&client, &ns, "PinChanged").await;
            issued
                .iter()
                .any(|e| e.contains("AddressesChanged") && e.contains(&new_pin))
                .then_some(())
        }
    })
    .await;

    // --- a deleted Secret is recreated; the new pin is announced
    secrets
        .delete(&format!("home-{n1}-tls"), &DeleteParams::default())
        .await
        .expect("delete secret");
    let r = wait_region(&client, &ns, "home", "n1 re-issued", |r| {
        is_ready_with(r, &[&n1, &n3, &n4]) && pins(r)[&n1] != pins0[&n1]
    })
    .await;
    let (old1, new1) = (pins0[&n1].clone(), pins(&r)[&n1].clone());
    wait_for("PinChanged event announcing the new pin", WAIT, || {
        let (client, ns, old1, new1) = (client.clone(), ns.clone(), old1.clone(), new1.clone());
        async move {
            let issued = events(&client, &ns, "PinChanged").await;
            issued
                .iter()
                .any(|e| e.contains("SecretMissing") && e.contains(&old1) && e.contains(&new1))
                .then_some(())
        }
    })
    .await;

    // --- a conflicting edit of the derpMap is reverted
    cms.patch(
        "home-derpmap",
        &PatchParams::apply("someone-else").force(),
        &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "home-derpmap"}, "data": {"derpmap.json": "{}"}})),
    )
    .await
    .expect("foreign edit");
    wait_for("derpMap restored", WAIT, || {
        let cms = cms.clone();
        async move {
            let c = cms.get("home-derpmap").await.ok()?;
            (c.data?.get("derpmap.json")? != "{}").then_some(())
        }
    })
    .await;

    // --- settle, then restart: pins unchanged and no writes at all
    let settled = wait_region(&client, &ns, "home", "settled", |r| {
        is_ready_with(r, &[&n1, &n3, &n4])
    })
    .await;
    op.stop().await;
    let before = resource_versions(&client, &ns).await;
    let op2 = Operator::start(&client, &ns);
    wait_for("restarted operator reconciled", WAIT, || {
        let n = op2.reconciles();
        async move { (n >= 1).then_some(()) }
    })
    .await;
    // a node event triggers a second pass over the same state
    label_node(&client, &n1, "kubederp.io/touch", Some("1")).await;
    wait_for("second reconcile after restart", WAIT, || {
        let n = op2.reconciles();
        async move { (n >= 2).then_some(()) }
    })
    .await;
    assert_eq!(
        op2.writes(),
        0,
        "an idle reconcile after restart writes nothing"
    );
    assert_eq!(resource_versions(&client, &ns).await, before);
    let r = Api::<DerpRegion>::namespaced(client.clone(), &ns)
        .get("home")
        .await
        .expect("region");
    assert_eq!(pins(&r), pins(&settled));

    // --- delete the region: everything is garbage-collected
    Api::<DerpRegion>::namespaced(client.clone(), &ns)
        .delete("home", &DeleteParams::default())
        .await
        .expect("delete region");
    wait_for("children garbage-collected", WAIT, || {
        let (pods, secrets, cms) = (pods.clone(), secrets.clone(), cms.clone());
        async move {
            let empty = names(&pods, "home").await.is_empty()
                && names(&secrets, "home").await.is_empty()
                && names(&cms, "home").await.is_empty();
            empty.then_some(())
        }
    })
    .await;
    op2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_with_the_field_named() {
    let (client, ns) = setup("op-invalid").await;
    let api: Api<DerpRegion> = Api::namespaced(client.clone(), &ns.name);
    let cases = [
        (json!({"regionID": 0}), "spec.regionID"),
        (json!({"regionID": 1000}), "spec.regionID"),
        (
            json!({"regionID": 900, "ports": {"derp": 70000}}),
            "spec.ports.derp",
        ),
        (
            json!({"regionID": 900, "ports": {"stun": 0}}),
            "spec.ports.stun",
        ),
        (
            json!({"regionID": 900, "ports": {"derp": 80}}),
            "spec.ports.http",
        ),
        (
            json!({"regionID": 900, "clientVerification": {"mode": "url"}}),
            "spec.clientVerification.verifyClientURL",
        ),
        (
            json!({"regionID": 900, "clientVerification": {"mode": "tailscaled"}}),
            "spec.clientVerification.tailscaled",
        ),
        (
            json!({"regionID": 900, "certificate": {"validity": "10 years"}}),
            "spec.certificate.validity",
        ),
        (json!({"regionID": 900, "maxNodes": 0}), "spec.maxNodes"),
        (
            json!({"regionID": 900, "addresses": {"types": ["Hostname"]}}),
            "spec.addresses.types",
        ),
        (
            json!({"regionID": 900, "ports": {"derp": 8443, "admin": 8443}}),
            "spec.ports.admin",
        ),
        (
            json!({"regionID": 900, "relay": {"podLabels": {"kubederp.io/region": "x"}}}),
            "spec.relay.podLabels",
        ),
        (
            json!({"regionID": 900, "relay": {"podLabels": {"team": "a b"}}}),
            "spec.relay.podLabels",
        ),
        (
            json!({"regionID": 900, "relay": {"podAnnotations": {"kubederp.io/spec-hash": "x"}}}),
            "spec.relay.podAnnotations",
        ),
        (
            json!({"regionID": 900, "relay": {"priorityClassName": "Not_A_Name"}}),
            "spec.relay.priorityClassName",
        ),
        (
            json!({"regionID": 900, "relay": {"extraVolumes": [{"name": "certs", "emptyDir": {}}]}}),
            "spec.relay.extraVolumes",
        ),
        (
            json!({"regionID": 900, "relay": {
                "extraVolumes": [{"name": "rate", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "other", "mountPath": "/etc/derp/rate"}]}}),
            "spec.relay.extraVolumeMounts",
        ),
        (
            json!({"regionID": 900, "relay": {
                "extraVolumes": [{"name": "rate", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "rate", "mountPath": "/certs"}]}}),
            "spec.relay.extraVolumeMounts",
        ),
    ];
    for (i, (spec, field)) in cases.iter().enumerate() {
        let obj: Value = json!({
            "apiVersion": "kubederp.io/v1alpha1", "kind": "DerpRegion",
            "metadata": {"name": format!("bad{i}")}, "spec": spec,
        });
        let r: Result<DerpRegion, _> = serde_json::from_value(obj.clone());
        let err = match r {
            Ok(r) => api
                .create(&PostParams::default(), &r)
                .await
                .expect_err(&format!("{spec} must be refused")),
            Err(_) => {
                // not representable in Rust types (e.g. an unknown enum value): send raw JSON
                let dyn_api: Api<kube::api::DynamicObject> = Api::namespaced_with(
                    client.clone(),
                    &ns.name,
                    &kube::api::ApiResource::erase::<DerpRegion>(&()),
                );
                let d: kube::api::DynamicObject = serde_json::from_value(obj).expect("dyn");
                dyn_api
                    .create(&PostParams::default(), &d)
                    .await
                    .expect_err(&format!("{spec} must be refused"))
            }
        };
        let kube::Error::Api(status) = &err else {
            panic!("{spec}: unexpected error {err}")
        };
        assert_eq!(status.code, 422, "{spec}: {status:?}");
        assert!(
            status.message.contains(field),
            "{spec}: {} lacks {field}",
            status.message
        );
    }
    // regionID can change (that is how a region ID conflict is fixed), within its range
    let ok = create_region(&client, &ns.name, "good", json!({"regionID": 901})).await;
    let moved = api
        .patch(
            &ok.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"regionID": 902}})),
        )
        .await
        .expect("regionID change accepted");
    assert_eq!(moved.spec.region_id, 902);
    let err = api
        .patch(
            &ok.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"regionID": 1000}})),
        )
        .await
        .expect_err("out of range");
    let kube::Error::Api(status) = &err else {
        panic!("unexpected {err}")
    };
    assert!(
        status.message.contains("spec.regionID"),
        "{}",
        status.message
    );
    // defaults are filled in by the apiserver
    let stored = api.get("good").await.expect("get");
    assert_eq!(stored.spec.ports.derp, 443);
    assert_eq!(stored.spec.ports.stun, 3478);
    assert_eq!(
        stored.spec.ports.admin, 3480,
        "admin default moved off 9090"
    );
    assert_eq!(stored.spec.certificate.validity, "87600h");
    assert!(stored.spec.derp_map.publish_unhealthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_on_one_node_and_port_get_a_condition_not_a_fight() {
    let (client, ns) = setup("op-clash").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-clash";
    let node = format!("clash-{t}-n1");
    let mut nodes = TestNodes::new(&client);
    nodes
        .create(&node, json!({key: t}), &[("InternalIP", "127.0.40.1")])
        .await;
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "first",
        json!({"regionID": 910, "nodeSelector": {key: t}}),
    )
    .await;
    wait_region(&client, &ns, "first", "first Ready", |r| {
        is_ready_with(r, &[&node])
    })
    .await;
    create_region(
        &client,
        &ns,
        "second",
        json!({"regionID": 911, "nodeSelector": {key: t}}),
    )
    .await;
    let second = wait_region(&client, &ns, "second", "second reports the clash", |r| {
        cond(r, "NodesHealthy").is_some_and(|c| c.reason == "PortConflict")
            && r.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == r.metadata.generation)
    })
    .await;
    let c = cond(&second, "NodesHealthy").expect("condition");
    assert_eq!(c.status, "False");
    assert!(c.message.contains(&format!("{ns}/first")), "{}", c.message);
    assert!(c.message.contains("tcp/443"), "{}", c.message);
    assert_eq!(
        cond(&second, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );
    let first = wait_region(&client, &ns, "first", "first still Ready", |r| {
        is_ready_with(r, &[&node])
    })
    .await;
    assert!(cond(&first, "Ready").is_some_and(|c| c.status == "True"));
    // no fight: further reconciles of both write nothing
    let before = resource_versions(&client, &ns).await;
    let (w0, r0) = (op.writes(), op.reconciles());
    label_node(&client, &node, "kubederp.io/touch", Some("1")).await;
    wait_for("both regions reconciled again", WAIT, || {
        let n = op.reconciles();
        async move { (n >= r0 + 2).then_some(()) }
    })
    .await;
    assert_eq!(op.writes(), w0, "no writes when nothing changed");
    assert_eq!(resource_versions(&client, &ns).await, before);
    // moving the second region to other ports resolves it
    Api::<DerpRegion>::namespaced(client.clone(), &ns)
        .patch(
            "second",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"ports": {"derp": 8443, "http": 8080, "stun": 3479, "admin": 9091}}}),
            ),
        )
        .await
        .expect("patch ports");
    wait_region(&client, &ns, "second", "second Ready on other ports", |r| {
        is_ready_with(r, &[&node])
    })
    .await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_usable_address_and_no_matching_nodes_are_conditions() {
    let (client, ns) = setup("op-nodes").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-noaddr";
    let mut nodes = TestNodes::new(&client);
    let node = format!("noaddr-{t}-n1");
    nodes
        .create(&node, json!({key: t}), &[("Hostname", "noaddr")])
        .await;
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "empty",
        json!({"regionID": 920, "nodeSelector": {key: "nobody"}}),
    )
    .await;
    create_region(
        &client,
        &ns,
        "noaddr",
        json!({"regionID": 921, "nodeSelector": {key: t}}),
    )
    .await;
    let r = wait_region(&client, &ns, "empty", "NoNodes condition", |r| {
        cond(r, "Ready").is_some_and(|c| c.reason == "NoNodes")
    })
    .await;
    assert!(
        cond(&r, "Ready")
            .expect("ready")
            .message
            .contains("spec.nodeSelector")
    );
    let r = wait_region(&client, &ns, "noaddr", "NoUsableAddress condition", |r| {
        cond(r, "NodesHealthy").is_some_and(|c| c.reason == "NoUsableAddress")
    })
    .await;
    assert_eq!(
        r.status.expect("status").skipped_nodes[0].name,
        node,
        "the skipped node is named"
    );
    // the operator is still alive and reconciling: fixing the node makes the region Ready
    let _kubelet = fake_kubelet(&client, &ns);
    set_addresses(&client, &node, &[("InternalIP", "127.0.50.1")]).await;
    wait_region(
        &client,
        &ns,
        "noaddr",
        "Ready after the address appears",
        |r| is_ready_with(r, &[&node]),
    )
    .await;
    op.stop().await;
}

/// Run `derpinterop-<client> parsemap -file <text> -format <format>` (real `tailcfg` types).
fn parsemap(client: &str, format: &str, text: &str) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("map");
    std::fs::write(&file, text).expect("write map");
    let out = std::process::Command::new(derp_tests::interop::derpinterop(client))
        .args([
            "parsemap",
            "-file",
            file.to_str().expect("utf8"),
            "-format",
            format,
        ])
        .output()
        .expect("run derpinterop parsemap");
    assert!(
        out.status.success(),
        "{client} parsemap -format {format} refused:\n{}\n{}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parsemap prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_derpmap_is_read_back_by_real_tailcfg_and_headscale_yaml() {
    let (client, ns) = setup("op-tailcfg").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-tailcfg";
    let mut nodes = TestNodes::new(&client);
    let (a, b) = (format!("tcfg-{t}-a"), format!("tcfg-{t}-b"));
    nodes
        .create(
            &a,
            json!({key: t}),
            &[("ExternalIP", "127.0.60.1"), ("ExternalIP", "fd00::60:1")],
        )
        .await;
    nodes
        .create(&b, json!({key: t}), &[("InternalIP", "fd00::60:2")])
        .await;
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "tcfg",
        json!({"regionID": 930, "regionName": "Tailcfg Test", "nodeSelector": {key: t},
               "ports": {"derp": 8443, "http": 0, "stun": 3479},
               "derpMap": {"omitDefaultRegions": true, "configMapName": "tcfg-map"}}),
    )
    .await;
    let r = wait_region(&client, &ns, "tcfg", "region Ready", |r| {
        is_ready_with(r, &[&a, &b])
    })
    .await;
    let st = r.status.expect("status");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("tcfg-map")
        .await
        .expect("derpMap ConfigMap");
    let data = cm.data.expect("data");
    let json_text = data["derpmap.json"].clone();
    let yaml_text = data["headscale.yaml"].clone();
    let policy = data["policy.hujson"].clone();
    let policy_obj =
        policy[policy.find('{').expect("{")..=policy.rfind('}').expect("}")].to_owned();
    let ours: Value = serde_json::from_str(&json_text).expect("json");
    for client_version in derp_tests::interop::CLIENT_VERSIONS {
        let (j, y, p) = tokio::task::spawn_blocking({
            let (j, y, p) = (json_text.clone(), yaml_text.clone(), policy_obj.clone());
            move || {
                (
                    parsemap(client_version, "json", &j),
                    parsemap(client_version, "headscale-yaml", &y),
                    parsemap(client_version, "json", &p),
                )
            }
        })
        .await
        .expect("parsemap task");
        assert_eq!(
            j, ours,
            "{client_version}: derpmap.json round-trips through tailcfg"
        );
        assert_eq!(
            y, ours,
            "{client_version}: headscale.yaml decodes to the same DERPMap"
        );
        assert_eq!(
            p, ours,
            "{client_version}: the policy snippet holds the same DERPMap"
        );
        let nodes = j["Regions"]["930"]["Nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 2);
        for (n, s) in nodes.iter().zip(&st.nodes) {
            assert_eq!(n["Name"], s.name.as_str());
            assert_eq!(n["CertName"], s.cert_name.as_str());
            assert_eq!(n["DERPPort"], 8443);
            assert_eq!(n["STUNPort"], 3479);
            assert!(
                n.get("CanPort80").is_none(),
                "http disabled → CanPort80 false"
            );
        }
        assert_eq!(nodes[0]["HostName"], "127.0.60.1");
        assert_eq!(nodes[0]["IPv6"], "fd00::60:1");
        assert_eq!(nodes[1]["HostName"], "fd00::60:2");
        assert_eq!(nodes[1]["IPv4"], "none");
        assert_eq!(j["omitDefaultRegions"], true);
        assert_eq!(j["Regions"]["930"]["RegionName"], "Tailcfg Test");
    }

    // the admin server: merged derpMap (headscale derp.urls form), metrics, probes
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, admin) = derp_operator::admin::serve(
        "127.0.0.1:0".parse().expect("addr"),
        op.shared.clone(),
        op.registry.clone(),
        async move {
            let _ = rx.await;
        },
    )
    .await
    .expect("admin server");
    let get = |path: &'static str| admin_http::get(addr, path);
    let (status, body) = get("/derpmap.json").await.expect("get");
    assert_eq!(status, 200, "{body}");
    let merged: Value = serde_json::from_str(&body).expect("merged derpmap json");
    assert_eq!(merged["Regions"]["930"], ours["Regions"]["930"]);
    let (status, body) = get("/metrics").await.expect("get");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("derp_operator_reconciles_total"), "{body}");
    assert!(body.contains("derp_operator_writes_total"), "{body}");
    assert_eq!(get("/readyz").await.expect("get").0, 200);
    assert_eq!(get("/healthz").await.expect("get").0, 200);
    assert_eq!(get("/nope").await.expect("get").0, 404);
    let _ = tx.send(());
    admin.await.expect("admin task");
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_leader_election_hands_over_on_release() {
    use derp_operator::leader::{LeaderElector, LeaseConfig};
    let (client, ns) = setup("op-lease").await;
    let cfg = |id: &str| LeaseConfig {
        name: "derp-operator".into(),
        namespace: ns.name.clone(),
        identity: id.into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
    };
    let a = LeaderElector::new(client.clone(), cfg("a"));
    let b = LeaderElector::new(client.clone(), cfg("b"));
    let lead_a = tokio::time::timeout(WAIT, a.acquire())
        .await
        .expect("a leads");
    // b cannot take a renewed lease, even after more than one lease duration
    assert!(
        tokio::time::timeout(Duration::from_secs(4), b.acquire())
            .await
            .is_err(),
        "b must not lead while a renews"
    );
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &ns.name)
            .get("derp-operator")
            .await
            .expect("lease");
    assert_eq!(
        lease.spec.expect("spec").holder_identity.as_deref(),
        Some("a")
    );
    lead_a.release().await.expect("release");
    let started = std::time::Instant::now();
    let lead_b = tokio::time::timeout(WAIT, b.acquire())
        .await
        .expect("b leads");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a released lease is taken at once"
    );
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), &ns.name)
            .get("derp-operator")
            .await
            .expect("lease");
    let spec = lease.spec.expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    lead_b.release().await.expect("release");
}

/// Node names the stored derpMap ConfigMap lists.
async fn published(client: &Client, ns: &str) -> Vec<String> {
    let map = derpmap_json(client, ns, "home-derpmap").await;
    let mut names: Vec<String> = map["Regions"]
        .as_object()
        .into_iter()
        .flat_map(|r| r.values())
        .flat_map(|r| r["Nodes"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n["Name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// `kubectl drain` through the Eviction API: the region's PodDisruptionBudget refuses to evict
/// a Ready relay (the control plane here runs no disruption controller, as some clusters do
/// not); after the cordon the operator withdraws the node and deletes the relay itself, so an
/// eviction retried like kubectl drain's goes through only once the stored map no longer lists
/// the node. Uncordoned, the node comes back with its pin; the budget goes with its region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_a_relay_waits_until_the_operator_has_withdrawn_its_cordoned_node() {
    let (client, ns) = setup("op-drain").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-relay";
    let (n1, n2) = (format!("drain-{t}-n1"), format!("drain-{t}-n2"));
    let mut nodes = TestNodes::new(&client);
    for (name, ip) in [(&n1, "127.0.11.1"), (&n2, "127.0.11.2")] {
        nodes
            .create(name, json!({key: t}), &[("InternalIP", ip)])
            .await;
    }
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "home",
        json!({"regionID": 900, "nodeSelector": {key: t}}),
    )
    .await;
    let r = wait_region(&client, &ns, "home", "region Ready over 2 nodes", |r| {
        is_ready_with(r, &[&n1, &n2])
    })
    .await;
    let pin = pins(&r)[&n2].clone();
    wait_for("the map to list both nodes", WAIT, || async {
        (published(&client, &ns).await == [n1.clone(), n2.clone()]).then_some(())
    })
    .await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let pdb = pdbs.get("home-relays").await.expect("the region's budget");
    assert_eq!(pdb.owner_references()[0].kind, "DerpRegion");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let relay = format!("home-{n2}");
    let refused = pods.evict(&relay, &EvictParams::default()).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 429),
        "a Ready, published relay must not be evicted: {refused:?}"
    );

    Api::<Node>::all(client.clone())
        .patch(
            &n2,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon");
    // kubectl drain retries a refused eviction every 5 s; here every 100 ms
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match pods.evict(&relay, &EvictParams::default()).await {
            Err(kube::Error::Api(e)) if e.code == 429 => {}
            Ok(_) => break,
            Err(kube::Error::Api(e)) if e.code == 404 => break,
            Err(e) => panic!("eviction of {relay}: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "eviction of {relay} still refused after {}s",
            WAIT.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        published(&client, &ns).await,
        std::slice::from_ref(&n1),
        "the eviction went through while the map still listed {n2}"
    );

    Api::<Node>::all(client.clone())
        .patch(
            &n2,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": null}})),
        )
        .await
        .expect("uncordon");
    let r = wait_region(&client, &ns, "home", "n2 back after uncordon", |r| {
        is_ready_with(r, &[&n1, &n2])
    })
    .await;
    assert_eq!(pins(&r)[&n2], pin, "same pin after the drain");

    Api::<DerpRegion>::namespaced(client.clone(), &ns)
        .delete("home", &DeleteParams::background())
        .await
        .expect("delete region");
    wait_for("the budget to be garbage-collected", WAIT, || async {
        pdbs.get_opt("home-relays")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await;
    op.stop().await;
}
