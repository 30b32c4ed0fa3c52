//! rustls server configuration for the DERP listener: which certificates a handshake
//! presents (spec §1.2, §2), the metacert (spec §2.1) and hot reloading of the
//! manual-mode certificate files.
//!
//! Chain policy (spec §2.7): a pinned (`sha256-raw:`) self-signed leaf is served alone,
//! because v1.82 clients reject any handshake presenting more than one certificate. The
//! metacert is appended after the chain only when the caller passes one to
//! [`CertResolver::new`]; that is meant for public-CA certificates, where TLS 1.3 clients
//! use it for fast start. Upstream Go always appends it (which is what breaks v1.82).
//!
//! Not here: loading and generating the files ([`crate::certs`]), accepting connections,
//! HTTP. SNI is never required and never checked: a ClientHello without SNI (IP
//! hostnames) gets the current certificate, and so does any other SNI.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, LoadedCert};

pub use crate::pin::METACERT_CN_PREFIX;
/// Serial number of the metacert: the DERP protocol version (spec §2.1).
pub const METACERT_SERIAL: u64 = 2;
/// Metacert validity on either side of "now" (spec §2.1: ±30 days).
const METACERT_VALIDITY: time::Duration = time::Duration::days(30);
/// ALPN protocol we advertise (spec §1.2: Go's manual cert mode advertises `http/1.1`).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen could not build the metacert.
    #[error("generating the metacert: {0}")]
    Metacert(#[source] rcgen::Error),
    /// The certificate has no leaf.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// rustls cannot use the private key (unsupported type or not matching the leaf).
    #[error("private key unusable for the certificate: {0}")]
    Key(#[source] rustls::Error),
}

/// When to append the metacert (spec §2.7's per-listener setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MetacertMode {
    /// Only for certificates that are not pinned (CA-issued chains).
    Auto,
    /// Always (breaks v1.82 clients of a pinned certificate, spec §2.4).
    On,
    /// Never (the default: the relay's certificates are normally pinned).
    #[default]
    Off,
}

impl MetacertMode {
    /// Whether a certificate like `cert` should be served with the metacert.
    pub fn enabled_for(self, cert: &LoadedCert) -> bool {
        match self {
            MetacertMode::Auto => cert.pin.is_none(),
            MetacertMode::On => true,
            MetacertMode::Off => false,
        }
    }
}

impl fmt::Display for MetacertMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MetacertMode::Auto => "auto",
            MetacertMode::On => "on",
            MetacertMode::Off => "off",
        })
    }
}

impl std::str::FromStr for MetacertMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(MetacertMode::Auto),
            "on" | "true" => Ok(MetacertMode::On),
            "off" | "false" => Ok(MetacertMode::Off),
            other => Err(format!(
                "invalid metacert mode {other:?} (want auto, on or off)"
            )),
        }
    }
}

/// Build the metacert for `server_public_key` exactly like Go's `initMetacert` (spec §2.1):
/// fresh Ed25519 key, serial 2, subject = issuer = `CN=derpkey<64 lowercase hex>`,
/// validity now ± 30 days, one extension (critical Basic Constraints, `cA = false`).
pub fn metacert(server_public_key: &[u8; 32]) -> Result<CertificateDer<'static>, TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(TlsError::Metacert)?;
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("{METACERT_CN_PREFIX}{}", hex::encode(server_public_key)),
    );
    params.distinguished_name = dn;
    params.serial_number = Some(rcgen::SerialNumber::from(METACERT_SERIAL));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - METACERT_VALIDITY;
    params.not_after = now + METACERT_VALIDITY;
    // `NoCa` + a hand-made Basic Constraints: rcgen's `ExplicitNoCa` would add an SKI,
    // and the metacert must carry exactly one extension (spec §2.1).
    params.is_ca = rcgen::IsCa::NoCa;
    params.custom_extensions = vec![certs::basic_constraints_not_ca()];
    let cert = params.self_signed(&key).map_err(TlsError::Metacert)?;
    Ok(cert.der().clone())
}

/// What one handshake is served: the certified key and its description for logs.
struct Served {
    key: Arc<CertifiedKey>,
    pin: Option<String>,
    leaf_sha256: String,
    /// The leaf's notAfter (Unix seconds), 0 when it cannot be read.
    not_after: i64,
}

/// Serves the current certificate to every ClientHello and lets it be swapped at run time.
///
/// Existing connections keep the certificate they were handshaken with; only new
/// handshakes see a replacement.
pub struct CertResolver {
    /// The served key. A std lock is fine: held only to clone or replace an `Arc`, never
    /// across an `.await`.
    current: RwLock<Arc<Served>>,
    metacert: Option<CertificateDer<'static>>,
    /// notAfter of the served leaf, kept current across reloads ([`Self::not_after_gauge`]).
    not_after: Gauge,
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let served = self.served();
        f.debug_struct("CertResolver")
            .field("chain_len", &served.key.cert.len())
            .field("pin", &served.pin)
            .field("leaf_sha256", &served.leaf_sha256)
            .field("metacert", &self.metacert.is_some())
            .finish()
    }
}

impl CertResolver {
    /// A resolver serving `cert`, plus `metacert` appended last when given (metacert mode).
    ///
    /// Pass `None` for pinned self-signed certificates (spec §2.7): with a metacert the
    /// handshake presents two certificates and v1.82 pinned clients refuse it.
    /// [`MetacertMode::enabled_for`] decides this from a flag.
    pub fn new(
        cert: LoadedCert,
        metacert: Option<CertificateDer<'static>>,
    ) -> Result<Arc<Self>, TlsError> {
        if cert.pin.is_some() && metacert.is_some() {
            tracing::warn!(
                "metacert enabled with a pinned self-signed certificate: \
                 v1.82 clients will reject the handshake (spec §2.4)"
            );
        }
        let served = Self::prepare(cert, metacert.as_ref())?;
        let not_after = Gauge::default();
        not_after.set(served.not_after);
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(served)),
            metacert,
            not_after,
        }))
    }

    /// Serve `cert` to all new handshakes from now on.
    pub fn replace(&self, cert: LoadedCert) -> Result<(), TlsError> {
        let served = Arc::new(Self::prepare(cert, self.metacert.as_ref())?);
        self.not_after.set(served.not_after);
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value is
        // still a complete `Arc<Served>`, so keep going.
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = served;
        Ok(())
    }

    /// A gauge holding the served leaf's notAfter in Unix seconds, updated on every reload;
    /// `derper` registers it as `derper_cert_not_after_seconds` (certificate expiry alerts).
    pub fn not_after_gauge(&self) -> Gauge {
        self.not_after.clone()
    }

    /// The pin of the certificate now served (`None` for a CA-issued chain).
    pub fn current_pin(&self) -> Option<String> {
        self.served().pin.clone()
    }

    /// The exact certificate list now presented in each handshake (incl. the metacert).
    pub fn presented_chain(&self) -> Vec<CertificateDer<'static>> {
        self.served().key.cert.clone()
    }

    /// Whether a metacert is appended (metacert mode).
    pub fn metacert_enabled(&self) -> bool {
        self.metacert.is_some()
    }

    /// Poll `<certdir>/<stem>.crt|.key` every `interval` and swap in a changed, valid
    /// certificate. A bad or half-written pair is logged once at `warn` and the old
    /// certificate keeps being served; files are never generated here. Stops on `cancel`.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        certdir: PathBuf,
        hostname: String,
        interval: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let resolver = Arc::clone(self);
        tokio::spawn(async move {
            let (cert_path, key_path) = certs::cert_paths(&certdir, &hostname);
            let mut reloader = Reloader {
                resolver,
                cert_path,
                key_path,
                hostname,
                last_seen: None,
            };
            // Whatever is on disk now is what was loaded at start-up (or newer, which the
            // leaf comparison in `check` handles).
            reloader.last_seen = reloader.read_files().await.ok();
            let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break,
                    _ = ticker.tick() => reloader.check().await,
                }
            }
        })
    }

    fn served(&self) -> Arc<Served> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn prepare(
        cert: LoadedCert,
        metacert: Option<&CertificateDer<'static>>,
    ) -> Result<Served, TlsError> {
        let leaf_sha256 = cert.leaf_sha256_hex();
        let not_after = cert
            .leaf()
            .and_then(|l| certs::not_after_unix(l))
            .unwrap_or_default();
        let LoadedCert {
            mut chain,
            key,
            pin,
            ..
        } = cert;
        if chain.is_empty() {
            return Err(TlsError::EmptyChain);
        }
        if pin.is_some() {
            // Pinned clients accept exactly one (non-metacert) certificate (spec §2.4).
            chain.truncate(1);
        }
        if let Some(m) = metacert {
            chain.push(m.clone());
        }
        let signing_key =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(TlsError::Key)?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(TlsError::Key(e)),
        }
        Ok(Served {
            key: Arc::new(certified),
            pin,
            leaf_sha256,
            not_after,
        })
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI check (spec §1.2): clients dialling an IP send none.
        Some(Arc::clone(&self.served().key))
    }
}

/// State of the polling task.
struct Reloader {
    resolver: Arc<CertResolver>,
    cert_path: PathBuf,
    key_path: PathBuf,
    hostname: String,
    /// File contents (or the read error text) last looked at, to act once per change.
    last_seen: Option<(Vec<u8>, Vec<u8>)>,
}

impl Reloader {
    async fn read_files(&self) -> Result<(Vec<u8>, Vec<u8>), (PathBuf, std::io::Error)> {
        let read = |p: &Path| {
            let p = p.to_owned();
            async move { tokio::fs::read(&p).await.map_err(|e| (p, e)) }
        };
        Ok((read(&self.cert_path).await?, read(&self.key_path).await?))
    }

    async fn check(&mut self) {
        let contents = match self.read_files().await {
            Ok(c) => c,
            Err((path, e)) => {
                // Remember the failure as "no contents" so it is reported once.
                if self.last_seen.take().is_some() {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "cannot read certificate file; keeping the current certificate"
                    );
                }
                return;
            }
        };
        if self.last_seen.as_ref() == Some(&contents) {
            return;
        }
        let (crt, key) = &contents;
        let parsed = certs::parse_pair(crt, key, &self.cert_path, &self.key_path, &self.hostname);
        self.last_seen = Some(contents);
        let loaded = match parsed {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "new certificate files rejected; keeping the current certificate");
                return;
            }
        };
        if loaded.leaf_sha256_hex() == self.resolver.served().leaf_sha256 {
            // Same leaf (e.g. files rewritten or re-linked): swap quietly, the chain or key
            // encoding may still differ.
            if let Err(e) = self.resolver.replace(loaded) {
                tracing::warn!(error = %e, "certificate files unusable; keeping the current certificate");
            } else {
                tracing::debug!("certificate files changed but the leaf is the same");
            }
            return;
        }
        let pin = loaded.pin.clone();
        let leaf_sha256 = loaded.leaf_sha256_hex();
        match self.resolver.replace(loaded) {
            Ok(()) => tracing::info!(
                cert = %self.cert_path.display(),
                pin = pin.as_deref().unwrap_or("none (CA-issued)"),
                leaf_sha256 = %leaf_sha256,
                "reloaded TLS certificate"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "new certificate unusable; keeping the current certificate"
            ),
        }
    }
}

/// The rustls server config for the DERP listener (spec §1.2): ring provider, TLS 1.3 and
/// 1.2, ALPN `http/1.1`, certificates from `resolver`, no client authentication, secret
/// extraction on (for `crate::tls_stream`).
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // TLS 1.3 connections hand their keys to `tls_stream`'s own record layer after the
    // handshake (rustls' kernel-connection API); the keys never leave the process.
    config.enable_secret_extraction = true;
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use sha2::{Digest as _, Sha256};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use x509_parser::prelude::*;

    /// The v1.82 `sha256-raw:` check (spec §2.4): exactly one certificate, hash must match.
    /// With `pin = None` it accepts any chain (to inspect what was presented).
    #[derive(Debug)]
    struct PinVerifier {
        pin: Option<String>,
        provider: Arc<rustls::crypto::CryptoProvider>,
    }

    impl ServerCertVerifier for PinVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            if let Some(pin) = &self.pin {
                if !intermediates.is_empty() {
                    return Err(rustls::Error::General(
                        "unexpected multiple certs presented".into(),
                    ));
                }
                if crate::pin::Pin::of_der(end_entity).to_string() != *pin {
                    return Err(rustls::Error::General("cert hash mismatch".into()));
                }
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    fn client_config(
        pin: Option<String>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[version])
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
            .with_no_client_auth();
        // Go's DERP client sends no ALPN (spec §1.2).
        cfg.alpn_protocols = Vec::new();
        Arc::new(cfg)
    }

    /// A TLS echo server on 127.0.0.1:0; returns its address and a cancel token.
    async fn echo_server(
        config: Arc<rustls::ServerConfig>,
    ) -> (std::net::SocketAddr, CancellationToken) {
        let (addr, cancel, _snis) = echo_server_with_sni(config).await;
        (addr, cancel)
    }

    /// Like [`echo_server`], also reporting the SNI of each accepted handshake.
    async fn echo_server_with_sni(
        config: Arc<rustls::ServerConfig>,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    ) {
        let (sni_tx, sni_rx) = tokio::sync::mpsc::unbounded_channel();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    r = listener.accept() => r.expect("accept"),
                };
                let acceptor = acceptor.clone();
                let sni_tx = sni_tx.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = sni_tx.send(tls.get_ref().1.server_name().map(str::to_owned));
                    let mut buf = [0u8; 256];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, cancel, sni_rx)
    }

    #[derive(Debug)]
    struct Connected {
        stream: tokio_rustls::client::TlsStream<TcpStream>,
    }

    impl Connected {
        fn chain(&self) -> Vec<CertificateDer<'static>> {
            self.stream
                .get_ref()
                .1
                .peer_certificates()
                .expect("peer certs")
                .iter()
                .map(|c| c.clone().into_owned())
                .collect()
        }

        fn version(&self) -> rustls::ProtocolVersion {
            self.stream.get_ref().1.protocol_version().expect("version")
        }

        async fn echo(&mut self, msg: &[u8]) {
            self.stream.write_all(msg).await.expect("write");
            let mut got = vec![0u8; msg.len()];
            self.stream.read_exact(&mut got).await.expect("read");
            assert_eq!(got, msg);
        }
    }

    async fn connect(
        addr: std::net::SocketAddr,
        pin: Option<String>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Result<Connected, std::io::Error> {
        let connector = tokio_rustls::TlsConnector::from(client_config(pin, version));
        let tcp = TcpStream::connect(addr).await?;
        // An IP server name: rustls (like Go) sends no SNI extension.
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("handshake timeout"))??;
        Ok(Connected { stream })
    }

    #[test]
    fn metacert_matches_go() {
        let key: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).expect("small") * 7);
        let der = metacert(&key).expect("metacert");
        let (rest, x) = parse_x509_certificate(&der).expect("well-formed DER");
        assert!(rest.is_empty());
        assert_eq!(x.version(), X509Version::V3);
        assert_eq!(x.raw_serial(), &[2]);
        let cn: Vec<_> = x.subject().iter_common_name().collect();
        assert_eq!(cn.len(), 1);
        assert_eq!(
            cn[0].as_str().expect("cn"),
            format!("derpkey{}", hex::encode(key))
        );
        assert_eq!(x.subject().iter().count(), 1, "subject has only the CN");
        assert_eq!(x.issuer().as_raw(), x.subject().as_raw());
        assert_eq!(
            x.signature_algorithm.algorithm,
            oid_registry::OID_SIG_ED25519
        );
        assert_eq!(
            x.public_key().algorithm.algorithm,
            oid_registry::OID_SIG_ED25519
        );
        // Exactly one extension: critical Basic Constraints, cA = false.
        assert_eq!(x.extensions().len(), 1);
        let bc = x.basic_constraints().expect("bc").expect("present");
        assert!(bc.critical);
        assert!(!bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
        // Validity: now - 30 days .. now + 30 days.
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        let nb = x.validity().not_before.timestamp();
        let na = x.validity().not_after.timestamp();
        assert!((now - 30 * 86_400 - nb).abs() < 120);
        assert!((now + 30 * 86_400 - na).abs() < 120);
        // Each process start makes a fresh Ed25519 key.
        assert_ne!(metacert(&key).expect("again"), der);
    }

    fn generated(dir: &Path) -> LoadedCert {
        certs::load_or_generate(dir, "127.0.0.1").expect("generate")
    }

    #[test]
    fn not_after_gauge_follows_the_served_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = generated(dir.path());
        let first_na = certs::not_after_unix(first.leaf().expect("leaf")).expect("parses");
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        assert!(first_na > now + 300 * 86_400, "generated certs last a year");
        let resolver = CertResolver::new(first, None).expect("resolver");
        let gauge = resolver.not_after_gauge();
        assert_eq!(gauge.get(), first_na);
        // rcgen's default validity ends in 4096: a different notAfter
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("gen");
        let second = certs::parse_pair(
            ck.cert.pem().as_bytes(),
            ck.signing_key.serialize_pem().as_bytes(),
            Path::new("second.crt"),
            Path::new("second.key"),
            "127.0.0.1",
        )
        .expect("pair");
        let second_na = certs::not_after_unix(ck.cert.der()).expect("parses");
        assert_ne!(second_na, first_na);
        resolver.replace(second).expect("replace");
        assert_eq!(
            gauge.get(),
            second_na,
            "the registered handle sees the reload"
        );
    }

    #[tokio::test]
    async fn pinned_cert_is_presented_alone_without_sni_on_tls12_and_tls13() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = generated(dir.path());
        let pin = cert.pin.clone().expect("pinned");
        let resolver = CertResolver::new(cert, None).expect("resolver");
        assert_eq!(resolver.presented_chain().len(), 1);
        let (addr, cancel, mut snis) = echo_server_with_sni(server_config(resolver)).await;
        for (version, expect) in [
            (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        ] {
            let mut c = connect(addr, Some(pin.clone()), version)
                .await
                .expect("v1.82-style pinned client connects");
            assert_eq!(c.version(), expect);
            let chain = c.chain();
            assert_eq!(chain.len(), 1, "exactly one certificate on the wire");
            assert_eq!(crate::pin::Pin::of_der(&chain[0]).to_string(), pin);
            assert_eq!(c.stream.get_ref().1.alpn_protocol(), None);
            c.echo(b"hello").await;
            assert_eq!(snis.recv().await.expect("sni report"), None, "no SNI sent");
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn metacert_mode_presents_leaf_then_metacert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = generated(dir.path());
        let leaf = cert.chain[0].clone();
        let pin = cert.pin.clone().expect("pinned");
        let server_key = [0xab; 32];
        let meta = metacert(&server_key).expect("metacert");
        let resolver = CertResolver::new(cert, Some(meta.clone())).expect("resolver");
        assert!(resolver.metacert_enabled());
        let (addr, cancel) = echo_server(server_config(resolver)).await;
        let c = connect(addr, None, &rustls::version::TLS13)
            .await
            .expect("connect");
        assert_eq!(c.chain(), vec![leaf, meta]);
        // A v1.82 pinned client rejects it: this is the bug the default avoids.
        let err = connect(addr, Some(pin), &rustls::version::TLS13)
            .await
            .expect_err("two certs break v1.82 pinning");
        assert!(err.to_string().contains("multiple certs"), "{err}");
        cancel.cancel();
    }

    #[tokio::test]
    async fn alpn_http11_is_negotiated_when_offered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = CertResolver::new(generated(dir.path()), None).expect("resolver");
        let (addr, cancel) = echo_server(server_config(resolver)).await;
        let mut cfg = (*client_config(None, &rustls::version::TLS13)).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = TcpStream::connect(addr).await.expect("tcp");
        let s = connector
            .connect(ServerName::try_from("derp.example.com").expect("name"), tcp)
            .await
            .expect("handshake with an unrelated SNI");
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_HTTP11));
        cancel.cancel();
    }

    #[tokio::test]
    async fn reload_serves_new_cert_to_new_connections_and_keeps_old_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = generated(dir.path());
        let old_pin = first.pin.clone().expect("pinned");
        let resolver = CertResolver::new(first, None).expect("resolver");
        let (addr, cancel) = echo_server(server_config(Arc::clone(&resolver))).await;
        let reloader = resolver.spawn_reloader(
            dir.path().to_owned(),
            "127.0.0.1".to_owned(),
            Duration::from_millis(20),
            cancel.clone(),
        );
        let mut old_conn = connect(addr, Some(old_pin.clone()), &rustls::version::TLS13)
            .await
            .expect("old");
        old_conn.echo(b"before").await;

        // Garbage first: rejected, old cert still served.
        let (crt_path, key_path) = certs::cert_paths(dir.path(), "127.0.0.1");
        std::fs::write(&crt_path, "garbage").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(resolver.current_pin().as_deref(), Some(old_pin.as_str()));

        // Then a new valid pair (generated elsewhere, copied in).
        let other = tempfile::tempdir().expect("tempdir");
        let second = generated(other.path());
        let new_pin = second.pin.clone().expect("pinned");
        assert_ne!(new_pin, old_pin);
        let (other_crt, other_key) = certs::cert_paths(other.path(), "127.0.0.1");
        std::fs::copy(other_key, &key_path).expect("copy key");
        std::fs::copy(other_crt, &crt_path).expect("copy crt");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while resolver.current_pin().as_deref() != Some(new_pin.as_str()) {
            assert!(tokio::time::Instant::now() < deadline, "reload timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut new_conn = connect(addr, Some(new_pin.clone()), &rustls::version::TLS13)
            .await
            .expect("new conn sees the new cert");
        assert_eq!(
            crate::pin::Pin::of_der(&new_conn.chain()[0]).to_string(),
            new_pin
        );
        new_conn.echo(b"new").await;
        // The established connection is unaffected.
        old_conn.echo(b"after").await;
        assert_eq!(
            crate::pin::Pin::of_der(&old_conn.chain()[0]).to_string(),
            old_pin
        );
        // Old pin no longer accepted for new connections.
        assert!(
            connect(addr, Some(old_pin), &rustls::version::TLS13)
                .await
                .is_err()
        );

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), reloader)
            .await
            .expect("reloader stops on cancel")
            .expect("no panic");
    }

    #[test]
    fn metacert_mode_auto_skips_pinned_certs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pinned = generated(dir.path());
        let mut ca_issued = pinned.clone();
        ca_issued.pin = None;
        assert!(!MetacertMode::Auto.enabled_for(&pinned));
        assert!(MetacertMode::Auto.enabled_for(&ca_issued));
        assert!(MetacertMode::On.enabled_for(&pinned));
        assert!(!MetacertMode::Off.enabled_for(&ca_issued));
        assert_eq!(MetacertMode::default(), MetacertMode::Off);
        for m in [MetacertMode::Auto, MetacertMode::On, MetacertMode::Off] {
            assert_eq!(m.to_string().parse::<MetacertMode>(), Ok(m));
        }
        assert!("maybe".parse::<MetacertMode>().is_err());
    }

    #[test]
    fn replace_rejects_mismatched_key_and_keeps_serving() {
        let a_dir = tempfile::tempdir().expect("tempdir");
        let b_dir = tempfile::tempdir().expect("tempdir");
        let a = generated(a_dir.path());
        let b = generated(b_dir.path());
        let resolver = CertResolver::new(a.clone(), None).expect("resolver");
        let mixed = LoadedCert {
            chain: b.chain.clone(),
            key: a.key.clone_key(),
            pin: b.pin.clone(),
            generated: false,
        };
        assert!(matches!(resolver.replace(mixed), Err(TlsError::Key(_))));
        assert_eq!(resolver.current_pin(), a.pin);
        let dbg = format!("{resolver:?}");
        assert!(dbg.contains("CertResolver"));
        let leaf_hash = hex::encode(Sha256::digest(&a.chain[0]));
        assert!(dbg.contains(&leaf_hash), "{dbg}");
    }
}
