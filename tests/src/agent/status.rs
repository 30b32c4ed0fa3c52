//! Pod status: each container's state as reported in `containerStatuses`, the Pod
//! conditions, and the status patch (written only when it changed).

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::lock;
use super::pod::PodCtx;

/// What one container is doing, as reported in `containerStatuses`.
#[derive(Debug, Clone, Default)]
pub(super) struct CState {
    pub(super) restart_count: i32,
    pub(super) state: Value,
    pub(super) last_state: Value,
    pub(super) ready: bool,
    pub(super) started: bool,
    pub(super) ever_started: bool,
    pub(super) container_id: Option<String>,
}

pub(super) fn cond(type_: &str, status: bool, why: Option<(&str, &str)>) -> Value {
    let mut c = json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "lastTransitionTime": Time(Timestamp::now()),
    });
    if let Some((reason, message)) = why {
        c["reason"] = json!(reason);
        c["message"] = json!(message);
    }
    c
}

/// Builds and writes Pod status, only when it changed; condition transition times are kept.
pub(super) struct StatusReporter {
    pub(super) start_time: Time,
    pub(super) transitions: HashMap<&'static str, (bool, Time)>,
    pub(super) last: Option<Value>,
}

impl StatusReporter {
    pub(super) fn new(start_time: Time) -> StatusReporter {
        StatusReporter {
            start_time,
            transitions: HashMap::new(),
            last: None,
        }
    }

    pub(super) fn condition(&mut self, type_: &'static str, status: bool) -> Value {
        let entry = self
            .transitions
            .entry(type_)
            .or_insert_with(|| (status, Time(Timestamp::now())));
        if entry.0 != status {
            *entry = (status, Time(Timestamp::now()));
        }
        json!({
            "type": type_,
            "status": if status { "True" } else { "False" },
            "lastTransitionTime": entry.1,
        })
    }

    pub(super) async fn report(&mut self, ctx: &PodCtx, api: &Api<Pod>) {
        let node = &ctx.node;
        let states = lock(&ctx.states).clone();
        let containers = ctx.spec_containers();
        let all_ready = states.iter().all(|s| s.ready);
        let any_started = states.iter().any(|s| s.ever_started);
        // restartPolicy is always Always: a container never finishes for good.
        let phase = if any_started { "Running" } else { "Pending" };
        let statuses: Vec<Value> = states
            .iter()
            .zip(containers)
            .map(|(s, c)| {
                let mut v = json!({
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "ready": s.ready,
                    "started": s.started,
                    "restartCount": s.restart_count,
                    "state": s.state,
                });
                if !s.last_state.is_null() {
                    v["lastState"] = s.last_state.clone();
                }
                if let Some(id) = &s.container_id {
                    v["containerID"] = json!(id);
                }
                v
            })
            .collect();
        let ips = [json!({"ip": node.ipv4.to_string()})];
        let conditions = vec![
            self.condition("PodScheduled", true),
            self.condition("Initialized", true),
            self.condition("PodReadyToStartContainers", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
        ];
        let status = json!({
            "phase": phase,
            "hostIP": node.ipv4.to_string(),
            "hostIPs": ips,
            "podIP": node.ipv4.to_string(),
            "podIPs": ips,
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        });
        if self.last.as_ref() == Some(&status) {
            return;
        }
        match api
            .patch_status(
                &ctx.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => self.last = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => self.last = Some(status),
            Err(e) => tracing::warn!(error = %e, "patching pod status (will retry)"),
        }
    }
}
