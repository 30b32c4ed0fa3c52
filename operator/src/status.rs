//! Publishing what the plan concluded: the `DerpRegion` status (server-side apply on the
//! status subresource, only when it differs from what is stored) and Events.
//!
//! The conditions themselves (Ready, CertificatesReady, RelaysReady, DerpMapPublished,
//! NodesHealthy, with reasons and transition times) are computed purely in `plan`.

use k8s_openapi::{
    api::events::v1::Event, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use tracing::{debug, warn};

use crate::{
    Error,
    crd::{DerpRegion, DerpRegionStatus, FIELD_MANAGER, GROUP},
    metrics::Metrics,
    plan::PlannedEvent,
};

/// Apply `status` to the region unless it already has exactly that status.
/// Returns whether a write happened.
pub async fn patch_if_changed(
    api: &Api<DerpRegion>,
    region: &DerpRegion,
    status: &DerpRegionStatus,
    metrics: &Metrics,
) -> Result<bool, Error> {
    if region.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": "kubederp.io/v1alpha1",
        "kind": "DerpRegion",
        "status": status,
    });
    metrics.write("DerpRegionStatus", "patch");
    api.patch_status(
        &region.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::PatchStatus {
        name: region.name_any(),
        source,
    })?;
    Ok(true)
}

/// Publishes `events.k8s.io/v1` Events about regions.
///
/// Not kube-runtime's `Recorder`: it folds Events with the same reason into a series and keeps
/// the *first* note, which would hide e.g. the second pin change of a region.
#[derive(Clone)]
pub struct EventPublisher {
    client: Client,
    instance: String,
}

impl std::fmt::Debug for EventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventPublisher")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    /// New publisher; `instance` is the reporting instance (the Pod name).
    pub fn new(client: Client, instance: String) -> Self {
        Self { client, instance }
    }

    /// Publish planned Events on the region. Failures are logged, never fatal: an Event is a
    /// notification, the status carries the same facts.
    pub async fn publish(&self, region: &DerpRegion, events: &[PlannedEvent], metrics: &Metrics) {
        let ns = region.namespace().unwrap_or_default();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let reference = region.object_ref(&());
        for e in events {
            debug!(reason = %e.reason, note = %e.note, "event");
            let now = Timestamp::now();
            let ev = Event {
                metadata: ObjectMeta {
                    name: Some(format!("{}.{:x}", region.name_any(), now.as_nanosecond())),
                    namespace: Some(ns.clone()),
                    ..Default::default()
                },
                event_time: Some(MicroTime(now)),
                type_: Some(if e.warning { "Warning" } else { "Normal" }.into()),
                reason: Some(e.reason.clone()),
                note: Some(truncate(&e.note, 1000)),
                action: Some("Reconcile".into()),
                regarding: Some(reference.clone()),
                reporting_controller: Some(format!("{GROUP}/{FIELD_MANAGER}")),
                reporting_instance: Some(self.instance.clone()),
                ..Default::default()
            };
            metrics.events.inc();
            if let Err(error) = api.create(&PostParams::default(), &ev).await {
                warn!(region = %region.name_any(), reason = %e.reason, %error, "cannot publish event");
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
