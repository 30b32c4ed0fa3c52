//! `derper::probe` and the `derpprobe` binary against in-process relays on 127.0.0.1
//! (`derper::testing`): healthy nodes, a wrong pin, a dead STUN port, a metacert, unmeshed
//! nodes, the JSON schema, the exit codes, the ConfigMap (fake kubectl), URL and metrics modes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use derper::derpmap::{self, DerpMap, DerpNode, DerpRegion};
use derper::probe::{self, ProbeOptions, Report, Status};
use derper::testing::{self, TestServer, TestServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn opts() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_secs(3),
        stun_timeout: Duration::from_millis(1500),
        mesh_timeout: Duration::from_millis(1500),
        ..ProbeOptions::default()
    }
}

fn node_for(s: &TestServer, name: &str) -> DerpNode {
    DerpNode {
        name: name.into(),
        region_id: 900,
        host_name: s.addr.ip().to_string(),
        cert_name: s.pin.clone(),
        ipv4: s.addr.ip().to_string(),
        ipv6: "none".into(),
        stun_port: i32::from(s.stun_addr.expect("stun on").port()),
        derp_port: i32::from(s.addr.port()),
        ..DerpNode::default()
    }
}

fn map_of(nodes: Vec<DerpNode>) -> DerpMap {
    let mut regions = BTreeMap::new();
    regions.insert(
        900,
        DerpRegion {
            region_id: 900,
            region_code: "test".into(),
            region_name: "Test".into(),
            nodes,
            ..DerpRegion::default()
        },
    );
    DerpMap {
        regions,
        omit_default_regions: true,
    }
}

async fn server() -> TestServer {
    testing::start(TestServerOptions::default()).await
}

/// A UDP port on 127.0.0.1 with nothing listening.
fn closed_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(25), f)
        .await
        .expect("test step exceeded 25 s")
}

#[tokio::test]
async fn healthy_node_passes_every_check_with_latencies_and_mapped_address() {
    let s = server().await;
    let report = bounded(probe::probe_map(&map_of(vec![node_for(&s, "n1")]), &opts())).await;
    assert!(report.ok, "{:#?}", report);
    let n = &report.regions[0].nodes[0];
    for (name, c) in n.checks.iter() {
        assert_eq!(c.status, Status::Pass, "{name}: {}", c.message);
        assert!(
            c.latency_ms.is_some_and(|l| l >= 0.0),
            "{name} has a latency"
        );
    }
    assert_eq!(
        n.stun_mapped_address
            .as_deref()
            .map(|a| a.starts_with("127.0.0.1:")),
        Some(true)
    );
    let tls = n.tls.as_ref().unwrap();
    assert_eq!(tls.presented_pin.as_deref(), Some(s.pin.as_str()));
    assert_eq!(tls.expected_pin.as_deref(), Some(s.pin.as_str()));
    assert_eq!(tls.chain_len, 1);
    assert!(tls.metacert.is_none());
    assert_eq!(n.fast_start, Some(false));
    assert_eq!(
        n.server_key.as_deref(),
        Some(s.server_key.to_nodekey_string().as_str())
    );
    assert!(report.regions[0].mesh.is_empty(), "one node: no mesh pairs");
    assert!(report.failures().is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn wrong_pin_fails_tls_and_shows_both_pins() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    let wrong = format!("sha256-raw:{}", "0".repeat(64));
    node.cert_name = wrong.clone();
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(!report.ok);
    let n = &report.regions[0].nodes[0];
    assert_eq!(n.checks.tcp.status, Status::Pass);
    assert_eq!(n.checks.tls.status, Status::Fail);
    let msg = &n.checks.tls.message;
    assert!(msg.contains(&wrong), "expected pin shown: {msg}");
    assert!(msg.contains(&s.pin), "presented pin shown: {msg}");
    assert_eq!(n.checks.derp.status, Status::Skip);
    assert_eq!(n.checks.round_trip.status, Status::Skip);
    assert_eq!(
        n.checks.stun.status,
        Status::Pass,
        "STUN does not depend on TLS"
    );
    let tls = n.tls.as_ref().unwrap();
    assert_eq!(tls.presented_pin.as_deref(), Some(s.pin.as_str()));
    assert_eq!(report.failures().len(), 1, "{:?}", report.failures());
    s.shutdown().await;
}

#[tokio::test]
async fn uppercase_pin_is_explained_as_a_case_problem() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    node.cert_name = format!(
        "sha256-raw:{}",
        s.pin.trim_start_matches("sha256-raw:").to_ascii_uppercase()
    );
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    let msg = &report.regions[0].nodes[0].checks.tls.message;
    assert!(msg.contains("letter case"), "{msg}");
    s.shutdown().await;
}

#[tokio::test]
async fn closed_stun_port_fails_only_the_stun_check() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    node.stun_port = i32::from(closed_udp_port());
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(!report.ok);
    let n = &report.regions[0].nodes[0];
    for (name, c) in n.checks.iter() {
        let want = if name == "stun" {
            Status::Fail
        } else {
            Status::Pass
        };
        assert_eq!(c.status, want, "{name}: {}", c.message);
    }
    assert!(
        n.checks.stun.message.contains("no STUN answer"),
        "{}",
        n.checks.stun.message
    );
    assert_eq!(report.failures().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn stun_port_minus_one_is_skipped_not_failed() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    node.stun_port = -1;
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(report.ok);
    assert_eq!(report.regions[0].nodes[0].checks.stun.status, Status::Skip);
    s.shutdown().await;
}

#[tokio::test]
async fn stun_only_node_gets_only_the_stun_check() {
    let s = server().await;
    let mut node = node_for(&s, "s1");
    node.stun_only = true;
    node.derp_port = i32::from(closed_udp_port());
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(report.ok, "{:?}", report.failures());
    let c = &report.regions[0].nodes[0].checks;
    assert_eq!(c.stun.status, Status::Pass);
    for st in [&c.tcp, &c.tls, &c.derp, &c.round_trip] {
        assert_eq!(st.status, Status::Skip);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn metacert_is_noted_with_the_client_versions_it_breaks() {
    let s = testing::start(TestServerOptions {
        metacert: true,
        ..TestServerOptions::default()
    })
    .await;
    let report = bounded(probe::probe_map(&map_of(vec![node_for(&s, "n1")]), &opts())).await;
    assert!(
        report.ok,
        "a metacert is noted, not failed: {:?}",
        report.failures()
    );
    let n = &report.regions[0].nodes[0];
    let tls = n.tls.as_ref().unwrap();
    assert_eq!(tls.chain_len, 2);
    let meta = tls.metacert.as_ref().expect("metacert recorded");
    assert!(meta.common_name.starts_with("derpkey"));
    assert_eq!(meta.matches_server_key, Some(true));
    assert!(meta.breaks.contains("v1.82.0–v1.82.5"), "{}", meta.breaks);
    assert!(
        n.notes
            .iter()
            .any(|x| x.contains("metacert") && x.contains("v1.82")),
        "{:?}",
        n.notes
    );
    assert_eq!(
        n.fast_start,
        Some(true),
        "TLS 1.3 + metacert: fast start like Go"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn unmeshed_nodes_fail_the_cross_node_check_in_both_directions() {
    let (a, b) = (server().await, server().await);
    let map = map_of(vec![node_for(&a, "n1"), node_for(&b, "n2")]);
    let report = bounded(probe::probe_map(&map, &opts())).await;
    assert!(!report.ok);
    let r = &report.regions[0];
    assert!(r.nodes.iter().all(|n| n.ok), "each node alone is healthy");
    assert_eq!(r.mesh.len(), 2);
    let dirs: Vec<(&str, &str)> = r
        .mesh
        .iter()
        .map(|m| (m.from.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(dirs, vec![("n1", "n2"), ("n2", "n1")]);
    for m in &r.mesh {
        assert_eq!(m.check.status, Status::Fail);
        assert!(
            m.check.message.contains("not meshed"),
            "{}",
            m.check.message
        );
    }
    let f = report.failures();
    assert_eq!(f.len(), 2, "{f:?}");
    assert!(f[0].starts_with("900/n1->n2 mesh:"), "{f:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A relay on 127.0.0.`octet` with mesh key `mk` (STUN on).
async fn mesh_node(octet: u8, mk: &derper::key::MeshKey) -> TestServer {
    testing::start(TestServerOptions {
        ip: std::net::IpAddr::from([127, 0, 0, octet]),
        server: derper::server::ServerOptions {
            mesh_key: Some(mk.clone()),
            ..Default::default()
        },
        ..TestServerOptions::default()
    })
    .await
}

fn spawn_mesh(
    ts: &TestServer,
    mk: &derper::key::MeshKey,
    peers: &Path,
) -> derper::mesh::MeshHandle {
    derper::mesh::spawn(
        ts.server(),
        derper::mesh::MeshConfig {
            mesh_key: mk.clone(),
            peers: Vec::new(),
            peers_file: Some(peers.to_path_buf()),
            poll: Duration::from_millis(100),
        },
    )
}

#[tokio::test]
async fn meshed_nodes_pass_the_cross_node_check_and_a_dropped_link_fails_its_direction() {
    let mk = derper::key::MeshKey::from_bytes([0x5a; 32]);
    let (a, b) = (mesh_node(1, &mk).await, mesh_node(2, &mk).await);
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    std::fs::write(
        &peers,
        format!("{} {}\n{} {}\n", a.addr, a.pin, b.addr, b.pin),
    )
    .unwrap();
    let _ma = spawn_mesh(&a, &mk, &peers);
    let mb = spawn_mesh(&b, &mk, &peers);
    let map = map_of(vec![node_for(&a, "n1"), node_for(&b, "n2")]);
    let o = ProbeOptions {
        mesh_timeout: Duration::from_secs(5),
        ..opts()
    };
    let report = bounded(probe::probe_map(&map, &o)).await;
    assert!(report.ok, "{:?}", report.failures());
    let r = &report.regions[0];
    assert_eq!(r.mesh.len(), 2);
    for m in &r.mesh {
        assert_eq!(
            m.check.status,
            Status::Pass,
            "{}->{}: {}",
            m.from,
            m.to,
            m.check.message
        );
        assert!(m.check.latency_ms.is_some());
    }
    // n2 stops dialling n1: n2 can no longer forward to clients on n1; n1 -> n2 still works
    // (n1's own link to n2 is up).
    mb.stop();
    let report = bounded(probe::probe_map(&map, &o)).await;
    let r = &report.regions[0];
    let get = |from: &str| r.mesh.iter().find(|m| m.from == from).unwrap();
    assert_eq!(
        get("n1").check.status,
        Status::Pass,
        "{}",
        get("n1").check.message
    );
    assert_eq!(get("n2").check.status, Status::Fail);
    assert!(
        get("n2").check.message.contains("mesh link n2 -> n1"),
        "{}",
        get("n2").check.message
    );
    assert!(r.nodes.iter().all(|n| n.ok));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_stopped_peer_fails_its_node_checks_and_the_pairs_with_it() {
    let (a, b) = (server().await, server().await);
    let map = map_of(vec![node_for(&a, "n1"), node_for(&b, "n2")]);
    b.shutdown().await;
    let report = bounded(probe::probe_map(&map, &opts())).await;
    let r = &report.regions[0];
    assert!(r.nodes[0].ok);
    assert_eq!(r.nodes[1].checks.tcp.status, Status::Fail);
    assert!(
        r.nodes[1]
            .checks
            .tcp
            .message
            .contains("connecting to 127.0.0.1:")
    );
    for m in &r.mesh {
        assert_eq!(m.check.status, Status::Fail);
        assert!(
            m.check.message.contains("no working probe clients on n2"),
            "{}",
            m.check.message
        );
    }
    a.shutdown().await;
}

#[tokio::test]
async fn mesh_checks_can_be_turned_off() {
    let (a, b) = (server().await, server().await);
    let map = map_of(vec![node_for(&a, "n1"), node_for(&b, "n2")]);
    let o = ProbeOptions {
        mesh: false,
        ..opts()
    };
    let report = bounded(probe::probe_map(&map, &o)).await;
    assert!(report.ok);
    assert!(report.regions[0].mesh.is_empty());
    a.shutdown().await;
    b.shutdown().await;
}

/// Forwards TCP on [::1]:`port` to `to` and UDP on [::1]:`stun_port` to `stun_to`, so a
/// 127.0.0.1-only test relay is also reachable over IPv6 on the same port numbers.
async fn ipv6_forwarder(
    port: u16,
    to: std::net::SocketAddr,
    stun_port: u16,
    stun_to: std::net::SocketAddr,
) {
    let l = tokio::net::TcpListener::bind(("::1", port)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut u) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
            });
        }
    });
    let front = tokio::net::UdpSocket::bind(("::1", stun_port))
        .await
        .unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            let _ = back.send_to(&buf[..n], stun_to).await;
            if let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_secs(1), back.recv(&mut buf)).await
            {
                let _ = front.send_to(&buf[..m], from).await;
            }
        }
    });
}

#[tokio::test]
async fn dual_stack_node_is_checked_over_both_families() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    node.ipv6 = "::1".into();
    ipv6_forwarder(
        s.addr.port(),
        s.addr,
        s.stun_addr.unwrap().port(),
        s.stun_addr.unwrap(),
    )
    .await;
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(report.ok, "{:?}", report.failures());
    let n = &report.regions[0].nodes[0];
    assert!(n.address.as_deref().unwrap().starts_with("127.0.0.1:"));
    let v6 = n.ipv6.as_ref().expect("IPv6 checked too");
    assert_eq!(v6.address, format!("[::1]:{}", s.addr.port()));
    for (name, c) in v6.iter() {
        assert_eq!(c.status, Status::Pass, "ipv6 {name}: {}", c.message);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_dead_ipv6_path_fails_only_the_ipv6_checks() {
    let s = server().await;
    let mut node = node_for(&s, "n1");
    node.ipv6 = "::1".into(); // nothing listens on [::1]
    let report = bounded(probe::probe_map(&map_of(vec![node]), &opts())).await;
    assert!(!report.ok);
    let n = &report.regions[0].nodes[0];
    for (name, c) in n.checks.iter() {
        assert_eq!(c.status, Status::Pass, "{name}: {}", c.message);
    }
    let v6 = n.ipv6.as_ref().unwrap();
    assert_eq!(v6.tcp.status, Status::Fail);
    assert_eq!(v6.tls.status, Status::Skip);
    assert_eq!(v6.stun.status, Status::Fail);
    let f = report.failures();
    assert!(
        f.iter()
            .any(|x| x.starts_with("900/n1 ipv6 tcp: connecting to [::1]:")),
        "{f:?}"
    );
    assert_eq!(f.len(), 2, "{f:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn report_json_schema() {
    let s = server().await;
    let report = bounded(probe::probe_map(&map_of(vec![node_for(&s, "n1")]), &opts())).await;
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["ok"], true);
    let r = &v["regions"][0];
    assert_eq!(r["region_id"], 900);
    assert_eq!(r["region_code"], "test");
    assert!(r["mesh"].is_array() && r["problems"].is_array());
    let n = &r["nodes"][0];
    for key in [
        "name",
        "region_id",
        "host_name",
        "address",
        "stun_address",
        "ok",
        "checks",
        "server_key",
        "fast_start",
        "tls",
        "stun_mapped_address",
        "notes",
    ] {
        assert!(n.get(key).is_some(), "node has {key}: {n}");
    }
    for check in ["tcp", "tls", "derp", "round_trip", "stun"] {
        let c = &n["checks"][check];
        assert_eq!(c["status"], "pass", "{check}");
        assert!(c["message"].is_string());
        assert!(c["latency_ms"].is_number());
    }
    for key in [
        "version",
        "expected_pin",
        "presented_pin",
        "chain_len",
        "leaf_not_after",
        "metacert",
    ] {
        assert!(n["tls"].get(key).is_some(), "tls has {key}");
    }
    assert_eq!(n["tls"]["version"], "TLSv1.3");
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, report, "the JSON reads back into the same Report");
    s.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The binary

const BIN: &str = env!("CARGO_BIN_EXE_derpprobe");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn run_bin(args: &[&str]) -> Out {
    let child = tokio::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(25), child.wait_with_output())
        .await
        .expect("derpprobe finished within 25 s")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_map(dir: &Path, file: &str, map: &DerpMap) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, derpmap::render_json(map)).unwrap();
    p
}

const FAST: [&str; 6] = [
    "--timeout",
    "3s",
    "--stun-timeout",
    "1500ms",
    "--mesh-timeout",
    "1500ms",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_a_table_and_exits_zero_when_healthy() {
    let s = server().await;
    let dir = tempfile::tempdir().unwrap();
    let p = write_map(
        dir.path(),
        "derpmap.json",
        &map_of(vec![node_for(&s, "n1")]),
    );
    let mut args = vec!["--derp-map", p.to_str().unwrap()];
    args.extend(FAST);
    let o = run_bin(&args).await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("REGION"), "{}", o.stdout);
    assert!(o.stdout.contains("n1"));
    assert!(o.stdout.contains("all 5 checks passed"), "{}", o.stdout);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_json_and_exit_one_on_wrong_pin() {
    let s = server().await;
    let dir = tempfile::tempdir().unwrap();
    let mut node = node_for(&s, "n1");
    let wrong = format!("sha256-raw:{}", "1".repeat(64));
    node.cert_name = wrong.clone();
    let p = write_map(dir.path(), "derpmap.json", &map_of(vec![node]));
    let mut args = vec!["--derp-map", p.to_str().unwrap(), "--json"];
    args.extend(FAST);
    let o = run_bin(&args).await;
    assert_eq!(o.code, 1, "{}\n{}", o.stdout, o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("stdout is JSON");
    assert_eq!(v["ok"], false);
    let tls = &v["regions"][0]["nodes"][0]["checks"]["tls"];
    assert_eq!(tls["status"], "fail");
    let msg = tls["message"].as_str().unwrap();
    assert!(msg.contains(&wrong) && msg.contains(&s.pin), "{msg}");
    // The table says the same.
    let mut args = vec!["--derp-map", p.to_str().unwrap()];
    args.extend(FAST);
    let o = run_bin(&args).await;
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains(&wrong) && o.stdout.contains(&s.pin),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("1 of 3 checks failed"), "{}", o.stdout);
    s.shutdown().await;
}

#[tokio::test]
async fn binary_exits_two_with_a_clear_error_for_unreadable_maps() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let o = run_bin(&["--derp-map", missing.to_str().unwrap()]).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains(missing.to_str().unwrap()), "{}", o.stderr);

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\n  \"Regions\": {\n    \"900\": {,\n").unwrap();
    let o = run_bin(&["--derp-map", bad.to_str().unwrap()]).await;
    assert_eq!(o.code, 2);
    let want = format!("{}:3:", bad.display());
    assert!(o.stderr.contains(&want), "{}", o.stderr);

    let hs = dir.path().join("hs.yaml");
    std::fs::write(
        &hs,
        derpmap::render_headscale(&testing::sample_derp_map())
            .replace("derpport: 8443", "derpport: high"),
    )
    .unwrap();
    let o = run_bin(&["--derp-map", hs.to_str().unwrap()]).await;
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("Regions.900.Nodes[1].DERPPort"),
        "{}",
        o.stderr
    );

    let o = run_bin(&["--derp-map", "https://example.invalid/derpmap.json"]).await;
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("https URLs are not supported"),
        "{}",
        o.stderr
    );

    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        derpmap::render_headscale(&testing::sample_derp_map()),
    )
    .unwrap();
    let o = run_bin(&["--derp-map", good.to_str().unwrap(), "--region", "777"]).await;
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("region \"777\" is not in the map"),
        "{}",
        o.stderr
    );
}

/// A fake kubectl that prints a ConfigMap holding all three renderings, as the operator
/// publishes them.
fn fake_kubectl(dir: &Path, map: &DerpMap) -> PathBuf {
    let json = derpmap::render_json(map);
    let policy = derpmap::render_policy(map, "derp/home");
    let headscale = derpmap::render_headscale(map);
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "home-derpmap", "namespace": "derp"},
        "data": {"derpmap.json": json, "policy.hujson": policy, "headscale.yaml": headscale},
    });
    std::fs::write(dir.join("cm.json"), cm.to_string()).unwrap();
    let script = dir.join("kubectl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > {args}\nif [ \"$*\" != \"--kubeconfig /kc get configmap home-derpmap -n derp -o json\" ]; then echo 'Error from server (NotFound): configmaps not found' >&2; exit 1; fi\ncat {cm}\n",
            args = dir.join("args").display(),
            cm = dir.join("cm.json").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reads_every_key_of_the_operator_configmap_via_kubectl() {
    let s = server().await;
    let dir = tempfile::tempdir().unwrap();
    let kubectl = fake_kubectl(dir.path(), &map_of(vec![node_for(&s, "n1")]));
    for format in ["auto", "json", "policy", "headscale"] {
        let mut args = vec![
            "--configmap",
            "derp/home-derpmap",
            "--kubeconfig",
            "/kc",
            "--kubectl",
            kubectl.to_str().unwrap(),
            "--format",
            format,
            "--no-mesh",
        ];
        args.extend(FAST);
        let o = run_bin(&args).await;
        assert_eq!(o.code, 0, "{format}: {}\n{}", o.stdout, o.stderr);
        let key = match format {
            "policy" => "policy.hujson",
            "headscale" => "headscale.yaml",
            _ => "derpmap.json",
        };
        assert!(
            o.stdout
                .contains(&format!("configmap derp/home-derpmap key {key}")),
            "{}",
            o.stdout
        );
    }
    let o = run_bin(&[
        "--configmap",
        "derp/other",
        "--kubeconfig",
        "/kc",
        "--kubectl",
        kubectl.to_str().unwrap(),
    ])
    .await;
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.contains("configmap derp/other: kubectl failed"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("NotFound"), "{}", o.stderr);
    let o = run_bin(&["--configmap", "no-slash"]).await;
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("expected namespace/name"), "{}", o.stderr);
    s.shutdown().await;
}

/// Serves `body` to every HTTP request on 127.0.0.1:0.
async fn serve_body(body: String) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reads_a_map_from_an_http_url() {
    let s = server().await;
    let body = serde_json::to_string(&map_of(vec![node_for(&s, "n1")])).unwrap();
    let addr = serve_body(body).await;
    let url = format!("http://{addr}/derpmap.json");
    let mut args = vec!["--derp-map", url.as_str(), "--json"];
    args.extend(FAST);
    let o = run_bin(&args).await;
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let r: Report = serde_json::from_str(&o.stdout).unwrap();
    assert!(r.ok);
    assert_eq!(r.regions[0].nodes[0].name, "n1");
    s.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_continuous_mode_serves_prometheus_metrics() {
    let (a, b) = (server().await, server().await);
    let dir = tempfile::tempdir().unwrap();
    let mut n2 = node_for(&b, "n2");
    n2.stun_port = i32::from(closed_udp_port());
    let p = write_map(
        dir.path(),
        "derpmap.json",
        &map_of(vec![node_for(&a, "n1"), n2]),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--derp-map",
            p.to_str().unwrap(),
            "--listen",
            &listen,
            "--interval",
            "1s",
        ])
        .args(FAST)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        if let Some(t) = http_get(addr, "/metrics").await
            && t.contains("derpprobe_runs_total 1")
        {
            break t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no completed run in metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for want in [
        "derpprobe_check_ok{region=\"900\",node=\"n1\",check=\"tls\"} 1",
        "derpprobe_check_ok{region=\"900\",node=\"n1\",check=\"stun\"} 1",
        "derpprobe_check_ok{region=\"900\",node=\"n2\",check=\"stun\"} 0",
        "derpprobe_check_ok{region=\"900\",node=\"n2\",check=\"round_trip\"} 1",
        "derpprobe_mesh_ok{region=\"900\",from=\"n1\",to=\"n2\"} 0",
        "derpprobe_check_latency_seconds{region=\"900\",node=\"n1\",check=\"derp\"}",
        "derpprobe_failed_runs_total 1",
        "derpprobe_last_run_ok 0",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    let ready = http_get(addr, "/readyz").await.unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // Stop it the way Kubernetes would.
    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn report_type_is_exported_for_the_operator() {
    fn takes(_: &Report) {}
    let r = Report {
        version: probe::REPORT_VERSION,
        ok: true,
        regions: vec![],
    };
    takes(&r);
}

// ---------------------------------------------------------------------------------------
// Parsers of untrusted input never panic (house style §4.3).

mod no_panic {
    use proptest::prelude::*;

    use derper::probe;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_stun_responses_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = probe::parse_binding_response(&b, derper::stun::TxId([0; 12]));
        }
    }
}
