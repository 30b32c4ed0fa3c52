//! Nodes without machines, for tests of the operator on a bare control plane: cluster-scoped
//! Node objects a test creates and edits ([`TestNodes`], [`set_addresses`], [`label_node`],
//! [`annotate_node`]), and a [`fake_kubelet`] doing the kubelet's part for the relay Pods
//! scheduled on them.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};

use crate::operator::MANAGED;
use crate::stack::clear_not_ready_taint;

/// Cluster-scoped Nodes created by one test; deleted on drop (best effort, on the current
/// tokio runtime).
pub struct TestNodes {
    client: Client,
    /// Names of the Nodes created so far.
    pub names: Vec<String>,
}

impl std::fmt::Debug for TestNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNodes")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl TestNodes {
    /// No Nodes yet; [`TestNodes::create`] adds them.
    pub fn new(client: &Client) -> Self {
        Self {
            client: client.clone(),
            names: Vec::new(),
        }
    }

    /// Creates Node `name` with `labels` and `addresses` (`(type, address)` pairs, e.g.
    /// `("InternalIP", "127.0.10.1")`), schedulable (not-ready taint cleared).
    pub async fn create(&mut self, name: &str, labels: Value, addresses: &[(&str, &str)]) {
        let api: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
        }))
        .expect("node");
        api.create(&PostParams::default(), &node)
            .await
            .expect("create node");
        self.names.push(name.to_owned());
        clear_not_ready_taint(&self.client, name)
            .await
            .expect("clear the not-ready taint");
        set_addresses(&self.client, name, addresses).await;
    }
}

impl Drop for TestNodes {
    fn drop(&mut self) {
        let api: Api<Node> = Api::all(self.client.clone());
        let names = std::mem::take(&mut self.names);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                for n in names {
                    let _ = api.delete(&n, &DeleteParams::default()).await;
                }
            });
        }
    }
}

/// Replaces the Node's `status.addresses` with `addresses` (`(type, address)` pairs).
pub async fn set_addresses(client: &Client, node: &str, addresses: &[(&str, &str)]) {
    let addrs: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    Api::<Node>::all(client.clone())
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": addrs}})),
        )
        .await
        .expect("patch node addresses");
}

/// Sets (`Some`) or removes (`None`) a label on a Node.
pub async fn label_node(client: &Client, node: &str, key: &str, value: Option<&str>) {
    patch_metadata(client, node, "labels", key, value).await;
}

/// Sets (`Some`) or removes (`None`) an annotation on a Node.
pub async fn annotate_node(client: &Client, node: &str, key: &str, value: Option<&str>) {
    patch_metadata(client, node, "annotations", key, value).await;
}

/// Sets or removes one key of the Node's `metadata.<field>` (labels or annotations).
async fn patch_metadata(client: &Client, node: &str, field: &str, key: &str, value: Option<&str>) {
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {field: {key: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("setting {field} {key}={value:?} on node {node}: {e}"));
}

/// Aborts a spawned task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Until dropped, marks the operator's Pods in `ns` Running and Ready and completes their
/// graceful deletion, as a kubelet would once containers started or stopped. It uses
/// `client`'s credentials (the admin's: this is not the operator's traffic).
pub fn fake_kubelet(client: &Client, ns: &str) -> AbortOnDrop {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    AbortOnDrop(tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default().labels(MANAGED)).await {
                for p in list {
                    let name = p.name_any();
                    if p.metadata.deletion_timestamp.is_some() {
                        let _ = pods
                            .delete(&name, &DeleteParams::default().grace_period(0))
                            .await;
                        continue;
                    }
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    if !ready {
                        let _ = pods
                            .patch_status(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"status": {
                                    "phase": "Running",
                                    "conditions": [{"type": "Ready", "status": "True"}],
                                }})),
                            )
                            .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }))
}
