//! Command-line flags (clap derive). Names and meanings follow upstream Go `derper` where
//! they overlap (spec §8.1); every flag has a `DERPER_*` environment fallback. Validation
//! and cross-field checks happen in [`crate::config`], not here.
//!
//! Upstream spells long flags with one dash (`-hostname`); [`normalize_go_flags`] rewrites
//! those to `--hostname` so both spellings work.

use std::path::PathBuf;

use clap::{ArgAction, Parser, ValueEnum};

use crate::defaults;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Certificate mode (spec §8.1 `-certmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertMode {
    /// ACME with Let's Encrypt (not supported yet).
    Letsencrypt,
    /// Files in `--certdir` (self-signed IP certificate generated if missing).
    Manual,
    /// ACME with Google Public CA (not supported yet).
    Gcp,
}

/// Whether to append the metacert to the served chain (spec §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetacertFlag {
    /// On for CA-issued certificates, off for pinned self-signed ones.
    Auto,
    /// Always append (breaks v1.82 pinned clients).
    On,
    /// Never append (no fast start).
    Off,
}

/// `derper` — a Tailscale-compatible DERP relay.
#[derive(Debug, Parser)]
#[command(name = "derper", version, about)]
pub struct Args {
    /// Development mode: listen on :3340, random key, TLS off unless --certmode manual.
    #[arg(long, env = "DERPER_DEV")]
    pub dev: bool,

    /// HTTP(S) listen address (`:port`, `ip:port`, `[ip6]:port`). TLS iff the port is 443
    /// or --certmode manual.
    #[arg(short = 'a', long = "addr", env = "DERPER_ADDR", default_value = defaults::DEFAULT_ADDR)]
    pub addr: String,

    /// Plain HTTP port (redirects, /generate_204); -1 disables. Only used with TLS.
    #[arg(long, env = "DERPER_HTTP_PORT", default_value_t = defaults::DEFAULT_HTTP_PORT, allow_hyphen_values = true)]
    pub http_port: i32,

    /// UDP STUN port.
    #[arg(long, env = "DERPER_STUN_PORT", default_value_t = defaults::DEFAULT_STUN_PORT)]
    pub stun_port: u16,

    /// Run the STUN server.
    #[arg(long, env = "DERPER_STUN", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub stun: bool,

    /// Serve DERP on /derp (false: /derp answers 404).
    #[arg(long, env = "DERPER_DERP", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub derp: bool,

    /// Config file holding the server private key (JSON {"PrivateKey":"privkey:…"}),
    /// created if missing.
    #[arg(short = 'c', long = "config", env = "DERPER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Certificate mode.
    #[arg(long, env = "DERPER_CERTMODE", value_enum, default_value_t = CertMode::Letsencrypt)]
    pub certmode: CertMode,

    /// Directory for certificates (`<hostname>.crt` / `.key` in manual mode).
    #[arg(long, env = "DERPER_CERTDIR")]
    pub certdir: Option<PathBuf>,

    /// TLS host name; may be an IP address with --certmode manual.
    #[arg(long, env = "DERPER_HOSTNAME", default_value = defaults::DEFAULT_HOSTNAME)]
    pub hostname: String,

    /// Append the metacert to the certificate chain (spec §2.7).
    #[arg(long, env = "DERPER_METACERT", value_enum, default_value_t = MetacertFlag::Auto)]
    pub metacert: MetacertFlag,

    /// How often to check the certificate files for changes (e.g. 10s; 0 disables).
    #[arg(long, env = "DERPER_CERT_RELOAD_INTERVAL", default_value = "10s")]
    pub cert_reload_interval: String,

    /// What `/` serves: "" (default page), "blank", or an http(s):// URL to redirect to.
    #[arg(long, env = "DERPER_HOME", default_value = "")]
    pub home: String,

    /// File with the 64-hex-digit mesh pre-shared key.
    #[arg(long, env = "DERPER_MESH_PSK_FILE")]
    pub mesh_psk_file: Option<PathBuf>,

    /// Comma-separated mesh peers (upstream): `host`, `host:port` or `host/dialhost`;
    /// certificates verified against the system CA roots for `host`. May include this
    /// server (detected and ignored).
    #[arg(long, env = "DERPER_MESH_WITH", default_value = "")]
    pub mesh_with: String,

    /// Mesh peers file: one `host:port sha256-raw:<hex>` per line (`#` comments), pinned
    /// certificates; re-read when it changes, so peers come and go without a restart.
    #[arg(long, env = "DERPER_MESH_PEERS_FILE")]
    pub mesh_peers_file: Option<PathBuf>,

    /// How often to check --mesh-peers-file for changes (Go duration).
    #[arg(long, env = "DERPER_MESH_PEERS_POLL", default_value = "2s")]
    pub mesh_peers_poll: String,

    /// Names published on /bootstrap-dns (not supported yet).
    #[arg(long, env = "DERPER_BOOTSTRAP_DNS_NAMES", default_value = "")]
    pub bootstrap_dns_names: String,

    /// Names answered on /bootstrap-dns?q= only (not supported yet).
    #[arg(
        long,
        env = "DERPER_UNPUBLISHED_BOOTSTRAP_DNS_NAMES",
        default_value = ""
    )]
    pub unpublished_bootstrap_dns_names: String,

    /// Admit only clients known to the local tailscaled (LocalAPI whois over --socket).
    #[arg(long, env = "DERPER_VERIFY_CLIENTS")]
    pub verify_clients: bool,

    /// Admission webhook URL (http://): POST {"NodePublic","Source"} → {"Allow":bool}.
    #[arg(long, env = "DERPER_VERIFY_CLIENT_URL", default_value = "")]
    pub verify_client_url: String,

    /// Admit clients when the webhook is unreachable.
    #[arg(long, env = "DERPER_VERIFY_CLIENT_URL_FAIL_OPEN", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub verify_client_url_fail_open: bool,

    /// tailscaled socket for --verify-clients ("" = /var/run/tailscale/tailscaled.sock).
    #[arg(long, env = "DERPER_SOCKET", default_value = "")]
    pub socket: String,

    /// Accepted connections per second on the main listener (default +Inf = unlimited).
    #[arg(long, env = "DERPER_ACCEPT_CONNECTION_LIMIT", default_value_t = f64::INFINITY)]
    pub accept_connection_limit: f64,

    /// Burst for --accept-connection-limit.
    #[arg(long, env = "DERPER_ACCEPT_CONNECTION_BURST", default_value_t = i64::MAX)]
    pub accept_connection_burst: i64,

    /// Most connections still handshaking (TLS, HTTP head, DERP handshake up to
    /// admission) at once; more are closed at accept. 0 = no cap.
    #[arg(long, env = "DERPER_HANDSHAKE_CONNECTION_LIMIT", default_value_t = defaults::HANDSHAKE_LIMIT)]
    pub handshake_connection_limit: usize,

    /// Like --handshake-connection-limit, per source IPv4 address or IPv6 /64. 0 = no cap.
    #[arg(long, env = "DERPER_HANDSHAKE_CONNECTION_LIMIT_PER_IP", default_value_t = defaults::HANDSHAKE_LIMIT_PER_IP)]
    pub handshake_connection_limit_per_ip: usize,

    /// Per-client receive rate limit JSON file (upstream):
    /// {"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": M}; read at start.
    #[arg(long, env = "DERPER_RATE_CONFIG", default_value = "")]
    pub rate_config: String,

    /// TCP keepalive time (Go duration, e.g. 10m).
    #[arg(long, env = "DERPER_TCP_KEEPALIVE_TIME", default_value = "10m")]
    pub tcp_keepalive_time: String,

    /// TCP_USER_TIMEOUT (Go duration, e.g. 15s).
    #[arg(long, env = "DERPER_TCP_USER_TIMEOUT", default_value = "15s")]
    pub tcp_user_timeout: String,

    /// Per-write deadline for non-mesh DERP connections (Go duration; 0 = none).
    #[arg(long, env = "DERPER_TCP_WRITE_TIMEOUT", default_value = "2s")]
    pub tcp_write_timeout: String,

    /// ACME External Account Binding key ID (not supported yet).
    #[arg(long, env = "DERPER_ACME_EAB_KID", default_value = "")]
    pub acme_eab_kid: String,

    /// ACME External Account Binding key (not supported yet).
    #[arg(long, env = "DERPER_ACME_EAB_KEY", default_value = "")]
    pub acme_eab_key: String,

    /// ACME contact e-mail (not supported yet).
    #[arg(long, env = "DERPER_ACME_EMAIL", default_value = "")]
    pub acme_email: String,

    /// Let's Encrypt IP certificates (not supported yet).
    #[arg(long, env = "DERPER_ACME_IP_CERTS")]
    pub acme_ip_certs: bool,

    /// setec secrets URL for the mesh key (not supported yet).
    #[arg(long, env = "DERPER_SECRETS_URL", default_value = "")]
    pub secrets_url: String,

    /// Experimental CONNECT proxy (not supported).
    #[arg(long, env = "DERPER_ACE")]
    pub ace: bool,

    /// Admin listener for /metrics, /healthz, /readyz ("" disables). Never a public port.
    #[arg(long, env = "DERPER_ADMIN_ADDR", default_value = defaults::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,

    /// Log format.
    #[arg(long, env = "DERPER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

const GO_LONG_FLAGS: &[&str] = &[
    "dev",
    "addr",
    "http-port",
    "stun-port",
    "stun",
    "derp",
    "config",
    "certmode",
    "certdir",
    "hostname",
    "home",
    "mesh-psk-file",
    "mesh-with",
    "mesh-peers-file",
    "mesh-peers-poll",
    "bootstrap-dns-names",
    "unpublished-bootstrap-dns-names",
    "verify-clients",
    "verify-client-url",
    "verify-client-url-fail-open",
    "socket",
    "accept-connection-limit",
    "accept-connection-burst",
    "rate-config",
    "tcp-keepalive-time",
    "tcp-user-timeout",
    "tcp-write-timeout",
    "acme-eab-kid",
    "acme-eab-key",
    "acme-email",
    "acme-ip-certs",
    "secrets-url",
    "ace",
    "version",
    "metacert",
    "admin-addr",
    "log-format",
    "cert-reload-interval",
];

/// Rewrites Go-style single-dash long flags (`-hostname=x`, `-http-port 80`) to `--…`.
pub fn normalize_go_flags<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i == 0 || a.starts_with("--") || !a.starts_with('-') || a.len() <= 2 {
                return a;
            }
            let name = a[1..].split('=').next().unwrap_or("");
            if GO_LONG_FLAGS.contains(&name) {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// Parses a Go-style duration: `0`, `500ms`, `15s`, `10m`, `1h30m`, `1.5s`.
pub fn parse_go_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {s:?}"))?;
        let (num, tail) = rest.split_at(num_end);
        let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit {unit:?} in duration {s:?}")),
        };
        total += v * mult;
        rest = tail;
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(
            parse_go_duration("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("5x").is_err());
    }

    #[test]
    fn go_single_dash_flags_are_accepted() {
        let v = normalize_go_flags(
            [
                "derper",
                "-hostname=1.2.3.4",
                "-a",
                ":443",
                "-http-port",
                "-1",
                "-c",
                "k",
            ]
            .map(String::from),
        );
        assert_eq!(
            v,
            [
                "derper",
                "--hostname=1.2.3.4",
                "-a",
                ":443",
                "--http-port",
                "-1",
                "-c",
                "k"
            ]
        );
        let a = Args::try_parse_from(v).unwrap();
        assert_eq!(a.http_port, -1);
        assert_eq!(a.hostname, "1.2.3.4");
    }

    #[test]
    fn bool_flags_take_optional_values() {
        let a = Args::try_parse_from(["derper", "--stun=false", "--derp"]).unwrap();
        assert!(!a.stun);
        assert!(a.derp);
    }
}
