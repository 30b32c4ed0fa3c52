//! The first bytes of a relay connection: request-head framing, parsing and classification
//! (`/derp` upgrade, fast start, WebSocket, everything else to the HTTP server: probe,
//! generate_204, port-80 redirect …), then the whole connection end to end.
//!
//! Input: `[flags][n][plan][stream]` (see the harness). flags bit 0: the plain-HTTP port
//! listener instead of the main one; bit 1: `/derp` disabled; bit 2: a ClientInfo sealed
//! with a fixed client key (to the relay's fixed key) is inserted right after the head, so
//! the fuzzer reaches the registered-client frame loop; bit 3: that ClientInfo carries the
//! relay's mesh key (mesh frames: WatchConns, ForwardPacket, ClosePeer); bit 4: a per-client
//! receive rate limit is set (the rate-limited frame reading path). Time is paused and
//! advances only when every task waits, so timeouts and rate-limit waits cost nothing.
//!
//! Oracle: `find_head_end` finds the first blank line; the classifier agrees with a plain
//! reading of spec §1.3/§1.4/§1.6; and what the relay writes back starts as that class
//! requires (101 + ServerKey, ServerKey alone for fast start, WebSocket 101 with the right
//! accept key, or an HTTP/1.1 response or nothing).
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use derper::fuzzing::{HeadClass, classify_head};
use derper::http::{self, HttpOptions, ListenerKind, RequestHead};
use derper::key::{MeshKey, NodePrivateKey, parse_hex32};
use derper::metrics::Metrics;
use derper::proto::handshake::{ClientInfo, write_client_info};
use derper::ratelimit::RecvRateLimit;
use derper::server::{Server, ServerOptions};
use derper_fuzz::{PlannedStream, split};
use libfuzzer_sys::fuzz_target;

const SERVER_PRIV: &str = "0002030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f60";
const CLIENT_PRIV: &str = "2022232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40";
const MESH_KEY: &str = "5555555555555555555555555555555555555555555555555555555555555555";
const MAX_REQUEST_HEAD: usize = 16 * 1024;

fn metrics() -> Arc<Metrics> {
    static M: std::sync::OnceLock<Arc<Metrics>> = std::sync::OnceLock::new();
    M.get_or_init(|| Metrics::register(&mut prometheus_client::registry::Registry::default()))
        .clone()
}

/// Spec §1.3 (steps 1–3), §1.4 and §1.6, read independently of the relay's classifier.
fn expected_class(head: &RequestHead, derp_enabled: bool, main: bool) -> Option<HeadClass> {
    let first = |name: &str| {
        head.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let path = head.target.split('?').next().unwrap_or_default();
    if !main || !derp_enabled || path != "/derp" {
        return None;
    }
    let upgrade = first("Upgrade")?.to_ascii_lowercase();
    if upgrade == "websocket" && first("Sec-WebSocket-Protocol").is_some_and(|p| p.contains("derp"))
    {
        return first("Sec-WebSocket-Key").map(|k| HeadClass::WebSocket {
            accept: derper::ws::accept_key(k),
        });
    }
    if upgrade == "derp" || upgrade == "websocket" {
        return Some(HeadClass::Derp {
            fast_start: first("Derp-Fast-Start") == Some("1"),
        });
    }
    None
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|input: &[u8]| {
    let s = split(input);
    let main = s.flags & 1 == 0;
    let derp_enabled = s.flags & 2 == 0;
    let kind = if main {
        ListenerKind::Main
    } else {
        ListenerKind::Port80
    };

    let head_end = http::find_head_end(s.data);
    if let Some(e) = head_end {
        assert!(e >= 4 && &s.data[e - 4..e] == b"\r\n\r\n");
        assert!(
            http::find_head_end(&s.data[..e - 1]).is_none(),
            "not the first blank line"
        );
    } else {
        assert!(!s.data.windows(4).any(|w| w == b"\r\n\r\n"));
    }
    let class = head_end
        .filter(|&e| e <= MAX_REQUEST_HEAD)
        .and_then(|e| http::parse_head(&s.data[..e]))
        .and_then(|head| {
            assert!(!head.method.is_empty() && !head.method.contains(' '));
            assert!(!head.target.contains(' '));
            let got = classify_head(&head, derp_enabled, kind);
            assert_eq!(got, expected_class(&head, derp_enabled, main), "{head:?}");
            got
        });

    let server_key = NodePrivateKey::from_bytes(parse_hex32(SERVER_PRIV).expect("hex"));
    let server_pub = server_key.public();
    let mut stream_bytes = s.data.to_vec();
    if let (Some(e), true) = (head_end, s.flags & 4 != 0) {
        let client = NodePrivateKey::from_bytes(parse_hex32(CLIENT_PRIV).expect("hex"));
        let info = ClientInfo {
            mesh_key: (s.flags & 8 != 0).then(|| MESH_KEY.to_owned()),
            version: 2,
            can_ack_pings: true,
            is_prober: false,
        };
        let mut frame = BytesMut::new();
        write_client_info(&mut frame, &client, &server_pub, &info, &[7; 24]);
        stream_bytes = [&s.data[..e], &frame[..], &s.data[e..]].concat();
    }
    let opts = ServerOptions {
        mesh_key: Some(MeshKey::parse(MESH_KEY).expect("mesh key")),
        recv_rate: (s.flags & 16 != 0).then_some(RecvRateLimit {
            bytes_per_sec: 1000.0,
            burst_bytes: 0.0,
        }),
        ..ServerOptions::default()
    };
    let server = Server::new(server_key, opts, metrics());
    let http_opts = Arc::new(HttpOptions {
        derp_enabled,
        ..HttpOptions::default()
    });
    let stream = PlannedStream::new(&stream_bytes, s.plan);
    let written = stream.written.clone();
    runtime().block_on(async {
        http::serve_connection(server.clone(), http_opts, stream, None, kind).await;
        server.shutdown(Duration::from_secs(60)).await;
    });
    let out = written.lock().expect("lock").clone();

    let mut server_key_frame = vec![0x01, 0, 0, 0, 40];
    server_key_frame.extend_from_slice(&derper::proto::MAGIC);
    server_key_frame.extend_from_slice(server_pub.as_bytes());
    match class {
        Some(HeadClass::Derp { fast_start: false }) => {
            let mut want = http::derp_101(&server_pub.to_hex()).into_bytes();
            want.extend_from_slice(&server_key_frame);
            assert!(out.starts_with(&want), "DERP upgrade answered with {out:?}");
        }
        Some(HeadClass::Derp { fast_start: true }) => {
            assert!(
                out.starts_with(&server_key_frame),
                "fast start answered with {out:?}"
            );
        }
        Some(HeadClass::WebSocket { accept }) => {
            let want = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
            );
            assert!(
                out.starts_with(want.as_bytes()),
                "WebSocket upgrade answered with {out:?}"
            );
        }
        None if head_end.is_some_and(|e| e <= MAX_REQUEST_HEAD) => {
            assert!(
                out.is_empty() || out.starts_with(b"HTTP/1."),
                "not an HTTP response: {out:?}"
            );
        }
        None => {}
    }
});
