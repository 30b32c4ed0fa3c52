//! `derpprobe` against upstream Go `derper` v1.82.5 (started by `derp_tests::interop` in
//! `--certmode manual` with its self-signed IP certificate, on loopback, reached through a
//! derpMap pinned with the `sha256-raw:` CertName it printed).
//!
//! Upstream always appends its metacert (spec §2.2), so the probe must pass every check and
//! note the metacert together with the client versions it breaks (v1.82.x with a pin, spec
//! §2.4 / §11 P1). No skipping: a missing upstream binary is a loud failure (see
//! `derp_tests::interop`).
//!
//! The cross-node check against a real mesh: two upstream derpers with test-CA certificates
//! (derpprobe verifies them with `--ca-file`), where only B dials A with `--mesh-with` (A's
//! port is the only one known in advance). B forwards to clients on A, A has no route to
//! clients on B: derpprobe must pass B -> A and fail A -> B, then fail both directions once
//! B is stopped.
//!
//! Also here (the one derpprobe file of this crate): `--configmap namespace/name` end to end,
//! through the control plane's real `kubectl` and kube-apiserver (`derp_tests::k8s`).
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use derp_tests::interop::{Relay, ServerKind, TS_OLD, TestCa, derp_map, write_derp_map};
use derp_tests::k8s::{ControlPlane, TestNamespace};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::Value;

async fn run(bin: &std::path::Path, args: &[&str]) -> (i32, String) {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .args([
            "--timeout",
            "5s",
            "--stun-timeout",
            "3s",
            "--mesh-timeout",
            "6s",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(25), child.wait_with_output())
        .await
        .expect("derpprobe finished within 25 s")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn derpprobe_passes_upstream_derper_v1_82_5_and_notes_its_metacert() {
    let (relay, bin) = tokio::task::spawn_blocking(|| {
        let bin = derp_tests::bins::workspace_bin("derpprobe");
        let relay = Relay::upstream(TS_OLD, "900a").expect("start upstream derper v1.82.5");
        (relay, bin)
    })
    .await
    .unwrap();
    let map = write_derp_map(relay.dir.path(), "derpmap.json", &derp_map(&[relay.node()])).unwrap();
    let map = map.to_str().unwrap();

    let (code, stdout) = run(&bin, &["--derp-map", map, "--json"]).await;
    assert_eq!(
        code,
        0,
        "derpprobe failed:\n{stdout}\nrelay log:\n{}",
        relay.log()
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["ok"], true);
    let n = &v["regions"][0]["nodes"][0];
    for check in ["tcp", "tls", "derp", "round_trip", "stun"] {
        assert_eq!(n["checks"][check]["status"], "pass", "{check}: {n}");
    }
    assert!(
        n["stun_mapped_address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{n}"
    );
    let tls = &n["tls"];
    assert_eq!(tls["expected_pin"], relay.cert_name.as_str());
    assert_eq!(tls["presented_pin"], relay.cert_name.as_str());
    assert_eq!(tls["chain_len"], 2, "leaf + metacert");
    let meta = &tls["metacert"];
    assert!(
        meta["common_name"]
            .as_str()
            .is_some_and(|cn| cn.starts_with("derpkey")),
        "{meta}"
    );
    assert_eq!(meta["matches_server_key"], true);
    assert!(
        meta["breaks"].as_str().unwrap().contains("v1.82.0–v1.82.5"),
        "{meta}"
    );
    assert_eq!(
        n["fast_start"], true,
        "TLS 1.3 + metacert: fast start, like Go"
    );

    // The table shows the note too.
    let (code, table) = run(&bin, &["--derp-map", map]).await;
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("metacert presented"), "{table}");
    assert!(table.contains("v1.82.0–v1.82.5"), "{table}");
    assert!(table.contains("all 5 checks passed"), "{table}");
}

/// 64 hex digits (spec §6.10 mesh key file).
const MESH_KEY: &str = "6465727070726f6265206d657368206b657920666f72207570737472656d2121";

#[tokio::test]
async fn derpprobe_cross_node_check_follows_a_real_upstream_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let psk = tmp.path().join("mesh.key");
    std::fs::write(&psk, MESH_KEY).unwrap();
    let psk = psk.to_str().unwrap().to_owned();
    let ca = TestCa::loopback().unwrap();
    let ca_file = ca.write_ca(tmp.path()).unwrap();
    let ca_file = ca_file.to_str().unwrap().to_owned();
    let (psk2, ca2, ca_file2) = (psk.clone(), ca.clone(), ca_file.clone());
    let (a, b, bin) = tokio::task::spawn_blocking(move || {
        let bin = derp_tests::bins::workspace_bin("derpprobe");
        let kind = ServerKind::Upstream(TS_OLD.to_owned());
        let a = Relay::with_ca_cert(kind.clone(), "900a", &["--mesh-psk-file", &psk2], &ca2)
            .expect("start upstream a");
        let b = Relay::with_ca_cert_env(
            kind,
            "900b",
            &["--mesh-psk-file", &psk2, "--mesh-with", &a.addr()],
            &ca2,
            &[("SSL_CERT_FILE", ca_file2.as_str())],
        )
        .expect("start upstream b");
        (a, b, bin)
    })
    .await
    .unwrap();
    let map = write_derp_map(tmp.path(), "derpmap.json", &derp_map(&[a.node(), b.node()])).unwrap();
    let map = map.to_str().unwrap().to_owned();
    let args = [
        "--derp-map",
        map.as_str(),
        "--json",
        "--ca-file",
        ca_file.as_str(),
    ];

    let (code, stdout) = run(&bin, &args).await;
    assert_eq!(code, 1, "A -> B must fail:\n{stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let r = &v["regions"][0];
    for n in r["nodes"].as_array().unwrap() {
        assert_eq!(n["ok"], true, "each node alone passes: {n}");
        let tls = n["checks"]["tls"]["message"].as_str().unwrap();
        assert!(tls.contains("chain verified"), "{tls}");
    }
    let mesh = r["mesh"].as_array().unwrap();
    let dir = |from: &str, to: &str| {
        mesh.iter()
            .find(|m| m["from"] == from && m["to"] == to)
            .unwrap_or_else(|| panic!("no {from}->{to} in {r}"))
            .clone()
    };
    assert_eq!(
        dir("900b", "900a")["status"],
        "pass",
        "B dials A: B forwards to A's clients\n{r}\nB log:\n{}",
        b.log()
    );
    let ab = dir("900a", "900b");
    assert_eq!(ab["status"], "fail", "{r}");
    assert!(
        ab["message"].as_str().unwrap().contains("not meshed"),
        "{ab}"
    );

    // Stop B: its node checks fail and so do both directions of the pair.
    drop(b);
    let (code, stdout) = run(&bin, &args).await;
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let r = &v["regions"][0];
    assert_eq!(r["nodes"][0]["ok"], true);
    assert_eq!(r["nodes"][1]["checks"]["tcp"]["status"], "fail");
    for m in r["mesh"].as_array().unwrap() {
        assert_eq!(m["status"], "fail", "{m}");
        assert!(
            m["message"]
                .as_str()
                .unwrap()
                .contains("no working probe clients on 900b"),
            "{m}"
        );
    }
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derpprobe_reads_the_operator_configmap_through_kubectl_and_a_real_apiserver() {
    let (cp, bin) = tokio::task::spawn_blocking(|| {
        (
            ControlPlane::shared(),
            derp_tests::bins::workspace_bin("derpprobe"),
        )
    })
    .await
    .unwrap();
    let client = cp.client().await;
    let ns = TestNamespace::create(&client, "derpprobe").await;
    let relay = derper::testing::start(derper::testing::TestServerOptions::default()).await;
    let node = serde_json::json!({
        "Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "CertName": relay.pin,
        "IPv4": "127.0.0.1", "IPv6": "none",
        "STUNPort": relay.stun_addr.unwrap().port(), "DERPPort": relay.addr.port(),
    });
    let json = serde_json::to_string_pretty(&derp_map(&[node])).unwrap();
    let policy = format!("// generated\n\"derpMap\": {json},\n");
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "home-derpmap", "namespace": ns.name},
        "data": {"derpmap.json": json, "policy.hujson": policy},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client, &ns.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let kubectl = cp.bin_dir().join("kubectl");
    let kubectl = kubectl.to_str().unwrap();
    let kubeconfig = cp.kubeconfig().to_str().unwrap();
    let target = format!("{}/home-derpmap", ns.name);
    for format in ["auto", "policy"] {
        let (code, stdout) = run(
            &bin,
            &[
                "--configmap",
                &target,
                "--kubeconfig",
                kubeconfig,
                "--kubectl",
                kubectl,
                "--format",
                format,
            ],
        )
        .await;
        assert_eq!(code, 0, "{format}: {stdout}");
        let key = if format == "policy" {
            "policy.hujson"
        } else {
            "derpmap.json"
        };
        assert!(
            stdout.contains(&format!("configmap {target} key {key}")),
            "{stdout}"
        );
        assert!(stdout.contains("all 5 checks passed"), "{stdout}");
    }
    let missing = format!("{}/nope", ns.name);
    let (code, _) = run(
        &bin,
        &[
            "--configmap",
            &missing,
            "--kubeconfig",
            kubeconfig,
            "--kubectl",
            kubectl,
        ],
    )
    .await;
    assert_eq!(code, 2, "a missing ConfigMap is a map error");
    relay.shutdown().await;
}
