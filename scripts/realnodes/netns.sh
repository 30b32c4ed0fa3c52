# shellcheck shell=bash
# Network of the real-node tier. Runs inside the tier's own network namespace (made by
# `unshare --net` in scripts/real-nodes): a bridge holding the control plane's address, and
# one further namespace per node joined to it by a veth pair that holds the node IP. Nothing
# here touches the root namespace. Addresses: 10.123.0.1 (bridge, apiserver), 10.123.0.1N
# (node N), 10.123.1.0/24 (Service range; 10.123.1.1, the `kubernetes` Service, is also on
# the bridge, so Pods reach the apiserver without kube-proxy), 10.123.1N.0/24 (Pods of node N).

RN_BRIDGE_IP=10.123.0.1
RN_SERVICE_CIDR=10.123.1.0/24
RN_SERVICE_IP=10.123.1.1

node_ip() { echo "10.123.0.$((10 + $1))"; }
pod_cidr() { echo "10.123.$((10 + $1)).0/24"; }
pod_gw() { echo "10.123.$((10 + $1)).1"; }

# Runs a command in node N's network namespace (nsenter execs it: same PID).
nx() {
  local n=$1
  shift
  nsenter --net="/proc/$(cat "$RN_DIR/n$n/netns.pid")/ns/net" "$@"
}

net_tier_up() {
  ip link set lo up
  ip link add rnbr0 type bridge
  ip addr add "$RN_BRIDGE_IP/24" dev rnbr0
  ip addr add "$RN_SERVICE_IP/32" dev rnbr0
  ip link set rnbr0 up
}

# Node N's namespace: held by a `sleep` made with `unshare --net` (dies with the tier's PID
# namespace), a veth pair to the bridge, the node IP, a default route to the bridge, forwarding
# for its Pods, and a route to its Pod range from the tier namespace.
net_node_up() {
  local n=$1 nd="$RN_DIR/n$1"
  mkdir -p "$nd"
  unshare --net sleep infinity &
  local pid=$!
  local self
  self=$(readlink /proc/self/ns/net)
  for _ in $(seq 100); do
    [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" != "$self" ] && break
    sleep 0.02
  done
  echo "$pid" > "$nd/netns.pid"
  ip link add "rnv$n" type veth peer name eth0 netns "$pid"
  ip link set "rnv$n" master rnbr0 up
  nx "$n" ip link set lo up
  nx "$n" ip addr add "$(node_ip "$n")/24" dev eth0
  nx "$n" ip link set eth0 up
  nx "$n" ip route add default via "$RN_BRIDGE_IP"
  nx "$n" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
  ip route add "$(pod_cidr "$n")" via "$(node_ip "$n")"
}
