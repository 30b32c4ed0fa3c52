//! Readiness probes: `httpGet` and `tcpSocket` against the node IP, with the Kubernetes
//! period, timeout and thresholds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::io::AsyncReadExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use super::pod::PodCtx;
use super::process::sleep_or_stop;
use super::validate::resolve_port;

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|s| u64::try_from(s).ok()).unwrap_or(default))
}

/// Runs the container's readiness probe (if any) until `stop`, updating its `ready` state.
pub(super) async fn run_readiness_probe(ctx: Arc<PodCtx>, idx: usize, stop: CancellationToken) {
    let c = ctx.spec_containers()[idx].clone();
    let Some(p) = c.readiness_probe.clone() else {
        return;
    };
    probe_loop(&ctx, &c, &p, &stop, |ok| {
        ctx.update(idx, |s| {
            if s.ready != ok {
                tracing::info!(container = %s_name(&ctx, idx), ready = ok, "readiness changed");
            }
            s.ready = ok;
        });
    })
    .await;
}

fn s_name(ctx: &PodCtx, idx: usize) -> String {
    ctx.spec_containers()
        .get(idx)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

/// Runs a probe every period until `stop`; `on_state(ok)` is called when the thresholded result
/// is known.
async fn probe_loop(
    ctx: &PodCtx,
    c: &Container,
    p: &Probe,
    stop: &CancellationToken,
    mut on_state: impl FnMut(bool),
) {
    let period = secs(p.period_seconds, 10).max(Duration::from_millis(100));
    let timeout = secs(p.timeout_seconds, 1);
    let success_threshold = p.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = p.failure_threshold.unwrap_or(3).max(1);
    if sleep_or_stop(stop, secs(p.initial_delay_seconds, 0)).await {
        return;
    }
    let (mut successes, mut failures) = (0, 0);
    loop {
        let result = run_probe(ctx, p, timeout).await;
        match result {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if successes >= success_threshold {
                    on_state(true);
                }
            }
            Err(e) => {
                tracing::debug!(container = %c.name, error = %e, "probe failed");
                successes = 0;
                failures += 1;
                if failures >= failure_threshold {
                    on_state(false);
                }
            }
        }
        if sleep_or_stop(stop, period).await {
            return;
        }
    }
}

/// One probe run against the node IP (the only host a Pod with host networking has here).
async fn run_probe(ctx: &PodCtx, p: &Probe, timeout: Duration) -> Result<(), String> {
    let ip = IpAddr::V4(ctx.node.ipv4);
    let fut = async {
        if let Some(h) = &p.http_get {
            let port = resolve_port(&h.port)?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            return http_probe(SocketAddr::new(ip, port), &path).await;
        }
        if let Some(t) = &p.tcp_socket {
            let port = resolve_port(&t.port)?;
            return tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect {ip}:{port}: {e}"));
        }
        Err("no probe handler".to_owned())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("timed out after {}s", timeout.as_secs_f32()))?
}

async fn http_probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response {head:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}
