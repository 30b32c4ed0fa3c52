//! Test builders (cfg(test) only): `node("n1").label(..).external(..)`, a default region.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus, Taint};
use kube::api::ObjectMeta;

use crate::crd::{DerpRegion, DerpRegionSpec};

/// Builder for a Node object.
pub(crate) struct NodeBuilder(Node);

pub(crate) fn node(name: &str) -> NodeBuilder {
    NodeBuilder(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus::default()),
    })
}

impl NodeBuilder {
    pub(crate) fn label(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }
    pub(crate) fn annotate(mut self, k: &str, v: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }
    fn addr(mut self, ty: &str, a: &str) -> Self {
        let st = self.0.status.get_or_insert_with(Default::default);
        st.addresses.get_or_insert_with(Vec::new).push(NodeAddress {
            type_: ty.into(),
            address: a.into(),
        });
        self
    }
    pub(crate) fn internal(self, a: &str) -> Self {
        self.addr("InternalIP", a)
    }
    pub(crate) fn external(self, a: &str) -> Self {
        self.addr("ExternalIP", a)
    }
    pub(crate) fn hostname_addr(self, a: &str) -> Self {
        self.addr("Hostname", a)
    }
    pub(crate) fn taint(mut self, k: &str, v: &str, effect: &str) -> Self {
        let sp = self.0.spec.get_or_insert_with(Default::default);
        sp.taints.get_or_insert_with(Vec::new).push(Taint {
            key: k.into(),
            value: Some(v.into()),
            effect: effect.into(),
            ..Default::default()
        });
        self
    }
    pub(crate) fn build(self) -> Node {
        self.0
    }
}

/// A region spec selecting `relay=yes`, region 900, defaults otherwise.
pub(crate) fn region_spec() -> DerpRegionSpec {
    serde_json::from_value(serde_json::json!({
        "regionID": 900,
        "nodeSelector": {"relay": "yes"},
    }))
    .expect("valid spec")
}

/// A stored region `ns/home` with a uid and generation 1.
pub(crate) fn region() -> DerpRegion {
    let mut r = DerpRegion::new("home", region_spec());
    r.metadata.namespace = Some("ns".into());
    r.metadata.uid = Some("uid-1".into());
    r.metadata.generation = Some(1);
    r
}
