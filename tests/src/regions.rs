//! DerpRegions and what the operator makes of them, read back from the apiserver: creating a
//! region, waiting on its status, its conditions and pins, the children labelled with it, the
//! derpMap ConfigMap, resource versions (to prove no writes) and Events.

use std::collections::BTreeMap;

use derp_operator::crd::{Condition, DerpRegion};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};

use crate::k8s::wait_for;
use crate::operator::{MANAGED, WAIT};

/// Creates DerpRegion `name` in `ns` with `spec`.
pub async fn create_region(client: &Client, ns: &str, name: &str, spec: Value) -> DerpRegion {
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

/// Waits (up to [`WAIT`]) until the region satisfies `pred`, returning the region; panics
/// naming `what` on timeout.
pub async fn wait_region(
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

/// The region's status condition of type `ty`.
pub fn cond<'a>(r: &'a DerpRegion, ty: &str) -> Option<&'a Condition> {
    r.status.as_ref()?.conditions.iter().find(|c| c.type_ == ty)
}

/// True when the status is current (observed generation), lists exactly `nodes` in that order,
/// and Ready is True.
pub fn is_ready_with(r: &DerpRegion, nodes: &[&str]) -> bool {
    let Some(st) = &r.status else { return false };
    let names: Vec<&str> = st.nodes.iter().map(|n| n.name.as_str()).collect();
    st.observed_generation == r.metadata.generation
        && names == nodes
        && cond(r, "Ready").is_some_and(|c| c.status == "True")
}

/// Node name → certificate pin (`certName`), from the region's status.
pub fn pins(r: &DerpRegion) -> BTreeMap<String, String> {
    r.status
        .iter()
        .flat_map(|s| &s.nodes)
        .map(|n| (n.name.clone(), n.cert_name.clone()))
        .collect()
}

/// Sorted names of the objects of `api` labelled with `region`, not being deleted.
pub async fn names<K>(api: &Api<K>, region: &str) -> Vec<String>
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

/// `derpmap.json` of ConfigMap `cm`, parsed.
pub async fn derpmap_json(client: &Client, ns: &str, cm: &str) -> Value {
    let c = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(cm)
        .await
        .expect("derpmap configmap");
    serde_json::from_str(&c.data.expect("data")["derpmap.json"]).expect("derpmap.json parses")
}

/// Resource versions of every managed object in `ns` plus the regions (to prove no writes).
pub async fn resource_versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let managed = ListParams::default().labels(MANAGED);
    let c = || client.clone();
    add_versions(
        &mut out,
        "secret",
        Api::<Secret>::namespaced(c(), ns),
        &managed,
    )
    .await;
    add_versions(
        &mut out,
        "cm",
        Api::<ConfigMap>::namespaced(c(), ns),
        &managed,
    )
    .await;
    add_versions(&mut out, "pod", Api::<Pod>::namespaced(c(), ns), &managed).await;
    let all = ListParams::default();
    add_versions(
        &mut out,
        "region",
        Api::<DerpRegion>::namespaced(c(), ns),
        &all,
    )
    .await;
    out
}

/// Adds `kind/name → resourceVersion` of each object `api` lists with `lp`.
async fn add_versions<K>(
    out: &mut BTreeMap<String, String>,
    kind: &str,
    api: Api<K>,
    lp: &ListParams,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for o in api.list(lp).await.expect("list") {
        out.insert(
            format!("{kind}/{}", o.name_any()),
            o.resource_version().unwrap_or_default(),
        );
    }
}

/// Notes of the Events in `ns` with `reason`.
pub async fn events(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}
