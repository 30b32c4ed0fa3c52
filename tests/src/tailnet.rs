//! A real tailnet on loopback: Tailscale's own test control server plus two real
//! `tailscaled` processes (userspace networking), for proving `--verify-clients` against a
//! real LocalAPI rather than a stand-in.
//!
//! Owns: locating (or building, through `tests/interop/tailnet/build.sh`) `tailscaled`,
//! `tailscale` and `tailnet-control` from tailscale.com v1.104.7; starting the control server
//! (`tailnet-control serve`, `tailscale.com/tstest/integration/testcontrol` on 127.0.0.1 with
//! an empty DERP map), starting each node and bringing it up against that control URL,
//! waiting until every node is `Running` and sees every other node as a peer; reading each
//! node's public key (`tailscale status --json`) and private node key (from its state file,
//! through `tailnet-control privkey`).
//!
//! Nothing leaves the machine: every URL the nodes are given is `http://127.0.0.1:…`; log
//! upload is off (`--no-logs-no-support`, `TS_NO_LOGS_NO_SUPPORT`), the port mapper is off,
//! direct UDP paths are off, and `HTTP(S)_PROXY` point at the control server's traffic trap
//! so that any other URL a node might fetch is refused and counted
//! ([`Tailnet::traffic_trapped`]).
//!
//! Does not own: any assertion about admission (`tests/tests/verify_clients.rs`).
//!
//! Nothing here skips: a binary that cannot be found or built is a loud panic. Every process
//! is killed (by its own pid) when the [`Tailnet`] is dropped; the control server also exits
//! when its stdin closes.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use derper::key::{NodePrivateKey, NodePublicKey};
use serde_json::Value;

/// Environment variable naming a directory with prebuilt tailnet binaries (what
/// `tests/interop/tailnet/build.sh` prints); when unset the script is run once per process.
pub const TAILNET_BIN_DIR_ENV: &str = "KUBEDERP_TAILNET_BIN_DIR";

/// The tailscale.com release the kit is built from.
pub const TS_VERSION: &str = "v1.104.7";

/// Bound on bringing the whole tailnet up (control + two nodes Running and seeing each
/// other). Typically 2–4 s on loopback.
pub const START_TIMEOUT: Duration = Duration::from_secs(40);

/// Blocking sleep for this module's synchronous polling loops, which run on plain test
/// threads (never inside a tokio runtime).
#[allow(clippy::disallowed_methods)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Directory holding `tailscaled`, `tailscale` and `tailnet-control`:
/// `$KUBEDERP_TAILNET_BIN_DIR`, or the last stdout line of `tests/interop/tailnet/build.sh`
/// (run once per process). Panics with the build log when the build fails.
pub fn tailnet_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        crate::interop::go_peer_dir(TAILNET_BIN_DIR_ENV, "tests/interop/tailnet/build.sh")
    })
}

fn bin(name: &str) -> PathBuf {
    let path = tailnet_bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} missing (rebuild with tests/interop/tailnet/build.sh)",
        path.display()
    );
    path
}

/// A child process killed (by its pid) on drop, with its output in a log file.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}); log:\n{}", self.name, self.log());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One real `tailscaled` in the tailnet.
#[derive(Debug)]
pub struct Node {
    /// Hostname given to `tailscale up`.
    pub name: String,
    /// Its LocalAPI socket (`--socket`).
    pub socket: PathBuf,
    /// Its `--statedir`.
    pub state_dir: PathBuf,
    /// Its node public key (`tailscale status --json` → `Self.PublicKey`).
    pub node_key: NodePublicKey,
    daemon: Proc,
}

impl Node {
    /// Everything this tailscaled logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// Kills this node's tailscaled (its LocalAPI socket stops answering).
    pub fn kill_daemon(&mut self) {
        let _ = self.daemon.child.kill();
        let _ = self.daemon.child.wait();
    }

    /// Runs `tailscale --socket=<socket> ARGS` (bounded by 30 s).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run_cli(&self.socket, args, Duration::from_secs(30))
    }

    /// A `tailscale --socket=<socket>` command (log upload off) for callers that need their
    /// own stdin, environment or bound, such as `tailscale nc`.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("tailscale"));
        cmd.arg(format!("--socket={}", self.socket.display()))
            .env("TS_NO_LOGS_NO_SUPPORT", "true");
        cmd
    }

    /// `tailscale status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        status_json(&self.socket)
    }

    /// The node keys of this node's peers, as its tailscaled reports them
    /// (`Peer[].PublicKey`).
    pub fn peer_keys(&self) -> Result<Vec<NodePublicKey>> {
        peer_keys(&self.status()?)
    }

    /// This node's private node key, read from its state file (`tailscaled.state`, current
    /// profile's `Persist.PrivateNodeKey`), so a test can prove possession of a tailnet
    /// member's key as tailscaled itself would.
    pub fn private_key(&self) -> Result<NodePrivateKey> {
        let state = self.state_dir.join("tailscaled.state");
        let out = Command::new(bin("tailnet-control"))
            .arg("privkey")
            .arg(&state)
            .stdin(Stdio::null())
            .output()
            .context("running tailnet-control privkey")?;
        if !out.status.success() {
            bail!(
                "tailnet-control privkey {}: {}",
                state.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let key = NodePrivateKey::parse_privkey(text.trim())
            .map_err(|e| anyhow!("parsing private key from {}: {e}", state.display()))?;
        if key.public() != self.node_key {
            bail!(
                "state file key {} does not match status key {}",
                key.public(),
                self.node_key
            );
        }
        Ok(key)
    }
}

/// How the nodes of a [`Tailnet`] join. The default joins Tailscale's test control server;
/// another login server (headscale, `tests/tests/headscale.rs`) keeps the same isolation: the
/// test control server still runs as the traffic trap every non-loopback URL is proxied to.
#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    /// `--login-server` for `tailscale up`; `None` = the test control server.
    pub login_server: Option<String>,
    /// `--auth-key` for `tailscale up` (for example a headscale pre-auth key).
    pub auth_key: Option<String>,
    /// Extra environment for every `tailscaled` (for example `TS_DEBUG_*` knobs).
    pub env: Vec<(String, String)>,
    /// Run each `tailscaled` in a private mount namespace where `/etc/resolv.conf` names
    /// 127.0.0.1 only, so a name it looks up (`tailscale debug derp` resolves the map's
    /// `"IPv6": "none"` as a host name) fails on loopback instead of leaving the machine.
    pub loopback_dns: bool,
}

/// Control server + nodes in one temporary directory; everything is killed on drop.
#[derive(Debug)]
pub struct Tailnet {
    /// `http://127.0.0.1:PORT` of the test control server.
    pub control_url: String,
    /// The nodes, in the order of the names given to [`Tailnet::start`].
    pub nodes: Vec<Node>,
    control: Proc,
    // Kept open: the control server exits when it closes (after `control` is killed anyway).
    _control_stdin: ChildStdin,
    /// Removed after the processes (fields drop in declaration order).
    pub dir: tempfile::TempDir,
}

impl Tailnet {
    /// Starts the control server and one tailscaled per name, brings each up, and waits
    /// (at most [`START_TIMEOUT`]) until all are `Running` and each sees all others as peers.
    pub fn start(names: &[&str]) -> Result<Self> {
        Self::start_with(names, &JoinOptions::default())
    }

    /// [`Tailnet::start`] with the nodes joining as `join` says.
    pub fn start_with(names: &[&str], join: &JoinOptions) -> Result<Self> {
        let deadline = Instant::now() + START_TIMEOUT;
        // Short path: Unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("kd-tailnet-")
            .tempdir_in("/tmp")?;
        let (control, control_stdin, control_url) = start_control(dir.path(), deadline)?;
        let mut tailnet = Self {
            control_url,
            nodes: Vec::new(),
            control,
            _control_stdin: control_stdin,
            dir,
        };
        let mut daemons = Vec::new();
        for name in names {
            daemons.push(tailnet.start_daemon(name, join)?);
        }
        let login = join
            .login_server
            .clone()
            .unwrap_or_else(|| tailnet.control_url.clone());
        for (name, mut daemon, socket, state_dir) in daemons {
            tailnet.wait_socket(&mut daemon, &socket, deadline)?;
            let mut args = vec![
                "up".to_owned(),
                format!("--login-server={login}"),
                format!("--hostname={name}"),
                "--accept-dns=false".to_owned(),
                "--accept-routes=false".to_owned(),
                "--timeout=30s".to_owned(),
            ];
            if let Some(key) = &join.auth_key {
                args.push(format!("--auth-key={key}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_cli(
                &socket,
                &args,
                deadline.saturating_duration_since(Instant::now()),
            )?;
            if !out.status.success() {
                bail!(
                    "tailscale up on {name} failed: {}{}\n--- tailscaled log ---\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    daemon.log()
                );
            }
            tailnet.nodes.push(Node {
                name: (*name).to_owned(),
                socket,
                state_dir,
                node_key: NodePublicKey::default(),
                daemon,
            });
        }
        tailnet.wait_meshed(deadline)?;
        Ok(tailnet)
    }

    fn start_daemon(
        &self,
        name: &str,
        join: &JoinOptions,
    ) -> Result<(String, Proc, PathBuf, PathBuf)> {
        let state_dir = self.dir.path().join(name);
        fs::create_dir_all(&state_dir)?;
        let socket = state_dir.join("tailscaled.sock");
        let log = state_dir.join("tailscaled.log");
        let file = fs::File::create(&log)?;
        let url = &self.control_url;
        let mut cmd = if join.loopback_dns {
            let resolv = state_dir.join("resolv.conf");
            fs::write(&resolv, "nameserver 127.0.0.1\n")?;
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
                .arg(&resolv)
                .arg(bin("tailscaled"));
            cmd
        } else {
            Command::new(bin("tailscaled"))
        };
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &state_dir)
            // Log upload off: the flag and the env knob (both, belt and braces); and a log
            // target on loopback should anything still try.
            .env("TS_NO_LOGS_NO_SUPPORT", "true")
            .env("TS_LOG_TARGET", url)
            .env("TS_LOGS_DIR", &state_dir)
            // Any HTTP(S) fetch to a non-loopback host goes to the control server's traffic
            // trap (Go never proxies loopback, so the control URL itself is reached directly).
            .env("HTTP_PROXY", url)
            .env("HTTPS_PROXY", url)
            .env("http_proxy", url)
            .env("https_proxy", url)
            // As Tailscale's own integration tests run tailscaled against testcontrol
            // (tstest/integration/integration.go daemonEnv).
            .env("TS_NETCHECK_GENERATE_204_URL", format!("{url}/generate_204"))
            .env("TS_ASSUME_NETWORK_UP_FOR_TEST", "1")
            .env("TS_PANIC_IF_HIT_MAIN_CONTROL", "1")
            .env("TS_DISABLE_PORTMAPPER", "1")
            // The nodes never need to reach each other: no disco pings to interface
            // addresses.
            .env("TS_DEBUG_NEVER_DIRECT_UDP", "1")
            .envs(join.env.iter().map(|(k, v)| (k, v)))
            .arg("--tun=userspace-networking")
            .arg(format!("--statedir={}", state_dir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg("--port=0")
            .arg("--no-logs-no-support")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = crate::k8s::spawn_tied(cmd).context("spawning tailscaled")?;
        let daemon = Proc {
            name: format!("tailscaled {name}"),
            child,
            log,
        };
        Ok((name.to_owned(), daemon, socket, state_dir))
    }

    fn wait_socket(&mut self, daemon: &mut Proc, socket: &Path, deadline: Instant) -> Result<()> {
        loop {
            daemon.check_alive()?;
            self.control.check_alive()?;
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not open {} in time; log:\n{}",
                    daemon.name,
                    socket.display(),
                    daemon.log()
                );
            }
            pause(Duration::from_millis(50));
        }
    }

    /// Waits until every node is Running and lists every other node as a peer; fills in
    /// the node keys.
    fn wait_meshed(&mut self, deadline: Instant) -> Result<()> {
        let want = self.nodes.len().saturating_sub(1);
        loop {
            let mut done = true;
            let mut last = String::new();
            for node in &mut self.nodes {
                node.daemon.check_alive()?;
                let st = status_json(&node.socket)?;
                let state = st["BackendState"].as_str().unwrap_or_default();
                let key = st["Self"]["PublicKey"].as_str().unwrap_or_default();
                let peers = peer_keys(&st)?.len();
                if state != "Running" || key.is_empty() || peers < want {
                    done = false;
                    last = format!("{}: state {state:?}, {peers}/{want} peers", node.name);
                    continue;
                }
                node.node_key = NodePublicKey::parse_nodekey(key)
                    .map_err(|e| anyhow!("{}: bad Self.PublicKey {key:?}: {e}", node.name))?;
            }
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "tailnet not up within {START_TIMEOUT:?} ({last}); control log:\n{}",
                    self.control.log()
                );
            }
            pause(Duration::from_millis(100));
        }
    }

    /// The control server's view: `NodeKeys` seen in map requests, `NumNodes`,
    /// `TrafficTrapped`.
    pub fn control_state(&self) -> Result<Value> {
        let hostport = self
            .control_url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("control url {}", self.control_url))?;
        let mut s = TcpStream::connect(hostport)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /kubederp/nodes HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .ok_or_else(|| anyhow!("bad response from control: {resp:?}"))?;
        serde_json::from_str(body).context("control state JSON")
    }

    /// How many requests for a non-loopback destination the nodes made (all refused by the
    /// trap). Must be 0 for a test to claim nothing tried to leave the machine.
    pub fn traffic_trapped(&self) -> Result<u64> {
        self.control_state()?["TrafficTrapped"]
            .as_u64()
            .ok_or_else(|| anyhow!("no TrafficTrapped in control state"))
    }

    /// The control server's log.
    pub fn control_log(&self) -> String {
        self.control.log()
    }
}

fn start_control(dir: &Path, deadline: Instant) -> Result<(Proc, ChildStdin, String)> {
    let log = dir.join("control.log");
    let file = fs::File::create(&log)?;
    let mut cmd = Command::new(bin("tailnet-control"));
    cmd.arg("serve")
        .arg("--addr=127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(file);
    let mut child = crate::k8s::spawn_tied(cmd).context("spawning tailnet-control")?;
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut control = Proc {
        name: "tailnet-control".into(),
        child,
        log,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .map_err(|_| anyhow!("tailnet-control printed no URL; log:\n{}", control.log()))?;
    control.check_alive()?;
    let url = line
        .trim()
        .strip_prefix("control-url ")
        .filter(|u| u.starts_with("http://127.0.0.1:"))
        .ok_or_else(|| anyhow!("unexpected tailnet-control line {line:?}"))?
        .to_owned();
    Ok((control, stdin, url))
}

fn run_cli(socket: &Path, args: &[&str], limit: Duration) -> Result<Output> {
    // Output goes to anonymous files, so a chatty command can never block on a full pipe
    // while we poll for its exit.
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let mut child = Command::new(bin("tailscale"))
        .arg(format!("--socket={}", socket.display()))
        .args(args)
        .env("TS_NO_LOGS_NO_SUPPORT", "true")
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()
        .context("spawning tailscale")?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        pause(Duration::from_millis(50));
    };
    let read = |f: &mut fs::File| -> Result<Vec<u8>> {
        use std::io::Seek as _;
        let mut v = Vec::new();
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_to_end(&mut v)?;
        Ok(v)
    };
    let (stdout, stderr) = (read(&mut stdout)?, read(&mut stderr)?);
    let Some(status) = status else {
        bail!(
            "tailscale {args:?} did not finish within {limit:?}: {}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn status_json(socket: &Path) -> Result<Value> {
    let out = run_cli(socket, &["status", "--json"], Duration::from_secs(10))?;
    // `status --json` exits 0 in every backend state; a non-JSON answer is an error.
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "tailscale status --json: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn peer_keys(status: &Value) -> Result<Vec<NodePublicKey>> {
    let Some(peers) = status["Peer"].as_object() else {
        return Ok(Vec::new());
    };
    peers
        .values()
        .map(|p| {
            let k = p["PublicKey"].as_str().unwrap_or_default();
            NodePublicKey::parse_nodekey(k).map_err(|e| anyhow!("bad peer key {k:?}: {e}"))
        })
        .collect()
}
