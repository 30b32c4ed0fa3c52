//! Least-privilege checks of the chart's RBAC: a recording loopback proxy in front of the
//! apiserver ([`RecordingProxy`]), the RBAC access each recorded request needed
//! ([`Seen::accesses`]), and the access a set of rendered Roles and ClusterRoles grants
//! ([`granted`]). Comparing the two shows both a missing rule (a 403) and a rule nothing used.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt as _;
use kube::Client;
use serde_json::Value;

/// One request a client made through the proxy, and the apiserver's answer.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// URL query string (empty when none).
    pub query: String,
    /// The apiserver's status code.
    pub status: u16,
}

/// What RBAC checks for a request: API group, resource (with `/subresource`), verb, and the
/// namespace (`None` for cluster-scoped or all-namespaces requests).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    /// API group (`""` for the core group).
    pub group: String,
    /// Resource, with `/subresource` when there is one.
    pub resource: String,
    /// RBAC verb (`get`, `list`, `watch`, `create`, …).
    pub verb: String,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
}

impl Seen {
    /// The RBAC checks this request passed: one, or two for a server-side apply that created
    /// its object (201), which the apiserver authorizes as both `patch` and `create`. None for
    /// discovery and other non-resource URLs.
    pub fn accesses(&self) -> Vec<Access> {
        let Some(a) = self.access() else {
            return Vec::new();
        };
        if a.verb == "patch" && self.status == 201 {
            let create = Access {
                verb: "create".to_owned(),
                ..a.clone()
            };
            return vec![a, create];
        }
        vec![a]
    }

    fn access(&self) -> Option<Access> {
        let segs: Vec<&str> = self.path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", g, _version, rest @ ..] => (*g, rest),
            _ => return None, // discovery and other non-resource URLs
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, r @ ..] if !r.is_empty() => (Some((*ns).to_owned()), r),
            r => (None, r),
        };
        let (resource, named) = match rest {
            [r] => ((*r).to_owned(), false),
            [r, _name] => ((*r).to_owned(), true),
            [r, _name, sub] => (format!("{r}/{sub}"), true),
            _ => return None,
        };
        let watch = self
            .query
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        let verb = match (self.method.as_str(), named) {
            ("GET", _) if watch => "watch",
            ("GET", true) => "get",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            (m, _) => m,
        };
        Some(Access {
            group: group.to_owned(),
            resource,
            verb: verb.to_owned(),
            namespace,
        })
    }
}

/// A loopback HTTP proxy that forwards every request (Authorization header included) to the
/// apiserver and records it; stopped on drop.
#[derive(Debug)]
pub struct RecordingProxy {
    /// Where the proxy listens (plain HTTP on 127.0.0.1).
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingProxy {
    /// Starts the proxy. `upstream` must carry no credentials of its own: the caller's token
    /// is forwarded, so the apiserver authorizes the caller.
    pub async fn start(upstream: Client) -> RecordingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        forward(upstream.clone(), log.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        RecordingProxy { addr, seen, task }
    }

    /// Every request forwarded so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("proxy log").clone()
    }
}

async fn forward(
    upstream: Client,
    log: Arc<Mutex<Vec<Seen>>>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<kube::client::Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    parts.headers.remove(http::header::HOST);
    let method = parts.method.to_string();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let resp = match upstream
        .send(http::Request::from_parts(parts, bytes.into()))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let mut r = http::Response::new(format!("proxy: {e}").into_bytes().into());
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            r
        }
    };
    log.lock().expect("proxy log").push(Seen {
        method,
        path,
        query,
        status: resp.status().as_u16(),
    });
    Ok(resp)
}

/// `(apiGroup, resource, verb)` of every rule of every Role and ClusterRole in `docs`.
pub fn granted(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
    {
        for rule in d["rules"].as_array().expect("rules") {
            for g in rule["apiGroups"].as_array().expect("apiGroups") {
                for r in rule["resources"].as_array().expect("resources") {
                    for v in rule["verbs"].as_array().expect("verbs") {
                        out.insert((
                            g.as_str().expect("group").to_owned(),
                            r.as_str().expect("resource").to_owned(),
                            v.as_str().expect("verb").to_owned(),
                        ));
                    }
                }
            }
        }
    }
    out
}
