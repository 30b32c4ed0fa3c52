//! Cross-component test support for kubederp: the harness every test in `tests/tests/` shares,
//! one module per concern (no test includes another test file).
//!
//! - Control plane: [`k8s`] (a real etcd + kube-apiserver + kube-controller-manager on random
//!   loopback ports, see `shared/docs/k8s-testing.md`; namespaces, CRDs, kubeconfigs, waits).
//! - What runs on it: [`operator`] (the controller in process or the `derp-operator` binary),
//!   [`nodes`] (test Nodes and a fake kubelet), [`agent`] (the node agent that runs relay Pods
//!   as local processes: the demo and the e2e tests), [`stack`] (control plane + operator +
//!   agent: `kubederp-local`, the demo).
//! - Reading results: [`regions`] (status, pins, derpMap, Events), [`admin_http`] (metrics and
//!   readiness endpoints), [`rbac`] (the access each request needed against what the chart
//!   grants).
//! - Tools: [`helm`] (the chart through the real `helm`), [`command`] (helm/kubectl runs).
//! - Real peers built from Go: [`bins`] (the workspace's own binaries), [`interop`] (Tailscale
//!   client code and upstream `derper`), [`tailnet`] (a loopback tailnet of real tailscaled),
//!   [`headscale`] (a real headscale control server).

/// Plain HTTP GETs to the admin ports (`/metrics`, `/readyz`, …) of the processes under test.
pub mod admin_http;
pub mod agent;
pub mod bins;
/// Running `helm`, `kubectl` and other tools to completion, expecting success or failure.
pub mod command;
pub mod headscale;
/// The Helm chart through the real `helm`: private helm home, `helm template` as JSON documents.
pub mod helm;
pub mod interop;
pub mod k8s;
/// Test Nodes on a bare control plane (create, address, label) and a fake kubelet for their Pods.
pub mod nodes;
/// The operator under test: in-process controller or `derp-operator` process; test set-up.
pub mod operator;
/// Least-privilege checks: a recording apiserver proxy, the RBAC access each request needed, and
/// the access rendered Roles grant.
pub mod rbac;
/// DerpRegions and the operator's output read back: create, wait on status, pins, children,
/// derpMap, resource versions, Events.
pub mod regions;
pub mod stack;
pub mod tailnet;
