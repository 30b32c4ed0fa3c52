//! Command line (clap derive; every flag has a `DERP_OPERATOR_…` env fallback) and its
//! validation into a [`Config`] with no optional required values left.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

use crate::telemetry::LogFormat;

/// Default admin listen address (`/healthz`, `/readyz`, `/metrics`, `/derpmap.json`).
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:8080";
/// Default Lease name for leader election.
pub const DEFAULT_LEASE_NAME: &str = "derp-operator";
/// Default concurrent reconciles.
pub const DEFAULT_CONCURRENCY: u16 = 4;
/// Default time between two probe rounds of every relay node (design.md §3 `NodesHealthy`;
/// the same cadence as `derpprobe --interval`'s default use in monitoring).
pub const DEFAULT_PROBE_INTERVAL: &str = "30s";
/// Default limit for each probe step (TCP, TLS, DERP handshake, one delivery, STUN); the
/// `derpprobe` default.
pub const DEFAULT_PROBE_TIMEOUT: &str = "5s";
/// Default regions probed at the same time (and nodes, in regions too large for mesh checks).
pub const DEFAULT_PROBE_CONCURRENCY: usize = 4;

/// `derp-operator`: turns cluster nodes into Tailscale DERP regions.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Only watch DerpRegions in this namespace (default: all namespaces).
    #[arg(long, env = "DERP_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Admin listen address.
    #[arg(long, env = "DERP_OPERATOR_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "DERP_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Elect a leader with a Lease before reconciling.
    #[arg(long, env = "DERP_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Lease name.
    #[arg(long, env = "DERP_OPERATOR_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// Lease namespace (required with leader election; the chart sets the Pod's namespace).
    #[arg(long, env = "DERP_OPERATOR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Candidate identity (default: $POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Concurrent reconciles.
    #[arg(long, env = "DERP_OPERATOR_CONCURRENCY", default_value_t = DEFAULT_CONCURRENCY)]
    pub concurrency: u16,
    /// Relay image for regions that do not set `spec.relay.image` (the chart passes its
    /// `relayImage` value).
    #[arg(long, env = "DERP_OPERATOR_RELAY_IMAGE", default_value = crate::crd::DEFAULT_RELAY_IMAGE)]
    pub relay_image: String,
    /// Image pull secrets (names of Secrets in each region's namespace, comma-separated) for
    /// relay Pods of regions that do not set `spec.relay.imagePullSecrets` (the chart passes
    /// its `relayImage.pullSecrets` value).
    #[arg(
        long,
        env = "DERP_OPERATOR_RELAY_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub relay_image_pull_secrets: Vec<String>,
    /// Probe every relay node this often (TCP, TLS with the pin, DERP, round trip, STUN,
    /// mesh) for `status.nodes[]`, `NodesHealthy` and `derpMap.publishUnhealthy`; 0 disables.
    #[arg(long, env = "DERP_OPERATOR_PROBE_INTERVAL", default_value = DEFAULT_PROBE_INTERVAL, value_parser = derper::duration::parse_go_duration)]
    pub probe_interval: Duration,
    /// Limit for each probe step.
    #[arg(long, env = "DERP_OPERATOR_PROBE_TIMEOUT", default_value = DEFAULT_PROBE_TIMEOUT, value_parser = derper::duration::parse_go_duration)]
    pub probe_timeout: Duration,
    /// Regions probed at the same time.
    #[arg(long, env = "DERP_OPERATOR_PROBE_CONCURRENCY", default_value_t = DEFAULT_PROBE_CONCURRENCY)]
    pub probe_concurrency: usize,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watched namespace.
    pub namespace: Option<String>,
    /// Admin listen address.
    pub admin_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_filter: String,
    /// Leader election settings, when enabled.
    pub lease: Option<crate::leader::LeaseConfig>,
    /// Identity (Event reporting instance, Lease holder).
    pub identity: String,
    /// Concurrent reconciles.
    pub concurrency: u16,
    /// Relay image for regions without `spec.relay.image`.
    pub relay_image: String,
    /// Pull secrets for relay Pods of regions without `spec.relay.imagePullSecrets`.
    pub relay_image_pull_secrets: Vec<String>,
    /// Probe loop settings (None: probing disabled).
    pub probe: Option<crate::health::ProbeSettings>,
}

/// Invalid flag combination.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// Leader election without a Lease namespace.
    #[error(
        "--lease-namespace (DERP_OPERATOR_LEASE_NAMESPACE) is required with --leader-election=true"
    )]
    MissingLeaseNamespace,
    /// A pull secret name that is not a Secret name.
    #[error(
        "--relay-image-pull-secrets: {0:?} is not a Secret name (lower-case letters, digits, '-' and '.')"
    )]
    RelayImagePullSecret(String),
    /// Zero concurrency.
    #[error("--concurrency must be at least 1")]
    ZeroConcurrency,
    /// A probe timeout that cannot fit in the interval, or zero.
    #[error(
        "--probe-timeout ({timeout:?}) must be more than 0 and less than --probe-interval ({interval:?})"
    )]
    ProbeTimeout {
        /// `--probe-timeout`.
        timeout: Duration,
        /// `--probe-interval`.
        interval: Duration,
    },
    /// An empty or malformed relay image reference.
    #[error(
        "--relay-image must be an image reference such as ghcr.io/kubederp/derper:0.1.0, not {0:?}"
    )]
    RelayImage(String),
    /// Zero probe concurrency.
    #[error("--probe-concurrency must be at least 1")]
    ZeroProbeConcurrency,
}

impl Args {
    /// Validate into a [`Config`].
    pub fn into_config(self) -> Result<Config, ArgsError> {
        let Args {
            namespace,
            admin_addr,
            log_format,
            log_filter,
            leader_election,
            lease_name,
            lease_namespace,
            identity,
            concurrency,
            relay_image,
            relay_image_pull_secrets,
            probe_interval,
            probe_timeout,
            probe_concurrency,
        } = self;
        if concurrency == 0 {
            return Err(ArgsError::ZeroConcurrency);
        }
        if relay_image.trim().is_empty() || relay_image.chars().any(char::is_whitespace) {
            return Err(ArgsError::RelayImage(relay_image));
        }
        let relay_image_pull_secrets: Vec<String> = relay_image_pull_secrets
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = relay_image_pull_secrets.iter().find(|s| {
            s.len() > 253
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        }) {
            return Err(ArgsError::RelayImagePullSecret(bad.clone()));
        }
        let probe = if probe_interval.is_zero() {
            None
        } else {
            if probe_timeout.is_zero() || probe_timeout >= probe_interval {
                return Err(ArgsError::ProbeTimeout {
                    timeout: probe_timeout,
                    interval: probe_interval,
                });
            }
            if probe_concurrency == 0 {
                return Err(ArgsError::ZeroProbeConcurrency);
            }
            Some(crate::health::ProbeSettings {
                interval: probe_interval,
                timeout: probe_timeout,
                concurrency: probe_concurrency,
            })
        };
        let identity = identity
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("derp-operator-{}", std::process::id()));
        let lease = if leader_election {
            Some(crate::leader::LeaseConfig {
                name: lease_name,
                namespace: lease_namespace.ok_or(ArgsError::MissingLeaseNamespace)?,
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
            })
        } else {
            None
        };
        Ok(Config {
            namespace,
            admin_addr,
            log_format,
            log_filter,
            lease,
            identity,
            concurrency,
            relay_image,
            relay_image_pull_secrets,
            probe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_election_needs_a_lease_namespace() {
        let a = Args::try_parse_from(["derp-operator"]).unwrap();
        assert!(matches!(
            a.into_config(),
            Err(ArgsError::MissingLeaseNamespace)
        ));
        let a = Args::try_parse_from([
            "derp-operator",
            "--leader-election=false",
            "--namespace=derp",
            "--admin-addr=127.0.0.1:0",
        ])
        .unwrap();
        let c = a.into_config().unwrap();
        assert!(c.lease.is_none());
        assert_eq!(c.namespace.as_deref(), Some("derp"));
        let p = c.probe.expect("probing is on by default");
        assert_eq!(p.interval, Duration::from_secs(30));
        assert_eq!(p.timeout, Duration::from_secs(5));
    }

    #[test]
    fn probe_flags_disable_and_validate() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["derp-operator", "--leader-election=false"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map(Args::into_config)
        };
        assert!(
            parse(&["--probe-interval=0"])
                .unwrap()
                .unwrap()
                .probe
                .is_none()
        );
        let c = parse(&["--probe-interval=1s", "--probe-timeout=500ms"])
            .unwrap()
            .unwrap();
        assert_eq!(c.probe.unwrap().timeout, Duration::from_millis(500));
        assert!(matches!(
            parse(&["--probe-interval=2s", "--probe-timeout=5s"]).unwrap(),
            Err(ArgsError::ProbeTimeout { .. })
        ));
        assert!(parse(&["--probe-interval=soon"]).is_err());
    }

    #[test]
    fn relay_image_pull_secrets_are_a_comma_list_of_secret_names() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["derp-operator", "--leader-election=false"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).unwrap().into_config()
        };
        assert!(parse(&[]).unwrap().relay_image_pull_secrets.is_empty());
        assert_eq!(
            parse(&["--relay-image-pull-secrets=regcred,mirror.creds"])
                .unwrap()
                .relay_image_pull_secrets,
            ["regcred", "mirror.creds"]
        );
        assert!(
            parse(&["--relay-image-pull-secrets="])
                .unwrap()
                .relay_image_pull_secrets
                .is_empty()
        );
        assert!(matches!(
            parse(&["--relay-image-pull-secrets=Reg_Cred"]),
            Err(ArgsError::RelayImagePullSecret(s)) if s == "Reg_Cred"
        ));
    }
}
