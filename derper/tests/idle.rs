//! Many idle connections: all register, nothing else is disturbed, memory per idle connection
//! stays bounded, all unregister.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use derper::client::UpgradeMode;
use derper::key::NodePrivateKey;
use derper::testing::{TestServerOptions, start};

const IDLE: usize = 5_000;
/// Bound on the process RSS growth per idle connection, client and server sides together
/// (plain TCP, both in this process). Measured here: ~6 KiB (`cargo test -p derper --test
/// idle -- --nocapture`, 2 runs: 29.7 and 30.0 MiB for 5 000 connections, debug build). Go
/// derper needs 14.5–22.3 KB per idle TLS connection on the server side alone
/// (performance.md §0).
const MAX_RSS_PER_CONN_KIB: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections() {
    // Each connection needs two fds in this process (client + server side).
    let s = start(TestServerOptions {
        tls: false,
        ..Default::default()
    })
    .await;
    let rss0 = rss_kib();
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(IDLE);
    let mut set = tokio::task::JoinSet::new();
    let cfg = s.client_config(UpgradeMode::Plain);
    for i in 0..IDLE {
        let cfg = cfg.clone();
        set.spawn(async move {
            let k = NodePrivateKey::generate();
            derper::client::Client::connect(&cfg, &k).await
        });
        // A sliding window well below the listen backlog (somaxconn may be 128): an
        // overflowing backlog costs a 1 s SYN retransmit.
        if set.len() >= 64 {
            let r = set.join_next().await.unwrap();
            clients.push(r.unwrap().unwrap());
        }
        if i + 1 == IDLE {
            while let Some(r) = set.join_next().await {
                clients.push(r.unwrap().unwrap());
            }
        }
    }
    s.wait_for("all registered", Duration::from_secs(20), |s| {
        s.metrics().current_connections.get() == IDLE as i64
    })
    .await;
    let rss1 = rss_kib();
    eprintln!(
        "{IDLE} connections in {:?}; process RSS {rss0} -> {rss1} KiB (client + server sides)",
        t0.elapsed(),
    );
    let per_conn = rss1.saturating_sub(rss0) / IDLE as u64;
    assert!(
        per_conn <= MAX_RSS_PER_CONN_KIB,
        "{per_conn} KiB of RSS per idle connection (client + server), bound {MAX_RSS_PER_CONN_KIB}"
    );
    // A new pair still works promptly.
    let ka = NodePrivateKey::generate();
    let kb = NodePrivateKey::generate();
    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    a.send_packet(&kb.public(), b"still fine").await.unwrap();
    b.recv_packet(Duration::from_secs(5)).await.unwrap();
    a.ping(Duration::from_secs(3)).await.unwrap();
    drop(clients);
    s.wait_for("all unregistered", Duration::from_secs(20), |s| {
        s.metrics().current_connections.get() == 2
    })
    .await;
    assert_eq!(s.metrics().clients_local.get(), 2);
}

/// This process's resident set (VmRSS) in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status")
}
