//! The Pod loop (one worker per Pod bound to one of our nodes) and the life of one Pod:
//! validate, resolve images, project volumes, start the containers' supervisors, report
//! status, and stop and finalize the deletion.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::process::supervise;
use super::spec::{NodeSpec, image_last_segment};
use super::status::{CState, StatusReporter, cond};
use super::validate::{Refusal, validate};
use super::volumes::{Missing, container_mounts};
use super::{Shared, lock, read_lock};

/// What a Pod worker is told.
#[derive(Debug, Clone)]
pub(super) enum PodUpdate {
    Pod(Arc<Pod>),
    /// The Pod is gone from the apiserver.
    Gone,
}

#[derive(Debug)]
pub(super) struct WorkerHandle {
    pub(super) tx: watch::Sender<PodUpdate>,
    pub(super) task: JoinHandle<()>,
}

pub(super) async fn pod_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = shared.kick.notified() => {}
            _ = tick.tick() => {}
        }
        reconcile_pods(&shared);
    }
}

fn reconcile_pods(shared: &Arc<Shared>) {
    let nodes: BTreeMap<String, NodeSpec> = read_lock(&shared.nodes)
        .iter()
        .map(|(name, n)| (name.clone(), n.spec.clone()))
        .collect();
    let pods = shared.pods.state();
    let mut workers = lock(&shared.workers);
    workers.retain(|_, w| !w.task.is_finished());
    let mut live = BTreeSet::new();
    for pod in pods {
        let Some(node) = pod
            .spec
            .as_ref()
            .and_then(|s| nodes.get(s.node_name.as_deref()?))
        else {
            continue;
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        live.insert(uid.clone());
        match workers.get(&uid) {
            Some(w) => {
                w.tx.send_if_modified(|cur| match cur {
                    PodUpdate::Pod(old)
                        if old.metadata.resource_version == pod.metadata.resource_version =>
                    {
                        false
                    }
                    PodUpdate::Pod(_) => {
                        *cur = PodUpdate::Pod(pod.clone());
                        true
                    }
                    _ => false,
                });
            }
            None => {
                let (tx, rx) = watch::channel(PodUpdate::Pod(pod.clone()));
                let task = tokio::spawn(run_pod(shared.clone(), pod.clone(), node.clone(), rx));
                workers.insert(uid, WorkerHandle { tx, task });
            }
        }
    }
    for (uid, w) in workers.iter() {
        if !live.contains(uid) {
            w.tx.send_if_modified(|cur| {
                if matches!(cur, PodUpdate::Pod(_)) {
                    *cur = PodUpdate::Gone;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// A Pod being run.
pub(super) struct PodCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) pod: Arc<Pod>,
    pub(super) ns: String,
    pub(super) name: String,
    pub(super) uid: String,
    pub(super) node: NodeSpec,
    pub(super) dir: PathBuf,
    /// Each container's executable.
    pub(super) exes: Vec<PathBuf>,
    pub(super) mounts: Vec<Vec<(String, PathBuf)>>,
    pub(super) states: Mutex<Vec<CState>>,
    pub(super) dirty: Notify,
    /// Grace period for stopping the containers, set before `stop` is cancelled.
    pub(super) stop_grace: Mutex<Duration>,
}

impl PodCtx {
    pub(super) fn spec_containers(&self) -> &[Container] {
        self.pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
    }

    pub(super) fn update(&self, idx: usize, f: impl FnOnce(&mut CState)) {
        if let Some(s) = lock(&self.states).get_mut(idx) {
            f(s);
        }
        self.dirty.notify_one();
    }
}

/// Resolves each container's executable (checking `command[0]`) off the async runtime.
async fn resolve_exes(shared: &Arc<Shared>, pod: &Pod) -> Result<Vec<PathBuf>, Refusal> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let config = shared.config.clone();
    tokio::task::spawn_blocking(move || {
        containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let image = c.image.clone().unwrap_or_default();
                let exe = config
                    .resolve_image(&image)
                    .map_err(|m| Refusal(format!("spec.containers[{i}].image: {m}")))?;
                if let Some(c0) = c.command.as_ref().and_then(|c| c.first()) {
                    let base = Path::new(c0).file_name().map(|s| s.to_string_lossy());
                    let exe_name = exe.file_name().map(|s| s.to_string_lossy());
                    let ok = base.is_some()
                        && (base == exe_name
                            || base.as_deref() == Some(image_last_segment(&image)));
                    if !ok {
                        return Err(Refusal(format!(
                            "spec.containers[{i}].command[0]: {c0:?} is not the image's \
                             executable ({}); the node agent can only run the image's own binary",
                            exe.display()
                        )));
                    }
                }
                Ok(exe)
            })
            .collect::<Result<Vec<_>, Refusal>>()
    })
    .await
    .map_err(|e| Refusal(format!("resolving images: {e}")))?
}

/// Runs one Pod until it is deleted (then finalizes the deletion) or the agent stops.
async fn run_pod(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    node: NodeSpec,
    mut rx: watch::Receiver<PodUpdate>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let span = tracing::info_span!("pod", namespace = %ns, pod = %name, node = %node.name);
    let _ = tracing::Instrument::instrument(
        run_pod_inner(shared, pod, node, ns, name, uid, &mut rx),
        span,
    )
    .await;
}

async fn run_pod_inner(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    node: NodeSpec,
    ns: String,
    name: String,
    uid: String,
    rx: &mut watch::Receiver<PodUpdate>,
) {
    let pods_api = Api::<Pod>::namespaced(shared.client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        // Being deleted before we ever ran it (e.g. the agent restarted): nothing to stop.
        delete_now(&pods_api, &name, &uid).await;
        return;
    }
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or(Time(Timestamp::now()));
    let terminal = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Failed" || p == "Succeeded");

    // A refused or finished Pod is never (re)started; wait for its deletion.
    let verdict = match validate(&pod) {
        Ok(()) if terminal => Err(None),
        Ok(()) => resolve_exes(&shared, &pod).await.map_err(Some),
        Err(r) => Err(Some(r)),
    };
    let exes = match verdict {
        Ok(exes) => exes,
        Err(refusal) => {
            if let Some(Refusal(msg)) = refusal {
                tracing::error!(reason = "UnsupportedPodSpec", message = %msg, "refusing pod");
                let status = json!({"status": {
                    "phase": "Failed",
                    "reason": "UnsupportedPodSpec",
                    "message": format!("kubederp node agent cannot run this Pod: {msg}"),
                    "startTime": start_time,
                    "conditions": [
                        cond("PodScheduled", true, None),
                        cond("Ready", false, Some(("UnsupportedPodSpec", &msg))),
                    ],
                }});
                if let Err(e) = pods_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    tracing::warn!(error = %e, "patching status of refused pod");
                }
            }
            wait_for_end(&shared, rx).await;
            finalize(&shared, &pods_api, &name, &uid, rx).await;
            return;
        }
    };

    let dir = shared
        .config
        .workdir
        .join("pods")
        .join(format!("{ns}_{name}_{uid}"));
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let ctx = Arc::new(PodCtx {
        mounts: containers
            .iter()
            .map(|c| container_mounts(&dir, c))
            .collect(),
        states: Mutex::new(
            containers
                .iter()
                .map(|_| CState {
                    state: json!({"waiting": {"reason": "ContainerCreating"}}),
                    ..CState::default()
                })
                .collect(),
        ),
        shared: shared.clone(),
        pod: pod.clone(),
        ns: ns.clone(),
        name: name.clone(),
        uid: uid.clone(),
        node,
        dir,
        exes,
        dirty: Notify::new(),
        stop_grace: Mutex::new(Duration::from_secs(2)),
    });
    let mut reporter = StatusReporter::new(start_time);
    let mut resync_rx = shared.resync.subscribe();
    let mut last_files = HashMap::new();
    let mut resync_tick = tokio::time::interval(shared.config.resync);
    let mut image_change_logged = false;

    // Volumes first: containers start only once every volume could be projected.
    loop {
        match ctx.project_volumes(&mut last_files) {
            Ok(_) => break,
            Err(Missing(msg)) => {
                tracing::warn!(%msg, "waiting for volume sources");
                for i in 0..containers.len() {
                    ctx.update(i, |s| {
                        s.state =
                            json!({"waiting": {"reason": "ContainerCreating", "message": msg}});
                    });
                }
                reporter.report(&ctx, &pods_api).await;
            }
        }
        tokio::select! {
            _ = resync_rx.changed() => {}
            _ = resync_tick.tick() => {}
            () = shared.cancel.cancelled() => return,
            r = rx.changed() => {
                if r.is_err() || !matches!(&*rx.borrow(), PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_none()) {
                    finalize(&shared, &pods_api, &name, &uid, rx).await;
                    return;
                }
            }
        }
    }

    let stop = CancellationToken::new();
    let supervisors: Vec<JoinHandle<()>> = (0..containers.len())
        .map(|i| {
            tokio::spawn(tracing::Instrument::instrument(
                supervise(ctx.clone(), i, stop.clone()),
                tracing::Span::current(),
            ))
        })
        .collect();
    tracing::info!(containers = containers.len(), "pod started");

    let stop_reason = loop {
        reporter.report(&ctx, &pods_api).await;
        tokio::select! {
            () = ctx.dirty.notified() => {}
            _ = resync_rx.changed() => {
                if let Err(Missing(m)) = ctx.project_volumes(&mut last_files) {
                    tracing::warn!(msg = %m, "volume source missing; keeping the old content");
                }
            }
            _ = resync_tick.tick() => {
                if let Err(Missing(m)) = ctx.project_volumes(&mut last_files) {
                    tracing::debug!(msg = %m, "volume source missing; keeping the old content");
                }
            }
            () = shared.cancel.cancelled() => break StopReason::AgentShutdown,
            r = rx.changed() => {
                let update = if r.is_err() { PodUpdate::Gone } else { rx.borrow().clone() };
                match update {
                    PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_some() => {
                        let grace = p
                            .metadata
                            .deletion_grace_period_seconds
                            .or_else(|| p.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
                            .unwrap_or(30);
                        break StopReason::Deleted(Duration::from_secs(u64::try_from(grace).unwrap_or(0)));
                    }
                    PodUpdate::Pod(p) => log_image_change(&ctx, &p, &mut image_change_logged),
                    PodUpdate::Gone => break StopReason::Deleted(Duration::ZERO),
                }
            }
        }
    };
    let grace = match stop_reason {
        StopReason::Deleted(g) => g,
        StopReason::AgentShutdown => {
            let g = pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .and_then(|g| u64::try_from(g).ok())
                .unwrap_or(30);
            Duration::from_secs(g).min(shared.config.shutdown_grace)
        }
    };
    tracing::info!(reason = ?stop_reason, grace_s = grace.as_secs_f32(), "stopping pod");
    *lock(&ctx.stop_grace) = grace;
    stop.cancel();
    for s in supervisors {
        let _ = s.await;
    }
    if matches!(stop_reason, StopReason::AgentShutdown) {
        // Containers are terminated and not ready; the next agent on this node runs them again.
        reporter.report(&ctx, &pods_api).await;
        return;
    }
    // Final status with terminated containers is useless once the Pod is deleted; delete it.
    delete_now(&pods_api, &name, &uid).await;
    let _ = std::fs::remove_dir_all(ctx.dir.join("volumes"));
    tracing::info!("pod deleted");
}

/// A running container's image cannot change here: the operator replaces a relay Pod rather
/// than changing it (a kubelet would restart the container). Logged once, as an error naming
/// the field; the old process keeps running.
fn log_image_change(ctx: &PodCtx, pod: &Pod, logged: &mut bool) {
    if *logged {
        return;
    }
    let running = ctx.spec_containers();
    for (i, c) in pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .enumerate()
    {
        if running.get(i).is_some_and(|r| r.image != c.image) {
            tracing::error!(
                field = %format!("spec.containers[{i}].image"),
                "changing a running container's image is not supported by the node agent; \
                 the old process keeps running"
            );
            *logged = true;
        }
    }
}

#[derive(Debug)]
enum StopReason {
    Deleted(Duration),
    AgentShutdown,
}

/// Waits until the Pod is deleted (or gone, or the agent stops).
async fn wait_for_end(shared: &Shared, rx: &mut watch::Receiver<PodUpdate>) {
    loop {
        if !matches!(&*rx.borrow(), PodUpdate::Pod(p) if p.metadata.deletion_timestamp.is_none()) {
            return;
        }
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Deletes the Pod with grace period 0 once nothing runs (unless the agent is stopping).
async fn finalize(
    shared: &Shared,
    api: &Api<Pod>,
    name: &str,
    uid: &str,
    rx: &mut watch::Receiver<PodUpdate>,
) {
    if shared.cancel.is_cancelled() {
        return;
    }
    if matches!(&*rx.borrow(), PodUpdate::Gone) {
        return;
    }
    delete_now(api, name, uid).await;
}

async fn delete_now(api: &Api<Pod>, name: &str, uid: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(error = %e, "deleting pod"),
    }
}
