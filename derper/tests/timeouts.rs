//! Paused-time tests of keepalive and the write timeout, on in-memory duplex pipes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use std::sync::Arc;

use bytes::BytesMut;
use derper::client::{Client, ClientConfig, UpgradeMode};
use derper::http::{HttpOptions, ListenerKind};
use derper::key::NodePrivateKey;
use derper::metrics::Metrics;
use derper::proto::codec::ServerFrame;
use derper::server::{ConnInfo, Server, ServerOptions};
use tokio::time::Instant;

fn server(opts: ServerOptions) -> Server {
    Server::new(NodePrivateKey::generate(), opts, Metrics::unregistered())
}

/// Connects a client over a duplex pipe with `buf` bytes of buffering.
async fn connect(s: &Server, key: &NodePrivateKey, buf: usize) -> Client {
    let (a, b) = tokio::io::duplex(buf);
    let s2 = s.clone();
    tokio::spawn(async move {
        derper::http::serve_connection(
            s2,
            Arc::new(HttpOptions::default()),
            b,
            None,
            ListenerKind::Main,
        )
        .await;
    });
    let cfg = ClientConfig::new("127.0.0.1:1".parse().unwrap());
    Client::connect_stream(a, &cfg, key).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn keepalive_every_60_to_65_seconds() {
    let s = server(ServerOptions::default());
    let mut c = connect(&s, &NodePrivateKey::generate(), 64 * 1024).await;
    let start = Instant::now();
    let f = c.recv_timeout(Duration::from_secs(70)).await.unwrap();
    assert_eq!(f, ServerFrame::KeepAlive);
    let first = start.elapsed();
    assert!(
        first >= Duration::from_secs(60) && first <= Duration::from_secs(65),
        "{first:?}"
    );
    let f = c.recv_timeout(Duration::from_secs(70)).await.unwrap();
    assert_eq!(f, ServerFrame::KeepAlive);
    let second = start.elapsed() - first;
    assert!(
        second >= Duration::from_secs(60) && second <= Duration::from_secs(65),
        "{second:?}"
    );
    assert_eq!(s.metrics().keepalives_sent.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn non_reading_client_is_dropped_after_write_timeout() {
    let s = server(ServerOptions::default());
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = connect(&s, &ka, 1 << 20).await;
    // B's pipe holds only 4 KiB and B never reads.
    let _b = connect(&s, &kb, 4096).await;
    let start = Instant::now();
    for _ in 0..40 {
        a.send_packet(&kb.public(), &[0u8; 1000]).await.unwrap();
    }
    while s.connections_for(&kb.public()) > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "B not dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(s.metrics().sclient_write_timeouts.get(), 1);
    assert_eq!(s.metrics().disconnects_for("write_timeout"), 1);
    // A is unaffected.
    a.ping(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn handshake_deadline_applies_to_silent_clients() {
    let s = server(ServerOptions::default());
    let (a, b) = tokio::io::duplex(4096);
    let s2 = s.clone();
    let h = tokio::spawn(async move {
        s2.handle_derp(b, BytesMut::new(), ConnInfo::default())
            .await;
    });
    let start = Instant::now();
    h.await.unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );
    assert_eq!(s.metrics().handshake_failures("timeout"), 1);
    drop(a);
}

#[tokio::test(start_paused = true)]
async fn ping_is_answered_and_upgrade_mode_is_irrelevant_on_duplex() {
    let s = server(ServerOptions::default());
    let mut c = connect(&s, &NodePrivateKey::generate(), 64 * 1024).await;
    let rtt = c.ping(Duration::from_secs(3)).await.unwrap();
    assert!(rtt < Duration::from_secs(1));
    let _ = UpgradeMode::Plain;
}

/// A burst that arrives in one read must not starve the destination's writer: the reader
/// yields every few frames, so nothing is head-dropped when the receiver keeps up.
#[tokio::test]
async fn burst_in_one_read_is_relayed_without_drops() {
    let s = server(ServerOptions::default());
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = connect(&s, &ka, 4 << 20).await;
    let mut b = connect(&s, &kb, 4 << 20).await;
    let n = 1000usize;
    let mut raw = BytesMut::new();
    for i in 0..n {
        derper::proto::codec::write_send_packet(
            &mut raw,
            &kb.public(),
            &u32::try_from(i).unwrap().to_be_bytes(),
        );
    }
    a.writer().send_raw(&raw).await.unwrap();
    for i in 0..n {
        let (_, p) = b.recv_packet(Duration::from_secs(5)).await.unwrap();
        assert_eq!(&p[..], &u32::try_from(i).unwrap().to_be_bytes());
    }
    assert_eq!(
        s.metrics().dropped(derper::metrics::DropReason::QueueHead),
        0
    );
}
