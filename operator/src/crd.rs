//! The `DerpRegion` custom resource (`kubederp.io/v1alpha1`, namespaced): spec with defaults
//! and CEL rules, status, printer columns, and the constants every other module shares
//! (group, field manager, label keys, annotation keys).
//!
//! This module owns the *shape* of the contract in design.md §3; it makes no decisions (those
//! live in `plan/`) and does no I/O.

// KubeSchema's derive copies each struct into a private helper module, which trips
// `unreachable_pub` on the copies; the real types are public API.
#![allow(unreachable_pub)]

use std::collections::BTreeMap;

use derper::defaults;
use k8s_openapi::api::core::v1::{
    LocalObjectReference, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use kube::{CustomResource, KubeSchema, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the CRD (design.md §3).
pub const GROUP: &str = "kubederp.io";
/// Field manager for every server-side apply (design.md §4).
pub const FIELD_MANAGER: &str = "derp-operator";
/// `app.kubernetes.io/name` value on every child.
pub const APP_NAME: &str = "kubederp";
/// Label: owning region name (hash-truncated to 63 characters).
pub const LABEL_REGION: &str = "kubederp.io/region";
/// Label: the node a per-node child belongs to (hash-truncated to 63 characters).
pub const LABEL_NODE: &str = "kubederp.io/node";
/// Annotation on a per-node TLS Secret / Pod: the `sha256-raw:` pin of the certificate.
pub const ANNOTATION_PIN: &str = "kubederp.io/cert-name";
/// Annotation on a per-node TLS Secret: the certificate's notAfter (RFC 3339).
pub const ANNOTATION_NOT_AFTER: &str = "kubederp.io/not-after";
/// Annotation on a relay Pod: hash of its desired spec; a different hash means replace the Pod.
pub const ANNOTATION_SPEC_HASH: &str = "kubederp.io/spec-hash";
/// Default relay image (the `derper` of this repository).
pub const DEFAULT_RELAY_IMAGE: &str = "ghcr.io/kubederp/derper:0.1.0";
/// Default certificate validity (design.md §3: 10 years — the pin only changes with the cert).
pub const DEFAULT_CERT_VALIDITY: &str = "87600h";
/// Default renewal window (design.md §3: 30 days).
pub const DEFAULT_ROTATE_BEFORE: &str = "720h";
/// Node annotation: the public IPv4 address clients dial for this node (1:1 NAT, port
/// forward), published instead of the one in `Node.status.addresses`.
pub const ANNOTATION_PUBLIC_IPV4: &str = "kubederp.io/public-ipv4";
/// Node annotation: the public IPv6 address clients dial for this node.
pub const ANNOTATION_PUBLIC_IPV6: &str = "kubederp.io/public-ipv6";
/// Node annotation: the DERP (TLS) port published for this node (`DERPPort`); the relay still
/// binds `spec.ports.derp` on the node.
pub const ANNOTATION_DERP_PORT: &str = "kubederp.io/derp-port";
/// Node annotation: the STUN port published for this node (`STUNPort`); the relay still binds
/// `spec.ports.stun` on the node.
pub const ANNOTATION_STUN_PORT: &str = "kubederp.io/stun-port";
/// Default `derpMap.unhealthyAfter`: two default probe intervals (30 s), so one lost probe
/// never takes a node out of the map.
pub const DEFAULT_UNHEALTHY_AFTER: &str = "60s";

/// A DERP region made of the cluster nodes selected by `nodeSelector` (design.md §3).
#[allow(
    clippy::duplicated_attributes,
    reason = "repeated printcolumn(type_ = ..) entries are distinct columns"
)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubederp.io",
    version = "v1alpha1",
    kind = "DerpRegion",
    namespaced,
    status = "DerpRegionStatus",
    shortname = "derp",
    category = "kubederp",
    derive = "PartialEq",
    printcolumn(name = "RegionID", type_ = "integer", json_path = ".spec.regionID"),
    printcolumn(name = "Code", type_ = "string", json_path = ".status.regionCode"),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodesReady",
        description = "ready relay nodes / desired relay nodes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.regionCode) || size(self.regionCode) > 0").message("spec.regionCode must not be empty when set"))]
#[serde(rename_all = "camelCase")]
pub struct DerpRegionSpec {
    /// DERP region ID, 1–999. 900–999 is the range Tailscale reserves for custom regions.
    /// Unique among the regions the operator watches: when two regions claim the same ID,
    /// the older one (then the lower `namespace/name`) keeps it and the other is left out of
    /// every published derpMap with `Ready=False`, reason `RegionIDConflict`. Changing it is
    /// allowed (that is how a conflict is fixed) and is announced by a Warning Event: every
    /// client and control server must then get the new derpMap.
    #[serde(rename = "regionID")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 999").message("spec.regionID must be between 1 and 999"))]
    pub region_id: i32,
    /// Short region code [metadata.name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_code: Option<String>,
    /// Human-readable region name (default: the regionCode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_name: Option<String>,
    /// Labels a Node must carry to become a relay node of this region.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations: a node with a NoSchedule/NoExecute taint is used only when tolerated.
    /// They are also copied onto the relay Pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Optional cap on the number of relay nodes; nodes are chosen in name order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("spec.maxNodes must be at least 1"))]
    pub max_nodes: Option<i32>,
    /// Which node addresses are published.
    #[serde(default)]
    pub addresses: AddressPolicy,
    /// Ports of the relay on the node (host network).
    #[serde(default)]
    pub ports: Ports,
    /// Nodes only serve STUN (passed through to the derpMap `STUNOnly`).
    #[serde(default)]
    pub stun_only: bool,
    /// Deprecated "don't pick as home" (passed through to the derpMap `Avoid`).
    #[serde(default)]
    pub avoid: bool,
    /// Never measured, never home (passed through to the derpMap `NoMeasureNoHome`).
    #[serde(default)]
    pub no_measure_no_home: bool,
    /// Certificate lifetime policy.
    #[serde(default)]
    pub certificate: CertificatePolicy,
    /// Relay container settings.
    #[serde(default)]
    pub relay: RelaySpec,
    /// Mesh between the nodes of the region.
    #[serde(default)]
    pub mesh: MeshSpec,
    /// How the relays admit clients.
    #[serde(default)]
    pub client_verification: ClientVerification,
    /// Where and how the derpMap is published.
    #[serde(default)]
    pub derp_map: DerpMapSpec,
}

/// Node address type, as in `Node.status.addresses[].type`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum AddressType {
    /// `ExternalIP`.
    ExternalIP,
    /// `InternalIP`.
    InternalIP,
}

/// IP family.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum IpFamily {
    /// IPv4.
    IPv4,
    /// IPv6.
    IPv6,
}

/// Address selection policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressPolicy {
    /// Address types in order of preference [ExternalIP, InternalIP].
    #[serde(default = "default_address_types")]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("spec.addresses.types must name at least one address type"))]
    pub types: Vec<AddressType>,
    /// Families to publish [IPv4, IPv6]; both are published when present.
    #[serde(default = "default_families")]
    #[x_kube(validation = Rule::new("size(self) >= 1").message("spec.addresses.families must name at least one family"))]
    pub families: Vec<IpFamily>,
}

fn default_address_types() -> Vec<AddressType> {
    vec![AddressType::ExternalIP, AddressType::InternalIP]
}

fn default_families() -> Vec<IpFamily> {
    vec![IpFamily::IPv4, IpFamily::IPv6]
}

impl Default for AddressPolicy {
    fn default() -> Self {
        Self {
            types: default_address_types(),
            families: default_families(),
        }
    }
}

/// Relay ports on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.http == 0 || self.http != self.derp").message("spec.ports.http must differ from spec.ports.derp"))]
#[x_kube(validation = Rule::new("self.admin == 0 || (self.admin != self.derp && self.admin != self.http)").message("spec.ports.admin must differ from spec.ports.derp and spec.ports.http"))]
pub struct Ports {
    /// DERP over TLS (default 443).
    #[serde(default = "default_derp_port")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("spec.ports.derp must be between 1 and 65535"))]
    pub derp: i32,
    /// Plain HTTP (default 80); 0 disables it (and then `CanPort80` is false).
    #[serde(default = "default_http_port")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 65535").message("spec.ports.http must be between 0 (disabled) and 65535"))]
    pub http: i32,
    /// STUN over UDP (default 3478); -1 disables it.
    #[serde(default = "default_stun_port")]
    #[x_kube(validation = Rule::new("self == -1 || (self >= 1 && self <= 65535)").message("spec.ports.stun must be -1 (disabled) or between 1 and 65535"))]
    pub stun: i32,
    /// Relay admin listener (metrics, health) bound to the node's internal IP [3480; it was
    /// 9090 before, which Prometheus and Cockpit use on hosts]; 0 disables it. With host
    /// networking it must be free on the node: a relay that cannot bind it exits, and the
    /// region reports `RelaysReady=False` with reason `PortInUse`. An extension: only our `derper` reads it (via `DERPER_ADMIN_ADDR`).
    #[serde(default = "default_admin_port")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 65535").message("spec.ports.admin must be between 0 (disabled) and 65535"))]
    pub admin: i32,
}

// The defaults are the relay's ([`derper::defaults`]), widened to the CRD's i32.
fn default_derp_port() -> i32 {
    i32::from(defaults::DEFAULT_DERP_PORT)
}
fn default_http_port() -> i32 {
    defaults::DEFAULT_HTTP_PORT
}
fn default_stun_port() -> i32 {
    i32::from(defaults::DEFAULT_STUN_PORT)
}
fn default_admin_port() -> i32 {
    i32::from(defaults::DEFAULT_ADMIN_PORT)
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            derp: default_derp_port(),
            http: default_http_port(),
            stun: default_stun_port(),
            admin: default_admin_port(),
        }
    }
}

/// Certificate policy. Durations use Go syntax with `h`, `m`, `s` units (e.g. `720h`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatePolicy {
    /// Lifetime of an issued certificate [87600h = 10 years].
    #[serde(default = "default_validity")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$')").message("spec.certificate.validity must be a duration such as 87600h"))]
    pub validity: String,
    /// Reissue when the certificate expires within this window [720h = 30 days].
    #[serde(default = "default_rotate_before")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$')").message("spec.certificate.rotateBefore must be a duration such as 720h"))]
    pub rotate_before: String,
}

fn default_validity() -> String {
    DEFAULT_CERT_VALIDITY.to_owned()
}
fn default_rotate_before() -> String {
    DEFAULT_ROTATE_BEFORE.to_owned()
}

impl Default for CertificatePolicy {
    fn default() -> Self {
        Self {
            validity: default_validity(),
            rotate_before: default_rotate_before(),
        }
    }
}

/// Relay container and Pod settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.extraVolumeMounts) || self.extraVolumeMounts.all(m, has(self.extraVolumes) && self.extraVolumes.exists(v, v.name == m.name))").message("spec.relay.extraVolumeMounts[].name must name a volume of spec.relay.extraVolumes"))]
pub struct RelaySpec {
    /// Relay image [ghcr.io/kubederp/derper]; the upstream Go `derper` image also works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("spec.relay.imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
    /// Container resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra arguments appended to the relay command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
    /// Relay log level (passed as `RUST_LOG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Secrets (same namespace) used to pull the relay image; replaces the operator's
    /// `--relay-image-pull-secrets` default (chart value `relayImage.pullSecrets`) when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// PriorityClass of the relay Pods (e.g. `system-node-critical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("spec.relay.priorityClassName must be a DNS subdomain name"))]
    pub priority_class_name: Option<String>,
    /// Extra labels on the relay Pods (values: label values, at most 63 characters). Keys
    /// under `kubederp.io/` and `app.kubernetes.io/` belong to the operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('kubederp.io/') && !k.startsWith('app.kubernetes.io/'))").message("spec.relay.podLabels must not set kubederp.io/ or app.kubernetes.io/ keys (the operator owns them)"))]
    #[schemars(extend("additionalProperties" = {"type": "string", "maxLength": 63, "pattern": "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}))]
    pub pod_labels: BTreeMap<String, String>,
    /// Extra annotations on the relay Pods. Keys under `kubederp.io/` belong to the operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('kubederp.io/'))").message("spec.relay.podAnnotations must not set kubederp.io/ keys (the operator owns them)"))]
    pub pod_annotations: BTreeMap<String, String>,
    /// Up to 4 extra volumes of the relay Pods, for files a relay flag reads (e.g. a ConfigMap for
    /// `--rate-config`). The names `certs`, `state`, `mesh-psk`, `mesh-peers` and `tailscaled`
    /// are the operator's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(v, !(v.name in ['certs', 'state', 'mesh-psk', 'mesh-peers', 'tailscaled']))").message("spec.relay.extraVolumes must not use the names certs, state, mesh-psk, mesh-peers or tailscaled (the operator's)"))]
    pub extra_volumes: Vec<Volume>,
    /// Where the extra volumes are mounted in the relay container (up to 4). Each names a volume of
    /// `extraVolumes`; the operator's mount paths (`/certs`, `/var/lib/derper`, `/etc/derp/…`,
    /// `/var/run/tailscale`) cannot be used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(validation = Rule::new("self.all(m, !(m.mountPath in ['/certs', '/var/lib/derper', '/etc/derp/mesh-psk', '/etc/derp/mesh', '/var/run/tailscale']))").message("spec.relay.extraVolumeMounts must not use the operator's mount paths (/certs, /var/lib/derper, /etc/derp/mesh-psk, /etc/derp/mesh, /var/run/tailscale)"))]
    pub extra_volume_mounts: Vec<VolumeMount>,
}

/// Mesh settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    /// Mesh the nodes [true when the region has more than one node].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// How relays admit clients.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum VerificationMode {
    /// Admit every client (upstream default).
    #[default]
    #[serde(rename = "none")]
    None,
    /// Ask an HTTP endpoint (`--verify-client-url`).
    #[serde(rename = "url")]
    Url,
    /// Ask a `tailscaled` sidecar (`--verify-clients`).
    #[serde(rename = "tailscaled")]
    Tailscaled,
}

/// Client verification (design.md §3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'url' || has(self.verifyClientURL)").message("spec.clientVerification.verifyClientURL is required when mode is url"))]
#[x_kube(validation = Rule::new("self.mode == 'url' || !has(self.verifyClientURL)").message("spec.clientVerification.verifyClientURL is only valid when mode is url"))]
#[x_kube(validation = Rule::new("self.mode != 'tailscaled' || has(self.tailscaled)").message("spec.clientVerification.tailscaled is required when mode is tailscaled"))]
pub struct ClientVerification {
    /// `none` (the default), `url` or `tailscaled`.
    #[serde(default)]
    pub mode: VerificationMode,
    /// URL asked to admit each client (mode `url`).
    #[serde(
        default,
        rename = "verifyClientURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("spec.clientVerification.verifyClientURL must be an http(s) URL"))]
    pub verify_client_url: Option<String>,
    /// Admit clients when the URL cannot be reached [false — safer than upstream's true].
    #[serde(default)]
    pub fail_open: bool,
    /// `tailscaled` sidecar settings (mode `tailscaled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tailscaled: Option<TailscaledVerification>,
}

/// `tailscaled` sidecar used for client verification.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TailscaledVerification {
    /// Secret (same namespace) and key holding the auth key.
    pub auth_key_secret_ref: SecretKeyRef,
    /// Control server URL (e.g. a headscale server); Tailscale's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_server: Option<String>,
    /// tailscaled image [ghcr.io/tailscale/tailscale:stable].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A key in a Secret of the region's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Key in the Secret (default `authkey`).
    #[serde(default = "default_auth_key")]
    pub key: String,
}

fn default_auth_key() -> String {
    "authkey".to_owned()
}

/// derpMap publishing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DerpMapSpec {
    /// ConfigMap name (default `<name>-derpmap`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$') && size(self) <= 253").message("spec.derpMap.configMapName must be a DNS subdomain name"))]
    pub config_map_name: Option<String>,
    /// Emit `OmitDefaultRegions: true` in the policy snippet [false].
    #[serde(default)]
    pub omit_default_regions: bool,
    /// Publish nodes that are not healthy [true]. With `false`, a node is left out of the
    /// published derpMap while its relay Pod is not Ready, and once the operator's probes have
    /// failed on it continuously for `unhealthyAfter`; it comes back after three consecutive
    /// passed probes. When every Ready node would be left out, all of them stay published
    /// (an empty region helps no client) and `NodesHealthy` says so.
    #[serde(default = "default_true")]
    pub publish_unhealthy: bool,
    /// How long a node must fail the operator's probes without a pass before it is left out
    /// of the derpMap (only with `publishUnhealthy: false`; default 60s). Go duration syntax with
    /// h/m/s units.
    #[serde(default = "default_unhealthy_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$')").message("spec.derpMap.unhealthyAfter must be a duration such as 60s"))]
    pub unhealthy_after: String,
}

fn default_unhealthy_after() -> String {
    DEFAULT_UNHEALTHY_AFTER.to_owned()
}

fn default_true() -> bool {
    true
}

impl Default for DerpMapSpec {
    fn default() -> Self {
        Self {
            config_map_name: None,
            omit_default_regions: false,
            publish_unhealthy: true,
            unhealthy_after: default_unhealthy_after(),
        }
    }
}

/// Observed state of a region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DerpRegionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Effective region code (for the printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_code: Option<String>,
    /// The `spec.regionID` this status describes (a change is announced by an Event).
    #[serde(default, rename = "regionID", skip_serializing_if = "Option::is_none")]
    pub region_id: Option<i32>,
    /// `<ready>/<desired>` relay nodes (for the printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<String>,
    /// Ready, CertificatesReady, RelaysReady, DerpMapPublished, NodesHealthy.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// One entry per relay node, in derpMap order.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
    /// Nodes matched by the selector but not used, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_nodes: Vec<SkippedNode>,
    /// The published derpMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derp_map: Option<DerpMapStatus>,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// What a person can do about it.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Per-node status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Published IPv4 address.
    #[serde(default, rename = "ipv4", skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    /// Published IPv6 address.
    #[serde(default, rename = "ipv6", skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
    /// Published DERP port, when the Node's `kubederp.io/derp-port` annotation overrides
    /// `spec.ports.derp` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derp_port: Option<i32>,
    /// Published STUN port, when the Node's `kubederp.io/stun-port` annotation overrides
    /// `spec.ports.stun` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stun_port: Option<i32>,
    /// `sha256-raw:<hex>` pin of the node's certificate.
    #[serde(default)]
    pub cert_name: String,
    /// Certificate notAfter (RFC 3339).
    #[serde(default)]
    pub not_after: String,
    /// Relay Pod phase (`Pending`, `Running`, …; `Missing` before creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_phase: Option<String>,
    /// Relay Pod Ready condition.
    #[serde(default)]
    pub ready: bool,
    /// Time (RFC 3339) of the operator probe that produced the shown `probeResult` and
    /// `probeLatencyMs`. Probes repeat every `--probe-interval`, but the status is only
    /// rewritten when the result or the latency bucket changes, so this is when the current
    /// result was first seen; the time of every probe is in the operator's metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<String>,
    /// `ok`, or the first failed check and why: `tcp: …`, `tls: …`, `pin: …` (expected and
    /// presented pins), `derp: …`, `round_trip: …`, `stun: …`, `ipv6_<check>: …`,
    /// `mesh: …` (a packet to or from another node of the region was not relayed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_result: Option<String>,
    /// Round trip of a packet between two probe clients through this relay, in
    /// milliseconds, rounded up to a power of two; it only moves down once the latency has
    /// dropped two buckets, so jitter does not rewrite the status (exact values are in the
    /// metrics). Absent while probes fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_latency_ms: Option<i64>,
}

/// A node matched by the selector but not used.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedNode {
    /// Node name.
    pub name: String,
    /// CamelCase reason (`NoUsableAddress`, `Untolerated`, `MaxNodes`, `PortConflict`,
    /// `InvalidNodeOverride`, `Cordoned`, `NodeNotReady`, `NodeDeleting`). A node left out
    /// as `InvalidNodeOverride`, `Cordoned` or `NodeNotReady` keeps its certificate (it comes
    /// back with the same pin); the others release it.
    pub reason: String,
    /// Details.
    pub message: String,
}

/// Published derpMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DerpMapStatus {
    /// ConfigMap name.
    pub config_map_name: String,
    /// `sha256:<hex>` of `derpmap.json`.
    pub content_hash: String,
}

impl DerpRegionSpec {
    /// The effective region code: `regionCode` or the object name.
    pub fn effective_code(&self, name: &str) -> String {
        self.region_code.clone().unwrap_or_else(|| name.to_owned())
    }

    /// The effective region name: `regionName` or the effective code.
    pub fn effective_name(&self, name: &str) -> String {
        self.region_name
            .clone()
            .unwrap_or_else(|| self.effective_code(name))
    }
}

/// `namespace/name` of a region (the key of the health tracker and of region-ID conflicts).
pub fn region_key(region: &DerpRegion) -> String {
    format!(
        "{}/{}",
        region.namespace().unwrap_or_default(),
        region.name_any()
    )
}
