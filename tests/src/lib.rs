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

pub mod admin_http;
pub mod agent;
pub mod bins;
pub mod command;
pub mod headscale;
pub mod helm;
pub mod interop;
pub mod k8s;
pub mod nodes;
pub mod operator;
pub mod rbac;
pub mod regions;
pub mod stack;
pub mod tailnet;
