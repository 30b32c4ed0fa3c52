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

        if !mesh_with.trim().is_empty() && mesh_psk_file.is_none() {
            return Err(ConfigError::Combination(
                "--mesh-with requires --mesh-psk-file".into(),
            ));
        }
        if mesh_peers_file.is_some() && mesh_psk_file.is_none() {
            return Err(ConfigError::Combination(
                "--mesh-peers-file requires --mesh-psk-file".into(),
            ));
        }
        if !bootstrap_dns_names.is_empty() || !unpublished_bootstrap_dns_names.is_empty() {
            return Err(ConfigError::NotSupported("--bootstrap-dns-names"));
        }
        let mut admission: Vec<std::sync::Arc<dyn crate::admission::Admit>> = Vec::new();
        if verify_clients {
            // Upstream order (spec §6.9): tailscaled first, then the URL.
            let socket = if socket.is_empty() {
                PathBuf::from(crate::localapi::DEFAULT_SOCKET)
            } else {
                PathBuf::from(&socket)
            };
            admission.push(std::sync::Arc::new(
                crate::admission::VerifyTailscaled::new(crate::admission::LocalApiLookup {
                    socket,
                }),
            ));
        }
        if !verify_client_url.is_empty() {
            let v =
                crate::admission::VerifyUrl::new(&verify_client_url, verify_client_url_fail_open)
                    .map_err(|e| invalid("verify-client-url", e))?;
            admission.push(std::sync::Arc::new(v));
        }
        if accept_connection_limit.is_nan() || accept_connection_limit < 0.0 {
            return Err(invalid("accept-connection-limit", "must be ≥ 0"));
        }
        if accept_connection_burst < 1 {
            return Err(invalid("accept-connection-burst", "must be ≥ 1"));
        }
        #[allow(clippy::cast_precision_loss)]
        let accept_limit = accept_connection_limit
            .is_finite()
            .then_some((accept_connection_limit, accept_connection_burst as f64));
        let recv_rate = if rate_config.is_empty() {
            None
        } else {
            let text = std::fs::read_to_string(&rate_config)
                .map_err(|e| invalid("rate-config", format!("{rate_config}: {e}")))?;
            crate::ratelimit::RecvRateLimit::parse_json(&text)
                .map_err(|e| invalid("rate-config", format!("{rate_config}: {e}")))?
        };
        if acme_ip_certs && certmode != CertMode::Letsencrypt {
            return Err(ConfigError::Combination(
                "--acme-ip-certs requires --certmode=letsencrypt".into(),
            ));
        }
        if acme_ip_certs
            || !acme_eab_kid.is_empty()
            || !acme_eab_key.is_empty()
            || !acme_email.is_empty()
        {
            return Err(ConfigError::NotSupported("ACME (--acme-*)"));
        }
        if !secrets_url.is_empty() {
            return Err(ConfigError::NotSupported("--secrets-url"));
        }
        if ace {
            return Err(ConfigError::NotSupported("--ace"));
        }

        let addr_str = if dev && addr == crate::defaults::DEFAULT_ADDR {
            ":3340".to_owned()
        } else {
            addr
        };
        let (addr, port_str) = parse_listen_addr(&addr_str)?;
        let tls_on = if dev {
            certmode == CertMode::Manual
        } else {
            port_str == "443" || port_str == "https" || certmode == CertMode::Manual
        };
        let tls = if tls_on {
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
            let ri = duration("cert-reload-interval", &cert_reload_interval)?;
            Some(TlsSettings {
                certdir,
                hostname: hostname.clone(),
                metacert,
                reload_interval: (!ri.is_zero()).then_some(ri),
            })
        } else {
            None
        };
        let http_addr = match (tls.is_some(), http_port) {
            (true, p) if p > 0 => Some(SocketAddr::new(
                addr.ip(),
                u16::try_from(p).map_err(|_| invalid("http-port", "out of range"))?,
            )),
            (true, 0) => Some(SocketAddr::new(addr.ip(), 0)),
            (_, p) if p < -1 => return Err(invalid("http-port", "must be ≥ -1")),
            _ => None,
        };
        let stun_addr = stun.then_some(SocketAddr::new(addr.ip(), stun_port));
        let admin_addr = if admin_addr.trim().is_empty() {
            None
        } else {
            Some(
                admin_addr
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| invalid("admin-addr", e.to_string()))?,
            )
        };
        if let Some(a) = admin_addr
            && (Some(a) == http_addr || a == addr)
            && a.port() != 0
        {
            return Err(ConfigError::Combination(
                "--admin-addr must not be a public listener address".into(),
            ));
        }
        let home = match home.as_str() {
            "" => HomePage::Default,
            "blank" => HomePage::Blank,
            u if u.starts_with("http://") || u.starts_with("https://") => {
                HomePage::Redirect(u.to_owned())
            }
            other => return Err(invalid("home", format!("unknown value {other:?}"))),
        };
        let mesh_key = match &mesh_psk_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| invalid("mesh-psk-file", format!("{}: {e}", p.display())))?;
                Some(MeshKey::parse(&text).map_err(|e| invalid("mesh-psk-file", e.to_string()))?)
            }
            None => None,
        };
        let key_path = match config {
            Some(p) => Some(p),
            None if dev => None,
            None => {
                // Only root defaults to /var/lib/derper/derper.key (spec §8.1).
                if is_root() {
                    Some(PathBuf::from("/var/lib/derper/derper.key"))
                } else {
                    return Err(ConfigError::Combination(
                        "-c <config file> is required when not running as root".into(),
                    ));
                }
            }
        };
        let write_timeout = duration("tcp-write-timeout", &tcp_write_timeout)?;
        let mesh = match &mesh_key {
            Some(k) if !mesh_with.trim().is_empty() || mesh_peers_file.is_some() => {
                let roots = if mesh_with.trim().is_empty() {
                    Vec::new()
                } else {
                    crate::roots::system_roots()
                };
                Some(crate::mesh::MeshConfig {
                    mesh_key: k.clone(),
                    peers: crate::mesh::parse_mesh_with(&mesh_with, &roots)
                        .map_err(|e| invalid("mesh-with", e))?,
                    peers_file: mesh_peers_file,
                    poll: duration("mesh-peers-poll", &mesh_peers_poll)?
                        .max(Duration::from_millis(50)),
                })
            }
            _ => None,
        };
        let server = ServerOptions {
            write_timeout: (!write_timeout.is_zero()).then_some(write_timeout),
            mesh_key,
            admission,
            recv_rate,
            handshake_limit: handshake_connection_limit,
            handshake_limit_per_ip: handshake_connection_limit_per_ip,
            ..ServerOptions::default()
        };
        let ka = duration("tcp-keepalive-time", &tcp_keepalive_time)?;
        let ut = duration("tcp-user-timeout", &tcp_user_timeout)?;
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
            tcp: TcpOptions {
                keepalive: (!ka.is_zero()).then_some(ka),
                user_timeout: (!ut.is_zero()).then_some(ut),
            },
            log_format,
            dev,
            hostname,
            mesh,
            accept_limit,
        })
    }
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
}
