//! What users run into in the field, against a real kube-apiserver: region ID conflicts
//! between DerpRegions, nodes behind NAT or a port forward (Node annotations), and relay Pods
//! a cluster admin fits into their cluster (pull secrets, priority, labels, extra volumes, a
//! port already taken on the node).
//!
//! Same harness as `operator_apiserver.rs`: an in-process operator per test limited to the
//! test's namespace, test Nodes with a per-test label, and (where relays must look Ready) the
//! fake kubelet.

use derp_operator::{
    certs::parse_cert_pem, controller::Settings, crd::DerpRegion, metrics::RegionLabels,
};
use derp_tests::k8s::{tag, wait_for};
use derp_tests::nodes::{TestNodes, annotate_node, fake_kubelet};
use derp_tests::operator::{Operator, WAIT, setup};
use derp_tests::regions::{
    cond, create_region, derpmap_json, events, is_ready_with, names, pins, wait_region,
};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod, Secret},
    scheduling::v1::PriorityClass,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

/// Wait until the ConfigMap `name` does not exist.
async fn wait_gone(cms: &Api<ConfigMap>, name: &str, what: &str) {
    wait_for(what, WAIT, || {
        let cms = cms.clone();
        async move {
            match cms.get(name).await {
                Err(kube::Error::Api(e)) if e.code == 404 => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

/// Wait until the operator's merged derpMap maps each region ID to the node names given.
async fn wait_merged(op: &Operator, want: &[(i64, &str)], what: &str) {
    wait_for(what, WAIT, || {
        let map = op.shared.merged_derp_map();
        let got: Vec<(i64, String)> = map
            .regions
            .iter()
            .flat_map(|(id, r)| r.nodes.iter().map(move |n| (*id, n.name.clone())))
            .collect();
        let want: Vec<(i64, String)> = want.iter().map(|(i, n)| (*i, (*n).to_owned())).collect();
        async move { (got == want).then_some(()) }
    })
    .await;
}

fn conflict_with(r: &DerpRegion, winner: &str) -> bool {
    cond(r, "Ready").is_some_and(|c| {
        c.status == "False" && c.reason == "RegionIDConflict" && c.message.contains(winner)
    })
}

async fn set_region_id(api: &Api<DerpRegion>, name: &str, id: i32) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"regionID": id}})),
    )
    .await
    .expect("change regionID");
}

async fn wait_event(client: &kube::Client, ns: &str, reason: &str, needles: &[&str]) {
    let needles: Vec<String> = needles.iter().map(|s| (*s).to_owned()).collect();
    wait_for(&format!("{reason} event"), WAIT, || {
        let (client, ns, needles) = (client.clone(), ns.to_owned(), needles.clone());
        async move {
            events(&client, &ns, reason)
                .await
                .iter()
                .any(|e| needles.iter().all(|n| e.contains(n.as_str())))
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_id_conflicts_create_rename_and_delete_of_either_side() {
    let (client, ns) = setup("op-regionid").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-regionid";
    let (na, nb) = (format!("rid-{t}-a"), format!("rid-{t}-b"));
    let mut nodes = TestNodes::new(&client);
    nodes
        .create(
            &na,
            json!({key: format!("{t}-a")}),
            &[("InternalIP", "127.0.70.1")],
        )
        .await;
    nodes
        .create(
            &nb,
            json!({key: format!("{t}-b")}),
            &[("InternalIP", "127.0.70.2")],
        )
        .await;
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    let api: Api<DerpRegion> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let first_key = format!("{ns}/first");
    let spec =
        |id: i32, sel: &str| json!({"regionID": id, "nodeSelector": {key: format!("{t}-{sel}")}});

    // --- create: the newer region with a taken ID loses
    create_region(&client, &ns, "first", spec(940, "a")).await;
    wait_region(&client, &ns, "first", "first Ready", |r| {
        is_ready_with(r, &[&na])
    })
    .await;
    create_region(&client, &ns, "second", spec(940, "b")).await;
    let second = wait_region(&client, &ns, "second", "second loses region ID 940", |r| {
        conflict_with(r, &first_key)
    })
    .await;
    let st = second.status.clone().expect("status");
    let published = cond(&second, "DerpMapPublished").expect("condition");
    assert_eq!(
        (published.status.as_str(), published.reason.as_str()),
        ("False", "RegionIDConflict")
    );
    assert!(st.derp_map.is_none(), "no derpMap claimed: {st:?}");
    assert!(
        cond(&second, "Ready")
            .expect("ready")
            .message
            .contains("940"),
        "the message names the ID"
    );
    wait_gone(&cms, "second-derpmap", "the loser has no derpMap ConfigMap").await;
    wait_event(&client, &ns, "RegionIDConflict", &[&first_key]).await;
    // its relay runs (so fixing the conflict changes no pin), but nothing is published
    assert_eq!(names(&pods, "second").await, vec![format!("second-{nb}")]);
    wait_merged(&op, &[(940, &na)], "merged map keeps the winner only").await;
    wait_region(&client, &ns, "first", "winner stays Ready", |r| {
        is_ready_with(r, &[&na])
    })
    .await;
    assert_eq!(
        derpmap_json(&client, &ns, "first-derpmap").await["Regions"]["940"]["Nodes"][0]["Name"],
        na.as_str()
    );
    let pin_b = pins(&second)[&nb].clone();

    // --- rename the loser: both published
    set_region_id(&api, "second", 941).await;
    let second = wait_region(&client, &ns, "second", "second Ready as 941", |r| {
        is_ready_with(r, &[&nb])
    })
    .await;
    assert_eq!(pins(&second)[&nb], pin_b, "the pin survives the conflict");
    assert_eq!(
        derpmap_json(&client, &ns, "second-derpmap").await["Regions"]["941"]["Nodes"][0]["Name"],
        nb.as_str()
    );
    wait_merged(&op, &[(940, &na), (941, &nb)], "merged map has both").await;
    wait_event(&client, &ns, "RegionIDChanged", &["from 940 to 941"]).await;
    wait_event(&client, &ns, "RegionIDConflictResolved", &["941"]).await;

    // --- rename the loser back into the taken ID: it loses again
    set_region_id(&api, "second", 940).await;
    wait_region(&client, &ns, "second", "second loses again", |r| {
        conflict_with(r, &first_key)
    })
    .await;
    wait_gone(&cms, "second-derpmap", "the loser's ConfigMap is pruned").await;
    wait_merged(&op, &[(940, &na)], "winner only again").await;

    // --- rename the winner away: the loser takes the ID (no change to the loser itself)
    let gen_before = api.get("second").await.expect("get").metadata.generation;
    set_region_id(&api, "first", 942).await;
    let second = wait_region(
        &client,
        &ns,
        "second",
        "second Ready once first moved",
        |r| is_ready_with(r, &[&nb]),
    )
    .await;
    assert_eq!(second.metadata.generation, gen_before);
    wait_merged(&op, &[(940, &nb), (942, &na)], "940 is second's now").await;

    // --- the older region claims the ID back: deterministic, the oldest wins
    set_region_id(&api, "first", 940).await;
    wait_region(&client, &ns, "second", "older region takes 940 back", |r| {
        conflict_with(r, &first_key)
    })
    .await;
    wait_merged(&op, &[(940, &na)], "first holds 940").await;

    // --- delete the loser: the winner is untouched
    api.delete("second", &DeleteParams::default())
        .await
        .expect("delete loser");
    wait_for("second gone", WAIT, || {
        let api = api.clone();
        async move { api.get_opt("second").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let first = wait_region(&client, &ns, "first", "first Ready", |r| {
        is_ready_with(r, &[&na])
    })
    .await;
    assert_eq!(
        cond(&first, "Ready").map(|c| c.reason.as_str()),
        Some("RegionReady")
    );
    wait_merged(&op, &[(940, &na)], "merged map unchanged").await;

    // --- delete the winner: the loser becomes Ready and is published
    create_region(&client, &ns, "third", spec(940, "b")).await;
    wait_region(&client, &ns, "third", "third loses", |r| {
        conflict_with(r, &first_key)
    })
    .await;
    api.delete("first", &DeleteParams::default())
        .await
        .expect("delete winner");
    wait_region(
        &client,
        &ns,
        "third",
        "third Ready once the winner is gone",
        |r| is_ready_with(r, &[&nb]),
    )
    .await;
    assert_eq!(
        derpmap_json(&client, &ns, "third-derpmap").await["Regions"]["940"]["Nodes"][0]["Name"],
        nb.as_str()
    );
    wait_merged(&op, &[(940, &nb)], "merged map has third as 940").await;
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_nat_overrides_reach_the_map_the_certificate_and_the_status() {
    let (client, ns) = setup("op-nat").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-nat";
    let n1 = format!("nat-{t}-n1");
    let mut nodes = TestNodes::new(&client);
    nodes
        .create(&n1, json!({key: t}), &[("InternalIP", "127.0.71.1")])
        .await;
    for (k, v) in [
        ("kubederp.io/public-ipv4", "127.0.72.1"),
        ("kubederp.io/derp-port", "8443"),
        ("kubederp.io/stun-port", "3479"),
    ] {
        annotate_node(&client, &n1, k, Some(v)).await;
    }
    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    create_region(
        &client,
        &ns,
        "nat",
        json!({"regionID": 945, "nodeSelector": {key: t}}),
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let tls = format!("nat-{n1}-tls");
    let cert_ips = |s: Secret| {
        parse_cert_pem(&s.data.expect("data")["tls.crt"].0)
            .expect("cert")
            .ips
    };

    let r = wait_region(&client, &ns, "nat", "Ready behind the forward", |r| {
        is_ready_with(r, &[&n1])
    })
    .await;
    let node = &r.status.as_ref().expect("status").nodes[0];
    assert_eq!(node.ipv4.as_deref(), Some("127.0.72.1"));
    assert_eq!((node.derp_port, node.stun_port), (Some(8443), Some(3479)));
    let pin1 = node.cert_name.clone();
    let map = derpmap_json(&client, &ns, "nat-derpmap").await;
    let m = &map["Regions"]["945"]["Nodes"][0];
    assert_eq!(m["IPv4"], "127.0.72.1");
    assert_eq!(m["HostName"], "127.0.72.1");
    assert_eq!(m["DERPPort"], 8443);
    assert_eq!(m["STUNPort"], 3479);
    assert_eq!(
        cert_ips(secrets.get(&tls).await.expect("secret")),
        vec!["127.0.72.1".parse::<std::net::IpAddr>().expect("ip")]
    );
    let args = pods
        .get(&format!("nat-{n1}"))
        .await
        .expect("pod")
        .spec
        .expect("spec")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.contains(&":443".to_owned()),
        "binds the region's port: {args:?}"
    );
    assert!(
        args.contains(&"--hostname=127.0.72.1".to_owned()),
        "{args:?}"
    );

    // --- a port-only change: the map changes, the certificate does not
    let secret_rv = secrets.get(&tls).await.expect("secret").resource_version();
    annotate_node(&client, &n1, "kubederp.io/derp-port", Some("9443")).await;
    wait_for("DERPPort 9443 published", WAIT, || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let map = derpmap_json(&client, &ns, "nat-derpmap").await;
            (map["Regions"]["945"]["Nodes"][0]["DERPPort"] == 9443).then_some(())
        }
    })
    .await;
    wait_event(
        &client,
        &ns,
        "PublishedPortsChanged",
        &[&n1, "DERP 9443", "certificate is unchanged"],
    )
    .await;
    assert_eq!(
        secrets.get(&tls).await.expect("secret").resource_version(),
        secret_rv
    );
    let r = wait_region(&client, &ns, "nat", "still Ready", |r| {
        is_ready_with(r, &[&n1])
    })
    .await;
    assert_eq!(pins(&r)[&n1], pin1, "no new pin for a port change");
    let pin_changes = || {
        op.metrics
            .pin_changes
            .get_or_create(&RegionLabels {
                region: format!("{ns}/nat"),
            })
            .get()
    };
    assert_eq!(pin_changes(), 0);

    // --- an address change: new certificate for the new SAN, announced, counted
    annotate_node(&client, &n1, "kubederp.io/public-ipv4", Some("127.0.72.2")).await;
    let r = wait_region(&client, &ns, "nat", "re-issued for the new address", |r| {
        is_ready_with(r, &[&n1]) && pins(r)[&n1] != pin1
    })
    .await;
    let pin2 = pins(&r)[&n1].clone();
    assert_eq!(
        cert_ips(secrets.get(&tls).await.expect("secret")),
        vec!["127.0.72.2".parse::<std::net::IpAddr>().expect("ip")]
    );
    wait_event(
        &client,
        &ns,
        "PinChanged",
        &["from [127.0.72.1] to [127.0.72.2]", &pin2],
    )
    .await;
    assert_eq!(pin_changes(), 1);

    // --- a malformed annotation: the node is left out, named, and keeps its certificate
    annotate_node(
        &client,
        &n1,
        "kubederp.io/public-ipv4",
        Some("127.0.72.300"),
    )
    .await;
    let r = wait_region(&client, &ns, "nat", "InvalidNodeOverride", |r| {
        cond(r, "NodesHealthy").is_some_and(|c| c.reason == "InvalidNodeOverride")
    })
    .await;
    let c = cond(&r, "NodesHealthy").expect("condition");
    assert!(
        c.message.contains(&n1)
            && c.message
                .contains("kubederp.io/public-ipv4=\"127.0.72.300\""),
        "{}",
        c.message
    );
    assert_eq!(cond(&r, "Ready").map(|c| c.status.as_str()), Some("False"));
    wait_event(
        &client,
        &ns,
        "InvalidNodeOverride",
        &[&n1, "kubederp.io/public-ipv4"],
    )
    .await;
    wait_for("relay Pod pruned", WAIT, || {
        let pods = pods.clone();
        async move { names(&pods, "nat").await.is_empty().then_some(()) }
    })
    .await;
    assert!(
        secrets.get_opt(&tls).await.expect("get").is_some(),
        "certificate kept"
    );
    let map = derpmap_json(&client, &ns, "nat-derpmap").await;
    assert_eq!(
        map["Regions"]["945"]["Nodes"].as_array().map(Vec::len),
        Some(0)
    );

    // --- fixed: back with the same pin
    annotate_node(&client, &n1, "kubederp.io/public-ipv4", Some("127.0.72.2")).await;
    let r = wait_region(&client, &ns, "nat", "back after the fix", |r| {
        is_ready_with(r, &[&n1])
    })
    .await;
    assert_eq!(pins(&r)[&n1], pin2);
    assert_eq!(pin_changes(), 1);
    op.stop().await;
}

/// Run our `derper` with its admin listener on `taken` and return what it printed before
/// exiting (what the kubelet puts in the container status with `FallbackToLogsOnError`).
fn derper_exit_log(taken: std::net::SocketAddr) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(derp_tests::bins::workspace_bin("derper"))
        .args([
            "--hostname=127.0.0.1",
            "--certmode=manual",
            &format!("--certdir={}", dir.path().display()),
            "-a",
            "127.0.0.1:0",
            "--http-port=-1",
            "--stun=false",
        ])
        .env("DERPER_ADMIN_ADDR", taken.to_string())
        .env("RUST_LOG", "info")
        .output()
        .expect("run derper");
    assert!(
        !out.status.success(),
        "derper must exit when its admin port is taken"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // the kubelet keeps at most the last 80 lines / 2048 bytes
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let start = tail.len().saturating_sub(2048);
    let start = (start..tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(0);
    tail[start..].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_pod_settings_reach_the_pod_and_a_taken_port_is_a_condition() {
    let (client, ns) = setup("op-relaypod").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-relaypod";
    let n1 = format!("relaypod-{t}-n1");
    let mut nodes = TestNodes::new(&client);
    nodes
        .create(&n1, json!({key: t}), &[("InternalIP", "127.0.73.1")])
        .await;
    let pcs: Api<PriorityClass> = Api::all(client.clone());
    let pc_name = format!("kubederp-test-{t}");
    pcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": pc_name}, "value": 1000,
        }))
        .expect("priority class"),
    )
    .await
    .expect("create priority class");
    // no fake kubelet: this test writes the relay's status itself
    let op = Operator::start_with(
        &client,
        &ns,
        Settings {
            relay_image_pull_secrets: vec!["operator-default".into()],
            ..Settings::default()
        },
    );
    create_region(
        &client,
        &ns,
        "fit",
        json!({"regionID": 950, "nodeSelector": {key: t}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_name = format!("fit-{n1}");
    let pod = wait_for("relay Pod", WAIT, || {
        let pods = pods.clone();
        let name = pod_name.clone();
        async move { pods.get_opt(&name).await.ok()? }
    })
    .await;
    let spec = pod.spec.expect("spec");
    assert_eq!(
        spec.image_pull_secrets.expect("pull secrets")[0].name,
        "operator-default",
        "the operator's default applies"
    );
    assert_eq!(
        spec.containers[0]
            .ports
            .as_ref()
            .expect("ports")
            .iter()
            .find(|p| p.name.as_deref() == Some("admin"))
            .map(|p| p.container_port),
        Some(3480),
        "new default admin port"
    );

    // --- the region's Pod settings, accepted by the apiserver
    Api::<DerpRegion>::namespaced(client.clone(), &ns)
        .patch(
            "fit",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"relay": {
                "imagePullSecrets": [{"name": "mirror"}],
                "priorityClassName": pc_name,
                "podLabels": {"team": "net"},
                "podAnnotations": {"example.com/owner": "net-team"},
                "extraVolumes": [{"name": "rate", "configMap": {"name": "derp-rate"}}],
                "extraVolumeMounts": [{"name": "rate", "mountPath": "/etc/derp/rate", "readOnly": true}],
                "extraArgs": ["--rate-config=/etc/derp/rate/limits.json"],
            }}})),
        )
        .await
        .expect("patch relay settings");
    let pod = wait_for("relay Pod with the region's settings", WAIT, || {
        let pods = pods.clone();
        let name = pod_name.clone();
        async move {
            let p = pods.get_opt(&name).await.ok()??;
            // the changed Pod replaces the old one; without a kubelet, finish its deletion
            if p.metadata.deletion_timestamp.is_some() {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                return None;
            }
            (p.labels().get("team").map(String::as_str) == Some("net")).then_some(p)
        }
    })
    .await;
    assert_eq!(
        pod.annotations()
            .get("example.com/owner")
            .map(String::as_str),
        Some("net-team")
    );
    let spec = pod.spec.clone().expect("spec");
    assert_eq!(
        spec.image_pull_secrets.expect("pull secrets")[0].name,
        "mirror"
    );
    assert_eq!(spec.priority_class_name.as_deref(), Some(pc_name.as_str()));
    assert_eq!(
        spec.priority,
        Some(1000),
        "the apiserver resolved the PriorityClass"
    );
    assert!(
        spec.volumes
            .expect("volumes")
            .iter()
            .any(|v| v.name == "rate")
    );
    let c = &spec.containers[0];
    assert!(
        c.volume_mounts
            .as_ref()
            .expect("mounts")
            .iter()
            .any(|m| m.mount_path == "/etc/derp/rate")
    );
    assert_eq!(
        c.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );

    // --- the admin port is taken on the node by something else: the real relay's exit
    // message, reported the way the kubelet does, becomes PortInUse
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let log = derper_exit_log(holder.local_addr().expect("addr"));
    assert!(log.contains("bind admin listener"), "{log}");
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": "derper", "image": "derper", "imageID": "", "ready": false,
                "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": log}},
            }],
        }})),
    )
    .await
    .expect("report the crash");
    let r = wait_region(&client, &ns, "fit", "PortInUse", |r| {
        cond(r, "RelaysReady").is_some_and(|c| c.reason == "PortInUse")
    })
    .await;
    let port = holder.local_addr().expect("addr").port().to_string();
    for ty in ["RelaysReady", "Ready"] {
        let c = cond(&r, ty).expect("condition");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "PortInUse"),
            "{ty}"
        );
        assert!(
            c.message.contains(&n1)
                && c.message.contains(&port)
                && c.message.contains("spec.ports.admin"),
            "{}",
            c.message
        );
    }
    wait_event(&client, &ns, "PortInUse", &[&n1, "spec.ports.admin"]).await;
    drop(holder);

    // --- the port is freed and the relay becomes Ready: the condition clears
    pods.patch_status(
        &pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "derper", "image": "derper", "imageID": "", "ready": true,
                "restartCount": 4, "state": {"running": {}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "old"}},
            }],
        }})),
    )
    .await
    .expect("report Ready");
    wait_region(&client, &ns, "fit", "Ready again", |r| {
        is_ready_with(r, &[&n1])
    })
    .await;
    let _ = pcs.delete(&pc_name, &DeleteParams::default()).await;
    op.stop().await;
}
