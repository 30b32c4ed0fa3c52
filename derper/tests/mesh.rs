//! Mesh tests (spec §6.10): in-process relays on 127.0.0.1, 127.0.0.2, 127.0.0.3 (…4)
//! with pinned self-signed certificates, meshed through a peers file that lists every node
//! (including itself: self-connects are detected and ignored).

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use derper::client::UpgradeMode;
use derper::client::{Client, ClientError};
use derper::key::{MeshKey, NodePrivateKey, NodePublicKey};
use derper::mesh::{MeshConfig, MeshHandle};
use derper::proto::PeerGoneReason;
use derper::proto::codec::ServerFrame;
use derper::server::ServerOptions;
use derper::testing::{TestServer, TestServerOptions, start};

const T: Duration = Duration::from_secs(10);

struct Node {
    ts: TestServer,
    _mesh: Option<MeshHandle>,
    key: NodePrivateKey,
}

fn mesh_key(b: u8) -> MeshKey {
    MeshKey::from_bytes([b; 32])
}

async fn start_node(
    last_octet: u8,
    mk: &MeshKey,
    port: u16,
    key: Option<NodePrivateKey>,
    cert: Option<(Vec<u8>, Vec<u8>)>,
) -> (TestServer, NodePrivateKey) {
    let key = key.unwrap_or_else(NodePrivateKey::generate);
    let ts = start(TestServerOptions {
        ip: IpAddr::from([127, 0, 0, last_octet]),
        port,
        cert,
        key: Some(key.clone()),
        server: ServerOptions {
            mesh_key: Some(mk.clone()),
            ..Default::default()
        },
        http_port: false,
        admin: false,
        stun: false,
        ..Default::default()
    })
    .await;
    (ts, key)
}

fn peers_line(ts: &TestServer) -> String {
    format!("{} {}\n", ts.addr, ts.pin)
}

fn write_peers(path: &Path, nodes: &[&TestServer]) {
    let mut text = String::from("# host:port sha256-raw:<hex>\n");
    for n in nodes {
        text.push_str(&peers_line(n));
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn mesh(ts: &TestServer, mk: &MeshKey, file: &Path) -> MeshHandle {
    derper::mesh::spawn(
        ts.server(),
        MeshConfig {
            mesh_key: mk.clone(),
            peers: Vec::new(),
            peers_file: Some(file.to_path_buf()),
            poll: Duration::from_millis(100),
        },
    )
}

async fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three meshed nodes on 127.0.0.1..3 sharing one peers file.
async fn three(dir: &Path) -> (Vec<Node>, PathBuf, MeshKey) {
    let mk = mesh_key(0x42);
    let file = dir.join("peers");
    let mut started = Vec::new();
    for i in 1..=3u8 {
        started.push(start_node(i, &mk, 0, None, None).await);
    }
    write_peers(&file, &started.iter().map(|(t, _)| t).collect::<Vec<_>>());
    let nodes: Vec<Node> = started
        .into_iter()
        .map(|(ts, key)| {
            let m = mesh(&ts, &mk, &file);
            Node {
                ts,
                _mesh: Some(m),
                key,
            }
        })
        .collect();
    for n in &nodes {
        wait("mesh up (2 peers each)", || {
            n.ts.metrics().mesh_peers_up.get() == 2
        })
        .await;
    }
    (nodes, file, mk)
}

/// Sends `pkt` from `a` to `dst` every 100 ms until `b` receives it (the mesh learns about
/// new clients asynchronously).
async fn send_until_received(a: &mut Client, b: &mut Client, dst: &NodePublicKey, pkt: &[u8]) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        a.send_packet(dst, pkt).await.unwrap();
        match b.recv_packet(Duration::from_millis(100)).await {
            Ok((src, got)) if src == a.public_key() && got[..] == pkt[..] => return,
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(e) => panic!("receiver failed: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "packet never arrived across the mesh"
        );
    }
}

async fn expect_peer_gone(c: &mut Client, who: NodePublicKey) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await.unwrap() {
            ServerFrame::PeerGone { key, reason } if key == who => {
                assert_eq!(reason, PeerGoneReason::Disconnected);
                return;
            }
            _ => {}
        }
    }
}

fn fwd_out(n: &Node) -> u64 {
    n.ts.metrics().packets_forwarded_out.get()
}

fn fwd_in(n: &Node) -> u64 {
    n.ts.metrics().packets_forwarded_in.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_different_nodes_exchange_and_move_without_loops() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, _file, _mk) = three(dir.path()).await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = nodes[0].ts.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = nodes[1].ts.connect(&kb, UpgradeMode::Plain).await.unwrap();
    send_until_received(&mut a, &mut b, &kb.public(), b"hello from node 1").await;
    send_until_received(&mut b, &mut a, &ka.public(), b"hello from node 2").await;

    // Exactly one hop per packet: forwarded out by node 1 only, in by node 2 only.
    let (o0, o1, o2) = (fwd_out(&nodes[0]), fwd_out(&nodes[1]), fwd_out(&nodes[2]));
    let (i0, i1, i2) = (fwd_in(&nodes[0]), fwd_in(&nodes[1]), fwd_in(&nodes[2]));
    // In windows smaller than the receiver's send queue (32, like upstream): a bigger burst may
    // legitimately drop packets when the receiving client reads slowly (a loaded machine).
    const N: u64 = 200;
    const WINDOW: u64 = 16;
    for start in (0..N).step_by(WINDOW as usize) {
        let end = (start + WINDOW).min(N);
        for i in start..end {
            a.send_packet(&kb.public(), &i.to_be_bytes()).await.unwrap();
        }
        for i in start..end {
            let (src, got) = b.recv_packet(T).await.unwrap();
            assert_eq!(src, ka.public());
            assert_eq!(got[..], i.to_be_bytes());
        }
    }
    wait("forward counters settle", || fwd_in(&nodes[1]) == i1 + N).await;
    assert_eq!(fwd_out(&nodes[0]), o0 + N);
    assert_eq!(fwd_out(&nodes[1]), o1);
    assert_eq!(fwd_out(&nodes[2]), o2);
    assert_eq!(fwd_in(&nodes[0]), i0);
    assert_eq!(fwd_in(&nodes[2]), i2);

    // B leaves node 2: A, which received from B through the mesh, gets PeerGone(B).
    drop(b);
    expect_peer_gone(&mut a, kb.public()).await;

    // B reappears on node 3 and keeps receiving.
    let mut b = nodes[2].ts.connect(&kb, UpgradeMode::Plain).await.unwrap();
    send_until_received(&mut a, &mut b, &kb.public(), b"after the move").await;
    assert_eq!(fwd_out(&nodes[1]), o1, "node 2 must not re-forward");
    assert_eq!(fwd_out(&nodes[2]), o2, "node 3 must not re-forward");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_a_node_heals_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, file, mk) = three(dir.path()).await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = nodes[0].ts.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let b = nodes[1].ts.connect(&kb, UpgradeMode::Plain).await.unwrap();
    drop(b);

    // Kill node 2 (same key, certificate and port when it comes back).
    let old = nodes.remove(1);
    let (port, cert, key) = (
        old.ts.addr.port(),
        (old.ts.cert_der.clone(), old.ts.key_der.clone()),
        old.key.clone(),
    );
    old.ts.shutdown().await;
    drop(old._mesh);
    wait("peers notice node 2 is gone", || {
        nodes
            .iter()
            .all(|n| n.ts.metrics().mesh_peers_up.get() == 1)
    })
    .await;

    let started = tokio::time::Instant::now();
    let (ts, key) = start_node(2, &mk, port, Some(key), Some(cert)).await;
    let m = mesh(&ts, &mk, &file);
    let n2 = Node {
        ts,
        _mesh: Some(m),
        key,
    };
    for n in nodes.iter().chain(std::iter::once(&n2)) {
        wait("mesh healed", || n.ts.metrics().mesh_peers_up.get() == 2).await;
    }
    let healed = started.elapsed();
    assert!(healed < Duration::from_secs(8), "healing took {healed:?}");
    let mut b = n2.ts.connect(&kb, UpgradeMode::Plain).await.unwrap();
    send_until_received(&mut a, &mut b, &kb.public(), b"after restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_node_joins_by_editing_the_peers_file() {
    let dir = tempfile::tempdir().unwrap();
    let (nodes, file, mk) = three(dir.path()).await;
    let connects_before: Vec<u64> = nodes
        .iter()
        .map(|n| n.ts.metrics().mesh_connects.get())
        .collect();
    let (ts4, _k4) = start_node(4, &mk, 0, None, None).await;
    let all: Vec<&TestServer> = nodes
        .iter()
        .map(|n| &n.ts)
        .chain(std::iter::once(&ts4))
        .collect();
    write_peers(&file, &all);
    let _m4 = mesh(&ts4, &mk, &file);
    for ts in &all {
        wait("4-node mesh", || ts.metrics().mesh_peers_up.get() == 3).await;
    }
    // The existing connections were kept (one new connect each, to node 4).
    for (n, before) in nodes.iter().zip(connects_before) {
        assert_eq!(n.ts.metrics().mesh_connects.get(), before + 1);
    }
    let ka = NodePrivateKey::generate();
    let kd = NodePrivateKey::generate();
    let mut a = nodes[0].ts.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut d = ts4.connect(&kd, UpgradeMode::Plain).await.unwrap();
    send_until_received(&mut a, &mut d, &kd.public(), b"to node 4").await;
    send_until_received(&mut d, &mut a, &ka.public(), b"from node 4").await;

    // Removing node 4 from the file drops the connections to it.
    write_peers(&file, &all[..3]);
    for n in &nodes {
        wait("node 4 removed", || n.ts.metrics().mesh_peers_up.get() == 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_mesh_key_is_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("peers");
    let (n1, _) = start_node(1, &mesh_key(1), 0, None, None).await;
    let (n2, _) = start_node(2, &mesh_key(2), 0, None, None).await;
    write_peers(&file, &[&n2]);
    let _m = mesh(&n1, &mesh_key(1), &file);
    wait("client side counts refusals", || {
        n1.metrics().mesh_connect_failures.get() >= 1
    })
    .await;
    wait("server side saw the wrong key", || {
        n2.metrics().mesh_key_mismatches.get() >= 1
            && n2.metrics().disconnects_for("mesh_frame_without_mesh_key") >= 1
    })
    .await;
    assert_eq!(n1.metrics().mesh_peers_up.get(), 0);
    assert_eq!(n2.metrics().watchers.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_peer_from_a_mesh_peer_closes_local_connections() {
    let mk = mesh_key(7);
    let (n1, _) = start_node(1, &mk, 0, None, None).await;
    let kc = NodePrivateKey::generate();
    let mut c = n1.connect(&kc, UpgradeMode::Plain).await.unwrap();
    let mut cfg = n1.client_config(UpgradeMode::Plain);
    cfg.mesh_key = Some(mk.clone());
    let mut peer = Client::connect(&cfg, &NodePrivateKey::generate())
        .await
        .unwrap();
    peer.writer().close_peer(&kc.public()).await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await {
            Ok(_) => {}
            Err(ClientError::Timeout) => panic!("not closed"),
            Err(_) => break,
        }
    }
}
