//! End-to-end tests through the local stack — the same code `scripts/demo` runs: a real control
//! plane, the `derp-operator` binary, the node agent running the relay Pods as `derper`
//! processes on 127.0.x.y, and real Tailscale client code (tailscale.com v1.82.5 and the newest
//! release) reading the derpMap from the operator's ConfigMap.

#![allow(
    clippy::unwrap_used,
    reason = "helpers of the tests below: a failed unwrap fails the test, as in the tests"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use derp_tests::admin_http;
use derp_tests::interop::{CLIENT_VERSIONS, run_derpinterop};
use derp_tests::k8s::{wait_for, wait_until, workspace_root};
use derp_tests::regions::events;
use derp_tests::stack::{LocalStack, RELAY_LABEL, StackOptions, tail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::Value;

const REGION: &str = "home";
const CONFIG_MAP: &str = "home-derpmap";
const READY: Duration = Duration::from_secs(120);

fn example() -> PathBuf {
    workspace_root().join("deploy/examples/derpregion-three-nodes.yaml")
}

/// Writes the published `derpmap.json` to a file and returns it with its node names.
async fn published_map(stack: &LocalStack, dir: &Path) -> (PathBuf, Value, Vec<String>) {
    let data = stack
        .config_map(CONFIG_MAP)
        .await
        .expect("derpMap ConfigMap");
    let json = data.get("derpmap.json").expect("derpmap.json key").clone();
    let path = dir.join(format!("derpmap-{:08x}.json", rand::random::<u32>()));
    std::fs::write(&path, &json).expect("write the derpMap file");
    let map: Value = serde_json::from_str(&json).expect("derpmap.json is JSON");
    let names = map["Regions"]["900"]["Nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| n["Name"].as_str().expect("node Name").to_owned())
                .collect()
        })
        .unwrap_or_default();
    (path, map, names)
}

/// Real Tailscale clients of every tested version exchange packets between clients on nodes
/// `a` and `b` of the map.
fn exchange_all_versions(map: &Path, a: &str, b: &str) {
    for version in CLIENT_VERSIONS {
        let m = map.to_str().expect("UTF-8 path");
        let run = run_derpinterop(
            version,
            &["exchange", "-derpmap", m, "-node-a", a, "-node-b", b],
            Duration::from_secs(30),
        )
        .expect("run derpinterop");
        assert!(
            run.ok(),
            "tailscale.com {version}: {a} -> {b} failed: {}\n{}",
            run.error(),
            run.stderr
        );
    }
}

fn pins(map: &Value) -> Vec<(String, String)> {
    map["Regions"]["900"]["Nodes"]
        .as_array()
        .expect("region 900 has Nodes")
        .iter()
        .map(|n| {
            (
                n["Name"].as_str().expect("node Name").to_owned(),
                n["CertName"].as_str().expect("node CertName").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_cross_nodes_and_a_crashed_relay_comes_back_with_its_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = LocalStack::start(StackOptions::nodes("e2e-a", 2, 3, tmp.path().join("stack")))
        .await
        .expect("start the local stack");
    stack.apply_file(&example()).unwrap();
    stack.wait_region_ready(REGION, READY).await.unwrap();

    let (map, published, names) = published_map(&stack, tmp.path()).await;
    assert_eq!(names, ["e2e-a-1", "e2e-a-2", "e2e-a-3"], "map: {published}");
    for n in published["Regions"]["900"]["Nodes"].as_array().unwrap() {
        assert!(n["CertName"].as_str().unwrap().starts_with("sha256-raw:"));
    }
    // Clients on different nodes reach each other through the mesh, both ways.
    exchange_all_versions(&map, "e2e-a-1", "e2e-a-2");
    exchange_all_versions(&map, "e2e-a-3", "e2e-a-1");

    // Kill one relay: the agent restarts it, the pin is unchanged, and clients still connect
    // with the map they already had.
    let agent = stack.agent();
    let ns = stack.namespace.clone();
    let pod = "home-e2e-a-2";
    let pid = agent
        .container_pid(&ns, pod, "derper")
        .expect("relay process for e2e-a-2");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let pods: Api<Pod> = Api::namespaced(stack.client().await, &ns);
    wait_for(
        "the killed relay to be restarted and Ready",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get(pod).await.ok()?;
                let cs = p.status?.container_statuses?;
                let c = cs.first()?;
                (c.restart_count >= 1 && c.ready).then_some(())
            }
        },
    )
    .await;
    let new_pid = agent.container_pid(&ns, pod, "derper").unwrap();
    assert_ne!(new_pid, pid, "a new process serves the node");
    // While the relay was down its probe may have failed and the node been withdrawn; the
    // operator republishes it after its next probe round, which can come after Pod Ready.
    wait_for(
        "the restarted node back in the published map",
        Duration::from_secs(60),
        || {
            let (stack, dir, names) = (&stack, tmp.path(), &names);
            async move {
                let (_, _, now) = published_map(stack, dir).await;
                (&now == names).then_some(())
            }
        },
    )
    .await;
    let (_, after, _) = published_map(&stack, tmp.path()).await;
    assert_eq!(
        pins(&after),
        pins(&published),
        "pins unchanged by a relay restart"
    );
    exchange_all_versions(&map, "e2e-a-2", "e2e-a-3");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_node_keeps_the_others_serving_and_deleting_the_region_stops_every_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = LocalStack::start(StackOptions::nodes("e2e-b", 3, 3, tmp.path().join("stack")))
        .await
        .expect("start the local stack");
    stack.apply_file(&example()).unwrap();
    stack.wait_region_ready(REGION, READY).await.unwrap();
    let client = stack.client().await;
    let (_, before, _) = published_map(&stack, tmp.path()).await;

    // Take node 3 out of the region by removing its label.
    let nodes: Api<Node> = Api::all(client.clone());
    let unlabel = serde_json::json!({"metadata": {"labels": {RELAY_LABEL.0: null}}});
    nodes
        .patch("e2e-b-3", &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &stack.namespace);
    wait_for(
        "node 3 to leave the published map and its relay Pod to be pruned",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let stack = &stack;
            async move {
                let data = stack.config_map(CONFIG_MAP).await.ok()?;
                let map: Value = serde_json::from_str(data.get("derpmap.json")?).ok()?;
                let n = map["Regions"]["900"]["Nodes"].as_array()?.len();
                let gone = pods.get_opt("home-e2e-b-3").await.ok()?.is_none();
                (n == 2 && gone).then_some(())
            }
        },
    )
    .await;
    let (map, after, names) = published_map(&stack, tmp.path()).await;
    assert_eq!(names, ["e2e-b-1", "e2e-b-2"]);
    let kept: Vec<_> = pins(&before).into_iter().take(2).collect();
    assert_eq!(pins(&after), kept, "the remaining nodes keep their pins");
    exchange_all_versions(&map, "e2e-b-1", "e2e-b-2");

    // Delete the region: every relay stops and its Pods go away (garbage collection).
    stack
        .regions()
        .await
        .delete(REGION, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "every relay Pod and process to be gone after the region is deleted",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            let stack = &stack;
            async move {
                let left = pods.list(&ListParams::default()).await.ok()?.items.len();
                (left == 0 && stack.agent().pids().is_empty()).then_some(())
            }
        },
    )
    .await;
    stack.shutdown().await;
}

/// Sends SIGCONT to a stopped relay when dropped, so a failing test never leaves it stopped.
struct Resume(u32);
impl Drop for Resume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

fn signal(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// The node's entry in `status.nodes`.
fn node_status<'a>(region: &'a Value, node: &str) -> Option<&'a Value> {
    region["status"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
}

fn nodes_healthy(region: &Value) -> Option<&Value> {
    region["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "NodesHealthy")
}

/// Waits until `f` returns Some for the region `home`; on timeout the panic carries the
/// region's status and the operator's log tail.
async fn wait_region<T, F>(stack: &LocalStack, what: &str, timeout: Duration, f: F) -> T
where
    F: Fn(&Value) -> Option<T>,
{
    let regions = stack.regions().await;
    let found = wait_until(timeout, || {
        let regions = regions.clone();
        let f = &f;
        async move {
            let r = serde_json::to_value(regions.get(REGION).await.ok()?).ok()?;
            f(&r)
        }
    })
    .await;
    match found {
        Some(v) => v,
        None => {
            let status = regions
                .get(REGION)
                .await
                .map(|r| serde_json::to_string_pretty(&r.data["status"]).unwrap_or_default())
                .unwrap_or_default();
            panic!(
                "timed out after {}s waiting for {what}; status: {status}\noperator log tail:\n{}",
                timeout.as_secs(),
                tail(&stack.operator_log, 40)
            )
        }
    }
}

/// Node names in the published derpMap ConfigMap, after checking that the policy snippet and
/// the headscale YAML list the same nodes.
async fn published_nodes(stack: &LocalStack) -> Option<Vec<String>> {
    let data = stack.config_map(CONFIG_MAP).await.ok()?;
    let map: Value = serde_json::from_str(data.get("derpmap.json")?).ok()?;
    let nodes: Vec<(String, String)> = map["Regions"]["900"]["Nodes"]
        .as_array()?
        .iter()
        .map(|n| {
            (
                n["Name"].as_str().unwrap_or_default().to_owned(),
                n["IPv4"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (_, ip) in &nodes {
        assert!(data["policy.hujson"].contains(ip.as_str()));
        assert!(data["headscale.yaml"].contains(ip.as_str()));
    }
    Some(nodes.into_iter().map(|(n, _)| n).collect())
}

/// The body of `GET <path>` on the operator's admin listener.
async fn admin_get(stack: &LocalStack, path: &str) -> String {
    admin_http::get(stack.operator_admin, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on the operator's admin listener: {e:#}"))
        .1
}

/// `derp_operator_probe_timestamp_seconds` of `node` in region derp/home: when the operator last
/// finished probing it.
async fn probe_time(stack: &LocalStack, node: &str) -> Option<f64> {
    let prefix =
        format!(r#"derp_operator_probe_timestamp_seconds{{region="derp/home",node="{node}"}} "#);
    admin_get(stack, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Node names in the operator's merged `/derpmap.json` (headscale `derp.urls` form).
async fn admin_nodes(stack: &LocalStack) -> Vec<String> {
    let body = admin_get(stack, "/derpmap.json").await;
    let map: Value = serde_json::from_str(&body).unwrap();
    map["Regions"]["900"]["Nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| n["Name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Notes of the Events with `reason` that name `node`.
async fn events_about(stack: &LocalStack, reason: &str, node: &str) -> Vec<String> {
    events(&stack.client().await, &stack.namespace, reason)
        .await
        .into_iter()
        .filter(|n| n.contains(&format!("node {node} ")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_status_and_published_map_follow_a_relay_being_stopped_and_started() {
    let tmp = tempfile::tempdir().unwrap();
    let stack = LocalStack::start(
        StackOptions::nodes("e2e-c", 5, 3, tmp.path().join("stack")).operator_args([
            "--probe-interval=2s",
            "--probe-timeout=1500ms",
            "--log-filter=info,kube_runtime=warn,derp_operator::health=debug",
        ]),
    )
    .await
    .expect("start the local stack");
    // the example publishes only healthy nodes (publishUnhealthy: false); shorten the grace
    stack.apply_file(&example()).unwrap();
    let regions = stack.regions().await;
    regions
        .patch(
            REGION,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"derpMap": {"unhealthyAfter": "3s"}}})),
        )
        .await
        .unwrap();
    stack.wait_region_ready(REGION, READY).await.unwrap();
    let all = ["e2e-c-1", "e2e-c-2", "e2e-c-3"];

    // every relay passes the operator's probes: ok + latency for each node, NodesHealthy True
    wait_region(
        &stack,
        "probes to pass on every node",
        Duration::from_secs(60),
        |r| {
            let c = nodes_healthy(r)?;
            let each = all.iter().all(|n| {
                node_status(r, n).is_some_and(|s| {
                    s["probeResult"] == "ok"
                        && s["probeLatencyMs"].as_i64().is_some_and(|l| l >= 1)
                        && s["lastProbeTime"].is_string()
                })
            });
            (each && c["status"] == "True" && c["reason"] == "ProbesPassing").then_some(())
        },
    )
    .await;
    wait_for("all three nodes published", Duration::from_secs(60), || {
        let stack = &stack;
        async move { (published_nodes(stack).await? == all).then_some(()) }
    })
    .await;

    // stop (SIGSTOP) the relay of node 2: TCP still connects (the kernel accepts), TLS hangs
    let stopped = "e2e-c-2";
    let pid = stack
        .agent()
        .container_pid(&stack.namespace, "home-e2e-c-2", "derper")
        .expect("relay process of e2e-c-2");
    signal("-STOP", pid);
    let resume = Resume(pid);
    let unhealthy = wait_region(
        &stack,
        "NodesHealthy False naming the stopped node",
        Duration::from_secs(60),
        |r| {
            let c = nodes_healthy(r)?.clone();
            let result = node_status(r, stopped)?["probeResult"].as_str()?.to_owned();
            (c["status"] == "False"
                && c["reason"] == "ProbesFailing"
                && c["message"]
                    .as_str()?
                    .contains(&format!("node {stopped} fails probes"))
                && result != "ok")
                .then_some((c, result))
        },
    )
    .await;
    let (cond, result) = unhealthy;
    assert!(
        result.starts_with("tls: ") || result.starts_with("derp: "),
        "a stopped relay accepts TCP and then never answers: {result}"
    );
    for n in ["e2e-c-1", "e2e-c-3"] {
        assert!(
            !cond["message"]
                .as_str()
                .unwrap()
                .contains(&format!("node {n} ")),
            "only the stopped node is blamed: {cond}"
        );
    }
    // after unhealthyAfter, the node leaves every published form
    wait_for(
        "the stopped node to leave the published derpMap",
        Duration::from_secs(60),
        || {
            let stack = &stack;
            async move { (published_nodes(stack).await? == ["e2e-c-1", "e2e-c-3"]).then_some(()) }
        },
    )
    .await;
    wait_for(
        "the stopped node to leave the operator's /derpmap.json",
        Duration::from_secs(10),
        || {
            let stack = &stack;
            async move { (admin_nodes(stack).await == ["e2e-c-1", "e2e-c-3"]).then_some(()) }
        },
    )
    .await;
    let data = stack.config_map(CONFIG_MAP).await.unwrap();
    for key in ["derpmap.json", "policy.hujson", "headscale.yaml"] {
        assert!(
            !data[key].contains("127.0.5.12"),
            "{key} still lists the stopped node: {}",
            data[key]
        );
    }
    // several more probe rounds fail: still exactly one Event for the transition. A round's
    // Events are published before the next round starts, so once the stopped node's probe
    // time has moved on three times, two more failed rounds have had their Events.
    let mut probed = probe_time(&stack, stopped).await;
    for _ in 0..3 {
        probed = wait_for(
            "another probe round of the stopped node",
            Duration::from_secs(30),
            || {
                let stack = &stack;
                async move {
                    probe_time(stack, stopped)
                        .await
                        .filter(|t| Some(*t) > probed)
                }
            },
        )
        .await
        .into();
    }
    assert_eq!(
        events_about(&stack, "NodeUnhealthy", stopped).await.len(),
        1,
        "one NodeUnhealthy Event per transition, not per probe"
    );

    // start it again (SIGCONT): probes pass, the node comes back, NodesHealthy True
    signal("-CONT", pid);
    drop(resume);
    wait_region(
        &stack,
        "NodesHealthy True again for the restarted node",
        Duration::from_secs(90),
        |r| {
            let c = nodes_healthy(r)?;
            let back = node_status(r, stopped)?["probeResult"] == "ok";
            (c["status"] == "True" && back).then_some(())
        },
    )
    .await;
    wait_for(
        "the node to be republished",
        Duration::from_secs(90),
        || {
            let stack = &stack;
            async move { (published_nodes(stack).await? == all).then_some(()) }
        },
    )
    .await;
    wait_for(
        "the node to be back in the operator's /derpmap.json",
        Duration::from_secs(10),
        || {
            let stack = &stack;
            async move { (admin_nodes(stack).await == all).then_some(()) }
        },
    )
    .await;
    assert_eq!(events_about(&stack, "NodeHealthy", stopped).await.len(), 1);
    assert_eq!(
        events_about(&stack, "NodeUnhealthy", stopped).await.len(),
        1
    );
    let metrics = admin_get(&stack, "/metrics").await;
    assert!(
        metrics.contains(r#"derp_operator_probe_success{region="derp/home",node="e2e-c-2"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"derp_operator_probes_total{result="tls"}"#)
            || metrics.contains(r#"derp_operator_probes_total{result="derp"}"#),
        "{metrics}"
    );
    stack.shutdown().await;
}
