//! Client admission (spec §6.9): checks run after ClientInfo and before the client is
//! registered. Mesh-key holders skip them. Every check in [`ServerOptions::admission`]
//! must admit; a rejection closes the connection without any frame, is counted in
//! `derper_admission_rejections{reason}` and logged through a [`LogLimiter`].
//!
//! Checks: [`VerifyUrl`] (`--verify-client-url`, upstream JSON and fail-open semantics)
//! and [`VerifyTailscaled`] (`--verify-clients`, via a [`NodeKeyLookup`] — the tailscaled
//! LocalAPI in production, a fake in tests).
//!
//! [`ServerOptions::admission`]: crate::server::ServerOptions::admission
//! [`LogLimiter`]: crate::ratelimit::LogLimiter

use std::fmt::Debug;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use rustls::pki_types::CertificateDer;

use crate::key::NodePublicKey;

/// A boxed future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Result of an admission check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the client in.
    Admit,
    /// Refuse: `reason` is a metric label, `detail` goes to the (rate-limited) log.
    Reject {
        /// Metric label.
        reason: &'static str,
        /// Human-readable detail (never contains secrets).
        detail: String,
    },
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Decision {
    Decision::Reject {
        reason,
        detail: detail.into(),
    }
}

/// One admission check.
pub trait Admit: Send + Sync + Debug {
    /// Decides for `key` connecting from `source`.
    fn admit<'a>(
        &'a self,
        key: &'a NodePublicKey,
        source: Option<IpAddr>,
    ) -> BoxFuture<'a, Decision>;
}

/// `--verify-client-url`: POST `{"NodePublic":"nodekey:…","Source":"<ip>"}`, admit iff
/// 200 with `{"Allow":true}`. Only an endpoint that sent no response head (connect, TLS or
/// HTTP failure, or the timeout before the head) admits iff `fail_open`; any other status,
/// and a body that stalls, is too large or does not parse, denies.
#[derive(Debug, Clone)]
pub struct VerifyUrl {
    uri: http::Uri,
    authority: String,
    /// TLS for `https://` URLs: the server name and a WebPKI client config.
    tls: Option<(
        rustls::pki_types::ServerName<'static>,
        Arc<rustls::ClientConfig>,
    )>,
    fail_open: bool,
    timeout: Duration,
}

/// Upstream's webhook timeout: the whole exchange (connect, request, response head and
/// body) must fit in it.
pub const VERIFY_URL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response body considered (upstream reads at most 4 KiB); a larger one denies.
pub const VERIFY_URL_MAX_BODY: usize = 4096;

impl VerifyUrl {
    /// Validates the URL. `https://` endpoints are verified against the system CA bundle
    /// (`crate::roots::system_roots`: `SSL_CERT_FILE` or the usual paths).
    pub fn new(url: &str, fail_open: bool) -> Result<Self, String> {
        Self::with_roots(url, fail_open, crate::roots::system_roots)
    }

    /// Like [`VerifyUrl::new`], with the CA certificates for `https://` URLs from `roots`
    /// (called only for `https://`).
    pub fn with_roots(
        url: &str,
        fail_open: bool,
        roots: impl FnOnce() -> Vec<CertificateDer<'static>>,
    ) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let default_port = match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return Err(format!("{url:?}: want an http:// or https:// URL")),
        };
        let auth = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let port = auth.port_u16().unwrap_or(default_port);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = if default_port == 443 {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| format!("{url:?}: host is not a valid TLS server name: {e}"))?;
            let certs = roots();
            if certs.is_empty() {
                return Err(format!(
                    "{url:?}: no CA certificates to verify it (set SSL_CERT_FILE to a PEM bundle)"
                ));
            }
            let mut store = rustls::RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "{url:?}: none of the CA certificates could be parsed"
                ));
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
            Some((name, Arc::new(config)))
        } else {
            None
        };
        Ok(Self {
            uri,
            authority,
            tls,
            fail_open,
            timeout: VERIFY_URL_TIMEOUT,
        })
    }

    /// Overrides the request timeout (tests).
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sends the request and waits for the response head (status and headers) until
    /// `deadline`. `Err` means no response head arrived: the endpoint is unreachable
    /// (connect, TLS or HTTP error, or the deadline passed), the only case fail-open admits.
    async fn response_head(
        &self,
        body: Vec<u8>,
        deadline: tokio::time::Instant,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let send = async {
            let tcp = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| format!("connect {}: {e}", self.authority))?;
            let _ = tcp.set_nodelay(true);
            let mut send = match &self.tls {
                None => handshake(tcp, deadline).await?,
                Some((name, config)) => {
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| format!("TLS with {}: {e}", self.authority))?;
                    handshake(tls, deadline).await?
                }
            };
            let path = self
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            let req = http::Request::post(path)
                .header(
                    http::header::HOST,
                    self.uri.authority().map_or("", |a| a.as_str()),
                )
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            send.send_request(req).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout_at(deadline, send)
            .await
            .map_err(|_| "timed out before the response headers".to_owned())?
    }
}

/// Reads a 200 response's body until `deadline`: at most [`VERIFY_URL_MAX_BODY`] bytes. A
/// body that is larger (by `Content-Length` or as it streams), stalls past the deadline
/// or breaks off is an error, so the caller denies.
async fn read_body(
    resp: http::Response<hyper::body::Incoming>,
    deadline: tokio::time::Instant,
) -> Result<Bytes, String> {
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > VERIFY_URL_MAX_BODY as u64) {
        return Err(format!(
            "response body of {} bytes is over the {VERIFY_URL_MAX_BODY}-byte limit",
            declared.unwrap_or_default()
        ));
    }
    let collect = Limited::new(resp.into_body(), VERIFY_URL_MAX_BODY).collect();
    match tokio::time::timeout_at(deadline, collect).await {
        Err(_) => Err("response body did not arrive in time".to_owned()),
        Ok(Err(e)) => Err(format!("response body: {e}")),
        Ok(Ok(b)) => Ok(b.to_bytes()),
    }
}

/// HTTP/1.1 client handshake over any stream; the connection task runs until the request
/// is done, the response is dropped, or `deadline` passes.
async fn handshake<S>(
    io: S,
    deadline: tokio::time::Instant,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = tokio::time::timeout_at(deadline, conn).await;
    });
    Ok(send)
}

#[derive(serde::Serialize)]
#[serde(rename_all = "PascalCase")]
struct AdmitRequest {
    node_public: String,
    source: String,
}

#[derive(serde::Deserialize)]
struct AdmitResponse {
    #[serde(rename = "Allow", alias = "allow")]
    allow: bool,
}

impl Admit for VerifyUrl {
    fn admit<'a>(
        &'a self,
        key: &'a NodePublicKey,
        source: Option<IpAddr>,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            let req = AdmitRequest {
                node_public: key.to_nodekey_string(),
                source: source.map(|ip| ip.to_string()).unwrap_or_default(),
            };
            let body = serde_json::to_vec(&req).unwrap_or_default();
            let deadline = tokio::time::Instant::now() + self.timeout;
            // Only an endpoint that sent no response head may be failed open; once a head
            // arrived, the endpoint answered, and anything but a well-formed 200
            // {"Allow":true} denies (a slow or oversized body must not turn a denial into
            // an admission by running out the clock).
            let resp = match self.response_head(body, deadline).await {
                Ok(r) => r,
                Err(_) if self.fail_open => return Decision::Admit,
                Err(e) => {
                    return reject(
                        "verify_url_unreachable",
                        format!("admission URL unreachable: {e}"),
                    );
                }
            };
            let status = resp.status();
            if status != http::StatusCode::OK {
                // Dropping the response closes the connection; the body is never awaited.
                return reject(
                    "verify_url_bad_status",
                    format!("admission URL returned HTTP {}", status.as_u16()),
                );
            }
            let body = match read_body(resp, deadline).await {
                Ok(b) => b,
                Err(e) => {
                    return reject("verify_url_bad_response", format!("admission URL {e}"));
                }
            };
            match serde_json::from_slice::<AdmitResponse>(&body) {
                Ok(AdmitResponse { allow: true }) => Decision::Admit,
                Ok(_) => reject("verify_url_denied", "admission URL said Allow=false"),
                Err(e) => reject(
                    "verify_url_bad_response",
                    format!("admission URL response: {e}"),
                ),
            }
        })
    }
}

/// Whether a node key belongs to the tailnet (`--verify-clients`).
pub trait NodeKeyLookup: Send + Sync + Debug {
    /// `Ok(true)` = in the tailnet, `Ok(false)` = not found, `Err(text)` = no answer.
    fn in_tailnet<'a>(&'a self, key: &'a NodePublicKey) -> BoxFuture<'a, Result<bool, String>>;
}

/// `--verify-clients`: admit only keys the lookup knows; errors reject (upstream).
#[derive(Debug)]
pub struct VerifyTailscaled<L> {
    lookup: L,
}

impl<L: NodeKeyLookup> VerifyTailscaled<L> {
    /// Wraps a lookup.
    pub fn new(lookup: L) -> Self {
        Self { lookup }
    }
}

impl<L: NodeKeyLookup> Admit for VerifyTailscaled<L> {
    fn admit<'a>(
        &'a self,
        key: &'a NodePublicKey,
        _source: Option<IpAddr>,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            match self.lookup.in_tailnet(key).await {
                Ok(true) => Decision::Admit,
                Ok(false) => reject(
                    "verify_clients_not_found",
                    "not authorized (not found in local tailscaled)",
                ),
                Err(e) => reject("verify_clients_error", e),
            }
        })
    }
}

/// The production [`NodeKeyLookup`]: tailscaled's LocalAPI whois over its Unix socket
/// ([`crate::localapi::node_key_in_tailnet`]).
#[derive(Debug, Clone)]
pub struct LocalApiLookup {
    /// tailscaled's socket (`--socket`).
    pub socket: std::path::PathBuf,
}

impl NodeKeyLookup for LocalApiLookup {
    fn in_tailnet<'a>(&'a self, key: &'a NodePublicKey) -> BoxFuture<'a, Result<bool, String>> {
        Box::pin(async move {
            crate::localapi::node_key_in_tailnet(&self.socket, key)
                .await
                .map_err(|e| {
                    if e.is_tailscaled_too_old() {
                        format!("tailscaled version is too old: {e}")
                    } else {
                        e.to_string()
                    }
                })
        })
    }
}

/// Runs every check in order; the first rejection wins.
pub async fn check_all(
    checks: &[Arc<dyn Admit>],
    key: &NodePublicKey,
    source: Option<IpAddr>,
) -> Decision {
    for c in checks {
        let d = c.admit(key, source).await;
        if d != Decision::Admit {
            return d;
        }
    }
    Decision::Admit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_validation() {
        assert!(VerifyUrl::new("http://127.0.0.1:1/x", true).is_ok());
        assert!(VerifyUrl::with_roots("https://example.com/", true, Vec::new).is_err());
        let https = VerifyUrl::with_roots("https://[::1]/x", true, || {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
            vec![ck.cert.der().clone()]
        });
        assert_eq!(https.unwrap().authority, "[::1]:443");
        assert!(VerifyUrl::new("ftp://x", true).is_err());
        assert_eq!(
            VerifyUrl::new("http://example.com/a", true)
                .unwrap()
                .authority,
            "example.com:80"
        );
    }

    #[test]
    fn request_json_is_upstream_shape() {
        let r = AdmitRequest {
            node_public: "nodekey:ab".into(),
            source: "1.2.3.4".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"NodePublic":"nodekey:ab","Source":"1.2.3.4"}"#
        );
    }

    #[derive(Debug)]
    struct Fake(bool);
    impl NodeKeyLookup for Fake {
        fn in_tailnet<'a>(
            &'a self,
            _key: &'a NodePublicKey,
        ) -> BoxFuture<'a, Result<bool, String>> {
            Box::pin(async move { Ok(self.0) })
        }
    }

    #[tokio::test]
    async fn tailscaled_check_uses_lookup() {
        let k = crate::key::NodePrivateKey::generate().public();
        assert_eq!(
            VerifyTailscaled::new(Fake(true)).admit(&k, None).await,
            Decision::Admit
        );
        assert!(matches!(
            VerifyTailscaled::new(Fake(false)).admit(&k, None).await,
            Decision::Reject {
                reason: "verify_clients_not_found",
                ..
            }
        ));
    }

    #[tokio::test]
    async fn unreachable_url_follows_fail_open() {
        // A port nobody listens on (bound then released).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let k = crate::key::NodePrivateKey::generate().public();
        let open = VerifyUrl::new(&format!("http://127.0.0.1:{port}/"), true).unwrap();
        assert_eq!(open.admit(&k, None).await, Decision::Admit);
        let closed = VerifyUrl::new(&format!("http://127.0.0.1:{port}/"), false).unwrap();
        assert!(matches!(
            closed.admit(&k, None).await,
            Decision::Reject {
                reason: "verify_url_unreachable",
                ..
            }
        ));
    }
}
