//! The `derper` binary from the command line, like upstream:
//! `derper --hostname 127.0.0.1 --certmode manual --certdir D -a 127.0.0.1:0 ...`.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use derper::client::{Client, ClientConfig, TlsMode, UpgradeMode};
use derper::key::NodePrivateKey;
use derper::proto::codec::ServerFrame;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_derper");

struct Started {
    child: Child,
    main: SocketAddr,
    stun: SocketAddr,
    admin: SocketAddr,
    node_json: serde_json::Value,
    server_key: String,
}

fn addr_of(line: &str) -> SocketAddr {
    line.split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn start(dir: &std::path::Path) -> Started {
    let mut child = Command::new(BIN)
        .args([
            "--hostname",
            "127.0.0.1",
            "--certmode",
            "manual",
            "--certdir",
        ])
        .arg(dir)
        .args([
            "-a",
            "127.0.0.1:0",
            "--http-port",
            "0",
            "--stun-port",
            "0",
            "--admin-addr",
            "127.0.0.1:0",
            "-c",
        ])
        .arg(dir.join("derper.key"))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut main, mut stun, mut admin, mut json, mut key) = (None, None, None, None, None);
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("listening on") && l.contains("listener=\"main\"") {
                main = Some(addr_of(&l));
            } else if l.contains("listening on") && l.contains("listener=\"stun\"") {
                stun = Some(addr_of(&l));
            } else if l.contains("listening on") && l.contains("listener=\"admin\"") {
                admin = Some(addr_of(&l));
            } else if l.starts_with("  {\"Name\":\"custom\"") {
                json = Some(serde_json::from_str::<serde_json::Value>(l.trim()).unwrap());
            } else if let Some(k) = l.split("server_key=").nth(1) {
                key = Some(k.trim().to_owned());
            }
            if main.is_some() && stun.is_some() && admin.is_some() && json.is_some() {
                break;
            }
        }
    })
    .await
    .expect("derper printed its addresses and DERPNode line");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Started {
        child,
        main: main.unwrap(),
        stun: stun.unwrap(),
        admin: admin.unwrap(),
        node_json: json.unwrap(),
        server_key: key.unwrap(),
    }
}

fn sigterm(child: &Child) {
    let pid = child.id().unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_pinned_tls_stun_and_restarts_with_the_same_identity() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let pin = s.node_json["CertName"].as_str().unwrap().to_owned();
    assert!(pin.starts_with("sha256-raw:"));
    assert_eq!(s.node_json["HostName"], "127.0.0.1");
    assert_eq!(s.node_json["RegionID"], 900);
    assert!(dir.path().join("127.0.0.1.crt").exists());

    let mut cfg = ClientConfig::new(s.main);
    cfg.tls = TlsMode::Pinned(pin.parse().unwrap());
    cfg.upgrade = UpgradeMode::Auto;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = Client::connect(&cfg, &ka).await.unwrap();
    let mut b = Client::connect(&cfg, &kb).await.unwrap();
    // Logged in the short form only (house-style §4.3).
    assert_eq!(a.server_key().short().to_string(), s.server_key);
    a.send_packet(&kb.public(), b"via the binary")
        .await
        .unwrap();
    let (src, pkt) = b.recv_packet(Duration::from_secs(5)).await.unwrap();
    assert_eq!(src, ka.public());
    assert_eq!(&pkt[..], b"via the binary");

    // STUN (spec §7.3 request vector).
    let req = hex::decode(
        "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f",
    )
    .unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&req, s.stun).await.unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 32);
    assert_eq!(&buf[8..20], &req[8..20]);

    // Admin metrics.
    let mut tcp = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    assert!(body.contains("derper_current_connections 2"), "{body}");
    assert!(body.contains("stun"), "{body}");

    // Graceful shutdown: clients are told the server is restarting; exit status 0.
    let mut child = s.child;
    sigterm(&child);
    loop {
        match a.recv_timeout(Duration::from_secs(5)).await.unwrap() {
            ServerFrame::Restarting { .. } => break,
            _ => continue,
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");

    // Restart with the same directory: same server key, same certificate pin.
    let s2 = start(dir.path()).await;
    assert_eq!(s2.server_key, s.server_key);
    assert_eq!(s2.node_json["CertName"].as_str().unwrap(), pin);
    let mut child = s2.child;
    sigterm(&child);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

#[tokio::test]
async fn binary_rejects_unsupported_and_invalid_flags_clearly() {
    for (args, want) in [
        (
            vec![
                "-a",
                "127.0.0.1:0",
                "-c",
                "/tmp/k",
                "--verify-client-url",
                "ftp://x",
            ],
            "want an http:// or https:// URL",
        ),
        (
            vec![
                "-a",
                "127.0.0.1:0",
                "-c",
                "/tmp/k",
                "--secrets-url",
                "http://x",
            ],
            "not supported yet",
        ),
        (
            vec!["-a", "127.0.0.1:0", "-c", "/tmp/k", "--mesh-with", "a"],
            "--mesh-with requires --mesh-psk-file",
        ),
        (vec!["-a", "nonsense", "-c", "/tmp/k"], "invalid --addr"),
        // upstream flags kubederp lacks, and Go flag syntax errors, before anything starts
        (
            vec!["-a", "127.0.0.1:0", "-secrets-cache-dir=/x"],
            "upstream flag -secrets-cache-dir is not supported by kubederp derper (yet)",
        ),
        (
            vec!["-dev", "false", "-a", "127.0.0.1:0"],
            "unexpected argument \"false\"",
        ),
        (
            vec!["-a", "127.0.0.1:0", "-verify-clients=yes"],
            "invalid boolean value \"yes\" for -verify-clients",
        ),
    ] {
        // Bounded: a flag that is wrongly accepted starts a server that never exits.
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new(BIN).args(&args).output(),
        )
        .await
        .unwrap_or_else(|_| panic!("{args:?} was accepted: derper did not exit"))
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Go spellings of booleans (issue 17 §6: `-verify-clients=false`, `-dev=false` were
    // refused); -version makes the binary exit once the whole command line parsed.
    for args in [
        &["--version"][..],
        &["-version"],
        &[
            "-dev=false",
            "-verify-clients=false",
            "-verify-clients=true",
            "-version",
        ],
        &[
            "-stun=F",
            "--derp=0",
            "-acme-ip-certs=FALSE",
            "-ace=f",
            "-version=1",
        ],
    ] {
        let out = Command::new(BIN).args(args).output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with("derper "),
            "{args:?}"
        );
    }
}
