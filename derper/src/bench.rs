//! Load-generation helpers for the `derp-bench` binary (performance.md §5.2): a TLS setup
//! that costs the load generator as little as possible, and a "corked" socket so that a
//! [`Client`] can emit one TLS record per packet (what tailscaled does) while the load
//! generator still pays one `write(2)` per batch of packets.
//!
//! Not a client of its own: the DERP upgrade and handshake are [`Client::connect_stream`];
//! this module only supplies the stream underneath it. Not used by the relay.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::client::{Client, ClientConfig, ClientError, UpgradeMode};
use crate::key::NodePrivateKey;
use crate::tls_stream::records::{self, RecordKeys};

/// Bytes buffered by a corked socket before a write is forced even while corked.
const CORK_MAX: usize = 256 * 1024;

/// Accepts any certificate without checking signatures: the load generator must not spend
/// its core on ECDSA verification (performance.md §5.2). Benchmarks only.
#[derive(Debug)]
struct NoVerify(Vec<SignatureScheme>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.clone()
    }
}

/// The load generator's TLS settings, identical for every server under test: TLS 1.3 only,
/// `TLS13_AES_128_GCM_SHA256` only, X25519 only (so both servers negotiate the same
/// parameters), ring crypto, no certificate verification, no session resumption (every
/// handshake is a full one).
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    let base = rustls::crypto::ring::default_provider();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![rustls::crypto::ring::kx_group::X25519],
        ..base
    };
    let mut c = insecure_client_config(provider, &[&rustls::version::TLS13]);
    c.resumption = rustls::client::Resumption::disabled();
    // After the handshake the generator seals and opens records itself ([`RecordStream`]).
    c.enable_secret_extraction = true;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// A client configuration that accepts any server certificate (load generation and tests
/// only), for `provider` and `versions`.
///
/// # Panics
/// If `provider` supports none of `versions` (a programming error in the caller).
pub fn insecure_client_config(
    provider: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes()
        .clone();
    rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .expect("the provider supports the requested TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(schemes)))
        .with_no_client_auth()
}

/// Controls a [`CorkedIo`]: while corked, writes and flushes only buffer.
#[derive(Debug, Clone, Default)]
pub struct Cork(Arc<AtomicBool>);

impl Cork {
    /// Starts buffering.
    pub fn cork(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Stops buffering; the next flush writes everything buffered.
    pub fn uncork(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    fn is_corked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A TCP stream whose writes are buffered and sent on flush, but only when not corked
/// (or when more than 256 KiB are pending).
#[derive(Debug)]
pub struct CorkedIo {
    tcp: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    cork: Cork,
}

impl CorkedIo {
    /// Wraps a connected stream.
    pub fn new(tcp: TcpStream, cork: Cork) -> Self {
        Self {
            tcp,
            buf: Vec::new(),
            pos: 0,
            cork,
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for CorkedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for CorkedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() >= CORK_MAX {
            ready!(self.poll_drain(cx))?;
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.cork.is_corked() && self.buf.len() < CORK_MAX {
            return Poll::Ready(Ok(()));
        }
        self.poll_drain(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Where and how the load generator connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// The relay's TLS listener.
    pub addr: SocketAddr,
    /// TLS settings ([`tls_config`]).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Dials `target` from `src` (a loopback address, so tests can spread connections over
/// many source addresses), with `SO_LINGER 0` so a closed connection leaves no TIME_WAIT
/// behind, then runs TLS and the DERP upgrade + handshake through [`Client::connect_stream`].
pub async fn connect(
    target: &Target,
    src: Option<IpAddr>,
    key: &NodePrivateKey,
) -> Result<(Client, Cork), ClientError> {
    let sock = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = sock.connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    tcp.set_zero_linger()?;
    let cork = Cork::default();
    let io = CorkedIo::new(tcp, cork.clone());
    let name = ServerName::IpAddress(target.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, io)
        .await?;
    let (io, conn) = tls.into_inner();
    // Nothing can be buffered yet: the client spoke last (its Finished) and the relay's
    // first records (session tickets) arrive after this.
    #[allow(deprecated)]
    let secrets = conn.dangerous_extract_secrets()?;
    let stream = RecordStream::new(io, RecordKeys::new(secrets)?);
    let mut cfg = ClientConfig::new(target.addr);
    cfg.upgrade = UpgradeMode::Plain;
    let client = Client::connect_stream(stream, &cfg, key).await?;
    Ok((client, cork))
}

/// The load generator's TLS 1.3 connection after the handshake: records sealed and opened
/// in place with the keys rustls extracted, written straight into the [`CorkedIo`] buffer
/// (one record per write call, as tailscaled sends one record per packet). It makes the
/// generator cheaper per packet than rustls' buffered connection, so that it saturates
/// the relay rather than itself. Session tickets from the server are ignored (resumption
/// is off); a KeyUpdate from the server ends the connection (the relay sends one only
/// after 2^23 records).
pub struct RecordStream {
    io: CorkedIo,
    keys: RecordKeys,
    /// Received bytes: `rbuf[start..end]` not yet opened, `rbuf[plain]` opened content
    /// not yet read.
    rbuf: Box<[u8]>,
    start: usize,
    end: usize,
    plain: std::ops::Range<usize>,
    eof: bool,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("io", &self.io)
            .field("buffered", &(self.end - self.start))
            .finish_non_exhaustive()
    }
}

/// Receive buffer of a [`RecordStream`]: several full records.
const RECORD_RBUF: usize = 64 * 1024;

impl RecordStream {
    fn new(io: CorkedIo, keys: RecordKeys) -> RecordStream {
        RecordStream {
            io,
            keys,
            rbuf: vec![0u8; RECORD_RBUF].into_boxed_slice(),
            start: 0,
            end: 0,
            plain: 0..0,
            eof: false,
        }
    }

    /// Open the next complete record, if any; true if one was opened.
    fn open_next(&mut self) -> io::Result<bool> {
        let data = self.rbuf.get_mut(self.start..self.end).unwrap_or_default();
        let Some(rec) = self.keys.open_one(data)? else {
            return Ok(false);
        };
        let content = data.get(rec.content.clone()).unwrap_or_default();
        let at = self.start;
        self.start += rec.len;
        match rec.typ {
            records::CONTENT_APPLICATION_DATA => {
                self.plain = at + rec.content.start..at + rec.content.end;
            }
            records::CONTENT_ALERT if content.get(1) == Some(&records::ALERT_CLOSE_NOTIFY) => {
                self.eof = true;
            }
            records::CONTENT_ALERT => {
                return Err(io::Error::other(format!(
                    "relay sent TLS alert {content:?}"
                )));
            }
            // NewSessionTicket(s): resumption is off, nothing to keep.
            records::CONTENT_HANDSHAKE if content.first() == Some(&4) => {}
            _ => {
                return Err(io::Error::other(
                    "unexpected post-handshake TLS message (KeyUpdate is not supported here)",
                ));
            }
        }
        Ok(true)
    }
}

impl AsyncRead for RecordStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                let from = this.plain.start;
                buf.put_slice(this.rbuf.get(from..from + n).unwrap_or_default());
                this.plain.start += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // Need more bytes: move the partial record to the front, then read.
            if this.start > 0 {
                this.rbuf.copy_within(this.start..this.end, 0);
                this.end -= this.start;
                this.start = 0;
            }
            let mut rb = ReadBuf::new(this.rbuf.get_mut(this.end..).unwrap_or_default());
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
            this.end += n;
        }
    }
}

impl AsyncWrite for RecordStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.io.buf.len() >= CORK_MAX {
            ready!(this.io.poll_drain(cx))?;
        }
        let n = data.len().min(records::MAX_PLAINTEXT);
        let chunk = data.get(..n).unwrap_or_default();
        this.keys
            .seal_record(records::CONTENT_APPLICATION_DATA, chunk, &mut this.io.buf)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.eof {
            // Best effort close_notify; the socket is shut down either way.
            let _ = this.keys.seal_record(
                records::CONTENT_ALERT,
                &[1, records::ALERT_CLOSE_NOTIFY],
                &mut this.io.buf,
            );
            this.eof = true;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// A throwaway certificate authority and a `127.0.0.1` server certificate it issued, for
/// meshing relays on loopback: upstream derper's `--mesh-with` (and ours) verify mesh peers
/// against the CA roots in `SSL_CERT_FILE`, so a self-signed leaf will not do.
#[derive(Debug, Clone)]
pub struct LoopbackCa {
    /// The CA certificate (PEM); point `SSL_CERT_FILE` at it.
    pub ca_pem: String,
    /// The leaf certificate for IP `127.0.0.1` (PEM).
    pub leaf_pem: String,
    /// The leaf's PKCS#8 private key (PEM).
    pub leaf_key_pem: String,
    /// `sha256-raw:` pin of the leaf.
    pub leaf_pin: String,
}

impl LoopbackCa {
    /// Generate a fresh CA (ECDSA P-256) and a `127.0.0.1` server leaf.
    ///
    /// # Errors
    /// Key generation or signing failed (rcgen).
    pub fn generate() -> Result<LoopbackCa, rcgen::Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "kubederp loopback test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let mut leaf_params = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        Ok(LoopbackCa {
            ca_pem: ca.pem(),
            leaf_pin: crate::pin::Pin::of_der(leaf.der()).to_string(),
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        })
    }
}
