//! Admission and rate limits (spec §6.8, §6.9, §12 item 30): `--verify-client-url` against
//! a small HTTP endpoint that allows some keys and denies others, the endpoint down in both
//! fail-open modes, mesh-key clients bypassing it, the accept rate limit and the per-client
//! receive limit.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use derper::admission::{Admit, VerifyUrl};
use derper::client::{Client, ClientError, UpgradeMode};
use derper::key::{MeshKey, NodePrivateKey};
use derper::ratelimit::RecvRateLimit;
use derper::server::ServerOptions;
use derper::testing::{TestServer, TestServerOptions, start};
use http_body_util::{BodyExt as _, Full};

const T: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Endpoint {
    allow: Mutex<HashSet<String>>,
    error: Mutex<HashSet<String>>,
    requests: Mutex<Vec<serde_json::Value>>,
}

/// Serves the admission webhook on 127.0.0.1:0: `{"Allow": true}` for allowed keys, HTTP
/// 500 for keys in `error`, `{"Allow": false}` otherwise. Returns its URL.
async fn endpoint(state: Arc<Endpoint>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/admit", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            assert_eq!(req.method(), http::Method::POST);
                            assert_eq!(req.uri().path(), "/admit");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let key = v["NodePublic"].as_str().unwrap().to_owned();
                            state.requests.lock().unwrap().push(v);
                            let resp = if state.error.lock().unwrap().contains(&key) {
                                http::Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::from_static(b"{\"Allow\":true}")))
                            } else {
                                let allow = state.allow.lock().unwrap().contains(&key);
                                http::Response::builder()
                                    .body(Full::new(Bytes::from(format!("{{\"Allow\":{allow}}}"))))
                            };
                            Ok::<_, Infallible>(resp.unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    url
}

async fn server_with(checks: Vec<Arc<dyn Admit>>, mesh_key: Option<MeshKey>) -> TestServer {
    start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            admission: checks,
            mesh_key,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
}

async fn refused(s: &TestServer, k: &NodePrivateKey) -> ClientError {
    s.connect(k, UpgradeMode::Plain)
        .await
        .expect_err("client must be refused")
}

fn closed_port_url() -> String {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    format!("http://127.0.0.1:{port}/admit")
}

#[tokio::test]
async fn verify_client_url_allows_and_denies_by_key() {
    let state = Arc::new(Endpoint::default());
    let url = endpoint(state.clone()).await;
    let mk = MeshKey::from_bytes([9; 32]);
    let check: Arc<dyn Admit> = Arc::new(VerifyUrl::new(&url, true).unwrap());
    let s = server_with(vec![check], Some(mk.clone())).await;

    let (ka, kb) = (NodePrivateKey::generate(), NodePrivateKey::generate());
    let (denied, broken) = (NodePrivateKey::generate(), NodePrivateKey::generate());
    for k in [&ka, &kb] {
        state
            .allow
            .lock()
            .unwrap()
            .insert(k.public().to_nodekey_string());
    }
    state
        .error
        .lock()
        .unwrap()
        .insert(broken.public().to_nodekey_string());

    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    a.send_packet(&kb.public(), b"admitted").await.unwrap();
    assert_eq!(&b.recv_packet(T).await.unwrap().1[..], b"admitted");

    refused(&s, &denied).await;
    // Non-200 rejects even with fail-open (spec §6.9).
    refused(&s, &broken).await;
    assert_eq!(s.metrics().admission_rejections("verify_url_denied"), 1);
    assert_eq!(s.metrics().admission_rejections("verify_url_bad_status"), 1);
    assert_eq!(s.server().connections_for(&denied.public()), 0);

    // Upstream's request shape, with the TCP peer IP as Source.
    {
        let reqs = state.requests.lock().unwrap();
        assert_eq!(reqs.len(), 4);
        assert_eq!(
            reqs[0],
            serde_json::json!({
                "NodePublic": ka.public().to_nodekey_string(),
                "Source": "127.0.0.1",
            })
        );
    }

    // A mesh-key client is admitted without asking the endpoint.
    let mut cfg = s.client_config(UpgradeMode::Plain);
    cfg.mesh_key = Some(mk);
    Client::connect(&cfg, &denied).await.unwrap();
    assert_eq!(state.requests.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn verify_client_url_down_admits_only_when_fail_open() {
    let k = NodePrivateKey::generate();
    let open: Arc<dyn Admit> = Arc::new(VerifyUrl::new(&closed_port_url(), true).unwrap());
    let s = server_with(vec![open], None).await;
    s.connect(&k, UpgradeMode::Plain).await.unwrap();

    let closed: Arc<dyn Admit> = Arc::new(VerifyUrl::new(&closed_port_url(), false).unwrap());
    let s = server_with(vec![closed], None).await;
    refused(&s, &k).await;
    assert_eq!(
        s.metrics().admission_rejections("verify_url_unreachable"),
        1
    );

    // An endpoint that accepts TCP but never answers: the timeout counts as unreachable.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    let slow: Arc<dyn Admit> = Arc::new(
        VerifyUrl::new(&url, false)
            .unwrap()
            .with_timeout(Duration::from_millis(300)),
    );
    let s = server_with(vec![slow], None).await;
    refused(&s, &k).await;
    assert_eq!(
        s.metrics().admission_rejections("verify_url_unreachable"),
        1
    );
    drop(l);
}

#[tokio::test]
async fn accept_rate_limit_closes_connections_over_the_burst() {
    let s = start(TestServerOptions {
        tls: false,
        accept_limit: Some((0.001, 2.0)),
        ..Default::default()
    })
    .await;
    let keys: Vec<_> = (0..3).map(|_| NodePrivateKey::generate()).collect();
    let _a = s.connect(&keys[0], UpgradeMode::Plain).await.unwrap();
    let _b = s.connect(&keys[1], UpgradeMode::Plain).await.unwrap();
    refused(&s, &keys[2]).await;
    assert_eq!(s.metrics().accept_rejected.get(), 1);
    assert_eq!(s.metrics().tcp_accepts.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_receive_limit_slows_the_sender() {
    let rate = RecvRateLimit {
        bytes_per_sec: 1_000_000.0,
        burst_bytes: 0.0, // raised to one maximal frame
    };
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            recv_rate: Some(rate),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (ka, kb) = (NodePrivateKey::generate(), NodePrivateKey::generate());
    let mut a = s.connect(&ka, UpgradeMode::Plain).await.unwrap();
    let mut b = s.connect(&kb, UpgradeMode::Plain).await.unwrap();
    let pkt = vec![7u8; 65_536];
    const N: usize = 17; // ≈ 1.1 MB: one burst + ≈ 1 s at 1 MB/s
    let start = tokio::time::Instant::now();
    let recv = tokio::spawn(async move {
        for _ in 0..N {
            b.recv_packet(Duration::from_secs(10)).await.unwrap();
        }
    });
    for _ in 0..N {
        a.send_packet(&kb.public(), &pkt).await.unwrap();
    }
    recv.await.unwrap();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(s.metrics().rate_limit_waited.get() > 0);
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA DER, server config).
fn https_identity() -> (
    rustls::pki_types::CertificateDer<'static>,
    Arc<rustls::ServerConfig>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    (ca.der().clone(), Arc::new(config))
}

/// The webhook of [`endpoint`] behind TLS: a forwarder that terminates TLS on 127.0.0.1:0 and
/// relays the bytes to the plain endpoint. Returns the `https://` URL.
async fn https_endpoint(plain_url: &str, config: Arc<rustls::ServerConfig>) -> String {
    let plain = plain_url
        .trim_start_matches("http://")
        .trim_end_matches("/admit")
        .to_owned();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/admit", l.local_addr().unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (acceptor, plain) = (acceptor.clone(), plain.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut up = tokio::net::TcpStream::connect(&plain).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn verify_client_url_over_https_checks_the_certificate() {
    let state = Arc::new(Endpoint::default());
    let plain = endpoint(state.clone()).await;
    let (ca, config) = https_identity();
    let url = https_endpoint(&plain, config).await;
    let member = NodePrivateKey::generate();
    state
        .allow
        .lock()
        .unwrap()
        .insert(member.public().to_nodekey_string());

    // Trusted CA: the webhook decides.
    let trusted = VerifyUrl::with_roots(&url, false, || vec![ca.clone()]).unwrap();
    let s = server_with(vec![Arc::new(trusted)], None).await;
    s.connect(&member, UpgradeMode::Plain).await.unwrap();
    refused(&s, &NodePrivateKey::generate()).await;
    assert_eq!(s.metrics().admission_rejections("verify_url_denied"), 1);
    assert_eq!(state.requests.lock().unwrap().len(), 2);

    // A CA that did not sign the webhook's certificate: a transport failure, so fail-open
    // decides, and the webhook never sees a request.
    let (other_ca, _) = https_identity();
    let strict = VerifyUrl::with_roots(&url, false, || vec![other_ca.clone()]).unwrap();
    let s = server_with(vec![Arc::new(strict)], None).await;
    refused(&s, &member).await;
    assert_eq!(
        s.metrics().admission_rejections("verify_url_unreachable"),
        1
    );
    let open = VerifyUrl::with_roots(&url, true, || vec![other_ca.clone()]).unwrap();
    let s = server_with(vec![Arc::new(open)], None).await;
    s.connect(&member, UpgradeMode::Plain).await.unwrap();
    assert_eq!(state.requests.lock().unwrap().len(), 2);
}
