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

/// An admission endpoint on 127.0.0.1:0 that reads each request, answers with the raw
/// bytes `response` (a head, maybe part of a body) and then keeps the connection open
/// without sending anything more. Returns its URL.
async fn stalling_endpoint(response: &'static str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/admit", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                // The whole request: the head, then the JSON body (it ends with '}').
                while !req.ends_with(b"}") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if s.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                // Stall: hold the connection until the client closes it.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    url
}

/// Asks `url` about a fresh key with the given fail-open mode and request timeout; the
/// decision must come within 10 s.
async fn decide(url: &str, fail_open: bool, timeout: Duration) -> derper::admission::Decision {
    let k = NodePrivateKey::generate().public();
    let check = VerifyUrl::new(url, fail_open)
        .unwrap()
        .with_timeout(timeout);
    tokio::time::timeout(Duration::from_secs(10), check.admit(&k, None))
        .await
        .expect("the admission check must decide without waiting out a 60 s timeout")
}

fn rejected_for(d: &derper::admission::Decision) -> &'static str {
    match d {
        derper::admission::Decision::Reject { reason, .. } => reason,
        derper::admission::Decision::Admit => "admitted",
    }
}

#[tokio::test]
async fn verify_url_status_other_than_200_denies_without_waiting_for_the_body() {
    // A 403 whose body never arrives: the status alone decides, in both modes, long
    // before the (60 s) request timeout.
    let url =
        stalling_endpoint("HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\n{\"Allow\":").await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_secs(60)).await;
        assert_eq!(
            rejected_for(&d),
            "verify_url_bad_status",
            "fail_open={fail_open}"
        );
    }
}

#[tokio::test]
async fn verify_url_oversized_body_denies_at_once() {
    // {"Allow":false} with a Content-Length far over the 4 KiB limit, the rest never sent.
    let url =
        stalling_endpoint("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n{\"Allow\":false}")
            .await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_secs(60)).await;
        assert_eq!(
            rejected_for(&d),
            "verify_url_bad_response",
            "fail_open={fail_open}"
        );
    }
    // Chunked, no Content-Length: the limit applies to what streams in.
    let big = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1400\r\n{}\r\n",
            " ".repeat(0x1400)
        )
        .into_boxed_str(),
    );
    let url = stalling_endpoint(big).await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_secs(60)).await;
        assert_eq!(
            rejected_for(&d),
            "verify_url_bad_response",
            "fail_open={fail_open}"
        );
    }
}

#[tokio::test]
async fn verify_url_stalled_or_unparsable_body_denies() {
    // The head arrived (200), the body stops half-way: a denial even with fail-open.
    let url = stalling_endpoint("HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{\"Allow\":tr").await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_millis(300)).await;
        assert_eq!(
            rejected_for(&d),
            "verify_url_bad_response",
            "fail_open={fail_open}"
        );
    }
    let url = stalling_endpoint("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nyes!").await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_secs(60)).await;
        assert_eq!(
            rejected_for(&d),
            "verify_url_bad_response",
            "fail_open={fail_open}"
        );
    }
    // A complete {"Allow":true} still admits, even if the endpoint keeps the connection.
    let url =
        stalling_endpoint("HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"Allow\":true}").await;
    for fail_open in [true, false] {
        let d = decide(&url, fail_open, Duration::from_secs(60)).await;
        assert_eq!(
            d,
            derper::admission::Decision::Admit,
            "fail_open={fail_open}"
        );
    }
}

#[tokio::test]
async fn verify_url_without_a_response_head_follows_fail_open() {
    // Connection refused.
    let url = closed_port_url();
    assert_eq!(rejected_for(&decide(&url, true, T).await), "admitted");
    assert_eq!(
        rejected_for(&decide(&url, false, T).await),
        "verify_url_unreachable"
    );
    // The head never completes: only the status line arrives before the timeout.
    let url = stalling_endpoint("HTTP/1.1 200 OK\r\n").await;
    let t = Duration::from_millis(300);
    assert_eq!(rejected_for(&decide(&url, true, t).await), "admitted");
    assert_eq!(
        rejected_for(&decide(&url, false, t).await),
        "verify_url_unreachable"
    );
}

/// A stream that counts the bytes read through it.
struct Counting<S> {
    inner: S,
    read: Arc<std::sync::atomic::AtomicUsize>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counting<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects `key` to `server` over an in-memory pipe (1 MiB each way, so the client's
/// writes never wait on the server); returns the client and a count of the bytes the
/// server has read from it.
async fn connect_counted(
    server: &derper::server::Server,
    key: &NodePrivateKey,
) -> (Client, Arc<std::sync::atomic::AtomicUsize>) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b = Counting {
        inner: b,
        read: read.clone(),
    };
    tokio::spawn(derper::http::serve_connection(
        server.clone(),
        Arc::new(derper::http::HttpOptions::default()),
        b,
        None,
        derper::http::ListenerKind::Main,
    ));
    let cfg = derper::client::ClientConfig::new("127.0.0.1:1".parse().unwrap());
    (Client::connect_stream(a, &cfg, key).await.unwrap(), read)
}

#[tokio::test]
async fn receive_limit_waits_before_reading_the_payload() {
    use std::sync::atomic::Ordering::SeqCst;
    // 1 kB/s after a burst of one maximal frame: the second 65,000-byte packet must wait
    // about a minute for tokens, and its payload must not be read while it waits.
    let server = derper::server::Server::new(
        NodePrivateKey::generate(),
        ServerOptions {
            recv_rate: Some(RecvRateLimit {
                bytes_per_sec: 1000.0,
                burst_bytes: 0.0,
            }),
            ..Default::default()
        },
        derper::metrics::Metrics::unregistered(),
    );
    let (ka, kb) = (NodePrivateKey::generate(), NodePrivateKey::generate());
    let (mut a, read) = connect_counted(&server, &ka).await;
    let (mut b, _) = connect_counted(&server, &kb).await;
    let after_handshake = read.load(SeqCst);
    let pkt = vec![7u8; 65_000];
    a.send_packet(&kb.public(), &pkt).await.unwrap();
    a.send_packet(&kb.public(), &pkt).await.unwrap();
    // The first packet fits the burst and is relayed.
    assert_eq!(b.recv_packet(T).await.unwrap().1.len(), pkt.len());
    // The server is now waiting on the limiter for the second frame.
    let deadline = tokio::time::Instant::now() + T;
    while server.metrics().rate_limit_waited.get() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no rate-limit wait");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let frame = 5 + 32 + pkt.len();
    let read_since = read.load(SeqCst) - after_handshake;
    // The first frame, the second one's header and at most the reader's read-ahead bound;
    // not the second payload.
    assert!(
        read_since <= frame + derper::proto::codec::RATE_LIMITED_READ_AHEAD,
        "server read {read_since} bytes while waiting (frame = {frame})"
    );
    assert!(read_since > frame, "{read_since}");
}

/// Log lines captured from a `tracing` subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn rejected_clients_are_logged_by_short_key_only() {
    // Current-thread runtime: the relay's tasks log through this thread's subscriber.
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let state = Arc::new(Endpoint::default()); // allows nobody
    let url = endpoint(state).await;
    let check: Arc<dyn Admit> = Arc::new(VerifyUrl::new(&url, false).unwrap());
    let s = server_with(vec![check], None).await;
    // The rejection line is rate-limited (one a second, shared with the other tests in
    // this binary): refuse clients until one line is ours.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut keys = Vec::new();
    while !logs.text().contains("client rejected") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rejection logged"
        );
        let k = NodePrivateKey::generate();
        refused(&s, &k).await;
        keys.push(k);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = logs.text();
    assert!(
        keys.iter()
            .any(|k| text.contains(&format!("client={}", k.public().short()))),
        "{text}"
    );
    for k in &keys {
        assert!(!text.contains(&k.public().to_hex()), "{text}");
    }
}

/// A TCP connection to `to` from the loopback address `from` that sends nothing.
async fn half_open(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(from), 0).into())
        .unwrap();
    sock.connect(to).await.unwrap()
}

/// The server closes `c` (EOF or reset) without sending anything.
async fn closed_at_accept(mut c: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(T, c.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("server sent {n} bytes"),
        Err(_) => panic!("connection over the cap was not closed"),
    }
}

#[tokio::test]
async fn handshaking_connections_are_capped_in_total_and_per_source() {
    let s = start(TestServerOptions {
        server: ServerOptions {
            handshake_limit: 6,
            handshake_limit_per_ip: 3,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let m = s.metrics().clone();
    let handshaking = |n: i64| move |s: &TestServer| s.metrics().handshaking_connections.get() == n;
    // Half-open TLS connections from 127.0.0.1 up to the per-source cap…
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(half_open([127, 0, 0, 1], s.addr).await);
    }
    s.wait_for("3 handshaking", T, handshaking(3)).await;
    // …then one more from the same source is closed at accept.
    closed_at_accept(half_open([127, 0, 0, 1], s.addr).await).await;
    assert_eq!(m.handshake_limit_rejections("per_ip"), 1);
    // Another source fills the total cap; a third source is refused by it.
    for _ in 0..3 {
        held.push(half_open([127, 0, 0, 2], s.addr).await);
    }
    s.wait_for("6 handshaking", T, handshaking(6)).await;
    closed_at_accept(half_open([127, 0, 0, 3], s.addr).await).await;
    assert_eq!(m.handshake_limit_rejections("total"), 1);
    // The plain-HTTP port shares the caps.
    closed_at_accept(half_open([127, 0, 0, 3], s.http_addr.unwrap()).await).await;
    assert_eq!(m.handshake_limit_rejections("total"), 2);
    assert_eq!(m.handshaking_connections.get(), 6);

    // Closing one makes room; admitted clients stop counting, so many can connect in turn.
    drop(held.remove(0));
    s.wait_for("5 handshaking", T, handshaking(5)).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(
            s.connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
                .await
                .unwrap(),
        );
    }
    s.wait_for("5 handshaking", T, handshaking(5)).await;
    assert_eq!(m.current_connections.get(), 5);
    drop(held);
    s.wait_for("none handshaking", T, handshaking(0)).await;
    assert_eq!(m.handshake_limit_rejections("per_ip"), 1);
    assert_eq!(m.handshake_limit_rejections("total"), 2);
}

#[tokio::test]
async fn derp_upgrade_after_a_kept_alive_request_keeps_its_handshake_slot() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = start(TestServerOptions {
        tls: false,
        server: ServerOptions {
            handshake_limit_per_ip: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let m = s.metrics().clone();
    let mut c = half_open([127, 0, 0, 1], s.addr).await;
    // A plain request first (served by hyper, connection kept alive): still counted.
    c.write_all(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("Disallow") {
        let n = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    closed_at_accept(half_open([127, 0, 0, 1], s.addr).await).await;
    // Then the DERP upgrade on the same connection: the slot moves to the DERP handshake.
    c.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let head_end = loop {
        let n = tokio::time::timeout(T, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n")
            && got.len() >= i + 4 + 45
        {
            break i + 4;
        }
    };
    assert!(got.starts_with(b"HTTP/1.1 101"));
    let server_key =
        derper::key::NodePublicKey::from_slice(&got[head_end + 13..head_end + 45]).unwrap();
    assert_eq!(server_key, s.server_key);
    // ServerKey arrived: hyper is done with the connection, the handshake still counts.
    assert_eq!(m.handshaking_connections.get(), 1);
    closed_at_accept(half_open([127, 0, 0, 1], s.addr).await).await;
    assert_eq!(m.handshake_limit_rejections("per_ip"), 2);
    // Admitted: released.
    let mut ci = bytes::BytesMut::new();
    derper::proto::handshake::write_client_info(
        &mut ci,
        &NodePrivateKey::generate(),
        &server_key,
        &derper::proto::handshake::ClientInfo {
            version: 2,
            ..Default::default()
        },
        &[1; 24],
    );
    c.write_all(&ci).await.unwrap();
    s.wait_for("admitted", T, |s| {
        s.metrics().current_connections.get() == 1
    })
    .await;
    s.wait_for("slot released", T, |s| {
        s.metrics().handshaking_connections.get() == 0
    })
    .await;
    s.connect(&NodePrivateKey::generate(), UpgradeMode::Plain)
        .await
        .unwrap();
}
