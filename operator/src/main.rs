//! The `derp-operator` binary: parse Args → telemetry::init → admin server → (leader
//! election) → controller, until SIGTERM/Ctrl-C or lost leadership.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use derp_operator::{
    admin,
    args::Args,
    certs::RcgenIssuer,
    controller::{self, Settings, Shared},
    leader::LeaderElector,
    metrics::Metrics,
    telemetry,
};
use futures::FutureExt;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> std::process::ExitCode {
    // Invalid flags: one clear line and exit status 2, like clap's own usage errors.
    let config = match Args::parse().into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derp-operator: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derp-operator: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The context chain on one line, each cause once (no backtrace dump).
            let text = derper::telemetry::error_chain(e.as_ref());
            error!("{text}");
            eprintln!("derp-operator: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: derp_operator::args::Config) -> anyhow::Result<()> {
    telemetry::init(config.log_format, &config.log_filter)?;
    let client = kube::Client::try_default()
        .await
        .context("build Kubernetes client (in-cluster or KUBECONFIG)")?;

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let shared = Shared::default();
    let cancel = CancellationToken::new();
    let (_, admin_task) = admin::serve(
        config.admin_addr,
        shared.clone(),
        Arc::new(registry),
        cancel.clone().cancelled_owned(),
    )
    .await?;

    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown requested");
            stop.cancel();
        });
    }

    let leadership = match &config.lease {
        Some(lease) => {
            let elector = LeaderElector::new(client.clone(), lease.clone());
            tokio::select! {
                l = elector.acquire() => Some(l),
                () = stop.cancelled() => {
                    cancel.cancel();
                    return Ok(());
                }
            }
        }
        None => None,
    };
    let lost = match &leadership {
        Some(l) => l.lost().boxed(),
        None => futures::future::pending().boxed(),
    };
    let stopped = stop.clone();
    let ctrl_stop = CancellationToken::new();
    {
        let ctrl_stop = ctrl_stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = lost => error!("leadership lost; stopping the controller"),
                () = stopped.cancelled() => {},
            }
            ctrl_stop.cancel();
        });
    }
    let trigger = async move { ctrl_stop.cancelled().await };
    let result = controller::run(
        client,
        Settings {
            namespace: config.namespace.clone(),
            concurrency: config.concurrency,
            instance: Some(config.identity.clone()),
            probe: config.probe.clone(),
            relay_image: config.relay_image.clone(),
            relay_image_pull_secrets: config.relay_image_pull_secrets.clone(),
        },
        shared,
        metrics,
        Arc::new(RcgenIssuer),
        trigger,
    )
    .await;
    if let Some(l) = leadership
        && let Err(error) = l.release().await
    {
        error!(%error, "cannot release the lease");
    }
    cancel.cancel();
    let _ = admin_task.await;
    result?;
    if !stop.is_cancelled() {
        anyhow::bail!("leadership lost");
    }
    Ok(())
}
