//! The real-node tier as a test: `scripts/real-nodes` runs three real kubelets with their own
//! containerd in network namespaces it creates, installs the chart with helm from images
//! imported into each node, applies the example DerpRegion and checks the region with real
//! Tailscale client code, the relay's security context and the lifecycle cases
//! (`scripts/realnodes/checks.sh`), then checks that the host is as it was. It needs root,
//! cgroups and namespaces, and fails saying so when the machine lacks them (never skips).

use std::process::Command;

#[test]
fn real_nodes_tier() {
    let script = derp_tests::k8s::workspace_root().join("scripts/real-nodes");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} failed ({status}); its log above says which step",
        script.display()
    );
}
