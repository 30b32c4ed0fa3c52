# Shared set-up for scripts/test and scripts/demo: toolchain checks, caches outside the repo,
# and the real peers (Kubernetes control plane, Go interop programs) built when missing.
# shellcheck shell=bash

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KUBEDERP_CACHE=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}
# One target dir outside the clone: a fresh clone reuses compiled dependencies.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$KUBEDERP_CACHE/cargo-target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need() { # command hint
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}

check_toolchains() {
  need cargo "install Rust with rustup (rust-toolchain.toml pins the version)"
  need go "install Go >= 1.24 (used only to build kube-apiserver, etcd and the Tailscale peers)"
  need python3 "install Python 3 (kubectl and helm come from a PyPI wheel)"
  need flock "install util-linux"
}

# Sets K8S_TEST_BIN_DIR (etcd, kube-apiserver, kube-controller-manager, kubectl, helm).
ensure_k8s_tools() {
  step "Kubernetes control-plane binaries (cached in $KUBEDERP_CACHE/k8s)"
  local dir
  dir=$(bash "$repo/tools/k8s/build.sh" | tail -n 1) || die "building the Kubernetes binaries failed (see above)"
  export K8S_TEST_BIN_DIR=$dir
  export PATH="$dir:$PATH"
}

# Sets KUBEDERP_INTEROP_BIN_DIR (Go programs built against real Tailscale client code).
ensure_interop_tools() {
  if [ -f "$repo/tests/interop/build.sh" ]; then
    step "Tailscale interop programs and upstream derper (cached in $KUBEDERP_CACHE)"
    local dir
    dir=$(bash "$repo/tests/interop/build.sh" | tail -n 1) || die "building the Go interop programs failed (see above)"
    export KUBEDERP_INTEROP_BIN_DIR=$dir
  fi
}

# Sets KUBEDERP_TAILNET_BIN_DIR (tailscaled, tailscale and Tailscale's own test control server,
# for --verify-clients against a real tailnet). Cold: about 13 minutes on 2 cores.
ensure_tailnet_tools() {
  step "Loopback tailnet kit: tailscaled + testcontrol (cached in $KUBEDERP_CACHE/tailnet)"
  local dir
  dir=$(bash "$repo/tests/interop/tailnet/build.sh" | tail -n 1) || die "building tailscaled and the test control server failed (see above)"
  export KUBEDERP_TAILNET_BIN_DIR=$dir
}

# Sets KUBEDERP_HEADSCALE_BIN_DIR (headscale v0.29.2 from the Go module proxy, for the headscale
# end-to-end tests). Cold: about 21 minutes on 2 busy cores (3m53s of CPU).
ensure_headscale() {
  step "headscale (cached in $KUBEDERP_CACHE/headscale)"
  local dir
  dir=$(bash "$repo/tests/interop/headscale/build.sh" | tail -n 1) || die "building headscale failed (see above)"
  export KUBEDERP_HEADSCALE_BIN_DIR=$dir
}

# Sets KUBEDERP_PROMTOOL (Prometheus' promtool, pinned, built from the Go module proxy) for
# checking and unit-testing the chart's alert rules.
ensure_promtool() {
  step "promtool (cached in $KUBEDERP_CACHE/promtool)"
  local dir
  dir=$(bash "$repo/tools/promtool/build.sh" | tail -n 1) || die "building promtool failed (see above)"
  [ -x "$dir/promtool" ] || die "promtool missing in $dir after the build"
  export KUBEDERP_PROMTOOL=$dir/promtool
}

# Debian packages of the real-node tier (containerd, runc, CNI plugins) and of the image
# builds (buildah, skopeo), installed with apt-get when missing (about 30 s).
ensure_node_packages() {
  local missing=()
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  command -v buildah >/dev/null || missing+=(buildah)
  command -v skopeo >/dev/null || missing+=(skopeo)
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] ||
    missing+=(containernetworking-plugins)
  command -v gcc >/dev/null || missing+=(gcc libc6-dev)
  apt_install ${missing[@]+"${missing[@]}"}
}

# perf (Debian's linux-perf), for `scripts/bench --profile`, installed when missing.
ensure_perf() {
  command -v perf >/dev/null || apt_install linux-perf
}

# Installs the given Debian packages (none: nothing to do).
apt_install() {
  local missing=("$@")
  [ ${#missing[@]} = 0 ] && return 0
  step "installing Debian packages: ${missing[*]}"
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run 'apt-get install -y ${missing[*]}' as root"
  apt-get update -qq >&2 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
    die "apt-get install ${missing[*]} failed"
}
