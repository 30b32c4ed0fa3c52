//! Command-line flags (clap derive). Names and meanings follow upstream Go `derper` where
//! they overlap (spec §8.1); every flag has a `DERPER_*` environment fallback. Validation
//! and cross-field checks happen in [`crate::config`], not here.
//!
//! Command lines written for upstream pass flags the way Go's `flag` package accepts them
//! (`-f`, `--f`, `-f=v`, `-f v`, and `-f=false` for booleans, which never take a separate
//! argument). [`normalize_go_flags`] rewrites such a command line into the one canonical form
//! clap parses (`--long=value`), driven by [`UPSTREAM_FLAGS`] (upstream's flag list, with what
//! each flag is called here or that it is not supported) and by the flags clap itself knows
//! (kubederp's extensions such as `--admin-addr`).

use std::path::PathBuf;

use clap::{ArgAction, CommandFactory as _, Parser, ValueEnum};

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
#[command(name = "derper", version, about, args_override_self = true)]
pub struct Args {
    /// Development mode: listen on :3340, random key, TLS off unless --certmode manual.
    #[arg(long, env = "DERPER_DEV", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
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
    #[arg(long, env = "DERPER_STUN", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub stun: bool,

    /// Serve DERP on /derp (false: /derp answers 404).
    #[arg(long, env = "DERPER_DERP", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
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
    #[arg(long, env = "DERPER_VERIFY_CLIENTS", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub verify_clients: bool,

    /// Admission webhook URL (http://): POST {"NodePublic","Source"} → {"Allow":bool}.
    #[arg(long, env = "DERPER_VERIFY_CLIENT_URL", default_value = "")]
    pub verify_client_url: String,

    /// Admit clients when the webhook is unreachable.
    #[arg(long, env = "DERPER_VERIFY_CLIENT_URL_FAIL_OPEN", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
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
    #[arg(long, env = "DERPER_ACME_IP_CERTS", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub acme_ip_certs: bool,

    /// setec secrets URL for the mesh key (not supported yet).
    #[arg(long, env = "DERPER_SECRETS_URL", default_value = "")]
    pub secrets_url: String,

    /// Experimental CONNECT proxy (not supported).
    #[arg(long, env = "DERPER_ACE", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = parse_go_bool)]
    pub ace: bool,

    /// Admin listener for /metrics, /healthz, /readyz ("" disables). Never a public port.
    #[arg(long, env = "DERPER_ADMIN_ADDR", default_value = defaults::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: String,

    /// Log format.
    #[arg(long, env = "DERPER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

/// How a flag takes its value on a Go command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// `flag.Bool`: `-f` alone means true; a value only as `-f=v` (a `strconv.ParseBool`
    /// spelling), never as a separate argument.
    Bool,
    /// Every other flag type: `-f=v`, or `-f v` where `v` is the next argument whatever it
    /// looks like (`-http-port -1`).
    Value,
}

/// One flag of upstream `cmd/derper`, and what it is called here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFlag {
    /// Upstream's name, without dashes (`a`, `verify-clients`).
    pub name: &'static str,
    /// Whether it is a boolean flag.
    pub kind: FlagKind,
    /// The long name of the same flag in [`Args`], or `None` when kubederp's derper does not
    /// have it (the command line is then refused, naming the flag).
    pub ours: Option<&'static str>,
}

const fn upstream(name: &'static str, kind: FlagKind, ours: Option<&'static str>) -> UpstreamFlag {
    UpstreamFlag { name, kind, ours }
}

use FlagKind::{Bool, Value};

/// Every flag upstream `derper` defines (tailscale.com v1.104.7 `cmd/derper`, as listed by
/// `derper -h`; `tests/tests/upstream_flags.rs` checks this list and the kinds against that
/// binary). Flags accepted here but refused later by [`crate::config`] when set (ACME,
/// `-secrets-url`, bootstrap DNS, `-ace`) have a name in `ours`: their defaults keep working.
pub const UPSTREAM_FLAGS: &[UpstreamFlag] = &[
    upstream("a", Value, Some("addr")),
    upstream(
        "accept-connection-burst",
        Value,
        Some("accept-connection-burst"),
    ),
    upstream(
        "accept-connection-limit",
        Value,
        Some("accept-connection-limit"),
    ),
    upstream("ace", Bool, Some("ace")),
    upstream("acme-eab-key", Value, Some("acme-eab-key")),
    upstream("acme-eab-kid", Value, Some("acme-eab-kid")),
    upstream("acme-email", Value, Some("acme-email")),
    upstream("acme-ip-certs", Bool, Some("acme-ip-certs")),
    upstream("bootstrap-dns-names", Value, Some("bootstrap-dns-names")),
    upstream("c", Value, Some("config")),
    upstream("certdir", Value, Some("certdir")),
    upstream("certmode", Value, Some("certmode")),
    upstream("derp", Bool, Some("derp")),
    upstream("dev", Bool, Some("dev")),
    upstream("disallow-app-names", Value, None),
    upstream("home", Value, Some("home")),
    upstream("hostname", Value, Some("hostname")),
    upstream("http-port", Value, Some("http-port")),
    upstream("mesh-psk-file", Value, Some("mesh-psk-file")),
    upstream("mesh-with", Value, Some("mesh-with")),
    upstream("rate-config", Value, Some("rate-config")),
    upstream("secrets-cache-dir", Value, None),
    upstream("secrets-path-prefix", Value, None),
    upstream("secrets-url", Value, Some("secrets-url")),
    upstream("socket", Value, Some("socket")),
    upstream("stun", Bool, Some("stun")),
    upstream("stun-port", Value, Some("stun-port")),
    upstream("tcp-keepalive-time", Value, Some("tcp-keepalive-time")),
    upstream("tcp-user-timeout", Value, Some("tcp-user-timeout")),
    upstream("tcp-write-timeout", Value, Some("tcp-write-timeout")),
    upstream(
        "unpublished-bootstrap-dns-names",
        Value,
        Some("unpublished-bootstrap-dns-names"),
    ),
    upstream("verify-client-url", Value, Some("verify-client-url")),
    upstream(
        "verify-client-url-fail-open",
        Bool,
        Some("verify-client-url-fail-open"),
    ),
    upstream("verify-clients", Bool, Some("verify-clients")),
    upstream("version", Bool, Some("version")),
];

/// A command line that does not fit derper's flags, worded like Go's `flag` package where it
/// has a message for the case. `derper` prints it and exits with status 2, as upstream does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// An upstream flag kubederp's derper does not have.
    #[error("upstream flag -{0} is not supported by kubederp derper (yet)")]
    Unsupported(&'static str),
    /// Neither an upstream flag nor one of ours.
    #[error("flag provided but not defined: -{0}")]
    Undefined(String),
    /// A value flag at the end of the command line.
    #[error("flag needs an argument: -{0}")]
    MissingValue(String),
    /// `-f=v` for a boolean flag with `v` not a `strconv.ParseBool` spelling.
    #[error("invalid boolean value {value:?} for -{flag}: {reason}")]
    InvalidBool {
        /// The flag.
        flag: String,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// `---f`, `-=v`.
    #[error("bad flag syntax: {0}")]
    BadSyntax(String),
    /// An argument that is not a flag. Go's `flag` package stops there and upstream derper
    /// ignores it and everything after it; refusing is safer than ignoring flags silently.
    #[error(
        "unexpected argument {0:?}: derper takes no positional arguments (a boolean flag takes \
         its value as -flag=false, never as a separate argument)"
    )]
    Positional(String),
}

/// Parses a boolean the way Go's `strconv.ParseBool` does (the only spellings upstream's
/// boolean flags accept): `1 t T TRUE true True` and `0 f F FALSE false False`.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err("want one of 1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False".into()),
    }
}

/// How clap takes a flag, which decides the canonical form [`normalize_go_flags`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A boolean with a value (`--stun=false`): written `--long=true|false`.
    BoolValue,
    /// A switch without a value (`--version`, `--help`, any `SetTrue`): written `--long` when
    /// true; a false removes earlier occurrences (the last one wins, as in Go).
    BoolSwitch,
    /// Everything else: written `--long=value`.
    Value,
}

impl Shape {
    fn of(arg: &clap::Arg) -> Self {
        if !arg.get_action().takes_values() {
            Shape::BoolSwitch
        } else if arg.get_value_parser().type_id() == std::any::TypeId::of::<bool>() {
            Shape::BoolValue
        } else {
            Shape::Value
        }
    }

    #[cfg(test)]
    fn kind(self) -> FlagKind {
        match self {
            Shape::BoolValue | Shape::BoolSwitch => Bool,
            Shape::Value => Value,
        }
    }
}

/// The clap long name and shape of the flag a Go command line calls `name`: upstream's
/// table first, then our own long and short names (extensions such as `--admin-addr`,
/// `-h`, `-V`).
fn lookup(cmd: &clap::Command, name: &str) -> Result<(String, Shape), FlagError> {
    let wanted = match UPSTREAM_FLAGS.iter().find(|f| f.name == name) {
        Some(f) => f.ours.ok_or(FlagError::Unsupported(f.name))?,
        None => name,
    };
    let mut chars = wanted.chars();
    let short = match (chars.next(), chars.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    };
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(wanted) || (short.is_some() && a.get_short() == short))
        .and_then(|a| Some((a.get_long()?.to_owned(), Shape::of(a))))
        .ok_or_else(|| FlagError::Undefined(name.to_owned()))
}

/// Rewrites a command line in any form Go's `flag` package accepts (`-f`, `--f`, `-f=v`,
/// `--f=v`, `-f v` for value flags, `-f=<ParseBool spelling>` for booleans) into the one form
/// clap parses here, `--long=value`, with the same meaning. The first element (the program
/// name) is kept as is. Fails on flags upstream has but kubederp does not, on unknown flags,
/// and on positional arguments.
pub fn normalize_go_flags<I: IntoIterator<Item = String>>(
    args: I,
) -> Result<Vec<String>, FlagError> {
    let mut cmd = Args::command();
    cmd.build();
    let mut it = args.into_iter();
    let mut out: Vec<String> = it.next().into_iter().collect();
    while let Some(arg) = it.next() {
        if arg == "--" {
            // Go: "--" ends the flags; derper has no positional arguments.
            return match it.next() {
                Some(extra) => Err(FlagError::Positional(extra)),
                None => Ok(out),
            };
        }
        let body = match arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
            Some(b) if !b.is_empty() => b,
            _ => return Err(FlagError::Positional(arg)),
        };
        if body.starts_with('-') || body.starts_with('=') {
            return Err(FlagError::BadSyntax(arg));
        }
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (body, None),
        };
        let (long, shape) = lookup(&cmd, name)?;
        let truth = |value: Option<&str>| match value {
            None => Ok(true),
            Some(v) => parse_go_bool(v).map_err(|reason| FlagError::InvalidBool {
                flag: name.to_owned(),
                value: v.to_owned(),
                reason,
            }),
        };
        match shape {
            Shape::Value => {
                let v = match value {
                    Some(v) => v.to_owned(),
                    None => it
                        .next()
                        .ok_or_else(|| FlagError::MissingValue(name.to_owned()))?,
                };
                out.push(format!("--{long}={v}"));
            }
            Shape::BoolValue => out.push(format!("--{long}={}", truth(value)?)),
            Shape::BoolSwitch => {
                let switch = format!("--{long}");
                out.retain(|a| *a != switch);
                if truth(value)? {
                    out.push(switch);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches as _;

    fn norm(args: &[&str]) -> Result<Vec<String>, FlagError> {
        normalize_go_flags(
            std::iter::once("derper")
                .chain(args.iter().copied())
                .map(String::from),
        )
    }

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(norm(args).expect("normalize")).expect("clap")
    }

    #[test]
    fn go_single_dash_flags_are_accepted() {
        let v = norm(&[
            "-hostname=1.2.3.4",
            "-a",
            ":443",
            "-http-port",
            "-1",
            "-c",
            "k",
        ])
        .unwrap();
        assert_eq!(
            v,
            [
                "derper",
                "--hostname=1.2.3.4",
                "--addr=:443",
                "--http-port=-1",
                "--config=k",
            ]
        );
        let a = Args::try_parse_from(v).unwrap();
        assert_eq!(a.http_port, -1);
        assert_eq!(a.hostname, "1.2.3.4");
        assert_eq!(a.addr, ":443");
    }

    #[test]
    fn bool_flags_take_optional_values() {
        let a = Args::try_parse_from(["derper", "--stun=false", "--derp"]).unwrap();
        assert!(!a.stun);
        assert!(a.derp);
    }

    /// A value per upstream value flag that both Go and clap accept, different from the
    /// default so that a parse that ignored it would show.
    fn sample(name: &str) -> &'static str {
        match name {
            "certmode" => "manual",
            "home" => "blank",
            "http-port" => "-1",
            "stun-port" => "3479",
            "accept-connection-limit" => "2.5",
            "accept-connection-burst" => "7",
            "tcp-keepalive-time" | "tcp-user-timeout" | "tcp-write-timeout" => "7s",
            _ => "-sample/value",
        }
    }

    const TRUE: [&str; 6] = ["1", "t", "T", "TRUE", "true", "True"];
    const FALSE: [&str; 6] = ["0", "f", "F", "FALSE", "false", "False"];

    /// The value clap ended up with for the long flag `long`, as text, and whether it came
    /// from the command line.
    fn parsed(argv: &[String], long: &str) -> (String, bool) {
        let m = Args::command()
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        Args::from_arg_matches(&m).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let cmd = Args::command();
        let id = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .expect("flag exists")
            .get_id()
            .as_str()
            .to_owned();
        let from_cli = m.value_source(&id) == Some(clap::parser::ValueSource::CommandLine);
        let text = m
            .get_raw(&id)
            .and_then(|mut v| v.next_back())
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        (text, from_cli)
    }

    #[test]
    fn upstream_table_matches_our_flags() {
        let mut cmd = Args::command();
        cmd.build();
        for f in UPSTREAM_FLAGS {
            match f.ours {
                Some(long) => {
                    let arg = cmd
                        .get_arguments()
                        .find(|a| a.get_long() == Some(long))
                        .unwrap_or_else(|| panic!("-{} maps to missing --{long}", f.name));
                    assert_eq!(Shape::of(arg).kind(), f.kind, "-{}", f.name);
                }
                None => assert!(
                    cmd.get_arguments().all(|a| a.get_long() != Some(f.name)),
                    "-{} is marked unsupported but --{} exists",
                    f.name,
                    f.name
                ),
            }
        }
    }

    /// Every upstream flag in every form Go's flag package accepts parses with the same
    /// meaning; unsupported ones are refused in every form with a message naming them.
    #[test]
    fn every_upstream_flag_parses_in_every_go_form() {
        for f in UPSTREAM_FLAGS {
            let n = f.name;
            let forms: Vec<(Vec<String>, String)> = match f.kind {
                Value => {
                    let v = sample(n);
                    [
                        vec![format!("-{n}"), v.to_owned()],
                        vec![format!("--{n}"), v.to_owned()],
                        vec![format!("-{n}={v}")],
                        vec![format!("--{n}={v}")],
                    ]
                    .into_iter()
                    .map(|a| (a, v.to_owned()))
                    .collect()
                }
                Bool => {
                    let mut forms = vec![
                        (vec![format!("-{n}")], "true".to_owned()),
                        (vec![format!("--{n}")], "true".to_owned()),
                    ];
                    for (spellings, meaning) in [(TRUE, "true"), (FALSE, "false")] {
                        for s in spellings {
                            for dashes in ["-", "--"] {
                                forms.push((vec![format!("{dashes}{n}={s}")], meaning.to_owned()));
                            }
                        }
                    }
                    forms
                }
            };
            for (form, meaning) in forms {
                let args: Vec<&str> = form.iter().map(String::as_str).collect();
                let Some(long) = f.ours else {
                    assert_eq!(norm(&args), Err(FlagError::Unsupported(n)), "{form:?}");
                    assert_eq!(
                        FlagError::Unsupported(n).to_string(),
                        format!("upstream flag -{n} is not supported by kubederp derper (yet)")
                    );
                    continue;
                };
                let argv = norm(&args).unwrap_or_else(|e| panic!("{form:?}: {e}"));
                if n == "version" {
                    // clap's --version switch: present exactly when true
                    assert_eq!(argv.contains(&"--version".to_owned()), meaning == "true");
                    continue;
                }
                let (got, from_cli) = parsed(&argv, long);
                assert_eq!(got, meaning, "{form:?} → {argv:?}");
                assert!(from_cli, "{form:?}");
            }
        }
    }

    #[test]
    fn go_flag_syntax_edge_cases() {
        // a bool flag never takes a separate argument
        assert_eq!(
            norm(&["-dev", "false"]),
            Err(FlagError::Positional("false".into()))
        );
        assert!(matches!(
            norm(&["-verify-clients=yes"]),
            Err(FlagError::InvalidBool { .. })
        ));
        assert!(matches!(
            norm(&["-stun="]),
            Err(FlagError::InvalidBool { .. })
        ));
        // a value flag takes the next argument whatever it looks like
        assert_eq!(parse(&["-hostname", "-dev"]).hostname, "-dev");
        assert_eq!(
            norm(&["-hostname"]),
            Err(FlagError::MissingValue("hostname".into()))
        );
        assert_eq!(parse(&["-home=http://x/?a=b"]).home, "http://x/?a=b");
        // the last occurrence wins, as in Go
        let a = parse(&[
            "-verify-clients",
            "-verify-clients=false",
            "-stun=0",
            "-stun",
        ]);
        assert!(!a.verify_clients);
        assert!(a.stun);
        assert_eq!(parse(&["-a", ":1", "--a=:2"]).addr, ":2");
        assert_eq!(norm(&["-version", "-version=false"]).unwrap(), ["derper"]);
        // syntax Go refuses
        assert_eq!(
            norm(&["---dev"]),
            Err(FlagError::BadSyntax("---dev".into()))
        );
        assert_eq!(norm(&["-=x"]), Err(FlagError::BadSyntax("-=x".into())));
        assert_eq!(norm(&["-"]), Err(FlagError::Positional("-".into())));
        assert_eq!(norm(&["-nope"]), Err(FlagError::Undefined("nope".into())));
        // "--" ends the flags; nothing may follow
        assert_eq!(norm(&["-dev", "--"]).unwrap(), ["derper", "--dev=true"]);
        assert_eq!(
            norm(&["--", "-dev"]),
            Err(FlagError::Positional("-dev".into()))
        );
        // our own flags (not upstream's) take the same forms
        let a = parse(&["-admin-addr", "127.0.0.1:1", "-log-format=json"]);
        assert_eq!(a.admin_addr, "127.0.0.1:1");
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(norm(&["-h"]).unwrap(), ["derper", "--help"]);
    }

    #[test]
    fn go_bool_spellings_are_exactly_parse_bools() {
        for s in TRUE {
            assert_eq!(parse_go_bool(s), Ok(true));
        }
        for s in FALSE {
            assert_eq!(parse_go_bool(s), Ok(false));
        }
        for s in ["", "yes", "no", "on", "off", "tRUE", "y", "2", " true"] {
            assert!(parse_go_bool(s).is_err(), "{s:?}");
        }
    }
}
