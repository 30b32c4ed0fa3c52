//! The HTTP surface of the relay (spec §1): the `/derp` upgrade (plain 101, fast start and
//! WebSocket), the probe / captive-portal / bootstrap-DNS / robots / home endpoints and the
//! plain-HTTP port's redirects.
//!
//! The *first* request head on every connection is parsed here, by hand, on the raw
//! stream: that is the only way to implement fast start (no HTTP response at all, spec
//! §1.4) and to hand bytes pipelined after the head to the DERP frame reader. Everything
//! that is not a DERP upgrade is replayed into hyper's HTTP/1.1 server.

pub(crate) mod head;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::debug;

pub use head::{RequestHead, find_head_end, parse_head};

use crate::defaults;
use crate::server::handshaking::{HandshakeSlot, SlotHolder};
use crate::server::{ConnInfo, Server};

/// What `/` serves (spec §8.1 `-home`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HomePage {
    /// The default HTML page.
    #[default]
    Default,
    /// An empty 200.
    Blank,
    /// 302 to this URL.
    Redirect(String),
}

/// HTTP behaviour options.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Serve `/derp` (`-derp`).
    pub derp_enabled: bool,
    /// Home page.
    pub home: HomePage,
    /// Deadlines on the admin listener's connections.
    pub admin_timeouts: crate::metrics::AdminTimeouts,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            derp_enabled: true,
            home: HomePage::Default,
            admin_timeouts: crate::metrics::AdminTimeouts::default(),
        }
    }
}

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The main (`-a`) listener.
    Main,
    /// The plain HTTP port (`--http-port`, spec §1.7).
    Port80,
}

/// The exact 101 response of spec §1.3.
pub fn derp_101(server_key_hex: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {server_key_hex}\r\n\r\n"
    )
}

/// A stream that replays `pre` before reading from `inner`.
#[derive(Debug)]
pub struct Rewind<S> {
    pre: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Wraps `inner`, replaying `pre` first.
    pub fn new(inner: S, pre: Bytes) -> Self {
        Self { pre, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(self.pre.get(..n).unwrap_or_default());
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub(crate) enum Upgrade {
    Derp { fast_start: bool },
    WebSocket { accept: String },
}

pub(crate) fn classify(
    head: &RequestHead,
    http: &HttpOptions,
    kind: ListenerKind,
) -> Option<Upgrade> {
    if kind != ListenerKind::Main || !http.derp_enabled || head.path() != "/derp" {
        return None;
    }
    let up = head.header("upgrade")?.to_ascii_lowercase();
    if up == "websocket"
        && head
            .header("sec-websocket-protocol")
            .is_some_and(|p| p.contains("derp"))
    {
        let key = head.header("sec-websocket-key")?;
        return Some(Upgrade::WebSocket {
            accept: crate::ws::accept_key(key),
        });
    }
    // spec §1.3 step 3: `Upgrade: websocket` without the derp subprotocol is raw DERP.
    if up == "derp" || up == "websocket" {
        return Some(Upgrade::Derp {
            fast_start: head.header("derp-fast-start") == Some("1"),
        });
    }
    None
}

/// Serves one accepted (and TLS-terminated, if applicable) connection: the HTTP endpoints
/// and, for a DERP upgrade, the whole DERP connection. Returns when the connection ends.
pub async fn serve_connection<S>(
    server: Server,
    http: Arc<HttpOptions>,
    stream: S,
    remote: Option<SocketAddr>,
    kind: ListenerKind,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_connection_gated(server, http, stream, remote, kind, None).await;
}

/// [`serve_connection`] for a connection holding a handshake slot (see
/// [`crate::server`]'s accept loop): released once a DERP client is admitted, or kept
/// until a plain HTTP connection ends.
pub(crate) async fn serve_connection_gated<S>(
    server: Server,
    http: Arc<HttpOptions>,
    mut stream: S,
    remote: Option<SocketAddr>,
    kind: ListenerKind,
    slot: Option<HandshakeSlot>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let slot = SlotHolder::new(slot);
    let mut buf = BytesMut::with_capacity(2048);
    let cancel = server.cancel_token();
    let head_end = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(defaults::HTTP_HEAD_TIMEOUT, async {
            loop {
                if let Some(e) = find_head_end(&buf) {
                    return Some(e);
                }
                if buf.len() >= defaults::MAX_REQUEST_HEAD {
                    return None;
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        }) => r,
    };
    let head_end = match head_end {
        Err(_) => {
            debug!(?remote, "http request head timed out");
            return;
        }
        Ok(None) if buf.is_empty() => return,
        Ok(None) => None,
        Ok(Some(e)) => Some(e),
    };
    if let Some(end) = head_end
        && let Some(head) = buf.get(..end).and_then(parse_head)
        && let Some(up) = classify(&head, &http, kind)
    {
        let rest = buf.split_off(end);
        let not_ideal = head.header("ideal-node").is_some_and(|v| !v.is_empty());
        // The head is not needed for the life of the connection.
        drop(head);
        drop(buf);
        server.metrics().http_request("derp");
        match up {
            Upgrade::Derp { fast_start } => {
                let prelude = if fast_start {
                    // spec §1.4: never write any HTTP response in fast-start mode.
                    Bytes::new()
                } else {
                    Bytes::from(derp_101(&server.public_key().to_hex()))
                };
                let info = ConnInfo {
                    remote,
                    not_ideal,
                    prelude,
                    handshake_slot: slot,
                };
                // The connection goes on in its own task; this one (TLS handshake, request
                // head) ends (T5).
                server.handle_derp_detached(stream, rest, info).await;
            }
            Upgrade::WebSocket { accept } => {
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: derp\r\n\r\n"
                );
                if stream.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                server.metrics().websocket_accepts.inc();
                let ws = crate::ws::WsStream::new(stream, crate::ws::Role::Server, rest);
                let info = ConnInfo {
                    remote,
                    not_ideal: false,
                    prelude: Bytes::new(),
                    handshake_slot: slot,
                };
                // Boxed: inline, this rarely used branch would set the size of every
                // connection's task (a task is as large as its largest state; T5).
                Box::pin(server.handle_derp(ws, BytesMut::new(), info)).await;
            }
        }
        return;
    }
    // Not a DERP upgrade: replay the bytes into hyper.
    let io = TokioIo::new(Rewind::new(stream, buf.freeze()));
    let server2 = server.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let server = server2.clone();
        let http = http.clone();
        let slot = slot.clone();
        async move {
            Ok::<_, std::convert::Infallible>(handle_request(
                &server, &http, req, remote, kind, slot,
            ))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(defaults::HTTP_HEAD_TIMEOUT)
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::select! {
        _ = conn => {}
        _ = cancel.cancelled() => {}
    }
}

type Resp = Response<Full<Bytes>>;

fn resp(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn set(r: &mut Resp, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// Browser security headers (spec §1.5 `AddBrowserHeaders`).
fn browser_headers(r: &mut Resp) {
    set(
        r,
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=63072000; includeSubDomains",
    );
    set(
        r,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'; block-all-mixed-content; object-src 'none'",
    );
    set(r, header::X_FRAME_OPTIONS, "DENY");
    set(r, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
}

/// Escapes `&`, `<`, `>`, `"` and `'` for HTML text and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// True if the challenge may be echoed (spec §1.5: ≤ 64 bytes of `[A-Za-z0-9._:-]`).
pub fn valid_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 64
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn generate_204<B>(req: &Request<B>) -> Resp {
    let mut r = resp(StatusCode::NO_CONTENT, Bytes::new());
    set(
        &mut r,
        header::CACHE_CONTROL,
        "no-cache, no-store, must-revalidate, no-transform, max-age=0",
    );
    if let Some(c) = req
        .headers()
        .get("x-tailscale-challenge")
        .and_then(|v| v.to_str().ok())
        && valid_challenge(c)
    {
        set(
            &mut r,
            header::HeaderName::from_static("x-tailscale-response"),
            &format!("response {c}"),
        );
    }
    r
}

const HOME_PAGE: &str = "<html><body>\n<h1>DERP</h1>\n<p>\n  This is a <a href=\"https://tailscale.com/\">Tailscale</a> DERP server (kubederp).\n</p>\n<p>\n  It provides STUN, interactive connectivity establishment, and relaying of end-to-end encrypted traffic\n  for Tailscale clients.\n</p>\n<p>\n  Documentation:\n</p>\n<ul>\n<li><a href=\"https://tailscale.com/kb/1232/derp-servers\">About DERP</a></li>\n<li><a href=\"https://pkg.go.dev/tailscale.com/derp\">Protocol &amp; Go docs</a></li>\n<li><a href=\"https://github.com/tailscale/tailscale/tree/main/cmd/derper#derp\">How to run a DERP server</a></li>\n</ul>\n</body>\n</html>\n";

/// Answers a request that hyper parsed, in named steps: CONNECT is refused on the main
/// port, the captive-portal check answers on every port, the plain-HTTP port redirects
/// everything else to HTTPS, and the main port routes by path (each route counted once).
///
/// `slot` is the connection's handshake slot, handed to a DERP upgrade.
fn handle_request(
    server: &Server,
    http: &HttpOptions,
    mut req: Request<hyper::body::Incoming>,
    remote: Option<SocketAddr>,
    kind: ListenerKind,
    slot: SlotHolder,
) -> Resp {
    let path = req.uri().path().to_owned();
    let m = server.metrics();
    if req.method() == Method::CONNECT && kind == ListenerKind::Main {
        // spec §1.2: the experimental CONNECT proxy ("ACE") is not enabled.
        m.http_request("connect");
        return resp(StatusCode::FORBIDDEN, "CONNECT not enabled\n");
    }
    if path == "/generate_204" {
        m.http_request("generate_204");
        return generate_204(&req);
    }
    if kind == ListenerKind::Port80 {
        m.http_request("port80");
        return redirect_to_https(&req);
    }
    match path.as_str() {
        "/derp" => {
            m.http_request("derp");
            derp_upgrade(server, http, &mut req, remote, slot)
        }
        "/derp/probe" | "/derp/latency-check" => {
            m.http_request("probe");
            latency_probe(&req)
        }
        "/bootstrap-dns" => {
            m.http_request("bootstrap_dns");
            bootstrap_dns()
        }
        "/robots.txt" => {
            m.http_request("robots");
            robots_txt()
        }
        _ => {
            m.http_request("home");
            home_page(&http.home)
        }
    }
}

/// The plain-HTTP port (spec §1.7): GET and HEAD are redirected to the same URL over
/// HTTPS, anything else is refused.
fn redirect_to_https<B>(req: &Request<B>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return resp(StatusCode::BAD_REQUEST, "Use HTTPS\n");
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let uri = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let target = format!("https://{host}{uri}");
    // The Host header and path are the client's: escaped, they cannot add markup.
    let mut r = resp(
        StatusCode::FOUND,
        format!("<a href=\"{}\">Found</a>.\n\n", html_escape(&target)),
    );
    set(&mut r, header::LOCATION, &target);
    set(&mut r, header::CONTENT_TYPE, "text/html; charset=utf-8");
    r
}

/// `/derp` on a request hyper parsed: answers 101 and runs the DERP connection on the
/// upgraded stream in a tracked task (spec §1.3).
fn derp_upgrade(
    server: &Server,
    http: &HttpOptions,
    req: &mut Request<hyper::body::Incoming>,
    remote: Option<SocketAddr>,
    slot: SlotHolder,
) -> Resp {
    if !http.derp_enabled {
        return resp(StatusCode::NOT_FOUND, "derp server disabled\n");
    }
    let up = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if up != "derp" && up != "websocket" {
        return resp(
            StatusCode::UPGRADE_REQUIRED,
            "DERP requires connection upgrade\n",
        );
    }
    // A DERP upgrade on a kept-alive connection (not the first request): hyper
    // writes the 101, so fast start cannot be honoured here; Go clients always send
    // `/derp` as the first request on a fresh connection.
    let not_ideal = req
        .headers()
        .get("ideal-node")
        .is_some_and(|v| !v.is_empty());
    let on_upgrade = hyper::upgrade::on(req);
    let s = server.clone();
    server.spawn_tracked(async move {
        if let Ok(up) = on_upgrade.await {
            let info = ConnInfo {
                remote,
                not_ideal,
                prelude: Bytes::new(),
                handshake_slot: slot,
            };
            s.handle_derp(TokioIo::new(up), BytesMut::new(), info).await;
        }
    });
    let mut r = resp(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    set(&mut r, header::UPGRADE, "DERP");
    set(&mut r, header::CONNECTION, "Upgrade");
    set(&mut r, header::HeaderName::from_static("derp-version"), "2");
    set(
        &mut r,
        header::HeaderName::from_static("derp-public-key"),
        &server.public_key().to_hex(),
    );
    r
}

/// `/derp/probe` and `/derp/latency-check`: an empty 200 for GET and HEAD.
fn latency_probe<B>(req: &Request<B>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return resp(StatusCode::METHOD_NOT_ALLOWED, "bogus probe method\n");
    }
    let mut r = resp(StatusCode::OK, Bytes::new());
    set(&mut r, header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
    r
}

/// `/bootstrap-dns`: no names are configured (spec §1.8), so an empty JSON object.
fn bootstrap_dns() -> Resp {
    let mut r = resp(StatusCode::OK, "{}");
    set(&mut r, header::CONTENT_TYPE, "application/json");
    set(&mut r, header::CONNECTION, "close");
    browser_headers(&mut r);
    r
}

/// `/robots.txt`: nothing to crawl.
fn robots_txt() -> Resp {
    let mut r = resp(StatusCode::OK, "User-agent: *\nDisallow: /\n");
    browser_headers(&mut r);
    r
}

/// Every other path: the configured home page (spec §8.1 `-home`).
fn home_page(home: &HomePage) -> Resp {
    let mut r = match home {
        HomePage::Default => {
            let mut r = resp(StatusCode::OK, HOME_PAGE);
            set(&mut r, header::CONTENT_TYPE, "text/html; charset=utf-8");
            r
        }
        HomePage::Blank => {
            let mut r = resp(StatusCode::OK, Bytes::new());
            set(&mut r, header::CONTENT_TYPE, "text/html; charset=utf-8");
            r
        }
        HomePage::Redirect(u) => {
            let mut r = resp(StatusCode::FOUND, Bytes::new());
            set(&mut r, header::LOCATION, u);
            r
        }
    };
    browser_headers(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_go_client_request() {
        let raw = b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1:443\r\nUser-Agent: Go-http-client/1.1\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\nUpgrade: DERP\r\n\r\nXYZ";
        let end = find_head_end(raw).unwrap();
        assert_eq!(&raw[end..], b"XYZ");
        let h = parse_head(&raw[..end]).unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.path(), "/derp");
        assert_eq!(h.header("upgrade"), Some("DERP"));
        assert_eq!(h.header("DERP-FAST-START"), Some("1"));
        assert!(matches!(
            classify(&h, &HttpOptions::default(), ListenerKind::Main),
            Some(Upgrade::Derp { fast_start: true })
        ));
        assert!(classify(&h, &HttpOptions::default(), ListenerKind::Port80).is_none());
    }

    #[test]
    fn exact_101() {
        let s = derp_101(&"ab".repeat(32));
        assert_eq!(
            s,
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\nDerp-Public-Key: {}\r\n\r\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn challenge_rules() {
        assert!(valid_challenge("ts_203.0.113.5"));
        assert!(!valid_challenge(&"a".repeat(65)));
        assert!(valid_challenge(&"a".repeat(64)));
        assert!(!valid_challenge("a/b"));
        assert!(!valid_challenge(""));
    }

    proptest! {
        #[test]
        fn head_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..500)) {
            let _ = find_head_end(&data);
            let _ = parse_head(&data);
        }
    }
}
