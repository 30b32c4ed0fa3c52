//! `derpprobe`: checks every node of a derpMap as a real Tailscale client would (TCP, TLS
//! with the `sha256-raw:` pin, DERP handshake, a packet round trip, STUN, and packets across
//! every mesh pair) and prints a table, JSON, or serves Prometheus metrics continuously.
//!
//! The map comes from a file, an `http://` URL (e.g. the operator's `/derpmap.json`), or a
//! ConfigMap written by the operator (`--configmap namespace/name`). The ConfigMap is read by
//! running `kubectl get configmap -o json` (honouring `--kubeconfig`/`--context`, else
//! kubectl's own defaults): this keeps kube-rs and its dependency tree out of `derper`.
//! All three published formats are accepted (`derpmap.json`, `policy.hujson`,
//! `headscale.yaml`), auto-detected unless `--format` says otherwise.
//!
//! Exit status: 0 when every check passed, 1 when any check failed, 2 when the map cannot
//! be read or the command line is wrong.
//!
//! The checks themselves live in [`derper::probe`]; this file owns only input, output and
//! the metrics loop.
//!
//! ```text
//! derpprobe --derp-map derpmap.json                     # table, exit 0/1/2
//! derpprobe --derp-map http://127.0.0.1:8080/derpmap.json --json
//! derpprobe --configmap derp/home-derpmap --format headscale --region 900
//! derpprobe --derp-map policy.hujson --listen 127.0.0.1:9091 --interval 30s
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::Parser;
use derper::args::LogFormat;
use derper::derpmap::MapFormat;
use derper::probe::load::{Kubectl, LoadedMap, MapSource, load_map};
use derper::probe::{self, ProbeOptions, Report, Status};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Exit status when a check failed.
const EXIT_FAILED: u8 = 1;
/// Exit status when the map could not be read (clap also uses 2 for usage errors).
const EXIT_MAP: u8 = 2;
/// Default per-step limit (Go's DERP client allows 10 s for connect + handshake; a probe
/// should report sooner).
const DEFAULT_TIMEOUT: &str = "5s";
/// Default STUN limit (`tailscale debug derp` waits 5 s for one request; we send three).
const DEFAULT_STUN_TIMEOUT: &str = "3s";
/// Default limit for one cross-node delivery (mesh forwarders appear within a second of a
/// client connecting).
const DEFAULT_MESH_TIMEOUT: &str = "3s";
/// Default time between runs in --listen mode (a Prometheus scrape interval).
const DEFAULT_INTERVAL: &str = "30s";

/// Probe every node of a derpMap like a Tailscale client would: TCP, TLS with the
/// sha256-raw pin, DERP handshake, a packet round trip, packets across every mesh pair, STUN.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Exit status: 0 every check passed, 1 a check failed, 2 the map could not be read or the command line is wrong.\n\
                  Map formats: derpmap.json (tailcfg JSON), policy.hujson (\"derpMap\" block or whole policy file), headscale.yaml."
)]
struct Args {
    /// derpMap file, or an http:// URL (e.g. the operator's /derpmap.json).
    #[arg(
        long,
        env = "DERPPROBE_DERP_MAP",
        required_unless_present = "configmap"
    )]
    derp_map: Option<String>,

    /// Read the map from this ConfigMap (`namespace/name`) via kubectl.
    #[arg(long, env = "DERPPROBE_CONFIGMAP", conflicts_with = "derp_map")]
    configmap: Option<String>,

    /// ConfigMap key to read [default: the one for --format, else derpmap.json, policy.hujson,
    /// headscale.yaml, whichever exists first].
    #[arg(long, env = "DERPPROBE_CONFIGMAP_KEY", requires = "configmap")]
    configmap_key: Option<String>,

    /// kubeconfig for --configmap (passed to kubectl; default: kubectl's own lookup).
    #[arg(long, env = "DERPPROBE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// kubeconfig context for --configmap.
    #[arg(long, env = "DERPPROBE_CONTEXT")]
    context: Option<String>,

    /// kubectl binary used for --configmap.
    #[arg(long, env = "DERPPROBE_KUBECTL", default_value = "kubectl")]
    kubectl: PathBuf,

    /// Map format: auto, json (derpmap.json), policy (policy.hujson) or headscale
    /// (headscale.yaml).
    #[arg(long, env = "DERPPROBE_FORMAT", default_value = "auto")]
    format: String,

    /// Only probe these regions (ID or code; repeat or comma-separate).
    #[arg(long = "region", env = "DERPPROBE_REGION", value_delimiter = ',')]
    regions: Vec<String>,

    /// Print the report as JSON instead of a table.
    #[arg(long, env = "DERPPROBE_JSON")]
    json: bool,

    /// Limit for each step (TCP, TLS, DERP handshake, packet delivery), e.g. 5s, 500ms.
    #[arg(long, env = "DERPPROBE_TIMEOUT", default_value = DEFAULT_TIMEOUT, value_parser = positive_duration)]
    timeout: Duration,

    /// Limit for the STUN check.
    #[arg(long, env = "DERPPROBE_STUN_TIMEOUT", default_value = DEFAULT_STUN_TIMEOUT, value_parser = positive_duration)]
    stun_timeout: Duration,

    /// Limit for each cross-node (mesh) delivery.
    #[arg(long, env = "DERPPROBE_MESH_TIMEOUT", default_value = DEFAULT_MESH_TIMEOUT, value_parser = positive_duration)]
    mesh_timeout: Duration,

    /// Skip the cross-node (mesh) checks.
    #[arg(long, env = "DERPPROBE_NO_MESH")]
    no_mesh: bool,

    /// PEM trust anchors for nodes without a sha256-raw pin (otherwise their certificates are
    /// recorded but not verified).
    #[arg(long, env = "DERPPROBE_CA_FILE")]
    ca_file: Option<PathBuf>,

    /// Run continuously and serve Prometheus metrics on ADDR (/metrics, /healthz, /readyz).
    #[arg(long, env = "DERPPROBE_LISTEN")]
    listen: Option<SocketAddr>,

    /// Time between probe runs with --listen.
    #[arg(long, env = "DERPPROBE_INTERVAL", default_value = DEFAULT_INTERVAL, value_parser = positive_duration)]
    interval: Duration,

    /// Log format (logs go to stderr).
    #[arg(long, env = "DERPPROBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
}

/// A positive Go duration (`500ms`, `5s`, `2m`, `1h`; [`derper::duration`]).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match derper::duration::parse_go_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("duration {s:?} must be positive")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

impl Config {
    /// Loads, parses and filters the map (see [`load_map`]).
    async fn load_map(&self) -> Result<LoadedMap, String> {
        load_map(&self.source, self.format, &self.regions, &self.kubectl).await
    }
}

/// Validated settings (no options left for required values).
#[derive(Debug)]
struct Config {
    source: MapSource,
    format: Option<MapFormat>,
    regions: Vec<String>,
    json: bool,
    probe: ProbeOptions,
    listen: Option<SocketAddr>,
    interval: Duration,
    kubectl: Kubectl,
}

impl Args {
    fn into_config(self) -> Result<(Config, LogFormat), String> {
        let Args {
            derp_map,
            configmap,
            configmap_key,
            kubeconfig,
            context,
            kubectl,
            format,
            regions,
            json,
            timeout,
            stun_timeout,
            mesh_timeout,
            no_mesh,
            ca_file,
            listen,
            interval,
            log_format,
        } = self;
        let format = match format.as_str() {
            "auto" | "" => None,
            f => Some(f.parse::<MapFormat>()?),
        };
        let source = match (derp_map, configmap) {
            (Some(m), None) => {
                if m.starts_with("http://") {
                    MapSource::Url(m)
                } else if m.starts_with("https://") {
                    return Err(format!(
                        "--derp-map {m}: https URLs are not supported; use http:// (e.g. the \
                         operator's Service), a file, or --configmap"
                    ));
                } else {
                    MapSource::File(PathBuf::from(m))
                }
            }
            (None, Some(cm)) => {
                let Some((ns, name)) = cm.split_once('/') else {
                    return Err(format!("--configmap {cm:?}: expected namespace/name"));
                };
                if ns.is_empty() || name.is_empty() || name.contains('/') {
                    return Err(format!("--configmap {cm:?}: expected namespace/name"));
                }
                MapSource::ConfigMap {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                    key: configmap_key,
                }
            }
            _ => return Err("give exactly one of --derp-map and --configmap".into()),
        };
        let mut roots = Vec::new();
        if let Some(path) = ca_file {
            let pem =
                std::fs::read(&path).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.push(c.map_err(|e| format!("--ca-file {}: {e}", path.display()))?);
            }
            if roots.is_empty() {
                return Err(format!(
                    "--ca-file {}: no PEM certificates found",
                    path.display()
                ));
            }
        }
        let probe = ProbeOptions {
            timeout,
            stun_timeout,
            mesh_timeout,
            mesh: !no_mesh,
            roots,
        };
        Ok((
            Config {
                source,
                format,
                regions,
                json,
                probe,
                listen,
                interval,
                kubectl: Kubectl {
                    program: kubectl,
                    kubeconfig,
                    context,
                },
            },
            log_format,
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Output

fn cell(c: &probe::Check) -> String {
    let word = match c.status {
        Status::Pass => "ok",
        Status::Fail => "FAIL",
        Status::Skip => "-",
    };
    match c.latency_ms {
        Some(ms) if c.status == Status::Pass => format!("{word} {ms:.1}ms"),
        _ => word.to_owned(),
    }
}

/// Renders the human table, then mesh checks, notes and failure explanations.
fn render_table(report: &Report, source: &str, format: MapFormat) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        [
            "REGION",
            "NODE",
            "ADDRESS",
            "TCP",
            "TLS",
            "DERP",
            "ROUNDTRIP",
            "STUN",
            "MAPPED",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    ];
    for r in &report.regions {
        for n in &r.nodes {
            let mut row = vec![
                format!("{} {}", r.region_id, r.region_code)
                    .trim()
                    .to_owned(),
                n.name.clone(),
                n.address
                    .clone()
                    .or_else(|| n.stun_address.clone())
                    .unwrap_or_else(|| "-".into()),
            ];
            row.extend(n.checks.iter().iter().map(|(_, c)| cell(c)));
            row.push(n.stun_mapped_address.clone().unwrap_or_else(|| "-".into()));
            rows.push(row);
            if let Some(f) = &n.ipv6 {
                rows.push(vec![
                    format!("{} {}", r.region_id, r.region_code)
                        .trim()
                        .to_owned(),
                    format!("{} (v6)", n.name),
                    f.address.clone(),
                    cell(&f.tcp),
                    cell(&f.tls),
                    cell(&f.derp),
                    "-".to_owned(),
                    cell(&f.stun),
                    "-".to_owned(),
                ]);
            }
        }
    }
    let ncol = rows[0].len();
    let widths: Vec<usize> = (0..ncol)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!("derpMap: {source} ({format})\n");
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let mesh: Vec<_> = report
        .regions
        .iter()
        .flat_map(|r| r.mesh.iter().map(move |m| (r, m)))
        .collect();
    if !mesh.is_empty() {
        out.push_str("\nmesh (packet between probe clients on different nodes):\n");
        for (r, m) in mesh {
            out.push_str(&format!(
                "  {} {} -> {}  {}\n",
                r.region_id,
                m.from,
                m.to,
                cell(&m.check)
            ));
        }
    }
    let mut notes = Vec::new();
    for r in &report.regions {
        for n in &r.nodes {
            for note in &n.notes {
                notes.push(format!("  {}/{}: {note}", r.region_id, n.name));
            }
        }
    }
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    let failures = report.failures();
    let total: usize = report
        .regions
        .iter()
        .map(|r| {
            r.nodes
                .iter()
                .map(|n| {
                    n.checks
                        .iter()
                        .iter()
                        .chain(
                            n.ipv6
                                .iter()
                                .flat_map(|f| f.iter())
                                .collect::<Vec<_>>()
                                .iter(),
                        )
                        .filter(|(_, c)| c.status != Status::Skip)
                        .count()
                })
                .sum::<usize>()
                + r.mesh.len()
        })
        .sum();
    if failures.is_empty() {
        out.push_str(&format!("\nall {total} checks passed\n"));
    } else {
        out.push_str(&format!("\n{} of {total} checks failed:\n", failures.len()));
        for f in failures {
            out.push_str(&format!("  {f}\n"));
        }
    }
    out
}

#[allow(clippy::print_stdout)]
fn print_out(s: &str) {
    print!("{s}");
}

// ---------------------------------------------------------------------------------------
// Metrics

type Labels = Vec<(String, String)>;

/// derpprobe's metrics, registered under the `derpprobe` prefix.
#[derive(Debug, Default)]
struct Metrics {
    check_ok: Family<Labels, Gauge>,
    check_latency: Family<Labels, Gauge<f64, AtomicU64>>,
    mesh_ok: Family<Labels, Gauge>,
    mesh_latency: Family<Labels, Gauge<f64, AtomicU64>>,
    runs: Counter,
    failed_runs: Counter,
    map_errors: Counter,
    last_run_ok: Gauge,
    last_run_timestamp: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn register(r: &mut Registry) -> Arc<Self> {
        let m = Self::default();
        r.register(
            "check_ok",
            "1 when the last probe of this node's check passed, 0 when it failed (not set when \
             skipped); check = tcp|tls|derp|round_trip|stun, ipv6_tcp|ipv6_tls|ipv6_derp|ipv6_stun \
             for the IPv6 address of dual-stack nodes",
            m.check_ok.clone(),
        );
        r.register(
            "check_latency_seconds",
            "Latency of the last passed check",
            m.check_latency.clone(),
        );
        r.register(
            "mesh_ok",
            "1 when the last packet from a probe client on `from` reached one on `to`",
            m.mesh_ok.clone(),
        );
        r.register(
            "mesh_latency_seconds",
            "Delivery time of the last cross-node packet",
            m.mesh_latency.clone(),
        );
        r.register(
            "runs",
            "Probe runs completed (map read and probed)",
            m.runs.clone(),
        );
        r.register(
            "failed_runs",
            "Probe runs in which at least one check failed",
            m.failed_runs.clone(),
        );
        r.register(
            "map_errors",
            "Probe runs that could not read or parse the derpMap",
            m.map_errors.clone(),
        );
        r.register(
            "last_run_ok",
            "1 when every check of the last run passed",
            m.last_run_ok.clone(),
        );
        r.register(
            "last_run_timestamp_seconds",
            "Unix time the last run finished",
            m.last_run_timestamp.clone(),
        );
        Arc::new(m)
    }

    fn record(&self, report: &Report) {
        // Regions or nodes may disappear between runs: start from empty families.
        self.check_ok.clear();
        self.check_latency.clear();
        self.mesh_ok.clear();
        self.mesh_latency.clear();
        for r in &report.regions {
            for n in &r.nodes {
                let v6 = n
                    .ipv6
                    .iter()
                    .flat_map(|f| f.iter())
                    .map(|(name, c)| (format!("ipv6_{name}"), c));
                for (check, c) in n
                    .checks
                    .iter()
                    .into_iter()
                    .map(|(name, c)| (name.to_owned(), c))
                    .chain(v6)
                {
                    if c.status == Status::Skip {
                        continue;
                    }
                    let labels = vec![
                        ("region".to_owned(), r.region_id.to_string()),
                        ("node".to_owned(), n.name.clone()),
                        ("check".to_owned(), check),
                    ];
                    self.check_ok
                        .get_or_create(&labels)
                        .set(i64::from(c.status == Status::Pass));
                    if let Some(ms) = c.latency_ms {
                        self.check_latency.get_or_create(&labels).set(ms / 1000.0);
                    }
                }
            }
            for m in &r.mesh {
                let labels = vec![
                    ("region".to_owned(), r.region_id.to_string()),
                    ("from".to_owned(), m.from.clone()),
                    ("to".to_owned(), m.to.clone()),
                ];
                self.mesh_ok
                    .get_or_create(&labels)
                    .set(i64::from(m.check.status == Status::Pass));
                if let Some(ms) = m.check.latency_ms {
                    self.mesh_latency.get_or_create(&labels).set(ms / 1000.0);
                }
            }
        }
        self.runs.inc();
        if !report.ok {
            self.failed_runs.inc();
        }
        self.last_run_ok.set(i64::from(report.ok));
        self.stamp();
    }

    fn stamp(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.last_run_timestamp.set(now);
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run_continuous(cfg: Config, listen: SocketAddr) -> ExitCode {
    let mut reg = Registry::with_prefix("derpprobe");
    let metrics = Metrics::register(&mut reg);
    let registry = Arc::new(reg);
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %listen, error = %e, "cannot listen");
            return ExitCode::from(EXIT_MAP);
        }
    };
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(addr = %bound, "serving metrics on /metrics");
    let ready = derper::metrics::Readiness::default();
    let cancel = CancellationToken::new();
    let server = tokio::spawn(derper::metrics::serve_admin(
        listener,
        registry,
        ready.clone(),
        cancel.clone(),
    ));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let run = async {
            match cfg.load_map().await {
                Err(e) => {
                    metrics.map_errors.inc();
                    metrics.last_run_ok.set(0);
                    metrics.stamp();
                    tracing::error!(error = %e, "cannot read the derpMap");
                }
                Ok(LoadedMap { map, .. }) => {
                    let report = probe::probe_map(&map, &cfg.probe).await;
                    metrics.record(&report);
                    let failures = report.failures();
                    if failures.is_empty() {
                        tracing::info!(
                            regions = report.regions.len(),
                            "probe run: all checks passed"
                        );
                    } else {
                        for f in &failures {
                            tracing::warn!(failure = %f, "probe check failed");
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = run => {}
        }
        ready.set(true);
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(cfg.interval) => {}
        }
    }
    cancel.cancel();
    let _ = server.await;
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (cfg, log_format) = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("derpprobe: {e}");
            return ExitCode::from(EXIT_MAP);
        }
    };
    derper::telemetry::init(log_format);
    if let Some(listen) = cfg.listen {
        return run_continuous(cfg, listen).await;
    }
    let LoadedMap {
        map,
        format,
        source,
    } = match cfg.load_map().await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("derpprobe: cannot use the derpMap: {e}");
            return ExitCode::from(EXIT_MAP);
        }
    };
    let report = probe::probe_map(&map, &cfg.probe).await;
    if cfg.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => print_out(&format!("{s}\n")),
            Err(e) => {
                eprintln!("derpprobe: encoding JSON: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    } else {
        print_out(&render_table(&report, &source, format));
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(
            positive_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(positive_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(positive_duration("2m").unwrap(), Duration::from_secs(120));
        // Go's grammar: a unit is required
        assert!(positive_duration("3").is_err());
        assert!(positive_duration("0s").is_err());
        assert!(positive_duration("0").is_err());
        assert!(positive_duration("5x").is_err());
    }
}
