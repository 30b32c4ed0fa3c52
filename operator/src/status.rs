//! Publishing what the plan concluded: the `DerpRegion` status (server-side apply on the
//! status subresource, only when it differs from what is stored) and Events.
//!
//! The conditions themselves (Ready, CertificatesReady, RelaysReady, DerpMapPublished,
//! NodesHealthy, with reasons and transition times) are computed purely in `plan`.

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};
use tracing::warn;

use crate::{
    Error,
    crd::{DerpRegion, DerpRegionStatus, FIELD_MANAGER},
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

/// Publish planned Events on the region. Failures are logged, never fatal: an Event is a
/// notification, the status carries the same facts.
pub async fn publish_events(
    recorder: &Recorder,
    region: &DerpRegion,
    events: &[PlannedEvent],
    metrics: &Metrics,
) {
    let reference = region.object_ref(&());
    for e in events {
        let ev = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(truncate(&e.note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        metrics.events.inc();
        if let Err(error) = recorder.publish(&ev, &reference).await {
            warn!(region = %region.name_any(), reason = %e.reason, %error, "cannot publish event");
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
