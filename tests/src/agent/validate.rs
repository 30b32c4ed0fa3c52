//! Validation: anything in a Pod spec the agent cannot honour is refused, naming the field.
//! The allow-lists here are what the rest of the agent implements; keep them in step.

use std::path::{Component, Path};

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

/// A Pod spec field the agent cannot honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal(pub(super) String);

/// PodSpec fields that are honoured, or only concern scheduling / isolation and are accepted
/// without effect on the process.
const POD_SPEC_FIELDS: &[&str] = &[
    "containers",
    "volumes",
    "nodeName",
    "hostNetwork",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "dnsPolicy",
    "schedulerName",
    "securityContext",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "enableServiceLinks",
    "tolerations",
    "nodeSelector",
    "affinity",
    "priority",
    "priorityClassName",
    "preemptionPolicy",
    "imagePullSecrets",
    "topologySpreadConstraints",
    "hostPID",
    "hostIPC",
    "hostname",
    "subdomain",
    "setHostnameAsFQDN",
    "os",
    "hostUsers",
    "overhead",
    "initContainers",
    "ephemeralContainers",
];

/// Container fields that are honoured or accepted without effect.
const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "command",
    "args",
    "env",
    "ports",
    "volumeMounts",
    "readinessProbe",
    "resources",
    "resizePolicy",
    "securityContext",
    "imagePullPolicy",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "stdin",
    "stdinOnce",
    "tty",
];

/// Readiness probe fields that are honoured.
const PROBE_FIELDS: &[&str] = &[
    "httpGet",
    "tcpSocket",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
];

/// `httpGet` fields that are honoured (the host is always the node IP, no extra headers).
const HTTP_GET_FIELDS: &[&str] = &["path", "port", "scheme"];

fn unknown_keys(v: &Value, allowed: &[&str]) -> Vec<String> {
    v.as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(msg.into()))
}

/// Checks the whole spec; returns the first field that cannot be honoured.
pub(super) fn validate(pod: &Pod) -> Result<(), Refusal> {
    let Some(spec) = pod.spec.as_ref() else {
        return refuse("spec: missing");
    };
    let spec_json = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let Some(k) = unknown_keys(&spec_json, POD_SPEC_FIELDS).first() {
        return refuse(format!(
            "spec.{k}: not supported by the kubederp node agent"
        ));
    }
    if spec.host_network != Some(true) {
        return refuse(
            "spec.hostNetwork: must be true (the node agent runs Pods as host processes and has \
             no Pod network)",
        );
    }
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return refuse("spec.initContainers: init containers are not supported");
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return refuse("spec.ephemeralContainers: not supported");
    }
    let restart = spec.restart_policy.as_deref().unwrap_or("Always");
    if restart != "Always" {
        return refuse(format!(
            "spec.restartPolicy: {restart:?} not supported (only Always)"
        ));
    }
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    for (i, v) in volumes.iter().enumerate() {
        validate_volume(i, v)?;
    }
    if spec.containers.is_empty() {
        return refuse("spec.containers: empty");
    }
    for (i, c) in spec.containers.iter().enumerate() {
        validate_container(i, c, volumes)?;
    }
    Ok(())
}

fn validate_volume(i: usize, v: &Volume) -> Result<(), Refusal> {
    let json = serde_json::to_value(v).unwrap_or(Value::Null);
    let kinds = unknown_keys(&json, &["name"]);
    let field = format!("spec.volumes[{i}]");
    match kinds.as_slice() {
        [k] if ["secret", "configMap", "emptyDir"].contains(&k.as_str()) => Ok(()),
        [k] => refuse(format!(
            "{field}.{k}: volume type not supported (volume {:?}); supported: secret, \
             configMap, emptyDir",
            v.name
        )),
        _ => refuse(format!("{field}: expected exactly one volume source")),
    }
}

fn validate_container(i: usize, c: &Container, volumes: &[Volume]) -> Result<(), Refusal> {
    let field = format!("spec.containers[{i}]");
    let json = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(k) = unknown_keys(&json, CONTAINER_FIELDS).first() {
        return refuse(format!(
            "{field}.{k}: not supported by the kubederp node agent (container {:?})",
            c.name
        ));
    }
    if c.image.as_deref().unwrap_or_default().is_empty() {
        return refuse(format!("{field}.image: empty"));
    }
    for (flag, name) in [
        (c.stdin, "stdin"),
        (c.stdin_once, "stdinOnce"),
        (c.tty, "tty"),
    ] {
        if flag == Some(true) {
            return refuse(format!("{field}.{name}: not supported"));
        }
    }
    for (j, e) in c.env.iter().flatten().enumerate() {
        if let Some(from) = &e.value_from {
            let fj = serde_json::to_value(from).unwrap_or(Value::Null);
            if let Some(k) = unknown_keys(&fj, &["fieldRef"]).first() {
                return refuse(format!(
                    "{field}.env[{j}].valueFrom.{k}: not supported (env {:?})",
                    e.name
                ));
            }
            if let Some(f) = &from.field_ref
                && !field_supported(&f.field_path)
            {
                return refuse(format!(
                    "{field}.env[{j}].valueFrom.fieldRef.fieldPath: {:?} not supported",
                    f.field_path
                ));
            }
        }
    }
    for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mf = format!("{field}.volumeMounts[{j}]");
        if !volumes.iter().any(|v| v.name == m.name) {
            return refuse(format!("{mf}.name: no volume named {:?}", m.name));
        }
        if !m.mount_path.starts_with('/') || m.mount_path.trim_end_matches('/').is_empty() {
            return refuse(format!(
                "{mf}.mountPath: {:?} must be an absolute path other than /",
                m.mount_path
            ));
        }
        if m.sub_path_expr.is_some() {
            return refuse(format!("{mf}.subPathExpr: not supported"));
        }
        if m.sub_path.as_deref().is_some_and(|sp| !sp.is_empty()) {
            return refuse(format!("{mf}.subPath: not supported"));
        }
        if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
            return refuse(format!("{mf}.mountPropagation: not supported"));
        }
    }
    if let Some(p) = &c.readiness_probe {
        let name = "readinessProbe";
        let pj = serde_json::to_value(p).unwrap_or(Value::Null);
        if let Some(k) = unknown_keys(&pj, PROBE_FIELDS).first() {
            return refuse(format!("{field}.{name}.{k}: not supported"));
        }
        if let Some(h) = &p.http_get {
            if let Some(k) = unknown_keys(&pj["httpGet"], HTTP_GET_FIELDS).first() {
                return refuse(format!("{field}.{name}.httpGet.{k}: not supported"));
            }
            if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
                return refuse(format!(
                    "{field}.{name}.httpGet.scheme: only HTTP is supported"
                ));
            }
            resolve_port(&h.port)
                .map_err(|m| Refusal(format!("{field}.{name}.httpGet.port: {m}")))?;
        }
        if let Some(t) = &p.tcp_socket {
            if let Some(k) = unknown_keys(&pj["tcpSocket"], &["port"]).first() {
                return refuse(format!("{field}.{name}.tcpSocket.{k}: not supported"));
            }
            resolve_port(&t.port)
                .map_err(|m| Refusal(format!("{field}.{name}.tcpSocket.port: {m}")))?;
        }
        if p.http_get.is_none() && p.tcp_socket.is_none() {
            return refuse(format!("{field}.{name}: no handler"));
        }
    }
    Ok(())
}

pub(super) fn is_clean_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn field_supported(path: &str) -> bool {
    matches!(path, "status.hostIP" | "status.podIP")
}

/// A probe's port; only numbers (the operator's probes name no ports).
pub(super) fn resolve_port(port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("{p} out of range")),
        IntOrString::String(name) => Err(format!("named port {name:?} not supported")),
    }
}
