//! Operator metrics (prefix `derp_operator_`), registered once and shared as `Arc<Metrics>`.
//!
//! Owns: the counters/histogram and their registry. Does not own: serving them (`admin`).
//! Label values come from bounded sets (kinds, operations, error reasons), never names or IPs.

use std::{
    collections::BTreeMap,
    sync::{Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::outcome::Outcome;

/// Labels of [`Metrics::writes`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `Secret`, `ConfigMap`, `Pod`, `DerpRegionStatus`.
    pub kind: &'static str,
    /// `apply`, `delete`, `patch`.
    pub op: &'static str,
}

/// Labels of [`Metrics::reconcile_errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::Error::reason`].
    pub reason: &'static str,
}

/// Labels of the per-node probe gauges: the region (`namespace/name`) and the node name, both
/// bounded by the regions the operator manages (no IPs, no keys).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// `namespace/name` of the region.
    pub region: String,
    /// Node name.
    pub node: String,
}

/// Labels of per-region counters: the region (`namespace/name`), bounded by the regions the
/// operator manages.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    /// `namespace/name` of the region.
    pub region: String,
}

/// Labels of [`Metrics::region_condition`]: the region (`namespace/name`) and the condition
/// type (Ready, CertificatesReady, RelaysReady, DerpMapPublished, NodesHealthy).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    /// `namespace/name` of the region.
    pub region: String,
    /// Condition type.
    pub condition: String,
}

/// Labels of [`Metrics::probes`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeResultLabels {
    /// `ok` or the first failed check ([`Outcome::check`], a bounded set).
    pub result: &'static str,
}

/// All operator metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that returned an error, by reason.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Reconcile wall time.
    pub reconcile_duration: Histogram,
    /// Writes sent to the apiserver (apply, delete, status patch), by kind and operation.
    pub writes: Family<WriteLabels, Counter>,
    /// Node certificates issued (new nodes, rotations, replacements of lost Secrets).
    pub certs_issued: Counter,
    /// Events published on regions.
    pub events: Counter,
    /// Published pins replaced by a new certificate, by region.
    pub pin_changes: Family<RegionLabels, Counter>,
    /// Node probes finished, by result.
    pub probes: Family<ProbeResultLabels, Counter>,
    /// 1 when the last probe of a node passed, 0 when it failed.
    pub probe_success: Family<NodeLabels, Gauge>,
    /// Packet round trip of the last passed probe of a node, in seconds.
    pub probe_latency: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    /// Unix time of the last probe of a node.
    pub probe_timestamp: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    /// 1 when a condition of a region is True, 0 when False (absent when Unknown), as last
    /// written to the region's status.
    pub region_condition: Family<ConditionLabels, Gauge>,
    /// Condition types with a gauge, by region (so that deleted regions are dropped).
    conditions: Mutex<BTreeMap<String, Vec<String>>>,
    /// Nodes with probe gauges, by region (so that removed nodes and regions are dropped).
    /// A std lock: never held across an `.await`.
    probed: Mutex<BTreeMap<String, Vec<String>>>,
}

impl Metrics {
    /// New metrics, registered into `registry` under the `derp_operator` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
            writes: Family::default(),
            certs_issued: Counter::default(),
            events: Counter::default(),
            pin_changes: Family::default(),
            probes: Family::default(),
            probe_success: Family::default(),
            probe_latency: Family::default(),
            probe_timestamp: Family::default(),
            region_condition: Family::default(),
            conditions: Mutex::default(),
            probed: Mutex::default(),
        };
        let r = registry.sub_registry_with_prefix("derp_operator");
        r.register(
            "reconciles",
            "Reconciles of a DerpRegion started",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles that failed, by error reason",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Wall time of one reconcile",
            m.reconcile_duration.clone(),
        );
        r.register(
            "writes",
            "Write requests sent to the apiserver (server-side apply, delete, status patch)",
            m.writes.clone(),
        );
        r.register(
            "certificates_issued",
            "Node certificates issued (new node, changed IPs, rotation, lost Secret)",
            m.certs_issued.clone(),
        );
        r.register(
            "events",
            "Kubernetes Events published on DerpRegions",
            m.events.clone(),
        );
        r.register(
            "pin_changes",
            "Published certificate pins replaced by a new certificate (address change, \
             rotation, lost Secret), by region: clients need the new derpMap after each",
            m.pin_changes.clone(),
        );
        r.register(
            "probes",
            "Relay node probes finished by the operator, by result (ok or the first failed \
             check: tcp, tls, pin, derp, round_trip, stun, ipv6_*, mesh)",
            m.probes.clone(),
        );
        r.register(
            "probe_success",
            "1 when the operator's last probe of the node passed every check, 0 when one failed",
            m.probe_success.clone(),
        );
        r.register(
            "probe_latency_seconds",
            "Packet round trip between two probe clients through the node's relay, from the \
             last passed probe",
            m.probe_latency.clone(),
        );
        r.register(
            "probe_timestamp_seconds",
            "Unix time of the operator's last probe of the node (the status only changes when \
             the result does)",
            m.probe_timestamp.clone(),
        );
        r.register(
            "region_condition",
            "1 when the DerpRegion condition is True, 0 when False (Ready, CertificatesReady, \
             RelaysReady, DerpMapPublished, NodesHealthy)",
            m.region_condition.clone(),
        );
        m
    }

    /// Record the conditions of `region` (`namespace/name`) as written to its status.
    pub fn record_conditions(&self, region: &str, conditions: &[crate::crd::Condition]) {
        let types: Vec<String> = conditions.iter().map(|c| c.type_.clone()).collect();
        let before = self
            .conditions_lock()
            .insert(region.to_owned(), types)
            .unwrap_or_default();
        for condition in before {
            self.region_condition.remove(&ConditionLabels {
                region: region.to_owned(),
                condition,
            });
        }
        for c in conditions {
            let value = match c.status.as_str() {
                "True" => 1,
                "False" => 0,
                _ => continue,
            };
            self.region_condition
                .get_or_create(&ConditionLabels {
                    region: region.to_owned(),
                    condition: c.type_.clone(),
                })
                .set(value);
        }
    }

    /// Drop the condition gauges of regions not in `keep` (deleted regions).
    pub fn forget_conditions_except(&self, keep: &[String]) {
        let gone: Vec<(String, Vec<String>)> = {
            let mut all = self.conditions_lock();
            let gone = all
                .iter()
                .filter(|(r, _)| !keep.contains(r))
                .map(|(r, c)| (r.clone(), c.clone()))
                .collect();
            all.retain(|r, _| keep.contains(r));
            gone
        };
        for (region, conditions) in gone {
            for condition in conditions {
                self.region_condition.remove(&ConditionLabels {
                    region: region.clone(),
                    condition,
                });
            }
        }
    }

    fn conditions_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.conditions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Record one probe round of `region` (`namespace/name`); nodes of the region that were
    /// not probed in this round are dropped from the gauges.
    pub fn record_probes(&self, region: &str, outcomes: &BTreeMap<String, Outcome>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let before = self
            .probed_lock()
            .insert(region.to_owned(), outcomes.keys().cloned().collect())
            .unwrap_or_default();
        for node in before.iter().filter(|n| !outcomes.contains_key(*n)) {
            self.forget_node(region, node);
        }
        for (node, o) in outcomes {
            let labels = NodeLabels {
                region: region.to_owned(),
                node: node.clone(),
            };
            self.probes
                .get_or_create(&ProbeResultLabels { result: o.check })
                .inc();
            self.probe_success
                .get_or_create(&labels)
                .set(i64::from(o.ok()));
            self.probe_timestamp.get_or_create(&labels).set(now);
            match o.latency {
                Some(l) => {
                    self.probe_latency
                        .get_or_create(&labels)
                        .set(l.as_secs_f64());
                }
                None => {
                    self.probe_latency.remove(&labels);
                }
            }
        }
    }

    /// Drop the probe gauges of regions not in `keep` (deleted regions).
    pub fn forget_probed_regions(&self, keep: &[String]) {
        let gone: Vec<(String, Vec<String>)> = {
            let mut probed = self.probed_lock();
            let gone = probed
                .iter()
                .filter(|(r, _)| !keep.contains(r))
                .map(|(r, n)| (r.clone(), n.clone()))
                .collect();
            probed.retain(|r, _| keep.contains(r));
            gone
        };
        for (region, nodes) in gone {
            for node in nodes {
                self.forget_node(&region, &node);
            }
        }
    }

    fn probed_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<String>>> {
        self.probed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget_node(&self, region: &str, node: &str) {
        let labels = NodeLabels {
            region: region.to_owned(),
            node: node.to_owned(),
        };
        self.probe_success.remove(&labels);
        self.probe_latency.remove(&labels);
        self.probe_timestamp.remove(&labels);
    }

    /// Count one write.
    pub fn write(&self, kind: &'static str, op: &'static str) {
        self.writes.get_or_create(&WriteLabels { kind, op }).inc();
    }

    /// Total writes of every kind (tests use it to prove an idle reconcile writes nothing).
    pub fn total_writes(&self) -> u64 {
        let mut total = 0;
        for kind in [
            "Secret",
            "ConfigMap",
            "Pod",
            "PodDisruptionBudget",
            "DerpRegionStatus",
        ] {
            for op in ["apply", "delete", "patch"] {
                total += self
                    .writes
                    .get(&WriteLabels { kind, op })
                    .map_or(0, |c| c.get());
            }
        }
        total
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&mut Registry::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Condition;

    fn cond(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: String::new(),
            last_transition_time: None,
            observed_generation: None,
        }
    }

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).expect("encode");
        s
    }

    #[test]
    fn region_conditions_follow_the_status_and_deleted_regions_vanish() {
        let mut r = Registry::default();
        let m = Metrics::new(&mut r);
        m.record_conditions(
            "ns/a",
            &[
                cond("Ready", "True"),
                cond("NodesHealthy", "False"),
                cond("RelaysReady", "Unknown"),
            ],
        );
        m.record_conditions("ns/b", &[cond("NodesHealthy", "True")]);
        let t = text(&r);
        let line = |region: &str, c: &str, v: i64| {
            format!("derp_operator_region_condition{{region=\"{region}\",condition=\"{c}\"}} {v}")
        };
        assert!(t.contains(&line("ns/a", "Ready", 1)), "{t}");
        assert!(t.contains(&line("ns/a", "NodesHealthy", 0)), "{t}");
        assert!(t.contains(&line("ns/b", "NodesHealthy", 1)), "{t}");
        assert!(
            !t.contains("condition=\"RelaysReady\""),
            "Unknown has no value: {t}"
        );
        // a condition that disappears from the status disappears from the metrics
        m.record_conditions("ns/a", &[cond("Ready", "False")]);
        let t = text(&r);
        assert!(t.contains(&line("ns/a", "Ready", 0)), "{t}");
        assert!(!t.contains(&line("ns/a", "NodesHealthy", 0)), "{t}");
        // deleted regions
        m.forget_conditions_except(&["ns/b".to_owned()]);
        let t = text(&r);
        assert!(!t.contains("region=\"ns/a\""), "{t}");
        assert!(t.contains(&line("ns/b", "NodesHealthy", 1)), "{t}");
    }
}
