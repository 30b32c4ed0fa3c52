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
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};

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
/// 200 with `{"Allow":true}`; transport failures admit iff `fail_open`.
#[derive(Debug, Clone)]
pub struct VerifyUrl {
    uri: http::Uri,
    authority: String,
    fail_open: bool,
    timeout: Duration,
}

/// Upstream's webhook timeout.
pub const VERIFY_URL_TIMEOUT: Duration = Duration::from_secs(5);

impl VerifyUrl {
    /// Validates the URL (only `http://` is supported).
    pub fn new(url: &str, fail_open: bool) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err("https:// is not supported yet; use http:// (e.g. a sidecar)".into());
            }
            _ => return Err(format!("{url:?}: want an http:// URL")),
        }
        let auth = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        let authority = format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80));
        Ok(Self {
            uri,
            authority,
            fail_open,
            timeout: VERIFY_URL_TIMEOUT,
        })
    }

    /// Overrides the request timeout (tests).
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sends the request. `Err(transport error)` / `Ok((status, body))`.
    async fn request(&self, body: Vec<u8>) -> Result<(u16, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("connect {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = self
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let req = http::Request::post(path)
            .header(
                http::header::HOST,
                self.uri.authority().map_or("", |a| a.as_str()),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // Only the first 4 KiB of the body are considered (upstream).
        let body = match Limited::new(resp.into_body(), 4096).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok((status, body))
    }
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
            match tokio::time::timeout(self.timeout, self.request(body)).await {
                Err(_) | Ok(Err(_)) if self.fail_open => Decision::Admit,
                Err(_) => reject("verify_url_unreachable", "admission URL timed out"),
                Ok(Err(e)) => reject(
                    "verify_url_unreachable",
                    format!("admission URL unreachable: {e}"),
                ),
                Ok(Ok((200, body))) => match serde_json::from_slice::<AdmitResponse>(&body) {
                    Ok(AdmitResponse { allow: true }) => Decision::Admit,
                    Ok(_) => reject("verify_url_denied", "admission URL said Allow=false"),
                    Err(e) => reject(
                        "verify_url_bad_response",
                        format!("admission URL response: {e}"),
                    ),
                },
                Ok(Ok((status, _))) => reject(
                    "verify_url_bad_status",
                    format!("admission URL returned HTTP {status}"),
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
    checks: &[std::sync::Arc<dyn Admit>],
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
        assert!(VerifyUrl::new("https://example.com/", true).is_err());
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
