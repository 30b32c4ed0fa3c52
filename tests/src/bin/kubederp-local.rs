//! `kubederp-local`: runs the whole kubederp system on one machine with no cluster.
//!
//! Starts etcd, kube-apiserver and kube-controller-manager on loopback, installs the CRD, starts
//! `derp-operator`, registers three local nodes (127.0.1.11–13) with the node agent, applies
//! `deploy/examples/derpregion-three-nodes.yaml`, waits for Ready, then prints the policy
//! snippet, a `derpprobe` table and a real Tailscale client exchange through the region. It keeps
//! running until Ctrl-C, then stops every process it started.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use derp_tests::bins::workspace_bin;
use derp_tests::interop::{CLIENT_VERSIONS, run_derpinterop};
use derp_tests::k8s::workspace_root;
use derp_tests::stack::{LocalStack, StackOptions};

const REGION: &str = "home";
const EXAMPLE: &str = "deploy/examples/derpregion-three-nodes.yaml";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Default log filter. Directives match target *prefixes*, so the kube crates are named one by
/// one: a `kube=warn` directive would also silence this binary's own `kubederp_local` lines.
const LOG_FILTER: &str = "info,kube_client::client::builder=off,kube_client=warn,kube_runtime=warn";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let started = Instant::now();
    let workdir = std::env::temp_dir().join(format!("kubederp-local-{}", std::process::id()));
    let opts = StackOptions::nodes("local-node", 1, 3, &workdir);
    tracing::info!(
        nodes = ?opts.nodes,
        workdir = %workdir.display(),
        "starting control plane, operator and node agent"
    );
    let stack = LocalStack::start(opts).await?;
    tracing::info!(
        elapsed_s = started.elapsed().as_secs_f32(),
        "stack running; applying {EXAMPLE}"
    );
    stack.apply_file(&workspace_root().join(EXAMPLE))?;
    let region = stack.wait_region_ready(REGION, READY_TIMEOUT).await?;
    tracing::info!(
        elapsed_s = started.elapsed().as_secs_f32(),
        nodes = %region.data["status"]["nodesReady"],
        "region {REGION} is Ready"
    );

    let cm_name = region.data["spec"]["derpMap"]["configMapName"]
        .as_str()
        .map_or_else(|| format!("{REGION}-derpmap"), str::to_owned);
    let data = stack.config_map(&cm_name).await?;
    let map_file = workdir.join("derpmap.json");
    std::fs::write(
        &map_file,
        data.get("derpmap.json")
            .context("derpmap.json missing from the ConfigMap")?,
    )?;
    let mut report = String::new();
    report.push_str(&format!(
        "\n=== policy.hujson (paste into your tailnet policy file) ===\n{}\n",
        data.get("policy.hujson")
            .map_or("<missing>", String::as_str)
    ));

    // derpprobe: every node, TLS with the pin, DERP, round trips, STUN.
    let probe = tokio::task::spawn_blocking(move || {
        std::process::Command::new(workspace_bin("derpprobe"))
            .arg("--derp-map")
            .arg(&map_file)
            .output()
    })
    .await?
    .context("running derpprobe")?;
    report.push_str(&format!(
        "\n=== derpprobe ({}) ===\n{}{}",
        probe.status,
        String::from_utf8_lossy(&probe.stdout),
        String::from_utf8_lossy(&probe.stderr)
    ));

    // A real Tailscale client (both versions) across two different nodes of the region.
    let map = workdir.join("derpmap.json");
    let map_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&map)?)?;
    let names: Vec<String> = map_json["Regions"]
        .as_object()
        .and_then(|r| r.values().next())
        .and_then(|r| r["Nodes"].as_array())
        .map(|ns| {
            ns.iter()
                .filter_map(|n| n["Name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if let [a, b, ..] = names.as_slice() {
        for version in CLIENT_VERSIONS {
            let map_s = map.to_string_lossy().into_owned();
            let args = ["exchange", "-derpmap", &map_s, "-node-a", a, "-node-b", b];
            let run = run_derpinterop(version, &args, Duration::from_secs(20));
            let line = match run {
                Ok(r) if r.ok() => format!(
                    "tailscale.com {version}: client on {a} <-> client on {b}: packets exchanged \
                     both ways ({})",
                    r.transport("a")
                ),
                Ok(r) => format!("tailscale.com {version}: FAILED: {}", r.error()),
                Err(e) => format!("tailscale.com {version}: FAILED: {e:#}"),
            };
            report.push_str(&format!("\n=== Tailscale client exchange ===\n{line}\n"));
        }
    }

    let cp = stack.control_plane();
    report.push_str(&format!(
        "\nkubederp is running locally (ready in {:.0}s). Look around from another shell:\n\n  \
         export KUBECONFIG={}\n  {}/kubectl -n {} get derpregions,pods,secrets,configmaps\n\n\
         Relay logs: {}/agent/logs/   Operator log: {}\nPress Ctrl-C to stop everything.\n",
        started.elapsed().as_secs_f32(),
        cp.kubeconfig().display(),
        cp.bin_dir().display(),
        stack.namespace,
        workdir.display(),
        stack.operator_log.display(),
    ));
    eprintln!("{report}");
    tokio::signal::ctrl_c().await?;
    tracing::info!("stopping every process this demo started");
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn the_demo_progress_lines_pass_the_default_log_filter() {
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(super::LOG_FILTER));
        tracing::subscriber::with_default(subscriber, || {
            assert!(
                tracing::enabled!(tracing::Level::INFO),
                "kubederp_local info lines"
            );
            assert!(
                !tracing::enabled!(target: "kube_runtime::watcher", tracing::Level::INFO),
                "kube info lines stay quiet"
            );
        });
    }
}
