# shellcheck shell=bash
# One node of the real-node tier: its own containerd (own root, state, socket and runc root;
# restrict_oom_score_adj because root lacks CAP_SYS_RESOURCE here; cgroupfs; our pause image)
# and its own kubelet (cgroup v1 allowed, cgroupfs driver, its own cgroupRoot created in every
# hierarchy, its own root/log/plugin dirs, no iptables chains), both inside the node's network
# namespace. See shared/docs/real-nodes.md for why each setting is there.

node_name() { echo "rn-$1"; }
node_sock() { echo "$RN_DIR/n$1/containerd.sock"; }
node_cgroup() { echo "/$RN_ID-n$1"; }

# containerd for node N, with the pause image and the product images imported.
node_containerd_up() {
  local n=$1 nd="$RN_DIR/n$1"
  mkdir -p "$nd/cni/net.d" "$nd/cni-ipam"
  cat > "$nd/cni/net.d/10-kdrn.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "kdrn",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$(pod_cidr "$n")", "gateway": "$(pod_gw "$n")"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$nd/cni-ipam"
      }
    }
  ]
}
CNI
  cat > "$nd/containerd.toml" <<TOML
version = 2
root = "$nd/containerd"
state = "$nd/containerd-state"
[grpc]
  address = "$(node_sock "$n")"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$RN_PAUSE_REF"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$nd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni/net.d"
    max_conf_num = 1
TOML
  spawn "containerd-$n" nsenter --net="/proc/$(cat "$nd/netns.pid")/ns/net" containerd --config "$nd/containerd.toml"
  wait_for 30 "containerd of node $n" ctr -a "$(node_sock "$n")" version
  local a
  for a in "$RN_PAUSE" $RN_IMAGES; do
    ctr -a "$(node_sock "$n")" -n k8s.io images import "$a" >/dev/null ||
      fail "node $n: ctr images import $a failed"
  done
}

# The node's cgroup root, made in every mounted hierarchy (cpuset needs cpus/mems first).
node_cgroups() {
  local n=$1 h cg
  cg=$(node_cgroup "$n")
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "${h%/}$cg"
  done
  if [ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]; then
    cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset$cg/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset$cg/cpuset.mems"
  fi
}

node_kubelet_config() {
  local n=$1 nd="$RN_DIR/n$1"
  mkdir -p "$nd/kubelet" "$nd/pod-logs" "$nd/volume-plugins"
  cat > "$nd/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $(node_cgroup "$n")
containerRuntimeEndpoint: unix://$(node_sock "$n")
address: $(node_ip "$n")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
makeIPTablesUtilChains: false
protectKernelDefaults: false
podLogsDir: $nd/pod-logs
volumePluginDir: $nd/volume-plugins
failSwapOn: false
nodeStatusUpdateFrequency: 4s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 1Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
maxPods: 20
YAML
}

node_kubelet_up() {
  local n=$1 nd="$RN_DIR/n$1"
  spawn "kubelet-$n" nsenter --net="/proc/$(cat "$nd/netns.pid")/ns/net" kubelet --config="$nd/kubelet.yaml" \
    --kubeconfig="$RN_DIR/admin.kubeconfig" --root-dir="$nd/kubelet" \
    --hostname-override="$(node_name "$n")" --node-ip="$(node_ip "$n")" --v=1
}

node_kubelet_stop() {
  local n=$1 pid
  pid=$(cat "$RN_DIR/pids/kubelet-$n")
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

node_up() {
  local n=$1
  net_node_up "$n"
  node_containerd_up "$n"
  node_cgroups "$n"
  node_kubelet_config "$n"
  node_kubelet_up "$n"
}
