//! The operator under test, two ways: in the test process ([`Operator`]: `controller::run`
//! limited to one namespace, its metrics and shared state at hand), or as the `derp-operator`
//! binary in a child process ([`OperatorProcess`]: its own arguments, kubeconfig and log).
//! Also the set-up every operator test starts with ([`setup`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use derp_operator::admin::PromRegistry;
use derp_operator::certs::RcgenIssuer;
use derp_operator::controller::{self, Settings, Shared};
use derp_operator::metrics::Metrics;
use kube::Client;

use crate::bins::workspace_bin;
use crate::k8s::{TestNamespace, setup_namespace, workspace_root};
use crate::stack::tail;

/// How long a test waits for the operator to act.
pub const WAIT: Duration = Duration::from_secs(60);

/// Label selector matching every object the operator manages.
pub const MANAGED: &str = "app.kubernetes.io/managed-by=derp-operator";

/// A test namespace on the shared control plane with `crds/` installed, and tracing to the
/// test's output (`RUST_LOG`, else the operator at info).
pub async fn setup(prefix: &str) -> (Client, TestNamespace) {
    setup_namespace(
        prefix,
        &workspace_root().join("crds"),
        "derp_operator=info,kube=warn",
    )
    .await
}

/// An in-process operator limited to one namespace.
#[derive(Debug)]
pub struct Operator {
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// The registry its metrics are in (what its admin server serves).
    pub registry: Arc<PromRegistry>,
    /// Its state shared with the admin server (merged derpMap, readiness).
    pub shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), derp_operator::Error>>,
}

impl Operator {
    /// Starts the controller on namespace `ns` with default settings.
    pub fn start(client: &Client, ns: &str) -> Operator {
        Self::start_with(client, ns, Settings::default())
    }

    /// Like [`Operator::start`], with `settings` (its namespace and instance are set here).
    pub fn start_with(client: &Client, ns: &str, settings: Settings) -> Operator {
        let mut registry = PromRegistry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let registry = Arc::new(registry);
        let shared = Shared::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(
            client.clone(),
            Settings {
                namespace: Some(ns.to_owned()),
                concurrency: 4,
                instance: Some(format!("test-{ns}")),
                ..settings
            },
            shared.clone(),
            metrics.clone(),
            Arc::new(RcgenIssuer),
            async move {
                let _ = rx.await;
            },
        ));
        Operator {
            metrics,
            registry,
            shared,
            stop: Some(tx),
            task,
        }
    }

    /// Asks the controller to stop; panics unless it returns `Ok` within 30 s.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("operator stops within 30 s")
            .expect("operator task does not panic")
            .expect("operator run returns Ok");
    }

    /// Writes to the apiserver so far.
    pub fn writes(&self) -> u64 {
        self.metrics.total_writes()
    }

    /// Reconciles so far.
    pub fn reconciles(&self) -> u64 {
        self.metrics.reconciles.get()
    }
}

/// The `derp-operator` binary as a child process, its output in a log file; killed on drop.
#[derive(Debug)]
pub struct OperatorProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts `derp-operator args…` with an empty environment but for `KUBECONFIG=kubeconfig`
    /// and `POD_NAME=pod_name` (its leader-election identity), stdout and stderr to `log`.
    pub fn start(args: &[String], kubeconfig: &Path, pod_name: &str, log: PathBuf) -> Self {
        let logf = std::fs::File::create(&log).expect("operator log file");
        let child = tokio::process::Command::new(workspace_bin("derp-operator"))
            .args(args)
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", pod_name)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup operator log"))
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()
            .expect("start derp-operator");
        OperatorProcess { child, log }
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// SIGTERM, then the exit status; panics unless it exits within 15 s.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("operator pid").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(s) => s.expect("wait operator"),
            Err(_) => panic!(
                "operator did not stop within 15 s of SIGTERM\n{}",
                self.log_tail()
            ),
        }
    }
}
