# shellcheck shell=bash
# What the real-node tier proves, once the nodes are Ready: the chart installed as a user
# installs it, the example region working on real nodes with real Tailscale client code, the
# relay's security context read from the running process, and the lifecycle cases.

jp() { kubectl get "$@" 2>/dev/null; }

# Pins of the region's nodes, "node=pin" sorted.
pins() {
  jp derpregion "${1:-$REGION}" -n "$NS" \
    -o jsonpath='{range .status.nodes[*]}{.name}={.certName}{"\n"}{end}' | sort
}

# Node names in the published derpMap ConfigMap (sorted, space-separated).
map_nodes() {
  jp configmap "${1:-$REGION}-derpmap" -n "$NS" -o jsonpath='{.data.derpmap\.json}' |
    python3 -c 'import json,sys
try: m=json.load(sys.stdin)
except Exception: sys.exit(0)
print(" ".join(sorted(n["Name"] for r in m.get("Regions",{}).values() for n in r.get("Nodes") or [])))'
}

region_ready() {
  [ "$(jp derpregion "${1:-$REGION}" -n "$NS" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

pod_uid() { jp pod "$1" -n "$NS" -o jsonpath='{.metadata.uid}'; }
pod_ready() {
  [ "$(jp pod "$1" -n "$NS" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
# Waits until `map_nodes` prints exactly $2 (within $1 s).
wait_map() {
  local limit=$1 want=$2 deadline=$(( $(date +%s) + $1 ))
  until [ "$(map_nodes)" = "$want" ]; do
    [ "$(date +%s)" -ge "$deadline" ] && fail "published map is '$(map_nodes)', want '$want' (after ${limit}s)"
    sleep 0.2
  done
}

# UID and CapEff of the running process of pod $1's first container, read from /proc.
proc_ids() {
  local pod=$1 node cid n pid
  node=$(jp pod "$pod" -n "$NS" -o jsonpath='{.spec.nodeName}')
  n=${node#rn-}
  cid=$(jp pod "$pod" -n "$NS" -o jsonpath='{.status.containerStatuses[0].containerID}')
  cid=${cid#containerd://}
  pid=$(ctr -a "$(node_sock "$n")" -n k8s.io task ls | awk -v id="$cid" '$1 == id {print $2}')
  [ -n "$pid" ] || fail "no task for container $cid of $pod on $node"
  echo "pid=$pid $(awk '/^Uid:/ {print "uid=" $2} /^CapEff:/ {print "capeff=" $2}' "/proc/$pid/status" | tr '\n' ' ')"
}

install_chart() {
  kubectl label node "$(node_name 1)" "$(node_name 2)" "$(node_name 3)" kubederp.io/relay=true >/dev/null
  helm install kubederp "$RN_REPO/charts/kubederp" -n kubederp --create-namespace \
    --wait --timeout 180s >/dev/null || fail "helm install failed"
  local op
  op=$(jp pods -n kubederp -l app.kubernetes.io/name=kubederp -o jsonpath='{.items[0].metadata.name}')
  log "helm install: operator Pod $op Running and Ready on $(jp pod "$op" -n kubederp -o jsonpath='{.spec.nodeName} (image {.spec.containers[0].image}, SA {.spec.serviceAccountName})')"
  wait_for 60 "the operator to hold its Lease" sh -c \
    "kubectl get lease -n kubederp -o jsonpath='{.items[*].spec.holderIdentity}' | grep -q '$op'"
  log "leader election: Lease held by $op"
}

region_up() {
  kubectl apply -n "$NS" -f "$RN_REPO/deploy/examples/derpregion-three-nodes.yaml" >/dev/null
  kubectl wait -n "$NS" "derpregion/$REGION" --for=condition=Ready --timeout=180s >/dev/null ||
    fail "region $REGION not Ready"
  wait_map 30 "rn-1 rn-2 rn-3"
  log "region $REGION Ready; derpMap lists $(map_nodes)"
  local n ip
  for n in "${NODES[@]}"; do
    ip=$(node_ip "$n")
    # hostNetwork: the relay's sockets are in the node's namespace (`-a :443` listens on every
    # address there, i.e. the node IP), and reachable at the node IP from outside the node
    nx "$n" ss -Htln "sport = :443" | grep -Eq "($ip|\*|0\.0\.0\.0|\[::\]):443" ||
      fail "relay on $(node_name "$n") does not listen on :443 in the node: $(nx "$n" ss -Htlnu)"
    timeout 5 bash -c "exec 3<>/dev/tcp/$ip/443" ||
      fail "cannot connect to $ip:443 from the tier namespace"
  done
  log "relays listen in the nodes' namespaces ($(for n in "${NODES[@]}"; do nx "$n" ss -Htln "sport = :443" | awk '{print $4}'; done | sort -u | tr '\n' ' ')) and answer on 10.123.0.11-13:443"
}

clients() {
  local map="$RN_DIR/derpmap.json" v a b out
  jp configmap "$REGION-derpmap" -n "$NS" -o jsonpath='{.data.derpmap\.json}' > "$map"
  for v in v1.82.5 v1.104.7; do
    for pair in "rn-1 rn-2" "rn-2 rn-3" "rn-3 rn-1"; do
      read -r a b <<< "$pair"
      out=$("$RN_INTEROP/derpinterop-$v" exchange -derpmap "$map" -region 900 \
        -node-a "$a" -node-b "$b" -timeout 30s 2>"$RN_DIR/interop.err") ||
        fail "tailscale $v exchange $a -> $b: $out $(tail -5 "$RN_DIR/interop.err")"
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get("ok") else 1)' "$out" ||
        fail "tailscale $v exchange $a -> $b not ok: $out"
    done
    log "tailscale $v: packets exchanged through every node pair (rn-1/rn-2, rn-2/rn-3, rn-3/rn-1)"
  done
  "$RN_DERPPROBE" --configmap "$NS/$REGION-derpmap" --kubeconfig "$KUBECONFIG" \
    > "$RN_DIR/derpprobe.out" 2>&1 || fail "derpprobe --configmap failed: $(cat "$RN_DIR/derpprobe.out")"
  log "derpprobe --configmap $NS/$REGION-derpmap: exit 0"
}

logs_exec() {
  local pod="$REGION-rn-1" lines v
  lines=$(kubectl logs -n "$NS" "$pod" | wc -l)
  [ "$lines" -gt 0 ] || fail "kubectl logs $pod printed nothing"
  v=$(kubectl exec -n "$NS" "$pod" -- /usr/local/bin/derper --version) || fail "kubectl exec $pod failed"
  log "kubectl logs $pod: $lines lines; kubectl exec $pod -- derper --version: $v"
}

security_context() {
  local ids
  ids=$(proc_ids "$REGION-rn-1")
  log "relay with port 443: $ids"
  case "$ids" in
    *"uid=0 "*"capeff=0000000000000400"*) ;;
    *) fail "relay with a port < 1024 should run as UID 0 with CapEff 0x400 only: $ids" ;;
  esac
  kubectl label node "$(node_name 1)" kubederp.io/relay-high=true >/dev/null
  kubectl apply -n "$NS" -f - >/dev/null <<YAML
apiVersion: kubederp.io/v1alpha1
kind: DerpRegion
metadata:
  name: high
spec:
  regionID: 901
  nodeSelector:
    kubederp.io/relay-high: "true"
  ports:
    derp: 8443
    http: 8081
    stun: 3479
    admin: 9091
YAML
  kubectl wait -n "$NS" derpregion/high --for=condition=Ready --timeout=120s >/dev/null ||
    fail "region high not Ready"
  ids=$(proc_ids "high-rn-1")
  log "relay with ports >= 1024: $ids"
  case "$ids" in
    *"uid=65532 "*"capeff=0000000000000000"*) ;;
    *) fail "relay with ports >= 1024 should run as UID 65532 with CapEff 0: $ids" ;;
  esac
  kubectl delete -n "$NS" derpregion/high --wait=true >/dev/null
}

# --- lifecycle ----------------------------------------------------------------------------------

case_delete_pod() {
  local pod="$REGION-rn-2" before uid
  before=$(pins)
  uid=$(pod_uid "$pod")
  kubectl delete pod -n "$NS" "$pod" --wait=false >/dev/null
  wait_for 90 "$pod to come back" sh -c "[ \"\$(kubectl get pod -n $NS $pod -o jsonpath='{.metadata.uid}')\" != '$uid' ] && kubectl get pod -n $NS $pod -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
  [ "$(pins)" = "$before" ] || fail "pins changed after deleting $pod: $(pins)"
  wait_map 60 "rn-1 rn-2 rn-3"
  log "lifecycle: deleted relay Pod $pod came back Ready (new UID), every pin unchanged"
}

case_delete_secret() {
  local old new
  old=$(pins | grep '^rn-3=')
  kubectl delete secret -n "$NS" "$REGION-rn-3-tls" >/dev/null
  wait_for 60 "a new pin for rn-3" sh -c "kubectl get derpregion -n $NS $REGION -o jsonpath='{range .status.nodes[*]}{.name}={.certName}{\"\\n\"}{end}' | grep '^rn-3=' | grep -vqx '$old'"
  new=$(pins | grep '^rn-3=')
  wait_for 30 "a CertificateIssued Event for rn-3" sh -c \
    "kubectl get events -n $NS --field-selector reason=CertificateIssued -o jsonpath='{.items[*].message}' | grep -q 'rn-3: new certificate'"
  wait_for 90 "region Ready again with rn-3's new pin" region_ready
  log "lifecycle: deleted Secret $REGION-rn-3-tls -> pin ${old#rn-3=} became ${new#rn-3=}, Event CertificateIssued"
}

case_operator_restart() {
  local before old new
  before=$(pins)
  old=$(jp pods -n kubederp -l app.kubernetes.io/name=kubederp -o jsonpath='{.items[0].metadata.name}')
  kubectl delete pod -n kubederp "$old" --wait=false >/dev/null
  wait_for 120 "a new operator to hold the Lease" sh -c \
    "h=\$(kubectl get lease -n kubederp -o jsonpath='{.items[*].spec.holderIdentity}'); [ -n \"\$h\" ] && ! echo \"\$h\" | grep -q '$old'"
  new=$(jp lease -n kubederp -o jsonpath='{.items[*].spec.holderIdentity}')
  wait_for 60 "region Ready under the new leader" region_ready
  [ "$(pins)" = "$before" ] || fail "pins changed after the operator restart"
  log "lifecycle: deleted operator Pod $old -> new leader $new, no pin changed"
}

case_kubelet_stopped() {
  local pin
  pin=$(pins | grep '^rn-3=')
  node_kubelet_stop 3
  wait_for 90 "rn-3 NotReady" sh -c \
    "kubectl get node rn-3 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qv True"
  wait_map 90 "rn-1 rn-2"
  log "lifecycle: kubelet of rn-3 stopped -> node NotReady -> withdrawn (map: $(map_nodes))"
  node_kubelet_up 3
  kubectl wait node rn-3 --for=condition=Ready --timeout=90s >/dev/null || fail "rn-3 not Ready again"
  wait_map 120 "rn-1 rn-2 rn-3"
  [ "$(pins | grep '^rn-3=')" = "$pin" ] ||
    fail "kubelet stopped: rn-3 came back with pin $(pins | grep '^rn-3='), was $pin"
  log "lifecycle: kubelet of rn-3 back -> Ready -> back in the map with the same pin"
}

# Cordon: the node must leave the published map before its relay is told to stop. Each poll
# reads the Pod first, then the map: a Pod seen deleting (or gone) while the map read after it
# still lists the node is a violation.
case_cordon() {
  local pod="$REGION-rn-2" seen_withdrawn=false deadline state
  kubectl cordon rn-2 >/dev/null
  deadline=$(( $(date +%s) + 90 ))
  while :; do
    state=$(kubectl get pod -n "$NS" "$pod" -o jsonpath='{.metadata.deletionTimestamp}' 2>&1 || true)
    case "$state" in
      *NotFound*) state=gone ;;
      "") state=running ;;
      *) state=deleting ;;
    esac
    if [[ " $(map_nodes) " == *" rn-2 "* ]]; then
      [ "$state" = running ] || fail "cordon: relay Pod $pod $state while the map still lists rn-2"
    else
      seen_withdrawn=true
      [ "$state" != running ] && break
    fi
    [ "$(date +%s)" -ge "$deadline" ] && fail "cordon: map '$(map_nodes)', Pod $state after 90s"
    sleep 0.1
  done
  $seen_withdrawn || fail "cordon: never saw the map without rn-2"
  log "lifecycle: cordon rn-2 -> withdrawn from the map, then its relay Pod $state"
  kubectl uncordon rn-2 >/dev/null
  wait_map 120 "rn-1 rn-2 rn-3"
  log "lifecycle: uncordon rn-2 -> back in the map"
}

# Drain: `kubectl drain` (no --force, no --disable-eviction) asks the Eviction API, which the
# region's PodDisruptionBudget refuses for a Ready relay; the operator sees the cordon, withdraws
# the node from the map, then deletes the relay itself, and the drain completes. Each poll reads
# the Pod first, then the map, then connects to the relay: while the map lists the node, its
# relay Pod must be running and the relay still accept connections on the node IP.
case_drain() {
  local node=rn-1 pod="$REGION-rn-1" ip pin out rc state seen_withdrawn=false refused deadline allowed
  ip=$(node_ip 1)
  pin=$(pins | grep "^$node=")
  out=$(jp pdb "$REGION-relays" -n "$NS" -o jsonpath='{.spec.minAvailable} {.status.disruptionsAllowed} {.status.currentHealthy}') ||
    fail "drain: no PodDisruptionBudget $REGION-relays"
  read -r _ allowed _ <<< "$out"
  [ "${allowed:-0}" = 0 ] || fail "drain: PodDisruptionBudget allows $allowed disruption(s): $out"
  log "drain: PodDisruptionBudget $REGION-relays: minAvailable/disruptionsAllowed/currentHealthy = $out"
  # the relay's emptyDir (its state directory) makes a plain drain refuse; nothing is cordoned
  out=$(kubectl drain "$node" --ignore-daemonsets --dry-run=server 2>&1) &&
    fail "drain: expected a refusal without --delete-emptydir-data, got: $out"
  log "drain: without --delete-emptydir-data kubectl refuses: $(echo "$out" | grep -m1 -o 'cannot delete.*' || echo "$out" | tail -1)"
  kubectl drain "$node" --ignore-daemonsets --delete-emptydir-data --timeout=150s \
    > "$RN_DIR/drain.out" 2>&1 &
  local drain_pid=$! t0=$SECONDS
  deadline=$(( $(date +%s) + 120 ))
  while :; do
    state=$(kubectl get pod -n "$NS" "$pod" -o jsonpath='{.metadata.deletionTimestamp}' 2>&1 || true)
    case "$state" in
      *NotFound*) state=gone ;;
      "") state=running ;;
      *) state=deleting ;;
    esac
    if [[ " $(map_nodes) " == *" $node "* ]]; then
      [ "$state" = running ] || fail "drain: relay Pod $pod $state while the map still lists $node ($(cat "$RN_DIR/drain.out"))"
      timeout 2 bash -c "exec 3<>/dev/tcp/$ip/443" 2>/dev/null ||
        fail "drain: the relay on $ip:443 stopped serving while the map still lists $node"
    else
      seen_withdrawn=true
      [ "$state" != running ] && break
    fi
    [ "$(date +%s)" -ge "$deadline" ] && fail "drain: map '$(map_nodes)', Pod $state after 120s ($(cat "$RN_DIR/drain.out"))"
    sleep 0.1
  done
  $seen_withdrawn || fail "drain: never saw the map without $node"
  log "drain: $node withdrawn from the map (relay serving until then), then its relay Pod $state"
  deadline=$(( $(date +%s) + 60 ))
  while kill -0 "$drain_pid" 2>/dev/null; do
    [ "$(date +%s)" -ge "$deadline" ] && fail "drain: kubectl drain still running 60s after the relay stopped: $(cat "$RN_DIR/drain.out")"
    sleep 0.2
  done
  rc=0
  wait "$drain_pid" || rc=$?
  [ "$rc" = 0 ] || fail "drain: kubectl drain exited $rc: $(cat "$RN_DIR/drain.out")"
  refused=$(grep -c "disruption budget" "$RN_DIR/drain.out" || true)
  [ "$refused" -gt 0 ] || fail "drain: the eviction of $pod was never refused, so nothing proves the operator (not the eviction) stopped it: $(cat "$RN_DIR/drain.out")"
  log "drain: kubectl drain $node exited 0 after $((SECONDS - t0))s; the eviction of $pod was refused $refused time(s) ($(grep -m1 -o "Cannot evict pod[^.]*" "$RN_DIR/drain.out"))"
  kubectl uncordon "$node" >/dev/null
  wait_map 120 "rn-1 rn-2 rn-3"
  [ "$(pins | grep "^$node=")" = "$pin" ] ||
    fail "drain: $node came back with pin $(pins | grep "^$node="), was $pin; Secret $REGION-$node-tls created $(jp secret "$REGION-$node-tls" -n "$NS" -o jsonpath='{.metadata.creationTimestamp}'); region events: $(kubectl get events -n "$NS" --field-selector involvedObject.kind=DerpRegion -o custom-columns=R:.reason,M:.message --no-headers 2>&1 | tail -n 12); operator: $(kubectl logs -n kubederp -l app.kubernetes.io/name=kubederp --tail=-1 2>&1 | grep -i "$node-tls\|secret" | tail -n 8)"
  wait_for 90 "$pod Ready again" pod_ready "$pod"
  log "lifecycle: drain $node -> withdrawn, relay stopped by the operator, drain done; uncordon -> back in the map with the same pin"
}

case_helm_upgrade() {
  local n min=3 count changed=0 deadline
  for n in "${NODES[@]}"; do
    ctr -a "$(node_sock "$n")" -n k8s.io images tag "ghcr.io/kubederp/derper:$RN_VERSION" \
      "ghcr.io/kubederp/derper:$RN_VERSION-upgrade" >/dev/null
  done
  helm upgrade kubederp "$RN_REPO/charts/kubederp" -n kubederp --reuse-values \
    --set relayImage.tag="$RN_VERSION-upgrade" --wait --timeout 180s >/dev/null || fail "helm upgrade failed"
  deadline=$(( $(date +%s) + 240 ))
  while :; do
    count=$(map_nodes | wc -w)
    [ "$count" -lt "$min" ] && min=$count
    [ "$count" = 0 ] && fail "helm upgrade: the published region became empty"
    changed=$(jp pods -n "$NS" -l kubederp.io/region="$REGION" \
      -o jsonpath='{range .items[*]}{.spec.containers[0].image} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
      grep -c -- "-upgrade True" || true)
    [ "$changed" = 3 ] && region_ready && [ "$count" = 3 ] && break
    [ "$(date +%s)" -ge "$deadline" ] && fail "helm upgrade: $changed/3 relays replaced after 240s"
    sleep 0.2
  done
  log "lifecycle: helm upgrade relayImage.tag -> 3 relays replaced, published map never below $min node(s)"
}

case_helm_uninstall() {
  helm uninstall kubederp -n kubederp --wait >/dev/null || fail "helm uninstall failed"
  local crd regions relays pdbs
  crd=$(jp crd derpregions.kubederp.io -o name)
  regions=$(jp derpregion -A -o name | wc -l)
  relays=$(jp pods -n "$NS" -l kubederp.io/region="$REGION" -o name | wc -l)
  pdbs=$(jp pdb -n "$NS" -o name | tr '\n' ' ')
  log "lifecycle: helm uninstall -> operator gone ($(jp pods -n kubederp -o name | wc -l) Pods in kubederp); CRD ${crd:-gone}; $regions DerpRegion(s), $relays relay Pod(s) and PodDisruptionBudget(s) ${pdbs:-none} remain"
}

run_checks() {
  install_chart
  region_up
  clients
  logs_exec
  security_context
  case_delete_pod
  case_delete_secret
  case_operator_restart
  case_kubelet_stopped
  case_cordon
  case_drain
  case_helm_upgrade
  case_helm_uninstall
}
