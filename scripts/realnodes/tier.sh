#!/usr/bin/env bash
# The real-node tier, run by scripts/real-nodes inside `unshare --net --mount --pid`: PID 1 of
# its own PID namespace (every process started here dies with it), a private mount namespace
# (tmpfs over the fixed host paths containerd and the kubelet write, scratch files over the
# sysctls the kubelet sets) and a fresh network namespace (netns.sh).
#
# Inputs (environment): RN_ID, RN_DIR, RN_REPO, RN_BIN (Kubernetes binaries), RN_PAUSE,
# RN_IMAGES (OCI archives), RN_INTEROP (derpinterop-<version>), RN_DERPPROBE, RN_VERSION.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH="$RN_BIN:$PATH" KUBECONFIG="$RN_DIR/admin.kubeconfig"
export HELM_CACHE_HOME="$RN_DIR/helm/cache" HELM_CONFIG_HOME="$RN_DIR/helm/config" \
  HELM_DATA_HOME="$RN_DIR/helm/data"
RN_PAUSE_REF=localhost/kubederp/pause:1
NODES=(1 2 3)
T0=$(date +%s%N)
REGION=home
NS=default

log() {
  local ms=$(( ($(date +%s%N) - T0) / 1000000 ))
  printf '[real-nodes %4d.%01ds] %s\n' $((ms / 1000)) $((ms % 1000 / 100)) "$*" >&2
}
dump() {
  local f
  for f in "$RN_DIR"/logs/*.log; do
    printf '\n--- %s (last 25 lines) ---\n' "$(basename "$f")" >&2
    tail -n 25 "$f" >&2
  done
  kubectl get nodes,pods -A -o wide >&2 2>/dev/null || true
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
}
fail() {
  log "FAIL: $*"
  dump
  exit 1
}

source "$here/netns.sh"
source "$here/controlplane.sh"
source "$here/node.sh"
source "$here/checks.sh"

# --- the host stays as it was ---------------------------------------------------------------
protect_host() {
  local p s f
  # fixed paths containerd, CNI and the kubelet write regardless of their configuration
  for p in /run /var/lib/kubelet /var/lib/cni /var/log/containers /var/log/pods; do
    if [ ! -e "$p" ]; then
      mkdir -p "$p"
      echo "$p" >> "$RN_DIR/created-paths"
    fi
    mount -t tmpfs -o mode=0755 tmpfs "$p"
  done
  # sysctls the kubelet sets (global, not per namespace): it writes to scratch files instead
  mkdir -p "$RN_DIR/sysctl"
  for s in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
    kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
    f="$RN_DIR/sysctl/${s//\//.}"
    cat "/proc/sys/$s" > "$f"
    mount --bind "$f" "/proc/sys/$s"
  done
}

protect_host
log "namespaces ready (pid $$ in its own PID namespace)"
net_tier_up
cp_up
log "control plane ready at https://$RN_BRIDGE_IP:443"
for n in "${NODES[@]}"; do node_up "$n"; done
log "containerd + kubelet started on ${#NODES[@]} nodes"
for n in "${NODES[@]}"; do
  wait_for 60 "node $(node_name "$n") to register" kubectl get node "$(node_name "$n")"
done
kubectl wait node --all --for=condition=Ready --timeout=120s >/dev/null || fail "nodes not Ready"
log "nodes Ready: $(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}={.status.addresses[0].address} {end}')"

# RN_CHECKS: all (default), none, or check functions to run in order (a developer's subset,
# e.g. "install_chart region_up case_drain")
case "${RN_CHECKS:-all}" in
  all) run_checks ;;
  none) ;;
  *) for c in $RN_CHECKS; do "$c"; done ;;
esac
log "all checks passed"
