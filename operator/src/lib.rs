//! `derp-operator`: reconciles `DerpRegion` objects into relays and a published derpMap.
//!
//! Module map (house-style §4.1):
//! - [`crd`]: the `DerpRegion` resource and shared constants;
//! - [`plan`]: PURE decisions — node selection, certificates to issue, desired children and the
//!   writes needed, derpMap renderings, status and Events;
//! - [`certs`]: rcgen IP certificates and `sha256-raw:` pins;
//! - [`controller`]: kube-runtime wiring and reconcile; [`apply`]: server-side apply and
//!   pruning; [`status`]: status patches and Events;
//! - [`health`]: the operator's own probes of every relay node (`derper::probe`), per-node
//!   health with hysteresis, and the probe loop; [`outcome`]: a probe report summarised per
//!   node (shared by `health` and `metrics`);
//! - [`leader`]: Lease-based leader election;
//! - [`args`], [`telemetry`], [`metrics`], [`admin`]: the process around it.
//!
//! Not here: the relay itself (`derper/`), which only reads the files this operator writes.

pub mod admin;
pub mod apply;
pub mod args;
pub mod certs;
pub mod controller;
pub mod crd;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod outcome;
pub mod plan;
pub mod status;
pub mod telemetry;

#[cfg(test)]
mod fixtures;

/// Everything a reconcile can fail with; variants are named after the failed action.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The DerpRegion CRD is not installed (or not readable).
    #[error("list DerpRegions (is the CRD installed? kubectl apply -f crds/): {0}")]
    CrdNotInstalled(#[source] kube::Error),
    /// Listing a region's children failed.
    #[error("list {kind} of region {region}: {source}")]
    ListChildren {
        /// Child kind.
        kind: &'static str,
        /// Region name.
        region: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Planning failed (certificate issuance, invalid duration).
    #[error("plan region {region}: {source}")]
    Plan {
        /// Region name.
        region: String,
        /// Cause.
        #[source]
        source: plan::PlanError,
    },
    /// Server-side apply of a Secret failed.
    #[error("apply Secret {name}: {source}")]
    ApplySecret {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Server-side apply of a ConfigMap failed.
    #[error("apply ConfigMap {name}: {source}")]
    ApplyConfigMap {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Creating a relay Pod failed.
    #[error("create Pod {name}: {source}")]
    CreatePod {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Server-side apply of the relay PodDisruptionBudget failed.
    #[error("apply PodDisruptionBudget {name}: {source}")]
    ApplyPdb {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting a relay Pod failed.
    #[error("delete Pod {name}: {source}")]
    DeletePod {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Pruning a Secret failed.
    #[error("delete Secret {name}: {source}")]
    DeleteSecret {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Pruning a ConfigMap failed.
    #[error("delete ConfigMap {name}: {source}")]
    DeleteConfigMap {
        /// Object name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Patching the region status failed.
    #[error("patch status of DerpRegion {name}: {source}")]
    PatchStatus {
        /// Region name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The region has no namespace (the CRD is namespaced, so this is a corrupt object).
    #[error("DerpRegion {0} has no namespace")]
    MissingNamespace(String),
}

impl Error {
    /// Short, bounded reason for metrics labels and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::CrdNotInstalled(_) => "CrdNotInstalled",
            Error::ListChildren { .. } => "ListChildren",
            Error::Plan { source, .. } => match source {
                plan::PlanError::IssueCertificate { .. } => "IssueCertificate",
                plan::PlanError::InvalidDuration { .. } => "InvalidSpec",
            },
            Error::ApplySecret { .. } => "ApplySecret",
            Error::ApplyConfigMap { .. } => "ApplyConfigMap",
            Error::CreatePod { .. } => "CreatePod",
            Error::ApplyPdb { .. } => "ApplyPdb",
            Error::DeletePod { .. } => "DeletePod",
            Error::DeleteSecret { .. } => "DeleteSecret",
            Error::DeleteConfigMap { .. } => "DeleteConfigMap",
            Error::PatchStatus { .. } => "PatchStatus",
            Error::MissingNamespace(_) => "MissingNamespace",
        }
    }

    /// The apiserver's HTTP status code, when the error is an API error.
    pub fn api_code(&self) -> Option<u16> {
        let source = match self {
            Error::CrdNotInstalled(s) => s,
            Error::ListChildren { source, .. }
            | Error::ApplySecret { source, .. }
            | Error::ApplyConfigMap { source, .. }
            | Error::CreatePod { source, .. }
            | Error::ApplyPdb { source, .. }
            | Error::DeletePod { source, .. }
            | Error::DeleteSecret { source, .. }
            | Error::DeleteConfigMap { source, .. }
            | Error::PatchStatus { source, .. } => source,
            Error::Plan { .. } | Error::MissingNamespace(_) => return None,
        };
        match source {
            kube::Error::Api(s) => Some(s.code),
            _ => None,
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
