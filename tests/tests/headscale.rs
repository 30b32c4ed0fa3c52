//! headscale end to end (issue 17 §3): the user story of a self-hosted tailnet whose DERP
//! region is ours.
//!
//! Real components only: the local stack (real kube-apiserver, the `derp-operator` binary,
//! relays run by the node agent on 127.0.x.y), headscale v0.29.2 built from the Go module
//! proxy ([`derp_tests::headscale`]), and two real `tailscaled` v1.104.7 in userspace
//! networking ([`derp_tests::tailnet`], whose isolation they keep: loopback only, no log
//! upload, every other URL proxied to a trap that must count nothing).
//!
//! headscale takes its DERP map either from the operator's merged `/derpmap.json`
//! (`derp.urls`) or from the ConfigMap's `headscale.yaml` written to a file (`derp.paths`),
//! with its embedded DERP off; the nodes must use our region because direct UDP paths are
//! disabled (`TS_DEBUG_ALWAYS_USE_DERP`, `TS_DEBUG_NEVER_DIRECT_UDP`).

#![allow(
    clippy::unwrap_used,
    reason = "helpers of the tests below: a failed unwrap fails the test, as in the tests"
)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use derp_tests::headscale::{DerpSource, Headscale, headscale_bin, http};
use derp_tests::interop::Relay;
use derp_tests::k8s::workspace_root;
use derp_tests::stack::{LocalStack, StackOptions};
use derp_tests::tailnet::{JoinOptions, Node, Tailnet};
use derper::client::{Client, ClientConfig, TlsMode};
use derper::key::NodePrivateKey;
use kube::api::{Patch, PatchParams};
use serde_json::Value;

const REGION: &str = "home";
const REGION_ID: u64 = 900;
const CONFIG_MAP: &str = "home-derpmap";
const READY: Duration = Duration::from_secs(120);

#[allow(clippy::disallowed_methods)] // plain polling on a blocking section, no runtime here
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// The local stack with region `home` (deploy/examples/derpregion-three-nodes.yaml) Ready on
/// `count` nodes of 127.0.`subnet`.x.
async fn region(prefix: &str, subnet: u8, count: u8, dir: &std::path::Path) -> LocalStack {
    let stack = LocalStack::start(StackOptions::nodes(
        prefix,
        subnet,
        count,
        dir.join("stack"),
    ))
    .await
    .expect("start the local stack");
    stack
        .apply_file(&workspace_root().join("deploy/examples/derpregion-three-nodes.yaml"))
        .unwrap();
    stack.wait_region_ready(REGION, READY).await.unwrap();
    stack
}

/// Nodes join `hs` with a pre-auth key; direct UDP is off so every packet goes via DERP.
fn join(hs: &Headscale) -> JoinOptions {
    JoinOptions {
        login_server: Some(hs.url.clone()),
        auth_key: Some(hs.preauth_key("kubederp").expect("pre-auth key")),
        env: vec![("TS_DEBUG_ALWAYS_USE_DERP".into(), "true".into())],
        loopback_dns: true,
    }
}

fn ipv4(node: &Node) -> String {
    let st = node.status().unwrap();
    st["Self"]["TailscaleIPs"]
        .as_array()
        .and_then(|ips| {
            ips.iter()
                .filter_map(Value::as_str)
                .find(|ip| ip.parse::<Ipv4Addr>().is_ok())
        })
        .unwrap_or_else(|| panic!("{} has no tailnet IPv4: {st}", node.name))
        .to_owned()
}

/// Asserts that nothing left the machine: the trap counted no request and no node fell back
/// to Tailscale's built-in DERP map or captive-portal checks.
fn assert_nothing_left_the_machine(tailnet: &Tailnet) {
    assert_eq!(
        tailnet.traffic_trapped().unwrap(),
        0,
        "a node tried a non-loopback URL; control log:\n{}",
        tailnet.control_log()
    );
    for node in &tailnet.nodes {
        let log = node.log();
        for bad in ["dnsfallback", "captivedetection", "traffic-trap"] {
            assert!(
                !log.contains(bad),
                "{} log mentions {bad}:\n{log}",
                node.name
            );
        }
    }
}

/// Every node has our region as home DERP (`status` → `Self.Relay`), a `tailscale ping`
/// goes through it, a TCP exchange between the nodes works, and `tailscale netcheck` picks
/// it.
fn assert_tailnet_uses_our_region(tailnet: &Tailnet) {
    let (a, b) = (&tailnet.nodes[0], &tailnet.nodes[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in [a, b] {
        loop {
            let st = node.status().unwrap();
            if st["Self"]["Relay"].as_str() == Some(REGION) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: home DERP is not {REGION}: {}\nlog:\n{}",
                node.name,
                st["Self"],
                node.log()
            );
            pause(Duration::from_millis(200));
        }
    }

    let b_ip = ipv4(b);
    let out = a
        .cli(&[
            "ping",
            "--until-direct=false",
            "--c=3",
            "--timeout=10s",
            &b_ip,
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("tailscale ping {b_ip}:\n{text}");
    assert!(
        out.status.success() && text.contains(&format!("via DERP({REGION})")),
        "ping {} -> {} not via DERP({REGION}): {text}{}",
        a.name,
        b.name,
        String::from_utf8_lossy(&out.stderr)
    );

    tcp_exchange(a, &b_ip);

    // netcheck runs in the CLI process: no port mapping probes, and any outside URL would
    // hit the trap (counted by assert_nothing_left_the_machine).
    let out = a
        .command()
        .args(["netcheck", "--format=json"])
        .env("TS_DISABLE_PORTMAPPER", "1")
        .env("HTTP_PROXY", &tailnet.control_url)
        .env("HTTPS_PROXY", &tailnet.control_url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "netcheck JSON: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["PreferredDERP"], REGION_ID, "netcheck: {report}");
}

/// `a` connects (`tailscale nc`) to `b_ip:PORT`; tailscaled on b (userspace networking)
/// forwards it to 127.0.0.1:PORT, where this test answers; the reply comes back.
fn tcp_exchange(a: &Node, b_ip: &str) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        s.write_all(format!("reply to {line}").as_bytes()).unwrap();
    });
    let mut child = a
        .command()
        .args(["nc", b_ip, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello over our region\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"\n") {
                break;
            }
        }
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(Duration::from_secs(30));
    drop(stdin);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let got = got.unwrap_or_else(|_| {
        panic!(
            "no reply through tailscale nc within 30 s: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        String::from_utf8_lossy(&got),
        "reply to hello over our region\n"
    );
    server.join().unwrap();
}

/// `tailscale debug derp 900` on `node`: JSON {Info, Warnings, Errors}. Errors about IPv4
/// must be absent (the relays have IPv4 only); what it says about IPv6 is returned.
fn debug_derp(node: &Node) -> Value {
    let out = node
        .cli(&["debug", "derp", &REGION_ID.to_string()])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("tailscale debug derp {REGION_ID}:\n{text}");
    assert!(out.status.success(), "debug derp failed: {text}{:?}", out);
    serde_json::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headscale_with_operator_derpmap_url_routes_tailnet_through_our_region() {
    headscale_bin(); // fail now, not after the stack is up, when headscale is missing
    let tmp = tempfile::tempdir().unwrap();
    let stack = region("hs-u", 8, 1, tmp.path()).await;
    let map_url = format!("http://{}/derpmap.json", stack.operator_admin);
    let (code, body) = http(
        &format!("http://{}", stack.operator_admin),
        "GET",
        "/derpmap.json",
        "",
    )
    .expect("operator /derpmap.json");
    assert_eq!(code, 200, "{body}");
    eprintln!("operator /derpmap.json:\n{body}");

    let t0 = Instant::now();
    let (tailnet, hs, report) = tokio::task::block_in_place(|| {
        let hs = Headscale::start(&DerpSource::Urls(
            vec![map_url.clone()],
            Duration::from_secs(10),
        ))
        .expect("headscale up");
        let tailnet = Tailnet::start_with(&["alpha", "beta"], &join(&hs)).expect("tailnet up");
        eprintln!("headscale + tailnet up in {:?}", t0.elapsed());
        assert_tailnet_uses_our_region(&tailnet);
        let report = debug_derp(&tailnet.nodes[0]);
        (tailnet, hs, report)
    });
    let errors: Vec<&str> = report["Errors"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // The relays have IPv4 only: no IPv4 error; the one IPv6 error is the dial of the
    // map's `"IPv6": "none"` as a host name (see the README's headscale section).
    assert!(
        !errors.is_empty()
            && errors
                .iter()
                .all(|e| e.contains("over IPv6") && e.contains("\"none:443\"")),
        "debug derp: unexpected errors: {report}"
    );
    assert!(
        report["Info"].as_array().is_some_and(|i| i
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("IPv4 STUN response")))),
        "debug derp: no IPv4 STUN answer from our relay: {report}"
    );

    // derp.urls is polled every update_frequency (10 s here): a change the operator publishes
    // reaches the nodes through headscale without restarting anything.
    let regions = stack.regions().await;
    regions
        .patch(
            REGION,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"regionCode": "moved"}})),
        )
        .await
        .unwrap();
    let t1 = Instant::now();
    tokio::task::block_in_place(|| {
        let node = &tailnet.nodes[0];
        loop {
            let st = node.status().unwrap();
            if st["Self"]["Relay"].as_str() == Some("moved") {
                break;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(60),
                "the new region code did not reach {} via headscale: {}\nheadscale log:\n{}",
                node.name,
                st["Self"],
                hs.log()
            );
            pause(Duration::from_millis(250));
        }
    });
    eprintln!("operator map change reached the node in {:?}", t1.elapsed());
    assert_nothing_left_the_machine(&tailnet);
    drop(tailnet);
    drop(hs);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headscale_with_configmap_derp_path_routes_tailnet_and_verify_url_admits_its_nodes() {
    headscale_bin(); // fail now, not after the stack is up, when headscale is missing
    let tmp = tempfile::tempdir().unwrap();
    let stack = region("hs-p", 9, 1, tmp.path()).await;
    let data = stack
        .config_map(CONFIG_MAP)
        .await
        .expect("derpMap ConfigMap");
    let yaml = data.get("headscale.yaml").expect("headscale.yaml key");
    let path: PathBuf = tmp.path().join("headscale-derp.yaml");
    std::fs::write(&path, yaml).unwrap();

    tokio::task::block_in_place(|| {
        let hs = Headscale::start(&DerpSource::Paths(vec![path])).expect("headscale up");
        let tailnet = Tailnet::start_with(&["gamma", "delta"], &join(&hs)).expect("tailnet up");
        assert_tailnet_uses_our_region(&tailnet);

        // headscale's /verify answers for its own nodes only.
        let member = &tailnet.nodes[0];
        let stranger = NodePrivateKey::generate();
        for (key, want) in [
            (member.node_key.to_nodekey_string(), true),
            (stranger.public().to_nodekey_string(), false),
        ] {
            let body = format!(r#"{{"NodePublic":"{key}","Source":"127.0.0.1"}}"#);
            let (code, resp) = hs.post_json("/verify", &body).unwrap();
            assert_eq!(code, 200, "/verify {key}: {resp}");
            let v: Value = serde_json::from_str(&resp).unwrap();
            assert_eq!(v["Allow"], want, "/verify {key}: {resp}");
        }

        // A relay admitting clients through headscale's /verify.
        let verify_url = format!("{}/verify", hs.url);
        let relay = Relay::ours("hs-verify", &["--verify-client-url", &verify_url])
            .expect("relay with --verify-client-url");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let connect = |key: &NodePrivateKey| -> Result<(), String> {
            let mut cfg =
                ClientConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, relay.derp_port)));
            cfg.tls = TlsMode::Pinned(relay.cert_name.parse().map_err(|e| format!("{e}"))?);
            cfg.connect_timeout = Duration::from_secs(10);
            rt.block_on(async {
                let mut c = Client::connect(&cfg, key)
                    .await
                    .map_err(|e| e.to_string())?;
                c.ping(Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            })
        };
        let member_key = member.private_key().expect("member's private key");
        connect(&member_key)
            .unwrap_or_else(|e| panic!("headscale node refused: {e}\nrelay log:\n{}", relay.log()));
        let err = connect(&stranger).expect_err("a stranger must be refused");
        eprintln!("stranger refused: {err}");
        // Refused on headscale's answer (the relay fails open when the URL is unreachable).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !relay.log().contains("Allow=false") {
            assert!(
                Instant::now() < deadline,
                "relay did not log headscale's denial:\n{}",
                relay.log()
            );
            pause(Duration::from_millis(50));
        }
        assert_nothing_left_the_machine(&tailnet);
    });
    stack.shutdown().await;
}
