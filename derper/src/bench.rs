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
    let mut cfg = ClientConfig::new(target.addr);
    cfg.upgrade = UpgradeMode::Plain;
    let client = Client::connect_stream(tls, &cfg, key).await?;
    Ok((client, cork))
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
            leaf_pin: crate::certs::pin_of(leaf.der()),
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        })
    }
}
