//! Random and perturbed input on the public listener path never panics the server or
//! leaves a connection registered; the server keeps serving afterwards.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use derper::http::{HttpOptions, ListenerKind};
use derper::key::NodePrivateKey;
use derper::metrics::Metrics;
use derper::proto::codec;
use derper::proto::handshake::{self, ClientInfo};
use derper::server::{Server, ServerOptions};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Feeds `input` to a fresh connection on `server` and waits (paused time) for the server
/// to finish with it.
fn feed(server: &Server, input: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let s = server.clone();
        let h = tokio::spawn(derper::http::serve_connection(
            s,
            Arc::new(HttpOptions::default()),
            b,
            None,
            ListenerKind::Main,
        ));
        let _ = a.write_all(&input).await;
        let _ = a.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(120), a.read_to_end(&mut sink)).await;
        drop(a);
        tokio::time::timeout(Duration::from_secs(120), h)
            .await
            .expect("connection task ends")
            .expect("connection task does not panic");
    });
}

fn valid_prefix(server_key: &derper::key::NodePublicKey, fast: bool) -> Vec<u8> {
    let mut out = BytesMut::new();
    if fast {
        out.extend_from_slice(
            b"GET /derp HTTP/1.1\r\nHost: x\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\n",
        );
    } else {
        out.extend_from_slice(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n\r\n");
    }
    let info = ClientInfo {
        version: 2,
        can_ack_pings: true,
        ..Default::default()
    };
    handshake::write_client_info(
        &mut out,
        &NodePrivateKey::generate(),
        server_key,
        &info,
        &[9; 24],
    );
    codec::write_ping(&mut out, &[1; 8]);
    out.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_after_a_valid_handshake(tail in proptest::collection::vec(any::<u8>(), 0..600), fast in any::<bool>()) {
        let server = Server::new(NodePrivateKey::generate(), ServerOptions::default(), Metrics::unregistered());
        let mut input = valid_prefix(&server.public_key(), fast);
        input.extend_from_slice(&tail);
        feed(&server, input);
        prop_assert_eq!(server.metrics().current_connections.get(), 0);
    }

    #[test]
    fn perturbed_handshakes(flip in any::<usize>(), cut in any::<usize>(), fast in any::<bool>()) {
        let server = Server::new(NodePrivateKey::generate(), ServerOptions::default(), Metrics::unregistered());
        let mut input = valid_prefix(&server.public_key(), fast);
        let i = flip % input.len();
        input[i] ^= 0x41;
        input.truncate(cut % (input.len() + 1));
        feed(&server, input);
        prop_assert_eq!(server.metrics().current_connections.get(), 0);
    }

    #[test]
    fn arbitrary_bytes_instead_of_http(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let server = Server::new(NodePrivateKey::generate(), ServerOptions::default(), Metrics::unregistered());
        feed(&server, data);
        prop_assert_eq!(server.metrics().current_connections.get(), 0);
    }
}
