//! `derp-operator`: reconciles `DerpRegion` objects into relays and a published derpMap.
//!
//! Module map (house-style §4.1):
//! - [`crd`]: the `DerpRegion` resource, constants;
//! - [`plan`]: PURE decisions — node selection, certificates to issue, desired children,
//!   derpMap rendering, status;
//! - [`certs`]: rcgen IP certificates and `sha256-raw:` pins;
//! - [`controller`], [`apply`], [`status`]: the kube-runtime wiring, server-side apply and pruning,
//!   status patches and Events;
//! - [`leader`]: Lease-based leader election;
//! - [`args`], [`telemetry`], [`metrics`], [`admin`]: the process around it.

pub mod certs;
pub mod crd;
pub mod plan;

#[cfg(test)]
mod fixtures;
