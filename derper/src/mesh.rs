//! Mesh, client side (spec §6.10): one task per configured peer dials it with
//! [`crate::client`] (our own server key as client key, the mesh key in ClientInfo), sends
//! WatchConns and turns PeerPresent / PeerGone into forwarders in the registry. Packets for
//! keys announced by a peer are written as ForwardPacket on that outbound connection.
//!
//! Peers come from `--mesh-with` (upstream's comma list, WebPKI-verified) and from a peers
//! file (`host:port sha256-raw:<hex>` per line, pinned), which is polled and re-read when
//! its content changes so peers are added and removed without a restart (design.md §4).
//!
//! The server side (WatchConns, ForwardPacket, ClosePeer) lives in [`crate::server`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::client::{Client, ClientConfig, ClientError, ClientWriter, TlsMode, UpgradeMode};
use crate::key::{MeshKey, NodePublicKey};
use crate::pin::{PIN_PREFIX, Pin};
use crate::proto::codec::ServerFrame;
use crate::server::Server;
use crate::server::forward::{Forwarder, Fwd};

/// Packets queued per mesh peer before new ones are dropped.
const FORWARD_QUEUE: usize = 4096;
/// First reconnect delay; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Reconnect delay cap (upstream retries every 5 s).
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Upstream's mesh client closes the connection if a ForwardPacket write takes longer.
const FORWARD_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// No frame for this long (keepalives come every ~60 s) means the peer is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(125);
/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Default poll interval of the peers file.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// One mesh peer to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// `Host` header and TLS server name (host name or IP, no port).
    pub host: String,
    /// What to dial: `host:port` (resolved at every attempt).
    pub dial: String,
    /// How to verify the peer's certificate.
    pub tls: TlsMode,
}

impl PeerSpec {
    fn id(&self) -> String {
        let tls = match &self.tls {
            TlsMode::Pinned(p) => p.to_string(),
            TlsMode::Plain => "plain".into(),
            TlsMode::Insecure => "insecure".into(),
            TlsMode::Roots(r) => format!("roots:{}", r.len()),
        };
        format!("{} {} {tls}", self.host, self.dial)
    }
}

/// Mesh configuration.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The pre-shared mesh key sent in ClientInfo.
    pub mesh_key: MeshKey,
    /// Static peers (`--mesh-with`).
    pub peers: Vec<PeerSpec>,
    /// Peers file (`--mesh-peers-file`), re-read when its content changes.
    pub peers_file: Option<PathBuf>,
    /// How often the peers file is checked.
    pub poll: Duration,
}

/// Splits `host:port` / `[v6]:port` / `host` into (host, port).
fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port"))?,
            None if tail.is_empty() => default_port.ok_or_else(|| format!("{s:?}: no port"))?,
            None => return Err(format!("{s:?}: junk after ']'")),
        };
        return Ok((h.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p.parse().map_err(|_| format!("{s:?}: bad port"))?;
            Ok((h.to_owned(), port))
        }
        // A bare IPv6 address.
        Some(_) if s.parse::<std::net::Ipv6Addr>().is_ok() => Ok((
            s.to_owned(),
            default_port.ok_or_else(|| format!("{s:?}: no port"))?,
        )),
        Some(_) => Err(format!("{s:?}: bad host:port")),
        None => Ok((
            s.to_owned(),
            default_port.ok_or_else(|| format!("{s:?}: no port"))?,
        )),
    }
}

fn dial_string(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Parses a peers file: one `host:port sha256-raw:<64 hex>` per line; blank lines and
/// `#` comments are ignored.
pub fn parse_peers_file(text: &str) -> Result<Vec<PeerSpec>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(addr), Some(pin), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "line {}: want `host:port sha256-raw:<hex>`, got {line:?}",
                i + 1
            ));
        };
        let (host, port) =
            split_host_port(addr, None).map_err(|e| format!("line {}: {e}", i + 1))?;
        // Our own file format: the hex may be in either case.
        let pin = pin
            .strip_prefix(PIN_PREFIX)
            .ok_or_else(|| format!("line {}: pin must start with {PIN_PREFIX}", i + 1))
            .and_then(|hex| Pin::parse_hex(hex).map_err(|e| format!("line {}: {e}", i + 1)))?;
        out.push(PeerSpec {
            dial: dial_string(&host, port),
            host,
            tls: TlsMode::Pinned(pin),
        });
    }
    Ok(out)
}

/// Parses upstream's `--mesh-with` list: `host`, `host:port` or `host/dialhost`, comma
/// separated; port 443 by default. Certificates are verified against `roots` for `host`.
pub fn parse_mesh_with(
    list: &str,
    roots: &[CertificateDer<'static>],
) -> Result<Vec<PeerSpec>, String> {
    let mut out = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, dial) = match entry.split_once('/') {
            Some((n, d)) => (n, d),
            None => (entry, entry),
        };
        let (host, port) = split_host_port(name, Some(443))?;
        let (dial_host, dial_port) = split_host_port(dial, Some(port))?;
        out.push(PeerSpec {
            host,
            dial: dial_string(&dial_host, dial_port),
            tls: TlsMode::Roots(roots.to_vec()),
        });
    }
    Ok(out)
}

/// Handle of the running mesh (stops with the server's cancellation token too).
#[derive(Debug)]
pub struct MeshHandle {
    cancel: CancellationToken,
}

impl MeshHandle {
    /// Stops every peer task.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

/// Starts the mesh supervisor: dials every peer and keeps the set in sync with the peers
/// file. Stops when the server shuts down.
pub fn spawn(server: &Server, cfg: MeshConfig) -> MeshHandle {
    let cancel = server.cancel_token().child_token();
    let handle = MeshHandle {
        cancel: cancel.clone(),
    };
    let server = server.clone();
    tokio::spawn(supervise(server, cfg, cancel));
    handle
}

async fn supervise(server: Server, cfg: MeshConfig, cancel: CancellationToken) {
    let mut running: HashMap<String, CancellationToken> = HashMap::new();
    let mut file_text: Option<String> = None;
    let mut file_peers: Vec<PeerSpec> = Vec::new();
    let mut file_err_logged = false;
    loop {
        if let Some(path) = &cfg.peers_file {
            match tokio::fs::read_to_string(path).await {
                Ok(text) if file_text.as_deref() != Some(text.as_str()) => {
                    file_err_logged = false;
                    match parse_peers_file(&text) {
                        Ok(p) => {
                            info!(file = %path.display(), peers = p.len(), "mesh peers file loaded");
                            file_peers = p;
                        }
                        Err(e) => {
                            error!(file = %path.display(), error = %e, "invalid mesh peers file; keeping the previous peer list");
                        }
                    }
                    file_text = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    if !file_err_logged {
                        warn!(file = %path.display(), error = %e, "cannot read mesh peers file; keeping the previous peer list");
                        file_err_logged = true;
                    }
                }
            }
        }
        let mut want: HashMap<String, PeerSpec> = HashMap::new();
        for p in cfg.peers.iter().chain(file_peers.iter()) {
            want.insert(p.id(), p.clone());
        }
        running.retain(|id, tok| {
            let keep = want.contains_key(id);
            if !keep {
                info!(peer = %id.split(' ').nth(1).unwrap_or(""), "mesh peer removed");
                tok.cancel();
            }
            keep
        });
        for (id, spec) in want {
            if running.contains_key(&id) {
                continue;
            }
            info!(peer = %spec.dial, "mesh peer added");
            let tok = cancel.child_token();
            running.insert(id, tok.clone());
            let span = tracing::info_span!("mesh_peer", peer = %spec.dial);
            tokio::spawn(
                run_peer(server.clone(), spec, cfg.mesh_key.clone(), tok).instrument(span),
            );
        }
        server
            .metrics()
            .mesh_peers_configured
            .set(i64::try_from(running.len()).unwrap_or(i64::MAX));
        if cfg.peers_file.is_none() {
            cancel.cancelled().await;
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(cfg.poll) => {}
        }
    }
}

/// How one connection attempt ended.
#[derive(Debug)]
enum Outcome {
    Cancelled,
    SelfConnect,
    ConnectFailed(ClientError),
    /// Closed before sending anything after WatchConns: it refused our mesh key.
    Refused,
    Lost(String),
}

async fn run_peer(server: Server, spec: PeerSpec, key: MeshKey, cancel: CancellationToken) {
    let m = server.metrics().clone();
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = Instant::now();
        match connect_once(&server, &spec, &key, &cancel).await {
            Outcome::Cancelled => return,
            Outcome::SelfConnect => {
                info!("detected self-connect (the peer is this server); ignoring this mesh peer");
                return;
            }
            Outcome::Refused => {
                m.mesh_connect_failures.inc();
                error!(
                    "mesh peer refused our mesh key: it closed the connection right after \
                     WatchConns (check that --mesh-psk-file holds the same key on both nodes)"
                );
            }
            Outcome::ConnectFailed(e) => {
                m.mesh_connect_failures.inc();
                warn!(error = %e, retry_in = ?backoff, "mesh connect failed");
            }
            Outcome::Lost(reason) => {
                info!(reason, "mesh connection lost; reconnecting");
            }
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = MIN_BACKOFF;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn resolve(dial: &str) -> Result<SocketAddr, ClientError> {
    tokio::net::lookup_host(dial)
        .await?
        .next()
        .ok_or_else(|| ClientError::Config(format!("{dial} resolves to nothing")))
}

async fn connect_once(
    server: &Server,
    spec: &PeerSpec,
    key: &MeshKey,
    cancel: &CancellationToken,
) -> Outcome {
    let attempt = async {
        let addr = resolve(&spec.dial).await?;
        let mut cfg = ClientConfig::new(addr);
        cfg.host = spec.host.clone();
        cfg.tls = spec.tls.clone();
        cfg.upgrade = UpgradeMode::Plain;
        cfg.mesh_key = Some(key.clone());
        cfg.can_ack_pings = false;
        Client::connect(&cfg, server.private_key()).await
    };
    let client = tokio::select! {
        _ = cancel.cancelled() => return Outcome::Cancelled,
        r = attempt => match r {
            Ok(c) => c,
            Err(e) => return Outcome::ConnectFailed(e),
        },
    };
    if client.server_key() == server.public_key() {
        return Outcome::SelfConnect;
    }
    let (mut reader, mut writer) = client.split();
    if let Err(e) = writer.watch_conns().await {
        return Outcome::ConnectFailed(e);
    }
    let m = server.metrics().clone();
    let registry = server.registry();
    let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
    let fwd = Arc::new(Forwarder::new(tx));
    let conn_cancel = cancel.child_token();
    let writer_task = tokio::spawn(
        forward_writer(writer, rx, conn_cancel.clone()).instrument(tracing::Span::current()),
    );
    let own = server.public_key();
    let mut learned: HashSet<NodePublicKey> = HashSet::new();
    let mut frames = 0u64;
    let outcome = loop {
        let r = tokio::select! {
            _ = conn_cancel.cancelled() => break if cancel.is_cancelled() {
                Outcome::Cancelled
            } else {
                Outcome::Lost("forward write failed".into())
            },
            r = reader.recv_timeout(READ_TIMEOUT) => r,
        };
        let f = match r {
            Ok(f) => f,
            Err(e)
                if frames == 0
                    && matches!(
                        e,
                        ClientError::Closed | ClientError::Read(_) | ClientError::Io(_)
                    ) =>
            {
                break Outcome::Refused;
            }
            Err(e) => break Outcome::Lost(e.to_string()),
        };
        frames += 1;
        if frames == 1 {
            m.mesh_connects.inc();
            m.mesh_peers_up.inc();
            info!("mesh peer up");
        }
        #[allow(clippy::collapsible_match)]
        match f {
            ServerFrame::PeerPresent { key, .. } => {
                if key != own && learned.insert(key) {
                    registry.add_forwarder(key, &fwd);
                }
            }
            ServerFrame::PeerGone { key, .. } => {
                if learned.remove(&key) {
                    registry.remove_forwarder(&key, &fwd);
                }
            }
            ServerFrame::Restarting { .. } => debug!("mesh peer is restarting"),
            _ => {}
        }
    };
    conn_cancel.cancel();
    // Everything learned over this connection is gone with it (spec §6.10).
    for k in &learned {
        registry.remove_forwarder(k, &fwd);
    }
    if frames > 0 {
        m.mesh_peers_up.dec();
    }
    let _ = writer_task.await;
    outcome
}

async fn forward_writer(
    mut writer: ClientWriter,
    mut rx: mpsc::Receiver<Fwd>,
    cancel: CancellationToken,
) {
    const BATCH_BYTES: usize = 256 * 1024;
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            p = rx.recv() => p,
        };
        let Some(p) = first else { break };
        writer.queue_forward_packet(&p.src, &p.dst, &p.data);
        while writer.queued_len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => writer.queue_forward_packet(&p.src, &p.dst, &p.data),
                Err(_) => break,
            }
        }
        let res = tokio::select! {
            _ = cancel.cancelled() => break,
            r = tokio::time::timeout(FORWARD_WRITE_TIMEOUT, writer.flush()) => r,
        };
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "mesh forward write failed; closing");
                break;
            }
            Err(_) => {
                warn!("mesh forward write took > 5 s; closing");
                break;
            }
        }
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn peers_file_lines() {
        let t = format!(
            "# comment\n\n127.0.0.2:443 {PIN}\n  [::1]:8443 {}  # v6\nderp.example.com:443 {PIN}\n",
            PIN.to_uppercase().replace("SHA256-RAW", "sha256-raw")
        );
        let p = parse_peers_file(&t).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].host, "127.0.0.2");
        assert_eq!(p[0].dial, "127.0.0.2:443");
        assert_eq!(p[0].tls, TlsMode::Pinned(PIN.parse().unwrap()));
        assert_eq!(p[1].host, "::1");
        assert_eq!(p[1].dial, "[::1]:8443");
        assert_eq!(p[1].tls, TlsMode::Pinned(PIN.parse().unwrap()));
        assert_eq!(p[2].host, "derp.example.com");
        assert!(parse_peers_file("127.0.0.1 x").is_err());
        assert!(parse_peers_file("127.0.0.1:1 sha256-raw:00").is_err());
        assert!(parse_peers_file(&format!("127.0.0.1:1 {PIN} extra")).is_err());
        assert!(parse_peers_file("").unwrap().is_empty());
    }

    #[test]
    fn mesh_with_list() {
        let p = parse_mesh_with(
            "a.example.com, b.example.com:8443,c.example.com/10.0.0.3",
            &[],
        )
        .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].dial, "a.example.com:443");
        assert_eq!(p[1].host, "b.example.com");
        assert_eq!(p[1].dial, "b.example.com:8443");
        assert_eq!(p[2].host, "c.example.com");
        assert_eq!(p[2].dial, "10.0.0.3:443");
        assert!(matches!(p[0].tls, TlsMode::Roots(_)));
        assert!(parse_mesh_with("", &[]).unwrap().is_empty());
    }
}
