//! Scale of the operator against a real kube-apiserver: 500 Nodes, one region over all of
//! them plus 50 regions of 10 nodes each, in one namespace. A test binary of its own, so its
//! apiserver load never slows the functional tests in `operator_apiserver.rs`.

use std::time::Duration;

use derp_operator::crd::DerpRegion;
use derp_tests::k8s::{tag, wait_for};
use derp_tests::nodes::{TestNodes, fake_kubelet};
use derp_tests::operator::{Operator, setup};
use derp_tests::regions::{cond, create_region, resource_versions};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

/// Scale: 500 Nodes, one region over all of them plus 50 regions of 10 nodes each (other
/// ports), in one namespace. Prints time to Ready and the writes of idle reconciles (must be
/// zero; measured here: Ready in about 40 s). See the numbers with
/// `cargo test -p derp-tests --test operator_scale -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_500_nodes_51_regions_reach_ready_and_idle_reconciles_write_nothing() {
    const NODES: usize = 500;
    const GROUPS: usize = 50;
    let (client, ns) = setup("op-scale").await;
    let ns = ns.name.clone();
    let t = tag();
    let key = "kubederp.io/test-scale";
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    for i in 0..NODES {
        let name = format!("scale-{t}-{i:03}");
        names.push(name.clone());
        let client = client.clone();
        let labels = json!({key: t, "kubederp.io/test-scale-group": format!("g{}", i % GROUPS)});
        let addr = format!("127.100.{}.{}", i / 200, i % 200 + 1);
        set.spawn(async move {
            let mut n = TestNodes::new(&client);
            n.create(&name, labels, &[("InternalIP", addr.as_str())])
                .await;
            std::mem::take(&mut n.names);
        });
        while set.len() >= 16 {
            set.join_next().await.expect("task").expect("node created");
        }
    }
    while let Some(r) = set.join_next().await {
        r.expect("node created");
    }
    let mut nodes = TestNodes::new(&client);
    nodes.names = names;
    eprintln!("scale: {NODES} nodes created in {:?}", started.elapsed());

    let _kubelet = fake_kubelet(&client, &ns);
    let op = Operator::start(&client, &ns);
    let started = std::time::Instant::now();
    create_region(
        &client,
        &ns,
        "big",
        json!({"regionID": 999, "nodeSelector": {key: t},
               "ports": {"derp": 8443, "http": 8080, "stun": 3479, "admin": 9091}}),
    )
    .await;
    for g in 0..GROUPS {
        create_region(
            &client,
            &ns,
            &format!("g{g}"),
            json!({"regionID": 900 + g, "nodeSelector": {key: t, "kubederp.io/test-scale-group": format!("g{g}")}}),
        )
        .await;
    }
    let api: Api<DerpRegion> = Api::namespaced(client.clone(), &ns);
    wait_for("all 51 regions Ready", Duration::from_secs(600), || {
        let api = api.clone();
        async move {
            let list = api.list(&ListParams::default()).await.ok()?;
            let ready = list
                .iter()
                .filter(|r| {
                    cond(r, "Ready").is_some_and(|c| c.status == "True")
                        && r.status.as_ref().is_some_and(|s| {
                            s.nodes.len()
                                == if r.name_any() == "big" {
                                    NODES
                                } else {
                                    NODES / GROUPS
                                }
                        })
                })
                .count();
            (ready == GROUPS + 1).then_some(())
        }
    })
    .await;
    let to_ready = started.elapsed();
    let writes_to_ready = op.writes();
    eprintln!(
        "scale: 51 regions ({} relay Pods) Ready in {to_ready:?} with {writes_to_ready} writes",
        2 * NODES
    );

    // idle: make every region reconcile again (an annotation does not bump generation).
    // The first round lets status updates still in flight after "Ready" land; the second
    // round is measured and must write nothing.
    let touch_all = |round: &'static str| {
        let (api, op_reconciles) = (api.clone(), &op);
        async move {
            let r0 = op_reconciles.reconciles();
            for r in api.list(&ListParams::default()).await.expect("list") {
                api.patch(
                    &r.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {"kubederp.io/touch": round}}}),
                    ),
                )
                .await
                .expect("touch region");
            }
            wait_for("51 idle reconciles", Duration::from_secs(300), || {
                let n = op_reconciles.reconciles();
                async move { (n >= r0 + 51).then_some(()) }
            })
            .await;
            r0
        }
    };
    touch_all("settle").await;
    let w0 = op.writes();
    let before = resource_versions(&client, &ns).await;
    let started = std::time::Instant::now();
    let r0 = touch_all("measure").await;
    let idle = op.writes() - w0;
    eprintln!(
        "scale: {} idle reconciles in {:?} wrote {idle} times",
        op.reconciles() - r0,
        started.elapsed()
    );
    assert_eq!(idle, 0, "idle reconciles write nothing");
    let after = resource_versions(&client, &ns).await;
    let changed: Vec<_> = after
        .iter()
        .filter(|(k, v)| !k.starts_with("region/") && before.get(*k) != Some(v))
        .collect();
    assert!(
        changed.is_empty(),
        "children changed while idle: {changed:?}"
    );
    op.stop().await;

    // restart: all regions reconciled again, still no writes
    let started = std::time::Instant::now();
    let op2 = Operator::start(&client, &ns);
    wait_for(
        "restart reconciles every region",
        Duration::from_secs(300),
        || {
            let n = op2.reconciles();
            async move { (n >= 51).then_some(()) }
        },
    )
    .await;
    eprintln!(
        "scale: restart reconciled 51 regions in {:?} with {} writes",
        started.elapsed(),
        op2.writes()
    );
    assert_eq!(op2.writes(), 0);
    op2.stop().await;
    drop(nodes);
}
