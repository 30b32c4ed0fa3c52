//! The HTTP surface on raw sockets: exact 101 bytes, fast start with pipelined bytes,
//! 426, garbage before/after the upgrade, endpoints, the plain-HTTP port, admin metrics.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use derper::key::NodePrivateKey;
use derper::proto::codec;
use derper::proto::handshake::{self, ClientInfo};
use derper::testing::{TestServer, TestServerOptions, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

async fn plain_server() -> TestServer {
    start(TestServerOptions {
        tls: false,
        ..Default::default()
    })
    .await
}

/// Sends `req` and returns everything until the server closes.
async fn http(addr: SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut v = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut v))
        .await
        .expect("response within timeout")
        .unwrap();
    String::from_utf8_lossy(&v).into_owned()
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: example.test\r\n{extra}Connection: close\r\n\r\n")
}

#[tokio::test]
async fn plain_upgrade_writes_exact_101_then_server_key() {
    let s = plain_server().await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUser-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n",
    )
    .await
    .unwrap();
    let expect101 = derper::http::derp_101(&s.server_key.to_hex());
    let mut buf = vec![0u8; expect101.len() + 45];
    tokio::time::timeout(T, tcp.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..expect101.len()], expect101.as_bytes());
    let mut sk = BytesMut::new();
    handshake::write_server_key(&mut sk, &s.server_key);
    assert_eq!(&buf[expect101.len()..], &sk[..]);
}

#[tokio::test]
async fn fast_start_sends_no_http_and_keeps_pipelined_bytes() {
    let s = plain_server().await;
    let key = NodePrivateKey::generate();
    let mut out = BytesMut::new();
    out.extend_from_slice(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n",
    );
    let info = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    handshake::write_client_info(&mut out, &key, &s.server_key, &info, &[1; 24]);
    codec::write_ping(&mut out, b"pipeline");
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&out).await.unwrap();
    let mut r = codec::FrameReader::new(tcp, BytesMut::new(), codec::ReadPolicy::FromServer);
    let f = r.read_frame().await.unwrap().unwrap();
    assert_eq!(
        f.typ, 0x01,
        "first bytes must be the ServerKey frame, not HTTP"
    );
    let f = r.read_frame().await.unwrap().unwrap();
    assert_eq!(f.typ, 0x03, "ServerInfo is the first frame after ServerKey");
    handshake::open_server_info(&key, &s.server_key, &f.payload).unwrap();
    let f = r.read_frame().await.unwrap().unwrap();
    assert_eq!(f.typ, 0x13);
    assert_eq!(&f.payload[..], b"pipeline");
}

#[tokio::test]
async fn websocket_without_derp_subprotocol_is_raw_derp() {
    let s = plain_server().await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 34];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf[..], b"HTTP/1.1 101 Switching Protocols\r\n");
}

#[tokio::test]
async fn derp_without_upgrade_is_426_and_garbage_is_400() {
    let s = plain_server().await;
    let r = http(s.addr, &get("/derp", "")).await;
    assert!(r.starts_with("HTTP/1.1 426"), "{r}");
    assert!(r.ends_with("DERP requires connection upgrade\n"), "{r}");
    let r = http(s.addr, "GARBAGE GARBAGE\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
}

#[tokio::test]
async fn garbage_after_upgrade_closes_without_registering() {
    let s = plain_server().await;
    for junk in [
        &b"hello, this is not a frame at all"[..],
        &[0x02, 0, 0, 0, 10, 1, 2][..],
        &[0x02, 0, 0x10, 0, 0][..],
    ] {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let mut req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n".to_vec();
        req.extend_from_slice(junk);
        tcp.write_all(&req).await.unwrap();
        let _ = tcp.shutdown().await;
        let mut v = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut v))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(s.metrics().current_connections.get(), 0);
    let text = s.metrics_text();
    assert!(text.contains("derper_handshake_failures_total"), "{text}");
    assert_eq!(s.metrics().accepts.get(), 3);
}

#[tokio::test]
async fn probe_endpoints() {
    let s = plain_server().await;
    for p in ["/derp/probe", "/derp/latency-check"] {
        let r = http(s.addr, &get(p, "")).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("access-control-allow-origin: *"), "{r}");
        let r = http(
            s.addr,
            &format!("HEAD {p} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = http(
            s.addr,
            &format!(
                "POST {p} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }
}

#[tokio::test]
async fn generate_204_challenge_rules_on_both_ports() {
    let s = plain_server().await;
    for addr in [s.addr, s.http_addr.unwrap()] {
        let r = http(
            addr,
            &get("/generate_204", "X-Tailscale-Challenge: ts_203.0.113.5\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        assert!(
            r.contains("x-tailscale-response: response ts_203.0.113.5"),
            "{r}"
        );
        assert!(r.contains(
            "cache-control: no-cache, no-store, must-revalidate, no-transform, max-age=0"
        ));
        let long = "a".repeat(65);
        let r = http(
            addr,
            &get(
                "/generate_204",
                &format!("X-Tailscale-Challenge: {long}\r\n"),
            ),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 204") && !r.contains("x-tailscale-response"),
            "{r}"
        );
        let r = http(
            addr,
            &get("/generate_204", "X-Tailscale-Challenge: a/b\r\n"),
        )
        .await;
        assert!(!r.contains("x-tailscale-response"), "{r}");
    }
}

#[tokio::test]
async fn other_endpoints() {
    let s = plain_server().await;
    let r = http(s.addr, &get("/robots.txt", "")).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("User-agent: *\nDisallow: /\n"),
        "{r}"
    );
    assert!(r.contains("x-frame-options: DENY"));
    let r = http(s.addr, &get("/bootstrap-dns?q=foo", "")).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("application/json"),
        "{r}"
    );
    assert!(r.ends_with("{}"), "{r}");
    let r = http(s.addr, &get("/", "")).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("DERP"), "{r}");
    let r = http(s.addr, &get("/whatever", "")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test]
async fn plain_http_port_redirects_get_and_rejects_post() {
    let s = plain_server().await;
    let p80 = s.http_addr.unwrap();
    for path in ["/derp", "/", "/x?y=1"] {
        let r = http(p80, &get(path, "")).await;
        assert!(r.starts_with("HTTP/1.1 302"), "{r}");
        assert!(
            r.contains(&format!("location: https://example.test{path}")),
            "{r}"
        );
    }
    let r = http(
        p80,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("Use HTTPS"),
        "{r}"
    );
}

#[tokio::test]
async fn admin_listener_serves_metrics_health_and_readiness() {
    let s = plain_server().await;
    let admin = s.admin_addr.unwrap();
    let r = http(admin, &get("/metrics", "")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("derper_accepts_total"), "{r}");
    assert!(r.contains("derper_packets_dropped_total{reason=\"queue_head\",kind=\"disco\"} 0"));
    assert!(
        http(admin, &get("/healthz", ""))
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        http(admin, &get("/readyz", ""))
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Metrics are not on the public listeners.
    let r = http(s.addr, &get("/metrics", "")).await;
    assert!(!r.contains("derper_accepts_total"));
}

/// Spec §12 item 16: bad ClientInfo → connection closed, no frame after ServerKey.
#[tokio::test]
async fn bad_client_info_closes_without_any_frame() {
    let s = plain_server().await;
    let key = NodePrivateKey::generate();
    let other = NodePrivateKey::generate();
    let info = ClientInfo::default();
    let mut wrong_box = BytesMut::new();
    handshake::write_client_info(&mut wrong_box, &key, &other.public(), &info, &[3; 24]);
    let mut short = BytesMut::new();
    codec::write_raw_frame(&mut short, 0x02, &[1u8; 55]);
    let mut long = BytesMut::new();
    long.extend_from_slice(&[0x02, 0x00, 0x04, 0x00, 0x01]); // 256 KiB + 1
    let mut wrong_type = BytesMut::new();
    codec::write_ping(&mut wrong_type, &[0; 8]);
    let expect101 = derper::http::derp_101(&s.server_key.to_hex());
    for bad in [wrong_box, short, long, wrong_type] {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        let mut req = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n".to_vec();
        req.extend_from_slice(&bad);
        tcp.write_all(&req).await.unwrap();
        let mut v = Vec::new();
        tokio::time::timeout(T, tcp.read_to_end(&mut v))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            v.len(),
            expect101.len() + 45,
            "only 101 + ServerKey were sent"
        );
    }
    assert_eq!(s.metrics().handshake_failures("bad_box"), 1);
    assert_eq!(s.metrics().handshake_failures("short_client_info"), 1);
    assert_eq!(s.metrics().handshake_failures("long_client_info"), 1);
    assert_eq!(s.metrics().handshake_failures("wrong_frame_type"), 1);
    assert_eq!(s.metrics().current_connections.get(), 0);
}

/// STUN on the test server answers the spec §7.3 request vector.
#[tokio::test]
async fn test_server_answers_stun() {
    let s = plain_server().await;
    let req = hex::decode(
        "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f",
    )
    .unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&req, s.stun_addr.unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(T, udp.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 32);
    assert_eq!(&buf[..2], &[0x01, 0x01]);
}

#[tokio::test]
async fn connect_method_is_forbidden() {
    let s = plain_server().await;
    let r = http(
        s.addr,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
}

#[tokio::test]
async fn plain_http_port_redirect_page_escapes_the_host_and_path() {
    let s = plain_server().await;
    let p80 = s.http_addr.unwrap();
    let r = http(
        p80,
        "GET /a?b=1&c='2' HTTP/1.1\r\nHost: x\"><script>alert(1)</script>\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    let body = &r[r.find("\r\n\r\n").unwrap() + 4..];
    assert!(!body.contains("<script>"), "{body}");
    assert!(!body.contains("\"><"), "{body}");
    assert_eq!(
        body,
        "<a href=\"https://x&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;/a?b=1&amp;c=&#39;2&#39;\">Found</a>.\n\n"
    );
}

/// Waits until the server closes `s` (read returns EOF or an error), writing `trickle`
/// every 100 ms meanwhile; panics if it is still open after 10 s.
async fn closed_by_server(s: &mut TcpStream, trickle: &[u8]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin connection still open"
        );
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                if !trickle.is_empty() && s.write_all(trickle).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test]
async fn admin_listener_closes_slow_and_idle_connections() {
    let s = start(TestServerOptions {
        tls: false,
        http: derper::http::HttpOptions {
            admin_timeouts: derper::metrics::AdminTimeouts {
                header: Duration::from_millis(500),
                connection: Duration::from_secs(2),
            },
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let admin = s.admin_addr.unwrap();
    // Slowloris: a request head that never ends, one header line at a time.
    let mut c = TcpStream::connect(admin).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    closed_by_server(&mut c, b"X-Slow: 1\r\n").await;
    // A connection that never sends anything.
    let mut c = TcpStream::connect(admin).await.unwrap();
    closed_by_server(&mut c, b"").await;
    // A kept-alive connection after a complete request.
    let mut c = TcpStream::connect(admin).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_server(&mut c, b"").await;
    // A request whose body trickles in forever.
    let mut c = TcpStream::connect(admin).await.unwrap();
    c.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    closed_by_server(&mut c, b"x").await;
    // Still serving.
    let r = http(admin, &get("/healthz", "")).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
