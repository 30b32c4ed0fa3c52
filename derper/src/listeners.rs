//! The listener supervisor, where every connection starts: [`spawn`] binds the public
//! listeners (the main port with or without TLS, the plain HTTP port), STUN and the admin
//! listener, and returns a [`RunningServer`] that shuts them down gracefully.
//!
//! Each accepted TCP connection passes the accept rate limit and the handshake caps, gets
//! its socket options, completes TLS (`crate::tls_stream`) when configured, and is handed
//! to the HTTP surface ([`crate::http`]), which upgrades `/derp` requests to a DERP
//! connection on the core ([`crate::server`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::defaults;
use crate::http::{HttpOptions, ListenerKind};
use crate::metrics::Readiness;
use crate::server::Server;

/// Everything needed to run the listeners.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Main listener (`-a`).
    pub addr: SocketAddr,
    /// TLS config for the main listener; `None` = plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Plain HTTP listener (`--http-port`), only meaningful with TLS.
    pub http_addr: Option<SocketAddr>,
    /// STUN listener.
    pub stun_addr: Option<SocketAddr>,
    /// Admin listener (metrics, health).
    pub admin_addr: Option<SocketAddr>,
    /// HTTP behaviour.
    pub http: HttpOptions,
    /// TCP socket options for accepted connections.
    pub tcp: TcpOptions,
    /// Accept rate limit on the main listener: (connections per second, burst)
    /// (`--accept-connection-limit`, `--accept-connection-burst`); `None` = unlimited.
    pub accept_limit: Option<(f64, f64)>,
}

/// TCP socket options (spec §1.1).
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpOptions {
    /// TCP keepalive idle time (`None` = OS default).
    pub keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT (`None` = OS default).
    pub user_timeout: Option<Duration>,
}

/// Error starting the listeners.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Binding a listener failed.
    #[error("bind {which} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        which: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running server with its bound addresses.
#[derive(Debug)]
pub struct RunningServer {
    /// The DERP core.
    pub server: Server,
    /// Bound main listener address.
    pub addr: SocketAddr,
    /// Bound plain-HTTP listener address.
    pub http_addr: Option<SocketAddr>,
    /// Bound STUN address.
    pub stun_addr: Option<SocketAddr>,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// Readiness flag served on `/readyz`.
    pub readiness: Readiness,
    listeners: CancellationToken,
    tasks: TaskTracker,
}

/// `[::]` falls back to `0.0.0.0` on hosts without IPv6.
fn v4_fallback(addr: SocketAddr) -> Option<SocketAddr> {
    (addr.is_ipv6() && addr.ip().is_unspecified())
        .then(|| SocketAddr::from(([0, 0, 0, 0], addr.port())))
}

async fn bind_tcp(which: &'static str, addr: SocketAddr) -> Result<TcpListener, SpawnError> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(source) => match v4_fallback(addr) {
            Some(v4) => TcpListener::bind(v4)
                .await
                .map_err(|source| SpawnError::Bind {
                    which,
                    addr: v4,
                    source,
                }),
            None => Err(SpawnError::Bind {
                which,
                addr,
                source,
            }),
        },
    }
}

async fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, SpawnError> {
    match UdpSocket::bind(addr).await {
        Ok(s) => Ok(s),
        Err(source) => match v4_fallback(addr) {
            Some(v4) => UdpSocket::bind(v4)
                .await
                .map_err(|source| SpawnError::Bind {
                    which: "stun",
                    addr: v4,
                    source,
                }),
            None => Err(SpawnError::Bind {
                which: "stun",
                addr,
                source,
            }),
        },
    }
}

/// Serves STUN on a bound socket until the token is cancelled (see [`crate::stun`]).
pub type StunServeFn = Box<
    dyn FnOnce(UdpSocket, CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
        + Send,
>;

/// Binds every listener, logs `listening on <addr>` with a `listener` field for each, and
/// starts serving. `prom` is the registry served on the admin listener; `stun` serves the
/// STUN socket when `cfg.stun_addr` is set.
pub async fn spawn(
    server: Server,
    cfg: ServeConfig,
    prom: Arc<PromRegistry>,
    stun: Option<StunServeFn>,
) -> Result<RunningServer, SpawnError> {
    let listeners = CancellationToken::new();
    let tasks = TaskTracker::new();
    let readiness = Readiness::default();
    let http = Arc::new(cfg.http.clone());

    let main = bind_tcp("main", cfg.addr).await?;
    let addr = main.local_addr().map_err(|source| SpawnError::Bind {
        which: "main",
        addr: cfg.addr,
        source,
    })?;
    let http_listener = match cfg.http_addr {
        Some(a) => Some(bind_tcp("http", a).await?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let admin_listener = match cfg.admin_addr {
        Some(a) => Some(bind_tcp("admin", a).await?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let stun_socket = match cfg.stun_addr {
        Some(a) => Some(bind_udp(a).await?),
        None => None,
    };
    let stun_addr = stun_socket.as_ref().and_then(|s| s.local_addr().ok());

    let tls = cfg.tls.clone();
    info!(listener = "main", tls = tls.is_some(), %addr, "listening on {addr}");
    tasks.spawn(accept_loop(
        main,
        server.clone(),
        tls,
        http.clone(),
        ListenerKind::Main,
        cfg.tcp,
        cfg.accept_limit,
        listeners.clone(),
    ));
    if let (Some(l), Some(a)) = (http_listener, http_addr) {
        info!(listener = "http", addr = %a, "listening on {a}");
        tasks.spawn(accept_loop(
            l,
            server.clone(),
            None,
            http.clone(),
            ListenerKind::Port80,
            cfg.tcp,
            None,
            listeners.clone(),
        ));
    }
    if let (Some(s), Some(a)) = (stun_socket, stun_addr) {
        info!(listener = "stun", addr = %a, "listening on {a}");
        match stun {
            Some(f) => {
                tasks.spawn(f(s, listeners.clone()));
            }
            None => warn!("stun socket bound but no STUN handler given"),
        }
    }
    if let (Some(l), Some(a)) = (admin_listener, admin_addr) {
        info!(listener = "admin", addr = %a, "listening on {a}");
        tasks.spawn(crate::metrics::serve_admin_with(
            l,
            prom,
            readiness.clone(),
            listeners.clone(),
            cfg.http.admin_timeouts,
        ));
    }
    tasks.close();
    readiness.set(true);
    Ok(RunningServer {
        server,
        addr,
        http_addr,
        stun_addr,
        admin_addr,
        readiness,
        listeners,
        tasks,
    })
}

impl RunningServer {
    /// Graceful shutdown: mark not ready, stop accepting, send Restarting to clients, drain
    /// for up to `drain`.
    pub async fn shutdown(self, drain: Duration) {
        self.readiness.set(false);
        self.listeners.cancel();
        self.server.shutdown(drain).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tasks.wait()).await;
    }
}

#[allow(unsafe_code)]
fn apply_tcp_options(stream: &TcpStream, opts: TcpOptions) {
    use std::os::fd::AsRawFd as _;
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, val: libc::c_int| {
        // SAFETY: `fd` is a valid, open socket owned by `stream` for the duration of this
        // call, and we pass a pointer to a live c_int with its exact size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&val as *const libc::c_int).cast(),
                libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
            )
        }
    };
    if let Some(ka) = opts.keepalive {
        let secs = libc::c_int::try_from(ka.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs);
    }
    if let Some(ut) = opts.user_timeout {
        let ms = libc::c_int::try_from(ut.as_millis()).unwrap_or(libc::c_int::MAX);
        set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    server: Server,
    tls: Option<Arc<rustls::ServerConfig>>,
    http: Arc<HttpOptions>,
    kind: ListenerKind,
    tcp: TcpOptions,
    accept_limit: Option<(f64, f64)>,
    cancel: CancellationToken,
) {
    let m = server.metrics().clone();
    let mut limiter =
        accept_limit.map(|(rate, burst)| crate::ratelimit::TokenBucket::new(rate, burst));
    let server_cancel = server.cancel_token();
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = server_cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        m.tcp_accepts.inc();
        if let Some(l) = &mut limiter
            && !l.allow()
        {
            // Over the accept rate: close right away (upstream's rate-limited listener).
            m.accept_rejected.inc();
            drop(stream);
            continue;
        }
        // Too many connections (in all, or from this source) still handshaking: close
        // right away, before any TLS or HTTP work (counted by the gate).
        let Ok(slot) = server.handshaking().try_acquire(Some(remote.ip())) else {
            drop(stream);
            continue;
        };
        apply_tcp_options(&stream, tcp);
        let server2 = server.clone();
        let http = http.clone();
        let tls = tls.clone();
        server.spawn_tracked(async move {
            match tls {
                Some(acc) => {
                    // The handshake future is boxed and the TLS stream too: a task's size is
                    // that of its largest state, fixed for the connection's life, and every
                    // async fn that takes the stream by value keeps its own copy of it. Boxed,
                    // an idle connection's task holds pointers instead of several copies of
                    // the rustls state (T5: ~9 KiB less per idle connection). The stream is
                    // rustls' unbuffered API, which holds no buffers while idle (T5).
                    let hs = Box::pin(tokio::time::timeout(
                        defaults::TLS_HANDSHAKE_TIMEOUT,
                        crate::tls_stream::accept(acc, stream),
                    ));
                    let sc = server2.cancel_token();
                    let s = tokio::select! {
                        _ = sc.cancelled() => return,
                        r = hs => r,
                    };
                    match s {
                        Ok(Ok(s)) => {
                            let s = Box::new(s);
                            crate::http::serve_connection_gated(
                                server2,
                                http,
                                s,
                                Some(remote),
                                kind,
                                Some(slot),
                            )
                            .await
                        }
                        _ => {
                            server2.metrics().tls_handshake_failures.inc();
                        }
                    }
                }
                None => {
                    crate::http::serve_connection_gated(
                        server2,
                        http,
                        stream,
                        Some(remote),
                        kind,
                        Some(slot),
                    )
                    .await
                }
            }
        });
    }
}
