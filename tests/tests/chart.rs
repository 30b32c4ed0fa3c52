//! The Helm chart (`charts/kubederp`) and the plain manifests (`deploy/`) on a real
//! kube-apiserver: lint, values-schema rejections, install / upgrade / uninstall, a server-side
//! apply of `deploy/operator.yaml` and the examples, and the operator run end to end under the
//! chart's own ServiceAccount.
//!
//! The end-to-end test is the RBAC proof. There is no kubelet, so the chart's Deployment never
//! runs; the `derp-operator` binary runs as a local process instead, with exactly the arguments
//! the chart renders, and a kubeconfig holding a TokenRequest token of the chart's
//! ServiceAccount (not the admin). Its API traffic goes through a recording loopback proxy that
//! forwards the request, Authorization header included, to the apiserver. The test then checks
//! both directions of least privilege: every request the operator made is granted by the
//! chart (a missing rule shows up as a 403 and a failed scenario), and every
//! (apiGroup, resource, verb) the chart grants was used by the scenario.
//!
//! Helm runs with private, empty config/cache/data directories: no repositories, no OCI
//! registry, nothing fetched.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use derp_operator::crd::DerpRegion;
use derp_tests::admin_http;
use derp_tests::command::{fails, ok, output};
use derp_tests::helm::{chart_dir, find, helm, kinds, render};
use derp_tests::k8s::{
    ControlPlane, TestNamespace, free_port, kubeconfig_yaml, setup_namespace, tag, wait_until,
    workspace_root,
};
use derp_tests::nodes::{TestNodes, fake_kubelet, label_node};
use derp_tests::operator::{MANAGED, OperatorProcess};
use derp_tests::rbac::{Access, RecordingProxy, Seen, granted};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Bound for every wait in this file (each test must finish well within 60 s).
const WAIT: Duration = Duration::from_secs(40);

/// The shared control plane, an admin client and a fresh namespace. Every chart test installs
/// the chart's CRD itself first (idempotent server-side apply), so concurrent `helm install`s
/// all find it present and skip it.
async fn setup(prefix: &str) -> (&'static ControlPlane, Client, TestNamespace) {
    let (client, ns) = setup_namespace(prefix, &chart_dir().join("crds"), "warn").await;
    (ControlPlane::shared(), client, ns)
}

// ---------------------------------------------------------------------------------------------
// static checks (helm only)

#[tokio::test]
async fn chart_lints_clean_with_default_and_non_default_values() {
    let cp = ControlPlane::shared();
    let mut cmd = helm(cp);
    cmd.args(["lint", "--strict"]).arg(chart_dir());
    ok(cmd).await;
    let mut cmd = helm(cp);
    cmd.args(["lint", "--strict"]).arg(chart_dir()).args([
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "watchNamespaces={derp}",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
        "--set",
        "relayPodMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ]);
    ok(cmd).await;
}

/// The monitoring objects: off by default (the PodMonitor and PrometheusRule CRDs may be
/// absent), and when on, they ship exactly the files promtool and the metric-name test check.
#[tokio::test]
async fn monitoring_objects_are_optional_and_ship_the_checked_files() {
    let cp = ControlPlane::shared();
    let none = render(cp, "kubederp", "kubederp", &[]).await;
    for kind in ["PodMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(
            !none.iter().any(|d| d["kind"] == kind),
            "{kind} rendered by default"
        );
    }
    let on = [
        "relayPodMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "grafanaDashboard.enabled=true",
        "prometheusRule.labels.release=kps",
        "grafanaDashboard.namespace=grafana",
    ];
    let docs = render(cp, "kubederp", "kubederp", &on).await;

    let pm = find(&docs, "PodMonitor", "kubederp-relays");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(
        ep["port"], "admin",
        "selected by name: any spec.ports.admin works"
    );
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"],
        json!({
            "app.kubernetes.io/name": derp_operator::crd::APP_NAME,
            "app.kubernetes.io/component": "relay",
            "app.kubernetes.io/managed-by": derp_operator::crd::FIELD_MANAGER,
        })
    );
    let one = render(
        cp,
        "kubederp",
        "kubederp",
        &["relayPodMonitor.enabled=true", "watchNamespaces={derp}"],
    )
    .await;
    assert_eq!(
        find(&one, "PodMonitor", "kubederp-relays")["spec"]["namespaceSelector"],
        json!({"matchNames": ["derp"]})
    );

    let rules: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("files/prometheus-rules.yaml"))
            .expect("rules file"),
    )
    .expect("rules yaml");
    let pr = find(&docs, "PrometheusRule", "kubederp");
    assert_eq!(
        pr["spec"], rules,
        "the PrometheusRule is the promtool-tested file"
    );
    assert_eq!(pr["metadata"]["labels"]["release"], "kps");
    let alerts: Vec<&str> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for want in [
        "DerpRelayCertificateExpiring",
        "DerpRegionNodesUnhealthy",
        "DerpMeshPeerDown",
        "DerpClientRejectionsSurge",
        "DerpRelayRestarting",
    ] {
        assert!(alerts.contains(&want), "{want} missing: {alerts:?}");
    }

    let cm = find(&docs, "ConfigMap", "kubederp-dashboard");
    assert_eq!(cm["metadata"]["namespace"], "grafana");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(cm["data"]["kubederp.json"].as_str().expect("dashboard"))
            .expect("dashboard JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("files/grafana-dashboard.json"))
            .expect("dashboard file"),
    )
    .expect("dashboard file JSON");
    assert_eq!(shipped, file);
}

#[tokio::test]
async fn rendered_deployment_is_hardened_and_probes_the_admin_port() {
    let cp = ControlPlane::shared();
    let docs = render(cp, "kubederp", "kubederp", &[]).await;
    let d = find(&docs, "Deployment", "kubederp");
    let pod = &d["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "kubederp");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "ghcr.io/kubederp/derp-operator:0.1.0");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{sc}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{sc}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{sc}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{sc}");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{sc}");
    assert!(
        pod["securityContext"]["runAsUser"].as_i64().unwrap_or(0) > 0,
        "numeric non-root user"
    );
    assert!(c["resources"]["requests"]["memory"].is_string(), "{c}");
    assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "--admin-addr=0.0.0.0:8080",
        "--log-format=json",
        "--log-filter=info",
        "--leader-election=true",
        "--lease-name=kubederp",
        "--lease-namespace=kubederp",
        "--probe-interval=30s",
        "--probe-timeout=5s",
    ] {
        assert!(args.contains(&want), "{want} missing from {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "all namespaces by default: {args:?}"
    );
    assert_eq!(c["ports"][0]["name"], "http-admin");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http-admin");
    // readiness = leadership: a rolling update would wait forever on a new Pod that cannot lead
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");

    let svc = find(&docs, "Service", "kubederp");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http-admin");
    assert_eq!(
        svc["spec"]["selector"], d["spec"]["selector"]["matchLabels"],
        "the Service selects the operator Pods"
    );

    // ServiceMonitor only when enabled
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let docs = render(cp, "kubederp", "kubederp", &["serviceMonitor.enabled=true"]).await;
    let sm = find(&docs, "ServiceMonitor", "kubederp");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-admin");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
}

#[tokio::test]
async fn relay_pull_secrets_value_becomes_the_operator_flag() {
    let cp = ControlPlane::shared();
    let args = |docs: &[Value]| {
        find(docs, "Deployment", "kubederp")["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .clone()
    };
    let default = render(cp, "kubederp", "kubederp", &[]).await;
    assert!(
        !args(&default).iter().any(|a| a
            .as_str()
            .is_some_and(|a| a.starts_with("--relay-image-pull-secrets"))),
        "no flag without the value"
    );
    let set = render(
        cp,
        "kubederp",
        "kubederp",
        &["relayImage.pullSecrets={regcred,mirror.creds}"],
    )
    .await;
    assert!(
        args(&set).contains(&json!("--relay-image-pull-secrets=regcred,mirror.creds")),
        "{:?}",
        args(&set)
    );
    // the operator accepts what the chart renders
    let flag = "--relay-image-pull-secrets=regcred,mirror.creds";
    let parsed = <derp_operator::args::Args as clap::Parser>::try_parse_from([
        "derp-operator",
        "--leader-election=false",
        flag,
    ])
    .expect("flag parses")
    .into_config()
    .expect("valid");
    assert_eq!(parsed.relay_image_pull_secrets, ["regcred", "mirror.creds"]);
}

#[tokio::test]
async fn rbac_is_namespaced_when_a_namespace_is_watched_and_never_uses_wildcards() {
    let cp = ControlPlane::shared();
    let all = render(cp, "kubederp", "kubederp", &[]).await;
    assert_eq!(
        kinds(&all),
        [
            "ClusterRole/kubederp-nodes",
            "ClusterRole/kubederp-regions",
            "ClusterRoleBinding/kubederp-nodes",
            "ClusterRoleBinding/kubederp-regions",
            "Deployment/kubederp",
            "Role/kubederp-leader-election",
            "RoleBinding/kubederp-leader-election",
            "Service/kubederp",
            "ServiceAccount/kubederp",
        ]
    );
    let one = render(cp, "kubederp", "kubederp", &["watchNamespaces={derp}"]).await;
    assert_eq!(
        kinds(&one),
        [
            "ClusterRole/kubederp-nodes",
            "ClusterRoleBinding/kubederp-nodes",
            "Deployment/kubederp",
            "Role/kubederp-leader-election",
            "Role/kubederp-regions",
            "RoleBinding/kubederp-leader-election",
            "RoleBinding/kubederp-regions",
            "Service/kubederp",
            "ServiceAccount/kubederp",
        ]
    );
    let role = find(&one, "Role", "kubederp-regions");
    assert_eq!(role["metadata"]["namespace"], "derp");
    let args =
        &find(&one, "Deployment", "kubederp")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        args.as_array()
            .expect("args")
            .contains(&json!("--namespace=derp")),
        "{args}"
    );
    // The only cluster-wide grant then is reading Nodes.
    let nodes = find(&one, "ClusterRole", "kubederp-nodes");
    assert_eq!(
        nodes["rules"],
        json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}])
    );
    for docs in [&all, &one] {
        for d in docs
            .iter()
            .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
        {
            let text = d["rules"].to_string();
            assert!(!text.contains('*'), "wildcard in {}: {text}", d["metadata"]);
        }
    }
    // The Lease Role can read and renew its own Lease only.
    let lease = find(&all, "Role", "kubederp-leader-election");
    assert_eq!(lease["rules"][1]["resourceNames"], json!(["kubederp"]));
    // No leader election: no Lease Role.
    let solo = render(
        cp,
        "kubederp",
        "kubederp",
        &["leaderElection.enabled=false"],
    )
    .await;
    assert!(!kinds(&solo).iter().any(|k| k.contains("leader-election")));
}

// ---------------------------------------------------------------------------------------------
// install, upgrade, uninstall on the apiserver

#[tokio::test]
async fn values_schema_rejects_bad_values_at_install_with_a_clear_message() {
    let (cp, _client, ns) = setup("chart-schema").await;
    let release = format!("bad-{}", tag());
    let cases: &[(&[&str], &[&str])] = &[
        (&["log.format=xml"], &["/log/format", "json", "plain"]),
        (&["replicas=-1"], &["/replicas", "minimum"]),
        (&["replicaCount=2"], &["replicaCount", "not allowed"]),
        (&["image.pullPolicy=Sometimes"], &["/image/pullPolicy"]),
        (&["admin.port=80"], &["/admin/port", "minimum"]),
        (
            &["watchNamespaces={a,b}"],
            &["/watchNamespaces", "maxItems"],
        ),
        (&["watchNamespaces={Not_A_Name}"], &["/watchNamespaces/0"]),
        (
            &["relayImage.pullSecrets={Reg_Cred}"],
            &["/relayImage/pullSecrets/0"],
        ),
        (
            &["resources.limits.memory=lots"],
            &["/resources/limits/memory"],
        ),
        (
            &["relayPodMonitor.interval=soon"],
            &["/relayPodMonitor/interval"],
        ),
        (&["prometheusRule.enable=true"], &["enable", "not allowed"]),
        (
            &["replicas=2", "leaderElection.enabled=false"],
            &["replicas=2 needs leaderElection.enabled=true"],
        ),
    ];
    for (sets, needles) in cases {
        let mut cmd = helm(cp);
        cmd.args(["install", &release])
            .arg(chart_dir())
            .args(["--namespace", &ns.name]);
        for s in *sets {
            cmd.args(["--set", s]);
        }
        let text = fails(cmd).await;
        for n in *needles {
            assert!(text.contains(n), "{sets:?}: expected {n:?} in:\n{text}");
        }
    }
    // nothing was installed
    let mut cmd = helm(cp);
    cmd.args(["status", &release, "--namespace", &ns.name]);
    let text = fails(cmd).await;
    assert!(text.contains("not found"), "{text}");
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_on_a_real_apiserver() {
    let (cp, client, ns) = setup("chart-install").await;
    let watched = TestNamespace::create(&client, "chart-watched").await;
    let release = format!("kd-{}", tag());
    let full = format!("{release}-kubederp");

    let mut cmd = helm(cp);
    cmd.args(["install", &release]).arg(chart_dir()).args([
        "--namespace",
        &ns.name,
        "--timeout",
        "30s",
    ]);
    let notes = ok(cmd).await;
    assert!(
        notes.contains("policy\\.hujson") && notes.contains("kind: DerpRegion"),
        "NOTES tell how to create a region and read its derpMap:\n{notes}"
    );

    let deploys: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deploys.get(&full).await.expect("Deployment created");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1));
    Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .get(&full)
        .await
        .expect("ServiceAccount created");
    Api::<Service>::namespaced(client.clone(), &ns.name)
        .get(&full)
        .await
        .expect("Service created");
    let croles: Api<ClusterRole> = Api::all(client.clone());
    let cbindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    for n in [format!("{full}-nodes"), format!("{full}-regions")] {
        croles.get(&n).await.expect("ClusterRole created");
        cbindings.get(&n).await.expect("ClusterRoleBinding created");
    }
    Api::<Role>::namespaced(client.clone(), &ns.name)
        .get(&format!("{full}-leader-election"))
        .await
        .expect("Lease Role created");
    Api::<RoleBinding>::namespaced(client.clone(), &ns.name)
        .get(&format!("{full}-leader-election"))
        .await
        .expect("Lease RoleBinding created");

    // upgrade: watch one namespace, debug logs → region RBAC moves from cluster-wide to a Role
    let mut cmd = helm(cp);
    cmd.args(["upgrade", &release])
        .arg(chart_dir())
        .args(["--namespace", &ns.name, "--timeout", "30s"])
        .args(["--set", &format!("watchNamespaces={{{}}}", watched.name)])
        .args(["--set", "log.level=debug"]);
    ok(cmd).await;
    assert!(
        croles
            .get_opt(&format!("{full}-regions"))
            .await
            .expect("get")
            .is_none(),
        "cluster-wide region rules removed on upgrade"
    );
    assert!(
        cbindings
            .get_opt(&format!("{full}-regions"))
            .await
            .expect("get")
            .is_none()
    );
    Api::<Role>::namespaced(client.clone(), &watched.name)
        .get(&format!("{full}-regions"))
        .await
        .expect("Role in the watched namespace");
    Api::<RoleBinding>::namespaced(client.clone(), &watched.name)
        .get(&format!("{full}-regions"))
        .await
        .expect("RoleBinding in the watched namespace");
    let d = deploys.get(&full).await.expect("Deployment");
    let args = d
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers[0]
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        args.contains(&format!("--namespace={}", watched.name)),
        "{args:?}"
    );
    assert!(args.contains(&"--log-filter=debug".to_owned()), "{args:?}");

    // a bad upgrade is refused and leaves the release as it was
    let mut cmd = helm(cp);
    cmd.args(["upgrade", &release])
        .arg(chart_dir())
        .args(["--namespace", &ns.name, "--reuse-values"])
        .args(["--set", "log.format=xml"]);
    let text = fails(cmd).await;
    assert!(text.contains("/log/format"), "{text}");
    let mut cmd = helm(cp);
    cmd.args(["status", &release, "--namespace", &ns.name, "-o", "json"]);
    let status: Value = serde_json::from_str(&ok(cmd).await).expect("status json");
    assert_eq!(status["version"], 2, "{status}");
    assert_eq!(status["info"]["status"], "deployed", "{status}");

    // uninstall removes every object it made (the CRD stays, as Helm does for crds/)
    let mut cmd = helm(cp);
    cmd.args(["uninstall", &release, "--namespace", &ns.name, "--wait"])
        .args(["--timeout", "30s"]);
    ok(cmd).await;
    assert!(deploys.get_opt(&full).await.expect("get").is_none());
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
            .get_opt(&full)
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        croles
            .get_opt(&format!("{full}-nodes"))
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        Api::<Role>::namespaced(client.clone(), &watched.name)
            .get_opt(&format!("{full}-regions"))
            .await
            .expect("get")
            .is_none()
    );
    Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(client.clone())
        .get("derpregions.kubederp.io")
        .await
        .expect("CRD kept after uninstall");
}

#[tokio::test]
async fn deploy_manifests_match_the_chart_and_apply_on_the_apiserver() {
    let (cp, client, ns) = setup("chart-deploy").await;
    // deploy/operator.yaml is `helm template` with default values (scripts/generate)
    let mut cmd = helm(cp);
    cmd.args(["template", "kubederp"]).arg(chart_dir()).args([
        "--namespace",
        "kubederp",
        "--include-crds",
    ]);
    let rendered = ok(cmd).await;
    let committed = std::fs::read_to_string(workspace_root().join("deploy/operator.yaml"))
        .expect("deploy/operator.yaml");
    assert!(
        rendered == committed,
        "deploy/operator.yaml is out of date: run scripts/generate"
    );

    // plain manifests, as a platform team applies them
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubederp"}}),
            )
            .expect("namespace"),
        )
        .await;
    let file = workspace_root().join("deploy/operator.yaml");
    let mut cmd = cp.kubectl();
    cmd.args([
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "-f",
    ])
    .arg(&file);
    ok(cmd).await;
    let mut cmd = cp.kubectl();
    cmd.args(["apply", "--server-side", "--validate=strict", "-f"])
        .arg(&file);
    let out = ok(cmd).await;
    assert!(
        out.contains("deployment.apps/kubederp serverside-applied"),
        "{out}"
    );
    Api::<Deployment>::namespaced(client.clone(), "kubederp")
        .get("kubederp")
        .await
        .expect("Deployment from deploy/operator.yaml");

    // the examples use valid field names (strict validation rejects unknown fields)
    for ex in ["derpregion-one-node.yaml", "derpregion-three-nodes.yaml"] {
        let mut cmd = cp.kubectl();
        cmd.args([
            "apply",
            "--server-side",
            "--validate=strict",
            "-n",
            &ns.name,
            "-f",
        ])
        .arg(workspace_root().join("deploy/examples").join(ex));
        ok(cmd).await;
    }
    let home: DerpRegion = Api::namespaced(client.clone(), &ns.name)
        .get("home")
        .await
        .expect("example region");
    assert_eq!(home.spec.region_id, 900);
    assert_eq!(
        home.spec
            .node_selector
            .get("kubederp.io/relay")
            .map(String::as_str),
        Some("true")
    );
    // an unknown field is refused, so the check above means something
    let bad = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(
        bad.path(),
        "apiVersion: kubederp.io/v1alpha1\nkind: DerpRegion\nmetadata: {name: bad}\n\
         spec: {regionID: 902, nodeSelektor: {a: b}}\n",
    )
    .expect("write");
    let mut cmd = cp.kubectl();
    cmd.args([
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        &ns.name,
        "-f",
    ])
    .arg(bad.path());
    let text = fails(cmd).await;
    assert!(text.contains("nodeSelektor"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// end to end under the chart's ServiceAccount

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_under_the_chart_service_account_and_needs_every_rule() {
    let (cp, client, op_ns) = setup("chart-op").await;
    let regions_ns = TestNamespace::create(&client, "chart-regions").await;
    let release = format!("e2e-{}", tag());
    let full = format!("{release}-kubederp");
    let watch = format!("watchNamespaces={{{}}}", regions_ns.name);
    let sets = [watch.as_str()];

    // 1. install the chart; its rendered RBAC and Deployment are what we test against
    let mut cmd = helm(cp);
    cmd.args(["install", &release]).arg(chart_dir()).args([
        "--namespace",
        &op_ns.name,
        "--set",
        &watch,
    ]);
    ok(cmd).await;
    let docs = render(cp, &release, &op_ns.name, &sets).await;
    let deployment = find(&docs, "Deployment", &full);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let admin_port = free_port();
    let mut replaced = false;
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("string arg");
            if a.starts_with("--admin-addr=") {
                replaced = true;
                format!("--admin-addr=127.0.0.1:{admin_port}")
            } else {
                a.to_owned()
            }
        })
        .collect();
    assert!(replaced, "the chart sets --admin-addr: {args:?}");
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName")
        .to_owned();

    // 2. a TokenRequest token for the chart's ServiceAccount
    let mut cmd = cp.kubectl();
    cmd.args(["create", "token", &sa, "-n", &op_ns.name, "--duration=1h"]);
    let token = ok(cmd).await.trim().to_owned();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Some(cp.ca_file());
    let direct = dir.path().join("sa-direct.kubeconfig");
    std::fs::write(&direct, kubeconfig_yaml(cp.server(), ca, Some(&token))).expect("write");
    let mut cmd = cp.kubectl();
    cmd.env("KUBECONFIG", &direct).args([
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        ok(cmd).await,
        format!("system:serviceaccount:{}:{sa}", op_ns.name),
        "the operator runs as the chart's ServiceAccount, not the admin"
    );
    let mut cmd = cp.kubectl();
    cmd.env("KUBECONFIG", &direct)
        .args(["auth", "can-i", "list", "secrets", "-n", &op_ns.name]);
    assert_eq!(
        output(cmd).await.stdout.trim_ascii(),
        b"no",
        "no Secret access outside the watched namespace"
    );

    // 3. the recording proxy, carrying the ServiceAccount token through
    let upstream_kc = dir.path().join("upstream.kubeconfig");
    std::fs::write(&upstream_kc, kubeconfig_yaml(cp.server(), ca, None)).expect("write");
    let upstream = derp_tests::k8s::client_from(&upstream_kc)
        .await
        .expect("upstream client");
    let proxy = RecordingProxy::start(upstream).await;
    let via_proxy = dir.path().join("sa-proxy.kubeconfig");
    std::fs::write(
        &via_proxy,
        kubeconfig_yaml(&format!("http://{}", proxy.addr), None, Some(&token)),
    )
    .expect("write");

    // 4. two relay nodes and a region in the watched namespace
    let t = tag();
    let mut nodes = TestNodes::new(&client);
    let labels = json!({"kubederp.io/relay": "true", "chart-test": t});
    let (n1, n2) = (format!("chart-{t}-a"), format!("chart-{t}-b"));
    nodes
        .create(&n1, labels.clone(), &[("InternalIP", "127.0.0.61")])
        .await;
    nodes
        .create(&n2, labels, &[("InternalIP", "127.0.0.62")])
        .await;
    let regions: Api<DerpRegion> = Api::namespaced(client.clone(), &regions_ns.name);
    let region: DerpRegion = serde_json::from_value(json!({
        "apiVersion": "kubederp.io/v1alpha1", "kind": "DerpRegion",
        "metadata": {"name": "home"},
        "spec": {
            "regionID": 950, "regionCode": "home",
            "nodeSelector": {"kubederp.io/relay": "true", "chart-test": t},
        },
    }))
    .expect("region");
    regions
        .create(&PostParams::default(), &region)
        .await
        .expect("create region");
    let _kubelet = fake_kubelet(&client, &regions_ns.name);

    // 5. the operator, with the chart's arguments and the ServiceAccount's kubeconfig
    let op = OperatorProcess::start(
        &args,
        &via_proxy,
        &format!("{full}-6d5f7c9b8-x2x4z"),
        dir.path().join("operator.log"),
    );

    let ready = wait_until(WAIT, || async {
        let (status, _) = admin_http::get(("127.0.0.1", admin_port), "/readyz")
            .await
            .ok()?;
        (status == 200).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "operator not ready (leader + caches) within {}s under the chart's RBAC\n{}",
        WAIT.as_secs(),
        op.log_tail()
    );
    let lease = Api::<Lease>::namespaced(client.clone(), &op_ns.name)
        .get(&full)
        .await
        .expect("the chart's Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(format!("{full}-6d5f7c9b8-x2x4z").as_str())
    );

    let ready_region = wait_until(WAIT, || async {
        let r = regions.get("home").await.ok()?;
        let st = r.status.as_ref()?;
        (st.nodes.len() == 2
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"))
        .then_some(r)
    })
    .await;
    assert!(
        ready_region.is_some(),
        "region not Ready with 2 nodes: {:?}\n{}",
        regions.get("home").await.ok().and_then(|r| r.status),
        op.log_tail()
    );
    // the relay PodMonitor, rendered for this release, selects the relay Pods the operator
    // created, on a container port it names, with the labels its relabelings read
    let mon = render(
        cp,
        &release,
        &op_ns.name,
        &[watch.as_str(), "relayPodMonitor.enabled=true"],
    )
    .await;
    let pm = find(&mon, "PodMonitor", &format!("{full}-relays"));
    assert_eq!(
        pm["spec"]["namespaceSelector"]["matchNames"],
        json!([regions_ns.name])
    );
    let port_name = pm["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .expect("port name");
    let selector = pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let relay_pods = Api::<Pod>::namespaced(client.clone(), &regions_ns.name)
        .list(&ListParams::default().labels(MANAGED))
        .await
        .expect("relay Pods");
    assert_eq!(relay_pods.items.len(), 2);
    for pod in &relay_pods.items {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        for (k, v) in selector {
            assert_eq!(
                labels.get(k).map(String::as_str),
                v.as_str(),
                "{k}: {labels:?}"
            );
        }
        for k in ["kubederp.io/region", "kubederp.io/node"] {
            assert!(
                labels.contains_key(k),
                "{k} (relabeled) missing: {labels:?}"
            );
        }
        let spec = pod.spec.as_ref().expect("pod spec");
        let admin = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(port_name));
        assert!(
            admin.is_some_and(|p| p.container_port > 0),
            "no container port {port_name} in {}",
            pod.name_any()
        );
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &regions_ns.name);
    let dm = cms.get("home-derpmap").await.expect("derpMap ConfigMap");
    let policy = dm
        .data
        .as_ref()
        .and_then(|d| d.get("policy.hujson"))
        .expect("policy.hujson");
    assert!(policy.contains("sha256-raw:"), "{policy}");
    let (code, body) = admin_http::get(("127.0.0.1", admin_port), "/derpmap.json")
        .await
        .expect("GET /derpmap.json");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"950\""), "{body}");
    let (code, metrics) = admin_http::get(("127.0.0.1", admin_port), "/metrics")
        .await
        .expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("derp_operator_"), "{metrics}");

    // 6. a node leaves: its Pod and Secret are pruned, and the mesh objects go with one node
    label_node(&client, &n2, "kubederp.io/relay", None).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &regions_ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &regions_ns.name);
    let pruned = wait_until(WAIT, || async {
        let r = regions.get("home").await.ok()?;
        let one = r.status.as_ref()?.nodes.len() == 1;
        let pods = pods
            .list(&ListParams::default().labels(MANAGED))
            .await
            .ok()?;
        let secrets = secrets
            .list(&ListParams::default().labels(MANAGED))
            .await
            .ok()?;
        (one && pods.items.len() == 1 && secrets.items.len() == 1).then_some(())
    })
    .await;
    assert!(
        pruned.is_some(),
        "node removal not pruned\n{}",
        op.log_tail()
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &regions_ns.name);
    let reasons: BTreeSet<String> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.contains("NodeAdded"), "{reasons:?}");

    // 7. stop: SIGTERM, clean exit, Lease handed back
    let log_text = op.log_tail();
    let status = op.terminate().await;
    assert!(status.success(), "operator exit {status}\n{log_text}");
    let lease = Api::<Lease>::namespaced(client.clone(), &op_ns.name)
        .get(&full)
        .await
        .expect("Lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "Lease released on SIGTERM"
    );

    // 8. least privilege, both ways
    let seen = proxy.seen();
    let denied: Vec<&Seen> = seen.iter().filter(|s| s.status == 403).collect();
    assert!(
        denied.is_empty(),
        "requests the chart's RBAC refused: {denied:#?}"
    );
    let accesses: Vec<Access> = seen.iter().flat_map(Seen::accesses).collect();
    let mut used: BTreeMap<(String, String, String), BTreeSet<Option<String>>> = BTreeMap::new();
    for a in &accesses {
        used.entry((a.group.clone(), a.resource.clone(), a.verb.clone()))
            .or_default()
            .insert(a.namespace.clone());
    }
    let granted = granted(&docs);
    let used_keys: BTreeSet<_> = used.keys().cloned().collect();
    let not_granted: Vec<_> = used_keys.difference(&granted).collect();
    assert!(
        not_granted.is_empty(),
        "the operator used access the chart does not grant: {not_granted:?}"
    );
    let unused: Vec<_> = granted.difference(&used_keys).collect();
    assert!(
        unused.is_empty(),
        "the chart grants access no test needs (remove it, or cover it): {unused:?}\nused: {used:#?}"
    );
    // namespaced access stays in the watched namespace (regions, children, Events) or the
    // release namespace (the Lease); only Nodes are read cluster-wide
    for ((group, resource, verb), namespaces) in &used {
        for ns in namespaces {
            let want = match resource.as_str() {
                "nodes" => None,
                "leases" => Some(op_ns.name.clone()),
                _ => Some(regions_ns.name.clone()),
            };
            assert_eq!(
                ns, &want,
                "{group}/{resource} {verb} outside its expected namespace"
            );
        }
    }
    drop(nodes);
}

// ---------------------------------------------------------------------------------------------
// container images: Dockerfiles, scripts/images and the chart agree (cheap; the image build
// itself is `scripts/images`, too slow for scripts/test)

/// Instructions of a Dockerfile: `(KEYWORD, rest)`, continuation lines joined.
fn dockerfile(path: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join(path)).expect("read Dockerfile");
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || (t.starts_with('#') && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, rest) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        out.push((k.to_uppercase(), rest.trim().to_owned()));
        cur.clear();
    }
    out
}

#[test]
fn dockerfiles_and_the_image_script_build_the_same_non_root_static_images() {
    let version = env!("CARGO_PKG_VERSION");
    let script = std::fs::read_to_string(workspace_root().join("scripts/images"))
        .expect("read scripts/images");
    assert!(script.contains("images=(derp-operator derper)"));
    assert!(script.contains("UID_GID=65532:65532"));
    assert!(script.contains("--entrypoint \"[\\\"/usr/local/bin/$name\\\"]\""));
    assert!(script.contains("target-feature=+crt-static"));
    assert!(script.contains("REGISTRY=${KUBEDERP_IMAGE_REGISTRY:-ghcr.io/kubederp}"));
    assert!(script.contains("ref=\"$REGISTRY/$name:$version\""));
    assert!(script.contains("--storage-driver vfs"));

    for (path, bin, package) in [
        ("operator/Dockerfile", "derp-operator", "derp-operator"),
        ("derper/Dockerfile", "derper", "derper"),
    ] {
        let ins = dockerfile(path);
        let froms: Vec<&String> = ins
            .iter()
            .filter(|(k, _)| k == "FROM")
            .map(|(_, r)| r)
            .collect();
        assert_eq!(froms.len(), 2, "{path}: a build stage and a runtime stage");
        assert!(froms[0].ends_with(" AS build"), "{path}: {froms:?}");
        assert_eq!(
            froms[1], "gcr.io/distroless/static-debian12:nonroot",
            "{path}: minimal static base"
        );
        let run = ins
            .iter()
            .find(|(k, _)| k == "RUN")
            .map(|(_, r)| r.as_str())
            .unwrap_or_default();
        for want in [
            "+crt-static",
            "--release",
            "--locked",
            &format!("-p {package} --bin {bin}"),
            &format!("/out/{bin} --version"),
        ] {
            assert!(run.contains(want), "{path}: RUN lacks {want:?}: {run}");
        }
        // everything after the last FROM is the runtime stage
        let last_from = ins.iter().rposition(|(k, _)| k == "FROM").expect("FROM");
        let runtime = &ins[last_from..];
        let get = |k: &str| -> Vec<&str> {
            runtime
                .iter()
                .filter(|(kk, _)| kk == k)
                .map(|(_, r)| r.as_str())
                .collect()
        };
        assert_eq!(
            get("COPY"),
            [format!("--from=build /out/{bin} /usr/local/bin/{bin}").as_str()],
            "{path}"
        );
        assert_eq!(
            get("USER"),
            ["65532:65532"],
            "{path}: numeric non-root user"
        );
        assert_eq!(
            get("ENTRYPOINT"),
            [format!("[\"/usr/local/bin/{bin}\"]").as_str()],
            "{path}"
        );
        assert!(
            get("RUN").is_empty(),
            "{path}: no shell in the runtime stage"
        );
        let labels = get("LABEL").join(" ");
        for key in [
            "title",
            "description",
            "source",
            "licenses",
            "version",
            "revision",
        ] {
            let k = format!("org.opencontainers.image.{key}=");
            assert!(labels.contains(&k), "{path}: label {k} missing");
            assert!(
                script.contains(&format!("--label \"{k}")),
                "scripts/images: label {k} missing"
            );
        }
        assert!(labels.contains(&format!("org.opencontainers.image.title=\"{bin}\"")));
        let version_arg = ins
            .iter()
            .find(|(k, r)| k == "ARG" && r.starts_with("VERSION="))
            .map(|(_, r)| r.as_str());
        assert_eq!(
            version_arg,
            Some(format!("VERSION={version}").as_str()),
            "{path}"
        );
    }

    // the operator puts the relay image and user in the Pods it creates; the chart runs the
    // operator image as the same user and probes the port the image exposes
    assert_eq!(
        derp_operator::crd::DEFAULT_RELAY_IMAGE,
        format!("ghcr.io/kubederp/derper:{version}")
    );
    assert_eq!(derp_operator::plan::children::RELAY_UID, 65532);
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values yaml");
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart yaml");
    assert_eq!(chart["appVersion"], version);
    assert_eq!(
        values["image"]["repository"],
        "ghcr.io/kubederp/derp-operator"
    );
    assert_eq!(values["podSecurityContext"]["runAsUser"], 65532);
    assert_eq!(values["podSecurityContext"]["runAsGroup"], 65532);
    let admin_port = derp_operator::args::DEFAULT_ADMIN_ADDR
        .rsplit(':')
        .next()
        .expect("port");
    assert_eq!(values["admin"]["port"].to_string(), admin_port);
    assert!(
        dockerfile("operator/Dockerfile").contains(&("EXPOSE".to_owned(), admin_port.to_owned()))
    );
    // the chart's default relay image (passed as --relay-image) is the operator's own default
    assert_eq!(
        format!(
            "{}:{}",
            values["relayImage"]["repository"]
                .as_str()
                .expect("relayImage.repository"),
            chart["appVersion"].as_str().expect("appVersion")
        ),
        derp_operator::crd::DEFAULT_RELAY_IMAGE
    );
    let rendered = std::fs::read_to_string(workspace_root().join("deploy/operator.yaml"))
        .expect("deploy/operator.yaml");
    assert!(
        rendered.contains(&format!(
            "--relay-image={}",
            derp_operator::crd::DEFAULT_RELAY_IMAGE
        )),
        "deploy/operator.yaml passes the relay image"
    );
}
