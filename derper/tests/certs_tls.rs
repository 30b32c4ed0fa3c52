//! End-to-end checks of `derper::{certs, tls}` through their public API, against
//! re-implementations of the certificate checks of each Go client generation
//! (spec §2.3, §2.4): v1.82 (raw list, at most one cert), v1.84 (metacerts skipped, IP SAN
//! still checked) and v1.86+ (metacerts skipped, no name check for IP hosts).
//!
//! Everything runs on 127.0.0.1 with short timeouts.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use derper::certs;
use derper::tls::{self, CertResolver};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::*;

/// Which Go client generation to emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    V1_82,
    V1_84,
    V1_86,
}

#[derive(Debug)]
struct GoPinnedVerifier {
    client: Client,
    /// The `CertName` suffix after `sha256-raw:`.
    pin_hex: String,
    host: IpAddr,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// `parseMetaCert` result of the last handshake (spec §2.3): (key hex, serial).
    metacert: Arc<Mutex<Option<(String, u64)>>>,
}

fn err(msg: &str) -> rustls::Error {
    rustls::Error::General(msg.to_owned())
}

fn ip_of(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}

fn is_metacert(der: &[u8]) -> Option<(String, u64)> {
    let m = derper::pin::parse_metacert(der)?;
    Some((m.key.to_hex().to_lowercase(), u64::from(m.serial)))
}

impl ServerCertVerifier for GoPinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let all: Vec<&CertificateDer<'_>> =
            std::iter::once(end_entity).chain(intermediates).collect();
        *self.metacert.lock().expect("lock") = all.iter().find_map(|c| is_metacert(c));
        let candidates: Vec<&CertificateDer<'_>> = match self.client {
            Client::V1_82 => all,
            Client::V1_84 | Client::V1_86 => all
                .into_iter()
                .filter(|c| is_metacert(c).is_none())
                .collect(),
        };
        let cert = match candidates.as_slice() {
            [] => return Err(err("expected cert not presented")),
            [one] => *one,
            _ => return Err(err("unexpected multiple certs presented")),
        };
        let got = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(cert));
        if got != self.pin_hex {
            return Err(err("cert hash mismatch"));
        }
        let (_, x) = parse_x509_certificate(cert).map_err(|_| err("bad cert"))?;
        if !x.validity().is_valid() {
            return Err(err("cert expired or not yet valid"));
        }
        // v1.82 and v1.84 check the configured ServerName (= IP HostName) against IP SANs;
        // v1.86+ use the connection's server name, empty for IP literals (spec §2.4).
        if self.client != Client::V1_86 {
            let ok = x
                .subject_alternative_name()
                .ok()
                .flatten()
                .is_some_and(|san| {
                    san.value.general_names.iter().any(|n| match n {
                        GeneralName::IPAddress(raw) => ip_of(raw) == Some(self.host),
                        _ => false,
                    })
                });
            if !ok {
                return Err(err("certificate is not valid for the IP address"));
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

/// Serves TLS on 127.0.0.1:0 and answers each connection with one line, then closes.
async fn serve(config: Arc<rustls::ServerConfig>, cancel: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = cancel.cancelled() => return,
                r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => return },
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello\n").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Dial like a Go client for `HostName` = 127.0.0.1 with `CertName` = `sha256-raw:<pin>`.
async fn dial(
    addr: SocketAddr,
    client: Client,
    pin: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Result<Option<(String, u64)>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let metacert = Arc::new(Mutex::new(None));
    let verifier = GoPinnedVerifier {
        client,
        pin_hex: pin
            .strip_prefix(derper::pin::PIN_PREFIX)
            .expect("prefix")
            .to_owned(),
        host: addr.ip(),
        provider: Arc::clone(&provider),
        metacert: Arc::clone(&metacert),
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .map_err(|_| "timeout".to_owned())?
    .map_err(|e| e.to_string())?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut line))
        .await
        .map_err(|_| "read timeout".to_owned())?
        .map_err(|e| e.to_string())?;
    assert_eq!(line, "hello\n");
    // Go only looks for the metacert on TLS 1.3 (spec §2.3).
    let tls13 = tls.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let found = metacert.lock().expect("lock").clone();
    Ok(if tls13 { found } else { None })
}

#[tokio::test]
async fn generated_ip_cert_works_for_every_client_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = certs::load_or_generate(dir.path(), "127.0.0.1").expect("generate");
    assert!(cert.generated);
    let pin = cert.pin.clone().expect("self-signed IP certs are pinned");
    // The DERPNode line an operator pastes into the DERPMap (spec §3.2).
    assert_eq!(
        certs::derp_node_json("127.0.0.1", &pin, 443, 3478),
        format!(r#"{{"Name":"custom","RegionID":900,"HostName":"127.0.0.1","CertName":"{pin}"}}"#)
    );

    let cancel = CancellationToken::new();
    let resolver = CertResolver::new(cert, None).expect("resolver");
    let addr = serve(tls::server_config(resolver), cancel.clone()).await;
    for client in [Client::V1_82, Client::V1_84, Client::V1_86] {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let meta = dial(addr, client, &pin, version)
                .await
                .unwrap_or_else(|e| panic!("{client:?} {version:?}: {e}"));
            assert_eq!(meta, None, "no metacert, so no fast start");
        }
    }
    cancel.cancel();
}

#[tokio::test]
async fn metacert_mode_breaks_only_v1_82_and_enables_fast_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = certs::load_or_generate(dir.path(), "127.0.0.1").expect("generate");
    let pin = cert.pin.clone().expect("pinned");
    let server_key = [0x5a; 32];
    let meta = tls::metacert(&server_key).expect("metacert");
    let cancel = CancellationToken::new();
    let resolver = CertResolver::new(cert, Some(meta)).expect("resolver");
    assert_eq!(resolver.presented_chain().len(), 2);
    let addr = serve(tls::server_config(resolver), cancel.clone()).await;

    let e = dial(addr, Client::V1_82, &pin, &rustls::version::TLS13)
        .await
        .expect_err("v1.82 rejects two certificates");
    assert!(e.contains("unexpected multiple certs presented"), "{e}");
    for client in [Client::V1_84, Client::V1_86] {
        let found = dial(addr, client, &pin, &rustls::version::TLS13)
            .await
            .unwrap_or_else(|e| panic!("{client:?}: {e}"));
        assert_eq!(
            found,
            Some((hex::encode(server_key), 2)),
            "fast start on TLS 1.3"
        );
        let found = dial(addr, client, &pin, &rustls::version::TLS12)
            .await
            .expect("tls12");
        assert_eq!(found, None, "no fast start on TLS 1.2");
    }
    cancel.cancel();
}

#[tokio::test]
async fn cert_whose_ip_san_does_not_match_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs::load_or_generate(dir.path(), "127.0.0.1").expect("generate");
    let (crt, key) = certs::cert_paths(dir.path(), "127.0.0.1");
    let (crt2, key2) = certs::cert_paths(dir.path(), "127.0.0.2");
    std::fs::copy(crt, crt2).expect("copy");
    std::fs::copy(key, key2).expect("copy");
    let e = certs::load_or_generate(dir.path(), "127.0.0.2").expect_err("SAN mismatch");
    assert!(e.to_string().contains("127.0.0.2"), "{e}");
}
