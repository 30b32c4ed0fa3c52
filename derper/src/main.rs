//! The `derper` binary: Args → Config → install the rustls ring provider → load the server
//! key and certificate → bind listeners (main TLS/HTTP, plain HTTP, STUN, admin) → wait for
//! SIGTERM/SIGINT → graceful shutdown (stop accepting, Restarting frame, drain).
//!
//! Every bound listener is logged as `listening on <addr>` with a `listener` field
//! (`main`, `http`, `stun`, `admin`), so port 0 works and tests can parse the address.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use prometheus_client::registry::Registry;
use tracing::{error, info};

use derper::args::{Args, MetacertFlag, normalize_go_flags};
use derper::config::Config;
use derper::key::NodePrivateKey;
use derper::listeners::{ServeConfig, StunServeFn};
use derper::metrics::Metrics;
use derper::server::Server;

fn main() -> ExitCode {
    // Go-style command lines (upstream unit files, container args) first, then clap.
    let argv = match normalize_go_flags(std::env::args()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("derper: {e}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse_from(argv);
    let cfg = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derper: {e}");
            return ExitCode::from(2);
        }
    };
    derper::telemetry::init(cfg.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derper: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = derper::telemetry::error_chain(e.as_ref());
            error!("{text}");
            eprintln!("derper: {text}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if cfg.dev {
        info!("running in dev mode");
    }
    let key = match &cfg.key_path {
        Some(p) => NodePrivateKey::load_or_create(p)
            .with_context(|| format!("loading server key from {}", p.display()))?,
        None => NodePrivateKey::generate(),
    };
    // Short form, like every key in the logs (house-style §4.3); the full key is in the
    // `Derp-Public-Key` response header and the ServerKey frame.
    info!(server_key = %key.public().short(), "server public key");
    if cfg.server.mesh_key.is_some() {
        info!("DERP mesh key configured");
    } else {
        info!("no mesh key configured");
    }

    let mut registry = Registry::with_prefix("derper");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut notice = None;
    let tls = match &cfg.tls {
        None => None,
        Some(t) => {
            let cert = derper::certs::load_or_generate(&t.certdir, &t.hostname)
                .with_context(|| format!("loading certificate from {}", t.certdir.display()))?;
            if let Some(pin) = &cert.pin
                && t.hostname.parse::<IpAddr>().is_ok()
            {
                notice = Some((t.hostname.clone(), pin.clone(), cert.generated));
            }
            let with_meta = match t.metacert {
                MetacertFlag::On => true,
                MetacertFlag::Off => false,
                MetacertFlag::Auto => cert.pin.is_none(),
            };
            let meta = if with_meta {
                Some(derper::tls::metacert(key.public().as_bytes()).context("building metacert")?)
            } else {
                None
            };
            let resolver =
                derper::tls::CertResolver::new(cert, meta).context("building TLS config")?;
            registry.register(
                "cert_not_after_seconds",
                "notAfter of the TLS certificate now served, in Unix seconds (follows reloads)",
                resolver.not_after_gauge(),
            );
            if let Some(iv) = t.reload_interval {
                resolver.spawn_reloader(
                    t.certdir.clone(),
                    t.hostname.clone(),
                    iv,
                    shutdown.clone(),
                );
            }
            Some(derper::tls::server_config(resolver))
        }
    };

    let metrics = Metrics::register(&mut registry);
    let stun_metrics = derper::stun::StunMetrics::register(&mut registry);
    let stun: StunServeFn =
        Box::new(move |sock, cancel| Box::pin(derper::stun::serve(sock, stun_metrics, cancel)));
    let server = Server::new(key, cfg.server.clone(), metrics);
    let serve = ServeConfig {
        addr: cfg.addr,
        tls,
        http_addr: cfg.http_addr,
        stun_addr: cfg.stun_addr,
        admin_addr: cfg.admin_addr,
        http: cfg.http.clone(),
        tcp: cfg.tcp,
        accept_limit: cfg.accept_limit,
    };
    let running = derper::listeners::spawn(server, serve, Arc::new(registry), Some(stun)).await?;
    info!(
        addr = %running.addr,
        tls = cfg.tls.is_some(),
        "derper: serving on {}{}",
        running.addr,
        if cfg.tls.is_some() { " with TLS" } else { "" }
    );

    let _mesh = cfg.mesh.clone().map(|m| {
        info!(static_peers = m.peers.len(), peers_file = ?m.peers_file, "starting mesh");
        derper::mesh::spawn(&running.server, m)
    });

    if let Some((hostname, pin, generated)) = notice {
        // spec §3.2: printed at every start for an IP hostname, after "serving on".
        let json = derper::certs::derp_node_json(
            &hostname,
            &pin,
            running.addr.port(),
            running.stun_addr.map_or(-1, |a| i32::from(a.port())),
        );
        eprintln!("{}", derper::certs::self_signed_notice(&hostname, &json));
        info!(generated, derp_node = %json, "using self-signed certificate");
    }

    wait_for_signal().await?;
    info!("shutting down: stop accepting, sending Restarting to clients, draining");
    shutdown.cancel();
    running.shutdown(derper::defaults::SHUTDOWN_DRAIN).await;
    info!("shutdown complete");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("got SIGTERM"),
        _ = int.recv() => info!("got SIGINT"),
    }
    Ok(())
}
