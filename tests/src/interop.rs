//! Interop harness: real Tailscale client code and upstream `derper` against our relay.
//!
//! Owns: locating (or building, through `tests/interop/build.sh`) the Go programs —
//! `derpinterop-<ver>` (the real `derphttp`/`netcheck`/`tailcfg` client code, see
//! `tests/interop/src/`) and upstream `derper-<ver>` — starting a relay process (ours or
//! upstream) in pinned self-signed mode on random loopback ports, reading the `DERPNode` line
//! it prints, writing derpMap files, and running `derpinterop` subcommands with a hard time
//! bound, parsing their JSON.
//!
//! Does not own: building our `derper` (that is [`crate::bins::workspace_bin`]) or any
//! assertion about the outcome — tests in `tests/tests/interop.rs` decide what must hold.
//!
//! Nothing here skips: a binary that cannot be found or built is a loud panic.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// Environment variable naming a directory with prebuilt interop binaries (what
/// `tests/interop/build.sh` prints); when unset the script is run once per test process.
pub const INTEROP_BIN_DIR_ENV: &str = "KUBEDERP_INTEROP_BIN_DIR";

/// The oldest Tailscale release we interoperate with (pinned `sha256-raw:` certs appeared in
/// v1.82.0; spec §2.4).
pub const TS_OLD: &str = "v1.82.5";
/// The newest Tailscale release at the time of writing.
pub const TS_NEW: &str = "v1.104.7";
/// Both client versions, oldest first.
pub const CLIENT_VERSIONS: [&str; 2] = [TS_OLD, TS_NEW];

/// Region ID used for test maps (900–999 are reserved for user-run DERPs, spec §9.2).
pub const REGION_ID: u32 = 900;

/// Blocking sleep for this module's synchronous polling loops. They run on plain test
/// threads (never inside a tokio runtime), which is why the workspace-wide ban on
/// `std::thread::sleep` does not apply here.
#[allow(clippy::disallowed_methods)]
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Directory holding `derpinterop-<ver>` and `derper-<ver>`: `$KUBEDERP_INTEROP_BIN_DIR`, or
/// the last stdout line of `tests/interop/build.sh` (run once per process). Panics with the
/// build log when the build fails.
pub fn interop_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| go_peer_dir(INTEROP_BIN_DIR_ENV, "tests/interop/build.sh"))
}

/// The directory of a Go-built test peer: `$env` when set (it must be a directory), else the
/// last stdout line of the build script `script` (relative to the workspace root), which builds
/// into the cache when needed. Panics with the build log when the build fails. The one lookup
/// behind [`interop_bin_dir`], [`crate::tailnet::tailnet_bin_dir`] and
/// [`crate::headscale::headscale_bin`].
pub fn go_peer_dir(env: &str, script: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env) {
        let dir = PathBuf::from(dir);
        assert!(dir.is_dir(), "{env}={} is not a directory", dir.display());
        return dir;
    }
    let script = crate::k8s::workspace_root().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default().trim();
    let dir = PathBuf::from(last);
    assert!(
        dir.is_dir(),
        "{} printed {last:?}, not a directory",
        script.display()
    );
    dir
}

fn interop_bin(name: &str) -> PathBuf {
    let path = interop_bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} missing (rebuild with tests/interop/build.sh)",
        path.display()
    );
    path
}

/// The `derpinterop` binary built against tailscale.com `version`.
pub fn derpinterop(version: &str) -> PathBuf {
    interop_bin(&format!("derpinterop-{version}"))
}

/// Upstream `derper` built from tailscale.com `version`.
pub fn upstream_derper(version: &str) -> PathBuf {
    interop_bin(&format!("derper-{version}"))
}

/// Our `derper` binary (`$KUBEDERP_BIN_DIR/derper`, else built with cargo).
pub fn our_derper() -> PathBuf {
    crate::bins::workspace_bin("derper")
}

/// Which relay implementation a [`Relay`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerKind {
    /// kubederp's Rust relay.
    Ours,
    /// Upstream Go `derper` at this tailscale.com version.
    Upstream(String),
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ours => f.write_str("kubederp derper"),
            Self::Upstream(v) => write!(f, "upstream derper {v}"),
        }
    }
}

/// A relay process on loopback in `--certmode manual` with a self-signed IP certificate.
/// Killed (by its own pid) when dropped.
#[derive(Debug)]
pub struct Relay {
    /// What runs.
    pub kind: ServerKind,
    /// Node name used in derpMaps.
    pub name: String,
    /// TLS (DERP) port.
    pub derp_port: u16,
    /// Plain HTTP port.
    pub http_port: u16,
    /// UDP STUN port.
    pub stun_port: u16,
    /// `sha256-raw:<hex>` as printed by the relay at start-up.
    pub cert_name: String,
    /// The `DERPNode` JSON object the relay printed.
    pub printed_node: Value,
    /// Serving a [`TestCa`]-issued certificate (no pin, no printed `DERPNode`).
    pub ca_issued: bool,
    /// Config/cert directory (kept for the relay's lifetime).
    pub dir: tempfile::TempDir,
    log_path: PathBuf,
    child: Child,
}

/// Reserve a free loopback port for TCP (`udp == false`) or UDP by binding port 0. The port is
/// released before the relay binds it; collisions are retried by [`Relay::start`].
fn free_port(udp: bool) -> Result<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    Ok(if udp {
        UdpSocket::bind(addr)?.local_addr()?.port()
    } else {
        TcpListener::bind(addr)?.local_addr()?.port()
    })
}

impl Relay {
    /// Start upstream `derper` `version` in pinned mode.
    pub fn upstream(version: &str, name: &str) -> Result<Self> {
        Self::start(
            ServerKind::Upstream(version.to_owned()),
            &upstream_derper(version),
            name,
            &[],
            None,
        )
    }

    /// Start our `derper` in pinned mode with `extra` flags appended (its admin listener goes
    /// to a random loopback port so relays of parallel tests never collide).
    pub fn ours(name: &str, extra: &[&str]) -> Result<Self> {
        let mut args = vec!["--admin-addr", "127.0.0.1:0"];
        args.extend(extra);
        Self::start(ServerKind::Ours, &our_derper(), name, &args, None)
    }

    /// Start `kind` with a certificate issued by `ca` installed in its certdir beforehand
    /// (WebPKI-style: the derpMap node has no CertName and clients trust `ca` through
    /// `derpinterop -ca-file`). Upstream then appends its metacert; ours decides with
    /// `--metacert` (`extra`).
    pub fn with_ca_cert(kind: ServerKind, name: &str, extra: &[&str], ca: &TestCa) -> Result<Self> {
        Self::with_ca_cert_env(kind, name, extra, ca, &[])
    }

    /// [`Relay::with_ca_cert`] with extra environment variables (e.g. `SSL_CERT_FILE` so an
    /// upstream derper's `--mesh-with` client trusts the test CA).
    pub fn with_ca_cert_env(
        kind: ServerKind,
        name: &str,
        extra: &[&str],
        ca: &TestCa,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        match &kind {
            ServerKind::Ours => {
                let mut args = vec!["--admin-addr", "127.0.0.1:0"];
                args.extend(extra);
                Self::start_env(kind.clone(), &our_derper(), name, &args, Some(ca), env)
            }
            ServerKind::Upstream(v) => Self::start_env(
                kind.clone(),
                &upstream_derper(v),
                name,
                extra,
                Some(ca),
                env,
            ),
        }
    }

    /// Start `bin` with upstream's flags (`--hostname 127.0.0.1 --certmode manual --certdir D
    /// -a 127.0.0.1:P --http-port P --stun-port P -c D/derper.key`), wait until it printed its
    /// `DERPNode` line and accepts TCP. Retries twice with new ports if the process dies early
    /// (a port taken between probing and binding).
    ///
    /// With `ca`, its loopback leaf is written to `<certdir>/127.0.0.1.{crt,key}` first and no
    /// `DERPNode` line is expected (relays print one only for certificates they generate).
    pub fn start(
        kind: ServerKind,
        bin: &Path,
        name: &str,
        extra: &[&str],
        ca: Option<&TestCa>,
    ) -> Result<Self> {
        Self::start_env(kind, bin, name, extra, ca, &[])
    }

    /// [`Relay::start`] with extra environment variables for the relay process.
    pub fn start_env(
        kind: ServerKind,
        bin: &Path,
        name: &str,
        extra: &[&str],
        ca: Option<&TestCa>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut last_err = anyhow!("not started");
        for _ in 0..3 {
            match Self::try_start(kind.clone(), bin, name, extra, ca, env) {
                Ok(r) => return Ok(r),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn try_start(
        kind: ServerKind,
        bin: &Path,
        name: &str,
        extra: &[&str],
        ca: Option<&TestCa>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kubederp-relay-")
            .tempdir()?;
        let (derp_port, http_port, stun_port) =
            (free_port(false)?, free_port(false)?, free_port(true)?);
        let log_path = dir.path().join("relay.log");
        let log = fs::File::create(&log_path)?;
        let certdir = dir.path().join("certs");
        if let Some(ca) = ca {
            fs::create_dir_all(&certdir)?;
            fs::write(certdir.join("127.0.0.1.crt"), &ca.leaf_pem)?;
            fs::write(certdir.join("127.0.0.1.key"), &ca.leaf_key_pem)?;
        }
        let mut cmd = Command::new(bin);
        cmd.arg("--hostname")
            .arg("127.0.0.1")
            .arg("--certmode")
            .arg("manual")
            .arg("--certdir")
            .arg(&certdir)
            .arg("-a")
            .arg(format!("127.0.0.1:{derp_port}"))
            .arg("--http-port")
            .arg(http_port.to_string())
            .arg("--stun-port")
            .arg(stun_port.to_string())
            .arg("-c")
            .arg(dir.path().join("derper.key"))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if kind == ServerKind::Ours {
            cmd.env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut relay = Self {
            kind,
            name: name.to_owned(),
            derp_port,
            http_port,
            stun_port,
            cert_name: String::new(),
            printed_node: Value::Null,
            ca_issued: ca.is_some(),
            dir,
            log_path,
            child,
        };
        relay.wait_ready(Duration::from_secs(30))?;
        Ok(relay)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during start-up ({status}); log:\n{}",
                    self.kind,
                    self.log()
                );
            }
            if self.printed_node.is_null()
                && !self.ca_issued
                && let Some(node) = find_printed_node(&self.log())
            {
                self.cert_name = node
                    .get("CertName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.printed_node = node;
            }
            if (self.ca_issued || !self.printed_node.is_null())
                && TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, self.derp_port)),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                if !self.ca_issued && !self.cert_name.starts_with("sha256-raw:") {
                    bail!(
                        "{} printed a DERPNode without a sha256-raw CertName: {}",
                        self.kind,
                        self.printed_node
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {limit:?} (no DERPNode line or port {} closed); log:\n{}",
                    self.kind,
                    self.derp_port,
                    self.log()
                );
            }
            pause(Duration::from_millis(50));
        }
    }

    /// Everything the relay wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `127.0.0.1:<derp port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.derp_port)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// This relay as a `tailcfg.DERPNode` (exact tailcfg field names, spec §9.3) pinned with
    /// the printed `sha256-raw:` CertName — never `InsecureForTests`.
    /// For a [`TestCa`]-issued certificate the CertName is left out (WebPKI verification).
    pub fn node(&self) -> Value {
        let mut node = json!({
            "Name": self.name,
            "RegionID": REGION_ID,
            "HostName": "127.0.0.1",
            "CertName": self.cert_name,
            "IPv4": "127.0.0.1",
            "IPv6": "none",
            "STUNPort": self.stun_port,
            "DERPPort": self.derp_port,
        });
        if self.ca_issued
            && let Some(o) = node.as_object_mut()
        {
            o.remove("CertName");
        }
        node
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throw-away CA and a leaf for `127.0.0.1` (IP SAN) that it issued, all PEM. Lets a test
/// run relays with a "publicly trusted" certificate — trusted only by `derpinterop -ca-file`
/// — which is the one set-up where upstream sends its metacert and a v1.82.x client still
/// connects (and so uses fast start).
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate (give its path to `derpinterop -ca-file`).
    pub ca_pem: String,
    /// The leaf certificate.
    pub leaf_pem: String,
    /// The leaf's private key (PKCS#8).
    pub leaf_key_pem: String,
    /// `sha256-raw:` pin of the leaf (for pinned mesh peer lists).
    pub leaf_pin: String,
}

impl TestCa {
    /// Generate a CA and a `127.0.0.1` server leaf.
    pub fn loopback() -> Result<Self> {
        let ca = derper::bench::LoopbackCa::generate()?;
        Ok(Self {
            ca_pem: ca.ca_pem,
            leaf_pem: ca.leaf_pem,
            leaf_key_pem: ca.leaf_key_pem,
            leaf_pin: ca.leaf_pin,
        })
    }

    /// Write the CA certificate to `<dir>/ca.pem` and return the path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("ca.pem");
        fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }
}

/// Find the `DERPNode` JSON object a relay prints at start-up (spec §3.2: a line holding
/// `{"Name":…,"CertName":"sha256-raw:…"}`).
pub fn find_printed_node(log: &str) -> Option<Value> {
    log.lines().find_map(|line| {
        let start = line.find('{')?;
        let v: Value = serde_json::from_str(line[start..].trim()).ok()?;
        v.get("CertName")?
            .as_str()?
            .starts_with("sha256-raw:")
            .then_some(v)
    })
}

/// A `tailcfg.DERPMap` with one region ([`REGION_ID`]) holding `nodes` in order.
pub fn derp_map(nodes: &[Value]) -> Value {
    json!({
        "Regions": {
            REGION_ID.to_string(): {
                "RegionID": REGION_ID,
                "RegionCode": "kubederp-test",
                "RegionName": "kubederp interop test",
                "Nodes": nodes,
            }
        },
        "omitDefaultRegions": true,
    })
}

/// Write `map` as `<dir>/<file>` and return the path.
pub fn write_derp_map(dir: &Path, file: &str, map: &Value) -> Result<PathBuf> {
    let path = dir.join(file);
    fs::write(&path, serde_json::to_vec_pretty(map)?)?;
    Ok(path)
}

/// Result of one `derpinterop` run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The process exited with status 0.
    pub success: bool,
    /// The JSON document it printed on stdout.
    pub json: Value,
    /// Its stderr (logs).
    pub stderr: String,
}

impl Run {
    /// `json.ok`.
    pub fn ok(&self) -> bool {
        self.json
            .get("ok")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `json.error`, or "" when absent.
    pub fn error(&self) -> &str {
        self.json
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// `json.<side>.transport` for side "a" or "b" (exchange/peergone).
    pub fn transport(&self, side: &str) -> &str {
        self.json
            .pointer(&format!("/{side}/transport"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// Run `derpinterop-<version> <args…> -timeout <timeout>` and parse its JSON. The process is
/// killed if it outlives `timeout` by 10 s (it bounds itself; this is the safety net).
pub fn run_derpinterop(version: &str, args: &[&str], timeout: Duration) -> Result<Run> {
    let bin = derpinterop(version);
    let (sub, rest) = args.split_first().context("no subcommand")?;
    let mut cmd = Command::new(&bin);
    cmd.arg(sub);
    if *sub != "parsemap" {
        cmd.arg("-timeout")
            .arg(format!("{}ms", timeout.as_millis()));
    }
    let dir = tempfile::Builder::new()
        .prefix("kubederp-interop-")
        .tempdir()?;
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .args(rest)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path)?)
        .stderr(fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let deadline = Instant::now() + timeout + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} {args:?} did not finish within {timeout:?} + 10 s; stderr:\n{}",
                bin.display(),
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        pause(Duration::from_millis(20));
    };
    let stdout = fs::read_to_string(&out_path)?;
    let stderr = fs::read_to_string(&err_path)?;
    let json: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "{} {args:?} ({status}) printed no JSON document:\nstdout: {stdout}\nstderr: {stderr}",
            bin.display()
        )
    })?;
    Ok(Run {
        success: status.success(),
        json,
        stderr,
    })
}

/// Outcome of `derpinterop parsemap`.
#[derive(Debug, Clone)]
pub struct ParsedMap {
    /// Exit status 0.
    pub success: bool,
    /// On success the canonical `tailcfg.DERPMap` JSON; on failure the error document.
    pub json: Value,
    /// Logs.
    pub stderr: String,
}

/// Read `file` into the real `tailcfg.DERPMap` of client `version` and print it back:
/// `format` is `json` (strict: unknown fields rejected) or `headscale-yaml` (headscale's
/// yaml.v3 load, lower-case keys; unknown keys rejected unless `lenient`). This is how the
/// operator's `derpmap.json` / `headscale.yaml` are proven readable by the real types.
pub fn parse_derp_map(
    version: &str,
    file: &Path,
    format: &str,
    lenient: bool,
) -> Result<ParsedMap> {
    let bin = derpinterop(version);
    let mut cmd = Command::new(&bin);
    cmd.arg("parsemap")
        .arg("-file")
        .arg(file)
        .arg("-format")
        .arg(format)
        .stdin(Stdio::null());
    if lenient {
        cmd.arg("-lenient");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout)
        .with_context(|| format!("parsemap printed no JSON:\n{stdout}\n{stderr}"))?;
    Ok(ParsedMap {
        success: out.status.success(),
        json,
        stderr,
    })
}

/// Run `derpinterop <sub> -derpmap <map> [-mode <mode>] <extra…>` for client `version`.
pub fn run_against(
    version: &str,
    sub: &str,
    map: &Path,
    mode: Option<&str>,
    extra: &[&str],
) -> Result<Run> {
    let map = map.to_str().context("non-UTF-8 path")?;
    let mut args = vec![sub, "-derpmap", map];
    if let Some(m) = mode {
        args.extend(["-mode", m]);
    }
    args.extend(extra);
    run_derpinterop(version, &args, Duration::from_secs(20))
}
