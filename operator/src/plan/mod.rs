//! PURE planning: (region, nodes, claims, existing children, now, CertIssuer, PSK source) →
//! [`Plan`]: the writes needed (already diffed against what exists, so an idle region plans
//! none), the status to publish, the Events to emit and when to look again.
//!
//! No kube client, no clock, no RNG except through parameters (house-style §4.2). The
//! controller observes, calls [`plan`], and executes the writes in order.

pub mod children;
pub mod conditions;
pub mod derpmap;
pub mod nodes;
pub mod pod_failures;
pub mod region_id;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use time::OffsetDateTime;

pub use self::conditions::PlannedEvent;
use self::conditions::{carry_transition_time, condition, rfc3339};
use self::{
    children::{
        RelayDefaults, derpmap_config_map, derpmap_name, host_port, mesh_peers_config_map,
        mesh_peers_name, mesh_secret, mesh_secret_name, relay_pod, spec_hash, tls_secret,
        tls_secret_name,
    },
    derpmap::{DerpMap, DerpNode, DerpRegion as MapRegion},
    nodes::{PortClaim, SelectedNode, Selection, select_nodes},
};
use crate::{
    certs::{CertIssuer, key_matches, parse_cert_pem, parse_duration},
    crd::{
        ANNOTATION_PIN, CertificatePolicy, Condition, DerpMapStatus, DerpRegion, DerpRegionStatus,
        NodeStatus, SkippedNode,
    },
};

/// Longest wait before looking at a region again (house-style §4.2 step 6).
pub const MAX_REQUEUE: Duration = Duration::from_secs(300);
/// Wait while a rollout step is in progress (a Pod terminating or becoming ready).
pub const ROLLOUT_REQUEUE: Duration = Duration::from_secs(5);

/// Children of a region that exist now (listed by the region label), keyed by name.
#[derive(Debug, Default, Clone)]
pub struct Existing {
    /// Secrets.
    pub secrets: BTreeMap<String, Secret>,
    /// ConfigMaps.
    pub config_maps: BTreeMap<String, ConfigMap>,
    /// Pods.
    pub pods: BTreeMap<String, Pod>,
    /// PodDisruptionBudgets.
    pub pdbs: BTreeMap<String, PodDisruptionBudget>,
}

/// Everything [`plan`] needs.
pub struct Inputs<'a> {
    /// The region (with name, namespace, uid).
    pub region: &'a DerpRegion,
    /// All Nodes known to the operator.
    pub nodes: &'a [&'a Node],
    /// Node/port claims by regions that take precedence.
    pub claims: &'a [PortClaim],
    /// Existing children.
    pub existing: &'a Existing,
    /// The current time.
    pub now: OffsetDateTime,
    /// Certificate issuer.
    pub issuer: &'a dyn CertIssuer,
    /// Source of a fresh mesh PSK (64 hex characters).
    pub new_psk: &'a dyn Fn() -> String,
    /// The operator's probe results by node name (empty when probing is off or no probe
    /// has finished yet).
    pub probes: &'a BTreeMap<String, ProbeView>,
    /// Relay image when the region does not set `spec.relay.image` (`--relay-image`).
    pub relay_image: &'a str,
    /// Pull secrets when the region does not set `spec.relay.imagePullSecrets`
    /// (`--relay-image-pull-secrets`).
    pub relay_image_pull_secrets: &'a [String],
    /// `namespace/name` of the region that holds this region's `spec.regionID` when another
    /// region claims it first ([`region_id::region_id_winner`]); `None` when the ID is ours.
    pub region_id_winner: Option<&'a str>,
}

/// What the operator's probes say about one node (kept by `health::Tracker`; it only changes
/// when the result, the latency bucket or `withheld` does).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeView {
    /// `ok` or `<check>: <why>`.
    pub result: String,
    /// Whether every check passed.
    pub healthy: bool,
    /// Round-trip latency bucket in milliseconds, when measured.
    pub latency_ms: Option<i64>,
    /// When this view was first seen.
    pub time: OffsetDateTime,
    /// Failing for longer than `derpMap.unhealthyAfter` and not yet recovered: left out of
    /// the derpMap when `publishUnhealthy` is false.
    pub withheld: bool,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("region", &self.region.name_any())
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// One write to the apiserver.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Server-side apply a Secret.
    ApplySecret(Secret),
    /// Server-side apply a ConfigMap.
    ApplyConfigMap(ConfigMap),
    /// Create (server-side apply) a relay Pod.
    CreatePod(Box<Pod>),
    /// Server-side apply the relay PodDisruptionBudget ([`children::relay_pdb`]).
    ApplyPdb(Box<PodDisruptionBudget>),
    /// Delete a relay Pod (replacement or prune).
    DeletePod {
        /// Pod name.
        name: String,
        /// Why (`Replace`, `Prune`).
        reason: &'static str,
    },
    /// Delete a Secret no longer wanted.
    DeleteSecret(String),
    /// Delete a ConfigMap no longer wanted.
    DeleteConfigMap(String),
}

/// The outcome of planning one region.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Writes, in dependency order: Secrets → mesh ConfigMap → Pods → derpMap → deletions.
    pub writes: Vec<Write>,
    /// The status to publish.
    pub status: DerpRegionStatus,
    /// Events to emit.
    pub events: Vec<PlannedEvent>,
    /// The region's derpMap (for the merged `/derpmap.json`); `None` while another region
    /// holds its region ID.
    pub derp_map: Option<DerpMap>,
    /// When to reconcile again.
    pub requeue_after: Duration,
    /// Number of certificates issued by this plan.
    pub certs_issued: usize,
    /// Number of nodes whose pin changes with this plan (a new certificate replacing one
    /// that was published).
    pub pin_changes: usize,
}

/// A planning failure (certificate issuance, invalid durations).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The certificate for a node could not be issued.
    #[error("issue certificate for node {node}: {source}")]
    IssueCertificate {
        /// Node name.
        node: String,
        /// Cause.
        #[source]
        source: crate::certs::CertError,
    },
    /// A duration in spec.certificate could not be parsed.
    #[error("invalid spec.certificate.{field} {value:?}: use h/m/s units such as 720h")]
    InvalidDuration {
        /// Field name.
        field: &'static str,
        /// Value.
        value: String,
    },
}

/// Why a node's certificate must be (re)issued, or `None` to reuse it.
fn reissue_reason(
    existing: Option<&Secret>,
    want_ips: &[std::net::IpAddr],
    now: OffsetDateTime,
    rotate_before: time::Duration,
) -> Option<&'static str> {
    let Some(secret) = existing else {
        return Some("SecretMissing");
    };
    let data = secret.data.as_ref();
    let (Some(crt), Some(key)) = (
        data.and_then(|d| d.get("tls.crt")),
        data.and_then(|d| d.get("tls.key")),
    ) else {
        return Some("SecretIncomplete");
    };
    let Ok(parsed) = parse_cert_pem(&crt.0) else {
        return Some("CertificateUnparseable");
    };
    if !parsed.single {
        return Some("CertificateChain");
    }
    if parsed.ips != want_ips {
        return Some("AddressesChanged");
    }
    if parsed.not_after - now <= rotate_before {
        return Some("Expiring");
    }
    match std::str::from_utf8(&key.0) {
        Ok(k) if key_matches(&crt.0, k) => None,
        _ => Some("KeyMismatch"),
    }
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn owned_by(obj: &impl Resource, region: &DerpRegion) -> bool {
    let uid = region.meta().uid.as_deref();
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(o.uid.as_str()) == uid)
}

fn subset(
    want: Option<&BTreeMap<String, String>>,
    have: Option<&BTreeMap<String, String>>,
) -> bool {
    want.into_iter()
        .flatten()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
}

fn meta_matches(want: &kube::api::ObjectMeta, have: &kube::api::ObjectMeta) -> bool {
    subset(want.labels.as_ref(), have.labels.as_ref())
        && subset(want.annotations.as_ref(), have.annotations.as_ref())
        && want.owner_references.iter().flatten().all(|o| {
            have.owner_references
                .iter()
                .flatten()
                .any(|h| h.uid == o.uid && h.controller == o.controller)
        })
}

fn secret_unchanged(want: &Secret, have: Option<&Secret>) -> bool {
    have.is_some_and(|h| {
        h.metadata.deletion_timestamp.is_none()
            && h.type_ == want.type_
            && h.data == want.data
            && meta_matches(&want.metadata, &h.metadata)
    })
}

fn config_map_unchanged(want: &ConfigMap, have: Option<&ConfigMap>) -> bool {
    have.is_some_and(|h| {
        h.metadata.deletion_timestamp.is_none()
            && h.data == want.data
            && meta_matches(&want.metadata, &h.metadata)
    })
}

/// Node names the derpMap ConfigMap `have` publishes now (empty when absent or unreadable).
fn published_nodes(have: Option<&ConfigMap>) -> Vec<String> {
    have.and_then(|c| c.data.as_ref())
        .and_then(|d| d.get("derpmap.json"))
        .and_then(|json| {
            derper::derpmap::parse_map(json, Some(derper::derpmap::MapFormat::Json), "derpmap.json")
                .ok()
        })
        .map(|(m, _)| {
            m.regions
                .into_values()
                .flat_map(|r| r.nodes.into_iter().map(|n| n.name))
                .collect()
        })
        .unwrap_or_default()
}

/// `why` with the detail a person needs: for changed addresses, the old and new IP SANs.
fn reissue_detail(why: &str, have: Option<&Secret>, ips: &[std::net::IpAddr]) -> String {
    if why != "AddressesChanged" {
        return why.to_owned();
    }
    let old = have
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get("tls.crt"))
        .and_then(|c| parse_cert_pem(&c.0).ok())
        .map(|p| p.ips)
        .unwrap_or_default();
    let show = |v: &[std::net::IpAddr]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "AddressesChanged: the published addresses changed from [{}] to [{}], so the \
         certificate's IP SANs must change",
        show(&old),
        show(ips)
    )
}

/// The Warning Event for a node whose published pin changes, with what users must do.
pub fn pin_changed_event(node: &str, why: &str, old: &str, new: &str) -> PlannedEvent {
    PlannedEvent {
        warning: true,
        reason: "PinChanged".into(),
        note: format!(
            "node {node}: new certificate ({why}); pin changed from {old} to {new}. Clients \
             that pinned the old one cannot connect until they get the new derpMap: Tailscale \
             SaaS: paste the policy snippet again; headscale derp.urls: picked up at its next \
             update_frequency poll; headscale derp.paths: update the file, read at the same poll"
        ),
    }
}

/// Normal Events for nodes whose published DERP or STUN port changed (node annotations):
/// the derpMap changes, the certificate does not (it holds IP SANs only).
fn published_ports_events(prev: &[NodeStatus], now: &[NodeStatus]) -> Vec<PlannedEvent> {
    now.iter()
        .filter_map(|n| {
            let p = prev.iter().find(|p| p.name == n.name)?;
            (p.derp_port != n.derp_port || p.stun_port != n.stun_port).then(|| PlannedEvent {
                warning: false,
                reason: "PublishedPortsChanged".into(),
                note: format!(
                    "node {}: published ports now DERP {} / STUN {} (node annotations); the \
                     certificate is unchanged (it holds only IP addresses)",
                    n.name,
                    n.derp_port.map_or("[region]".to_owned(), |p| p.to_string()),
                    n.stun_port.map_or("[region]".to_owned(), |p| p.to_string()),
                ),
            })
        })
        .collect()
}

/// The write that creates or updates the region's PodDisruptionBudget, or `None` when the
/// existing one (in `have`, by name) already matches.
fn relay_pdb_write(
    region: &DerpRegion,
    have: &BTreeMap<String, PodDisruptionBudget>,
) -> Option<Write> {
    let want = children::relay_pdb(region);
    let unchanged = have.get(&want.name_any()).is_some_and(|h| {
        h.metadata.deletion_timestamp.is_none()
            && h.spec == want.spec
            && meta_matches(&want.metadata, &h.metadata)
    });
    (!unchanged).then(|| Write::ApplyPdb(Box::new(want)))
}

/// Plan one region, in seven steps: certificates, the mesh Secret and peers ConfigMap, relay
/// Pods, the derpMap, pruning, membership Events, the status. Writes and Events keep the
/// order of the steps that plan them.
pub fn plan(inp: &Inputs<'_>) -> Result<Plan, PlanError> {
    let region = inp.region;
    let spec = &region.spec;
    let prev = region.status.clone().unwrap_or_default();
    let lifetime = CertLifetime::from_policy(&spec.certificate)?;
    let Selection { selected, skipped } = select_nodes(spec, inp.nodes, inp.claims);
    let mesh = spec.mesh.enabled.unwrap_or(selected.len() > 1);

    // 1. certificates: reuse or issue, one Secret per node
    let certs = certificates(inp, &prev, &selected, &skipped, lifetime)?;
    // 2. mesh Secret + peers ConfigMap
    let mesh_children = if mesh {
        mesh_children(inp, &certs.nodes)
    } else {
        MeshChildren::default()
    };
    // 3. relay Pods: create missing ones; replace changed ones, ready ones one at a time
    let relays = relay_pods(inp, &certs.nodes, mesh);
    // 4. derpMap
    let nodes_status = node_statuses(inp, &certs.nodes, &relays.replacing);
    let health = probe_health(spec.derp_map.publish_unhealthy, &nodes_status, inp.probes);
    let map = derp_map(region, &certs.nodes, &nodes_status, &health);
    let published = publish_derp_map(inp, &prev, map);
    // 5. prune: owned children that are no longer wanted
    let wanted = Wanted {
        secrets: [certs.wanted_secrets, mesh_children.wanted_secrets].concat(),
        config_maps: [
            mesh_children.wanted_config_maps,
            published.wanted_config_map.into_iter().collect(),
        ]
        .concat(),
        pods: relays.wanted,
    };
    let pruned = prune(region, inp.existing, &wanted);
    // 6. node membership and skip events
    let membership = membership_events(&prev, &selected, &skipped, &nodes_status);
    let region_id_warning = region_id_range_event(region, &prev);
    // 7. status
    let (status, status_events) =
        region_status(inp, &prev, &health, nodes_status, skipped, published.status);

    let requeue_after = requeue_after(
        inp.now,
        certs.next_renewal,
        relays.rollout_pending || pruned.relays_kept,
    );
    Ok(Plan {
        writes: [
            certs.writes,
            mesh_children.writes,
            relays.writes,
            published.writes,
            pruned.writes,
        ]
        .into_iter()
        .flatten()
        .collect(),
        events: [
            certs.events,
            relays.events,
            published.events,
            membership,
            region_id_warning.into_iter().collect(),
            status_events,
        ]
        .into_iter()
        .flatten()
        .collect(),
        status,
        derp_map: inp.region_id_winner.is_none().then_some(published.map),
        requeue_after,
        certs_issued: certs.issued,
        pin_changes: certs.pin_changes,
    })
}

/// How long certificates live and how long before expiry they are replaced
/// (`spec.certificate`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CertLifetime {
    /// `spec.certificate.validity`.
    validity: time::Duration,
    /// `spec.certificate.rotateBefore`.
    rotate_before: time::Duration,
}

impl CertLifetime {
    /// Parse both durations (`rotateBefore` first: its error wins).
    fn from_policy(policy: &CertificatePolicy) -> Result<Self, PlanError> {
        let rotate_before =
            parse_duration(&policy.rotate_before).ok_or_else(|| PlanError::InvalidDuration {
                field: "rotateBefore",
                value: policy.rotate_before.clone(),
            })?;
        let validity =
            parse_duration(&policy.validity).ok_or_else(|| PlanError::InvalidDuration {
                field: "validity",
                value: policy.validity.clone(),
            })?;
        Ok(Self {
            validity,
            rotate_before,
        })
    }
}

/// A selected node with the certificate its relay serves.
#[derive(Debug, Clone)]
struct NodeCert {
    node: SelectedNode,
    pin: String,
    not_after: OffsetDateTime,
}

/// Step 1: the certificate of every selected node and the TLS Secrets that hold them.
#[derive(Debug, Default)]
struct Certificates {
    /// One per selected node, in selection order.
    nodes: Vec<NodeCert>,
    /// Secrets to apply.
    writes: Vec<Write>,
    /// `CertificateIssued` / `PinChanged`.
    events: Vec<PlannedEvent>,
    /// TLS Secrets to keep (also those of nodes left out for a malformed override).
    wanted_secrets: Vec<String>,
    /// Certificates issued.
    issued: usize,
    /// Issued certificates that replace a published pin.
    pin_changes: usize,
    /// When the first certificate is due for renewal.
    next_renewal: Option<OffsetDateTime>,
}

/// Step 1: reuse each selected node's certificate while it is sound, else issue one.
fn certificates(
    inp: &Inputs<'_>,
    prev: &DerpRegionStatus,
    selected: &[SelectedNode],
    skipped: &[SkippedNode],
    lifetime: CertLifetime,
) -> Result<Certificates, PlanError> {
    let region = inp.region;
    let rname = region.name_any();
    let mut out = Certificates::default();
    for node in selected {
        let name = tls_secret_name(&rname, &node.name);
        let have = inp.existing.secrets.get(&name);
        let ips = node.ips();
        let (secret, pin, not_after) =
            match reissue_reason(have, &ips, inp.now, lifetime.rotate_before) {
                None => {
                    let have = have.expect("reuse implies an existing Secret");
                    let data = have.data.as_ref().expect("reuse implies data");
                    let crt = &data["tls.crt"].0;
                    let parsed =
                        parse_cert_pem(crt).expect("reuse implies a parseable certificate");
                    let s = tls_secret(
                        region,
                        &node.name,
                        crt,
                        &data["tls.key"].0,
                        &parsed.pin,
                        &rfc3339(parsed.not_after),
                    );
                    (s, parsed.pin, parsed.not_after)
                }
                Some(why) => {
                    let issued = inp
                        .issuer
                        .issue(&node.hostname(), &ips, inp.now, lifetime.validity)
                        .map_err(|source| PlanError::IssueCertificate {
                            node: node.name.clone(),
                            source,
                        })?;
                    out.issued += 1;
                    let why = reissue_detail(why, have, &ips);
                    let (event, pin_changed) = issued_event(prev, &node.name, &why, &issued.pin);
                    out.pin_changes += usize::from(pin_changed);
                    out.events.push(event);
                    let s = tls_secret(
                        region,
                        &node.name,
                        issued.cert_pem.as_bytes(),
                        issued.key_pem.as_bytes(),
                        &issued.pin,
                        &rfc3339(issued.not_after),
                    );
                    (s, issued.pin.clone(), issued.not_after)
                }
            };
        let renew_at = not_after - lifetime.rotate_before;
        out.next_renewal = Some(out.next_renewal.map_or(renew_at, |t| t.min(renew_at)));
        if !secret_unchanged(&secret, have) {
            out.writes.push(Write::ApplySecret(secret));
        }
        out.wanted_secrets.push(name);
        out.nodes.push(NodeCert {
            node: node.clone(),
            pin,
            not_after,
        });
    }

    // a node left out for a malformed override annotation or a cordon keeps its certificate,
    // so fixing the typo or uncordoning brings it back with the same pin
    for s in skipped
        .iter()
        .filter(|s| nodes::keeps_certificate(&s.reason))
    {
        let name = tls_secret_name(&rname, &s.name);
        if inp.existing.secrets.contains_key(&name) {
            out.wanted_secrets.push(name);
        }
    }
    Ok(out)
}

/// The Event for a certificate issued to `node`: `PinChanged` (and `true`) when it replaces
/// a pin the previous status published, else `CertificateIssued`.
fn issued_event(prev: &DerpRegionStatus, node: &str, why: &str, pin: &str) -> (PlannedEvent, bool) {
    let old_pin = prev
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.cert_name.as_str())
        .filter(|p| !p.is_empty());
    match old_pin {
        Some(old) if old != pin => (pin_changed_event(node, why, old, pin), true),
        _ => (
            PlannedEvent {
                warning: false,
                reason: "CertificateIssued".into(),
                note: format!("node {node}: new certificate ({why}), pin {pin}"),
            },
            false,
        ),
    }
}

/// Step 2: the mesh PSK Secret and the peers ConfigMap of a meshed region.
#[derive(Debug, Default)]
struct MeshChildren {
    /// The Secret and ConfigMap to apply.
    writes: Vec<Write>,
    /// The mesh Secret's name.
    wanted_secrets: Vec<String>,
    /// The peers ConfigMap's name.
    wanted_config_maps: Vec<String>,
}

/// Step 2: keep a well-formed stored PSK (else take a fresh one) and list every relay's
/// `host:port pin` for its peers.
fn mesh_children(inp: &Inputs<'_>, certs: &[NodeCert]) -> MeshChildren {
    let region = inp.region;
    let rname = region.name_any();
    let mut out = MeshChildren::default();
    let name = mesh_secret_name(&rname);
    let have = inp.existing.secrets.get(&name);
    let existing_psk = have
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(children::MESH_PSK_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .filter(|p| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    let psk = existing_psk.unwrap_or_else(|| (inp.new_psk)());
    let secret = mesh_secret(region, &psk);
    if !secret_unchanged(&secret, have) {
        out.writes.push(Write::ApplySecret(secret));
    }
    out.wanted_secrets.push(name);
    let lines: Vec<String> = certs
        .iter()
        .map(|c| format!("{} {}", host_port(&c.node, region.spec.ports.derp), c.pin))
        .collect();
    let cm = mesh_peers_config_map(region, &lines);
    let cm_name = mesh_peers_name(&rname);
    if !config_map_unchanged(&cm, inp.existing.config_maps.get(&cm_name)) {
        out.writes.push(Write::ApplyConfigMap(cm));
    }
    out.wanted_config_maps.push(cm_name);
    out
}

/// Step 3: the relay Pods.
#[derive(Debug, Default)]
struct RelayPods {
    /// The relays' PodDisruptionBudget when it must be applied, Pods to create, then Pods to
    /// delete for replacement.
    writes: Vec<Write>,
    /// `RelayReplaced`.
    events: Vec<PlannedEvent>,
    /// Names of the Pods this region wants, one per certificate.
    wanted: Vec<String>,
    /// Pods this plan deletes for replacement: left out of the map it publishes (which is
    /// written before the delete).
    replacing: Vec<String>,
    /// A Pod is terminating, being replaced or waiting for its turn.
    rollout_pending: bool,
}

/// Step 3: create missing relay Pods; replace those whose spec or certificate changed,
/// unready ones at once and Ready ones one at a time, only while every current one is Ready.
fn relay_pods(inp: &Inputs<'_>, certs: &[NodeCert], mesh: bool) -> RelayPods {
    let defaults = RelayDefaults {
        image: inp.relay_image,
        image_pull_secrets: inp.relay_image_pull_secrets,
    };
    let mut out = RelayPods::default();
    let mut replace_unready = Vec::new();
    let mut replace_ready = Vec::new();
    let mut not_ready_current = 0usize;
    out.writes
        .extend(relay_pdb_write(inp.region, &inp.existing.pdbs));
    for c in certs {
        let pod = relay_pod(inp.region, &c.node, mesh, &c.pin, &defaults);
        let name = pod.name_any();
        out.wanted.push(name.clone());
        match inp.existing.pods.get(&name) {
            None => {
                out.writes.push(Write::CreatePod(Box::new(pod)));
                not_ready_current += 1;
            }
            Some(have) if have.metadata.deletion_timestamp.is_some() => {
                out.rollout_pending = true;
                not_ready_current += 1;
            }
            Some(have) if spec_hash(have) != spec_hash(&pod) => {
                if pod_ready(have) {
                    replace_ready.push(name);
                } else {
                    replace_unready.push(name);
                }
            }
            Some(have) => {
                if !pod_ready(have) {
                    not_ready_current += 1;
                }
            }
        }
    }
    out.replacing.clone_from(&replace_unready);
    for name in replace_unready {
        out.rollout_pending = true;
        out.events.push(PlannedEvent {
            warning: false,
            reason: "RelayReplaced".into(),
            note: format!("relay Pod {name} is replaced because its spec or certificate changed"),
        });
        out.writes.push(Write::DeletePod {
            name,
            reason: "Replace",
        });
    }
    if let Some(name) = replace_ready.first() {
        out.rollout_pending = true;
        if not_ready_current == 0 {
            out.events.push(PlannedEvent {
                warning: false,
                reason: "RelayReplaced".into(),
                note: format!(
                    "relay Pod {name} is replaced because its spec or certificate changed (one node at a time)"
                ),
            });
            out.writes.push(Write::DeletePod {
                name: name.clone(),
                reason: "Replace",
            });
            out.replacing.push(name.clone());
        }
    }
    out
}

/// Step 4: each node's status: its certificate, its relay Pod's phase and readiness, the
/// operator's probe view.
fn node_statuses(inp: &Inputs<'_>, certs: &[NodeCert], replacing: &[String]) -> Vec<NodeStatus> {
    let rname = inp.region.name_any();
    certs
        .iter()
        .map(|c| {
            let pod = inp
                .existing
                .pods
                .get(&children::pod_name(&rname, &c.node.name));
            let probe = inp.probes.get(&c.node.name);
            NodeStatus {
                name: c.node.name.clone(),
                ipv4: c.node.ipv4.map(|i| i.to_string()),
                ipv6: c.node.ipv6.map(|i| i.to_string()),
                derp_port: c.node.derp_port,
                stun_port: c.node.stun_port,
                cert_name: c.pin.clone(),
                not_after: rfc3339(c.not_after),
                pod_phase: Some(
                    pod.and_then(|p| p.status.as_ref())
                        .and_then(|s| s.phase.clone())
                        .unwrap_or_else(|| {
                            if pod.is_some() { "Pending" } else { "Missing" }.to_owned()
                        }),
                ),
                // serving the current certificate is what clients need: a Ready relay with
                // the current pin stays published while an older spec (image, flags) waits
                // for its turn to be replaced, so a rollout never empties the region
                ready: pod.is_some_and(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && pod_ready(p)
                        && p.annotations().get(ANNOTATION_PIN) == Some(&c.pin)
                        && !replacing.contains(&p.name_any())
                }),
                last_probe_time: probe.map(|v| rfc3339(v.time)),
                probe_result: probe.map(|v| v.result.clone()),
                probe_latency_ms: probe.and_then(|v| v.latency_ms),
            }
        })
        .collect()
}

/// Step 4: which Ready nodes the probes keep out of the derpMap. Never an empty region
/// because of probes: when every Ready node is withheld, all are kept (clients then at least
/// try) and `kept_all` says so. Nothing is withheld when `publish_unhealthy`.
fn probe_health(
    publish_unhealthy: bool,
    nodes: &[NodeStatus],
    probes: &BTreeMap<String, ProbeView>,
) -> ProbeHealth {
    let withheld = |st: &NodeStatus| probes.get(&st.name).is_some_and(|v| v.withheld);
    let all_withheld = nodes.iter().filter(|st| st.ready).all(withheld);
    let withheld_nodes: Vec<String> = nodes
        .iter()
        .filter(|st| !publish_unhealthy && st.ready && withheld(st))
        .map(|st| st.name.clone())
        .collect();
    ProbeHealth {
        kept_all: all_withheld && !withheld_nodes.is_empty(),
        withheld: if all_withheld {
            Vec::new()
        } else {
            withheld_nodes
        },
    }
}

/// Step 4: the region's derpMap: every Ready node the probes do not withhold (every node
/// when `derpMap.publishUnhealthy`), with its published addresses, ports and pin.
fn derp_map(
    region: &DerpRegion,
    certs: &[NodeCert],
    nodes: &[NodeStatus],
    health: &ProbeHealth,
) -> DerpMap {
    let spec = &region.spec;
    let rname = region.name_any();
    let region_id = i64::from(spec.region_id);
    let publish = |st: &NodeStatus| {
        spec.derp_map.publish_unhealthy || (st.ready && !health.withheld.contains(&st.name))
    };
    let map_nodes: Vec<DerpNode> = certs
        .iter()
        .zip(nodes)
        .filter(|(_, st)| publish(st))
        .map(|(c, _)| DerpNode {
            name: c.node.name.clone(),
            region_id,
            host_name: c.node.hostname(),
            cert_name: c.pin.clone(),
            ipv4: c
                .node
                .ipv4
                .map_or_else(|| "none".to_owned(), |i| i.to_string()),
            ipv6: c
                .node
                .ipv6
                .map_or_else(|| "none".to_owned(), |i| i.to_string()),
            stun_port: c.node.stun_port.unwrap_or(spec.ports.stun),
            stun_only: spec.stun_only,
            derp_port: c.node.derp_port.unwrap_or(spec.ports.derp),
            can_port80: spec.ports.http == 80,
            ..DerpNode::default()
        })
        .collect();
    DerpMap {
        regions: BTreeMap::from([(
            region_id,
            MapRegion {
                region_id,
                region_code: spec.effective_code(&rname),
                region_name: spec.effective_name(&rname),
                avoid: spec.avoid,
                no_measure_no_home: spec.no_measure_no_home,
                nodes: map_nodes,
            },
        )]),
        omit_default_regions: spec.derp_map.omit_default_regions,
    }
}

/// Step 4: the derpMap ConfigMap.
#[derive(Debug)]
struct PublishedMap {
    /// The map.
    map: DerpMap,
    /// Its ConfigMap's name and content hash.
    status: DerpMapStatus,
    /// The ConfigMap to apply.
    writes: Vec<Write>,
    /// `DerpMapPublished`.
    events: Vec<PlannedEvent>,
    /// The ConfigMap's name, unless another region holds this region's ID.
    wanted_config_map: Option<String>,
}

/// Step 4: render `map` (JSON, policy snippet, headscale YAML) into its ConfigMap. A region
/// whose ID another region holds publishes nothing: its ConfigMap is pruned, so nobody pastes
/// a snippet that would overwrite the other region.
fn publish_derp_map(inp: &Inputs<'_>, prev: &DerpRegionStatus, map: DerpMap) -> PublishedMap {
    let region = inp.region;
    let rname = region.name_any();
    let ns = region.namespace().unwrap_or_default();
    let region_id = i64::from(region.spec.region_id);
    let json = derpmap::render_json(&map);
    let hash = derpmap::content_hash(&json);
    let cm = derpmap_config_map(
        region,
        &json,
        &derpmap::render_policy(&map, &format!("{ns}/{rname}")),
        &derpmap::render_headscale(&map),
    );
    let dm_name = derpmap_name(region);
    let mut writes = Vec::new();
    let mut events = Vec::new();
    let ours = inp.region_id_winner.is_none();
    if ours && !config_map_unchanged(&cm, inp.existing.config_maps.get(&dm_name)) {
        writes.push(Write::ApplyConfigMap(cm));
        if prev
            .derp_map
            .as_ref()
            .is_none_or(|d| d.content_hash != hash)
        {
            events.push(PlannedEvent {
                warning: false,
                reason: "DerpMapPublished".into(),
                note: format!(
                    "ConfigMap {dm_name} now lists {} node(s) ({hash})",
                    map.regions[&region_id].nodes.len()
                ),
            });
        }
    }
    PublishedMap {
        map,
        writes,
        events,
        wanted_config_map: ours.then(|| dm_name.clone()),
        status: DerpMapStatus {
            config_map_name: dm_name,
            content_hash: hash,
        },
    }
}

/// Names of the children a plan keeps; every other owned child is pruned.
#[derive(Debug, Default)]
struct Wanted {
    secrets: Vec<String>,
    config_maps: Vec<String>,
    pods: Vec<String>,
}

/// Step 5: deletions.
#[derive(Debug, Default)]
struct Pruned {
    /// Pods, Secrets and ConfigMaps to delete.
    writes: Vec<Write>,
    /// An unwanted relay stays until the published map no longer lists its node.
    relays_kept: bool,
}

/// Step 5: delete owned children that are no longer wanted (objects already being deleted
/// and objects of others are left alone). A relay whose node the published map still lists
/// stays until the map without it is stored (this plan writes it; the next one stops the
/// relay): clients leave a node before its relay goes (cordon, drain, removal).
fn prune(region: &DerpRegion, existing: &Existing, wanted: &Wanted) -> Pruned {
    let mut out = Pruned::default();
    let still_published = published_nodes(existing.config_maps.get(&derpmap_name(region)));
    for (name, pod) in &existing.pods {
        if !wanted.pods.contains(name)
            && owned_by(pod, region)
            && pod.metadata.deletion_timestamp.is_none()
        {
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            if node.is_some_and(|n| still_published.iter().any(|p| p == n)) {
                out.relays_kept = true;
                continue;
            }
            out.writes.push(Write::DeletePod {
                name: name.clone(),
                reason: "Prune",
            });
        }
    }
    for (name, s) in &existing.secrets {
        if !wanted.secrets.contains(name)
            && owned_by(s, region)
            && s.metadata.deletion_timestamp.is_none()
        {
            out.writes.push(Write::DeleteSecret(name.clone()));
        }
    }
    for (name, c) in &existing.config_maps {
        if !wanted.config_maps.contains(name)
            && owned_by(c, region)
            && c.metadata.deletion_timestamp.is_none()
        {
            out.writes.push(Write::DeleteConfigMap(name.clone()));
        }
    }
    out
}

/// Step 6: Events for nodes that joined or left the region since `prev`, whose published
/// ports changed, or that are newly skipped (except for `MaxNodes`).
fn membership_events(
    prev: &DerpRegionStatus,
    selected: &[SelectedNode],
    skipped: &[SkippedNode],
    nodes: &[NodeStatus],
) -> Vec<PlannedEvent> {
    let mut events = Vec::new();
    for n in selected {
        if !prev.nodes.iter().any(|p| p.name == n.name) {
            events.push(PlannedEvent {
                warning: false,
                reason: "NodeAdded".into(),
                note: format!("node {} joined the region as {}", n.name, n.hostname()),
            });
        }
    }
    for p in &prev.nodes {
        if !selected.iter().any(|n| n.name == p.name) {
            events.push(PlannedEvent {
                warning: false,
                reason: "NodeRemoved".into(),
                note: format!("node {} left the region", p.name),
            });
        }
    }
    events.extend(published_ports_events(&prev.nodes, nodes));
    for s in skipped {
        if !prev.skipped_nodes.contains(s) && s.reason != "MaxNodes" {
            events.push(PlannedEvent {
                warning: true,
                reason: s.reason.clone(),
                note: format!("node {} is not used: {}", s.name, s.message),
            });
        }
    }
    events
}

/// Step 6: a region ID outside Tailscale's custom range is worth a warning (design.md §3),
/// once per generation.
fn region_id_range_event(region: &DerpRegion, prev: &DerpRegionStatus) -> Option<PlannedEvent> {
    let id = region.spec.region_id;
    (!(900..=999).contains(&id) && prev.observed_generation != region.metadata.generation).then(
        || PlannedEvent {
            warning: true,
            reason: "RegionIDOutsideCustomRange".into(),
            note: format!(
                "spec.regionID {id} is outside 900-999, the range Tailscale reserves for custom \
                 regions; it may collide with a Tailscale region"
            ),
        },
    )
}

/// Step 7: the status to publish (conditions, nodes, derpMap), with the relay-failure and
/// region-ID conditions and the Events their changes make.
fn region_status(
    inp: &Inputs<'_>,
    prev: &DerpRegionStatus,
    health: &ProbeHealth,
    nodes: Vec<NodeStatus>,
    skipped: Vec<SkippedNode>,
    derp_map: DerpMapStatus,
) -> (DerpRegionStatus, Vec<PlannedEvent>) {
    let region = inp.region;
    let relay_failures =
        pod_failures::relay_failures(&inp.existing.pods, &region.name_any(), &nodes);
    let mut status = build_status(region, prev, inp.now, health, nodes, skipped, derp_map);
    let mut events = Vec::new();
    pod_failures::apply(&mut status, prev, inp.now, &relay_failures, &mut events);
    region_id::apply(
        &mut status,
        prev,
        inp.now,
        region.spec.region_id,
        inp.region_id_winner,
        &mut events,
    );
    (status, events)
}

/// When to look again: at the first certificate renewal, soon while a rollout is in
/// progress, and at least every [`MAX_REQUEUE`].
fn requeue_after(
    now: OffsetDateTime,
    next_renewal: Option<OffsetDateTime>,
    rollout_pending: bool,
) -> Duration {
    let mut after = MAX_REQUEUE;
    if let Some(t) = next_renewal {
        let secs = (t - now).whole_seconds().max(1);
        after = after.min(Duration::from_secs(secs.unsigned_abs()));
    }
    if rollout_pending {
        after = after.min(ROLLOUT_REQUEUE);
    }
    after
}

/// What the derpMap filtering did because of probes (for the `NodesHealthy` message).
struct ProbeHealth {
    /// Nodes left out of the map.
    withheld: Vec<String>,
    /// Every Ready node was to be withheld, so all were kept.
    kept_all: bool,
}

/// The `NodesHealthy` condition: nodes the operator cannot use (skipped, with their reason)
/// come first, then nodes failing the operator's probes.
fn nodes_healthy(
    nodes: &[NodeStatus],
    problems: &[&SkippedNode],
    health: &ProbeHealth,
    no_nodes_msg: &str,
) -> Condition {
    let desired = nodes.len();
    let failing: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.probe_result.as_deref().is_some_and(|r| r != "ok"))
        .collect();
    let mut parts: Vec<String> = problems
        .iter()
        .map(|s| format!("node {}: {}", s.name, s.message))
        .collect();
    for n in &failing {
        let mut part = format!(
            "node {} fails probes: {}",
            n.name,
            n.probe_result.as_deref().unwrap_or_default()
        );
        if health.withheld.contains(&n.name) {
            part.push_str(" (left out of the derpMap: derpMap.publishUnhealthy is false)");
        }
        parts.push(part);
    }
    if health.kept_all {
        parts.push(
            "every Ready node fails probes, so all stay in the derpMap (an empty region helps \
             no client); check the relays' logs and that the operator can reach the node IPs"
                .to_owned(),
        );
    }
    if let Some(first) = problems.first() {
        return condition("NodesHealthy", false, &first.reason, parts.join("; "));
    }
    if desired == 0 {
        return condition(
            "NodesHealthy",
            false,
            "NoMatchingNodes",
            no_nodes_msg.to_owned(),
        );
    }
    if !failing.is_empty() {
        return condition("NodesHealthy", false, "ProbesFailing", parts.join("; "));
    }
    let probed = nodes.iter().filter(|n| n.probe_result.is_some()).count();
    if probed == desired {
        condition(
            "NodesHealthy",
            true,
            "ProbesPassing",
            format!(
                "{desired} node(s) pass the operator's probes (TCP, TLS with the pin, DERP, \
                 packet round trip, STUN, mesh)"
            ),
        )
    } else {
        condition(
            "NodesHealthy",
            true,
            "AllNodesUsable",
            format!("{desired} node(s) selected, all usable"),
        )
    }
}

fn build_status(
    region: &DerpRegion,
    prev: &DerpRegionStatus,
    now: OffsetDateTime,
    health: &ProbeHealth,
    nodes: Vec<NodeStatus>,
    skipped: Vec<SkippedNode>,
    derp_map: DerpMapStatus,
) -> DerpRegionStatus {
    let generation = region.metadata.generation;
    let desired = nodes.len();
    let ready = nodes.iter().filter(|n| n.ready).count();
    let problems: Vec<&SkippedNode> = skipped.iter().filter(|s| s.reason != "MaxNodes").collect();
    let no_nodes_msg = no_nodes_message(&skipped);
    let mut conds = vec![
        region_ready(&nodes, &no_nodes_msg),
        certificates_ready(&nodes, &no_nodes_msg),
        relays_ready(&nodes, &no_nodes_msg),
        condition(
            "DerpMapPublished",
            true,
            "Published",
            format!(
                "ConfigMap {} holds the derpMap ({})",
                derp_map.config_map_name, derp_map.content_hash
            ),
        ),
        nodes_healthy(&nodes, &problems, health, &no_nodes_msg),
    ];
    for c in &mut conds {
        c.observed_generation = generation;
        carry_transition_time(c, prev, now);
    }
    DerpRegionStatus {
        observed_generation: generation,
        region_code: Some(region.spec.effective_code(&region.name_any())),
        region_id: Some(region.spec.region_id),
        nodes_ready: Some(format!("{ready}/{desired}")),
        conditions: conds,
        nodes,
        skipped_nodes: skipped,
        derp_map: Some(derp_map),
    }
}

/// Why a region has no node: no Node matches the selector, or every match is skipped (each
/// named with its reason).
fn no_nodes_message(skipped: &[SkippedNode]) -> String {
    if skipped.is_empty() {
        "no Node matches spec.nodeSelector; label nodes or change the selector".to_owned()
    } else {
        format!(
            "no usable Node: {}",
            skipped
                .iter()
                .map(|s| format!("{} ({})", s.name, s.reason))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The `Ready` condition: every relay Ready (the derpMap is published by then).
fn region_ready(nodes: &[NodeStatus], no_nodes_msg: &str) -> Condition {
    let desired = nodes.len();
    let ready = nodes.iter().filter(|n| n.ready).count();
    if desired == 0 {
        condition("Ready", false, "NoNodes", no_nodes_msg.to_owned())
    } else if ready < desired {
        condition(
            "Ready",
            false,
            "RelaysNotReady",
            format!("{ready}/{desired} relays Ready"),
        )
    } else {
        condition(
            "Ready",
            true,
            "RegionReady",
            format!("{ready}/{desired} relays Ready and the derpMap is published"),
        )
    }
}

/// The `CertificatesReady` condition, naming the earliest expiry.
fn certificates_ready(nodes: &[NodeStatus], no_nodes_msg: &str) -> Condition {
    let desired = nodes.len();
    if desired == 0 {
        return condition(
            "CertificatesReady",
            false,
            "NoNodes",
            no_nodes_msg.to_owned(),
        );
    }
    let earliest = nodes
        .iter()
        .map(|n| n.not_after.as_str())
        .min()
        .unwrap_or("");
    condition(
        "CertificatesReady",
        true,
        "Issued",
        format!("{desired} certificate(s) stored; earliest notAfter {earliest}"),
    )
}

/// The `RelaysReady` condition, naming the relays it waits for.
fn relays_ready(nodes: &[NodeStatus], no_nodes_msg: &str) -> Condition {
    let desired = nodes.len();
    let ready = nodes.iter().filter(|n| n.ready).count();
    if desired == 0 {
        condition("RelaysReady", false, "NoNodes", no_nodes_msg.to_owned())
    } else if ready == desired {
        condition(
            "RelaysReady",
            true,
            "AllReady",
            format!("{ready}/{desired} relay Pods are Ready"),
        )
    } else {
        let waiting: Vec<&str> = nodes
            .iter()
            .filter(|n| !n.ready)
            .map(|n| n.name.as_str())
            .collect();
        condition(
            "RelaysReady",
            false,
            "RelaysNotReady",
            format!(
                "{ready}/{desired} relay Pods are Ready; waiting for {}",
                waiting.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests;
