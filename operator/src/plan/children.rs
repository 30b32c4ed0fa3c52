//! PURE builders for the objects a region owns: the per-node TLS Secret, the relay Pod, the
//! mesh Secret and peers ConfigMap, and the derpMap ConfigMap — names, labels, owner
//! references, probes, security context. The Pod-per-node choice (design.md §4) lives here
//! only.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{
        Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
        EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference,
        ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, Probe, SeccompProfile, Secret,
        SecretKeySelector, SecretVolumeSource, SecurityContext, TCPSocketAction, Volume,
        VolumeMount,
    },
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{Resource, ResourceExt, api::ObjectMeta};
use sha2::{Digest, Sha256};

use super::nodes::SelectedNode;
use crate::{
    certs::cert_file_stem,
    crd::{
        ANNOTATION_NOT_AFTER, ANNOTATION_PIN, ANNOTATION_SPEC_HASH, APP_NAME, DerpRegion,
        DerpRegionSpec, FIELD_MANAGER, LABEL_NODE, LABEL_REGION, Ports, TailscaledVerification,
        VerificationMode,
    },
};

/// Longest DNS label / label value (RFC 1123).
pub const MAX_NAME: usize = 63;
/// Mount point of the node's certificate (upstream `--certdir`).
pub const CERT_DIR: &str = "/certs";
/// Mount point of the mesh PSK Secret.
pub const MESH_PSK_DIR: &str = "/etc/derp/mesh-psk";
/// Key of the PSK in the mesh Secret.
pub const MESH_PSK_KEY: &str = "psk";
/// Mount point of the mesh peers ConfigMap.
pub const MESH_PEERS_DIR: &str = "/etc/derp/mesh";
/// Key of the peer list in the mesh peers ConfigMap.
pub const MESH_PEERS_KEY: &str = "peers";
/// Writable state directory (server key, `-c`); the root filesystem is read-only.
pub const STATE_DIR: &str = "/var/lib/derper";
/// tailscaled LocalAPI socket directory shared with the sidecar.
pub const TAILSCALED_DIR: &str = "/var/run/tailscale";
/// Default tailscaled image for client verification.
pub const DEFAULT_TAILSCALED_IMAGE: &str = "ghcr.io/tailscale/tailscale:stable";
/// Non-root UID/GID for the relay (distroless `nonroot`).
pub const RELAY_UID: i64 = 65532;

/// `name` if it fits in `max`, else a prefix plus `-` and 8 hex of its SHA-256.
pub fn fit_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let hash = hex::encode(Sha256::digest(name.as_bytes()));
    let mut prefix: String = name.chars().take(max - 9).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{}", &hash[..8])
}

/// Name of a node's TLS Secret: `<region>-<node>-tls`.
pub fn tls_secret_name(region: &str, node: &str) -> String {
    fit_name(&format!("{region}-{node}-tls"), MAX_NAME)
}
/// Name of a node's relay Pod: `<region>-<node>`.
pub fn pod_name(region: &str, node: &str) -> String {
    fit_name(&format!("{region}-{node}"), MAX_NAME)
}
/// Name of the mesh PSK Secret: `<region>-mesh`.
pub fn mesh_secret_name(region: &str) -> String {
    fit_name(&format!("{region}-mesh"), MAX_NAME)
}
/// Name of the mesh peers ConfigMap: `<region>-mesh-peers`.
pub fn mesh_peers_name(region: &str) -> String {
    fit_name(&format!("{region}-mesh-peers"), MAX_NAME)
}
/// Name of the derpMap ConfigMap: `spec.derpMap.configMapName` or `<region>-derpmap`.
pub fn derpmap_name(region: &DerpRegion) -> String {
    region
        .spec
        .derp_map
        .config_map_name
        .clone()
        .unwrap_or_else(|| fit_name(&format!("{}-derpmap", region.name_any()), MAX_NAME))
}

/// Label selector for everything a region owns.
pub fn region_selector(region: &str) -> String {
    format!("{LABEL_REGION}={}", fit_name(region, MAX_NAME))
}

fn labels(region: &DerpRegion, component: &str, node: Option<&str>) -> BTreeMap<String, String> {
    let rname = fit_name(&region.name_any(), MAX_NAME);
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), APP_NAME.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), rname.clone()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
        (LABEL_REGION.to_owned(), rname),
    ]);
    if let Some(n) = node {
        l.insert(LABEL_NODE.to_owned(), fit_name(n, MAX_NAME));
    }
    l
}

fn meta(
    region: &DerpRegion,
    name: String,
    component: &str,
    node: Option<&str>,
    annotations: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: region.namespace(),
        labels: Some(labels(region, component, node)),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: region.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Per-node TLS Secret (`kubernetes.io/tls`) with the pin and notAfter annotations.
pub fn tls_secret(
    region: &DerpRegion,
    node: &str,
    cert_pem: &[u8],
    key_pem: &[u8],
    pin: &str,
    not_after: &str,
) -> Secret {
    Secret {
        metadata: meta(
            region,
            tls_secret_name(&region.name_any(), node),
            "tls",
            Some(node),
            BTreeMap::from([
                (ANNOTATION_PIN.to_owned(), pin.to_owned()),
                (ANNOTATION_NOT_AFTER.to_owned(), not_after.to_owned()),
            ]),
        ),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert_pem.to_vec())),
            ("tls.key".to_owned(), ByteString(key_pem.to_vec())),
        ])),
        ..Default::default()
    }
}

/// Mesh PSK Secret.
pub fn mesh_secret(region: &DerpRegion, psk: &str) -> Secret {
    Secret {
        metadata: meta(
            region,
            mesh_secret_name(&region.name_any()),
            "mesh",
            None,
            BTreeMap::new(),
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            MESH_PSK_KEY.to_owned(),
            ByteString(psk.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// `host:port` of a relay as a mesh peer (IPv6 in brackets): the node's own address when it
/// has one (the relays mesh inside the cluster, not through a NAT's public address), else the
/// published one; `port` is the port the relay binds.
pub fn host_port(node: &SelectedNode, port: i32) -> String {
    let ip = node.node_ip.or(node
        .ipv4
        .map(std::net::IpAddr::V4)
        .or(node.ipv6.map(std::net::IpAddr::V6)));
    match ip {
        Some(std::net::IpAddr::V4(v4)) => format!("{v4}:{port}"),
        Some(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        None => String::new(),
    }
}

/// Mesh peers ConfigMap: one `host:port sha256-raw:<hex>` line per node.
pub fn mesh_peers_config_map(region: &DerpRegion, lines: &[String]) -> ConfigMap {
    let mut body = lines.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    ConfigMap {
        metadata: meta(
            region,
            mesh_peers_name(&region.name_any()),
            "mesh",
            None,
            BTreeMap::new(),
        ),
        data: Some(BTreeMap::from([(MESH_PEERS_KEY.to_owned(), body)])),
        ..Default::default()
    }
}

/// The derpMap ConfigMap with `derpmap.json`, `policy.hujson`, `headscale.yaml`.
pub fn derpmap_config_map(region: &DerpRegion, json: &str, policy: &str, hs: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(
            region,
            derpmap_name(region),
            "derpmap",
            None,
            BTreeMap::new(),
        ),
        data: Some(BTreeMap::from([
            ("derpmap.json".to_owned(), json.to_owned()),
            ("policy.hujson".to_owned(), policy.to_owned()),
            ("headscale.yaml".to_owned(), hs.to_owned()),
        ])),
        ..Default::default()
    }
}

/// Name of the region's PodDisruptionBudget: `<region>-relays`.
pub fn relay_pdb_name(region: &str) -> String {
    fit_name(&format!("{region}-relays"), MAX_NAME)
}

/// `minAvailable` of the relay PodDisruptionBudget: more relays than a region can have, so no
/// eviction of a Ready relay is ever allowed. An integer, because the disruption controller
/// computes `maxUnavailable` and percentages from the owner's scale subresource, which a
/// DerpRegion does not have.
pub const RELAY_PDB_MIN_AVAILABLE: i32 = i32::MAX;

/// The region's PodDisruptionBudget over its relay Pods: the Eviction API (`kubectl drain`,
/// cluster-autoscaler) refuses to evict a Ready relay, so a drained node's relay is stopped by
/// the operator once the published map no longer lists the node (cordon → withdraw → delete).
/// A relay that is not Ready is not published and may be evicted (`AlwaysAllow`).
pub fn relay_pdb(region: &DerpRegion) -> PodDisruptionBudget {
    let rname = region.name_any();
    PodDisruptionBudget {
        metadata: meta(
            region,
            relay_pdb_name(&rname),
            "relay",
            None,
            BTreeMap::new(),
        ),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(RELAY_PDB_MIN_AVAILABLE)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (LABEL_REGION.to_owned(), fit_name(&rname, MAX_NAME)),
                    ("app.kubernetes.io/component".to_owned(), "relay".to_owned()),
                ])),
                ..Default::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn port(name: &str, p: i32, proto: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: p,
        host_port: Some(p),
        protocol: Some(proto.into()),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// Whether the relay binds a port below 1024 (a "privileged" port): DERP, HTTP, STUN or
/// admin, counting only enabled ones.
pub fn binds_privileged_port(ports: &Ports) -> bool {
    [ports.derp, ports.http, ports.stun, ports.admin]
        .into_iter()
        .any(|p| p > 0 && p < 1024)
}

/// The relay container's security context.
///
/// Kubernetes gives a non-root process no *ambient* capabilities, and
/// `allowPrivilegeEscalation: false` (no_new_privs) also rules out file capabilities, so a
/// relay running as UID 65532 with `capabilities.add: [NET_BIND_SERVICE]` still cannot bind
/// 443/80/3478 on a real kubelet/containerd. So when any port is below 1024 the relay runs as
/// UID 0 with every capability dropped except `NET_BIND_SERVICE` (no `DAC_OVERRIDE`, no
/// `SETUID`, …), no privilege escalation, a read-only root filesystem and the Pod's
/// RuntimeDefault seccomp profile; with only unprivileged ports it runs as UID 65532 with no
/// capabilities at all.
pub fn relay_security_context(ports: &Ports) -> SecurityContext {
    let privileged_port = binds_privileged_port(ports);
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(!privileged_port),
        run_as_user: Some(if privileged_port { 0 } else { RELAY_UID }),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: privileged_port.then(|| vec!["NET_BIND_SERVICE".into()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Operator-wide relay Pod settings a region can override (`--relay-image`,
/// `--relay-image-pull-secrets`).
#[derive(Debug, Clone, Copy)]
pub struct RelayDefaults<'a> {
    /// Image for regions without `spec.relay.image`.
    pub image: &'a str,
    /// Pull secrets for regions without `spec.relay.imagePullSecrets`.
    pub image_pull_secrets: &'a [String],
}

impl RelayDefaults<'static> {
    /// The built-in defaults: the repository's relay image and no pull secrets.
    pub const BUILTIN: RelayDefaults<'static> = RelayDefaults {
        image: crate::crd::DEFAULT_RELAY_IMAGE,
        image_pull_secrets: &[],
    };
}

/// The relay Pod for one node, with its spec hash in [`ANNOTATION_SPEC_HASH`]. `pin` is part
/// of the hash so that a new certificate restarts the relay (upstream derper reads its
/// certificate only at start).
pub fn relay_pod(
    region: &DerpRegion,
    node: &SelectedNode,
    mesh: bool,
    pin: &str,
    defaults: &RelayDefaults<'_>,
) -> Pod {
    let spec = &region.spec;
    let rname = region.name_any();
    let hostname = node.hostname();

    let (mut mounts, mut volumes) = relay_storage(&rname, &node.name, &hostname, mesh);
    mounts.extend(spec.relay.extra_volume_mounts.iter().cloned());
    volumes.extend(spec.relay.extra_volumes.iter().cloned());
    let sidecar = match (
        &spec.client_verification.mode,
        &spec.client_verification.tailscaled,
    ) {
        (VerificationMode::Tailscaled, Some(ts)) => {
            let (sidecar, socket_dir, volume) = tailscaled_sidecar(ts);
            mounts.push(socket_dir);
            volumes.push(volume);
            Some(sidecar)
        }
        _ => None,
    };
    let relay = Container {
        name: "derper".into(),
        image: Some(
            spec.relay
                .image
                .clone()
                .unwrap_or_else(|| defaults.image.to_owned()),
        ),
        // a relay that exits (e.g. a port already taken on the node) leaves the end of its
        // log in the container status, where the operator reads it (`PortInUse`)
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        image_pull_policy: spec.relay.image_pull_policy.clone(),
        args: Some(relay_args(spec, &hostname, mesh)),
        env: Some(relay_env(
            &spec.ports,
            mesh,
            spec.relay.log_level.as_deref(),
        )),
        ports: Some(relay_container_ports(&spec.ports)),
        readiness_probe: Some(relay_readiness_probe(&spec.ports)),
        resources: spec.relay.resources.clone(),
        security_context: Some(relay_security_context(&spec.ports)),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let pod_spec = PodSpec {
        containers: std::iter::once(relay).chain(sidecar).collect(),
        volumes: Some(volumes),
        ..relay_pod_scheduling(spec, &node.name, defaults)
    };
    relay_pod_object(region, &node.name, pin, pod_spec)
}

/// The relay's command line, upstream-compatible (design.md §4, derp-protocol.md §3.2):
/// listeners (`-a`, `--http-port`, STUN), the manually managed certificate for `hostname`,
/// the server key, the mesh PSK, client verification, then the region's extra arguments.
pub fn relay_args(spec: &DerpRegionSpec, hostname: &str, mesh: bool) -> Vec<String> {
    let ports = &spec.ports;
    let mut args = vec![
        format!("--hostname={hostname}"),
        "--certmode=manual".to_owned(),
        format!("--certdir={CERT_DIR}"),
        "-a".to_owned(),
        format!(":{}", ports.derp),
        format!(
            "--http-port={}",
            if ports.http == 0 { -1 } else { ports.http }
        ),
        format!("-c={STATE_DIR}/derper.key"),
    ];
    if ports.stun > 0 {
        args.push(format!("--stun-port={}", ports.stun));
    } else {
        args.push("--stun=false".to_owned());
    }
    if mesh {
        args.push(format!("--mesh-psk-file={MESH_PSK_DIR}/{MESH_PSK_KEY}"));
    }
    match spec.client_verification.mode {
        VerificationMode::None => {}
        VerificationMode::Url => {
            if let Some(url) = &spec.client_verification.verify_client_url {
                args.push(format!("--verify-client-url={url}"));
            }
            args.push(format!(
                "--verify-client-url-fail-open={}",
                spec.client_verification.fail_open
            ));
        }
        VerificationMode::Tailscaled => {
            args.push("--verify-clients".to_owned());
            args.push(format!("--socket={TAILSCALED_DIR}/tailscaled.sock"));
        }
    }
    args.extend(spec.relay.extra_args.iter().cloned());
    args
}

/// The relay's environment: extensions only our derper reads (upstream ignores them).
fn relay_env(ports: &Ports, mesh: bool, log_level: Option<&str>) -> Vec<EnvVar> {
    let mut envs = vec![EnvVar {
        name: "HOST_IP".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "status.hostIP".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    // an empty value turns our relay's admin listener off; without the variable it would
    // bind its built-in default (127.0.0.1:9090) on the host's network
    envs.push(env(
        "DERPER_ADMIN_ADDR",
        &if ports.admin > 0 {
            format!("$(HOST_IP):{}", ports.admin)
        } else {
            String::new()
        },
    ));
    if mesh {
        envs.push(env(
            "DERPER_MESH_PEERS_FILE",
            &format!("{MESH_PEERS_DIR}/{MESH_PEERS_KEY}"),
        ));
    }
    if let Some(level) = log_level {
        envs.push(env("RUST_LOG", level));
    }
    envs
}

/// The relay container's ports: DERP, and HTTP, STUN and admin when enabled.
fn relay_container_ports(ports: &Ports) -> Vec<ContainerPort> {
    let mut container_ports = vec![port("derp", ports.derp, "TCP")];
    if ports.http > 0 {
        container_ports.push(port("http", ports.http, "TCP"));
    }
    if ports.stun > 0 {
        container_ports.push(port("stun", ports.stun, "UDP"));
    }
    if ports.admin > 0 {
        container_ports.push(port("admin", ports.admin, "TCP"));
    }
    container_ports
}

/// Readiness: `/generate_204` on the plain-HTTP port, else a TCP connect to the DERP port.
fn relay_readiness_probe(ports: &Ports) -> Probe {
    // `/generate_204` answers on the plain-HTTP port itself; any other path there is a 302 to
    // https://<Host header><path>, which a real kubelet follows (same host) to the HTTP port
    // with TLS and times out (seen on real nodes: scripts/real-nodes)
    if ports.http > 0 {
        Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/generate_204".into()),
                port: IntOrString::Int(ports.http),
                scheme: Some("HTTP".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }
    } else {
        Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(ports.derp),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }
    }
}

/// The relay's own mounts and volumes: the node's certificate (file names from `hostname`,
/// as upstream derper looks them up), the writable state directory, and the mesh PSK and
/// peers when meshed.
fn relay_storage(
    rname: &str,
    node: &str,
    hostname: &str,
    mesh: bool,
) -> (Vec<VolumeMount>, Vec<Volume>) {
    let stem = cert_file_stem(hostname);
    let mut mounts = vec![
        mount("certs", CERT_DIR),
        VolumeMount {
            name: "state".into(),
            mount_path: STATE_DIR.into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "certs".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls_secret_name(rname, node)),
                items: Some(vec![
                    KeyToPath {
                        key: "tls.crt".into(),
                        path: format!("{stem}.crt"),
                        ..Default::default()
                    },
                    KeyToPath {
                        key: "tls.key".into(),
                        path: format!("{stem}.key"),
                        ..Default::default()
                    },
                ]),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "state".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    if mesh {
        mounts.push(mount("mesh-psk", MESH_PSK_DIR));
        mounts.push(mount("mesh-peers", MESH_PEERS_DIR));
        volumes.push(Volume {
            name: "mesh-psk".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(mesh_secret_name(rname)),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "mesh-peers".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: mesh_peers_name(rname),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (mounts, volumes)
}

/// The `tailscaled` sidecar for client verification, the mount of its LocalAPI socket
/// directory for the relay, and the volume they share.
fn tailscaled_sidecar(ts: &TailscaledVerification) -> (Container, VolumeMount, Volume) {
    let socket_dir = || VolumeMount {
        name: "tailscaled".into(),
        mount_path: TAILSCALED_DIR.into(),
        ..Default::default()
    };
    let mut ts_env = vec![
        EnvVar {
            name: "TS_AUTHKEY".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: ts.auth_key_secret_ref.name.clone(),
                    key: ts.auth_key_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("TS_SOCKET", &format!("{TAILSCALED_DIR}/tailscaled.sock")),
        env("TS_USERSPACE", "true"),
        env("TS_STATE_DIR", &format!("{TAILSCALED_DIR}/state")),
    ];
    if let Some(login) = &ts.login_server {
        ts_env.push(env("TS_EXTRA_ARGS", &format!("--login-server={login}")));
    }
    let sidecar = Container {
        name: "tailscaled".into(),
        image: Some(
            ts.image
                .clone()
                .unwrap_or_else(|| DEFAULT_TAILSCALED_IMAGE.to_owned()),
        ),
        env: Some(ts_env),
        volume_mounts: Some(vec![socket_dir()]),
        ..Default::default()
    };
    let volume = Volume {
        name: "tailscaled".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    (sidecar, socket_dir(), volume)
}

/// Where and how the relay Pod runs, without its containers and volumes: on `node` in the
/// host network, with the region's tolerations, priority and pull secrets (the operator's
/// when the region sets none), non-root with the runtime's seccomp profile.
fn relay_pod_scheduling(
    spec: &DerpRegionSpec,
    node: &str,
    defaults: &RelayDefaults<'_>,
) -> PodSpec {
    PodSpec {
        node_name: Some(node.to_owned()),
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        restart_policy: Some("Always".into()),
        enable_service_links: Some(false),
        automount_service_account_token: Some(false),
        tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
        priority_class_name: spec.relay.priority_class_name.clone(),
        image_pull_secrets: if spec.relay.image_pull_secrets.is_empty() {
            (!defaults.image_pull_secrets.is_empty()).then(|| {
                defaults
                    .image_pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: n.clone() })
                    .collect()
            })
        } else {
            Some(spec.relay.image_pull_secrets.clone())
        },
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            fs_group: Some(RELAY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Pod around `pod_spec`: the region's extra labels and annotations under the
/// operator's own (which win), the pin, and the hash of all of them.
fn relay_pod_object(region: &DerpRegion, node: &str, pin: &str, pod_spec: PodSpec) -> Pod {
    let spec = &region.spec;
    let mut labels = spec.relay.pod_labels.clone();
    labels.extend(self::labels(region, "relay", Some(node)));
    let mut annotations = spec.relay.pod_annotations.clone();
    let hash_input = serde_json::to_string(&(&pod_spec, &labels, &annotations, pin))
        .expect("pod spec always serializes");
    let hash = hex::encode(&Sha256::digest(hash_input.as_bytes())[..8]);
    annotations.insert(ANNOTATION_SPEC_HASH.to_owned(), hash);
    annotations.insert(ANNOTATION_PIN.to_owned(), pin.to_owned());
    let mut metadata = meta(
        region,
        pod_name(&region.name_any(), node),
        "relay",
        Some(node),
        annotations,
    );
    metadata.labels = Some(labels);
    Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    }
}

/// The spec hash annotation of a Pod.
pub fn spec_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SPEC_HASH))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::region;

    #[test]
    fn relay_image_defaults_to_the_operator_setting_and_the_region_wins() {
        let image = |r: &DerpRegion| {
            relay_pod(
                r,
                &sel(Some("10.0.0.1"), None),
                false,
                "p",
                &RelayDefaults {
                    image: "registry.local/derper:9",
                    image_pull_secrets: &[],
                },
            )
            .spec
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image)
        };
        let mut r = region();
        assert_eq!(image(&r).as_deref(), Some("registry.local/derper:9"));
        r.spec.relay.image = Some("mirror.example/derper@sha256:ab".into());
        assert_eq!(
            image(&r).as_deref(),
            Some("mirror.example/derper@sha256:ab")
        );
    }

    fn sel(v4: Option<&str>, v6: Option<&str>) -> SelectedNode {
        SelectedNode {
            name: "n1".into(),
            ipv4: v4.map(|s| s.parse().unwrap()),
            ipv6: v6.map(|s| s.parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn long_names_are_hash_truncated_to_63() {
        let long = "r".repeat(40);
        let node = "node-".repeat(10);
        let n = tls_secret_name(&long, &node);
        assert_eq!(n.len(), 63);
        assert_ne!(n, tls_secret_name(&long, &format!("{node}x")));
        assert_eq!(n, tls_secret_name(&long, &node));
        assert_eq!(pod_name("home", "n1"), "home-n1");
        assert_eq!(tls_secret_name("home", "n1"), "home-n1-tls");
    }

    #[test]
    fn relay_pod_has_upstream_args_mounts_and_security() {
        let r = region();
        let pod = relay_pod(
            &r,
            &sel(None, Some("2001:db8::1")),
            true,
            "sha256-raw:00",
            &RelayDefaults::BUILTIN,
        );
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
        let c = &spec.containers[0];
        let args = c.args.as_ref().unwrap();
        for want in [
            "--hostname=2001:db8::1",
            "--certmode=manual",
            "--certdir=/certs",
            "-a",
            ":443",
            "--http-port=80",
            "--stun-port=3478",
            "--mesh-psk-file=/etc/derp/mesh-psk/psk",
        ] {
            assert!(args.iter().any(|a| a == want), "missing {want} in {args:?}");
        }
        let items = spec.volumes.as_ref().unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .items
            .as_ref()
            .unwrap();
        assert_eq!(items[0].path, "2001db81.crt");
        assert_eq!(items[1].path, "2001db81.key");
        // default ports (443/80/3478) are privileged: UID 0 with NET_BIND_SERVICE only
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_user, Some(0));
        assert_eq!(sc.run_as_non_root, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(
            caps.add.as_deref(),
            Some(&["NET_BIND_SERVICE".to_owned()][..])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let probe = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/generate_204"));
        assert_eq!(probe.port, IntOrString::Int(80));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "DerpRegion");
        assert_eq!(owner.controller, Some(true));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["kubederp.io/node"], "n1");
        assert_eq!(labels["kubederp.io/region"], "home");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "derp-operator");
    }

    #[test]
    fn unprivileged_ports_run_as_nonroot_without_capabilities() {
        let mut r = region();
        r.spec.ports.derp = 8443;
        r.spec.ports.http = 8080;
        r.spec.ports.stun = 3478;
        r.spec.ports.admin = 9090;
        let pod = relay_pod(
            &r,
            &sel(Some("10.0.0.1"), None),
            false,
            "p",
            &RelayDefaults::BUILTIN,
        );
        let sc = pod.spec.as_ref().unwrap().containers[0]
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.run_as_user, Some(RELAY_UID));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(caps.add, None);
    }

    #[test]
    fn any_enabled_port_below_1024_needs_net_bind_service() {
        let mut p = Ports {
            derp: 8443,
            http: 0,
            stun: -1,
            admin: 0,
        };
        assert!(!binds_privileged_port(&p), "disabled ports do not count");
        for set in [
            |p: &mut Ports| p.derp = 443,
            |p: &mut Ports| p.http = 80,
            |p: &mut Ports| p.stun = 478,
            |p: &mut Ports| p.admin = 900,
        ] {
            let mut q = p.clone();
            set(&mut q);
            assert!(binds_privileged_port(&q), "{q:?}");
            let sc = relay_security_context(&q);
            assert_eq!(sc.run_as_user, Some(0));
            assert_eq!(
                sc.capabilities.unwrap().add,
                Some(vec!["NET_BIND_SERVICE".to_owned()])
            );
        }
        p.derp = 1024;
        assert!(!binds_privileged_port(&p));
    }

    #[test]
    fn pod_hash_changes_with_pin_and_args_only() {
        let r = region();
        let n = sel(Some("10.0.0.1"), None);
        let a = relay_pod(&r, &n, false, "sha256-raw:00", &RelayDefaults::BUILTIN);
        assert_eq!(
            spec_hash(&a),
            spec_hash(&relay_pod(
                &r,
                &n,
                false,
                "sha256-raw:00",
                &RelayDefaults::BUILTIN
            ))
        );
        assert_ne!(
            spec_hash(&a),
            spec_hash(&relay_pod(
                &r,
                &n,
                false,
                "sha256-raw:01",
                &RelayDefaults::BUILTIN
            ))
        );
        assert_ne!(
            spec_hash(&a),
            spec_hash(&relay_pod(
                &r,
                &n,
                true,
                "sha256-raw:00",
                &RelayDefaults::BUILTIN
            ))
        );
    }

    #[test]
    fn disabled_http_and_stun_follow_upstream_flags() {
        let mut r = region();
        r.spec.ports.http = 0;
        r.spec.ports.stun = -1;
        let pod = relay_pod(
            &r,
            &sel(Some("10.0.0.1"), None),
            false,
            "p",
            &RelayDefaults::BUILTIN,
        );
        let c = &pod.spec.as_ref().unwrap().containers[0];
        let args = c.args.as_ref().unwrap();
        let admin_env = |c: &Container| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == "DERPER_ADMIN_ADDR")
                .and_then(|e| e.value.clone())
        };
        assert_eq!(admin_env(c).as_deref(), Some("$(HOST_IP):3480"));
        r.spec.ports.admin = 0;
        let off = relay_pod(
            &r,
            &sel(Some("10.0.0.1"), None),
            false,
            "p",
            &RelayDefaults::BUILTIN,
        );
        assert_eq!(
            admin_env(&off.spec.as_ref().unwrap().containers[0]).as_deref(),
            Some(""),
            "admin 0 turns the listener off instead of leaving the relay's default"
        );
        assert!(args.contains(&"--http-port=-1".to_owned()));
        assert!(args.contains(&"--stun=false".to_owned()));
        assert!(c.readiness_probe.as_ref().unwrap().tcp_socket.is_some());
    }

    #[test]
    fn mesh_peer_host_port_brackets_ipv6() {
        assert_eq!(
            host_port(&sel(None, Some("2001:db8::1")), 443),
            "[2001:db8::1]:443"
        );
        assert_eq!(
            host_port(&sel(Some("10.0.0.1"), Some("::1")), 8443),
            "10.0.0.1:8443"
        );
    }

    #[test]
    fn relay_pod_carries_the_admins_pod_settings() {
        use k8s_openapi::api::core::v1::LocalObjectReference;
        let n = sel(Some("10.0.0.1"), None);
        let defaults = RelayDefaults {
            image: DEFAULT_IMAGE_FOR_TEST,
            image_pull_secrets: &["regcred".to_owned()],
        };
        let mut r = region();
        // operator default pull secrets apply when the region sets none
        let pod = relay_pod(&r, &n, false, "p", &defaults);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.image_pull_secrets,
            Some(vec![LocalObjectReference {
                name: "regcred".into()
            }])
        );
        assert_eq!(
            spec.containers[0].termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let base_hash = spec_hash(&pod).map(str::to_owned);

        r.spec.relay = serde_json::from_value(serde_json::json!({
            "imagePullSecrets": [{"name": "mirror"}],
            "priorityClassName": "system-node-critical",
            "podLabels": {"team": "net"},
            "podAnnotations": {"example.com/scrape": "true"},
            "extraVolumes": [{"name": "rate", "configMap": {"name": "derp-rate"}}],
            "extraVolumeMounts": [{"name": "rate", "mountPath": "/etc/derp/rate", "readOnly": true}],
            "extraArgs": ["--rate-config=/etc/derp/rate/limits.json"],
        }))
        .unwrap();
        let pod = relay_pod(&r, &n, false, "p", &defaults);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.image_pull_secrets,
            Some(vec![LocalObjectReference {
                name: "mirror".into()
            }]),
            "the region's list replaces the operator's"
        );
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "net");
        assert_eq!(labels["kubederp.io/region"], "home");
        let ann = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann["example.com/scrape"], "true");
        assert!(ann.contains_key(ANNOTATION_SPEC_HASH));
        assert!(
            spec.volumes
                .as_ref()
                .unwrap()
                .iter()
                .any(|v| v.name == "rate" && v.config_map.is_some())
        );
        let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m.name == "rate" && m.mount_path == "/etc/derp/rate")
        );
        assert!(mounts.iter().any(|m| m.name == "certs"), "ours stay");
        assert_ne!(
            spec_hash(&pod).map(str::to_owned),
            base_hash,
            "changing the Pod settings replaces the relay"
        );
        // the operator's labels win over a clashing extra label (the CRD refuses them too)
        r.spec.relay.pod_labels = BTreeMap::from([("kubederp.io/region".into(), "x".into())]);
        let pod = relay_pod(&r, &n, false, "p", &defaults);
        assert_eq!(pod.metadata.labels.unwrap()["kubederp.io/region"], "home");
    }

    #[test]
    fn relay_args_are_upstream_flags_for_the_nodes_published_address() {
        let r = region();
        assert_eq!(
            relay_args(&r.spec, "203.0.113.7", false),
            [
                "--hostname=203.0.113.7",
                "--certmode=manual",
                "--certdir=/certs",
                "-a",
                ":443",
                "--http-port=80",
                "-c=/var/lib/derper/derper.key",
                "--stun-port=3478",
            ]
        );
        let meshed = relay_args(&r.spec, "203.0.113.7", true);
        assert_eq!(
            meshed.last().map(String::as_str),
            Some("--mesh-psk-file=/etc/derp/mesh-psk/psk")
        );
    }

    #[test]
    fn relay_args_turn_disabled_http_and_stun_off_the_upstream_way() {
        let mut r = region();
        r.spec.ports.derp = 8443;
        r.spec.ports.http = 0;
        r.spec.ports.stun = -1;
        let args = relay_args(&r.spec, "h", false);
        assert!(args.contains(&":8443".to_owned()), "{args:?}");
        assert!(args.contains(&"--http-port=-1".to_owned()), "{args:?}");
        assert!(args.contains(&"--stun=false".to_owned()), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--stun-port")));
    }

    #[test]
    fn relay_args_carry_client_verification_then_the_extra_args() {
        let mut r = region();
        r.spec.client_verification = serde_json::from_value(serde_json::json!({
            "mode": "url", "verifyClientURL": "https://v.example/admit", "failOpen": true,
        }))
        .unwrap();
        r.spec.relay.extra_args = vec!["--rate-config=/etc/rate.json".into()];
        let args = relay_args(&r.spec, "h", true);
        assert_eq!(
            args[args.len() - 4..],
            [
                "--mesh-psk-file=/etc/derp/mesh-psk/psk",
                "--verify-client-url=https://v.example/admit",
                "--verify-client-url-fail-open=true",
                "--rate-config=/etc/rate.json",
            ]
        );
        r.spec.client_verification = serde_json::from_value(serde_json::json!({
            "mode": "tailscaled",
            "tailscaled": {"authKeySecretRef": {"name": "ts", "key": "authkey"}},
        }))
        .unwrap();
        r.spec.relay.extra_args.clear();
        let args = relay_args(&r.spec, "h", false);
        assert_eq!(
            args[args.len() - 2..],
            [
                "--verify-clients",
                "--socket=/var/run/tailscale/tailscaled.sock"
            ]
        );
    }

    #[test]
    fn tailscaled_verification_adds_a_sidecar_sharing_the_socket_directory() {
        let mut r = region();
        r.spec.client_verification = serde_json::from_value(serde_json::json!({
            "mode": "tailscaled",
            "tailscaled": {
                "authKeySecretRef": {"name": "ts", "key": "authkey"},
                "loginServer": "https://hs.example",
            },
        }))
        .unwrap();
        let pod = relay_pod(
            &r,
            &sel(Some("10.0.0.1"), None),
            false,
            "p",
            &RelayDefaults::BUILTIN,
        );
        let spec = pod.spec.unwrap();
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["derper", "tailscaled"]);
        let sidecar = &spec.containers[1];
        assert_eq!(sidecar.image.as_deref(), Some(DEFAULT_TAILSCALED_IMAGE));
        let env: Vec<(&str, Option<&str>)> = sidecar
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert!(env.contains(&("TS_EXTRA_ARGS", Some("--login-server=https://hs.example"))));
        let key = sidecar.env.as_ref().unwrap()[0]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("ts", "authkey"));
        for c in &spec.containers {
            assert!(
                c.volume_mounts
                    .iter()
                    .flatten()
                    .any(|m| m.name == "tailscaled" && m.mount_path == TAILSCALED_DIR),
                "{} mounts the socket directory",
                c.name
            );
        }
        assert!(
            spec.volumes
                .unwrap()
                .iter()
                .any(|v| v.name == "tailscaled" && v.empty_dir.is_some())
        );
    }

    #[test]
    fn meshed_relay_mounts_the_psk_and_the_peer_list() {
        let r = region();
        let (mounts, volumes) = relay_storage("home", "n1", "10.0.0.1", true);
        let mounted: Vec<(&str, &str)> = mounts
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounted,
            [
                ("certs", CERT_DIR),
                ("state", STATE_DIR),
                ("mesh-psk", MESH_PSK_DIR),
                ("mesh-peers", MESH_PEERS_DIR)
            ]
        );
        assert_eq!(
            volumes[2].secret.as_ref().unwrap().secret_name,
            Some(mesh_secret_name("home"))
        );
        assert_eq!(
            volumes[3].config_map.as_ref().unwrap().name,
            mesh_peers_name("home")
        );
        let env = relay_env(&r.spec.ports, true, Some("debug"));
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "HOST_IP",
                "DERPER_ADMIN_ADDR",
                "DERPER_MESH_PEERS_FILE",
                "RUST_LOG"
            ]
        );
        assert_eq!(relay_storage("home", "n1", "10.0.0.1", false).0.len(), 2);
    }

    const DEFAULT_IMAGE_FOR_TEST: &str = "registry.local/derper:1";
}
