# shellcheck shell=bash
# Control plane of the real-node tier, in the tier's network namespace: etcd on loopback,
# kube-apiserver on 10.123.0.1:443 (and the `kubernetes` Service IP 10.123.1.1) with its own
# small CA, kube-controller-manager (all default controllers: Deployments, ServiceAccounts,
# kube-root-ca.crt, node lifecycle, garbage collection) and kube-scheduler.

# Starts a background process NAME with its output in $RN_DIR/logs/NAME.log; pid in pids/NAME.
spawn() {
  local name=$1
  shift
  mkdir -p "$RN_DIR/logs" "$RN_DIR/pids"
  "$@" >> "$RN_DIR/logs/$name.log" 2>&1 &
  echo $! > "$RN_DIR/pids/$name"
}

# Waits up to $1 s for the command to succeed; fails with $2 and the named logs otherwise.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$(( $(date +%s) + limit ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "timed out after ${limit}s waiting for $what"
    fi
    sleep 0.2
  done
}

cp_certs() {
  local p="$RN_DIR/pki"
  mkdir -p "$p"
  (
    cd "$p"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -keyout ca.key -out ca.crt -subj /CN=kubederp-real-nodes-ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
    printf '%s\n' \
      "subjectAltName=IP:$RN_BRIDGE_IP,IP:$RN_SERVICE_IP,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
      "basicConstraints=CA:FALSE" "keyUsage=digitalSignature,keyEncipherment" \
      "extendedKeyUsage=serverAuth" > apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out sa.key
    openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
    echo "$(openssl rand -hex 16),kubederp-admin,kubederp-admin-uid,\"system:masters\"" > tokens.csv
  )
  local token
  token=$(cut -d, -f1 "$p/tokens.csv")
  cat > "$RN_DIR/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: real-nodes
  cluster:
    server: https://$RN_BRIDGE_IP:443
    certificate-authority: $p/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: real-nodes
  context: {cluster: real-nodes, user: admin}
current-context: real-nodes
KC
}

cp_up() {
  cp_certs
  local p="$RN_DIR/pki" kc="$RN_DIR/admin.kubeconfig"
  spawn etcd etcd --data-dir "$RN_DIR/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
    --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster default=http://127.0.0.1:2380 --unsafe-no-fsync=true --log-level=warn
  spawn kube-apiserver kube-apiserver --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$RN_BRIDGE_IP" --secure-port=443 \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --token-auth-file="$p/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer="https://$RN_SERVICE_IP" --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range="$RN_SERVICE_CIDR" --allow-privileged=true \
    --kubelet-preferred-address-types=InternalIP
  wait_for 90 "kube-apiserver /readyz" kubectl get --raw /readyz
  spawn kube-controller-manager kube-controller-manager --kubeconfig="$kc" \
    --leader-elect=false --secure-port=0 --use-service-account-credentials=false \
    --root-ca-file="$p/ca.crt" --service-account-private-key-file="$p/sa.key" \
    --node-monitor-period=2s --node-monitor-grace-period=20s
  spawn kube-scheduler kube-scheduler --kubeconfig="$kc" --leader-elect=false --secure-port=0
}
