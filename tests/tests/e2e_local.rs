//! End-to-end tests through the local stack — the same code `scripts/demo` runs: a real control
//! plane, the `derp-operator` binary, the node agent running the relay Pods as `derper`
//! processes on 127.0.x.y, and real Tailscale client code (tailscale.com v1.82.5 and the newest
//! release) reading the derpMap from the operator's ConfigMap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use derp_tests::interop::{CLIENT_VERSIONS, run_derpinterop};
use derp_tests::k8s::{wait_for, workspace_root};
use derp_tests::stack::{LocalStack, RELAY_LABEL, StackOptions};
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
