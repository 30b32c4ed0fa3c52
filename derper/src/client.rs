//! A DERP client: dial (plain TCP or TLS with a `sha256-raw:` pin), upgrade (plain 101,
//! fast start or WebSocket), handshake, then send and receive frames. Used by tests, mesh,
//! probes and the load generator.
//!
//! Not a tailscaled replacement: no reconnect loop, no DERPMap handling, no WebPKI
//! verification (use a pin, or `Insecure` for tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::http::head::find_head_end;
use crate::key::{MeshKey, NodePrivateKey, NodePublicKey};
use crate::pin::{Pin, PinnedVerifier, parse_metacert};
use crate::proto::codec::{self, FrameReader, ReadError, ReadPolicy, ServerFrame};
use crate::proto::handshake::{self, ClientInfo, ServerInfo};
use crate::proto::{DecodeError, FrameType, PROTOCOL_VERSION};
use crate::ws::{Role, WsStream};

/// How to secure the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP (tests, `TS_DEBUG_USE_DERP_HTTP`-style).
    Plain,
    /// TLS; accept only the pinned end-entity certificate, followed by nothing but
    /// metacerts ([`crate::pin::check_chain`]).
    Pinned(Pin),
    /// TLS without any verification (tests only).
    Insecure,
    /// TLS verified against these trust anchors (DER certificates) for the host name, as
    /// for WebPKI-certified nodes (e.g. mesh peers with CA-issued certificates).
    Roots(Vec<CertificateDer<'static>>),
}

/// Which upgrade to perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeMode {
    /// Fast start if TLS 1.3 and a usable metacert were seen (like Go), else plain.
    Auto,
    /// `Upgrade: DERP`, wait for the 101.
    Plain,
    /// `Derp-Fast-Start: 1` with ClientInfo sealed to this (known) server key.
    FastStart(NodePublicKey),
    /// WebSocket with subprotocol `derp`.
    WebSocket,
}

/// Client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Address to dial.
    pub addr: SocketAddr,
    /// `Host` header and TLS server name (an IP literal sends no SNI).
    pub host: String,
    /// TLS mode.
    pub tls: TlsMode,
    /// Restrict TLS to 1.2 (tests).
    pub tls12_only: bool,
    /// Upgrade mode.
    pub upgrade: UpgradeMode,
    /// Mesh key to present.
    pub mesh_key: Option<MeshKey>,
    /// Send `IsProber`.
    pub is_prober: bool,
    /// Send `CanAckPings` (true for tailscaled).
    pub can_ack_pings: bool,
    /// Extra request header `Ideal-Node`.
    pub ideal_node: Option<String>,
    /// Total connect + handshake timeout (Go: 10 s).
    pub connect_timeout: Duration,
}

impl ClientConfig {
    /// Plain TCP to `addr`, plain upgrade.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.ip().to_string(),
            tls: TlsMode::Plain,
            tls12_only: false,
            upgrade: UpgradeMode::Plain,
            mesh_key: None,
            is_prober: false,
            can_ack_pings: true,
            ideal_node: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// I/O failure.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup failure.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// Unexpected HTTP response.
    #[error("unexpected HTTP response: {0}")]
    Http(String),
    /// Handshake frame problem.
    #[error("handshake: {0}")]
    Handshake(#[from] DecodeError),
    /// Reading frames failed.
    #[error("read: {0}")]
    Read(#[from] ReadError),
    /// Connection closed by the server.
    #[error("connection closed")]
    Closed,
    /// Timed out.
    #[error("timed out")]
    Timeout,
    /// Invalid configuration.
    #[error("config: {0}")]
    Config(String),
}

/// Any bidirectional byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type BoxIo = Box<dyn Io>;

fn tls_config(cfg: &ClientConfig) -> Result<Option<Arc<rustls::ClientConfig>>, ClientError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if cfg.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match &cfg.tls {
        TlsMode::Plain => return Ok(None),
        TlsMode::Roots(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c.clone())?;
            }
            let c = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            return Ok(Some(Arc::new(c)));
        }
        TlsMode::Insecure => PinnedVerifier::insecure(&provider),
        TlsMode::Pinned(pin) => PinnedVerifier::new(*pin, &provider),
    };
    Ok(Some(Arc::new(verifier.client_config(provider, versions)?)))
}

/// Sending half of a connected client.
#[derive(Debug)]
pub struct ClientWriter {
    wr: WriteHalf<BoxIo>,
    buf: BytesMut,
}

impl std::fmt::Debug for dyn Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Io")
    }
}

impl ClientWriter {
    async fn flush_buf(&mut self) -> Result<(), ClientError> {
        self.wr.write_all(&self.buf).await?;
        self.wr.flush().await?;
        self.buf.clear();
        Ok(())
    }

    /// Sends SendPacket(dst, packet).
    pub async fn send_packet(
        &mut self,
        dst: &NodePublicKey,
        packet: &[u8],
    ) -> Result<(), ClientError> {
        codec::write_send_packet(&mut self.buf, dst, packet);
        self.flush_buf().await
    }

    /// Queues SendPacket without flushing (call [`Self::flush`]).
    pub fn queue_packet(&mut self, dst: &NodePublicKey, packet: &[u8]) {
        codec::write_send_packet(&mut self.buf, dst, packet);
    }

    /// Writes queued frames.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.flush_buf().await
    }

    /// Sends NotePreferred.
    pub async fn note_preferred(&mut self, preferred: bool) -> Result<(), ClientError> {
        codec::write_note_preferred(&mut self.buf, preferred);
        self.flush_buf().await
    }

    /// Sends Ping.
    pub async fn send_ping(&mut self, data: [u8; 8]) -> Result<(), ClientError> {
        codec::write_ping(&mut self.buf, &data);
        self.flush_buf().await
    }

    /// Sends Pong.
    pub async fn send_pong(&mut self, data: [u8; 8]) -> Result<(), ClientError> {
        codec::write_pong(&mut self.buf, &data);
        self.flush_buf().await
    }

    /// Sends WatchConns (mesh).
    pub async fn watch_conns(&mut self) -> Result<(), ClientError> {
        codec::write_watch_conns(&mut self.buf);
        self.flush_buf().await
    }

    /// Sends ClosePeer (mesh).
    pub async fn close_peer(&mut self, key: &NodePublicKey) -> Result<(), ClientError> {
        codec::write_close_peer(&mut self.buf, key);
        self.flush_buf().await
    }

    /// Sends ForwardPacket (mesh).
    pub async fn forward_packet(
        &mut self,
        src: &NodePublicKey,
        dst: &NodePublicKey,
        packet: &[u8],
    ) -> Result<(), ClientError> {
        codec::write_forward_packet(&mut self.buf, src, dst, packet);
        self.flush_buf().await
    }

    /// Queues ForwardPacket without flushing (call [`Self::flush`]); used by the mesh
    /// forwarder to batch frames.
    pub fn queue_forward_packet(
        &mut self,
        src: &NodePublicKey,
        dst: &NodePublicKey,
        packet: &[u8],
    ) {
        codec::write_forward_packet(&mut self.buf, src, dst, packet);
    }

    /// Bytes queued and not yet flushed.
    pub fn queued_len(&self) -> usize {
        self.buf.len()
    }

    /// Writes arbitrary bytes (tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.buf.extend_from_slice(bytes);
        self.flush_buf().await
    }

    /// Closes the write side.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        self.wr.shutdown().await?;
        Ok(())
    }
}

/// Receiving half of a connected client.
#[derive(Debug)]
pub struct ClientReader {
    reader: FrameReader<ReadHalf<BoxIo>>,
}

impl ClientReader {
    /// Receives the next frame. Malformed frames (e.g. a short RecvPacket) are skipped as
    /// Go clients do (spec §4.6).
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            let raw = self.reader.read_frame().await?.ok_or(ClientError::Closed)?;
            match codec::decode_server_frame(raw.typ, raw.payload) {
                Ok(f) => return Ok(f),
                Err(e) => tracing::debug!(error = %e, "skipping malformed frame"),
            }
        }
    }

    /// Receives with a timeout.
    pub async fn recv_timeout(&mut self, t: Duration) -> Result<ServerFrame, ClientError> {
        tokio::time::timeout(t, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// A connected DERP client.
#[derive(Debug)]
pub struct Client {
    reader: ClientReader,
    writer: ClientWriter,
    key: NodePublicKey,
    server_key: NodePublicKey,
    server_info: ServerInfo,
    used_fast_start: bool,
}

impl Client {
    /// Dials, upgrades and completes the handshake within `cfg.connect_timeout`.
    pub async fn connect(cfg: &ClientConfig, key: &NodePrivateKey) -> Result<Self, ClientError> {
        tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg, key))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(cfg: &ClientConfig, key: &NodePrivateKey) -> Result<Self, ClientError> {
        let tcp = TcpStream::connect(cfg.addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut upgrade = cfg.upgrade;
        let io: BoxIo = match tls_config(cfg)? {
            None => {
                if upgrade == UpgradeMode::Auto {
                    upgrade = UpgradeMode::Plain;
                }
                Box::new(tcp)
            }
            Some(tc) => {
                let name = match cfg.host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ServerName::IpAddress(ip.into()),
                    Err(_) => ServerName::try_from(cfg.host.clone())
                        .map_err(|e| ClientError::Config(e.to_string()))?,
                };
                let s = tokio_rustls::TlsConnector::from(tc)
                    .connect(name, tcp)
                    .await?;
                if upgrade == UpgradeMode::Auto {
                    let (_, conn) = s.get_ref();
                    let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
                    let meta = conn
                        .peer_certificates()
                        .and_then(|cs| cs.iter().find_map(|c| parse_metacert(c)))
                        .map(|m| m.key);
                    upgrade = match (tls13, meta) {
                        (true, Some(k)) if !k.is_zero() => UpgradeMode::FastStart(k),
                        _ => UpgradeMode::Plain,
                    };
                }
                Box::new(s)
            }
        };
        Self::handshake(io, cfg, upgrade, key).await
    }

    /// Runs the upgrade and DERP handshake over an existing stream.
    pub async fn connect_stream<S>(
        stream: S,
        cfg: &ClientConfig,
        key: &NodePrivateKey,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let upgrade = match cfg.upgrade {
            UpgradeMode::Auto => UpgradeMode::Plain,
            u => u,
        };
        Self::handshake(Box::new(stream), cfg, upgrade, key).await
    }

    fn client_info(cfg: &ClientConfig) -> ClientInfo {
        ClientInfo {
            mesh_key: cfg.mesh_key.as_ref().map(MeshKey::to_hex),
            version: PROTOCOL_VERSION,
            can_ack_pings: cfg.can_ack_pings,
            is_prober: cfg.is_prober,
        }
    }

    async fn handshake(
        mut io: BoxIo,
        cfg: &ClientConfig,
        upgrade: UpgradeMode,
        key: &NodePrivateKey,
    ) -> Result<Self, ClientError> {
        let info = Self::client_info(cfg);
        let mut req = format!("GET /derp HTTP/1.1\r\nHost: {}\r\n", cfg.host);
        req.push_str("User-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\n");
        let mut out = BytesMut::new();
        let mut fast_key = None;
        match upgrade {
            UpgradeMode::FastStart(k) => {
                req.push_str("Derp-Fast-Start: 1\r\n");
                fast_key = Some(k);
            }
            UpgradeMode::WebSocket => {
                let wskey = base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    rand::random::<[u8; 16]>(),
                );
                req = format!(
                    "GET /derp HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {wskey}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n",
                    cfg.host
                );
            }
            _ => {}
        }
        if let Some(n) = &cfg.ideal_node {
            req.push_str(&format!("Ideal-Node: {n}\r\n"));
        }
        if upgrade != UpgradeMode::WebSocket {
            req.push_str("Upgrade: DERP\r\n");
        }
        req.push_str("\r\n");
        out.extend_from_slice(req.as_bytes());
        if let Some(k) = fast_key {
            // spec §1.4: the request and ClientInfo go out in one flush.
            handshake::write_client_info(&mut out, key, &k, &info, &handshake::random_nonce());
        }
        io.write_all(&out).await?;
        io.flush().await?;

        let mut leftover = BytesMut::new();
        if fast_key.is_none() {
            // Read the 101 response head.
            loop {
                if let Some(end) = find_head_end(&leftover) {
                    let head = leftover.split_to(end);
                    let status = std::str::from_utf8(&head)
                        .ok()
                        .and_then(|s| s.split(' ').nth(1))
                        .unwrap_or("");
                    if status != "101" {
                        let line = String::from_utf8_lossy(&head);
                        return Err(ClientError::Http(
                            line.lines().next().unwrap_or("").to_owned(),
                        ));
                    }
                    break;
                }
                if leftover.len() > 16 * 1024 {
                    return Err(ClientError::Http("response head too long".into()));
                }
                if io.read_buf(&mut leftover).await? == 0 {
                    return Err(ClientError::Closed);
                }
            }
        }
        if upgrade == UpgradeMode::WebSocket {
            io = Box::new(WsStream::new(io, Role::Client, leftover));
            leftover = BytesMut::new();
        }
        let (rd, wr) = tokio::io::split(io);
        let mut reader = ClientReader {
            reader: FrameReader::new(rd, leftover, ReadPolicy::FromServer),
        };
        let mut writer = ClientWriter {
            wr,
            buf: BytesMut::new(),
        };
        // ServerKey first.
        let raw = reader
            .reader
            .read_frame()
            .await?
            .ok_or(ClientError::Closed)?;
        if raw.typ != FrameType::ServerKey as u8 {
            return Err(DecodeError::UnexpectedType {
                got: raw.typ,
                want: FrameType::ServerKey as u8,
            }
            .into());
        }
        let server_key = handshake::parse_server_key(&raw.payload)?;
        match fast_key {
            Some(k) if k != server_key => {
                return Err(ClientError::Config(
                    "server key differs from the fast-start key".into(),
                ));
            }
            Some(_) => {}
            None => {
                handshake::write_client_info(
                    &mut writer.buf,
                    key,
                    &server_key,
                    &info,
                    &handshake::random_nonce(),
                );
                writer.flush_buf().await?;
            }
        }
        // ServerInfo must be next (spec §5.1).
        let raw = reader
            .reader
            .read_frame()
            .await?
            .ok_or(ClientError::Closed)?;
        if raw.typ != FrameType::ServerInfo as u8 {
            return Err(DecodeError::UnexpectedType {
                got: raw.typ,
                want: FrameType::ServerInfo as u8,
            }
            .into());
        }
        let server_info = handshake::open_server_info(key, &server_key, &raw.payload)?;
        Ok(Self {
            reader,
            writer,
            key: key.public(),
            server_key,
            server_info,
            used_fast_start: fast_key.is_some(),
        })
    }

    /// Our public key.
    pub fn public_key(&self) -> NodePublicKey {
        self.key
    }

    /// The server's public key (from the ServerKey frame).
    pub fn server_key(&self) -> NodePublicKey {
        self.server_key
    }

    /// The decoded ServerInfo.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server_info
    }

    /// Whether fast start was used.
    pub fn used_fast_start(&self) -> bool {
        self.used_fast_start
    }

    /// Splits into independently usable halves.
    pub fn split(self) -> (ClientReader, ClientWriter) {
        (self.reader, self.writer)
    }

    /// The writer half.
    pub fn writer(&mut self) -> &mut ClientWriter {
        &mut self.writer
    }

    /// Sends a packet.
    pub async fn send_packet(
        &mut self,
        dst: &NodePublicKey,
        packet: &[u8],
    ) -> Result<(), ClientError> {
        self.writer.send_packet(dst, packet).await
    }

    /// Receives the next frame.
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        self.reader.recv().await
    }

    /// Receives the next frame with a timeout.
    pub async fn recv_timeout(&mut self, t: Duration) -> Result<ServerFrame, ClientError> {
        self.reader.recv_timeout(t).await
    }

    /// Receives frames until a RecvPacket arrives (others are discarded).
    pub async fn recv_packet(
        &mut self,
        t: Duration,
    ) -> Result<(NodePublicKey, Bytes), ClientError> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let ServerFrame::RecvPacket { src, packet } = self.recv_timeout(left).await? {
                return Ok((src, packet));
            }
        }
    }

    /// Sends a Ping and waits for the matching Pong; returns the round-trip time.
    /// Frames other than the Pong are discarded.
    pub async fn ping(&mut self, t: Duration) -> Result<Duration, ClientError> {
        let data: [u8; 8] = rand::random();
        let start = tokio::time::Instant::now();
        self.writer.send_ping(data).await?;
        loop {
            let left = (start + t).saturating_duration_since(tokio::time::Instant::now());
            if let ServerFrame::Pong(d) = self.recv_timeout(left).await?
                && d == data
            {
                return Ok(start.elapsed());
            }
        }
    }
}

/// Decodes `Bytes` of a raw HTTP response head's status code (helper for tests).
pub fn status_code(head: &[u8]) -> Option<u16> {
    std::str::from_utf8(head)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}
