//! In-process relay tests on 127.0.0.1:0 using the crate's own client.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::time::Duration;

use derper::client::{Client, UpgradeMode};
use derper::key::{MeshKey, NodePrivateKey, NodePublicKey};
use derper::metrics::DropReason;
use derper::proto::codec::{self, ServerFrame};
use derper::proto::{DISCO_MAGIC, PeerGoneReason};
use derper::server::ServerOptions;
use derper::testing::{TestServer, TestServerOptions, start};

const T: Duration = Duration::from_secs(5);

async fn plain_server() -> TestServer {
    start(TestServerOptions {
        tls: false,
        ..Default::default()
    })
    .await
}

fn disco_packet() -> Vec<u8> {
    let mut p = DISCO_MAGIC.to_vec();
    p.resize(80, 7);
    p
}

async fn expect_closed(c: &mut Client) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await {
            Ok(ServerFrame::KeepAlive) | Ok(ServerFrame::PeerGone { .. }) => continue,
            Ok(f) => panic!("expected close, got {f:?}"),
            Err(derper::client::ClientError::Timeout) => panic!("connection not closed"),
            Err(_) => return,
        }
    }
}

async fn exchange(s: &TestServer, mode: UpgradeMode) {
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = s.connect(&ka, mode).await.unwrap();
    let mut b = s.connect(&kb, mode).await.unwrap();
    assert_eq!(a.server_key(), s.server_key);
    assert_eq!(a.server_info().version, 2);
    for size in [0usize, 1, 1400, 65536] {
        let pkt: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        a.send_packet(&kb.public(), &pkt).await.unwrap();
        let (src, got) = b.recv_packet(T).await.unwrap();
        assert_eq!(src, ka.public());
        assert_eq!(&got[..], &pkt[..], "size {size} A->B over {mode:?}");
        b.send_packet(&ka.public(), &pkt).await.unwrap();
        let (src, got) = a.recv_packet(T).await.unwrap();
        assert_eq!(src, kb.public());
        assert_eq!(got.len(), size);
    }
}

#[tokio::test]
async fn packets_flow_both_ways_over_plain_upgrade_tls() {
    let s = start(TestServerOptions::default()).await;
    exchange(&s, UpgradeMode::Plain).await;
}

#[tokio::test]
async fn packets_flow_both_ways_over_fast_start_tls() {
    let s = start(TestServerOptions::default()).await;
    let k = NodePrivateKey::generate();
    let c = s
        .connect(&k, UpgradeMode::FastStart(NodePublicKey::default()))
        .await
        .unwrap();
    assert!(c.used_fast_start());
    exchange(&s, UpgradeMode::FastStart(NodePublicKey::default())).await;
}

#[tokio::test]
async fn packets_flow_both_ways_over_websocket_tls() {
    let s = start(TestServerOptions::default()).await;
    exchange(&s, UpgradeMode::WebSocket).await;
    assert!(s.metrics().websocket_accepts.get() >= 2);
}

#[tokio::test]
async fn auto_mode_without_metacert_uses_plain_upgrade() {
    let s = start(TestServerOptions::default()).await;
    let c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Auto)
        .await
        .unwrap();
    assert!(!c.used_fast_start());
}

#[tokio::test]
async fn auto_mode_with_metacert_uses_fast_start_on_tls13_only() {
    let s = start(TestServerOptions {
        metacert: true,
        ..Default::default()
    })
    .await;
    let mut cfg = s.client_config(UpgradeMode::Auto);
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = Client::connect(&cfg, &ka).await.unwrap();
    assert!(a.used_fast_start(), "TLS 1.3 + metacert => fast start");
    cfg.tls12_only = true;
    let mut b = Client::connect(&cfg, &kb).await.unwrap();
    assert!(!b.used_fast_start(), "TLS 1.2 => plain upgrade");
    a.send_packet(&kb.public(), b"x").await.unwrap();
    assert_eq!(&b.recv_packet(T).await.unwrap().1[..], b"x");
    b.send_packet(&ka.public(), b"y").await.unwrap();
    assert_eq!(&a.recv_packet(T).await.unwrap().1[..], b"y");
}

#[tokio::test]
async fn disco_gets_through_a_saturated_data_queue_and_oldest_are_dropped() {
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            write_timeout: None,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    // B does not read while A sends far more than socket buffers + queue hold.
    let n = 3000u32;
    let mut pkt = vec![0u8; 60_000];
    for i in 0..n {
        pkt[..4].copy_from_slice(&i.to_be_bytes());
        a.writer().queue_packet(&kb.public(), &pkt);
        if i % 16 == 0 {
            a.writer().flush().await.unwrap();
        }
    }
    a.writer().flush().await.unwrap();
    a.send_packet(&kb.public(), &disco_packet()).await.unwrap();
    a.ping(T).await.unwrap(); // all of A's frames were processed by the server
    assert!(s.metrics().dropped(DropReason::QueueHead) > 0);
    // Now B reads: it must see the disco packet and the newest data packet.
    let (mut saw_disco, mut last) = (false, 0u32);
    while !(saw_disco && last == n - 1) {
        let (_, p) = b.recv_packet(T).await.unwrap();
        if p.starts_with(&DISCO_MAGIC) {
            saw_disco = true;
        } else {
            last = u32::from_be_bytes(p[..4].try_into().unwrap());
        }
    }
}

#[tokio::test]
async fn tls12_and_tls13_both_work_with_pin() {
    let s = start(TestServerOptions::default()).await;
    let mut cfg = s.client_config(UpgradeMode::Plain);
    cfg.tls12_only = true;
    Client::connect(&cfg, &NodePrivateKey::generate())
        .await
        .unwrap();
    cfg.tls12_only = false;
    Client::connect(&cfg, &NodePrivateKey::generate())
        .await
        .unwrap();
    // A wrong pin is refused.
    cfg.tls =
        derper::client::TlsMode::Pinned(derper::pin::Pin::parse_hex(&"00".repeat(32)).unwrap());
    assert!(
        Client::connect(&cfg, &NodePrivateKey::generate())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn packets_flow_over_plain_tcp() {
    let s = plain_server().await;
    exchange(&s, UpgradeMode::Plain).await;
    exchange(&s, UpgradeMode::FastStart(NodePublicKey::default())).await;
    exchange(&s, UpgradeMode::WebSocket).await;
    let text = s.metrics_text();
    assert!(text.contains("derper_packets_sent_total"));
    assert!(s.metrics().packets_sent.get() >= 24);
    assert!(s.metrics().packets_received_other.get() >= 24);
}

#[tokio::test]
async fn oversize_packet_disconnects_sender() {
    let s = plain_server().await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let _b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    a.send_packet(&kb.public(), &vec![0u8; 65537])
        .await
        .unwrap();
    expect_closed(&mut a).await;
    s.wait_for("disconnect counted", T, |s| {
        s.metrics().disconnects_for("frame_too_large") == 1
    })
    .await;
}

#[tokio::test]
async fn peer_gone_is_sent_once_when_sender_disconnects() {
    let s = plain_server().await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let (_ar, mut aw) = a.split();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    // A second connection for A: closing one of two must not produce PeerGone.
    let a2 = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    aw.send_packet(&kb.public(), b"hello").await.unwrap();
    b.recv_packet(T).await.unwrap();
    drop(a2);
    s.wait_for("a2 gone", T, |s| {
        s.server().connections_for(&ka.public()) == 1
    })
    .await;
    drop(aw);
    drop(_ar);
    match b.recv_timeout(T).await.unwrap() {
        ServerFrame::PeerGone { key, reason } => {
            assert_eq!(key, ka.public());
            assert_eq!(reason, PeerGoneReason::Disconnected);
        }
        f => panic!("unexpected {f:?}"),
    }
    // Exactly once.
    assert!(b.recv_timeout(Duration::from_millis(300)).await.is_err());
    assert_eq!(s.metrics().peer_gone_disconnected_frames.get(), 1);
}

#[tokio::test]
async fn disco_to_unknown_key_gets_rate_limited_not_here() {
    let s = plain_server().await;
    let mut a = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    let unknown = NodePrivateKey::generate().public();
    // Non-disco to an unknown key: silently dropped.
    a.send_packet(&unknown, b"not disco").await.unwrap();
    for _ in 0..10 {
        a.send_packet(&unknown, &disco_packet()).await.unwrap();
    }
    let mut n = 0;
    while let Ok(f) = a.recv_timeout(Duration::from_millis(300)).await {
        match f {
            ServerFrame::PeerGone { key, reason } => {
                assert_eq!(key, unknown);
                assert_eq!(reason, PeerGoneReason::NotHere);
                n += 1;
            }
            f => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(n, 3, "burst of 3 NotHere");
    assert_eq!(s.metrics().dropped(DropReason::UnknownDest), 11);
}

#[tokio::test]
async fn duplicate_keys_last_writer_is_active() {
    let s = plain_server().await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a1 = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut a2 = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    assert_eq!(s.metrics().current_dup_client_keys.get(), 1);
    assert_eq!(s.metrics().current_dup_client_conns.get(), 2);
    // Newest is active.
    b.send_packet(&ka.public(), b"1").await.unwrap();
    assert_eq!(&a2.recv_packet(T).await.unwrap().1[..], b"1");
    // a1 sends a frame: it becomes active.
    a1.ping(T).await.unwrap();
    b.send_packet(&ka.public(), b"2").await.unwrap();
    assert_eq!(&a1.recv_packet(T).await.unwrap().1[..], b"2");
    // Close the active one: traffic moves to the remaining one.
    drop(a1);
    s.wait_for("a1 gone", T, |s| {
        s.server().connections_for(&ka.public()) == 1
    })
    .await;
    assert_eq!(s.metrics().current_dup_client_keys.get(), 0);
    b.send_packet(&ka.public(), b"3").await.unwrap();
    assert_eq!(&a2.recv_packet(T).await.unwrap().1[..], b"3");
    assert_eq!(s.metrics().total_dup_client_conns.get(), 1);
}

#[tokio::test]
async fn ping_pong_edge_sizes() {
    let s = plain_server().await;
    let mut c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    c.ping(T).await.unwrap();
    let mut payload = vec![9u8; 1000];
    payload[..8].copy_from_slice(b"ABCDEFGH");
    let mut raw = bytes::BytesMut::new();
    codec::write_raw_frame(&mut raw, 0x12, &payload);
    c.writer().send_raw(&raw).await.unwrap();
    assert_eq!(
        c.recv_timeout(T).await.unwrap(),
        ServerFrame::Pong(*b"ABCDEFGH")
    );
    for bad in [7usize, 1001] {
        let mut c = s
            .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
            .await
            .unwrap();
        let mut raw = bytes::BytesMut::new();
        codec::write_raw_frame(&mut raw, 0x12, &vec![1u8; bad]);
        c.writer().send_raw(&raw).await.unwrap();
        expect_closed(&mut c).await;
    }
    assert!(s.metrics().got_ping.get() >= 2);
    assert!(s.metrics().sent_pong.get() >= 2);
}

#[tokio::test]
async fn note_preferred_sets_gauge_and_bad_length_disconnects() {
    let s = plain_server().await;
    let mut c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    c.writer().note_preferred(true).await.unwrap();
    s.wait_for("home gauge", T, |s| {
        s.metrics().current_home_connections.get() == 1
    })
    .await;
    let mut raw = bytes::BytesMut::new();
    codec::write_raw_frame(&mut raw, 0x07, &[1, 1]);
    c.writer().send_raw(&raw).await.unwrap();
    expect_closed(&mut c).await;
    s.wait_for("home gauge back", T, |s| {
        s.metrics().current_home_connections.get() == 0
    })
    .await;
}

#[tokio::test]
async fn unknown_frame_types_are_skipped() {
    let s = plain_server().await;
    let mut c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    let mut raw = bytes::BytesMut::new();
    codec::write_raw_frame(&mut raw, 0x13, &[0; 8]);
    codec::write_raw_frame(&mut raw, 0x20, &vec![5u8; 300_000]);
    codec::write_raw_frame(&mut raw, 0xff, &[]);
    codec::write_raw_frame(&mut raw, 0x06, &[1, 2, 3]);
    c.writer().send_raw(&raw).await.unwrap();
    c.ping(T).await.unwrap();
    assert_eq!(s.metrics().unknown_frames.get(), 4);
}

#[tokio::test]
async fn non_mesh_client_sending_mesh_frames_is_disconnected() {
    let s = plain_server().await;
    for typ in [0x10u8, 0x11, 0x0a] {
        let mut c = s
            .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
            .await
            .unwrap();
        let payload = match typ {
            0x10 => vec![],
            0x11 => vec![1u8; 32],
            _ => vec![1u8; 70],
        };
        let mut raw = bytes::BytesMut::new();
        codec::write_raw_frame(&mut raw, typ, &payload);
        c.writer().send_raw(&raw).await.unwrap();
        expect_closed(&mut c).await;
    }
    s.wait_for("disconnects", T, |s| {
        s.metrics().disconnects_for("mesh_frame_without_mesh_key") == 3
    })
    .await;
}

#[tokio::test]
async fn mesh_watcher_sees_present_and_gone_and_can_forward() {
    let mesh = MeshKey::from_bytes([7u8; 32]);
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            mesh_key: Some(mesh.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let ka = NodePrivateKey::generate();
    let a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut cfg = s.client_config(UpgradeMode::Plain);
    cfg.mesh_key = Some(mesh);
    let km = NodePrivateKey::generate();
    let mut w = Client::connect(&cfg, &km).await.unwrap();
    w.writer().watch_conns().await.unwrap();
    let mut present = std::collections::HashSet::new();
    while present.len() < 2 {
        match w.recv_timeout(T).await.unwrap() {
            ServerFrame::PeerPresent { key, addr, flags } => {
                assert!(addr.is_some());
                if key == km.public() {
                    assert_eq!(flags & 0x02, 0x02);
                } else {
                    assert_eq!(flags, 0x01);
                }
                present.insert(key);
            }
            f => panic!("unexpected {f:?}"),
        }
    }
    assert!(present.contains(&ka.public()));
    // Forward a packet from a remote key to A.
    let (mut ar, aw) = a.split();
    let remote = NodePrivateKey::generate().public();
    w.writer()
        .forward_packet(&remote, &ka.public(), b"fwd")
        .await
        .unwrap();
    match ar.recv_timeout(T).await.unwrap() {
        ServerFrame::RecvPacket { src, packet } => {
            assert_eq!(src, remote);
            assert_eq!(&packet[..], b"fwd");
        }
        f => panic!("unexpected {f:?}"),
    }
    drop(ar);
    drop(aw);
    loop {
        match w.recv_timeout(T).await.unwrap() {
            ServerFrame::PeerGone { key, reason } if key == ka.public() => {
                assert_eq!(reason, PeerGoneReason::Disconnected);
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(s.metrics().watchers.get(), 1);
    // ClosePeer from the mesh peer closes all of that key's connections.
    let kc = NodePrivateKey::generate();
    let mut c = s.connect(&kc, UpgradeMode::Plain).await.unwrap();
    w.writer().close_peer(&kc.public()).await.unwrap();
    expect_closed(&mut c).await;
}

#[tokio::test]
async fn client_that_never_sends_client_info_times_out() {
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            client_info_timeout: Duration::from_millis(300),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut v = Vec::new();
    tokio::time::timeout(T, tcp.read_to_end(&mut v))
        .await
        .expect("server closes the connection")
        .unwrap();
    assert!(v.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert_eq!(s.metrics().handshake_failures("timeout"), 1);
    assert_eq!(s.metrics().current_connections.get(), 0);
}

#[tokio::test]
async fn slow_reader_is_disconnected_without_stalling_others() {
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            write_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let kc = NodePrivateKey::generate();
    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    let mut c = s.connect(&kc, UpgradeMode::Plain).await.unwrap();
    // B sends once to A so A will get PeerGone(B) when B is dropped by the server.
    b.send_packet(&ka.public(), b"hi").await.unwrap();
    a.recv_packet(T).await.unwrap();
    // B never reads again. A floods B until the server gives up on B.
    let (mut ar, mut aw) = a.split();
    let pkt = vec![0u8; 65536];
    let bkey = kb.public();
    let flood = tokio::spawn(async move {
        for _ in 0..20_000 {
            if aw.send_packet(&bkey, &pkt).await.is_err() {
                break;
            }
        }
        aw
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ar
            .recv_timeout(deadline - tokio::time::Instant::now())
            .await
            .unwrap()
        {
            ServerFrame::PeerGone { key, .. } if key == kb.public() => break,
            _ => {}
        }
    }
    flood.abort();
    // C was unaffected all along.
    c.ping(T).await.unwrap();
    assert!(s.metrics().sclient_write_timeouts.get() >= 1);
    assert!(s.metrics().disconnects_for("write_timeout") >= 1);
    drop(b);
}

#[tokio::test]
async fn restarting_frame_on_graceful_shutdown() {
    let s = plain_server().await;
    let mut c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    let stop = tokio::spawn(s.shutdown());
    loop {
        match c.recv_timeout(T).await {
            Ok(ServerFrame::Restarting { .. }) => break,
            Ok(_) => continue,
            Err(e) => panic!("no Restarting frame: {e}"),
        }
    }
    stop.await.unwrap();
}

#[tokio::test]
async fn health_frames_reach_every_connection_of_a_key() {
    let s = plain_server().await;
    let k = NodePrivateKey::generate();
    let mut c1 = s.connect(&k, UpgradeMode::Plain).await.unwrap();
    let mut c2 = s.connect(&k, UpgradeMode::Plain).await.unwrap();
    s.server().send_health(&k.public(), "duplicate connection");
    for c in [&mut c1, &mut c2] {
        assert_eq!(
            c.recv_timeout(T).await.unwrap(),
            ServerFrame::Health("duplicate connection".into())
        );
    }
    s.server().send_health(&k.public(), "");
    assert_eq!(
        c1.recv_timeout(T).await.unwrap(),
        ServerFrame::Health(String::new())
    );
}

#[tokio::test]
async fn client_verifies_against_supplied_roots() {
    let s = start(TestServerOptions::default()).await;
    let mut cfg = s.client_config(UpgradeMode::Plain);
    // The self-signed leaf is its own trust anchor; it has an IP SAN for 127.0.0.1.
    cfg.tls = derper::client::TlsMode::Roots(vec![s.cert_der.clone().into()]);
    Client::connect(&cfg, &NodePrivateKey::generate())
        .await
        .unwrap();
    // Unrelated roots: refused.
    let (other, _) = derper::testing::self_signed_localhost();
    cfg.tls = derper::client::TlsMode::Roots(vec![other.into()]);
    assert!(
        Client::connect(&cfg, &NodePrivateKey::generate())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn truncated_frame_then_eof_is_counted() {
    let s = plain_server().await;
    let mut c = s
        .connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
    let mut raw = bytes::BytesMut::new();
    codec::write_send_packet(&mut raw, &NodePublicKey::from_bytes([1; 32]), &[0u8; 100]);
    raw.truncate(60);
    c.writer().send_raw(&raw).await.unwrap();
    c.writer().close().await.unwrap();
    s.wait_for("truncated frame counted", T, |s| {
        s.metrics().disconnects_for("truncated_frame") == 1
    })
    .await;
    assert_eq!(s.metrics().current_connections.get(), 0);
}

#[tokio::test]
async fn key_update_flood_before_client_info_is_cut_off_and_counted() {
    // An unauthenticated client past the upgrade asks for 10,000 TLS 1.3 KeyUpdates and
    // reads nothing: the record layer ends the connection at its limit and the metric
    // names it.
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(TestServerOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let cfg = derper::bench::insecure_client_config(
        rustls::crypto::ring::default_provider(),
        &[&rustls::version::TLS13],
    );
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    for _ in 0..10_000 {
        tls.get_mut().1.refresh_traffic_keys().unwrap();
    }
    // The relay hangs up part-way; the write may then fail.
    let _ = tls.flush().await;
    s.wait_for("KeyUpdate flood counted", T, |s| {
        s.metrics().handshake_failures("tls_key_update_limit") == 1
    })
    .await;
}

/// Sends the DERP upgrade and a ClientInfo "from" `key`, sealed so that it opens with the
/// all-zero shared secret (what X25519 with a small-order key gives, whatever the server's
/// private key), and returns every frame type the server sent before closing.
async fn forged_client_info(s: &TestServer, key: [u8; 32]) -> Vec<u8> {
    use crypto_box::aead::Aead as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // X25519(any secret, small-order point) = 0 = X25519(server secret, same point).
    let b = crypto_box::SalsaBox::new(
        &crypto_box::PublicKey::from_bytes(key),
        &crypto_box::SecretKey::from_bytes([0x42; 32]),
    );
    let nonce = [7u8; 24];
    let sealed = b
        .encrypt(
            crypto_box::Nonce::from_slice(&nonce),
            &b"{\"version\":2}"[..],
        )
        .unwrap();
    let mut payload = key.to_vec();
    payload.extend_from_slice(&nonce);
    payload.extend_from_slice(&sealed);
    let mut out = bytes::BytesMut::new();
    out.extend_from_slice(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n");
    codec::write_raw_frame(
        &mut out,
        derper::proto::FrameType::ClientInfo as u8,
        &payload,
    );
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut v = Vec::new();
    // The server closes a refused connection; an admitted one stays open.
    let _ = tokio::time::timeout(T, tcp.read_to_end(&mut v)).await;
    let head_end = v.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut frames = Vec::new();
    let mut rest = &v[head_end..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        frames.push(rest[0]);
        rest = &rest[(5 + len).min(rest.len())..];
    }
    frames
}

#[tokio::test]
async fn small_order_client_keys_are_refused() {
    let s = plain_server().await;
    let mut one = [0u8; 32];
    one[0] = 1;
    let mut order8 = [0u8; 32];
    hex::decode_to_slice(
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        &mut order8,
    )
    .unwrap();
    let mut p_plus_1 = [0xffu8; 32];
    p_plus_1[0] = 0xee;
    p_plus_1[31] = 0x7f;
    let mut one_top_bit = one;
    one_top_bit[31] = 0x80;
    let keys = [one, order8, p_plus_1, one_top_bit];
    for k in keys {
        let frames = forged_client_info(&s, k).await;
        // ServerKey only: no ServerInfo, the connection is closed.
        assert_eq!(
            frames,
            [derper::proto::FrameType::ServerKey as u8],
            "{}",
            hex::encode(k)
        );
    }
    assert_eq!(
        s.metrics().handshake_failures("small_order_key"),
        keys.len() as u64
    );
    assert_eq!(s.metrics().current_connections.get(), 0);
}
