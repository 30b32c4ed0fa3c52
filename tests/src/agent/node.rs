//! Node objects: registration (labels, an `InternalIP`, capacity, nodeInfo), the status
//! heartbeat that keeps them Ready, and the node Lease in `kube-node-lease`.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::spec::NodeSpec;
use super::{Shared, read_lock};

/// Field manager for everything the agent writes.
const FIELD_MANAGER: &str = "kubederp-node-agent";

/// Namespace of node heartbeat Leases (created by kube-apiserver at start).
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Lease duration the kubelet uses by default (`nodeLeaseDurationSeconds`).
const LEASE_SECONDS: i32 = 40;

/// A registered node plus agent bookkeeping.
#[derive(Debug, Clone)]
pub(super) struct NodeEntry {
    pub(super) spec: NodeSpec,
    pub(super) registered: Timestamp,
    /// Port of the node's `/containerLogs` endpoint (0: none).
    pub(super) kubelet_port: u16,
}

fn node_labels(spec: &NodeSpec) -> BTreeMap<String, String> {
    let mut labels = spec.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), go_arch().into());
    labels
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub(super) async fn apply_node(client: &kube::Client, spec: &NodeSpec) -> anyhow::Result<()> {
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": node_labels(spec)},
    });
    Api::<Node>::all(client.clone())
        .patch(
            &spec.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await
        .with_context(|| format!("applying node {}", spec.name))?;
    Ok(())
}

/// Writes the node's status (JSON merge patch).
pub(super) async fn patch_node_status(
    client: &kube::Client,
    entry: &NodeEntry,
    ready: bool,
) -> anyhow::Result<()> {
    let spec = &entry.spec;
    let addresses = [json!({"type": "InternalIP", "address": spec.ipv4.to_string()})];
    // No `Hostname` address: kube-apiserver prefers it for reaching the kubelet
    // (`--kubelet-preferred-address-types`), and our node names do not resolve.
    let now = Time(Timestamp::now());
    let (status, reason, message) = if ready {
        (
            "True",
            "KubeletReady",
            "kubederp node agent is posting ready status",
        )
    } else {
        ("False", "NodeAgentStopped", "kubederp node agent stopped")
    };
    let capacity = json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"});
    let patch = json!({
        "status": {
            "addresses": addresses,
            "conditions": [{
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": if ready { Time(entry.registered) } else { now.clone() },
            }],
            "capacity": capacity,
            "allocatable": capacity,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": entry.kubelet_port}},
            "nodeInfo": {
                "architecture": go_arch(),
                "bootID": "",
                "containerRuntimeVersion": "kubederp-node-agent://0.1.0",
                "kernelVersion": "",
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.34.0-kubederp-node-agent",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "kubederp local node agent",
                "systemUUID": "",
            },
        }
    });
    Api::<Node>::all(client.clone())
        .patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching status of node {}", spec.name))?;
    Ok(())
}

/// Renews the node's Lease in `kube-node-lease` (best effort: logged at debug on failure).
pub(super) async fn renew_lease(client: &kube::Client, node: &str) {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    let api = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        LEASE_NAMESPACE,
    );
    if let Err(e) = api
        .patch(
            node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
    {
        tracing::debug!(node, error = %e, "renewing node lease");
    }
}

pub(super) async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let nodes: Vec<NodeEntry> = read_lock(&shared.nodes).values().cloned().collect();
        for n in nodes {
            if let Err(e) = patch_node_status(&shared.client, &n, true).await {
                tracing::warn!(node = %n.spec.name, error = %format!("{e:#}"), "node heartbeat");
            }
            renew_lease(&shared.client, &n.spec.name).await;
        }
    }
}
