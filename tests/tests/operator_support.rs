//! Shared helpers for the operator's real-apiserver tests (`operator_apiserver.rs`,
//! `operator_scale.rs`): an in-process operator limited to one namespace, a fake kubelet,
//! test Nodes, waits and small readers. Included with `#[path]`; compiled on its own it is an
//! empty test binary.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each including test uses a subset"
)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use derp_operator::{
    certs::RcgenIssuer,
    controller::{self, Settings, Shared},
    crd::DerpRegion,
    metrics::Metrics,
};
use derp_tests::k8s::{ControlPlane, TestNamespace, install_crds, wait_for, workspace_root};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Pod, Secret},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use derp_operator::admin::PromRegistry;

pub(crate) const WAIT: Duration = Duration::from_secs(60);
pub(crate) const MANAGED: &str = "app.kubernetes.io/managed-by=derp-operator";

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An in-process operator limited to one namespace.
pub(crate) struct Operator {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registry: Arc<PromRegistry>,
    pub(crate) shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), derp_operator::Error>>,
}

impl Operator {
    pub(crate) fn start(client: &Client, ns: &str) -> Operator {
        Self::start_with(client, ns, Settings::default())
    }

    /// Like [`Operator::start`], with `settings` (its namespace and instance are set here).
    pub(crate) fn start_with(client: &Client, ns: &str, settings: Settings) -> Operator {
        let mut registry = PromRegistry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let registry = Arc::new(registry);
        let shared = Shared::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(
            client.clone(),
            Settings {
                namespace: Some(ns.to_owned()),
                concurrency: 4,
                instance: Some(format!("test-{ns}")),
                ..settings
            },
            shared.clone(),
            metrics.clone(),
            Arc::new(RcgenIssuer),
            async move {
                let _ = rx.await;
            },
        ));
        Operator {
            metrics,
            registry,
            shared,
            stop: Some(tx),
            task,
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("operator stops within 30 s")
            .expect("operator task does not panic")
            .expect("operator run returns Ok");
    }

    pub(crate) fn writes(&self) -> u64 {
        self.metrics.total_writes()
    }

    pub(crate) fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }
}

/// Marks managed Pods Running+Ready and completes graceful deletions, like a kubelet would.
pub(crate) fn fake_kubelet(client: &Client, ns: &str) -> AbortOnDrop {
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

/// Cluster-scoped Nodes created by one test; deleted on drop (best effort).
pub(crate) struct TestNodes {
    pub(crate) client: Client,
    pub(crate) names: Vec<String>,
}

impl TestNodes {
    pub(crate) fn new(client: &Client) -> Self {
        Self {
            client: client.clone(),
            names: Vec::new(),
        }
    }

    pub(crate) async fn create(&mut self, name: &str, labels: Value, addresses: &[(&str, &str)]) {
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
        // the apiserver taints new Nodes not-ready (TaintNodesByCondition); with no kubelet and
        // no node-lifecycle controller, play their part and clear it
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await
        .expect("clear node taints");
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

pub(crate) async fn set_addresses(client: &Client, node: &str, addresses: &[(&str, &str)]) {
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

pub(crate) async fn label_node(client: &Client, node: &str, key: &str, value: Option<&str>) {
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {key: value}}})),
        )
        .await
        .expect("label node");
}

/// Set (`Some`) or remove (`None`) an annotation on a Node.
pub(crate) async fn annotate_node(client: &Client, node: &str, key: &str, value: Option<&str>) {
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .expect("annotate node");
}

pub(crate) async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "derp_operator=info,kube=warn".into()),
        )
        .try_init();
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_crds(&client, &workspace_root().join("crds"))
        .await
        .expect("install crds");
    let ns = TestNamespace::create(&client, prefix).await;
    (client, ns)
}

pub(crate) fn tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

pub(crate) async fn create_region(
    client: &Client,
    ns: &str,
    name: &str,
    spec: Value,
) -> DerpRegion {
    let r: DerpRegion = serde_json::from_value(json!({
        "apiVersion": "kubederp.io/v1alpha1", "kind": "DerpRegion",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))
    .expect("region json");
    Api::<DerpRegion>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &r)
        .await
        .expect("create region")
}

/// Wait until the region's status satisfies `pred`, returning the region.
pub(crate) async fn wait_region(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&DerpRegion) -> bool,
) -> DerpRegion {
    let api: Api<DerpRegion> = Api::namespaced(client.clone(), ns);
    wait_for(what, WAIT, || {
        let api = api.clone();
        let pred = &pred;
        async move {
            let r = api.get(name).await.ok()?;
            pred(&r).then_some(r)
        }
    })
    .await
}

pub(crate) fn cond<'a>(r: &'a DerpRegion, ty: &str) -> Option<&'a derp_operator::crd::Condition> {
    r.status.as_ref()?.conditions.iter().find(|c| c.type_ == ty)
}

pub(crate) fn is_ready_with(r: &DerpRegion, nodes: &[&str]) -> bool {
    let Some(st) = &r.status else { return false };
    let names: Vec<&str> = st.nodes.iter().map(|n| n.name.as_str()).collect();
    st.observed_generation == r.metadata.generation
        && names == nodes
        && cond(r, "Ready").is_some_and(|c| c.status == "True")
}

pub(crate) fn pins(r: &DerpRegion) -> BTreeMap<String, String> {
    r.status
        .iter()
        .flat_map(|s| &s.nodes)
        .map(|n| (n.name.clone(), n.cert_name.clone()))
        .collect()
}

pub(crate) async fn names<K>(api: &Api<K>, region: &str) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut v: Vec<String> = api
        .list(&ListParams::default().labels(&format!("kubederp.io/region={region}")))
        .await
        .expect("list")
        .into_iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .map(|o| o.name_any())
        .collect();
    v.sort();
    v
}

pub(crate) async fn derpmap_json(client: &Client, ns: &str, cm: &str) -> Value {
    let c = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(cm)
        .await
        .expect("derpmap configmap");
    serde_json::from_str(&c.data.expect("data")["derpmap.json"]).expect("derpmap.json parses")
}

/// Resource versions of every managed object in `ns` plus the regions (to prove no writes).
pub(crate) async fn resource_versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default().labels(MANAGED);
    for s in Api::<Secret>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .expect("list")
    {
        out.insert(
            format!("secret/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
        );
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .expect("list")
    {
        out.insert(
            format!("cm/{}", c.name_any()),
            c.resource_version().unwrap_or_default(),
        );
    }
    for p in Api::<Pod>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .expect("list")
    {
        out.insert(
            format!("pod/{}", p.name_any()),
            p.resource_version().unwrap_or_default(),
        );
    }
    for r in Api::<DerpRegion>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list")
    {
        out.insert(
            format!("region/{}", r.name_any()),
            r.resource_version().unwrap_or_default(),
        );
    }
    out
}

pub(crate) async fn events(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}
