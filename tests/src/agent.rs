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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, Node, Pod, Probe, Secret, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Field manager for everything the agent writes.
const FIELD_MANAGER: &str = "kubederp-node-agent";

/// Namespace of node heartbeat Leases (created by kube-apiserver at start).
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Lease duration the kubelet uses by default (`nodeLeaseDurationSeconds`).
const LEASE_SECONDS: i32 = 40;

/// `PATH` given to processes whose Pod does not set one (the usual container default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Binaries of this workspace that an image can name (last path segment of the repository):
/// the relay, whose Pods the operator creates. (The operator itself runs as a process in the
/// local stack, and as a Pod only on the real-node tier.)
const WORKSPACE_BINARIES: &[&str] = &["derper"];

/// One node the agent registers and runs Pods for.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Node name (cluster-scoped: make it unique per test).
    pub name: String,
    /// Labels, in addition to `kubernetes.io/{hostname,os,arch}` which the agent always sets.
    pub labels: BTreeMap<String, String>,
    /// The node's IPv4 address (a loopback address such as `127.0.0.2` locally), published as
    /// its `InternalIP`.
    pub ipv4: Ipv4Addr,
}

impl NodeSpec {
    /// A node with no labels.
    pub fn new(name: impl Into<String>, ipv4: Ipv4Addr) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            ipv4,
        }
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Scratch directory: `logs/` and `pods/` are created under it.
    pub workdir: PathBuf,
    /// Explicit image mappings: an image reference starting with the prefix runs the path.
    pub images: BTreeMap<String, PathBuf>,
    /// Node status and Lease heartbeat period (kubelet default: 10 s).
    pub heartbeat: Duration,
    /// First restart delay after a container exits; doubles per restart (kubelet: 10 s; shorter
    /// here so tests are quick).
    pub restart_backoff: Duration,
    /// Cap on the restart delay (kubelet: 5 min).
    pub max_restart_backoff: Duration,
    /// How often volumes are re-projected even without a watch event.
    pub resync: Duration,
    /// Cap on the termination grace period when the agent itself shuts down.
    pub shutdown_grace: Duration,
    /// Port of each node's minimal kubelet API (only `/containerLogs`, so `kubectl logs`
    /// works), served over TLS with a self-signed certificate on the node's IPv4 address;
    /// kube-apiserver does not verify kubelet certificates unless told to. 0 disables it.
    /// Default 10250, the kubelet's port. A port that cannot be bound is logged and skipped.
    pub kubelet_port: u16,
}

impl AgentConfig {
    /// Defaults: 10 s heartbeat, 1 s restart backoff doubling to 20 s, 5 s resync, 5 s shutdown
    /// grace, the kubelet API on port 10250.
    pub fn new(workdir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            workdir: workdir.into(),
            images: BTreeMap::new(),
            heartbeat: Duration::from_secs(10),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(20),
            resync: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            kubelet_port: 10250,
        }
    }

    /// Adds an explicit mapping: images starting with `prefix` run `path`.
    #[must_use]
    pub fn image(mut self, prefix: impl Into<String>, path: impl Into<PathBuf>) -> AgentConfig {
        self.images.insert(prefix.into(), path.into());
        self
    }

    /// The local executable for `image`, or why there is none. May build a workspace binary
    /// (blocking); call off the async runtime.
    pub fn resolve_image(&self, image: &str) -> Result<PathBuf, String> {
        if let Some((_, path)) = self
            .images
            .iter()
            .filter(|(prefix, _)| image.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
        {
            return Ok(path.clone());
        }
        let segment = image_last_segment(image);
        if WORKSPACE_BINARIES.contains(&segment) {
            let name = segment.to_owned();
            return std::panic::catch_unwind(|| crate::bins::workspace_bin(&name)).map_err(|e| {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                format!("image {image:?} maps to workspace binary {segment:?}, which is unavailable: {why}")
            });
        }
        let known: Vec<&str> = self.images.keys().map(String::as_str).collect();
        Err(format!(
            "no local executable for image {image:?} (explicit prefixes: {known:?}; workspace \
             binaries: {WORKSPACE_BINARIES:?})"
        ))
    }
}

/// The last path segment of an image's repository: `ghcr.io/x/derper:v1@sha256:…` → `derper`.
fn image_last_segment(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

// ------------------------------------------------------------------------------------------
// $(VAR) expansion and mountPath rewriting
// ------------------------------------------------------------------------------------------

/// Expands `$(VAR)` references the way Kubernetes does (`third_party/forked/golang/expansion`):
/// `$$` becomes `$`, `$(NAME)` becomes the value when `lookup` knows it and stays verbatim
/// otherwise, and any other `$` is kept.
pub fn expand_vars(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < input.len() {
        if input[cursor..].starts_with('$') && cursor + 1 < input.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.chars().next() {
                Some('$') => {
                    out.push('$');
                    1
                }
                Some('(') => match rest.find(')') {
                    Some(close) => {
                        let name = &rest[1..close];
                        match lookup(name) {
                            Some(v) => out.push_str(&v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 1
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                Some(c) => {
                    out.push('$');
                    out.push(c);
                    c.len_utf8()
                }
                None => 0,
            };
            cursor += 1 + advance;
            checkpoint = cursor;
            continue;
        }
        cursor += input[cursor..].chars().next().map_or(1, char::len_utf8);
    }
    out.push_str(&input[checkpoint..]);
    out
}

/// Characters that may precede or follow a mountPath for it to be rewritten.
fn is_path_delimiter(c: char) -> bool {
    matches!(c, '=' | ':' | ',' | ';' | '@' | '"' | '\'') || c.is_whitespace()
}

/// Rewrites mountPaths to local directories (see the module docs for the rule). `mounts` must
/// be sorted longest mountPath first.
pub fn rewrite_mount_paths(input: &str, mounts: &[(String, PathBuf)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut prev: Option<char> = None;
    'outer: while i < input.len() {
        let rest = &input[i..];
        if prev.is_none_or(is_path_delimiter) {
            for (mount_path, local) in mounts {
                if let Some(after) = rest.strip_prefix(mount_path.as_str())
                    && after
                        .chars()
                        .next()
                        .is_none_or(|c| c == '/' || is_path_delimiter(c))
                {
                    out.push_str(&local.to_string_lossy());
                    i += mount_path.len();
                    prev = mount_path.chars().last();
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().unwrap_or_default();
        out.push(c);
        prev = Some(c);
        i += c.len_utf8().max(1);
    }
    out
}

/// Binds a wildcard listen argument to `ip`: an argument that is exactly `:<port>`,
/// `0.0.0.0:<port>` or `[::]:<port>`, or ends in `=` followed by one of those, gets `ip` as
/// its host. Anything else is returned unchanged.
pub fn bind_wildcard_listen(arg: &str, ip: Ipv4Addr) -> String {
    let (head, value) = match arg.rsplit_once('=') {
        Some((h, v)) => (format!("{h}="), v),
        None => (String::new(), arg),
    };
    let port = ["", "0.0.0.0", "[::]"]
        .iter()
        .find_map(|host| value.strip_prefix(host)?.strip_prefix(':'))
        .filter(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    match port {
        Some(port) => format!("{head}{ip}:{port}"),
        None => arg.to_owned(),
    }
}

// ------------------------------------------------------------------------------------------
// The agent
// ------------------------------------------------------------------------------------------

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

/// A registered node plus agent bookkeeping.
#[derive(Debug, Clone)]
struct NodeEntry {
    spec: NodeSpec,
    registered: Timestamp,
    /// Port of the node's `/containerLogs` endpoint (0: none).
    kubelet_port: u16,
}

/// A live process group started by the agent.
#[derive(Debug, Clone)]
struct ProcEntry {
    pid: i32,
    namespace: String,
    pod: String,
    container: String,
}

/// What a Pod worker is told.
#[derive(Debug, Clone)]
enum PodUpdate {
    Pod(Arc<Pod>),
    /// The Pod is gone from the apiserver.
    Gone,
}

#[derive(Debug)]
struct WorkerHandle {
    tx: watch::Sender<PodUpdate>,
    task: JoinHandle<()>,
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

/// SIGKILLs every process group and waits (up to 5 s) until they are reaped.
/// Repeats the kill until the table is empty, in case a supervisor was between its last
/// cancellation check and `spawn` (it kills its own process once it sees the cancellation).
fn kill_all(procs: &Mutex<HashMap<u64, ProcEntry>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<i32> = lock(procs).values().map(|p| p.pid).collect();
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                tracing::error!(?pids, "processes still running 5s after SIGKILL");
            }
            return;
        }
        for pid in &pids {
            signal_group(*pid, libc::SIGKILL);
        }
        std::thread::park_timeout(Duration::from_millis(20));
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

// ------------------------------------------------------------------------------------------
// Nodes
// ------------------------------------------------------------------------------------------

fn node_labels(spec: &NodeSpec) -> BTreeMap<String, String> {
    let mut labels = spec.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), spec.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), go_arch().into());
    labels
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn apply_node(client: &kube::Client, spec: &NodeSpec) -> anyhow::Result<()> {
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": spec.name, "labels": node_labels(spec)},
    });
    Api::<Node>::all(client.clone())
        .patch(
            &spec.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&node),
        )
        .await
        .with_context(|| format!("applying node {}", spec.name))?;
    Ok(())
}

/// Writes the node's status (JSON merge patch).
async fn patch_node_status(
    client: &kube::Client,
    entry: &NodeEntry,
    ready: bool,
) -> anyhow::Result<()> {
    let spec = &entry.spec;
    let addresses = [json!({"type": "InternalIP", "address": spec.ipv4.to_string()})];
    // No `Hostname` address: kube-apiserver prefers it for reaching the kubelet
    // (`--kubelet-preferred-address-types`), and our node names do not resolve.
    let now = Time(Timestamp::now());
    let (status, reason, message) = if ready {
        (
            "True",
            "KubeletReady",
            "kubederp node agent is posting ready status",
        )
    } else {
        ("False", "NodeAgentStopped", "kubederp node agent stopped")
    };
    let capacity = json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"});
    let patch = json!({
        "status": {
            "addresses": addresses,
            "conditions": [{
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": if ready { Time(entry.registered) } else { now.clone() },
            }],
            "capacity": capacity,
            "allocatable": capacity,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": entry.kubelet_port}},
            "nodeInfo": {
                "architecture": go_arch(),
                "bootID": "",
                "containerRuntimeVersion": "kubederp-node-agent://0.1.0",
                "kernelVersion": "",
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.34.0-kubederp-node-agent",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "kubederp local node agent",
                "systemUUID": "",
            },
        }
    });
    Api::<Node>::all(client.clone())
        .patch_status(&spec.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching status of node {}", spec.name))?;
    Ok(())
}

/// Renews the node's Lease in `kube-node-lease` (best effort: logged at debug on failure).
async fn renew_lease(client: &kube::Client, node: &str) {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    let api = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(
        client.clone(),
        LEASE_NAMESPACE,
    );
    if let Err(e) = api
        .patch(
            node,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
    {
        tracing::debug!(node, error = %e, "renewing node lease");
    }
}

async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let nodes: Vec<NodeEntry> = read_lock(&shared.nodes).values().cloned().collect();
        for n in nodes {
            if let Err(e) = patch_node_status(&shared.client, &n, true).await {
                tracing::warn!(node = %n.spec.name, error = %format!("{e:#}"), "node heartbeat");
            }
            renew_lease(&shared.client, &n.spec.name).await;
        }
    }
}

// ------------------------------------------------------------------------------------------
// A minimal kubelet API: `/containerLogs` only, for `kubectl logs`
// ------------------------------------------------------------------------------------------

/// First bytes of the header line written before every container start.
const LOG_HEADER: &str = "=== kubederp-node-agent: start";

/// Binds the node's kubelet endpoint and starts serving it; returns the port (0: none).
async fn start_kubelet_server(shared: &Arc<Shared>, node: &NodeSpec) -> u16 {
    let port = shared.config.kubelet_port;
    if port == 0 {
        return 0;
    }
    let listener = match tokio::net::TcpListener::bind((node.ipv4, port)).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(node = %node.name, ip = %node.ipv4, port, error = %e,
                "cannot bind the kubelet endpoint; kubectl logs will not work for this node");
            return 0;
        }
    };
    let acceptor = match kubelet_tls(node.ipv4) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(node = %node.name, error = %format!("{e:#}"), "kubelet TLS setup");
            return 0;
        }
    };
    let s = shared.clone();
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = s.cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let (s, acceptor) = (s.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = serve_kubelet_request(&s, tls).await;
                }
            });
        }
    });
    lock(&shared.kubelet_servers).insert(node.name.clone(), task);
    port
}

fn kubelet_tls(ip: Ipv4Addr) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![ip.to_string()])?.self_signed(&key)?;
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// One request per connection: `GET /containerLogs/<ns>/<pod>/<container>?follow=&previous=
/// &tailLines=`; anything else is 404.
async fn serve_kubelet_request<S>(shared: &Shared, stream: S) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncBufReadExt as _;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = tokio::io::BufReader::new(rd);
    let mut request = String::new();
    reader.read_line(&mut request).await?;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [_, ns, pod, container] = segments.as_slice() else {
        return respond(
            &mut wr,
            404,
            "the kubederp node agent serves only /containerLogs\n",
        )
        .await;
    };
    if segments.first() != Some(&"containerLogs") {
        return respond(
            &mut wr,
            404,
            "the kubederp node agent serves only /containerLogs\n",
        )
        .await;
    }
    let file = log_path(&shared.config.workdir, ns, pod, container);
    let Ok(text) = tokio::fs::read(&file).await else {
        let msg = format!("no logs for container {container:?} of pod {ns}/{pod} on this agent\n");
        return respond(&mut wr, 404, &msg).await;
    };
    let mut offset = text.len();
    let text = String::from_utf8_lossy(&text);
    let previous = param("previous").as_deref() == Some("true");
    let follow = param("follow").as_deref() == Some("true") && !previous;
    let tail = param("tailLines").and_then(|t| t.parse::<usize>().ok());
    let runs: Vec<&str> = text.split(LOG_HEADER).collect();
    let run = if previous {
        runs.len().checked_sub(2).and_then(|i| runs.get(i))
    } else {
        runs.last()
    };
    // Drop the rest of the header line itself.
    let body = run
        .map(|r| r.split_once('\n').map_or("", |(_, rest)| rest))
        .unwrap_or_default();
    let lines: Vec<&str> = body.lines().collect();
    let from = tail.map_or(0, |t| lines.len().saturating_sub(t));
    let mut out = lines.get(from..).unwrap_or_default().join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    wr.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    write_chunk(&mut wr, out.as_bytes()).await?;
    if follow {
        loop {
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let Ok(all) = tokio::fs::read(&file).await else {
                break;
            };
            if all.len() <= offset {
                continue;
            }
            let new = String::from_utf8_lossy(all.get(offset..).unwrap_or_default()).into_owned();
            offset = all.len();
            let new: String = new
                .split_inclusive('\n')
                .filter(|l| !l.starts_with(LOG_HEADER))
                .collect();
            write_chunk(&mut wr, new.as_bytes()).await?;
        }
    }
    wr.write_all(b"0\r\n\r\n").await?;
    wr.flush().await
}

async fn write_chunk<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    w.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await
}

async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    code: u16,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if code == 200 { "OK" } else { "Not Found" },
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body.as_bytes()).await?;
    w.flush().await
}

// ------------------------------------------------------------------------------------------
// The Pod loop: one worker per Pod bound to one of our nodes
// ------------------------------------------------------------------------------------------

async fn pod_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = shared.kick.notified() => {}
            _ = tick.tick() => {}
        }
        reconcile_pods(&shared);
    }
}

fn reconcile_pods(shared: &Arc<Shared>) {
    let nodes: BTreeMap<String, NodeSpec> = read_lock(&shared.nodes)
        .iter()
        .map(|(name, n)| (name.clone(), n.spec.clone()))
        .collect();
    let pods = shared.pods.state();
    let mut workers = lock(&shared.workers);
    workers.retain(|_, w| !w.task.is_finished());
    let mut live = BTreeSet::new();
    for pod in pods {
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| nodes.get(s.node_name.as_deref()?))
        else {
            continue;
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        live.insert(uid.clone());
        match workers.get(&uid) {
            Some(w) => {
                w.tx.send_if_modified(|cur| match cur {
                    PodUpdate::Pod(old)
                        if old.metadata.resource_version == pod.metadata.resource_version =>
                    {
                        false
                    }
                    PodUpdate::Pod(_) => {
                        *cur = PodUpdate::Pod(pod.clone());
                        true
                    }
                    _ => false,
                });
            }
            None => {
                let (tx, rx) = watch::channel(PodUpdate::Pod(pod.clone()));
                let task = tokio::spawn(run_pod(shared.clone(), pod.clone(), node.clone(), rx));
                workers.insert(uid, WorkerHandle { tx, task });
            }
        }
    }
    for (uid, w) in workers.iter() {
        if !live.contains(uid) {
            w.tx.send_if_modified(|cur| {
                if matches!(cur, PodUpdate::Pod(_)) {
                    *cur = PodUpdate::Gone;
                    true
                } else {
                    false
                }
            });
        }
    }
}

// ------------------------------------------------------------------------------------------
// Validation: anything we cannot honour is refused, naming the field
// ------------------------------------------------------------------------------------------

/// A Pod spec field the agent cannot honour.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal(String);

/// PodSpec fields that are honoured, or only concern scheduling / isolation and are accepted
/// without effect on the process.
const POD_SPEC_FIELDS: &[&str] = &[
    "containers",
    "volumes",
    "nodeName",
    "hostNetwork",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "dnsPolicy",
    "schedulerName",
    "securityContext",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "tolerations",
    "nodeSelector",
    "affinity",
    "priority",
    "priorityClassName",
    "preemptionPolicy",
    "imagePullSecrets",
    "topologySpreadConstraints",
    "hostPID",
    "hostIPC",
    "hostname",
    "subdomain",
    "setHostnameAsFQDN",
    "os",
    "hostUsers",
    "overhead",
    "initContainers",
    "ephemeralContainers",
];

/// Container fields that are honoured or accepted without effect.
const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "volumeMounts",
    "readinessProbe",
    "resources",
    "resizePolicy",
    "securityContext",
    "imagePullPolicy",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "stdin",
    "stdinOnce",
    "tty",
];

/// Readiness probe fields that are honoured.
const PROBE_FIELDS: &[&str] = &[
    "httpGet",
    "tcpSocket",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
];

/// `httpGet` fields that are honoured (the host is always the node IP, no extra headers).
const HTTP_GET_FIELDS: &[&str] = &["path", "port", "scheme"];

fn unknown_keys(v: &Value, allowed: &[&str]) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

/// Checks the whole spec; returns the first field that cannot be honoured.
fn validate(pod: &Pod) -> Result<(), Refusal> {
    let Some(spec) = pod.spec.as_ref() else {
        return refuse("spec: missing");
    };
    let spec_json = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let Some(k) = unknown_keys(&spec_json, POD_SPEC_FIELDS).first() {
        return refuse(format!(
            "spec.{k}: not supported by the kubederp node agent"
        ));
    }
    if spec.host_network != Some(true) {
        return refuse(
            "spec.hostNetwork: must be true (the node agent runs Pods as host processes and has \
             no Pod network)",
        );
    }
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return refuse("spec.initContainers: init containers are not supported");
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return refuse("spec.ephemeralContainers: not supported");
    }
    let restart = spec.restart_policy.as_deref().unwrap_or("Always");
    if restart != "Always" {
        return refuse(format!(
            "spec.restartPolicy: {restart:?} not supported (only Always)"
        ));
    }
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    for (i, v) in volumes.iter().enumerate() {
        validate_volume(i, v)?;
    }
    if spec.containers.is_empty() {
        return refuse("spec.containers: empty");
    }
    for (i, c) in spec.containers.iter().enumerate() {
        validate_container(i, c, volumes)?;
    }
    Ok(())
}

fn validate_volume(i: usize, v: &Volume) -> Result<(), Refusal> {
    let json = serde_json::to_value(v).unwrap_or(Value::Null);
    let kinds = unknown_keys(&json, &["name"]);
    let field = format!("spec.volumes[{i}]");
    match kinds.as_slice() {
        [k] if ["secret", "configMap", "emptyDir"].contains(&k.as_str()) => Ok(()),
        [k] => refuse(format!(
            "{field}.{k}: volume type not supported (volume {:?}); supported: secret, \
             configMap, emptyDir",
            v.name
        )),
        _ => refuse(format!("{field}: expected exactly one volume source")),
    }
}

fn validate_container(i: usize, c: &Container, volumes: &[Volume]) -> Result<(), Refusal> {
    let field = format!("spec.containers[{i}]");
    let json = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(k) = unknown_keys(&json, CONTAINER_FIELDS).first() {
        return refuse(format!(
            "{field}.{k}: not supported by the kubederp node agent (container {:?})",
            c.name
        ));
    }
    if c.image.as_deref().unwrap_or_default().is_empty() {
        return refuse(format!("{field}.image: empty"));
    }
    for (flag, name) in [
        (c.stdin, "stdin"),
        (c.stdin_once, "stdinOnce"),
        (c.tty, "tty"),
    ] {
        if flag == Some(true) {
            return refuse(format!("{field}.{name}: not supported"));
        }
    }
    for (j, e) in c.env.iter().flatten().enumerate() {
        if let Some(from) = &e.value_from {
            let fj = serde_json::to_value(from).unwrap_or(Value::Null);
            if let Some(k) = unknown_keys(&fj, &["fieldRef"]).first() {
                return refuse(format!(
                    "{field}.env[{j}].valueFrom.{k}: not supported (env {:?})",
                    e.name
                ));
            }
            if let Some(f) = &from.field_ref
                && !field_supported(&f.field_path)
            {
                return refuse(format!(
                    "{field}.env[{j}].valueFrom.fieldRef.fieldPath: {:?} not supported",
                    f.field_path
                ));
            }
        }
    }
    for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mf = format!("{field}.volumeMounts[{j}]");
        if !volumes.iter().any(|v| v.name == m.name) {
            return refuse(format!("{mf}.name: no volume named {:?}", m.name));
        }
        if !m.mount_path.starts_with('/') || m.mount_path.trim_end_matches('/').is_empty() {
            return refuse(format!(
                "{mf}.mountPath: {:?} must be an absolute path other than /",
                m.mount_path
            ));
        }
        if m.sub_path_expr.is_some() {
            return refuse(format!("{mf}.subPathExpr: not supported"));
        }
        if m.sub_path.as_deref().is_some_and(|sp| !sp.is_empty()) {
            return refuse(format!("{mf}.subPath: not supported"));
        }
        if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
            return refuse(format!("{mf}.mountPropagation: not supported"));
        }
    }
    if let Some(p) = &c.readiness_probe {
        let name = "readinessProbe";
        let pj = serde_json::to_value(p).unwrap_or(Value::Null);
        if let Some(k) = unknown_keys(&pj, PROBE_FIELDS).first() {
            return refuse(format!("{field}.{name}.{k}: not supported"));
        }
        if let Some(h) = &p.http_get {
            if let Some(k) = unknown_keys(&pj["httpGet"], HTTP_GET_FIELDS).first() {
                return refuse(format!("{field}.{name}.httpGet.{k}: not supported"));
            }
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return refuse(format!(
                    "{field}.{name}.httpGet.scheme: only HTTP is supported"
                ));
            }
            resolve_port(&h.port)
                .map_err(|m| Refusal(format!("{field}.{name}.httpGet.port: {m}")))?;
        }
        if let Some(t) = &p.tcp_socket {
            if let Some(k) = unknown_keys(&pj["tcpSocket"], &["port"]).first() {
                return refuse(format!("{field}.{name}.tcpSocket.{k}: not supported"));
            }
            resolve_port(&t.port)
                .map_err(|m| Refusal(format!("{field}.{name}.tcpSocket.port: {m}")))?;
        }
        if p.http_get.is_none() && p.tcp_socket.is_none() {
            return refuse(format!("{field}.{name}: no handler"));
        }
    }
    Ok(())
}

fn is_clean_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn field_supported(path: &str) -> bool {
    matches!(path, "status.hostIP" | "status.podIP")
}

/// A probe's port; only numbers (the operator's probes name no ports).
fn resolve_port(port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("{p} out of range")),
        IntOrString::String(name) => Err(format!("named port {name:?} not supported")),
    }
}

// ------------------------------------------------------------------------------------------
// Downward API, env and volumes
// ------------------------------------------------------------------------------------------

/// The value of a downward-API field. With host networking the Pod IP is the node IP.
fn field_value(path: &str, node: &NodeSpec) -> Option<String> {
    match path {
        "status.hostIP" | "status.podIP" => Some(node.ipv4.to_string()),
        _ => None,
    }
}

/// Files of one volume: relative path → (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Why something the Pod needs is not available yet (retried, reported as waiting).
#[derive(Debug, Clone)]
struct Missing(String);

fn ns_ref<K: kube::Resource<DynamicType = ()>>(ns: &str, name: &str) -> ObjectRef<K> {
    ObjectRef::new(name).within(ns)
}

fn secret_data(shared: &Shared, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let s = shared.secrets.get(&ns_ref(ns, name))?;
    Some(
        s.data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
    )
}

fn config_map_data(shared: &Shared, ns: &str, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let c = shared.config_maps.get(&ns_ref(ns, name))?;
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    Some(out)
}

/// Projects keys of a Secret/ConfigMap into `files`, honouring items, modes and `optional`.
#[allow(clippy::too_many_arguments)]
fn project_keys(
    files: &mut Files,
    what: &str,
    name: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    optional: bool,
) -> Result<(), Missing> {
    let Some(data) = data else {
        if optional {
            return Ok(());
        }
        return Err(Missing(format!("{what} {name:?} not found")));
    };
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        let mode = item.mode.map_or(default_mode, mode_bits);
                        files.insert(item.path.clone(), (v.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(Missing(format!(
                            "{what} {name:?} has no key {:?}",
                            item.key
                        )));
                    }
                }
            }
        }
        _ => {
            for (k, v) in data {
                files.insert(k, (v, default_mode));
            }
        }
    }
    Ok(())
}

fn mode_bits(mode: i32) -> u32 {
    u32::try_from(mode).unwrap_or(0o644) & 0o777
}

/// Default mode of projected files (Kubernetes: 0644).
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Computes the files of a Secret or ConfigMap volume.
fn volume_files(shared: &Shared, pod: &Pod, v: &Volume) -> Result<Files, Missing> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut files = Files::new();
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        project_keys(
            &mut files,
            "secret",
            &name,
            secret_data(shared, ns, &name),
            s.items.as_ref(),
            s.default_mode.map_or(DEFAULT_FILE_MODE, mode_bits),
            s.optional == Some(true),
        )?;
    }
    if let Some(c) = &v.config_map {
        project_keys(
            &mut files,
            "configmap",
            &c.name,
            config_map_data(shared, ns, &c.name),
            c.items.as_ref(),
            c.default_mode.map_or(DEFAULT_FILE_MODE, mode_bits),
            c.optional == Some(true),
        )?;
    }
    Ok(files)
}

/// Writes `files` into `dir` atomically, as the kubelet's AtomicWriter does: the content goes
/// into a fresh `..<n>` directory, the `..data` symlink is swapped to it with one rename, and
/// each top-level entry is a symlink through `..data`. A reader opening `dir/key` sees the
/// old or the new content, never a mix.
fn write_atomic(dir: &Path, files: &Files) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let stamp = format!(
        "..{}_{}",
        Timestamp::now().as_nanosecond(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let data_dir = dir.join(&stamp);
    std::fs::create_dir(&data_dir)?;
    for (rel, (content, mode)) in files {
        if !is_clean_relative(rel) {
            return Err(std::io::Error::other(format!("bad file path {rel:?}")));
        }
        let path = data_dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&stamp, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join("..data"))?;
    let top: BTreeSet<String> = files
        .keys()
        .filter_map(|k| k.split('/').next().map(str::to_owned))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "..data" || name == stamp {
            continue;
        }
        if name.starts_with("..") {
            let _ = std::fs::remove_dir_all(entry.path());
        } else if !top.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Resolves a container's env in order, with `$(VAR)` expansion against earlier variables and
/// mountPath rewriting of each value. A `fieldRef` the agent does not know leaves the variable
/// unset (validation refuses such Pods before they get here).
fn container_env(
    node: &NodeSpec,
    c: &Container,
    mounts: &[(String, PathBuf)],
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match &e.value_from {
            Some(from) => match from
                .field_ref
                .as_ref()
                .and_then(|f| field_value(&f.field_path, node))
            {
                Some(v) => v,
                None => continue,
            },
            None => expand_vars(e.value.as_deref().unwrap_or_default(), |name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            }),
        };
        if let Some(slot) = vars.iter_mut().find(|(name, _)| *name == e.name) {
            slot.1 = value;
        } else {
            vars.push((e.name.clone(), value));
        }
    }
    vars.into_iter()
        .map(|(k, v)| (k, rewrite_mount_paths(&v, mounts)))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Pod worker
// ------------------------------------------------------------------------------------------

/// What one container is doing, as reported in `containerStatuses`.
#[derive(Debug, Clone, Default)]
struct CState {
    restart_count: i32,
    state: Value,
    last_state: Value,
    ready: bool,
    started: bool,
    ever_started: bool,
    container_id: Option<String>,
}

/// A Pod being run.
struct PodCtx {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    ns: String,
    name: String,
    uid: String,
    node: NodeSpec,
    dir: PathBuf,
    /// Each container's executable.
    exes: Vec<PathBuf>,
    mounts: Vec<Vec<(String, PathBuf)>>,
    states: Mutex<Vec<CState>>,
    dirty: Notify,
    /// Grace period for stopping the containers, set before `stop` is cancelled.
    stop_grace: Mutex<Duration>,
}

impl PodCtx {
    fn spec_containers(&self) -> &[Container] {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
    }

    fn update(&self, idx: usize, f: impl FnOnce(&mut CState)) {
        if let Some(s) = lock(&self.states).get_mut(idx) {
            f(s);
        }
        self.dirty.notify_one();
    }
}

impl PodCtx {
    fn volume_dir(&self, name: &str) -> PathBuf {
        self.dir.join("volumes").join(name)
    }

    /// Re-projects every non-emptyDir volume; true when something changed on disk.
    fn project_volumes(&self, last: &mut HashMap<String, Files>) -> Result<bool, Missing> {
        let mut changed = false;
        for v in self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
        {
            let dir = self.volume_dir(&v.name);
            if v.empty_dir.is_some() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Missing(format!("creating {}: {e}", dir.display())))?;
                continue;
            }
            let files = volume_files(&self.shared, &self.pod, v)?;
            if last.get(&v.name) == Some(&files) {
                continue;
            }
            write_atomic(&dir, &files)
                .map_err(|e| Missing(format!("writing volume {}: {e}", v.name)))?;
            tracing::debug!(pod = %self.name, volume = %v.name, "volume projected");
            last.insert(v.name.clone(), files);
            changed = true;
        }
        Ok(changed)
    }
}

impl PodCtx {
    /// Executable, argv, env and working directory for container `idx`.
    fn launch(&self, idx: usize) -> Launch {
        let c = &self.spec_containers()[idx];
        let node = &self.node;
        let mounts = &self.mounts[idx];
        let mut env = container_env(node, c, mounts);
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        if !env.iter().any(|(k, _)| k == "HOSTNAME") {
            env.push(("HOSTNAME".into(), node.name.clone()));
        }
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let command = c.command.clone().unwrap_or_default();
        let argv: Vec<String> = command
            .iter()
            .skip(1)
            .chain(c.args.iter().flatten())
            .map(|a| rewrite_mount_paths(&expand_vars(a, lookup), mounts))
            .map(|a| bind_wildcard_listen(&a, node.ipv4))
            .collect();
        Launch {
            exe: self.exes[idx].clone(),
            argv,
            env,
            cwd: self.dir.clone(),
        }
    }
}

struct Launch {
    exe: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

/// Local directories for each mountPath of a container, longest mountPath first.
fn container_mounts(dir: &Path, c: &Container) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.trim_end_matches('/').to_owned(),
                dir.join("volumes").join(&m.name),
            )
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
    mounts
}

/// Resolves each container's executable (checking `command[0]`) off the async runtime.
async fn resolve_exes(shared: &Arc<Shared>, pod: &Pod) -> Result<Vec<PathBuf>, Refusal> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let config = shared.config.clone();
    tokio::task::spawn_blocking(move || {
        containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let image = c.image.clone().unwrap_or_default();
                let exe = config
                    .resolve_image(&image)
                    .map_err(|m| Refusal(format!("spec.containers[{i}].image: {m}")))?;
                if let Some(c0) = c.command.as_ref().and_then(|c| c.first()) {
                    let base = Path::new(c0).file_name().map(|s| s.to_string_lossy());
                    let exe_name = exe.file_name().map(|s| s.to_string_lossy());
                    let ok = base.is_some()
                        && (base == exe_name
                            || base.as_deref() == Some(image_last_segment(&image)));
                    if !ok {
                        return Err(Refusal(format!(
                            "spec.containers[{i}].command[0]: {c0:?} is not the image's \
                             executable ({}); the node agent can only run the image's own binary",
                            exe.display()
                        )));
                    }
                }
                Ok(exe)
            })
            .collect::<Result<Vec<_>, Refusal>>()
    })
    .await
    .map_err(|e| Refusal(format!("resolving images: {e}")))?
}

/// Runs one Pod until it is deleted (then finalizes the deletion) or the agent stops.
async fn run_pod(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    node: NodeSpec,
    mut rx: watch::Receiver<PodUpdate>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let span = tracing::info_span!("pod", namespace = %ns, pod = %name, node = %node.name);
    let _ = tracing::Instrument::instrument(
        run_pod_inner(shared, pod, node, ns, name, uid, &mut rx),
        span,
    )
    .await;
}

async fn run_pod_inner(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    node: NodeSpec,
    ns: String,
    name: String,
    uid: String,
    rx: &mut watch::Receiver<PodUpdate>,
) {
    let pods_api = Api::<Pod>::namespaced(shared.client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        // Being deleted before we ever ran it (e.g. the agent restarted): nothing to stop.
        delete_now(&pods_api, &name, &uid).await;
        return;
    }
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or(Time(Timestamp::now()));
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Failed" || p == "Succeeded");

    // A refused or finished Pod is never (re)started; wait for its deletion.
    let verdict = match validate(&pod) {
        Ok(()) if terminal => Err(None),
        Ok(()) => resolve_exes(&shared, &pod).await.map_err(Some),
        Err(r) => Err(Some(r)),
    };
    let exes = match verdict {
        Ok(exes) => exes,
        Err(refusal) => {
            if let Some(Refusal(msg)) = refusal {
                tracing::error!(reason = "UnsupportedPodSpec", message = %msg, "refusing pod");
                let status = json!({"status": {
                    "phase": "Failed",
                    "reason": "UnsupportedPodSpec",
                    "message": format!("kubederp node agent cannot run this Pod: {msg}"),
                    "startTime": start_time,
                    "conditions": [
                        cond("PodScheduled", true, None),
                        cond("Ready", false, Some(("UnsupportedPodSpec", &msg))),
                    ],
                }});
                if let Err(e) = pods_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    tracing::warn!(error = %e, "patching status of refused pod");
                }
            }
            wait_for_end(&shared, rx).await;
            finalize(&shared, &pods_api, &name, &uid, rx).await;
            return;
        }
    };

    let dir = shared
        .config
        .workdir
        .join("pods")
        .join(format!("{ns}_{name}_{uid}"));
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let ctx = Arc::new(PodCtx {
        mounts: containers
            .iter()
            .map(|c| container_mounts(&dir, c))
            .collect(),
        states: Mutex::new(
            containers
                .iter()
                .map(|_| CState {
                    state: json!({"waiting": {"reason": "ContainerCreating"}}),
                    ..CState::default()
                })
                .collect(),
        ),
        shared: shared.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        node,
        dir,
        exes,
        dirty: Notify::new(),
        stop_grace: Mutex::new(Duration::from_secs(2)),
    });
    let mut reporter = StatusReporter::new(start_time);
    let mut resync_rx = shared.resync.subscribe();
    let mut last_files = HashMap::new();
    let mut resync_tick = tokio::time::interval(shared.config.resync);
    let mut image_change_logged = false;

    // Volumes first: containers start only once every volume could be projected.
    loop {
        match ctx.project_volumes(&mut last_files) {
            Ok(_) => break,
            Err(Missing(msg)) => {
                tracing::warn!(%msg, "waiting for volume sources");
                for i in 0..containers.len() {
                    ctx.update(i, |s| {
                        s.state =
                            json!({"waiting": {"reason": "ContainerCreating", "message": msg}});
                    });
                }
                reporter.report(&ctx, &pods_api).await;
            }
        }
        tokio::select! {
            _ = resync_rx.changed() => {}
            _ = resync_tick.tick() => {}
            () = shared.cancel.cancelled() => return,
            r = rx.changed() => {
                if r.is_err() || !matches!(&*rx.borrow(), PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_none()) {
                    finalize(&shared, &pods_api, &name, &uid, rx).await;
                    return;
                }
            }
        }
    }

    let stop = CancellationToken::new();
    let supervisors: Vec<JoinHandle<()>> = (0..containers.len())
        .map(|i| {
            tokio::spawn(tracing::Instrument::instrument(
                supervise(ctx.clone(), i, stop.clone()),
                tracing::Span::current(),
            ))
        })
        .collect();
    tracing::info!(containers = containers.len(), "pod started");

    let stop_reason = loop {
        reporter.report(&ctx, &pods_api).await;
        tokio::select! {
            () = ctx.dirty.notified() => {}
            _ = resync_rx.changed() => {
                if let Err(Missing(m)) = ctx.project_volumes(&mut last_files) {
                    tracing::warn!(msg = %m, "volume source missing; keeping the old content");
                }
            }
            _ = resync_tick.tick() => {
                if let Err(Missing(m)) = ctx.project_volumes(&mut last_files) {
                    tracing::debug!(msg = %m, "volume source missing; keeping the old content");
                }
            }
            () = shared.cancel.cancelled() => break StopReason::AgentShutdown,
            r = rx.changed() => {
                let update = if r.is_err() { PodUpdate::Gone } else { rx.borrow().clone() };
                match update {
                    PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_some() => {
                        let grace = p
                            .metadata
                            .deletion_grace_period_seconds
                            .or_else(|| p.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30);
                        break StopReason::Deleted(Duration::from_secs(u64::try_from(grace).unwrap_or(0)));
                    }
                    PodUpdate::Pod(p) => log_image_change(&ctx, &p, &mut image_change_logged),
                    PodUpdate::Gone => break StopReason::Deleted(Duration::ZERO),
                }
            }
        }
    };
    let grace = match stop_reason {
        StopReason::Deleted(g) => g,
        StopReason::AgentShutdown => {
            let g = pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .and_then(|g| u64::try_from(g).ok())
                .unwrap_or(30);
            Duration::from_secs(g).min(shared.config.shutdown_grace)
        }
    };
    tracing::info!(reason = ?stop_reason, grace_s = grace.as_secs_f32(), "stopping pod");
    *lock(&ctx.stop_grace) = grace;
    stop.cancel();
    for s in supervisors {
        let _ = s.await;
    }
    if matches!(stop_reason, StopReason::AgentShutdown) {
        // Containers are terminated and not ready; the next agent on this node runs them again.
        reporter.report(&ctx, &pods_api).await;
        return;
    }
    // Final status with terminated containers is useless once the Pod is deleted; delete it.
    delete_now(&pods_api, &name, &uid).await;
    let _ = std::fs::remove_dir_all(ctx.dir.join("volumes"));
    tracing::info!("pod deleted");
}

/// A running container's image cannot change here: the operator replaces a relay Pod rather
/// than changing it (a kubelet would restart the container). Logged once, as an error naming
/// the field; the old process keeps running.
fn log_image_change(ctx: &PodCtx, pod: &Pod, logged: &mut bool) {
    if *logged {
        return;
    }
    let running = ctx.spec_containers();
    for (i, c) in pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .enumerate()
    {
        if running.get(i).is_some_and(|r| r.image != c.image) {
            tracing::error!(
                field = %format!("spec.containers[{i}].image"),
                "changing a running container's image is not supported by the node agent; \
                 the old process keeps running"
            );
            *logged = true;
        }
    }
}

#[derive(Debug)]
enum StopReason {
    Deleted(Duration),
    AgentShutdown,
}

/// Waits until the Pod is deleted (or gone, or the agent stops).
async fn wait_for_end(shared: &Shared, rx: &mut watch::Receiver<PodUpdate>) {
    loop {
        if !matches!(&*rx.borrow(), PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_none()) {
            return;
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Deletes the Pod with grace period 0 once nothing runs (unless the agent is stopping).
async fn finalize(
    shared: &Shared,
    api: &Api<Pod>,
    name: &str,
    uid: &str,
    rx: &mut watch::Receiver<PodUpdate>,
) {
    if shared.cancel.is_cancelled() {
        return;
    }
    if matches!(&*rx.borrow(), PodUpdate::Gone) {
        return;
    }
    delete_now(api, name, uid).await;
}

async fn delete_now(api: &Api<Pod>, name: &str, uid: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, "deleting pod"),
    }
}

fn cond(type_: &str, status: bool, why: Option<(&str, &str)>) -> Value {
    let mut c = json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "lastTransitionTime": Time(Timestamp::now()),
    });
    if let Some((reason, message)) = why {
        c["reason"] = json!(reason);
        c["message"] = json!(message);
    }
    c
}

/// Builds and writes Pod status, only when it changed; condition transition times are kept.
struct StatusReporter {
    start_time: Time,
    transitions: HashMap<&'static str, (bool, Time)>,
    last: Option<Value>,
}

impl StatusReporter {
    fn new(start_time: Time) -> StatusReporter {
        StatusReporter {
            start_time,
            transitions: HashMap::new(),
            last: None,
        }
    }

    fn condition(&mut self, type_: &'static str, status: bool) -> Value {
        let entry = self
            .transitions
            .entry(type_)
            .or_insert_with(|| (status, Time(Timestamp::now())));
        if entry.0 != status {
            *entry = (status, Time(Timestamp::now()));
        }
        json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "lastTransitionTime": entry.1,
        })
    }

    async fn report(&mut self, ctx: &PodCtx, api: &Api<Pod>) {
        let node = &ctx.node;
        let states = lock(&ctx.states).clone();
        let containers = ctx.spec_containers();
        let all_ready = states.iter().all(|s| s.ready);
        let any_started = states.iter().any(|s| s.ever_started);
        // restartPolicy is always Always: a container never finishes for good.
        let phase = if any_started { "Running" } else { "Pending" };
        let statuses: Vec<Value> = states
            .iter()
            .zip(containers)
            .map(|(s, c)| {
                let mut v = json!({
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "ready": s.ready,
                    "started": s.started,
                    "restartCount": s.restart_count,
                    "state": s.state,
                });
                if !s.last_state.is_null() {
                    v["lastState"] = s.last_state.clone();
                }
                if let Some(id) = &s.container_id {
                    v["containerID"] = json!(id);
                }
                v
            })
            .collect();
        let ips = [json!({"ip": node.ipv4.to_string()})];
        let conditions = vec![
            self.condition("PodScheduled", true),
            self.condition("Initialized", true),
            self.condition("PodReadyToStartContainers", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
        ];
        let status = json!({
            "phase": phase,
            "hostIP": node.ipv4.to_string(),
            "hostIPs": ips,
            "podIP": node.ipv4.to_string(),
            "podIPs": ips,
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        });
        if self.last.as_ref() == Some(&status) {
            return;
        }
        match api
            .patch_status(
                &ctx.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => self.last = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => self.last = Some(status),
            Err(e) => tracing::warn!(error = %e, "patching pod status (will retry)"),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Container supervision
// ------------------------------------------------------------------------------------------

fn signal_group(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the group.
    unsafe {
        libc::kill(-pid, sig);
    }
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

/// A started process: its pid and a handle resolving to its exit status (reaped).
struct Running {
    pid: i32,
    exit: JoinHandle<std::io::Result<std::process::ExitStatus>>,
}

fn spawn_process(ctx: &PodCtx, idx: usize, launch: &Launch) -> anyhow::Result<Running> {
    let c = &ctx.spec_containers()[idx];
    let log = log_path(&ctx.shared.config.workdir, &ctx.ns, &ctx.name, &c.name);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    {
        use std::io::Write as _;
        writeln!(
            file,
            "{LOG_HEADER} pod {}/{} uid {} container {} exe {} args {:?}",
            ctx.ns,
            ctx.name,
            ctx.uid,
            c.name,
            launch.exe.display(),
            launch.argv
        )?;
    }
    std::fs::create_dir_all(&launch.cwd)?;
    let mut cmd = Command::new(&launch.exe);
    {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
    }
    cmd.args(&launch.argv)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.cwd)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut child = crate::k8s::spawn_tied(cmd)
        .with_context(|| format!("starting {}", launch.exe.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    let id = ctx.shared.proc_seq.fetch_add(1, Ordering::Relaxed);
    let procs = ctx.shared.procs.clone();
    lock(&procs).insert(
        id,
        ProcEntry {
            pid,
            namespace: ctx.ns.clone(),
            pod: ctx.name.clone(),
            container: c.name.clone(),
        },
    );
    if ctx.shared.cancel.is_cancelled() {
        // The agent stopped while we were spawning: never leave this one behind.
        signal_group(pid, libc::SIGKILL);
    }
    // The blocking thread reaps the child and then forgets it, so Drop can wait on `procs`.
    let exit = tokio::task::spawn_blocking(move || {
        let status = child.wait();
        lock(&procs).remove(&id);
        status
    });
    Ok(Running { pid, exit })
}

/// Runs container `idx`: start, watch, probe, restart with backoff (`restartPolicy: Always`,
/// the only one accepted), stop on `stop`.
async fn supervise(ctx: Arc<PodCtx>, idx: usize, stop: CancellationToken) {
    let c = ctx.spec_containers()[idx].clone();
    let mut backoff = ctx.shared.config.restart_backoff;
    let mut first = true;
    loop {
        // The agent's own token too: after `Drop` the worker is gone but this task may not be.
        if stop.is_cancelled() || ctx.shared.cancel.is_cancelled() {
            return;
        }
        if !first {
            ctx.update(idx, |s| s.restart_count += 1);
        }
        first = false;
        let launch = ctx.launch(idx);
        let mut running = match spawn_process(&ctx, idx, &launch) {
            Ok(r) => r,
            Err(e) => {
                let (reason, message) = ("RunContainerError", format!("{e:#}"));
                tracing::warn!(container = %c.name, reason, %message, "container not started");
                ctx.update(idx, |s| {
                    s.state = json!({"waiting": {"reason": reason, "message": message}});
                    s.started = false;
                    s.ready = false;
                });
                if sleep_or_stop(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(ctx.shared.config.max_restart_backoff);
                continue;
            }
        };
        let started_at = now_time();
        let started_instant = Instant::now();
        tracing::info!(container = %c.name, pid = running.pid, "container started");
        ctx.update(idx, |s| {
            s.state = json!({"running": {"startedAt": started_at}});
            s.started = true;
            s.ever_started = true;
            s.ready = c.readiness_probe.is_none();
            s.container_id = Some(format!("kubederp-node-agent://{}", running.pid));
        });
        let probes_stop = stop.child_token();
        let probes = tokio::spawn(run_readiness_probe(ctx.clone(), idx, probes_stop.clone()));
        let exited = tokio::select! {
            r = &mut running.exit => Some(r.unwrap_or_else(|e| Err(std::io::Error::other(e)))),
            () = stop.cancelled() => None,
        };
        probes_stop.cancel();
        let _ = probes.await;
        let status = match exited {
            Some(s) => s,
            None => {
                let grace = *lock(&ctx.stop_grace);
                terminate(&mut running, grace).await
            }
        };
        let (code, signal) = match &status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt as _;
                (
                    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
                    st.signal(),
                )
            }
            Err(_) => (-1, None),
        };
        let reason = if code == 0 { "Completed" } else { "Error" };
        let mut terminated = json!({
            "exitCode": code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": now_time(),
            "containerID": format!("kubederp-node-agent://{}", running.pid),
        });
        if let Some(sig) = signal {
            terminated["signal"] = json!(sig);
        }
        tracing::info!(container = %c.name, exit_code = code, "container exited");
        let stopping = stop.is_cancelled() || ctx.shared.cancel.is_cancelled();
        ctx.update(idx, |s| {
            s.started = false;
            s.ready = false;
            if stopping {
                s.state = json!({"terminated": terminated});
            } else {
                s.last_state = json!({"terminated": terminated});
                s.state = json!({"waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container", backoff.as_secs_f32()),
                }});
            }
        });
        if stopping {
            return;
        }
        // Kubelet resets the backoff after a container ran for a while (10 min there).
        if started_instant.elapsed() > Duration::from_secs(60) {
            backoff = ctx.shared.config.restart_backoff;
        }
        if sleep_or_stop(&stop, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(ctx.shared.config.max_restart_backoff);
    }
}

/// Sleeps; true when `stop` fired first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// SIGTERM the process group, SIGKILL after `grace`, and reap.
async fn terminate(
    running: &mut Running,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(running.pid, libc::SIGTERM);
    match tokio::time::timeout(grace, &mut running.exit).await {
        Ok(r) => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        Err(_) => {
            signal_group(running.pid, libc::SIGKILL);
            (&mut running.exit)
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Probes
// ------------------------------------------------------------------------------------------

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|s| u64::try_from(s).ok()).unwrap_or(default))
}

/// Runs the container's readiness probe (if any) until `stop`, updating its `ready` state.
async fn run_readiness_probe(ctx: Arc<PodCtx>, idx: usize, stop: CancellationToken) {
    let c = ctx.spec_containers()[idx].clone();
    let Some(p) = c.readiness_probe.clone() else {
        return;
    };
    probe_loop(&ctx, &c, &p, &stop, |ok| {
        ctx.update(idx, |s| {
            if s.ready != ok {
                tracing::info!(container = %s_name(&ctx, idx), ready = ok, "readiness changed");
            }
            s.ready = ok;
        });
    })
    .await;
}

fn s_name(ctx: &PodCtx, idx: usize) -> String {
    ctx.spec_containers()
        .get(idx)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

/// Runs a probe every period until `stop`; `on_state(ok)` is called when the thresholded result
/// is known.
async fn probe_loop(
    ctx: &PodCtx,
    c: &Container,
    p: &Probe,
    stop: &CancellationToken,
    mut on_state: impl FnMut(bool),
) {
    let period = secs(p.period_seconds, 10).max(Duration::from_millis(100));
    let timeout = secs(p.timeout_seconds, 1);
    let success_threshold = p.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = p.failure_threshold.unwrap_or(3).max(1);
    if sleep_or_stop(stop, secs(p.initial_delay_seconds, 0)).await {
        return;
    }
    let (mut successes, mut failures) = (0, 0);
    loop {
        let result = run_probe(ctx, p, timeout).await;
        match result {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if successes >= success_threshold {
                    on_state(true);
                }
            }
            Err(e) => {
                tracing::debug!(container = %c.name, error = %e, "probe failed");
                successes = 0;
                failures += 1;
                if failures >= failure_threshold {
                    on_state(false);
                }
            }
        }
        if sleep_or_stop(stop, period).await {
            return;
        }
    }
}

/// One probe run against the node IP (the only host a Pod with host networking has here).
async fn run_probe(ctx: &PodCtx, p: &Probe, timeout: Duration) -> Result<(), String> {
    let ip = IpAddr::V4(ctx.node.ipv4);
    let fut = async {
        if let Some(h) = &p.http_get {
            let port = resolve_port(&h.port)?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            return http_probe(SocketAddr::new(ip, port), &path).await;
        }
        if let Some(t) = &p.tcp_socket {
            let port = resolve_port(&t.port)?;
            return tokio::net::TcpStream::connect(SocketAddr::new(ip, port))
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect {ip}:{port}: {e}"));
        }
        Err("no probe handler".to_owned())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("timed out after {}s", timeout.as_secs_f32()))?
}

async fn http_probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response {head:?}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |n: &str| match n {
            "A" => Some("x".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(expand_vars("$(A)", vars), "x");
        assert_eq!(expand_vars("pre-$(A)-post", vars), "pre-x-post");
        assert_eq!(expand_vars("$$(A)", vars), "$(A)");
        assert_eq!(expand_vars("$$$(A)", vars), "$x");
        assert_eq!(expand_vars("$(B)", vars), "$(B)");
        assert_eq!(expand_vars("$(A", vars), "$(A");
        assert_eq!(expand_vars("a$", vars), "a$");
        assert_eq!(expand_vars("$x$(EMPTY)y", vars), "$xy");
        assert_eq!(expand_vars("é$(A)é", vars), "éxé");
        assert_eq!(expand_vars("$é", vars), "$é");
    }

    #[test]
    fn mount_paths_are_rewritten_only_as_whole_path_prefixes() {
        let mounts = vec![
            ("/var/lib/derper".to_owned(), PathBuf::from("/w/state")),
            ("/certs".to_owned(), PathBuf::from("/w/certs")),
        ];
        let r = |s: &str| rewrite_mount_paths(s, &mounts);
        assert_eq!(r("--certdir=/certs"), "--certdir=/w/certs");
        assert_eq!(r("/certs/a.crt"), "/w/certs/a.crt");
        assert_eq!(r("-c=/var/lib/derper/derper.key"), "-c=/w/state/derper.key");
        assert_eq!(r("/certsx"), "/certsx");
        assert_eq!(r("/x/certs"), "/x/certs");
        assert_eq!(r("a:/certs,/certs"), "a:/w/certs,/w/certs");
        assert_eq!(r("--flag /certs"), "--flag /w/certs");
    }

    #[test]
    fn atomic_writer_swaps_data_and_removes_stale_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Files::new();
        files.insert("a".into(), (b"1".to_vec(), 0o600));
        files.insert("sub/b".into(), (b"2".to_vec(), 0o644));
        write_atomic(dir.path(), &files).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read(dir.path().join("sub/b")).unwrap(), b"2");
        let mode = std::fs::metadata(dir.path().join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        files.remove("sub/b");
        files.insert("a".into(), (b"3".to_vec(), 0o600));
        write_atomic(dir.path(), &files).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(!dir.path().join("sub").exists());
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 3, "a, ..data and one ..<stamp>: {entries:?}");
    }

    #[test]
    fn wildcard_listen_arguments_are_bound_to_the_node_ip() {
        let ip = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(bind_wildcard_listen(":443", ip), "127.0.0.2:443");
        assert_eq!(
            bind_wildcard_listen("--addr=:443", ip),
            "--addr=127.0.0.2:443"
        );
        assert_eq!(bind_wildcard_listen("0.0.0.0:80", ip), "127.0.0.2:80");
        assert_eq!(bind_wildcard_listen("[::]:80", ip), "127.0.0.2:80");
        assert_eq!(bind_wildcard_listen("127.0.0.9:443", ip), "127.0.0.9:443");
        assert_eq!(bind_wildcard_listen("--hostname=x", ip), "--hostname=x");
        assert_eq!(bind_wildcard_listen(":abc", ip), ":abc");
    }

    #[test]
    fn image_segments() {
        assert_eq!(image_last_segment("ghcr.io/kubederp/derper:v1"), "derper");
        assert_eq!(image_last_segment("derper"), "derper");
        assert_eq!(image_last_segment("localhost:5000/a/b@sha256:abc"), "b");
    }
}
