//! `kubederp-node-agent`: the local node agent ([`derp_tests::agent`]) as a standalone program,
//! for manual use against any apiserver (normally the one `kubederp-local` started).
//!
//! ```text
//! kubederp-node-agent --kubeconfig KC --workdir DIR \
//!     --node n1=127.0.0.2,label=kubederp.io/relay=true --node n2=127.0.0.3 \
//!     [--image ghcr.io/tailscale/derper=/path/to/go-derper]
//! ```
//!
//! Runs until Ctrl-C or SIGTERM, then stops every process it started and marks its nodes
//! NotReady. Container logs are under `DIR/logs/`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use derp_tests::agent::{AgentConfig, NodeAgent, NodeSpec};

/// Runs Pods bound to local Node objects as processes (a kubelet stand-in for kubederp).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// kubeconfig of the apiserver to register with.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// A node: `name=IPv4[,ipv6=IP][,type=InternalIP|ExternalIP][,label=k=v]...[,taint=k=v:Effect]...`.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// Scratch directory for volumes and logs.
    #[arg(long, env = "KUBEDERP_AGENT_WORKDIR")]
    workdir: PathBuf,
    /// Extra image mapping `image-prefix=/path/to/executable` (repeatable).
    #[arg(long = "image")]
    images: Vec<String>,
    /// Do not map `…/derper` and `…/derp-operator` images to this workspace's binaries.
    #[arg(long)]
    no_workspace_images: bool,
    /// Keep wildcard listen arguments (`:443`) as they are instead of binding the node IP.
    #[arg(long)]
    no_bind_node_ip: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client::client::builder=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Args {
        kubeconfig,
        nodes,
        workdir,
        images,
        no_workspace_images,
        no_bind_node_ip,
    } = Args::parse();
    let nodes = nodes
        .iter()
        .map(|n| NodeSpec::parse(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut config = AgentConfig::new(workdir);
    config.workspace_images = !no_workspace_images;
    config.bind_node_ip = !no_bind_node_ip;
    for m in images {
        let (prefix, path) = m
            .split_once('=')
            .with_context(|| format!("--image {m:?}: expected prefix=/path"))?;
        config = config.image(prefix, path);
    }
    let client = derp_tests::k8s::client_from(&kubeconfig).await?;
    let agent = NodeAgent::start(client, config, nodes).await?;
    tracing::info!(
        logs = %agent.workdir().join("logs").display(),
        "node agent running; Ctrl-C to stop"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}
