//! Cross-component test support for kubederp.
//!
//! - [`k8s`]: a real etcd + kube-apiserver + kube-controller-manager started on random
//!   loopback ports (see `shared/docs/k8s-testing.md`), plus namespace / CRD / wait helpers.
//! - [`bins`]: locating the workspace's own binaries (`derper`, `derp-operator`, …).
//! - [`interop`]: building and locating the Go interop programs (real Tailscale client code
//!   and upstream `derper`).

pub mod agent;
pub mod bins;
pub mod headscale;
pub mod interop;
pub mod k8s;
pub mod stack;
pub mod tailnet;
