//! `--verify-clients` against a REAL tailscaled (spec §6.9 step 2, §12 item 31).
//!
//! A loopback tailnet ([`derp_tests::tailnet`]): Tailscale's own test control server and two
//! real `tailscaled` v1.104.7 in userspace-networking mode. Nothing here is a stand-in for
//! tailscaled; the only fake LocalAPI servers live in `derper/src/localapi.rs` unit tests.
//!
//! Builds the Go kit on first use (`tests/interop/tailnet/build.sh`, a few minutes cold, then
//! cached) unless `KUBEDERP_TAILNET_BIN_DIR` names a prebuilt one.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use derp_tests::interop::Relay;
use derp_tests::tailnet::Tailnet;
use derper::client::{Client, ClientConfig, TlsMode};
use derper::key::{NodePrivateKey, NodePublicKey};
use derper::localapi::{LocalApiError, node_key_in_tailnet};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn ask(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    key: &NodePublicKey,
) -> Result<bool, LocalApiError> {
    rt.block_on(node_key_in_tailnet(socket, key))
}

/// Asserts that no node tried to reach anything but loopback: the control server's traffic
/// trap (every non-loopback HTTP(S) URL is proxied to it) counted nothing, and no node fell
/// back to Tailscale's built-in internet DERP map.
fn assert_nothing_left_the_machine(tailnet: &Tailnet) {
    let trapped = tailnet.traffic_trapped().expect("control state");
    assert_eq!(
        trapped,
        0,
        "tailscaled tried to reach a non-loopback URL; control log:\n{}",
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

#[test]
fn localapi_whois_knows_tailnet_peers_and_refuses_strangers() {
    let t0 = Instant::now();
    let tailnet = Tailnet::start(&["alpha", "beta"]).expect("tailnet up");
    eprintln!("tailnet up in {:?}", t0.elapsed());
    let rt = runtime();
    let (a, b) = (&tailnet.nodes[0], &tailnet.nodes[1]);

    // The peer key as tailscaled itself reports it (`tailscale status --json` Peer[].PublicKey).
    let peers = a.peer_keys().expect("alpha's peers");
    assert_eq!(peers, vec![b.node_key], "alpha sees exactly beta");
    assert!(
        tailnet.control_state().expect("control state")["NodeKeys"]
            .as_array()
            .expect("NodeKeys")
            .iter()
            .any(|k| k.as_str() == Some(&b.node_key.to_nodekey_string())),
        "the control server registered beta's key"
    );

    assert!(
        ask(&rt, &a.socket, &b.node_key).expect("whois peer"),
        "peer key is in the tailnet"
    );
    assert!(
        ask(&rt, &b.socket, &a.node_key).expect("whois peer"),
        "and the other way round"
    );
    assert!(
        ask(&rt, &a.socket, &a.node_key).expect("whois self"),
        "its own key is in the tailnet"
    );

    let stranger = NodePrivateKey::generate().public();
    assert!(
        !ask(&rt, &a.socket, &stranger).expect("whois stranger"),
        "random key is not found"
    );

    // Dead sockets: a path nobody listens on, and a socket file whose listener is gone.
    let missing = tailnet.dir.path().join("missing.sock");
    let err = ask(&rt, &missing, &b.node_key).expect_err("no socket");
    assert!(matches!(err, LocalApiError::Connect { .. }), "{err}");
    let stale = tailnet.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let err = ask(&rt, &stale, &b.node_key).expect_err("stale socket");
    assert!(matches!(err, LocalApiError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("is tailscaled running?"), "{err}");

    assert_nothing_left_the_machine(&tailnet);
    eprintln!("done in {:?}", t0.elapsed());
}

/// Connects to `relay` (pinned TLS) as `key`; Ok when the relay admitted it (answered with
/// ServerInfo and a ping round trip works).
fn connect(
    rt: &tokio::runtime::Runtime,
    relay: &Relay,
    key: &NodePrivateKey,
) -> Result<(), String> {
    let mut cfg = ClientConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, relay.derp_port)));
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
}

/// Waits (at most 5 s) until the relay's log contains `needle`.
fn wait_log(relay: &Relay, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if relay.log().contains(needle) {
            return true;
        }
        #[allow(clippy::disallowed_methods)] // plain test thread, no runtime running here
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn our_derper_verify_clients_admits_tailnet_member_and_refuses_stranger() {
    let mut tailnet = Tailnet::start(&["relayhost", "member"]).expect("tailnet up");
    let rt = runtime();
    let socket = tailnet.nodes[0]
        .socket
        .to_str()
        .expect("utf-8 socket path")
        .to_owned();
    let relay =
        Relay::ours("verify", &["--verify-clients", "--socket", &socket]).expect("derper up");

    // Act as the tailnet member with its own node private key, read from its state file.
    let member = &tailnet.nodes[1];
    let member_key = member.private_key().expect("member's private key");
    assert_eq!(member_key.public(), member.node_key);
    connect(&rt, &relay, &member_key)
        .unwrap_or_else(|e| panic!("tailnet member refused: {e}\nrelay log:\n{}", relay.log()));

    let stranger = NodePrivateKey::generate();
    let err = connect(&rt, &relay, &stranger).expect_err("stranger must be refused");
    eprintln!("stranger refused: {err}");
    // The relay logs keys in their short form only (never a whole key).
    let line = stranger.public().short().to_string();
    assert!(
        wait_log(&relay, &line) && relay.log().contains("not found in local tailscaled"),
        "relay did not log the stranger's rejection:\n{}",
        relay.log()
    );
    assert_nothing_left_the_machine(&tailnet);

    // With the relay's tailscaled gone, nobody can be verified: even the member is refused
    // (Go derper: "failed to query local tailscaled status").
    tailnet.nodes[0].kill_daemon();
    // Rejection lines are rate limited (one per second), so keep trying (every attempt must
    // be refused) until the LocalAPI failure shows up in the log.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let err = connect(&rt, &relay, &member_key).expect_err("unverifiable member refused");
        if relay.log().contains("is tailscaled running?") {
            eprintln!("member refused with tailscaled down: {err}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not log the LocalAPI failure:\n{}",
            relay.log()
        );
        #[allow(clippy::disallowed_methods)] // plain test thread, no runtime running here
        std::thread::sleep(Duration::from_millis(250));
    }
}
