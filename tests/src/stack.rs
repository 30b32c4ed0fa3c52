//! The whole kubederp system on one machine: a real control plane ([`crate::k8s`]), the
//! `derp-operator` binary as a process, and the local node agent ([`crate::agent`]) running
//! the relay Pods the operator creates as `derper` processes on 127.0.0.x.
//!
//! `scripts/demo` (through the `kubederp-local` binary) and the end-to-end tests use this same
//! code, so the demo is exactly what the tests cover. Not here: assertions (tests own them) and
//! printing (the demo binary owns it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use crate::agent::{AgentConfig, NodeAgent, NodeSpec};
use crate::bins::workspace_bin;
use crate::k8s::{ControlPlane, free_port, install_crds, wait_until, workspace_root};

/// Label that the example regions select nodes by.
pub const RELAY_LABEL: (&str, &str) = ("kubederp.io/relay", "true");

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Node names and their IPv4 addresses (loopback, 127.0.0.0/8).
    pub nodes: Vec<(String, Ipv4Addr)>,
    /// Namespace the regions live in (created if missing).
    pub namespace: String,
    /// Where logs, projected volumes and relay state go.
    pub workdir: PathBuf,
    /// Extra `derp-operator` flags (e.g. `--probe-interval=1s`).
    pub operator_args: Vec<String>,
}

impl StackOptions {
    /// `count` nodes named `<prefix>-1…` on `127.0.<subnet>.11`, `.12`, … in namespace `derp`.
    pub fn nodes(prefix: &str, subnet: u8, count: u8, workdir: impl Into<PathBuf>) -> Self {
        let nodes = (1..=count)
            .map(|i| {
                (
                    format!("{prefix}-{i}"),
                    Ipv4Addr::new(127, 0, subnet, 10 + i),
                )
            })
            .collect();
        StackOptions {
            nodes,
            namespace: "derp".into(),
            workdir: workdir.into(),
            operator_args: Vec::new(),
        }
    }

    /// Adds `derp-operator` flags.
    pub fn operator_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.operator_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running local stack. [`LocalStack::shutdown`] (or drop) stops every process it started.
#[derive(Debug)]
pub struct LocalStack {
    cp: ControlPlane,
    agent: Option<NodeAgent>,
    operator: Option<Child>,
    /// The namespace regions are applied to.
    pub namespace: String,
    /// The operator's admin address (`/healthz`, `/metrics`, `/derpmap.json`).
    pub operator_admin: SocketAddr,
    /// The operator's log file.
    pub operator_log: PathBuf,
    workdir: PathBuf,
}

impl LocalStack {
    /// Starts the control plane, installs the CRDs, starts the operator and registers the nodes
    /// (labelled [`RELAY_LABEL`]) with the node agent.
    pub async fn start(opts: StackOptions) -> anyhow::Result<LocalStack> {
        std::fs::create_dir_all(&opts.workdir)
            .with_context(|| format!("creating {}", opts.workdir.display()))?;
        let cp = tokio::task::spawn_blocking(ControlPlane::start)
            .await
            .context("control-plane task")??;
        let client = cp.client().await;
        install_crds(&client, &workspace_root().join("crds"))
            .await
            .context("installing crds/")?;
        ensure_namespace(&client, &opts.namespace).await?;

        let operator_admin: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()).into();
        let operator_log = opts.workdir.join("derp-operator.log");
        let operator = spawn_operator(
            &cp,
            &operator_admin,
            &opts.namespace,
            &operator_log,
            &opts.operator_args,
        )?;

        let nodes = opts
            .nodes
            .iter()
            .map(|(name, ip)| NodeSpec::new(name.clone(), *ip).label(RELAY_LABEL.0, RELAY_LABEL.1))
            .collect();
        let agent = NodeAgent::start(
            client.clone(),
            AgentConfig::new(opts.workdir.join("agent")),
            nodes,
        )
        .await
        .context("starting the node agent")?;
        for (name, _) in &opts.nodes {
            clear_not_ready_taint(&client, name).await?;
        }
        Ok(LocalStack {
            cp,
            agent: Some(agent),
            operator: Some(operator),
            namespace: opts.namespace,
            operator_admin,
            operator_log,
            workdir: opts.workdir,
        })
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// The node agent.
    pub fn agent(&self) -> &NodeAgent {
        self.agent.as_ref().expect("agent runs until shutdown")
    }

    /// The scratch directory.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// A client for the control plane, bound to the current runtime.
    pub async fn client(&self) -> kube::Client {
        self.cp.client().await
    }

    /// `kubectl apply --server-side -n <namespace> -f <path>`.
    pub fn apply_file(&self, path: &Path) -> anyhow::Result<()> {
        let out = self
            .cp
            .kubectl()
            .args(["apply", "--server-side", "-n", &self.namespace, "-f"])
            .arg(path)
            .output()
            .context("running kubectl apply")?;
        if !out.status.success() {
            bail!(
                "kubectl apply -f {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The DerpRegion API in the stack's namespace (dynamic, so tests read raw status).
    pub async fn regions(&self) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("kubederp.io", "v1alpha1", "DerpRegion");
        Api::namespaced_with(
            self.client().await,
            &self.namespace,
            &ApiResource::from_gvk(&gvk),
        )
    }

    /// Waits until region `name` has condition `Ready=True`; the error carries the last status
    /// and the operator's log tail.
    pub async fn wait_region_ready(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<DynamicObject> {
        let api = self.regions().await;
        let ready = wait_until(timeout, || {
            let api = api.clone();
            async move {
                let r = api.get_opt(name).await.ok()??;
                condition_true(&r, "Ready").then_some(r)
            }
        })
        .await;
        match ready {
            Some(r) => Ok(r),
            None => {
                let status = api
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| serde_json::to_string_pretty(&r.data["status"]).unwrap_or_default())
                    .unwrap_or_else(|| "<region not found>".into());
                bail!(
                    "region {name} not Ready after {}s; status: {status}\noperator log tail:\n{}",
                    timeout.as_secs(),
                    tail(&self.operator_log, 30)
                )
            }
        }
    }

    /// The data of a ConfigMap in the stack's namespace.
    pub async fn config_map(&self, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let api: Api<ConfigMap> = Api::namespaced(self.client().await, &self.namespace);
        let cm = api
            .get(name)
            .await
            .with_context(|| format!("reading ConfigMap {name}"))?;
        Ok(cm.data.unwrap_or_default())
    }

    /// Stops the agent (and so every relay), the operator and the control plane.
    pub async fn shutdown(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
        self.stop_operator();
    }

    fn stop_operator(&mut self) {
        if let Some(mut child) = self.operator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        self.stop_operator();
        // The agent's processes are tied to this process (PDEATHSIG) and its own Drop.
    }
}

/// True when the object's `status.conditions` has `type` with status `True`.
pub fn condition_true(obj: &DynamicObject, type_: &str) -> bool {
    obj.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
}

/// Removes the `node.kubernetes.io/not-ready` taint that the apiserver's admission puts on
/// every new Node. In a cluster the node lifecycle controller removes it once the kubelet
/// reports Ready; that controller is not run here (it would also taint the tests' kubelet-less
/// Nodes as unreachable), so the stack does this one step of its job for the agent's nodes.
pub async fn clear_not_ready_taint(client: &kube::Client, node: &str) -> anyhow::Result<()> {
    let api = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let n = api
        .get(node)
        .await
        .with_context(|| format!("reading node {node}"))?;
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| t.key != "node.kubernetes.io/not-ready")
        .collect();
    if kept.len() == taints.len() {
        return Ok(());
    }
    let patch = serde_json::json!({"spec": {"taints": kept}});
    api.patch(
        node,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .with_context(|| format!("removing the not-ready taint from node {node}"))?;
    Ok(())
}

async fn ensure_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    if api.get_opt(name).await?.is_some() {
        return Ok(());
    }
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
    }))?;
    api.create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

fn spawn_operator(
    cp: &ControlPlane,
    admin: &SocketAddr,
    namespace: &str,
    log: &Path,
    extra: &[String],
) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let mut cmd = Command::new(workspace_bin("derp-operator"));
    cmd.env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "info,kube_runtime=warn")
        .args([
            "--admin-addr",
            &admin.to_string(),
            "--leader-election=true",
            "--lease-namespace",
            namespace,
            "--identity",
            "local-stack",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    crate::k8s::spawn_tied(cmd).context("starting derp-operator")
}

/// The last `n` lines of a file (empty when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
