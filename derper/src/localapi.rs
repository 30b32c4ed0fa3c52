//! Asking the local tailscaled whether a node key belongs to the tailnet (`--verify-clients`,
//! spec §6.9 step 2).
//!
//! Owns one LocalAPI request, made exactly as Go derper's `local.Client.WhoIsNodeKey` makes
//! it (`client/local/local.go` @v1.104.7): HTTP/1.1 over tailscaled's Unix socket,
//!
//! ```text
//! GET /localapi/v0/whois?addr=nodekey%3A<64 hex> HTTP/1.1
//! Host: local-tailscaled.sock
//! Tailscale-Cap: <capability version>
//! ```
//!
//! 200 with a JSON body means the key is a peer of (or is) that tailscaled's node; 404 means
//! it is not ("not found in local tailscaled"). Everything else is an error.
//!
//! Does not decide admission, count or log rejections: the caller (the server's admission
//! step) does. No connection is reused: each call dials the socket afresh, as a verification
//! happens once per accepted client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::key::NodePublicKey;

/// Default tailscaled socket on Linux (spec §6.9, Go `paths.DefaultTailscaledSocket`).
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

/// HTTP host of every LocalAPI request (Go `apitype.LocalAPIHost`; tailscaled ignores it but
/// it is what the Go client sends).
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";

/// `Tailscale-Cap` header value: `tailcfg.CurrentCapabilityVersion` of tailscale.com v1.104.7
/// (the version our interop tests build). tailscaled only uses it to adapt responses.
pub const CAPABILITY_VERSION: u32 = 148;

/// Bound on one whois call, connect to last body byte. Go derper bounds it only by the
/// connection's context; 5 s matches its own self-check (`checkVerifyClientsLocalTailscaled`)
/// and the `--verify-client-url` timeout (spec §6.9).
pub const WHOIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest whois response body read (a WhoIsResponse is a node plus its user profile, a few
/// KiB; anything this large is not tailscaled).
pub const MAX_BODY: usize = 1 << 20;

/// Substring of tailscaled's error for an unsupported `nodekey:` whois (Go derper reports it
/// as "tailscaled version is too old", spec §6.9).
const TOO_OLD_MARKER: &str = "invalid 'addr' parameter";

/// Why a LocalAPI whois could not give a yes/no answer.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    /// The socket could not be dialled (missing, refused: tailscaled not running).
    #[error("failed to connect to local tailscaled at {}: {source} (is tailscaled running?)", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The dial error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (tailscaled closed the connection, malformed response).
    #[error("local tailscaled at {}: HTTP error: {source}", path.display())]
    Http {
        /// The socket path.
        path: PathBuf,
        /// The hyper error.
        #[source]
        source: hyper::Error,
    },
    /// The response body was larger than [`MAX_BODY`] or could not be read.
    #[error("local tailscaled at {}: reading response body: {reason}", path.display())]
    Body {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// tailscaled answered with a status other than 200 or 404.
    #[error("local tailscaled at {}: {status}: {message}", path.display())]
    Status {
        /// The socket path.
        path: PathBuf,
        /// The HTTP status.
        status: http::StatusCode,
        /// The `{"error": ...}` message, or the trimmed body.
        message: String,
    },
    /// A 200 whose body is not a JSON object.
    #[error("local tailscaled at {}: bad whois response: {reason}", path.display())]
    BadResponse {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No answer within [`WHOIS_TIMEOUT`].
    #[error("local tailscaled at {}: no answer within {timeout:?}", path.display())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The bound that expired.
        timeout: Duration,
    },
}

impl LocalApiError {
    /// True when tailscaled rejected the `nodekey:` form of whois, i.e. it predates it
    /// (Go derper: "tailscaled version is too old (out of sync with derper binary)").
    pub fn is_tailscaled_too_old(&self) -> bool {
        matches!(self, Self::Status { message, .. } if message.contains(TOO_OLD_MARKER))
    }
}

/// Asks the tailscaled listening on `socket` whether `key` is a node of its tailnet that it
/// can see (a peer, or itself).
///
/// `Ok(true)`: whois found it (200). `Ok(false)`: not found (404, Go `ErrPeerNotFound`).
/// `Err`: anything else, including no answer within [`WHOIS_TIMEOUT`].
pub async fn node_key_in_tailnet(
    socket: &Path,
    key: &NodePublicKey,
) -> Result<bool, LocalApiError> {
    match tokio::time::timeout(WHOIS_TIMEOUT, whois(socket, key)).await {
        Ok(res) => res,
        Err(_) => Err(LocalApiError::Timeout {
            path: socket.to_owned(),
            timeout: WHOIS_TIMEOUT,
        }),
    }
}

async fn whois(socket: &Path, key: &NodePublicKey) -> Result<bool, LocalApiError> {
    let path = || socket.to_owned();
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| LocalApiError::Connect {
            path: path(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| LocalApiError::Http {
            path: path(),
            source,
        })?;
    // The connection task ends when the response is done or the sender is dropped; it is
    // aborted with the future if the timeout fires first.
    let conn = tokio::spawn(conn);
    let _abort = AbortOnDrop(conn);

    // Byte-identical to Go's `"addr=" + url.QueryEscape(key.String())`: the ':' of
    // `nodekey:` is escaped as %3A (tailscaled decodes the query either way).
    let uri = format!("/localapi/v0/whois?addr=nodekey%3A{}", key.to_hex());
    let req = http::Request::get(uri)
        .header(http::header::HOST, LOCALAPI_HOST)
        .header("Tailscale-Cap", CAPABILITY_VERSION.to_string())
        .body(Empty::<Bytes>::new())
        .expect("static method, valid URI and header values");
    let res = sender
        .send_request(req)
        .await
        .map_err(|source| LocalApiError::Http {
            path: path(),
            source,
        })?;
    let status = res.status();
    let body = Limited::new(res.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| LocalApiError::Body {
            path: path(),
            reason: e.to_string(),
        })?
        .to_bytes();
    classify(socket, status, &body)
}

/// Maps a whois response to the answer (spec §6.9).
fn classify(socket: &Path, status: http::StatusCode, body: &[u8]) -> Result<bool, LocalApiError> {
    match status {
        http::StatusCode::OK => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(_)) => Ok(true),
            Ok(_) => Err(LocalApiError::BadResponse {
                path: socket.to_owned(),
                reason: "not a JSON object".into(),
            }),
            Err(e) => Err(LocalApiError::BadResponse {
                path: socket.to_owned(),
                reason: e.to_string(),
            }),
        },
        http::StatusCode::NOT_FOUND => Ok(false),
        status => Err(LocalApiError::Status {
            path: socket.to_owned(),
            status,
            message: error_message(body),
        }),
    }
}

/// Go `errorMessageFromBody`: the `Error` field of a JSON body, else the trimmed text.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorJson {
        #[serde(alias = "Error")]
        error: String,
    }
    if let Ok(j) = serde_json::from_slice::<ErrorJson>(body)
        && !j.error.is_empty()
    {
        return j.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    // Bounded: the message ends up in a log line.
    text.chars().take(200).collect()
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixListener;

    /// A one-shot fake tailscaled: answers the first request on `sock` with `response`
    /// (raw HTTP) and returns the request head it received.
    fn fake(sock: &Path, response: String) -> tokio::task::JoinHandle<String> {
        let ln = UnixListener::bind(sock).expect("bind fake socket");
        tokio::spawn(async move {
            let (mut s, _) = ln.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(response.as_bytes()).await.expect("write");
            s.shutdown().await.ok();
            String::from_utf8(head).expect("utf8 head")
        })
    }

    fn key() -> NodePublicKey {
        NodePublicKey::from_slice(&[7u8; 32]).expect("32 bytes")
    }

    /// A response with `status` and `body` (correct Content-Length).
    fn reply(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    async fn ask(response: String) -> (Result<bool, LocalApiError>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("tailscaled.sock");
        let server = fake(&sock, response);
        let res = node_key_in_tailnet(&sock, &key()).await;
        let head = server.await.expect("fake server");
        (res, head)
    }

    #[tokio::test]
    async fn request_matches_go_local_client() {
        let (res, head) = ask(reply("200 OK", r#"{"Node":{},"UserProfile":{}}"#)).await;
        assert!(res.expect("ok"));
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "GET /localapi/v0/whois?addr=nodekey%3A{} HTTP/1.1",
                "07".repeat(32)
            )
        );
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("host: local-tailscaled.sock\r\n"), "{head}");
        assert!(
            lower.contains(&format!("tailscale-cap: {CAPABILITY_VERSION}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn not_found_is_false() {
        let (res, _) = ask(reply("404 Not Found", "no match for IP:port\n")).await;
        assert!(!res.expect("404 is an answer"));
    }

    #[tokio::test]
    async fn too_old_tailscaled_is_recognised() {
        let (res, _) = ask(reply("400 Bad Request", "invalid 'addr' parameter\n")).await;
        let err = res.expect_err("400 is an error");
        assert!(err.is_tailscaled_too_old(), "{err}");
        assert!(err.to_string().contains("400 Bad Request"), "{err}");
    }

    #[tokio::test]
    async fn access_denied_is_an_error_with_the_message() {
        let (res, _) = ask(reply("403 Forbidden", "whois access denied\n")).await;
        let err = res.expect_err("403 is an error");
        assert!(
            matches!(&err, LocalApiError::Status { status, message, .. }
                if *status == 403 && message == "whois access denied"),
            "{err:?}"
        );
        assert!(!err.is_tailscaled_too_old());
    }

    #[tokio::test]
    async fn json_error_field_is_extracted() {
        let (res, _) = ask(reply(
            "500 Internal Server Error",
            r#"{"error":"no state"}"#,
        ))
        .await;
        match res.expect_err("500 is an error") {
            LocalApiError::Status { message, .. } => assert_eq!(message, "no state"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn ok_with_garbage_body_is_an_error() {
        let (res, _) = ask(reply("200 OK", "hello")).await;
        assert!(matches!(
            res.expect_err("bad json"),
            LocalApiError::BadResponse { .. }
        ));
        let (res, _) = ask(reply("200 OK", "[]")).await;
        assert!(matches!(
            res.expect_err("not an object"),
            LocalApiError::BadResponse { .. }
        ));
    }

    #[tokio::test]
    async fn not_http_is_an_error() {
        let (res, _) = ask("SSH-2.0-nope\r\n\r\n".to_owned()).await;
        assert!(matches!(
            res.expect_err("not http"),
            LocalApiError::Http { .. }
        ));
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nope.sock");
        let err = node_key_in_tailnet(&sock, &key())
            .await
            .expect_err("no socket");
        assert!(matches!(err, LocalApiError::Connect { .. }));
        assert!(err.to_string().contains("is tailscaled running?"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn silent_tailscaled_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("tailscaled.sock");
        let ln = UnixListener::bind(&sock).expect("bind");
        let hold = tokio::spawn(async move {
            let (s, _) = ln.accept().await.expect("accept");
            std::future::pending::<()>().await;
            drop(s);
        });
        let err = node_key_in_tailnet(&sock, &key())
            .await
            .expect_err("timeout");
        assert!(matches!(err, LocalApiError::Timeout { .. }), "{err}");
        hold.abort();
    }
}
