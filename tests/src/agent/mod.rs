//! The local node agent: a small kubelet stand-in that runs the relay Pods the operator creates
//! as local processes, for `scripts/demo` and the end-to-end tests (design.md §6). There is no
//! container runtime here, so a "container" is a process on the host. What a real kubelet and
//! container runtime do with the same Pods is proven by the real-node tier
//! (`scripts/real-nodes`); this agent supports what the relay Pods use
//! (`operator/src/plan/children.rs`) and refuses the rest.
//!
//! What it does:
//! - registers Node objects (an `InternalIP`, `Ready`, capacity, nodeInfo) and keeps them Ready
//!   with a status heartbeat and a Lease in `kube-node-lease`;
//! - watches every Pod and runs those whose `spec.nodeName` is one of its nodes: each container
//!   becomes a process (in its own process group, tied to this process with `PR_SET_PDEATHSIG`),
//!   with the container's command, args and env (`$(VAR)` expansion with `$$` escaping, the
//!   downward-API `fieldRef`s `status.hostIP` and `status.podIP`);
//! - projects `secret` and `configMap` volumes (with `items` and modes) to files under a per-Pod
//!   directory, keeps them up to date when the source object changes with kubelet's `..data`
//!   symlink swap (a reader sees the old or the new content, never a mix), and makes `emptyDir`
//!   volumes directories;
//! - restarts exited containers (`restartPolicy: Always`) with exponential backoff, runs
//!   readiness probes (`httpGet`, `tcpSocket`), reports Pod status (phase, host/pod IPs,
//!   conditions, containerStatuses), and finalizes Pod deletion (processes stopped, then the
//!   Pod is deleted with grace period 0, as the kubelet does);
//! - writes each container's stdout and stderr to `<workdir>/logs/<namespace>_<pod>_<container>.log`
//!   (appended across restarts, with a header line per start; see [`NodeAgent::log_path`]),
//!   and serves them to `kubectl logs` (current or `--previous` run, `--tail`, `-f`) through
//!   a minimal kubelet endpoint on each node IP ([`AgentConfig::kubelet_port`]).
//!
//! **Images.** An image is mapped to a local executable ([`AgentConfig::resolve_image`]):
//! explicit `image prefix → path` entries first (longest prefix wins), then an image whose
//! repository's last path segment is `derper` runs this workspace's relay
//! ([`crate::bins::workspace_bin`]). The executable is always the image's; a container
//! `command` may only name it again (`command[0]`'s file name equal to the executable's or the
//! image's last segment), and the rest of `command` followed by `args` become its arguments.
//! A running container's image never changes here (the operator replaces a relay Pod instead);
//! a changed image is logged as an error and the old process keeps running.
//!
//! **Mount paths.** A process cannot see `/certs`, so every `volumeMount.mountPath` is rewritten
//! to the volume's local directory in the container's command, args and env values (after
//! `$(VAR)` expansion). The rule: an occurrence of a mountPath is replaced when it starts the
//! string or follows one of `= : , ; @ " '` or whitespace, and is followed by the end of the
//! string, `/`, or one of those characters. Longer mountPaths are tried first. So
//! `--certdir=/certs`, `-c=/var/lib/derper/k` and `/certs/a.crt` are rewritten, `/certsx` and
//! `/x/certs` are not. File *contents* are never rewritten.
//!
//! **Listen addresses.** All local nodes share one host, so an argument that is a wildcard
//! listen address (`:443`, `--addr=:443`, `0.0.0.0:443`, `[::]:443`) becomes
//! `<node IPv4>:<port>`; our `derper` binds its HTTP and STUN ports on the `-a` address, so all
//! its listeners follow.
//!
//! **Refusals.** Anything in a Pod spec the agent cannot honour (no `hostNetwork`, init or
//! ephemeral containers, a volume type other than secret/configMap/emptyDir, `envFrom`, env
//! from Secret or ConfigMap keys, other `fieldRef`s, `subPath`, `workingDir`, liveness, startup
//! or exec probes, named probe ports, a `restartPolicy` other than `Always`, an unknown image,
//! lifecycle hooks, …) makes the Pod `Failed` with reason `UnsupportedPodSpec` and a message
//! naming the field, and is logged at error level; nothing is silently ignored. Fields that
//! only matter to a scheduler or a container runtime's isolation (`tolerations`, `affinity`,
//! `resources`, `securityContext`, `dnsPolicy`, `ports`, `imagePullPolicy`, …) are accepted
//! and have no effect on the process: it runs as the agent's user, unconfined.
//!
//! Not here: networking other than the host's (every Pod uses host networking), scheduling
//! (Pods must already carry `spec.nodeName`), node lifecycle control (no taint-based eviction),
//! nodes added or changed at run time.
//!
//! ## Module map
//!
//! | module | what it holds |
//! |---|---|
//! | `mod.rs` (here) | [`NodeAgent`]: start, shutdown, lookups for tests; the shared state and the watches that feed it |
//! | `spec` | [`NodeSpec`] and [`AgentConfig`], image → executable resolution |
//! | `node` | Node registration, status heartbeat and Lease |
//! | `kubelet_api` | the per-node kubelet endpoint: `/containerLogs` for `kubectl logs` |
//! | `pod` | the Pod loop (one worker per Pod) and a Pod's life: validate, project, start, stop, delete |
//! | `validate` | the allow-list: what the agent honours, and the refusal naming any other field |
//! | `volumes` | Secret/ConfigMap projection with the atomic `..data` swap, emptyDir, mount directories |
//! | `launch` | a container's argv and env: `$(VAR)` expansion, fieldRefs, mountPath rewriting, wildcard listen binding |
//! | `process` | spawning, supervising, restarting and killing container processes |
//! | `probes` | readiness probes (`httpGet`, `tcpSocket`) |
//! | `status` | containerStatuses and the Pod status patch |

mod kubelet_api;
mod launch;
mod node;
mod pod;
mod probes;
mod process;
mod spec;
mod status;
mod validate;
mod volumes;

pub use spec::{AgentConfig, NodeSpec};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kubelet_api::start_kubelet_server;
use node::{NodeEntry, apply_node, heartbeat_loop, patch_node_status, renew_lease};
use pod::{WorkerHandle, pod_loop};
use process::{ProcEntry, kill_all};

/// A running node agent. Stop it with [`NodeAgent::shutdown`] (graceful) or by dropping it
/// (every process group is killed with SIGKILL before `drop` returns).
pub struct NodeAgent {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent")
            .field("workdir", &self.shared.config.workdir)
            .field("nodes", &self.node_names())
            .finish_non_exhaustive()
    }
}

/// State shared by the agent's tasks. Std mutexes: never held across an `.await`.
struct Shared {
    client: kube::Client,
    config: AgentConfig,
    nodes: RwLock<BTreeMap<String, NodeEntry>>,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    procs: Arc<Mutex<HashMap<u64, ProcEntry>>>,
    proc_seq: AtomicU64,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    config_maps: Store<ConfigMap>,
    /// Bumped on every Secret or ConfigMap event, so workers re-project volumes.
    resync: watch::Sender<u64>,
    /// Wakes the Pod loop (a Pod event, or a node added).
    kick: Notify,
    /// Each node's `/containerLogs` server.
    kubelet_servers: Mutex<HashMap<String, JoinHandle<()>>>,
    cancel: CancellationToken,
}

impl NodeAgent {
    /// Starts the agent: registers `nodes`, waits for the Pod/Secret/ConfigMap caches, and
    /// runs every Pod bound to one of its nodes until shut down.
    ///
    /// ```no_run
    /// # async fn demo() -> anyhow::Result<()> {
    /// use derp_tests::agent::{AgentConfig, NodeAgent, NodeSpec};
    /// use derp_tests::k8s::ControlPlane;
    ///
    /// let client = ControlPlane::shared().client().await;
    /// let nodes = (1..=3)
    ///     .map(|i| {
    ///         NodeSpec::new(format!("node-{i}"), std::net::Ipv4Addr::new(127, 0, 0, 1 + i))
    ///             .label("kubederp.io/relay", "true")
    ///     })
    ///     .collect();
    /// // `…/derper` images run this workspace's derper; add `.image(prefix, path)` for others.
    /// let agent = NodeAgent::start(client, AgentConfig::new("/tmp/kubederp-agent"), nodes).await?;
    /// println!("relay log: {}", agent.log_path("derp", "home-node-1", "derper").display());
    /// agent.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(
        client: kube::Client,
        config: AgentConfig,
        nodes: Vec<NodeSpec>,
    ) -> anyhow::Result<NodeAgent> {
        std::fs::create_dir_all(config.workdir.join("logs"))
            .with_context(|| format!("creating {}", config.workdir.display()))?;
        std::fs::create_dir_all(config.workdir.join("pods"))?;
        let cancel = CancellationToken::new();
        let (pods, pods_writer) = reflector::store::<Pod>();
        let (secrets, secrets_writer) = reflector::store::<Secret>();
        let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
        let shared = Arc::new(Shared {
            client: client.clone(),
            config,
            nodes: RwLock::new(BTreeMap::new()),
            workers: Mutex::new(HashMap::new()),
            procs: Arc::new(Mutex::new(HashMap::new())),
            proc_seq: AtomicU64::new(0),
            pods,
            secrets,
            config_maps,
            resync: watch::Sender::new(0),
            kick: Notify::new(),
            kubelet_servers: Mutex::new(HashMap::new()),
            cancel: cancel.clone(),
        });
        let mut tasks = Vec::new();
        {
            let s = shared.clone();
            let stream = reflector::reflector(
                pods_writer,
                watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
                    .default_backoff(),
            );
            tasks.push(tokio::spawn(drive(
                stream,
                "pods",
                cancel.clone(),
                move || {
                    s.kick.notify_one();
                },
            )));
        }
        {
            let s = shared.clone();
            let stream = reflector::reflector(
                secrets_writer,
                watcher(
                    Api::<Secret>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff(),
            );
            tasks.push(tokio::spawn(drive(
                stream,
                "secrets",
                cancel.clone(),
                move || {
                    s.resync.send_modify(|n| *n += 1);
                },
            )));
        }
        {
            let s = shared.clone();
            let stream = reflector::reflector(
                cm_writer,
                watcher(
                    Api::<ConfigMap>::all(client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff(),
            );
            tasks.push(tokio::spawn(drive(
                stream,
                "configmaps",
                cancel.clone(),
                move || {
                    s.resync.send_modify(|n| *n += 1);
                },
            )));
        }
        let agent = NodeAgent { shared, tasks };
        for node in nodes {
            agent.register(node).await?;
        }
        let ready = async {
            agent.shared.pods.wait_until_ready().await?;
            agent.shared.secrets.wait_until_ready().await?;
            agent.shared.config_maps.wait_until_ready().await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .context("pod/secret/configmap caches not ready after 30s")??;
        let mut agent = agent;
        agent
            .tasks
            .push(tokio::spawn(heartbeat_loop(agent.shared.clone())));
        agent
            .tasks
            .push(tokio::spawn(pod_loop(agent.shared.clone())));
        tracing::info!(nodes = ?agent.node_names(), "node agent started");
        Ok(agent)
    }

    /// Names of the registered nodes.
    pub fn node_names(&self) -> Vec<String> {
        read_lock(&self.shared.nodes).keys().cloned().collect()
    }

    /// The agent's scratch directory.
    pub fn workdir(&self) -> &Path {
        &self.shared.config.workdir
    }

    /// The log file of a container (stdout and stderr, appended across restarts; every start
    /// writes a `=== kubederp-node-agent: start …` header line).
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        log_path(&self.shared.config.workdir, namespace, pod, container)
    }

    /// Process ids of every process group the agent is running.
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.shared.procs)
            .values()
            .filter_map(|p| u32::try_from(p.pid).ok())
            .collect()
    }

    /// The process id of a running container, if it is running.
    pub fn container_pid(&self, namespace: &str, pod: &str, container: &str) -> Option<u32> {
        lock(&self.shared.procs)
            .values()
            .find(|p| p.namespace == namespace && p.pod == pod && p.container == container)
            .and_then(|p| u32::try_from(p.pid).ok())
    }

    async fn register(&self, node: NodeSpec) -> anyhow::Result<()> {
        if read_lock(&self.shared.nodes).contains_key(&node.name) {
            bail!("node {} is already registered", node.name);
        }
        apply_node(&self.shared.client, &node).await?;
        let kubelet_port = start_kubelet_server(&self.shared, &node).await;
        let entry = NodeEntry {
            spec: node.clone(),
            registered: Timestamp::now(),
            kubelet_port,
        };
        patch_node_status(&self.shared.client, &entry, true).await?;
        renew_lease(&self.shared.client, &node.name).await;
        tracing::info!(node = %node.name, ip = %node.ipv4, "node registered");
        write_lock(&self.shared.nodes).insert(node.name.clone(), entry);
        Ok(())
    }

    /// Stops every container gracefully (SIGTERM, then SIGKILL after the Pod's grace period,
    /// capped by [`AgentConfig::shutdown_grace`]), marks the nodes NotReady and stops all
    /// tasks. Pods stay in the apiserver, as when a kubelet stops.
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        let workers: Vec<JoinHandle<()>> = lock(&self.shared.workers)
            .drain()
            .map(|(_, w)| w.task)
            .collect();
        for w in workers {
            let _ = w.await;
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let nodes: Vec<NodeEntry> = read_lock(&self.shared.nodes).values().cloned().collect();
        for n in nodes {
            if let Err(e) = patch_node_status(&self.shared.client, &n, false).await {
                tracing::warn!(node = %n.spec.name, error = %e, "marking node NotReady");
            }
        }
        kill_all(&self.shared.procs);
        tracing::info!("node agent stopped");
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        for (_, w) in lock(&self.shared.workers).drain() {
            w.task.abort();
        }
        for (_, server) in lock(&self.shared.kubelet_servers).drain() {
            server.abort();
        }
        kill_all(&self.shared.procs);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_lock<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// First bytes of the header line written before every container start.
const LOG_HEADER: &str = "=== kubederp-node-agent: start";

fn log_path(workdir: &Path, namespace: &str, pod: &str, container: &str) -> PathBuf {
    workdir
        .join("logs")
        .join(format!("{namespace}_{pod}_{container}.log"))
}

/// Polls a reflector stream until cancelled, calling `on_event` for every event.
async fn drive<S, K>(stream: S, what: &'static str, cancel: CancellationToken, on_event: impl Fn())
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            ev = stream.next() => match ev {
                Some(Ok(_)) => on_event(),
                Some(Err(e)) => tracing::warn!(what, error = %e, "watch error (retrying)"),
                None => return,
            },
        }
    }
}
