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
}

/// Invalid flag combination.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// Leader election without a Lease namespace.
    #[error(
        "--lease-namespace (DERP_OPERATOR_LEASE_NAMESPACE) is required with --leader-election=true"
    )]
    MissingLeaseNamespace,
    /// Zero concurrency.
    #[error("--concurrency must be at least 1")]
    ZeroConcurrency,
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
        } = self;
        if concurrency == 0 {
            return Err(ArgsError::ZeroConcurrency);
        }
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
    }
}
