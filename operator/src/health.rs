//! Node health from the operator's own probes: every `--probe-interval`, each region's relay
//! nodes (all of them, published or not) are checked with the same code as `derpprobe`
//! ([`derper::probe`]: TCP, TLS with the `sha256-raw:` pin, DERP handshake, a packet round trip,
//! STUN, and packets across meshed nodes), from the operator process.
//!
//! Owns:
//! - [`NodeState`], the per-node state machine (PURE, explicit times): what the status shows
//!   ([`ProbeView`]), when a node is withheld from the derpMap and when it comes back
//!   (hysteresis), and which transitions deserve an Event;
//! - [`Tracker`], those states for every region, shared with the reconciler;
//! - [`Prober::run`], the probe loop: probe, update the tracker and the metrics, publish transition
//!   Events, and ask the controller to reconcile a region whose view changed.
//!
//! Does not own: the status, the conditions and the derpMap filtering (computed purely in
//! `plan` from [`ProbeView`]s), the checks themselves (`derper::probe`), or their summary per
//! node ([`crate::outcome`]).
//!
//! Decisions (design.md §3 `NodesHealthy`, `derpMap.publishUnhealthy`):
//! - The status is rewritten only when a node's view changes (result, latency bucket, withheld),
//!   never per probe, so an idle healthy region still writes nothing; the time of every probe
//!   is in the metrics.
//! - Withheld (only with `publishUnhealthy: false`): failing continuously for
//!   `derpMap.unhealthyAfter`. Back: [`RECOVER_PASSES`] consecutive passes. State lives in
//!   memory: after an operator restart every node starts published again.
//! - Events: `NodeUnhealthy` when a node that passed before fails, `NodeHealthy` when such a
//!   node passes again. Failures before a node's first pass (relays starting) are not Events;
//!   the `RelaysReady` condition covers start-up.
//! - A failed mesh check blames both ends only when both nodes pass their own checks (a node
//!   that is down already explains every mesh failure it is part of).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use derper::derpmap;
use derper::probe::{self, ProbeOptions, RegionReport};
use futures::channel::mpsc::UnboundedSender;
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::{
    certs::parse_duration,
    crd::{DEFAULT_UNHEALTHY_AFTER, DerpRegion, region_key},
    metrics::Metrics,
    outcome::{Outcome, summarize},
    plan::{PlannedEvent, ProbeView},
    status::EventPublisher,
};

/// Consecutive passed probes after which a withheld node is published again (hysteresis: one
/// lucky probe between failures does not bring a node back).
pub const RECOVER_PASSES: u32 = 3;
/// Regions with more nodes than this are probed without the cross-node (mesh) checks, which
/// cost one delivery per ordered pair of nodes (90 at this size).
pub const MAX_MESH_PROBE_NODES: usize = 10;

/// Probe loop settings (from `--probe-interval`, `--probe-timeout`, `--probe-concurrency`).
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// Time between the starts of two probe rounds.
    pub interval: Duration,
    /// Limit for each probe step (TCP, TLS, DERP handshake, one delivery, STUN).
    pub timeout: Duration,
    /// Regions (or, in regions too large for mesh checks, nodes) probed at the same time.
    pub concurrency: usize,
}

/// `ms` rounded up to a power of two (at least 1): the latency shown in the status.
pub fn latency_bucket_ms(latency: Duration) -> i64 {
    let ms = latency.as_secs_f64() * 1000.0;
    let mut b: i64 = 1;
    while (b as f64) < ms && b < (1 << 40) {
        b *= 2;
    }
    b
}

/// The latency bucket to show after `prev`: a higher bucket at once, a lower one only when
/// the latency dropped at least two buckets, so a latency hovering around a bucket boundary
/// does not rewrite the status on every probe.
pub fn next_latency_bucket(prev: Option<i64>, latency: Duration) -> i64 {
    let b = latency_bucket_ms(latency);
    match prev {
        Some(p) if b < p && b * 2 >= p => p,
        _ => b,
    }
}

/// A change worth an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A node that passed before fails now; carries the result.
    Unhealthy(String),
    /// A node announced unhealthy passes again.
    Healthy,
}

/// Health of one node across probes (PURE: the caller passes the times).
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    /// Start of the current run of failures.
    failing_since: Option<Instant>,
    /// Passes in a row.
    passes: u32,
    /// Whether the node ever passed (failures before the first pass are not Events).
    passed_once: bool,
    /// Whether a `NodeUnhealthy` Event was published and not yet answered by `NodeHealthy`.
    announced: bool,
    /// Left out of the derpMap (with `publishUnhealthy: false`).
    withheld: bool,
    /// What the status shows.
    view: Option<ProbeView>,
}

impl NodeState {
    /// Record one probe `outcome` taken at `at` (`wall` is the same instant as wall-clock
    /// time, for the status). `unhealthy_after` is the region's grace time. Returns whether
    /// the [`ProbeView`] changed and the transition, if any.
    pub fn record(
        &mut self,
        outcome: &Outcome,
        at: Instant,
        wall: OffsetDateTime,
        unhealthy_after: Duration,
    ) -> (bool, Option<Transition>) {
        let mut transition = None;
        if outcome.ok() {
            self.failing_since = None;
            self.passes = self.passes.saturating_add(1);
            self.passed_once = true;
            if self.announced {
                self.announced = false;
                transition = Some(Transition::Healthy);
            }
            if self.withheld && self.passes >= RECOVER_PASSES {
                self.withheld = false;
            }
        } else {
            self.passes = 0;
            let since = *self.failing_since.get_or_insert(at);
            if self.passed_once && !self.announced {
                self.announced = true;
                transition = Some(Transition::Unhealthy(outcome.result.clone()));
            }
            if at.duration_since(since) >= unhealthy_after {
                self.withheld = true;
            }
        }
        let prev_bucket = self.view.as_ref().and_then(|v| v.latency_ms);
        let latency_ms = outcome.latency.map(|l| next_latency_bucket(prev_bucket, l));
        let changed = self.view.as_ref().is_none_or(|v| {
            v.result != outcome.result || v.latency_ms != latency_ms || v.withheld != self.withheld
        });
        if changed {
            self.view = Some(ProbeView {
                result: outcome.result.clone(),
                healthy: outcome.ok(),
                latency_ms,
                time: wall,
                withheld: self.withheld,
            });
        }
        (changed, transition)
    }

    /// What the status shows, once probed.
    pub fn view(&self) -> Option<&ProbeView> {
        self.view.as_ref()
    }
}

/// Probe state of every region (`namespace/name` → node name → state), shared by the probe
/// loop and the reconciler. A std lock: never held across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    regions: Arc<Mutex<BTreeMap<String, BTreeMap<String, NodeState>>>>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, NodeState>>> {
        self.regions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The views of a region's probed nodes.
    pub fn views(&self, region: &str) -> BTreeMap<String, ProbeView> {
        self.lock()
            .get(region)
            .map(|nodes| {
                nodes
                    .iter()
                    .filter_map(|(n, s)| s.view().map(|v| (n.clone(), v.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records one round of a region; nodes not in `outcomes` are forgotten. Returns whether
    /// any view changed and the transitions by node.
    pub fn record_round(
        &self,
        region: &str,
        outcomes: &BTreeMap<String, Outcome>,
        at: Instant,
        wall: OffsetDateTime,
        unhealthy_after: Duration,
    ) -> (bool, Vec<(String, Transition)>) {
        let mut all = self.lock();
        let nodes = all.entry(region.to_owned()).or_default();
        let before = nodes.len();
        nodes.retain(|n, _| outcomes.contains_key(n));
        let mut changed = nodes.len() != before;
        let mut transitions = Vec::new();
        for (name, o) in outcomes {
            let (c, t) =
                nodes
                    .entry(name.clone())
                    .or_default()
                    .record(o, at, wall, unhealthy_after);
            changed |= c;
            if let Some(t) = t {
                transitions.push((name.clone(), t));
            }
        }
        (changed, transitions)
    }

    /// Forgets regions not in `keep`.
    pub fn retain_regions(&self, keep: &[String]) {
        self.lock().retain(|k, _| keep.contains(k));
    }
}

/// The derpMap region to probe: every node in the region's status (published or withheld),
/// with its pin and its published addresses and ports (a Node's NAT/port-forward annotations
/// included: the probe dials what clients dial).
pub fn probe_target(region: &DerpRegion) -> derpmap::DerpRegion {
    let spec = &region.spec;
    let region_id = i64::from(spec.region_id);
    let nodes = region
        .status
        .as_ref()
        .map(|s| s.nodes.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|n| n.ipv4.is_some() || n.ipv6.is_some())
        .map(|n| derpmap::DerpNode {
            name: n.name.clone(),
            region_id,
            host_name: n
                .ipv4
                .clone()
                .or_else(|| n.ipv6.clone())
                .unwrap_or_default(),
            cert_name: n.cert_name.clone(),
            ipv4: n.ipv4.clone().unwrap_or_else(|| "none".to_owned()),
            ipv6: n.ipv6.clone().unwrap_or_else(|| "none".to_owned()),
            stun_port: n.stun_port.unwrap_or(spec.ports.stun),
            stun_only: spec.stun_only,
            derp_port: n.derp_port.unwrap_or(spec.ports.derp),
            can_port80: spec.ports.http == 80,
            ..Default::default()
        })
        .collect();
    derpmap::DerpRegion {
        region_id,
        region_code: spec.effective_code(&region.name_any()),
        region_name: spec.effective_name(&region.name_any()),
        nodes,
        ..derpmap::DerpRegion::default()
    }
}

/// Probes one region: with mesh checks when it is small enough, else its nodes only, at most
/// `concurrency` at a time.
async fn probe_one(
    target: &derpmap::DerpRegion,
    opts: &ProbeOptions,
    concurrency: usize,
) -> RegionReport {
    if target.nodes.len() <= MAX_MESH_PROBE_NODES {
        return probe::probe_region(target, opts).await;
    }
    let mut nodes = Vec::with_capacity(target.nodes.len());
    for chunk in target.nodes.chunks(concurrency.max(1)) {
        let mut probes: Vec<Pin<Box<dyn Future<Output = probe::NodeReport> + Send + '_>>> =
            Vec::new();
        for n in chunk {
            probes.push(Box::pin(probe::probe_node(n, opts)));
        }
        nodes.extend(futures::future::join_all(probes).await);
    }
    RegionReport {
        region_id: target.region_id,
        region_code: target.region_code.clone(),
        ok: nodes.iter().all(|n| n.ok),
        nodes,
        mesh: Vec::new(),
        problems: Vec::new(),
    }
}

/// Everything the probe loop needs.
#[derive(Debug)]
pub struct Prober {
    /// Loop settings.
    pub settings: ProbeSettings,
    /// The controller's region cache.
    pub regions: Store<DerpRegion>,
    /// Shared probe state.
    pub tracker: Tracker,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Event publisher for transitions.
    pub events: EventPublisher,
    /// Asks the controller to reconcile a region.
    pub reconcile: UnboundedSender<ObjectRef<DerpRegion>>,
}

impl Prober {
    /// Probes every region each interval until the reconcile channel closes (the controller
    /// stopped) or the task is dropped.
    pub async fn run(self) {
        let opts = ProbeOptions {
            timeout: self.settings.timeout,
            stun_timeout: self.settings.timeout,
            mesh_timeout: self.settings.timeout,
            mesh: true,
            roots: Vec::new(),
        };
        info!(
            interval = ?self.settings.interval,
            timeout = ?self.settings.timeout,
            "probing relay nodes"
        );
        // no `wait_until_ready` on the store: an empty cache only means an empty round
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.reconcile.is_closed() {
                return;
            }
            let regions: Vec<Arc<DerpRegion>> = self
                .regions
                .state()
                .into_iter()
                .filter(|r| r.metadata.deletion_timestamp.is_none())
                .collect();
            let keys: Vec<String> = regions.iter().map(|r| region_key(r)).collect();
            debug!(regions = keys.len(), "probe round");
            self.tracker.retain_regions(&keys);
            self.metrics.forget_probed_regions(&keys);
            self.metrics.forget_conditions_except(&keys);
            for chunk in regions.chunks(self.settings.concurrency.max(1)) {
                let mut rounds: Vec<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = Vec::new();
                for r in chunk {
                    rounds.push(Box::pin(self.round(r.clone(), &opts)));
                }
                futures::future::join_all(rounds).await;
            }
        }
    }

    async fn round(&self, region: Arc<DerpRegion>, opts: &ProbeOptions) {
        let key = region_key(&region);
        let target = probe_target(&region);
        if target.nodes.is_empty() {
            return;
        }
        let started = Instant::now();
        // boxed as `dyn Send`: proves Send here, with concrete lifetimes (rustc cannot prove
        // it through the probe's closures inside `tokio::spawn`'s generic bound)
        let probing: Pin<Box<dyn Future<Output = RegionReport> + Send + '_>> =
            Box::pin(probe_one(&target, opts, self.settings.concurrency));
        let report = probing.await;
        let outcomes = summarize(&report);
        let grace = parse_duration(&region.spec.derp_map.unhealthy_after)
            .or_else(|| parse_duration(DEFAULT_UNHEALTHY_AFTER))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(Duration::from_secs(60));
        let (changed, transitions) = self.tracker.record_round(
            &key,
            &outcomes,
            Instant::now(),
            OffsetDateTime::now_utc(),
            grace,
        );
        self.metrics.record_probes(&key, &outcomes);
        debug!(region = %key, nodes = outcomes.len(), changed, took = ?started.elapsed(), "probed");
        let events: Vec<PlannedEvent> = transitions
            .into_iter()
            .map(|(node, t)| match t {
                Transition::Unhealthy(result) => {
                    warn!(region = %key, %node, %result, "relay node fails probes");
                    PlannedEvent {
                        warning: true,
                        reason: "NodeUnhealthy".into(),
                        note: format!("node {node} fails probes: {result}"),
                    }
                }
                Transition::Healthy => {
                    info!(region = %key, %node, "relay node passes probes again");
                    PlannedEvent {
                        warning: false,
                        reason: "NodeHealthy".into(),
                        note: format!("node {node} passes probes again"),
                    }
                }
            })
            .collect();
        if !events.is_empty() {
            self.events.publish(&region, &events, &self.metrics).await;
        }
        if changed {
            let _ = self
                .reconcile
                .unbounded_send(ObjectRef::from_obj(region.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests;
