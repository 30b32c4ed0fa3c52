//! Validated, fully-typed configuration built from [`crate::args::Args`]. All cross-field
//! checks live here (spec §8.1 validation rules); features that are not built yet fail
//! with a clear "not supported yet" error instead of being silently ignored.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::args::{Args, CertMode, LogFormat, MetacertFlag};
use crate::duration::parse_go_duration;
use crate::http::{HomePage, HttpOptions};
use crate::key::MeshKey;
use crate::listeners::TcpOptions;
use crate::server::ServerOptions;

/// Configuration errors (printed to the user as-is).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A flag value is invalid.
    #[error("invalid --{flag}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// Why.
        reason: String,
    },
    /// A feature is not implemented yet.
    #[error("{0} is not supported yet")]
    NotSupported(&'static str),
    /// An invalid combination of flags.
    #[error("{0}")]
    Combination(String),
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

/// TLS settings (manual certificate mode).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Certificate directory.
    pub certdir: PathBuf,
    /// Host name (file stem, SAN check, DERPNode HostName).
    pub hostname: String,
    /// Metacert policy.
    pub metacert: MetacertFlag,
    /// Reload poll interval (`None` = no reloading).
    pub reload_interval: Option<Duration>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Main listener.
    pub addr: SocketAddr,
    /// TLS on the main listener.
    pub tls: Option<TlsSettings>,
    /// Plain HTTP listener.
    pub http_addr: Option<SocketAddr>,
    /// STUN listener.
    pub stun_addr: Option<SocketAddr>,
    /// Admin listener.
    pub admin_addr: Option<SocketAddr>,
    /// Server key file (`None` in dev mode without -c: random key).
    pub key_path: Option<PathBuf>,
    /// DERP core options (incl. mesh key).
    pub server: ServerOptions,
    /// HTTP options.
    pub http: HttpOptions,
    /// TCP options.
    pub tcp: TcpOptions,
    /// Log format.
    pub log_format: LogFormat,
    /// Dev mode.
    pub dev: bool,
    /// The hostname (also used without TLS for messages).
    pub hostname: String,
    /// Mesh peers to dial (`--mesh-with`, `--mesh-peers-file`).
    pub mesh: Option<crate::mesh::MeshConfig>,
    /// Accept rate limit (per second, burst).
    pub accept_limit: Option<(f64, f64)>,
}

/// Parses `-a`: `:port`, `host:port`, `[v6]:port`. An empty host binds all interfaces.
pub fn parse_listen_addr(s: &str) -> Result<(SocketAddr, String), ConfigError> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| invalid("addr", format!("{s:?} has no port")))?;
    let port_num: u16 = match port {
        "https" => 443,
        "http" => 80,
        p => p
            .parse()
            .map_err(|_| invalid("addr", format!("bad port in {s:?}")))?,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.is_empty() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        ip
    } else {
        (host, port_num)
            .to_socket_addrs()
            .map_err(|e| invalid("addr", format!("resolving {host:?}: {e}")))?
            .next()
            .ok_or_else(|| invalid("addr", format!("{host:?} resolves to nothing")))?
            .ip()
    };
    Ok((SocketAddr::new(ip, port_num), port.to_owned()))
}

fn default_certdir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tailscale").join("derper-certs")
}

fn duration(flag: &'static str, s: &str) -> Result<Duration, ConfigError> {
    parse_go_duration(s).map_err(|e| invalid(flag, e.to_string()))
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    /// Validates the flags part by part. The parts run in this order, so a command line with
    /// several mistakes always reports the same first one.
    fn try_from(args: Args) -> Result<Self, ConfigError> {
        // Destructure completely so no flag can be forgotten (house-style §4.3).
        let Args {
            dev,
            addr,
            http_port,
            stun_port,
            stun,
            derp,
            config,
            certmode,
            certdir,
            hostname,
            metacert,
            cert_reload_interval,
            home,
            mesh_psk_file,
            mesh_with,
            mesh_peers_file,
            mesh_peers_poll,
            bootstrap_dns_names,
            unpublished_bootstrap_dns_names,
            verify_clients,
            verify_client_url,
            verify_client_url_fail_open,
            socket,
            accept_connection_limit,
            accept_connection_burst,
            handshake_connection_limit,
            handshake_connection_limit_per_ip,
            rate_config,
            tcp_keepalive_time,
            tcp_user_timeout,
            tcp_write_timeout,
            acme_eab_kid,
            acme_eab_key,
            acme_email,
            acme_ip_certs,
            secrets_url,
            ace,
            admin_addr,
            log_format,
        } = args;

        check_mesh_flags(
            &mesh_with,
            mesh_peers_file.is_some(),
            mesh_psk_file.is_some(),
        )?;
        if !bootstrap_dns_names.is_empty() || !unpublished_bootstrap_dns_names.is_empty() {
            return Err(ConfigError::NotSupported("--bootstrap-dns-names"));
        }
        let admission = admission(
            verify_clients,
            &socket,
            &verify_client_url,
            verify_client_url_fail_open,
        )?;
        let accept_limit = accept_limit(accept_connection_limit, accept_connection_burst)?;
        let recv_rate = recv_rate(&rate_config)?;
        reject_acme(
            certmode,
            acme_ip_certs,
            &[&acme_eab_kid, &acme_eab_key, &acme_email],
        )?;
        if !secrets_url.is_empty() {
            return Err(ConfigError::NotSupported("--secrets-url"));
        }
        if ace {
            return Err(ConfigError::NotSupported("--ace"));
        }

        let (addr, port_str) = parse_listen_addr(&main_addr(dev, addr))?;
        let tls = if tls_wanted(dev, &port_str, certmode) {
            Some(tls_settings(
                certmode,
                certdir,
                &hostname,
                metacert,
                &cert_reload_interval,
            )?)
        } else {
            None
        };
        let http_addr = http_addr(addr, tls.is_some(), http_port)?;
        let stun_addr = stun.then_some(SocketAddr::new(addr.ip(), stun_port));
        let admin_addr = admin_addr_of(&admin_addr, addr, http_addr)?;
        let home = home_page(&home)?;
        let mesh_key = read_mesh_key(mesh_psk_file.as_deref())?;
        let key_path = key_path(config, dev, is_root)?;
        let write_timeout = duration("tcp-write-timeout", &tcp_write_timeout)?;
        let mesh = mesh_config(
            mesh_key.as_ref(),
            &mesh_with,
            mesh_peers_file,
            &mesh_peers_poll,
        )?;
        let server = ServerOptions {
            write_timeout: (!write_timeout.is_zero()).then_some(write_timeout),
            mesh_key,
            admission,
            recv_rate,
            handshake_limit: handshake_connection_limit,
            handshake_limit_per_ip: handshake_connection_limit_per_ip,
            ..ServerOptions::default()
        };
        let tcp = tcp_options(&tcp_keepalive_time, &tcp_user_timeout)?;
        Ok(Config {
            addr,
            tls,
            http_addr,
            stun_addr,
            admin_addr,
            key_path,
            server,
            http: HttpOptions {
                derp_enabled: derp,
                home,
                ..HttpOptions::default()
            },
            tcp,
            log_format,
            dev,
            hostname,
            mesh,
            accept_limit,
        })
    }
}

/// Mesh peers (`--mesh-with`, `--mesh-peers-file`) need the mesh key (`--mesh-psk-file`).
fn check_mesh_flags(mesh_with: &str, peers_file: bool, psk_file: bool) -> Result<(), ConfigError> {
    if !mesh_with.trim().is_empty() && !psk_file {
        return Err(ConfigError::Combination(
            "--mesh-with requires --mesh-psk-file".into(),
        ));
    }
    if peers_file && !psk_file {
        return Err(ConfigError::Combination(
            "--mesh-peers-file requires --mesh-psk-file".into(),
        ));
    }
    Ok(())
}

/// Client admission in upstream order (spec §6.9): tailscaled (`--verify-clients`, asked over
/// `--socket`, the LocalAPI default when empty) first, then `--verify-client-url`.
fn admission(
    verify_clients: bool,
    socket: &str,
    verify_client_url: &str,
    fail_open: bool,
) -> Result<Vec<std::sync::Arc<dyn crate::admission::Admit>>, ConfigError> {
    let mut admission: Vec<std::sync::Arc<dyn crate::admission::Admit>> = Vec::new();
    if verify_clients {
        let socket = if socket.is_empty() {
            PathBuf::from(crate::localapi::DEFAULT_SOCKET)
        } else {
            PathBuf::from(socket)
        };
        admission.push(std::sync::Arc::new(
            crate::admission::VerifyTailscaled::new(crate::admission::LocalApiLookup { socket }),
        ));
    }
    if !verify_client_url.is_empty() {
        let v = crate::admission::VerifyUrl::new(verify_client_url, fail_open)
            .map_err(|e| invalid("verify-client-url", e))?;
        admission.push(std::sync::Arc::new(v));
    }
    Ok(admission)
}

/// The accept rate limit (per second, burst): `None` for an infinite limit.
fn accept_limit(limit: f64, burst: i64) -> Result<Option<(f64, f64)>, ConfigError> {
    if limit.is_nan() || limit < 0.0 {
        return Err(invalid("accept-connection-limit", "must be ≥ 0"));
    }
    if burst < 1 {
        return Err(invalid("accept-connection-burst", "must be ≥ 1"));
    }
    #[allow(clippy::cast_precision_loss)]
    Ok(limit.is_finite().then_some((limit, burst as f64)))
}

/// The receive rate limits of `--rate-config` (a JSON file), `None` without one.
fn recv_rate(path: &str) -> Result<Option<crate::ratelimit::RecvRateLimit>, ConfigError> {
    if path.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("rate-config", format!("{path}: {e}")))?;
    crate::ratelimit::RecvRateLimit::parse_json(&text)
        .map_err(|e| invalid("rate-config", format!("{path}: {e}")))
}

/// ACME is not built: any `--acme-*` flag fails (`--acme-ip-certs` without
/// `--certmode=letsencrypt` first, as a wrong combination).
fn reject_acme(
    certmode: CertMode,
    acme_ip_certs: bool,
    acme_values: &[&str],
) -> Result<(), ConfigError> {
    if acme_ip_certs && certmode != CertMode::Letsencrypt {
        return Err(ConfigError::Combination(
            "--acme-ip-certs requires --certmode=letsencrypt".into(),
        ));
    }
    if acme_ip_certs || acme_values.iter().any(|v| !v.is_empty()) {
        return Err(ConfigError::NotSupported("ACME (--acme-*)"));
    }
    Ok(())
}

/// `-a` as given, except that dev mode moves the default address to `:3340` (as upstream).
fn main_addr(dev: bool, addr: String) -> String {
    if dev && addr == crate::defaults::DEFAULT_ADDR {
        ":3340".to_owned()
    } else {
        addr
    }
}

/// Whether the main listener speaks TLS: in dev mode only with `--certmode=manual`, else also
/// on port 443 (`https`), as upstream.
fn tls_wanted(dev: bool, port: &str, certmode: CertMode) -> bool {
    if dev {
        certmode == CertMode::Manual
    } else {
        port == "443" || port == "https" || certmode == CertMode::Manual
    }
}

/// TLS settings of a TLS listener: manual certificates only, from a certificate directory
/// (`--certdir`, else the user's cache) for a non-empty `--hostname`.
fn tls_settings(
    certmode: CertMode,
    certdir: Option<PathBuf>,
    hostname: &str,
    metacert: MetacertFlag,
    cert_reload_interval: &str,
) -> Result<TlsSettings, ConfigError> {
    if certmode != CertMode::Manual {
        return Err(ConfigError::NotSupported(
            "--certmode letsencrypt/gcp (use --certmode manual)",
        ));
    }
    let certdir = certdir.unwrap_or_else(default_certdir);
    if certdir.as_os_str().is_empty() {
        return Err(invalid("certdir", "must be non-empty when TLS is on"));
    }
    if hostname.is_empty() {
        return Err(invalid("hostname", "must be non-empty when TLS is on"));
    }
    let ri = duration("cert-reload-interval", cert_reload_interval)?;
    Ok(TlsSettings {
        certdir,
        hostname: hostname.to_owned(),
        metacert,
        reload_interval: (!ri.is_zero()).then_some(ri),
    })
}

/// The plain-HTTP listener beside a TLS one, on the main listener's IP: `--http-port` (0 = an
/// ephemeral port, -1 = none). Without TLS there is none.
fn http_addr(
    addr: SocketAddr,
    tls: bool,
    http_port: i32,
) -> Result<Option<SocketAddr>, ConfigError> {
    Ok(match (tls, http_port) {
        (true, p) if p > 0 => Some(SocketAddr::new(
            addr.ip(),
            u16::try_from(p).map_err(|_| invalid("http-port", "out of range"))?,
        )),
        (true, 0) => Some(SocketAddr::new(addr.ip(), 0)),
        (_, p) if p < -1 => return Err(invalid("http-port", "must be ≥ -1")),
        _ => None,
    })
}

/// `--admin-addr` (empty: no admin listener); it may not share a public listener's address
/// unless its port is 0.
fn admin_addr_of(
    admin_addr: &str,
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ConfigError> {
    if admin_addr.trim().is_empty() {
        return Ok(None);
    }
    let a = admin_addr
        .trim()
        .parse::<SocketAddr>()
        .map_err(|e| invalid("admin-addr", e.to_string()))?;
    if (Some(a) == http_addr || a == addr) && a.port() != 0 {
        return Err(ConfigError::Combination(
            "--admin-addr must not be a public listener address".into(),
        ));
    }
    Ok(Some(a))
}

/// `--home`: empty (the default page), `blank`, or an http(s) URL to redirect to.
fn home_page(home: &str) -> Result<HomePage, ConfigError> {
    match home {
        "" => Ok(HomePage::Default),
        "blank" => Ok(HomePage::Blank),
        u if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(HomePage::Redirect(u.to_owned()))
        }
        other => Err(invalid("home", format!("unknown value {other:?}"))),
    }
}

/// The mesh key read from `--mesh-psk-file`, `None` without one.
fn read_mesh_key(path: Option<&std::path::Path>) -> Result<Option<MeshKey>, ConfigError> {
    let Some(p) = path else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p)
        .map_err(|e| invalid("mesh-psk-file", format!("{}: {e}", p.display())))?;
    Ok(Some(
        MeshKey::parse(&text).map_err(|e| invalid("mesh-psk-file", e.to_string()))?,
    ))
}

/// The server key file: `-c`, none in dev mode (a random key), else the default path, which
/// only root may use (spec §8.1).
fn key_path(
    config: Option<PathBuf>,
    dev: bool,
    is_root: impl FnOnce() -> bool,
) -> Result<Option<PathBuf>, ConfigError> {
    match config {
        Some(p) => Ok(Some(p)),
        None if dev => Ok(None),
        None if is_root() => Ok(Some(PathBuf::from("/var/lib/derper/derper.key"))),
        None => Err(ConfigError::Combination(
            "-c <config file> is required when not running as root".into(),
        )),
    }
}

/// The mesh to join: only with a mesh key and peers (`--mesh-with`, checked against the
/// system roots when it names any, or `--mesh-peers-file`, polled at least every 50 ms).
fn mesh_config(
    mesh_key: Option<&MeshKey>,
    mesh_with: &str,
    peers_file: Option<PathBuf>,
    poll: &str,
) -> Result<Option<crate::mesh::MeshConfig>, ConfigError> {
    let Some(k) = mesh_key else {
        return Ok(None);
    };
    if mesh_with.trim().is_empty() && peers_file.is_none() {
        return Ok(None);
    }
    let roots = if mesh_with.trim().is_empty() {
        Vec::new()
    } else {
        crate::roots::system_roots()
    };
    Ok(Some(crate::mesh::MeshConfig {
        mesh_key: k.clone(),
        peers: crate::mesh::parse_mesh_with(mesh_with, &roots)
            .map_err(|e| invalid("mesh-with", e))?,
        peers_file,
        poll: duration("mesh-peers-poll", poll)?.max(Duration::from_millis(50)),
    }))
}

/// TCP keepalive and user timeout (0 = the system's).
fn tcp_options(keepalive: &str, user_timeout: &str) -> Result<TcpOptions, ConfigError> {
    let ka = duration("tcp-keepalive-time", keepalive)?;
    let ut = duration("tcp-user-timeout", user_timeout)?;
    Ok(TcpOptions {
        keepalive: (!ka.is_zero()).then_some(ka),
        user_timeout: (!ut.is_zero()).then_some(ut),
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.uid() == 0
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn cfg(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["derper"];
        v.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(v).unwrap())
    }

    #[test]
    fn upstream_style_manual_ip_config() {
        let c = cfg(&[
            "--hostname",
            "127.0.0.1",
            "--certmode",
            "manual",
            "--certdir",
            "/tmp/x",
            "-a",
            "127.0.0.1:0",
            "--http-port",
            "0",
            "--stun-port",
            "0",
            "-c",
            "/tmp/x/k",
        ])
        .unwrap();
        assert!(c.tls.is_some());
        assert_eq!(c.addr, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.http_addr, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.stun_addr, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(c.server.write_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn plain_http_when_port_is_not_443() {
        let c = cfg(&["-a", "127.0.0.1:8080", "-c", "k", "--http-port", "80"]).unwrap();
        assert!(c.tls.is_none());
        assert!(c.http_addr.is_none());
    }

    #[test]
    fn unsupported_features_fail_clearly() {
        let e = cfg(&["-a", ":8080", "-c", "k", "--verify-client-url", "ftp://x"]).unwrap_err();
        assert!(e.to_string().contains("verify-client-url"), "{e}");
        assert_eq!(
            cfg(&["-a", ":8080", "-c", "k", "--verify-client-url", "http://x/"])
                .unwrap()
                .server
                .admission
                .len(),
            1
        );
        let e = cfg(&["-a", ":8080", "-c", "k", "--mesh-with", "a,b"]).unwrap_err();
        assert!(e.to_string().contains("requires --mesh-psk-file"), "{e}");
        let e = cfg(&["-a", ":443", "-c", "k"]).unwrap_err();
        assert!(e.to_string().contains("letsencrypt"), "{e}");
        let e = cfg(&["-a", ":8080", "-c", "k", "--home", "weird"]).unwrap_err();
        assert!(e.to_string().contains("home"), "{e}");
        let c = cfg(&[
            "-a",
            ":8080",
            "-c",
            "k",
            "--accept-connection-limit",
            "5",
            "--accept-connection-burst",
            "2",
        ])
        .unwrap();
        assert_eq!(c.accept_limit, Some((5.0, 2.0)));
        assert_eq!(cfg(&["-a", ":8080", "-c", "k"]).unwrap().accept_limit, None);
        let d = cfg(&["-a", ":8080", "-c", "k"]).unwrap().server;
        assert_eq!(
            (d.handshake_limit, d.handshake_limit_per_ip),
            (
                crate::defaults::HANDSHAKE_LIMIT,
                crate::defaults::HANDSHAKE_LIMIT_PER_IP
            )
        );
        let c = cfg(&[
            "-a",
            ":8080",
            "-c",
            "k",
            "--handshake-connection-limit",
            "10",
            "--handshake-connection-limit-per-ip",
            "0",
        ])
        .unwrap()
        .server;
        assert_eq!((c.handshake_limit, c.handshake_limit_per_ip), (10, 0));
        let e = cfg(&["-a", ":8080", "-c", "k", "--mesh-peers-file", "/x"]).unwrap_err();
        assert!(e.to_string().contains("requires --mesh-psk-file"), "{e}");
    }

    #[test]
    fn listen_addr_forms() {
        assert_eq!(parse_listen_addr(":443").unwrap().0.port(), 443);
        assert!(parse_listen_addr(":443").unwrap().0.ip().is_unspecified());
        assert_eq!(
            parse_listen_addr("[::1]:80").unwrap().0,
            "[::1]:80".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen_addr("nope").is_err());
    }

    #[test]
    fn mesh_peers_need_the_mesh_key() {
        assert!(check_mesh_flags("", false, false).is_ok());
        assert!(
            check_mesh_flags(" ", false, false).is_ok(),
            "blank is no peer"
        );
        assert!(check_mesh_flags("a,b", true, true).is_ok());
        let e = check_mesh_flags("a", false, false).unwrap_err();
        assert_eq!(e.to_string(), "--mesh-with requires --mesh-psk-file");
        let e = check_mesh_flags("", true, false).unwrap_err();
        assert_eq!(e.to_string(), "--mesh-peers-file requires --mesh-psk-file");
    }

    #[test]
    fn admission_asks_tailscaled_before_the_url() {
        assert!(admission(false, "", "", false).unwrap().is_empty());
        assert_eq!(admission(true, "", "", false).unwrap().len(), 1);
        assert_eq!(
            admission(true, "/run/ts.sock", "http://x/", true)
                .unwrap()
                .len(),
            2
        );
        let e = admission(true, "", "ftp://x", false).err().unwrap();
        assert!(
            e.to_string().starts_with("invalid --verify-client-url"),
            "{e}"
        );
    }

    #[test]
    fn accept_limit_is_off_when_infinite_and_refuses_nonsense() {
        assert_eq!(accept_limit(f64::INFINITY, 1).unwrap(), None);
        assert_eq!(accept_limit(0.0, 3).unwrap(), Some((0.0, 3.0)));
        for (limit, burst) in [(f64::NAN, 1), (-1.0, 1), (5.0, 0)] {
            assert!(accept_limit(limit, burst).is_err(), "{limit} {burst}");
        }
    }

    #[test]
    fn recv_rate_is_none_without_a_file_and_names_an_unreadable_one() {
        assert!(recv_rate("").unwrap().is_none());
        let e = recv_rate("/nonexistent/rate.json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid --rate-config: /nonexistent/rate.json")
        );
    }

    #[test]
    fn acme_flags_are_refused_ip_certs_first_as_a_combination() {
        assert!(reject_acme(CertMode::Manual, false, &["", "", ""]).is_ok());
        assert!(matches!(
            reject_acme(CertMode::Manual, true, &["", "", ""]),
            Err(ConfigError::Combination(_))
        ));
        assert!(matches!(
            reject_acme(CertMode::Letsencrypt, true, &["", "", ""]),
            Err(ConfigError::NotSupported("ACME (--acme-*)"))
        ));
        assert!(matches!(
            reject_acme(CertMode::Manual, false, &["", "", "me@example.com"]),
            Err(ConfigError::NotSupported(_))
        ));
    }

    #[test]
    fn dev_mode_moves_only_the_default_address() {
        assert_eq!(
            main_addr(true, crate::defaults::DEFAULT_ADDR.to_owned()),
            ":3340"
        );
        assert_eq!(main_addr(true, ":8443".to_owned()), ":8443");
        assert_eq!(
            main_addr(false, crate::defaults::DEFAULT_ADDR.to_owned()),
            crate::defaults::DEFAULT_ADDR
        );
    }

    #[test]
    fn tls_is_on_for_port_443_or_manual_certificates() {
        assert!(tls_wanted(false, "443", CertMode::Letsencrypt));
        assert!(tls_wanted(false, "https", CertMode::Letsencrypt));
        assert!(tls_wanted(false, "8443", CertMode::Manual));
        assert!(!tls_wanted(false, "8080", CertMode::Letsencrypt));
        // dev mode: only manual certificates turn it on
        assert!(!tls_wanted(true, "443", CertMode::Letsencrypt));
        assert!(tls_wanted(true, "3340", CertMode::Manual));
    }

    #[test]
    fn tls_settings_need_manual_mode_a_certdir_and_a_hostname() {
        let ok = |certdir: Option<PathBuf>, host: &str, reload: &str| {
            tls_settings(CertMode::Manual, certdir, host, MetacertFlag::Auto, reload)
        };
        let t = ok(Some("/c".into()), "derp.example", "0s").unwrap();
        assert_eq!(t.certdir, PathBuf::from("/c"));
        assert_eq!(t.hostname, "derp.example");
        assert_eq!(t.reload_interval, None);
        let t = ok(Some("/c".into()), "h", "30s").unwrap();
        assert_eq!(t.reload_interval, Some(Duration::from_secs(30)));
        assert!(
            ok(None, "h", "0s")
                .unwrap()
                .certdir
                .ends_with("derper-certs")
        );
        assert!(ok(Some(PathBuf::new()), "h", "0s").is_err());
        assert!(ok(Some("/c".into()), "", "0s").is_err());
        assert!(ok(Some("/c".into()), "h", "soon").is_err());
        assert!(matches!(
            tls_settings(CertMode::Letsencrypt, None, "h", MetacertFlag::Auto, "0s"),
            Err(ConfigError::NotSupported(_))
        ));
    }

    #[test]
    fn http_listener_exists_only_beside_tls() {
        let a: SocketAddr = "127.0.0.1:443".parse().unwrap();
        assert_eq!(
            http_addr(a, true, 80).unwrap(),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            http_addr(a, true, 0).unwrap(),
            Some("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(http_addr(a, true, -1).unwrap(), None);
        assert_eq!(http_addr(a, false, 80).unwrap(), None);
        assert!(http_addr(a, true, 70_000).is_err());
        assert!(http_addr(a, false, -2).is_err());
    }

    #[test]
    fn admin_listener_must_not_share_a_public_address() {
        let a: SocketAddr = "127.0.0.1:443".parse().unwrap();
        let h = Some("127.0.0.1:80".parse().unwrap());
        assert_eq!(admin_addr_of("  ", a, h).unwrap(), None);
        assert_eq!(
            admin_addr_of(" 127.0.0.1:9090 ", a, h).unwrap(),
            Some("127.0.0.1:9090".parse().unwrap())
        );
        assert!(matches!(
            admin_addr_of("127.0.0.1:443", a, h),
            Err(ConfigError::Combination(_))
        ));
        assert!(admin_addr_of("127.0.0.1:80", a, h).is_err());
        // port 0 (an ephemeral port) cannot collide
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(admin_addr_of("127.0.0.1:0", zero, None).unwrap().is_some());
        assert!(admin_addr_of("nope", a, h).is_err());
    }

    #[test]
    fn home_page_forms() {
        assert!(matches!(home_page(""), Ok(HomePage::Default)));
        assert!(matches!(home_page("blank"), Ok(HomePage::Blank)));
        assert!(matches!(home_page("https://x/"), Ok(HomePage::Redirect(u)) if u == "https://x/"));
        assert!(home_page("ftp://x").is_err());
    }

    #[test]
    fn key_path_defaults_only_for_root_and_not_in_dev_mode() {
        let never = || -> bool { panic!("root is asked only without -c outside dev mode") };
        assert_eq!(
            key_path(Some("k".into()), false, never).unwrap(),
            Some(PathBuf::from("k"))
        );
        assert_eq!(key_path(None, true, never).unwrap(), None);
        assert_eq!(
            key_path(None, false, || true).unwrap(),
            Some(PathBuf::from("/var/lib/derper/derper.key"))
        );
        assert!(matches!(
            key_path(None, false, || false),
            Err(ConfigError::Combination(_))
        ));
    }

    #[test]
    fn mesh_needs_a_key_and_peers_and_polls_at_least_every_50ms() {
        let key = MeshKey::parse(&"ab".repeat(32)).unwrap();
        assert!(
            mesh_config(None, "", Some("/p".into()), "1s")
                .unwrap()
                .is_none()
        );
        assert!(mesh_config(Some(&key), " ", None, "1s").unwrap().is_none());
        let m = mesh_config(Some(&key), "", Some("/p".into()), "1ms")
            .unwrap()
            .unwrap();
        assert!(m.peers.is_empty());
        assert_eq!(m.peers_file, Some(PathBuf::from("/p")));
        assert_eq!(m.poll, Duration::from_millis(50));
        assert!(mesh_config(Some(&key), "", Some("/p".into()), "x").is_err());
    }

    #[test]
    fn zero_tcp_durations_leave_the_system_defaults() {
        let t = tcp_options("0s", "15s").unwrap();
        assert_eq!(t.keepalive, None);
        assert_eq!(t.user_timeout, Some(Duration::from_secs(15)));
        assert!(tcp_options("x", "0s").is_err());
    }
}
