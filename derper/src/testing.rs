//! Test helpers (`cfg(any(test, feature = "test-utils"))`): start a complete relay on
//! `127.0.0.1:0` with a freshly generated self-signed IP certificate (served alone, as in
//! pinned mode) and return its addresses, pin and server key.
//!
//! Not for production use: keys and certificates live only in memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::client::{Client, ClientConfig, ClientError, TlsMode, UpgradeMode};
use crate::http::HttpOptions;
use crate::key::{NodePrivateKey, NodePublicKey};
use crate::listeners::{RunningServer, ServeConfig, TcpOptions};
use crate::metrics::Metrics;
use crate::server::{Server, ServerOptions};

/// Options for [`start`].
#[derive(Debug, Clone)]
pub struct TestServerOptions {
    /// Serve TLS on the main listener (self-signed 127.0.0.1 certificate).
    pub tls: bool,
    /// DERP core options.
    pub server: ServerOptions,
    /// HTTP options.
    pub http: HttpOptions,
    /// Also start the plain HTTP listener.
    pub http_port: bool,
    /// Also start the admin listener.
    pub admin: bool,
    /// Also start the STUN responder on UDP 127.0.0.1:0.
    pub stun: bool,
    /// Server private key (generated if `None`).
    pub key: Option<NodePrivateKey>,
    /// Serve through [`crate::tls::CertResolver`] with the metacert appended (as for a
    /// CA-issued certificate), so TLS 1.3 clients in `Auto` mode use fast start.
    pub metacert: bool,
    /// Address to bind every listener to (default 127.0.0.1; 127.0.0.2… work on Linux).
    pub ip: std::net::IpAddr,
    /// Main listener port (0 = ephemeral; a fixed port lets a test restart a node).
    pub port: u16,
    /// Certificate and PKCS#8 key (DER) to serve instead of a fresh one (stable pin across
    /// restarts).
    pub cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Accept rate limit on the main listener (per second, burst).
    pub accept_limit: Option<(f64, f64)>,
}

impl Default for TestServerOptions {
    fn default() -> Self {
        Self {
            tls: true,
            server: ServerOptions::default(),
            http: HttpOptions::default(),
            http_port: true,
            admin: true,
            stun: true,
            key: None,
            metacert: false,
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            port: 0,
            cert: None,
            accept_limit: None,
        }
    }
}

/// A running in-process relay.
#[derive(Debug)]
pub struct TestServer {
    /// Main listener address.
    pub addr: SocketAddr,
    /// Plain HTTP listener address.
    pub http_addr: Option<SocketAddr>,
    /// Admin listener address.
    pub admin_addr: Option<SocketAddr>,
    /// STUN (UDP) address.
    pub stun_addr: Option<SocketAddr>,
    /// `sha256-raw:<hex>` pin of the served certificate (empty without TLS).
    pub pin: String,
    /// The served certificate (DER).
    pub cert_der: Vec<u8>,
    /// The served certificate's PKCS#8 key (DER), to restart with the same pin.
    pub key_der: Vec<u8>,
    /// The server's public key.
    pub server_key: NodePublicKey,
    /// The Prometheus registry served on the admin listener.
    pub registry: Arc<Registry>,
    running: RunningServer,
}

/// Generates a self-signed certificate for 127.0.0.1; returns (cert DER, PKCS#8 key DER).
pub fn self_signed_localhost() -> (Vec<u8>, Vec<u8>) {
    self_signed_for(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// Generates a self-signed certificate for `ip`; returns (cert DER, PKCS#8 key DER).
pub fn self_signed_for(ip: std::net::IpAddr) -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .expect("P-256 key generation does not fail");
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
    params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, ip.to_string());
    params.distinguished_name = dn;
    let cert = params
        .self_signed(&key)
        .expect("self-signing a fresh certificate does not fail");
    (cert.der().to_vec(), key.serialize_der())
}

/// Builds a rustls server config serving exactly `cert` (no metacert), ALPN http/1.1.
pub fn server_tls_config(cert: Vec<u8>, key: Vec<u8>) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .expect("generated key matches the certificate");
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.enable_secret_extraction = true;
    Arc::new(c)
}

/// Starts a relay on 127.0.0.1 with ephemeral ports.
pub async fn start(opts: TestServerOptions) -> TestServer {
    let mut reg = Registry::with_prefix("derper");
    let metrics = Metrics::register(&mut reg);
    let key = opts.key.clone().unwrap_or_else(NodePrivateKey::generate);
    let server = Server::new(key, opts.server.clone(), metrics);
    let server_key = server.public_key();
    let (tls, pin, cert_der) = if opts.tls {
        let (cert, k) = opts
            .cert
            .clone()
            .unwrap_or_else(|| self_signed_for(opts.ip));
        let pin = crate::pin::Pin::of_der(&cert).to_string();
        let key_der = k.clone();
        let config = if opts.metacert {
            let loaded = crate::certs::LoadedCert {
                chain: vec![CertificateDer::from(cert.clone())],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k)),
                pin: None,
                generated: false,
            };
            let meta = crate::tls::metacert(server_key.as_bytes()).expect("metacert builds");
            let resolver =
                crate::tls::CertResolver::new(loaded, Some(meta)).expect("resolver builds");
            crate::tls::server_config(resolver)
        } else {
            server_tls_config(cert.clone(), k)
        };
        (Some(config), pin, (cert, key_der))
    } else {
        (None, String::new(), (Vec::new(), Vec::new()))
    };
    let (cert_der, key_der) = cert_der;
    let any: SocketAddr = SocketAddr::new(opts.ip, 0);
    let cfg = ServeConfig {
        addr: SocketAddr::new(opts.ip, opts.port),
        tls,
        http_addr: opts.http_port.then_some(any),
        stun_addr: opts.stun.then_some(any),
        admin_addr: opts.admin.then_some(any),
        http: opts.http.clone(),
        tcp: TcpOptions::default(),
        accept_limit: opts.accept_limit,
    };
    let stun_metrics = crate::stun::StunMetrics::register(&mut reg);
    let stun: crate::listeners::StunServeFn =
        Box::new(move |sock, cancel| Box::pin(crate::stun::serve(sock, stun_metrics, cancel)));
    let registry = Arc::new(reg);
    let running = crate::listeners::spawn(server, cfg, registry.clone(), Some(stun))
        .await
        .expect("binding the test listeners succeeds");
    TestServer {
        addr: running.addr,
        http_addr: running.http_addr,
        admin_addr: running.admin_addr,
        stun_addr: running.stun_addr,
        pin,
        cert_der,
        key_der,
        server_key,
        registry,
        running,
    }
}

impl TestServer {
    /// The DERP core.
    pub fn server(&self) -> &Server {
        &self.running.server
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.running.server.metrics()
    }

    /// A client config for this server (pinned TLS when TLS is on).
    pub fn client_config(&self, upgrade: UpgradeMode) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr);
        c.host = self.addr.ip().to_string();
        c.tls = if self.pin.is_empty() {
            TlsMode::Plain
        } else {
            TlsMode::Pinned(self.pin.parse().expect("the harness's own pin parses"))
        };
        c.upgrade = match upgrade {
            UpgradeMode::FastStart(_) => UpgradeMode::FastStart(self.server_key),
            u => u,
        };
        c.connect_timeout = Duration::from_secs(10);
        c
    }

    /// Connects a new client with `key`.
    pub async fn connect(
        &self,
        key: &NodePrivateKey,
        upgrade: UpgradeMode,
    ) -> Result<Client, ClientError> {
        Client::connect(&self.client_config(upgrade), key).await
    }

    /// Prometheus text of the registry.
    pub fn metrics_text(&self) -> String {
        crate::metrics::encode(&self.registry)
    }

    /// Waits until `cond` holds (polling every 10 ms) or panics after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Self) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !cond(self) {
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Graceful shutdown.
    pub async fn shutdown(self) {
        self.running.shutdown(Duration::from_secs(5)).await;
    }
}

/// A two-node derpMap (region 900 `home`, `omitDefaultRegions`): `n1` with default ports,
/// port 80 and no IPv6; `n2` dual-stack with DERP on 8443 and STUN disabled. The map the
/// golden renderings in `derpmap`'s tests and the `derpprobe` format tests are made of.
pub fn sample_derp_map() -> crate::derpmap::DerpMap {
    use crate::derpmap::{DerpMap, DerpNode, DerpRegion};
    let node = |name: &str, v4: &str, v6: &str, pin: char, stun: i32, derp: i32| DerpNode {
        name: name.into(),
        region_id: 900,
        host_name: v4.into(),
        cert_name: format!("sha256-raw:{}", pin.to_string().repeat(64)),
        ipv4: v4.into(),
        ipv6: v6.into(),
        stun_port: stun,
        derp_port: derp,
        can_port80: derp == 443,
        ..DerpNode::default()
    };
    let region = DerpRegion {
        region_id: 900,
        region_code: "home".into(),
        region_name: "Home".into(),
        nodes: vec![
            node("n1", "203.0.113.1", "none", 'a', 3478, 443),
            node("n2", "203.0.113.2", "2001:db8::2", 'b', -1, 8443),
        ],
        ..DerpRegion::default()
    };
    DerpMap {
        regions: [(900, region)].into(),
        omit_default_regions: true,
    }
}
