//! `kubederp-local`: runs the kubederp stack on one machine with no cluster.
//!
//! Starts etcd, kube-apiserver and kube-controller-manager on loopback (the same harness the
//! tests use), installs the CRDs from `crds/`, prints a `kubectl` line to look around, and keeps
//! running until Ctrl-C, then stops every process it started.

use std::time::Instant;

use anyhow::Context as _;
use derp_tests::k8s::{ControlPlane, install_crds, workspace_root};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let started = Instant::now();
    tracing::info!("starting etcd, kube-apiserver and kube-controller-manager on 127.0.0.1");
    let cp = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .context("control-plane task")??;
    let client = cp.client().await;
    let crds = workspace_root().join("crds");
    if crds.is_dir() && std::fs::read_dir(&crds)?.next().is_some() {
        install_crds(&client, &crds)
            .await
            .context("installing crds/")?;
        tracing::info!(dir = %crds.display(), "CRDs installed");
    }
    let version = client.apiserver_version().await?;
    tracing::info!(
        version = %version.git_version,
        elapsed_s = started.elapsed().as_secs_f32(),
        "control plane ready"
    );
    eprintln!(
        "\nThe local control plane is running (Kubernetes {}).\n\
         Look around from another shell:\n\n  \
         KUBECONFIG={} {}/kubectl get derpregions,nodes,pods,secrets,configmaps -A\n\n\
         Status: the operator, node agent and relays join this stack as their issues land.\n\
         Press Ctrl-C to stop everything.\n",
        version.git_version,
        cp.kubeconfig().display(),
        cp.bin_dir().display(),
    );
    tokio::signal::ctrl_c().await?;
    tracing::info!("stopping");
    drop(cp);
    Ok(())
}
