//! Proves the real-apiserver harness: server-side apply of a CRD and an object with kube-rs, a
//! CEL rule rejecting a bad object with a message naming the field, and garbage collection of
//! an owned object once its owner is gone (kube-controller-manager is running).

use std::time::Duration;

use derp_tests::k8s::{ControlPlane, TestNamespace, install_crds, wait_for};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.kubederp.io
spec:
  group: harness.kubederp.io
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, default: 1}
              replicas: {type: integer}
            x-kubernetes-validations:
            - rule: "!has(self.replicas) || self.replicas <= 5"
              message: "spec.replicas must be at most 5"
              fieldPath: ".replicas"
"#;

fn widget_api(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("harness.kubederp.io", "v1", "Widget");
    Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk))
}

async fn install_widget_crd(client: &kube::Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("widget.yaml"), WIDGET_CRD).expect("write crd");
    install_crds(client, dir.path())
        .await
        .expect("install widget CRD");
}

#[tokio::test]
async fn server_side_apply_of_a_crd_and_an_object_with_defaults() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_widget_crd(&client).await;
    let ns = TestNamespace::create(&client, "ssa").await;
    let api = widget_api(client.clone(), &ns.name);

    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "harness.kubederp.io/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"replicas": 3},
    }))
    .unwrap();
    let pp = PatchParams::apply("derp-tests-ssa");
    let applied = api.patch("w1", &pp, &Patch::Apply(&obj)).await.unwrap();
    assert_eq!(applied.data["spec"]["replicas"], 3);
    assert_eq!(
        applied.data["spec"]["size"], 1,
        "schema default applied by the apiserver"
    );
    let managers: Vec<_> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&"derp-tests-ssa".to_owned()),
        "managers: {managers:?}"
    );

    // Re-applying the same object is a no-op: the resourceVersion does not move.
    let again = api.patch("w1", &pp, &Patch::Apply(&obj)).await.unwrap();
    assert_eq!(
        again.metadata.resource_version,
        applied.metadata.resource_version
    );
}

#[tokio::test]
async fn cel_rule_rejects_a_bad_object_naming_the_field() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    install_widget_crd(&client).await;
    let ns = TestNamespace::create(&client, "cel").await;
    let api = widget_api(client.clone(), &ns.name);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "harness.kubederp.io/v1", "kind": "Widget",
        "metadata": {"name": "too-many"}, "spec": {"replicas": 9},
    }))
    .unwrap();
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err:?}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.replicas"),
        "message: {}",
        status.message
    );
    assert!(
        status.message.contains("must be at most 5"),
        "message: {}",
        status.message
    );
    assert!(
        api.get_opt("too-many").await.unwrap().is_none(),
        "nothing stored"
    );
}

#[tokio::test]
async fn owned_object_is_garbage_collected_with_its_owner() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let ns = TestNamespace::create(&client, "gc").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let owner: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "owner"}, "data": {"k": "v"},
    }))
    .unwrap();
    let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
    let child: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.clone().unwrap(), "controller": true,
            "blockOwnerDeletion": true,
        }]},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &child).await.unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    wait_for(
        "the child ConfigMap to be garbage-collected",
        Duration::from_secs(60),
        || {
            let cms = cms.clone();
            async move {
                cms.get_opt("child")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn private_control_plane_survives_an_apiserver_restart() {
    let cp = ControlPlane::start().expect("start a private control plane");
    let client = cp.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "kept"}, "data": {"a": "1"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    cp.stop_apiserver();
    assert!(cms.get("kept").await.is_err(), "apiserver is down");
    cp.restart_apiserver().expect("restart apiserver");
    let client = cp.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let got = cms
        .get("kept")
        .await
        .expect("object survived the restart (etcd kept it)");
    assert_eq!(got.data.unwrap()["a"], "1");
}
