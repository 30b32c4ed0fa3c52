//! Cross-component test support for kubederp.
//!
//! - [`k8s`]: a real etcd + kube-apiserver + kube-controller-manager started on random
//!   loopback ports (see `shared/docs/k8s-testing.md`), plus namespace / CRD / wait helpers.
//! - [`bins`]: locating the workspace's own binaries (`derper`, `derp-operator`, …).
//! - [`interop`]: building and locating the Go interop programs (real Tailscale client code
//!   and upstream `derper`).

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
