//! A real headscale (v0.29.2, built from the Go module proxy by
//! `tests/interop/headscale/build.sh`) on loopback, as the control server of a
//! [`crate::tailnet::Tailnet`].
//!
//! Owns: locating (or building) the `headscale` binary; writing its config (listen on
//! 127.0.0.1, `disable_check_updates: true`, embedded DERP off, the DERP map from
//! `derp.urls` or `derp.paths`, logtail off, no DNS servers); starting `headscale serve` and
//! waiting for `/health`; the CLI (`users create`, `preauthkeys create`) over its unix socket.
//!
//! Nothing leaves the machine: every URL in the config is loopback and `HTTP(S)_PROXY` point
//! at a closed loopback port, so any other fetch fails instead of leaving.
//!
//! Nothing here skips: a binary that cannot be found or built is a loud panic. The server is
//! killed (by its own pid) when [`Headscale`] is dropped.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Environment variable naming a directory with a prebuilt `headscale` (what
/// `tests/interop/headscale/build.sh` prints); when unset the script is run once per process.
pub const HEADSCALE_BIN_DIR_ENV: &str = "KUBEDERP_HEADSCALE_BIN_DIR";

/// The headscale release built and tested.
pub const HEADSCALE_VERSION: &str = "v0.29.2";

/// `http://127.0.0.1:9`: the discard port, closed on this machine. Outside URLs are proxied
/// here and fail at once.
const DEAD_PROXY: &str = "http://127.0.0.1:9";

#[allow(clippy::disallowed_methods)] // plain test threads, never inside a tokio runtime
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// The directory holding `headscale`: `$KUBEDERP_HEADSCALE_BIN_DIR`, or the last stdout line
/// of `tests/interop/headscale/build.sh` (run once per process). Panics when neither works.
pub fn headscale_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = crate::interop::go_peer_dir(
            HEADSCALE_BIN_DIR_ENV,
            "tests/interop/headscale/build.sh",
        );
        let bin = dir.join("headscale");
        assert!(
            bin.is_file(),
            "headscale {HEADSCALE_VERSION} missing at {} (build it with tests/interop/headscale/build.sh \
             or `source scripts/lib.sh && ensure_headscale`, which sets {HEADSCALE_BIN_DIR_ENV})",
            bin.display()
        );
        bin
    })
}

/// Where headscale takes its DERP map from.
#[derive(Debug, Clone)]
pub enum DerpSource {
    /// `derp.urls` (for example the operator's `/derpmap.json`), refetched every
    /// `update_frequency`.
    Urls(Vec<String>, Duration),
    /// `derp.paths`: YAML files (for example the ConfigMap's `headscale.yaml`).
    Paths(Vec<PathBuf>),
}

/// A running `headscale serve`.
#[derive(Debug)]
pub struct Headscale {
    /// `http://127.0.0.1:PORT` (`server_url`, the `--login-server` for nodes).
    pub url: String,
    /// The config file written for it.
    pub config: PathBuf,
    log: PathBuf,
    child: Child,
    /// Removed after the process is killed.
    pub dir: tempfile::TempDir,
}

impl Drop for Headscale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn yaml_list<T: AsRef<str>>(items: &[T]) -> String {
    if items.is_empty() {
        return "[]".to_owned();
    }
    items
        .iter()
        .map(|i| format!("\n    - {:?}", i.as_ref()))
        .collect()
}

impl Headscale {
    /// Writes the config, starts `headscale serve` and waits (at most 30 s) for `/health`.
    pub fn start(derp: &DerpSource) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kd-hs-")
            .tempdir_in("/tmp")?;
        let d = dir.path();
        let port = crate::k8s::free_port();
        let metrics = crate::k8s::free_port();
        let grpc = crate::k8s::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let (urls, paths, freq) = match derp {
            DerpSource::Urls(urls, every) => (
                yaml_list(urls),
                yaml_list::<&str>(&[]),
                format!("{}s", every.as_secs().max(1)),
            ),
            DerpSource::Paths(paths) => {
                let p: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                (yaml_list::<&str>(&[]), yaml_list(&p), "24h".to_owned())
            }
        };
        let config = d.join("config.yaml");
        let text = format!(
            r#"server_url: {url}
listen_addr: 127.0.0.1:{port}
metrics_listen_addr: 127.0.0.1:{metrics}
grpc_listen_addr: 127.0.0.1:{grpc}
grpc_allow_insecure: false
disable_check_updates: true
noise:
  private_key_path: {d}/noise_private.key
prefixes:
  v4: 100.64.0.0/10
  v6: fd7a:115c:a1e0::/48
  allocation: sequential
derp:
  server:
    enabled: false
  urls: {urls}
  paths: {paths}
  auto_update_enabled: true
  update_frequency: {freq}
database:
  type: sqlite
  sqlite:
    path: {d}/db.sqlite
    write_ahead_log: true
log:
  level: debug
  format: text
policy:
  mode: file
  path: ""
dns:
  magic_dns: false
  override_local_dns: false
  nameservers:
    global: []
unix_socket: {d}/headscale.sock
unix_socket_permission: "0770"
logtail:
  enabled: false
taildrop:
  enabled: false
"#,
            d = d.display()
        );
        fs::write(&config, text)?;
        let log = d.join("headscale.log");
        let file = fs::File::create(&log)?;
        let mut cmd = Command::new(headscale_bin());
        cmd.args(["serve", "-c"])
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", d)
            .env("HTTP_PROXY", DEAD_PROXY)
            .env("HTTPS_PROXY", DEAD_PROXY)
            .env("http_proxy", DEAD_PROXY)
            .env("https_proxy", DEAD_PROXY)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = crate::k8s::spawn_tied(cmd).context("spawning headscale serve")?;
        let mut hs = Headscale {
            url,
            config,
            log,
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = hs.child.try_wait()? {
                bail!("headscale serve exited ({status}); log:\n{}", hs.log());
            }
            if matches!(hs.get("/health"), Ok((200, _))) {
                return Ok(hs);
            }
            if Instant::now() > deadline {
                bail!("headscale /health not OK within 30 s; log:\n{}", hs.log());
            }
            pause(Duration::from_millis(100));
        }
    }

    /// Everything headscale logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `GET path` over HTTP/1.0: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http(&self.url, "GET", path, "")
    }

    /// `POST path` with a JSON body: (status, body).
    pub fn post_json(&self, path: &str, body: &str) -> Result<(u16, String)> {
        http(&self.url, "POST", path, body)
    }

    /// Runs `headscale -c <config> ARGS -o json` and parses its stdout.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(headscale_bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .args(["-o", "json"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("HTTP_PROXY", DEAD_PROXY)
            .env("HTTPS_PROXY", DEAD_PROXY)
            .stdin(Stdio::null())
            .output()
            .context("running the headscale CLI")?;
        if !out.status.success() {
            bail!(
                "headscale {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "headscale {args:?} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Creates `user` and a reusable pre-auth key for it (valid one hour).
    pub fn preauth_key(&self, user: &str) -> Result<String> {
        let u = self.cli_json(&["users", "create", user])?;
        let id = match &u["id"] {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => bail!("users create printed no id: {other} in {u}"),
        };
        let k = self.cli_json(&[
            "preauthkeys",
            "create",
            "--user",
            &id,
            "--reusable",
            "--expiration",
            "1h",
        ])?;
        k["key"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("preauthkeys create printed no key: {k}"))
    }
}

/// A minimal HTTP/1.0 request to a loopback `base` URL (`http://127.0.0.1:PORT`).
pub fn http(base: &str, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("not an http URL: {base}"))?;
    let mut s = TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP response: {resp:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head:?}"))?;
    Ok((code, body.to_owned()))
}
