//! What the agent is told: the nodes it registers ([`NodeSpec`]) and its configuration
//! ([`AgentConfig`]), including how an image maps to a local executable.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// Binaries of this workspace that an image can name (last path segment of the repository):
/// the relay, whose Pods the operator creates. (The operator itself runs as a process in the
/// local stack, and as a Pod only on the real-node tier.)
const WORKSPACE_BINARIES: &[&str] = &["derper"];

/// One node the agent registers and runs Pods for.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    /// Node name (cluster-scoped: make it unique per test).
    pub name: String,
    /// Labels, in addition to `kubernetes.io/{hostname,os,arch}` which the agent always sets.
    pub labels: BTreeMap<String, String>,
    /// The node's IPv4 address (a loopback address such as `127.0.0.2` locally), published as
    /// its `InternalIP`.
    pub ipv4: Ipv4Addr,
}

impl NodeSpec {
    /// A node with no labels.
    pub fn new(name: impl Into<String>, ipv4: Ipv4Addr) -> NodeSpec {
        NodeSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            ipv4,
        }
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> NodeSpec {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Scratch directory: `logs/` and `pods/` are created under it.
    pub workdir: PathBuf,
    /// Explicit image mappings: an image reference starting with the prefix runs the path.
    pub images: BTreeMap<String, PathBuf>,
    /// Node status and Lease heartbeat period (kubelet default: 10 s).
    pub heartbeat: Duration,
    /// First restart delay after a container exits; doubles per restart (kubelet: 10 s; shorter
    /// here so tests are quick).
    pub restart_backoff: Duration,
    /// Cap on the restart delay (kubelet: 5 min).
    pub max_restart_backoff: Duration,
    /// How often volumes are re-projected even without a watch event.
    pub resync: Duration,
    /// Cap on the termination grace period when the agent itself shuts down.
    pub shutdown_grace: Duration,
    /// Port of each node's minimal kubelet API (only `/containerLogs`, so `kubectl logs`
    /// works), served over TLS with a self-signed certificate on the node's IPv4 address;
    /// kube-apiserver does not verify kubelet certificates unless told to. 0 disables it.
    /// Default 10250, the kubelet's port. A port that cannot be bound is logged and skipped.
    pub kubelet_port: u16,
}

impl AgentConfig {
    /// Defaults: 10 s heartbeat, 1 s restart backoff doubling to 20 s, 5 s resync, 5 s shutdown
    /// grace, the kubelet API on port 10250.
    pub fn new(workdir: impl Into<PathBuf>) -> AgentConfig {
        AgentConfig {
            workdir: workdir.into(),
            images: BTreeMap::new(),
            heartbeat: Duration::from_secs(10),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(20),
            resync: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            kubelet_port: 10250,
        }
    }

    /// Adds an explicit mapping: images starting with `prefix` run `path`.
    #[must_use]
    pub fn image(mut self, prefix: impl Into<String>, path: impl Into<PathBuf>) -> AgentConfig {
        self.images.insert(prefix.into(), path.into());
        self
    }

    /// The local executable for `image`, or why there is none. May build a workspace binary
    /// (blocking); call off the async runtime.
    pub fn resolve_image(&self, image: &str) -> Result<PathBuf, String> {
        if let Some((_, path)) = self
            .images
            .iter()
            .filter(|(prefix, _)| image.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
        {
            return Ok(path.clone());
        }
        let segment = image_last_segment(image);
        if WORKSPACE_BINARIES.contains(&segment) {
            let name = segment.to_owned();
            return std::panic::catch_unwind(|| crate::bins::workspace_bin(&name)).map_err(|e| {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                format!("image {image:?} maps to workspace binary {segment:?}, which is unavailable: {why}")
            });
        }
        let known: Vec<&str> = self.images.keys().map(String::as_str).collect();
        Err(format!(
            "no local executable for image {image:?} (explicit prefixes: {known:?}; workspace \
             binaries: {WORKSPACE_BINARIES:?})"
        ))
    }
}

/// The last path segment of an image's repository: `ghcr.io/x/derper:v1@sha256:…` → `derper`.
pub(super) fn image_last_segment(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_segments() {
        assert_eq!(image_last_segment("ghcr.io/kubederp/derper:v1"), "derper");
        assert_eq!(image_last_segment("derper"), "derper");
        assert_eq!(image_last_segment("localhost:5000/a/b@sha256:abc"), "b");
    }
}
