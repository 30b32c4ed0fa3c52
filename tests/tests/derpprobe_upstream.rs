//! `derpprobe` against upstream Go `derper` v1.82.5 (started by `derp_tests::interop` in
//! `--certmode manual` with its self-signed IP certificate, on loopback, reached through a
//! derpMap pinned with the `sha256-raw:` CertName it printed).
//!
//! Upstream always appends its metacert (spec §2.2), so the probe must pass every check and
//! note the metacert together with the client versions it breaks (v1.82.x with a pin, spec
//! §2.4 / §11 P1). No skipping: a missing upstream binary is a loud failure (see
//! `derp_tests::interop`).
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use derp_tests::interop::{Relay, TS_OLD, derp_map, write_derp_map};
use serde_json::Value;

async fn run(bin: &std::path::Path, args: &[&str]) -> (i32, String) {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .args(["--timeout", "5s", "--stun-timeout", "3s"])
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
