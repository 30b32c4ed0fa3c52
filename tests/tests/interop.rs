//! Interop with real Tailscale client code (tailscale.com v1.82.5 and v1.104.7, through
//! `tests/interop`'s `derpinterop`) and upstream Go `derper`, on loopback only.
//!
//! Every relay runs like a user would start it: `--hostname 127.0.0.1 --certmode manual`
//! with a freshly generated self-signed IP certificate, and every client reaches it through a
//! derpMap whose node carries the printed `sha256-raw:` CertName (never `InsecureForTests`).
//!
//! - our relay × both client versions: packets both ways over plain upgrade (TLS 1.3 and
//!   forced TLS 1.2) and WebSocket, PeerGone, netcheck STUN + HTTPS latency; fast start with
//!   the metacert switched on (v1.104.7; v1.82.5 cannot combine pinning and a metacert);
//! - negative control: upstream derper v1.82.5 in the same mode is rejected by the v1.82.5
//!   client ("unexpected multiple certs presented", spec §2.4) while ours is accepted, and the
//!   v1.104.7 client accepts both;
//! - `client_server_matrix` measures the whole client × server × transport table that
//!   `tests/interop/README.md` shows (set `KUBEDERP_INTEROP_MATRIX_OUT=<file>` to write it).
//! - `parsemap_*`: derpMap JSON and headscale YAML read back with the real `tailcfg` types.

use std::path::PathBuf;

use derp_tests::interop::{
    CLIENT_VERSIONS, Relay, Run, ServerKind, TS_NEW, TS_OLD, TestCa, derp_map, parse_derp_map,
    run_against, write_derp_map,
};
use serde_json::{Value, json};

/// The error text of tailscale.com v1.82.x `tlsdial.SetConfigExpectedCertHash` when more than
/// one certificate (the metacert included) is presented (spec §2.4, pitfall P1).
const MULTIPLE_CERTS: &str = "unexpected multiple certs presented";

/// Flag that turns the metacert on in our relay (off by default for pinned certs, spec §2.7).
const OUR_METACERT_FLAGS: &[&str] = &["--metacert", "on"];

fn map_for(relays: &[&Relay]) -> PathBuf {
    let nodes: Vec<Value> = relays.iter().map(|r| r.node()).collect();
    write_derp_map(relays[0].dir.path(), "derpmap.json", &derp_map(&nodes)).expect("write map")
}

fn ours() -> Relay {
    Relay::ours("900a", &[]).expect("start our derper")
}

fn upstream(version: &str) -> Relay {
    Relay::upstream(version, "900a").expect("start upstream derper")
}

fn exchange(client: &str, relay: &Relay, mode: &str) -> Run {
    let map = map_for(&[relay]);
    run_against(client, "exchange", &map, Some(mode), &[]).expect("run derpinterop")
}

#[track_caller]
fn assert_ok(run: &Run, what: &str, relay: &Relay) {
    assert!(
        run.ok() && run.success,
        "{what}: expected success, got {}\nclient stderr:\n{}\nrelay log:\n{}",
        serde_json::to_string_pretty(&run.json).unwrap_or_default(),
        run.stderr,
        relay.log()
    );
}

#[track_caller]
fn assert_exchanged(run: &Run, what: &str, relay: &Relay, transport: &str) {
    assert_ok(run, what, relay);
    for side in ["a", "b"] {
        assert_eq!(run.transport(side), transport, "{what}: client {side}");
    }
    for dir in ["a_to_b", "b_to_a"] {
        let sent = run.json[dir]["sent"].as_u64().unwrap_or(0);
        assert!(sent > 0, "{what}: nothing sent {dir}");
        assert_eq!(
            run.json[dir]["received"].as_u64(),
            Some(sent),
            "{what}: {dir}"
        );
    }
    let server_key = run.json["a"]["server_key"].as_str().unwrap_or_default();
    assert!(server_key.starts_with("nodekey:"), "{what}: {server_key}");
}

// ---------------------------------------------------------------------------------------
// Our relay × both client versions

fn ours_exchange_all_transports(client: &str) {
    let relay = ours();
    // Pinned mode: exactly one certificate, no metacert, so TLS 1.3 clients take the 101 path.
    let run = exchange(client, &relay, "upgrade");
    assert_exchanged(&run, &format!("{client} upgrade"), &relay, "upgrade");
    assert_eq!(
        run.json["a"]["tls_version"], "1.3",
        "{client}: TLS 1.3 expected"
    );
    assert_eq!(
        run.json["a"]["peer_certs"], 1,
        "{client}: pinned mode sends one cert"
    );
    assert_eq!(run.json["a"]["metacert"], false);

    let run = exchange(client, &relay, "upgrade-tls12");
    assert_exchanged(
        &run,
        &format!("{client} upgrade over TLS 1.2"),
        &relay,
        "upgrade",
    );
    assert_eq!(run.json["a"]["tls_version"], "1.2");

    let run = exchange(client, &relay, "websocket");
    assert_exchanged(&run, &format!("{client} websocket"), &relay, "websocket");
}

/// A 65,536-byte packet (derp.MaxPacketSize) crosses the WebSocket transport: the relay splits
/// frames into messages within the clients' 32 KiB WebSocket read limit.
#[test]
fn maximum_size_packets_cross_websocket_for_both_client_versions() {
    let relay = ours();
    let map = map_for(&[&relay]);
    for client in [TS_OLD, TS_NEW] {
        let run = run_against(
            client,
            "exchange",
            &map,
            Some("websocket"),
            &["-max-size", "65536", "-count", "4"],
        )
        .expect("run derpinterop");
        assert_exchanged(
            &run,
            &format!("{client} websocket 64 KiB"),
            &relay,
            "websocket",
        );
    }
}

#[test]
fn ours_exchanges_both_ways_over_upgrade_tls12_and_websocket_with_v1_82_5() {
    ours_exchange_all_transports(TS_OLD);
}

#[test]
fn ours_exchanges_both_ways_over_upgrade_tls12_and_websocket_with_v1_104_7() {
    ours_exchange_all_transports(TS_NEW);
}

#[test]
fn ours_with_metacert_gives_v1_104_7_fast_start_and_v1_82_5_the_multiple_certs_error() {
    let relay = Relay::ours("900a", OUR_METACERT_FLAGS).expect("start our derper with metacert");
    let run = exchange(TS_NEW, &relay, "fast");
    assert_exchanged(&run, "v1.104.7 fast start", &relay, "fast-start");
    assert_eq!(run.json["a"]["peer_certs"], 2, "leaf + metacert");
    let run = exchange(TS_OLD, &relay, "fast");
    assert!(
        !run.ok(),
        "v1.82.5 cannot pin with a metacert: {}",
        run.json
    );
    assert!(run.error().contains(MULTIPLE_CERTS), "{}", run.error());
}

fn ours_peergone(client: &str) {
    let relay = ours();
    let map = map_for(&[&relay]);
    for mode in ["auto", "websocket"] {
        let run = run_against(client, "peergone", &map, Some(mode), &[]).expect("run");
        assert_ok(&run, &format!("{client} peergone {mode}"), &relay);
        let gone = &run.json["peer_gone"];
        assert_eq!(
            gone["peer"], run.json["a"]["client_key"],
            "PeerGone names A"
        );
        assert_eq!(gone["reason"], 0, "reason 0x00 disconnected");
    }
}

#[test]
fn ours_sends_peergone_to_v1_82_5_receiver_when_sender_leaves() {
    ours_peergone(TS_OLD);
}

#[test]
fn ours_sends_peergone_to_v1_104_7_receiver_when_sender_leaves() {
    ours_peergone(TS_NEW);
}

fn ours_netcheck(client: &str) {
    let relay = ours();
    let map = map_for(&[&relay]);
    let run = run_against(client, "netcheck", &map, None, &[]).expect("run netcheck");
    assert_ok(&run, &format!("{client} netcheck"), &relay);
    let stun = &run.json["stun"];
    assert_eq!(stun["udp"], true, "STUN answered");
    assert!(
        stun["region_latency_ms"]["900"].is_number(),
        "STUN latency: {stun}"
    );
    assert_eq!(
        stun["global_v4"], run.json["local_udp"],
        "STUN mapped address = the client's UDP socket"
    );
    assert_eq!(stun["preferred_derp"], 900);
    let https = &run.json["https"];
    assert!(
        https["region_latency_ms"]["900"].is_number(),
        "HTTPS latency: {https}"
    );
}

#[test]
fn ours_netcheck_reports_stun_and_https_latency_to_v1_82_5() {
    ours_netcheck(TS_OLD);
}

#[test]
fn ours_netcheck_reports_stun_and_https_latency_to_v1_104_7() {
    ours_netcheck(TS_NEW);
}

#[test]
fn ca_issued_certificate_gives_both_clients_fast_start_on_ours_and_upstream() {
    // The only way a v1.82.x client meets a metacert and still connects: no pin, a chain it
    // verifies (spec §2.5). Our relay's default `--metacert auto` turns it on for a
    // certificate it did not generate itself.
    let ca = TestCa::loopback().expect("test CA");
    for kind in [ServerKind::Ours, ServerKind::Upstream(TS_OLD.to_owned())] {
        let relay = Relay::with_ca_cert(kind.clone(), "900a", &[], &ca).expect("start relay");
        let ca_file = ca.write_ca(relay.dir.path()).expect("write CA");
        let ca_file = ca_file.to_str().expect("utf8");
        let map = map_for(&[&relay]);
        for client in CLIENT_VERSIONS {
            let what = format!("{client} × {kind} (CA-issued cert)");
            let run = run_against(
                client,
                "exchange",
                &map,
                Some("fast"),
                &["-ca-file", ca_file],
            )
            .expect("run");
            assert_exchanged(&run, &what, &relay, "fast-start");
            let run = run_against(
                client,
                "exchange",
                &map,
                Some("websocket"),
                &["-ca-file", ca_file],
            )
            .expect("run");
            assert_exchanged(&run, &what, &relay, "websocket");
            let run = run_against(client, "exchange", &map, Some("fast"), &[]).expect("run");
            assert!(
                !run.ok(),
                "{what}: without trusting the CA the chain must fail"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Meshed nodes: A on one node, B on another, packets forwarded over the mesh

/// 64 hex digits (spec §8.1 mesh key file).
const MESH_KEY: &str = "6b75626564657270206d657368206b657920666f7220696e7465726f70207473";

fn to_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn mesh_files(dir: &std::path::Path) -> (String, String, String) {
    let psk = dir.join("mesh.key");
    std::fs::write(&psk, MESH_KEY).expect("write mesh key");
    let (pa, pb) = (dir.join("peers-a"), dir.join("peers-b"));
    std::fs::write(&pa, "").expect("write peers");
    std::fs::write(&pb, "").expect("write peers");
    let s = |p: PathBuf| p.to_str().expect("utf8").to_owned();
    (s(psk), s(pa), s(pb))
}

#[test]
fn ours_meshed_pair_forwards_packets_and_peergone_between_nodes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (psk, pa, pb) = mesh_files(tmp.path());
    let args = |peers: &str| {
        vec![
            "--mesh-psk-file".to_owned(),
            psk.clone(),
            "--mesh-peers-file".to_owned(),
            peers.to_owned(),
            "--mesh-peers-poll".to_owned(),
            "100ms".to_owned(),
        ]
    };
    let (args_a, args_b) = (args(&pa), args(&pb));
    let a = Relay::ours("900a", &to_refs(&args_a)).expect("start ours a");
    let b = Relay::ours("900b", &to_refs(&args_b)).expect("start ours b");
    // Pins are known only once both have generated their certificates: the peers files are
    // re-read when they change (design.md §4).
    std::fs::write(&pa, format!("{} {}\n", b.addr(), b.cert_name)).expect("peers a");
    std::fs::write(&pb, format!("{} {}\n", a.addr(), a.cert_name)).expect("peers b");
    let map = map_for(&[&a, &b]);
    let nodes = ["-node-a", "900a", "-node-b", "900b"];
    for client in CLIENT_VERSIONS {
        let run = run_against(client, "exchange", &map, Some("upgrade"), &nodes).expect("run");
        assert_exchanged(&run, &format!("{client} across the mesh"), &a, "upgrade");
        assert_eq!(run.json["a"]["node"], "900a");
        assert_eq!(run.json["b"]["node"], "900b");
        let run = run_against(client, "peergone", &map, Some("upgrade"), &nodes).expect("run");
        assert_ok(&run, &format!("{client} peergone across the mesh"), &b);
        assert_eq!(run.json["peer_gone"]["peer"], run.json["a"]["client_key"]);
    }
}

#[test]
fn ours_meshes_with_upstream_derper_both_ways() {
    // Upstream's --mesh-with verifies peers with WebPKI, so both relays serve a certificate
    // from the test CA (upstream trusts it through SSL_CERT_FILE); ours lists upstream in
    // its pinned peers file (the metacert upstream appends is skipped, spec §2.4).
    let tmp = tempfile::tempdir().expect("tempdir");
    let (psk, peers, _) = mesh_files(tmp.path());
    let ca = TestCa::loopback().expect("test CA");
    let ca_file = ca.write_ca(tmp.path()).expect("write CA");
    let ca_file = ca_file.to_str().expect("utf8");
    let ours_args = [
        "--mesh-psk-file",
        &psk,
        "--mesh-peers-file",
        &peers,
        "--mesh-peers-poll",
        "100ms",
    ];
    let ours = Relay::with_ca_cert(ServerKind::Ours, "900a", &ours_args, &ca).expect("ours");
    let up_args = ["--mesh-psk-file", &psk, "--mesh-with", &ours.addr()];
    let up = Relay::with_ca_cert_env(
        ServerKind::Upstream(TS_NEW.to_owned()),
        "900b",
        &up_args,
        &ca,
        &[("SSL_CERT_FILE", ca_file)],
    )
    .expect("upstream");
    std::fs::write(&peers, format!("{} {}\n", up.addr(), ca.leaf_pin)).expect("peers");
    let map = map_for(&[&ours, &up]);
    for client in CLIENT_VERSIONS {
        for (na, nb) in [("900a", "900b"), ("900b", "900a")] {
            let what = format!("{client}: A on {na}, B on {nb}");
            let extra = ["-node-a", na, "-node-b", nb, "-ca-file", ca_file];
            let run = run_against(client, "exchange", &map, Some("fast"), &extra).expect("run");
            assert!(
                run.ok(),
                "{what}: {}\n{}\nours:\n{}\nupstream:\n{}",
                run.json,
                run.stderr,
                ours.log(),
                up.log()
            );
            assert_exchanged(&run, &what, &ours, "fast-start");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Negative control: upstream derper in the same pinned mode

#[test]
fn upstream_v1_82_5_rejects_pinned_v1_82_5_client_while_ours_accepts_it() {
    let up = upstream(TS_OLD);
    for mode in ["auto", "upgrade-tls12", "websocket"] {
        let run = exchange(TS_OLD, &up, mode);
        assert!(
            !run.ok() && !run.success,
            "{mode}: upstream must be rejected: {}",
            run.json
        );
        assert!(
            run.error().contains(MULTIPLE_CERTS),
            "{mode}: want {MULTIPLE_CERTS:?}, got {:?}",
            run.error()
        );
        assert_eq!(run.json["stage"], "connect-a");
    }
    let ours = ours();
    let run = exchange(TS_OLD, &ours, "auto");
    assert_exchanged(&run, "v1.82.5 against ours", &ours, "upgrade");
}

#[test]
fn v1_104_7_client_accepts_upstream_v1_82_5_and_v1_104_7_pinned() {
    for server in [TS_OLD, TS_NEW] {
        let up = upstream(server);
        let run = exchange(TS_NEW, &up, "fast");
        assert_exchanged(&run, &format!("upstream {server} fast"), &up, "fast-start");
        let run = exchange(TS_NEW, &up, "upgrade-tls12");
        assert_exchanged(&run, &format!("upstream {server} tls1.2"), &up, "upgrade");
        let run = exchange(TS_NEW, &up, "websocket");
        assert_exchanged(
            &run,
            &format!("upstream {server} websocket"),
            &up,
            "websocket",
        );
    }
}

// ---------------------------------------------------------------------------------------
// The measured client × server matrix

/// One measured cell: "ok (transport)" or "FAIL: <first line of the error>".
fn cell(run: &Run) -> String {
    if run.ok() {
        match run.json.get("a") {
            Some(_) if run.json.get("peer_gone").is_some() => "ok".to_owned(),
            Some(_) => format!("ok ({})", run.transport("a")),
            None => {
                let ms = |k: &str| run.json[k]["region_latency_ms"]["900"].as_f64();
                match (ms("stun"), ms("https")) {
                    (Some(s), Some(h)) => format!("ok (STUN {s:.1} ms, HTTPS {h:.1} ms)"),
                    _ => "ok".to_owned(),
                }
            }
        }
    } else {
        let err = run.error();
        let short = if err.contains(MULTIPLE_CERTS) {
            MULTIPLE_CERTS.to_owned()
        } else {
            err.chars().take(80).collect()
        };
        let stun_ok = run.json["stun"]["udp"].as_bool() == Some(true);
        if stun_ok {
            format!("FAIL: HTTPS: `{short}` (STUN ok)")
        } else {
            format!("FAIL: `{short}`")
        }
    }
}

#[test]
fn client_server_matrix() {
    // (label, relay, fails for pinned v1.82.x, client args)
    let ca = TestCa::loopback().expect("test CA");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.write_ca(ca_dir.path()).expect("write CA");
    let ca_args = vec![
        "-ca-file".to_owned(),
        ca_file.to_str().expect("utf8").to_owned(),
    ];
    let with_ca = |kind: ServerKind| Relay::with_ca_cert(kind, "900a", &[], &ca).expect("start");
    let servers: Vec<(String, Relay, bool, Vec<String>)> = vec![
        (
            format!("upstream derper {TS_OLD}"),
            upstream(TS_OLD),
            true,
            vec![],
        ),
        (
            format!("upstream derper {TS_NEW}"),
            upstream(TS_NEW),
            true,
            vec![],
        ),
        (
            "kubederp derper (pinned, default)".to_owned(),
            ours(),
            false,
            vec![],
        ),
        (
            "kubederp derper `--metacert on`".to_owned(),
            Relay::ours("900a", OUR_METACERT_FLAGS).expect("start ours with metacert"),
            true,
            vec![],
        ),
        (
            format!("upstream derper {TS_OLD}, CA-issued cert, no pin"),
            with_ca(ServerKind::Upstream(TS_OLD.to_owned())),
            false,
            ca_args.clone(),
        ),
        (
            "kubederp derper, CA-issued cert, no pin".to_owned(),
            with_ca(ServerKind::Ours),
            false,
            ca_args.clone(),
        ),
    ];
    let mut table = String::from(
        "| client | server | default (TLS 1.3) | TLS 1.2 upgrade | WebSocket | PeerGone | netcheck |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for client in CLIENT_VERSIONS {
        for (label, relay, sends_metacert, client_args) in &servers {
            let map = map_for(&[relay]);
            let extra: Vec<&str> = client_args.iter().map(String::as_str).collect();
            let run = |sub: &str, mode: Option<&str>| {
                run_against(client, sub, &map, mode, &extra).expect("run derpinterop")
            };
            let cells = [
                run("exchange", Some("auto")),
                run("exchange", Some("upgrade-tls12")),
                run("exchange", Some("websocket")),
                run("peergone", Some("auto")),
                run("netcheck", None),
            ];
            // What the spec (§2.4, §2.7) predicts: only a v1.82.x client facing a metacert fails.
            let expect_ok = !(client == TS_OLD && *sends_metacert);
            for (i, r) in cells.iter().enumerate() {
                if r.ok() != expect_ok {
                    failures.push(format!("{client} × {label} column {i}: {}", r.json));
                }
                if !expect_ok && !r.error().contains(MULTIPLE_CERTS) {
                    failures.push(format!(
                        "{client} × {label} column {i}: wrong error {}",
                        r.json
                    ));
                }
            }
            let row: Vec<String> = cells.iter().map(cell).collect();
            table.push_str(&format!("| {client} | {label} | {} |\n", row.join(" | ")));
        }
    }
    println!("{table}");
    if let Some(path) = std::env::var_os("KUBEDERP_INTEROP_MATRIX_OUT") {
        std::fs::write(&path, &table).expect("write matrix");
    }
    assert!(
        failures.is_empty(),
        "unexpected cells:\n{}\n\n{table}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// derpMap read-back through the real tailcfg types

fn parsemap(client: &str, format: &str, text: &str, extra: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("map");
    std::fs::write(&file, text).expect("write");
    let lenient = extra.contains(&"-lenient");
    let p = parse_derp_map(client, &file, format, lenient).expect("run parsemap");
    (p.success, p.json.to_string(), p.stderr)
}

#[test]
fn parsemap_reads_derpmap_json_strictly_with_real_tailcfg() {
    let map = json!({
        "Regions": {"900": {"RegionID": 900, "RegionCode": "k", "RegionName": "K", "Nodes": [
            {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1",
             "CertName": "sha256-raw:00", "IPv4": "127.0.0.1", "DERPPort": 8443,
             "STUNPort": 3478, "CanPort80": true}]}},
        "omitDefaultRegions": true
    });
    for client in CLIENT_VERSIONS {
        let (ok, out, err) = parsemap(client, "json", &map.to_string(), &[]);
        assert!(ok, "{client}: {err}");
        let back: Value = serde_json::from_str(&out).expect("JSON out");
        assert_eq!(back, map, "{client}: canonical tailcfg JSON round-trips");

        let mut bad = map.clone();
        bad["Regions"]["900"]["Nodes"][0]["CertNmae"] = json!("typo");
        let (ok, out, _) = parsemap(client, "json", &bad.to_string(), &[]);
        assert!(!ok, "{client}: unknown field must be rejected");
        let v: Value = serde_json::from_str(&out).expect("failure JSON");
        assert!(
            v["error"].as_str().unwrap_or_default().contains("CertNmae"),
            "{v}"
        );
    }
}

#[test]
fn parsemap_reads_headscale_yaml_with_lowercase_keys_like_headscale() {
    let yaml = "\
regions:
  900:
    regionid: 900
    regioncode: k
    regionname: K
    nodes:
      - name: 900a
        regionid: 900
        hostname: 127.0.0.1
        certname: sha256-raw:00
        ipv4: 127.0.0.1
        stunport: 3478
        derpport: 8443
        canport80: true
omitdefaultregions: true
";
    let want = json!({
        "Regions": {"900": {"RegionID": 900, "RegionCode": "k", "RegionName": "K", "Nodes": [
            {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1",
             "CertName": "sha256-raw:00", "IPv4": "127.0.0.1", "DERPPort": 8443,
             "STUNPort": 3478, "CanPort80": true}]}},
        "omitDefaultRegions": true
    });
    for client in CLIENT_VERSIONS {
        let (ok, out, err) = parsemap(client, "headscale-yaml", yaml, &[]);
        assert!(ok, "{client}: {err}");
        let back: Value = serde_json::from_str(&out).expect("JSON out");
        assert_eq!(back, want, "{client}");
        // tailcfg-style capitalised keys are unknown to yaml.v3 (no yaml tags): strict mode
        // rejects them, headscale's lenient load silently drops them.
        let capitalised = yaml.replace("certname", "CertName");
        let (ok, _, _) = parsemap(client, "headscale-yaml", &capitalised, &[]);
        assert!(
            !ok,
            "{client}: capitalised key must be rejected in strict mode"
        );
        let (ok, out, err) = parsemap(client, "headscale-yaml", &capitalised, &["-lenient"]);
        assert!(ok, "{client}: {err}");
        let back: Value = serde_json::from_str(&out).expect("JSON out");
        assert!(
            back["Regions"]["900"]["Nodes"][0].get("CertName").is_none(),
            "{client}: headscale would drop the pin: {back}"
        );
    }
}
