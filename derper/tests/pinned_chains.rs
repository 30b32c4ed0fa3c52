//! The pinned-certificate check ([`derper::pin`]) against a real rustls server serving
//! hostile chains, over TLS 1.2 and 1.3, and through the two clients that use it: the DERP
//! client ([`derper::client`]) and the mesh, which must never send its mesh key to a server
//! that merely *shows* the pinned certificate.
//!
//! Everything runs on 127.0.0.1 with short timeouts.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use derper::client::{Client, ClientConfig, TlsMode, UpgradeMode};
use derper::key::{MeshKey, NodePrivateKey};
use derper::mesh::MeshConfig;
use derper::pin::{Pin, PinnedVerifier};
use derper::server::ServerOptions;
use derper::testing::{TestServerOptions, start};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(10);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A certificate and its key.
struct Cert {
    der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// A self-signed certificate with subject CN `cn`, IP SAN 127.0.0.1, DNS SANs `dns`, and
/// optionally an organisation name.
fn cert(cn: &str, dns: &[&str], org: Option<&str>) -> Cert {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).unwrap();
    p.subject_alt_names.push(SanType::IpAddress(LOCALHOST));
    p.distinguished_name.push(DnType::CommonName, cn);
    // Metacerts carry the protocol version as their serial number (spec §2.1).
    p.serial_number = Some(rcgen::SerialNumber::from(2u64));
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    let c = p.self_signed(&key).unwrap();
    Cert {
        der: c.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// A well-formed metacert CN (`derpkey` + 64 hex digits of a real node key).
fn metacert_cn() -> String {
    format!(
        "derpkey{}",
        NodePrivateKey::generate().public().to_hex().to_lowercase()
    )
}

/// A TLS server on 127.0.0.1 presenting `chain`, signing with `key` (the key of
/// `chain[0]`). After a handshake it writes `ok`; it counts handshakes that completed on
/// its side and bytes of application data it received.
struct HostileServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    app_bytes: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
}

async fn serve(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivatePkcs8KeyDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> HostileServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key.clone_key()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let app_bytes = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (h, b, a) = (handshakes.clone(), app_bytes.clone(), attempts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, h, b, a) = (acceptor.clone(), h.clone(), b.clone(), a.clone());
            tokio::spawn(async move {
                let res = acceptor.accept(tcp).await;
                let Ok(mut tls) = res else {
                    a.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                h.fetch_add(1, Ordering::SeqCst);
                a.fetch_add(1, Ordering::SeqCst);
                let _ = tls.write_all(b"ok").await;
                let _ = tls.flush().await;
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(T, tls.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    b.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    HostileServer {
        addr,
        handshakes,
        app_bytes,
        attempts,
    }
}

/// Dials `addr` for `name` with the workspace's pinned verifier; Ok when the handshake
/// completed and the server's first bytes arrived.
async fn dial(
    addr: SocketAddr,
    name: ServerName<'static>,
    pin: Pin,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = PinnedVerifier::new(pin, &provider)
        .client_config(provider, &[version])
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio::time::timeout(
        T,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let mut got = [0u8; 2];
    tls.read_exact(&mut got).await.map_err(|e| e.to_string())?;
    assert_eq!(&got, b"ok");
    Ok(())
}

fn ip_name() -> ServerName<'static> {
    ServerName::IpAddress(LOCALHOST.into())
}

const VERSIONS: [&rustls::SupportedProtocolVersion; 2] =
    [&rustls::version::TLS12, &rustls::version::TLS13];

/// The critical finding: `[attacker cert with derpkey in its CN, victim's pinned cert]`,
/// signed with the attacker's key, must not pass as the victim.
#[tokio::test]
async fn metacert_like_attacker_cert_before_the_pinned_cert_is_refused() {
    let victim = cert("victim", &[], None);
    let pin = Pin::of_der(&victim.der);
    for cn in [
        metacert_cn(),
        "derpkey".to_owned(),
        "derpkey-anything".to_owned(),
    ] {
        let attacker = cert(&cn, &[], None);
        for v in VERSIONS {
            let s = serve(
                vec![attacker.der.clone(), victim.der.clone()],
                &attacker.key,
                v,
            )
            .await;
            let err = dial(s.addr, ip_name(), pin, v).await.unwrap_err();
            assert!(
                err.contains("cert hash does not match"),
                "{cn} {v:?}: {err}"
            );
            assert_eq!(s.handshakes.load(Ordering::SeqCst), 0);
        }
    }
}

#[tokio::test]
async fn pinned_cert_followed_by_a_non_metacert_is_refused() {
    let victim = cert("victim", &[], None);
    let pin = Pin::of_der(&victim.der);
    // A plain extra certificate, and one carrying the bytes `derpkey` outside its CN.
    let extras = [
        cert("intermediate", &[], None),
        cert("x", &[], Some(&metacert_cn())),
        cert("x", &["derpkey.example.com"], None),
    ];
    for extra in &extras {
        for v in VERSIONS {
            let s = serve(vec![victim.der.clone(), extra.der.clone()], &victim.key, v).await;
            let err = dial(s.addr, ip_name(), pin, v).await.unwrap_err();
            assert!(err.contains("unexpected multiple certs presented"), "{err}");
        }
    }
}

#[tokio::test]
async fn attacker_cert_alone_and_derpkey_bytes_outside_the_cn_are_refused() {
    let victim = cert("victim", &[], None);
    let pin = Pin::of_der(&victim.der);
    let attackers = [
        cert("attacker", &[], None),
        cert("attacker", &[], Some(&metacert_cn())),
        cert(&metacert_cn(), &[], None),
    ];
    for a in &attackers {
        for v in VERSIONS {
            // Alone.
            let s = serve(vec![a.der.clone()], &a.key, v).await;
            let err = dial(s.addr, ip_name(), pin, v).await.unwrap_err();
            assert!(err.contains("cert hash does not match"), "{err}");
            // In front of the victim's certificate.
            let s = serve(vec![a.der.clone(), victim.der.clone()], &a.key, v).await;
            let err = dial(s.addr, ip_name(), pin, v).await.unwrap_err();
            assert!(err.contains("cert hash does not match"), "{err}");
        }
    }
}

#[tokio::test]
async fn pinned_cert_alone_or_with_a_trailing_metacert_is_accepted() {
    let victim = cert("victim", &[], None);
    let pin = Pin::of_der(&victim.der);
    let meta = cert(&metacert_cn(), &[], None);
    for v in VERSIONS {
        let s = serve(vec![victim.der.clone()], &victim.key, v).await;
        dial(s.addr, ip_name(), pin, v).await.unwrap();
        let s = serve(vec![victim.der.clone(), meta.der.clone()], &victim.key, v).await;
        dial(s.addr, ip_name(), pin, v).await.unwrap();
    }
}

/// A real leaf whose names contain `derpkey` is a leaf like any other.
#[tokio::test]
async fn leaf_whose_names_contain_derpkey_is_accepted() {
    let leaf = cert("derpkey-relay.example.com", &["derpkey.example.com"], None);
    let pin = Pin::of_der(&leaf.der);
    for v in VERSIONS {
        let s = serve(vec![leaf.der.clone()], &leaf.key, v).await;
        dial(s.addr, ip_name(), pin, v).await.unwrap();
        let name = ServerName::try_from("derpkey.example.com").unwrap();
        dial(s.addr, name, pin, v).await.unwrap();
        let other = ServerName::try_from("other.example.com").unwrap();
        let err = dial(s.addr, other, pin, v).await.unwrap_err();
        assert!(err.contains("does not match server name"), "{err}");
    }
}

#[tokio::test]
async fn expired_pinned_cert_is_refused() {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names.push(SanType::IpAddress(LOCALHOST));
    p.not_before = rcgen::date_time_ymd(2001, 1, 1);
    p.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let c = p.self_signed(&key).unwrap();
    let k = PrivatePkcs8KeyDer::from(key.serialize_der());
    let pin = Pin::of_der(c.der());
    let s = serve(vec![c.der().clone()], &k, &rustls::version::TLS13).await;
    let err = dial(s.addr, ip_name(), pin, &rustls::version::TLS13)
        .await
        .unwrap_err();
    assert!(err.contains("expired"), "{err}");
}

/// The DERP client refuses the impersonating chain before sending anything.
#[tokio::test]
async fn derp_client_sends_nothing_to_an_impersonator() {
    let victim = cert("victim", &[], None);
    let attacker = cert(&metacert_cn(), &[], None);
    let s = serve(
        vec![attacker.der.clone(), victim.der.clone()],
        &attacker.key,
        &rustls::version::TLS13,
    )
    .await;
    let mut cfg = ClientConfig::new(s.addr);
    cfg.tls = TlsMode::Pinned(Pin::of_der(&victim.der));
    cfg.upgrade = UpgradeMode::Plain;
    cfg.mesh_key = Some(MeshKey::from_bytes([7; 32]));
    cfg.connect_timeout = T;
    let err = Client::connect(&cfg, &NodePrivateKey::generate())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cert hash does not match"),
        "{err}"
    );
    wait_for(|| s.attempts.load(Ordering::SeqCst) >= 1).await;
    assert_eq!(s.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(s.app_bytes.load(Ordering::SeqCst), 0);
}

/// A mesh relay configured with the victim's pin, pointed at an impersonator that shows
/// `[metacert-like attacker cert, victim cert]`, keeps retrying and never completes a
/// handshake, so its mesh key (sent in the ClientInfo) never leaves the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_never_sends_its_key_to_an_impersonating_peer() {
    let victim = cert("victim", &[], None);
    let attacker = cert(&metacert_cn(), &[], None);
    for v in VERSIONS {
        let imp = serve(
            vec![attacker.der.clone(), victim.der.clone()],
            &attacker.key,
            v,
        )
        .await;
        let mk = MeshKey::from_bytes([9; 32]);
        let relay = start(TestServerOptions {
            ip: IpAddr::from([127, 0, 0, 1]),
            server: ServerOptions {
                mesh_key: Some(mk.clone()),
                ..Default::default()
            },
            http_port: false,
            admin: false,
            stun: false,
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("peers");
        std::fs::write(
            &file,
            format!("{} {}\n", imp.addr, Pin::of_der(&victim.der)),
        )
        .unwrap();
        let _mesh = derper::mesh::spawn(
            relay.server(),
            MeshConfig {
                mesh_key: mk,
                peers: Vec::new(),
                peers_file: Some(file),
                poll: Duration::from_millis(100),
            },
        );
        // The mesh dials, fails verification and retries: wait for two attempts.
        wait_for(|| imp.attempts.load(Ordering::SeqCst) >= 2).await;
        assert_eq!(imp.handshakes.load(Ordering::SeqCst), 0, "{v:?}");
        assert_eq!(imp.app_bytes.load(Ordering::SeqCst), 0, "{v:?}");
    }
}

async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
