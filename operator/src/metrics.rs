//! Operator metrics (prefix `derp_operator_`), registered once and shared as `Arc<Metrics>`.
//!
//! Owns: the counters/histogram and their registry. Does not own: serving them (`admin`).
//! Label values come from bounded sets (kinds, operations, error reasons), never names or IPs.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

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
        m
    }

    /// Count one write.
    pub fn write(&self, kind: &'static str, op: &'static str) {
        self.writes.get_or_create(&WriteLabels { kind, op }).inc();
    }

    /// Total writes of every kind (tests use it to prove an idle reconcile writes nothing).
    pub fn total_writes(&self) -> u64 {
        let mut total = 0;
        for kind in ["Secret", "ConfigMap", "Pod", "DerpRegionStatus"] {
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
