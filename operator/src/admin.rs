//! Admin HTTP server: `/healthz` (process alive), `/readyz` (controller running with synced
//! caches — so only the leader receives Service traffic), `/metrics` (Prometheus text) and
//! `/derpmap.json` (the merged derpMap of every managed region, for headscale `derp.urls`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes_body::Full;
use http::{Method, Request, Response, StatusCode, header};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::controller::Shared;

/// The Prometheus registry type served by [`serve`] (re-exported for embedders and tests).
pub use prometheus_client::registry::Registry as PromRegistry;

mod bytes_body {
    pub(super) use http_body_util::Full;
}

/// Failure to start the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Binding the listen address failed.
    #[error("bind admin server on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

type Body = Full<hyper::body::Bytes>;

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(hyper::body::Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn route(req: &Request<Incoming>, shared: &Shared, registry: &Registry) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if shared.is_ready() {
                respond(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready (not leading, or caches not synced)\n".into(),
                )
            }
        }
        "/metrics" => {
            let mut s = String::new();
            match prometheus_client::encoding::text::encode(&mut s, registry) {
                Ok(()) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    s,
                ),
                Err(_) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "encode metrics failed\n".into(),
                ),
            }
        }
        "/derpmap.json" => respond(
            StatusCode::OK,
            "application/json",
            shared.merged_derp_map_json(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Bind `addr` and serve until `shutdown` resolves. Returns the bound address and the task.
pub async fn serve(
    addr: SocketAddr,
    shared: Shared,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "admin server listening");
    let task = tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(error) => {
                        debug!(%error, "admin accept failed");
                        continue;
                    }
                },
            };
            let shared = shared.clone();
            let registry = registry.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = route(&req, &shared, &registry);
                    async move { Ok::<_, Infallible>(resp) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, %error, "admin connection ended with an error");
                }
            });
        }
    });
    Ok((local, task))
}
