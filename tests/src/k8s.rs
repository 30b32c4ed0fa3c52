//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager
//! (garbage-collector and namespace controllers) on random loopback ports, as described in
//! `shared/docs/k8s-testing.md` §5.
//!
//! The binaries are built from the Go module proxy by `tools/k8s/build.sh` into a cache outside
//! the repository; this module runs that script when `K8S_TEST_BIN_DIR` is not set, so a test
//! never skips for lack of binaries: it either gets a real apiserver or fails saying why.
//!
//! Processes are started from one long-lived spawner thread with `PR_SET_PDEATHSIG`, so they die
//! with the test binary even when a test panics or the binary is killed; private control planes
//! ([`ControlPlane::start`]) are also stopped on drop. Not here: anything operator-specific.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

/// Environment variable naming a directory that holds `etcd`, `kube-apiserver`,
/// `kube-controller-manager`, `kubectl` and `helm`. When unset, `tools/k8s/build.sh` is run.
pub const BIN_DIR_ENV: &str = "K8S_TEST_BIN_DIR";

/// How long a control plane may take to become ready (measured: 3–5 s; generous for CI load).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Field manager used by the harness for objects it applies itself.
const FIELD_MANAGER: &str = "derp-tests";

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// Directory with the control-plane binaries, building them on first use if needed.
pub fn k8s_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = workspace_root().join("tools/k8s/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed ({}); it builds kube-apiserver/etcd from the Go module proxy — \
                 see its output above, or set {BIN_DIR_ENV} to a directory with the binaries",
                script.display(),
                out.status
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    })
}

/// A process started by the harness, with the log file its output goes to.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    args: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early with {status}; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            park(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sleeps the current (non-async) thread; the harness's own threads only.
fn park(d: Duration) {
    std::thread::park_timeout(d);
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from the harness's long-lived spawner thread with `PR_SET_PDEATHSIG`, so the
/// child is killed when the test process ends (the death signal follows the spawning *thread*,
/// which is why a dedicated thread that never exits does the spawning).
pub(crate) fn spawn_tied(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("k8s-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(spawn_with_pdeathsig(&mut cmd));
                }
            })
            .expect("spawn the harness spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .expect("spawner lock")
        .send((cmd, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner replies")
}

fn spawn_with_pdeathsig(cmd: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: the closure only calls async-signal-safe functions (setpgid, prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            // Own process group: a Ctrl-C in the terminal reaches only the harness, which then
            // stops the control plane in order (apiserver before etcd).
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A free TCP port on 127.0.0.1 (bound and released; the small race is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Root for control-plane scratch directories; `/dev/shm` when present (etcd without fsync).
fn scratch_root() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join("kubederp-tests")
}

/// Removes scratch directories left by test processes that no longer exist.
fn clean_stale_scratch(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// etcd + kube-apiserver + kube-controller-manager on random loopback ports.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    ca_file: PathBuf,
    bin_dir: PathBuf,
    server: String,
    procs: Mutex<Vec<Proc>>,
}

impl ControlPlane {
    /// One control plane per test binary, started on first use and killed when the process
    /// exits. Tests share it and isolate themselves by namespace and unique names.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            Self::start().unwrap_or_else(|e| panic!("starting the shared control plane: {e:#}"))
        })
    }

    /// Starts a private control plane; dropping it stops every process and removes its files.
    pub fn start() -> anyhow::Result<ControlPlane> {
        // Readiness checks use a kube client on a runtime of their own, so this works from
        // inside or outside an async test.
        std::thread::spawn(Self::start_blocking)
            .join()
            .map_err(|_| anyhow::anyhow!("control-plane start thread panicked"))?
    }

    fn start_blocking() -> anyhow::Result<ControlPlane> {
        let started = Instant::now();
        let bin_dir = k8s_bin_dir().to_path_buf();
        let root = scratch_root();
        std::fs::create_dir_all(&root)?;
        clean_stale_scratch(&root);
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs"))?;

        let etcd_port = free_port();
        let peer_port = free_port();
        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");

        // Credentials: a static admin token (system:masters) and a service-account key.
        let token = format!("{:032x}", rand::random::<u128>());
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},kubederp-admin,kubederp-admin-uid,\"system:masters\"\n"),
        )?;
        let sa_key = rcgen::KeyPair::generate().context("generating the service-account key")?;
        std::fs::write(dir.join("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa_key.public_key_pem())?;

        let mut cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            // the apiserver writes its self-signed serving cert (its own CA) on start
            ca_file: dir.join("certs/apiserver.crt"),
            dir: dir.clone(),
            bin_dir: bin_dir.clone(),
            server: server.clone(),
            procs: Mutex::new(Vec::new()),
        };

        cp.spawn(
            "etcd",
            &[
                "--data-dir",
                &dir.join("etcd").to_string_lossy(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{etcd_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )?;
        cp.wait_ready("etcd", || http_get_ok(etcd_port, "/health"))?;

        let d = dir.to_string_lossy().into_owned();
        cp.spawn(
            "kube-apiserver",
            &[
                &format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={d}/certs"),
                &format!("--token-auth-file={d}/tokens.csv"),
                "--authorization-mode=RBAC",
                &format!("--service-account-issuer={server}"),
                &format!("--service-account-key-file={d}/sa.pub"),
                &format!("--service-account-signing-key-file={d}/sa.key"),
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",
            ],
        )?;
        let ca = cp.ca_file.clone();
        cp.wait_ready("kube-apiserver serving certificate", || ca.exists())?;
        std::fs::write(
            &cp.kubeconfig,
            kubeconfig_yaml(&server, Some(&ca), Some(&token)),
        )?;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let kubeconfig = cp.kubeconfig.clone();
        cp.wait_ready("kube-apiserver /readyz", || {
            rt.block_on(readyz(&kubeconfig))
        })?;

        let kc = cp.kubeconfig.to_string_lossy().into_owned();
        cp.spawn(
            "kube-controller-manager",
            &[
                &format!("--kubeconfig={kc}"),
                &format!("--authentication-kubeconfig={kc}"),
                &format!("--authorization-kubeconfig={kc}"),
                "--leader-elect=false",
                "--controllers=garbagecollector,namespace",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ],
        )?;
        tracing::info!(
            server = %server,
            dir = %dir.display(),
            elapsed_s = started.elapsed().as_secs_f32(),
            "control plane ready"
        );
        Ok(cp)
    }

    fn spawn(&mut self, name: &'static str, args: &[&str]) -> anyhow::Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = spawn_tied(cmd)
            .with_context(|| format!("starting {}", self.bin_dir.join(name).display()))?;
        self.procs.get_mut().expect("procs lock").push(Proc {
            name,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child,
            log,
        });
        Ok(())
    }

    fn wait_ready(&mut self, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready() {
                return Ok(());
            }
            for p in self.procs.get_mut().expect("procs lock").iter_mut() {
                p.check_alive()?;
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = self
                    .procs
                    .get_mut()
                    .expect("procs lock")
                    .iter()
                    .map(|p| format!("--- {} ---\n{}", p.name, p.tail()))
                    .collect();
                bail!(
                    "timed out after {}s waiting for {what}\n{}",
                    READY_TIMEOUT.as_secs(),
                    tails.join("\n")
                );
            }
            park(Duration::from_millis(100));
        }
    }

    /// Path of an admin kubeconfig for this control plane.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA file that verifies the apiserver's serving certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// The apiserver URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Directory with `kubectl`, `helm`, `kube-apiserver`, `etcd`, … .
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A new admin client bound to the current tokio runtime.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("client for {}: {e:#}", self.kubeconfig.display()))
    }

    /// A `kubectl` command already pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// Stops the apiserver only (etcd and data stay), for apiserver-restart tests; see
    /// [`ControlPlane::restart_apiserver`].
    pub fn stop_apiserver(&self) {
        let mut procs = self.procs.lock().expect("procs lock");
        for p in procs.iter_mut().filter(|p| p.name == "kube-apiserver") {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts the apiserver again with the same arguments and waits until it is ready.
    pub fn restart_apiserver(&self) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().expect("procs lock");
        let p = procs
            .iter_mut()
            .find(|p| p.name == "kube-apiserver")
            .context("no apiserver")?;
        p.stop(Duration::from_secs(10));
        let file = std::fs::OpenOptions::new().append(true).open(&p.log)?;
        let mut cmd = Command::new(self.bin_dir.join("kube-apiserver"));
        cmd.args(&p.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        p.child = spawn_tied(cmd)?;
        drop(procs);
        let kubeconfig = self.kubeconfig.clone();
        std::thread::spawn(move || wait_apiserver_ready(&kubeconfig))
            .join()
            .map_err(|_| anyhow::anyhow!("restart thread panicked"))?
    }
}

/// Polls `/readyz` with a client on a private runtime until it answers (call off any runtime).
fn wait_apiserver_ready(kubeconfig: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if rt.block_on(readyz(kubeconfig)) {
            return Ok(());
        }
        park(Duration::from_millis(100));
    }
    bail!(
        "kube-apiserver not ready after {}s",
        READY_TIMEOUT.as_secs()
    )
}

async fn readyz(kubeconfig: &Path) -> bool {
    let Ok(client) = client_from(kubeconfig).await else {
        return false;
    };
    let req = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("static request");
    client.request_text(req).await.is_ok()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let procs = self.procs.get_mut().expect("procs lock");
        // Order matters: the apiserver hangs on shutdown if etcd is gone first.
        for p in procs.iter_mut().rev() {
            p.stop(Duration::from_secs(10));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A kubeconfig for `server`, verified with `ca` when given (none for plain HTTP), and
/// authenticating with the bearer `token` when given.
pub fn kubeconfig_yaml(server: &str, ca: Option<&Path>, token: Option<&str>) -> String {
    let cluster = match ca {
        Some(ca) => serde_json::json!({"server": server, "certificate-authority": ca}),
        None => serde_json::json!({"server": server}),
    };
    let user = match token {
        Some(t) => serde_json::json!({"token": t}),
        None => serde_json::json!({}),
    };
    serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "kubederp-test", "cluster": cluster}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "kubederp-test",
                      "context": {"cluster": "kubederp-test", "user": "user"}}],
        "current-context": "kubederp-test",
    }))
    .expect("kubeconfig yaml")
}

/// A client for the given kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// A plain `GET` over HTTP/1.0 on loopback; true on a 200 answer.
fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

/// A namespace for one test, with a random suffix; deleted (without waiting) on drop.
#[derive(Debug)]
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>` in the shared control plane.
    pub async fn create(client: &kube::Client, prefix: &str) -> TestNamespace {
        let cp = ControlPlane::shared();
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubederp.io/test": "true"}},
        }))
        .expect("static namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        TestNamespace {
            name,
            kubeconfig: cp.kubeconfig.clone(),
            kubectl: cp.bin_dir.join("kubectl"),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A random 6-hex-digit tag for the names and label values of one test's cluster-scoped
/// objects (Nodes, releases), so tests sharing a control plane never see each other's.
pub fn tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// The usual start of a test on the shared control plane: tracing to the test's output
/// (`RUST_LOG`, else `default_log`), the CRDs in `crds` installed, and a fresh namespace.
pub async fn setup_namespace(
    prefix: &str,
    crds: &Path,
    default_log: &str,
) -> (kube::Client, TestNamespace) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| default_log.to_owned()))
        .try_init();
    let client = ControlPlane::shared().client().await;
    install_crds(&client, crds)
        .await
        .unwrap_or_else(|e| panic!("installing the CRDs of {}: {e:#}", crds.display()));
    let ns = TestNamespace::create(&client, prefix).await;
    (client, ns)
}

/// Server-side applies every `*.yaml` CustomResourceDefinition in `dir` and waits until each
/// is `Established`.
pub async fn install_crds(client: &kube::Client, dir: &Path) -> anyhow::Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .with_context(|| format!("parsing {} as a CRD", path.display()))?;
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        api.patch(
            &name,
            &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying {}", path.display()))?;
        names.push(name);
    }
    for name in names {
        let api = api.clone();
        let established = wait_until(Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let crd = api.get(&name).await.ok()?;
                let conds = crd.status?.conditions?;
                conds
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
        if established.is_none() {
            bail!("CRD {name} not Established after 30s");
        }
    }
    Ok(())
}

/// Polls `f` every 100 ms until it returns `Some`, or `None` after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it returns `Some`; panics with `timed out after …s waiting for {what}`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_until(timeout, f).await {
        Some(v) => v,
        None => panic!("timed out after {}s waiting for {what}", timeout.as_secs()),
    }
}
