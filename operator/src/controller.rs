//! The kube-runtime Controller: watches DerpRegions, owns their Secrets/ConfigMaps/Pods,
//! watches Nodes (node → regions whose selector matches or that use it), and reconciles.
//!
//! Reconcile = OBSERVE (stores + a labelled list of children) → PLAN (pure, `plan`) →
//! APPLY (`apply`) → STATUS/EVENTS (`status`) → REQUEUE. Errors are classified by
//! `error_policy`; nothing here panics or exits on a bad region.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Pod, Secret},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        Controller,
        controller::{self, Action},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    Error,
    certs::CertIssuer,
    crd::{DerpRegion, FIELD_MANAGER},
    health::{ProbeSettings, Prober, Tracker},
    metrics::Metrics,
    plan::{
        self, Existing, Inputs,
        children::region_selector,
        derpmap::{self, DerpMap},
        nodes::{PortClaim, PortSet, select_nodes, selector_matches},
        region_id::{in_conflict, precedence, region_id_winner},
    },
    status,
};

/// State shared between the controller and the admin server.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// The derpMap of every managed region, keyed by `namespace/name`.
    /// A std lock: never held across an `.await`.
    derp_maps: Arc<RwLock<BTreeMap<String, DerpMap>>>,
    /// True while the controller runs with synced caches (and, with leader election, leads).
    ready: Arc<AtomicBool>,
    /// The controller's DerpRegion cache once it runs: a map whose region is no longer in it
    /// (deleted; a region without finalizers is never reconciled after its deletion) is left
    /// out of the merged map.
    regions: Arc<RwLock<Option<Store<DerpRegion>>>>,
}

impl Shared {
    /// Whether the controller is running with synced caches.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn set_map(&self, key: String, map: Option<DerpMap>) {
        let mut maps = self
            .derp_maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map {
            Some(m) => maps.insert(key, m),
            None => maps.remove(&key),
        };
    }

    /// The merged derpMap of every managed region (headscale `derp.urls` form). A region whose
    /// ID another region holds has no map here (see `plan::region_id`); should two maps still
    /// share an ID for a moment, the one whose `namespace/name` sorts first is kept.
    pub fn merged_derp_map(&self) -> DerpMap {
        let maps = self
            .derp_maps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let live = self
            .regions
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let exists = |key: &str| {
            let Some(store) = &live else { return true };
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            store
                .get(&ObjectRef::<DerpRegion>::new(name).within(ns))
                .is_some()
        };
        let mut out = DerpMap::default();
        for m in maps.iter().filter(|(k, _)| exists(k)).map(|(_, m)| m) {
            out.omit_default_regions |= m.omit_default_regions;
            for (id, r) in &m.regions {
                out.regions.entry(*id).or_insert_with(|| r.clone());
            }
        }
        out
    }

    /// `derpmap.json` of the merged map.
    pub fn merged_derp_map_json(&self) -> String {
        derpmap::render_json(&self.merged_derp_map())
    }
}

/// Controller settings (from [`crate::args`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Only watch this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Maximum concurrent reconciles.
    pub concurrency: u16,
    /// Reporting instance for Events (the Pod name).
    pub instance: Option<String>,
    /// Probe every region's relay nodes (None: no probes, and the status has no probe fields).
    pub probe: Option<ProbeSettings>,
    /// Relay image for regions without `spec.relay.image`.
    pub relay_image: String,
    /// Image pull secrets for regions without `spec.relay.imagePullSecrets`.
    pub relay_image_pull_secrets: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 4,
            instance: None,
            probe: None,
            relay_image: crate::crd::DEFAULT_RELAY_IMAGE.to_owned(),
            relay_image_pull_secrets: Vec::new(),
        }
    }
}

/// Per-reconcile context.
struct Context {
    client: Client,
    regions: Store<DerpRegion>,
    metrics: Arc<Metrics>,
    events: status::EventPublisher,
    shared: Shared,
    issuer: Arc<dyn CertIssuer>,
    tracker: Tracker,
    relay_image: String,
    relay_image_pull_secrets: Vec<String>,
    /// The watched DerpRegions (one namespace or all), for consistent reads.
    regions_api: Api<DerpRegion>,
}

/// The region holding `region`'s ID when that is another region, from a consistent list of
/// the watched regions: the controller's cache and the watch that triggered this reconcile
/// (another region created, renamed or deleted) are separate streams, so the cache may not
/// show that change yet.
async fn region_id_holder(ctx: &Context, region: &DerpRegion) -> Result<Option<String>, Error> {
    let all = ctx
        .regions_api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::ListChildren {
            kind: "DerpRegions",
            region: region.name_any(),
            source,
        })?;
    Ok(region_id_winner(region, all.items.iter()))
}

/// Nodes and ports claimed by regions that take precedence over `region`.
fn claims_for(region: &DerpRegion, all: &[Arc<DerpRegion>], nodes: &[&Node]) -> Vec<PortClaim> {
    let mine = precedence(region);
    let mut out = Vec::new();
    for other in all {
        if other.metadata.uid == region.metadata.uid
            || other.metadata.deletion_timestamp.is_some()
            || precedence(other) >= mine
        {
            continue;
        }
        let ports = PortSet::of(&other.spec.ports);
        let who = precedence(other).1;
        // `nodes` are only this region's candidates, so the other region's maxNodes cannot be
        // judged here: conservatively treat every node it matches as claimed
        let mut spec = other.spec.clone();
        spec.max_nodes = None;
        for n in select_nodes(&spec, nodes, &[]).selected {
            out.push(PortClaim {
                region: who.clone(),
                node: n.name,
                ports: ports.clone(),
            });
        }
    }
    out
}

async fn list_children(client: &Client, ns: &str, region: &str) -> Result<Existing, Error> {
    let lp = ListParams::default().labels(&region_selector(region));
    let err = |kind: &'static str| {
        move |source| Error::ListChildren {
            kind,
            region: region.to_owned(),
            source,
        }
    };
    let secrets = Api::<Secret>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(err("Secrets"))?;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(err("ConfigMaps"))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(err("Pods"))?;
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .list(&lp)
        .await
        .map_err(err("PodDisruptionBudgets"))?;
    Ok(Existing {
        secrets: secrets.into_iter().map(|o| (o.name_any(), o)).collect(),
        config_maps: cms.into_iter().map(|o| (o.name_any(), o)).collect(),
        pods: pods.into_iter().map(|o| (o.name_any(), o)).collect(),
        pdbs: pdbs.into_iter().map(|o| (o.name_any(), o)).collect(),
    })
}

/// `k=v,k2=v2` for a label selector map (empty: everything).
fn label_selector(sel: &BTreeMap<String, String>) -> String {
    sel.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn new_psk() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

async fn reconcile(region: Arc<DerpRegion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = region.name_any();
    let ns = region
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let key = format!("{ns}/{name}");
    let span = info_span!("reconcile", region = %key, generation = region.metadata.generation);
    async move {
        ctx.metrics.reconciles.inc();
        let started = Instant::now();
        if region.metadata.deletion_timestamp.is_some() {
            // children go with the owner references (garbage collector)
            ctx.metrics
                .forget_conditions_except(&live_region_keys(&ctx));
            ctx.shared.set_map(key, None);
            return Ok(Action::await_change());
        }
        // Nodes are read with a consistent list filtered by the region's selector, not from a
        // cache: a cache that lags behind the event that triggered this reconcile would miss
        // the change (and an empty cache after a restart would prune every relay).
        let node_list = Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default().labels(&label_selector(&region.spec.node_selector)))
            .await
            .map_err(|source| Error::ListChildren {
                kind: "Nodes",
                region: name.clone(),
                source,
            })?;
        let nodes: Vec<&Node> = node_list.items.iter().collect();
        // other regions come from the controller's cache; claims only concern our nodes
        let _ = ctx.regions.wait_until_ready().await;
        let claims = claims_for(&region, &ctx.regions.state(), &nodes);
        debug!(nodes = nodes.len(), claims = claims.len(), "observed");
        let region_id_winner = region_id_holder(&ctx, &region).await?;
        let existing = list_children(&ctx.client, &ns, &name).await?;
        let probes = ctx.tracker.views(&key);
        let plan = plan::plan(&Inputs {
            region: &region,
            nodes: &nodes,
            claims: &claims,
            existing: &existing,
            now: time::OffsetDateTime::now_utc(),
            issuer: ctx.issuer.as_ref(),
            new_psk: &new_psk,
            probes: &probes,
            relay_image: &ctx.relay_image,
            relay_image_pull_secrets: &ctx.relay_image_pull_secrets,
            region_id_winner: region_id_winner.as_deref(),
        })
        .map_err(|source| Error::Plan {
            region: name.clone(),
            source,
        })?;
        ctx.metrics.certs_issued.inc_by(plan.certs_issued as u64);
        if plan.pin_changes > 0 {
            ctx.metrics
                .pin_changes
                .get_or_create(&crate::metrics::RegionLabels {
                    region: key.clone(),
                })
                .inc_by(plan.pin_changes as u64);
        }
        let writes = plan.writes.len();
        crate::apply::execute(&ctx.client, &ns, plan.writes, &ctx.metrics).await?;
        let api: Api<DerpRegion> = Api::namespaced(ctx.client.clone(), &ns);
        let status_written =
            status::patch_if_changed(&api, &region, &plan.status, &ctx.metrics).await?;
        // deleted regions are never reconciled again: drop their gauges here (and in the
        // probe loop); this region's gauges are written after that
        ctx.metrics
            .forget_conditions_except(&live_region_keys(&ctx));
        ctx.metrics.record_conditions(&key, &plan.status.conditions);
        ctx.events
            .publish(&region, &plan.events, &ctx.metrics)
            .await;
        ctx.shared.set_map(key, plan.derp_map);
        ctx.metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        if writes > 0 || status_written {
            info!(
                writes,
                status_written,
                nodes = plan.status.nodes.len(),
                ready = plan.status.nodes_ready.as_deref().unwrap_or(""),
                "region reconciled"
            );
        } else {
            debug!("region unchanged");
        }
        Ok(Action::requeue(plan.requeue_after))
    }
    .instrument(span)
    .await
}

/// `namespace/name` of every region in the controller's cache that is not being deleted.
fn live_region_keys(ctx: &Context) -> Vec<String> {
    ctx.regions
        .state()
        .iter()
        .filter(|r| r.metadata.deletion_timestamp.is_none())
        .map(|r| crate::crd::region_key(r))
        .collect()
}

fn error_policy(region: Arc<DerpRegion>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            reason: error.reason(),
        })
        .inc();
    warn!(region = %region.name_any(), reason = error.reason(), %error, "reconcile failed");
    match (error.api_code(), error) {
        // someone else changed the object under us: look again soon
        (Some(409), _) => Action::requeue(Duration::from_secs(1)),
        // a spec problem: the next spec change triggers a reconcile anyway
        (_, Error::Plan { .. }) | (Some(422), _) => Action::requeue(Duration::from_secs(300)),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}

/// Run the controller until `shutdown` resolves.
///
/// Checks that the CRD is installed, then reconciles.
pub async fn run(
    client: Client,
    settings: Settings,
    shared: Shared,
    metrics: Arc<Metrics>,
    issuer: Arc<dyn CertIssuer>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let regions: Api<DerpRegion> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    regions
        .list(&ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotInstalled)?;
    fn child_api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = settings.namespace.as_deref();
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));

    let nodes_api: Api<Node> = Api::all(client.clone());
    let controller = Controller::new(regions.clone(), watcher::Config::default());
    let region_store = controller.store();
    let mapper_store = region_store.clone();
    let ctx = Arc::new(Context {
        events: status::EventPublisher::new(
            client.clone(),
            settings
                .instance
                .clone()
                .unwrap_or_else(|| FIELD_MANAGER.to_owned()),
        ),
        client: client.clone(),
        regions: region_store,
        metrics,
        shared: shared.clone(),
        issuer,
        tracker: Tracker::default(),
        relay_image: settings.relay_image.clone(),
        relay_image_pull_secrets: settings.relay_image_pull_secrets.clone(),
        regions_api: regions.clone(),
    });
    let conflict_store = ctx.regions.clone();
    *shared
        .regions
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ctx.regions.clone());
    // the probe loop asks for reconciles of regions whose probe view changed
    let (probe_tx, probe_rx) = futures::channel::mpsc::unbounded();
    let prober = settings.probe.clone().map(|probe| {
        tokio::spawn(
            Prober {
                settings: probe,
                regions: ctx.regions.clone(),
                tracker: ctx.tracker.clone(),
                metrics: ctx.metrics.clone(),
                events: ctx.events.clone(),
                reconcile: probe_tx.clone(),
            }
            .run()
            .instrument(info_span!("prober")),
        )
    });
    drop(probe_tx);
    shared.ready.store(true, Ordering::SeqCst);
    info!(namespace = ?settings.namespace, "controller started");
    controller
        .owns(child_api::<Secret>(&client, ns), owned.clone())
        .owns(child_api::<ConfigMap>(&client, ns), owned.clone())
        .owns(child_api::<Pod>(&client, ns), owned.clone())
        .owns(child_api::<PodDisruptionBudget>(&client, ns), owned)
        .watches(nodes_api, watcher::Config::default(), move |node: Node| {
            let name = node.name_any();
            mapper_store
                .state()
                .into_iter()
                .filter(|r| {
                    selector_matches(&r.spec.node_selector, node.metadata.labels.as_ref())
                        || r.status.as_ref().is_some_and(|s| {
                            s.nodes.iter().any(|n| n.name == name)
                                || s.skipped_nodes.iter().any(|n| n.name == name)
                        })
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        })
        // a region that appears, changes its ID or goes away can start or end a region ID
        // conflict: look again at the regions claiming the same ID and at those that lost one
        .watches(regions, watcher::Config::default(), move |changed: DerpRegion| {
            conflict_store
                .state()
                .into_iter()
                .filter(|r| {
                    r.metadata.uid != changed.metadata.uid
                        && (r.spec.region_id == changed.spec.region_id
                            || in_conflict(r.status.as_ref()))
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(probe_rx)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(error) = res {
                debug!(%error, "controller stream error");
            }
            futures::future::ready(())
        })
        .await;
    if let Some(p) = prober {
        p.abort();
        let _ = p.await;
    }
    shared.ready.store(false, Ordering::SeqCst);
    info!("controller stopped");
    Ok(())
}
