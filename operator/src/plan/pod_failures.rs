//! PURE reading of relay containers that exit: what the end of their log says (the relay
//! container uses `terminationMessagePolicy: FallbackToLogsOnError`, so the kubelet copies the
//! last log lines of a failed container into its status).
//!
//! The case this exists for: relays use host networking, so a port the region binds can
//! already be taken on the node by a process Kubernetes does not know about (a host
//! Prometheus or Cockpit on 9090, a web server on 443). The operator's own port check only
//! sees other regions; the relay finds the rest when it binds, exits with
//! `bind <listener> listener on <addr>: Address already in use`, and the region reports
//! `RelaysReady=False` / `Ready=False` with reason `PortInUse`, naming the node, the address
//! and the `spec.ports` field to change.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use time::OffsetDateTime;

use super::children::pod_name;
use super::conditions::{PlannedEvent, condition, set_condition};
use crate::crd::{DerpRegionStatus, NodeStatus};

/// Reason when a relay cannot bind a port that is taken on its node.
pub const PORT_IN_USE: &str = "PortInUse";
/// Reason when a relay exits for another reason.
pub const RELAY_FAILING: &str = "RelayFailing";
/// Longest log line quoted in a condition.
const MAX_LINE: usize = 300;

/// A relay container that exited, as its status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFailure {
    /// Node name.
    pub node: String,
    /// [`PORT_IN_USE`] or [`RELAY_FAILING`].
    pub reason: &'static str,
    /// What a person can act on.
    pub message: String,
}

/// The `spec.ports` field of one of our relay's listeners (`bind <which> listener on …`).
fn port_field(line: &str) -> Option<&'static str> {
    let which = line.split("bind ").nth(1)?.split(' ').next()?;
    Some(match which {
        "main" => "spec.ports.derp",
        "http" => "spec.ports.http",
        "stun" => "spec.ports.stun",
        "admin" => "spec.ports.admin",
        _ => return None,
    })
}

fn clip(line: &str) -> String {
    let line = line.trim();
    match line.char_indices().nth(MAX_LINE) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_owned(),
    }
}

/// Classify the termination message of a relay container on `node`.
pub fn classify(node: &str, message: &str) -> Option<RelayFailure> {
    let lines: Vec<&str> = message.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(line) = lines.iter().rev().find(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("address already in use") || l.contains("address in use")
    }) {
        let fix = port_field(line)
            .map_or_else(|| "change spec.ports".to_owned(), |f| format!("change {f}"));
        return Some(RelayFailure {
            node: node.to_owned(),
            reason: PORT_IN_USE,
            message: format!(
                "node {node}: the relay cannot bind a port another process on the node already \
                 holds ({}); free the port on the node or {fix}",
                clip(line)
            ),
        });
    }
    let last = lines.last()?;
    Some(RelayFailure {
        node: node.to_owned(),
        reason: RELAY_FAILING,
        message: format!("node {node}: the relay exits: {}", clip(last)),
    })
}

/// Failures of the relay containers of nodes that are not Ready, in node order.
pub fn relay_failures(
    pods: &BTreeMap<String, Pod>,
    region: &str,
    nodes: &[NodeStatus],
) -> Vec<RelayFailure> {
    nodes
        .iter()
        .filter(|n| !n.ready)
        .filter_map(|n| {
            let st = pods.get(&pod_name(region, &n.name))?.status.as_ref()?;
            let c = st
                .container_statuses
                .iter()
                .flatten()
                .find(|c| c.name == "derper")?;
            let term = c
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))?;
            if term.exit_code == 0 {
                return None;
            }
            classify(&n.name, term.message.as_deref().unwrap_or_default())
        })
        .collect()
}

/// Put `failures` into the `RelaysReady` and `Ready` conditions (instead of the plain "not
/// Ready yet"), with one Warning Event when the message changes.
pub fn apply(
    status: &mut DerpRegionStatus,
    prev: &DerpRegionStatus,
    now: OffsetDateTime,
    failures: &[RelayFailure],
    events: &mut Vec<PlannedEvent>,
) {
    let Some(first) = failures.first() else {
        return;
    };
    let reason = if failures.iter().any(|f| f.reason == PORT_IN_USE) {
        PORT_IN_USE
    } else {
        first.reason
    };
    let message = failures
        .iter()
        .map(|f| f.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let before = prev
        .conditions
        .iter()
        .find(|c| c.type_ == "RelaysReady")
        .map(|c| c.message.as_str());
    if before != Some(message.as_str()) {
        events.push(PlannedEvent {
            warning: true,
            reason: reason.into(),
            note: message.clone(),
        });
    }
    for ty in ["RelaysReady", "Ready"] {
        set_condition(
            status,
            prev,
            now,
            condition(ty, false, reason, message.clone()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_relays_bind_error_names_the_port_field() {
        for (which, field) in [
            ("main", "spec.ports.derp"),
            ("http", "spec.ports.http"),
            ("stun", "spec.ports.stun"),
            ("admin", "spec.ports.admin"),
        ] {
            let msg = format!(
                "derper: bind {which} listener on 10.0.0.1:9090: Address already in use (os error 98)"
            );
            let f = classify("n1", &msg).expect("failure");
            assert_eq!(f.reason, PORT_IN_USE);
            assert!(f.message.contains(field), "{}", f.message);
            assert!(f.message.contains("node n1"), "{}", f.message);
            assert!(f.message.contains("10.0.0.1:9090"), "{}", f.message);
        }
    }

    #[test]
    fn other_bind_errors_and_other_exits() {
        // upstream Go derper's wording
        let f = classify("n1", "listen tcp :443: bind: address already in use").unwrap();
        assert_eq!(f.reason, PORT_IN_USE);
        assert!(f.message.contains("change spec.ports"), "{}", f.message);
        let f = classify(
            "n1",
            "starting\nderper: loading certificate: no such file\n",
        )
        .unwrap();
        assert_eq!(f.reason, RELAY_FAILING);
        assert!(
            f.message
                .ends_with("derper: loading certificate: no such file")
        );
        assert_eq!(classify("n1", "  \n"), None);
        let long = "x".repeat(1000);
        assert!(classify("n1", &long).unwrap().message.len() < 400);
    }
}
