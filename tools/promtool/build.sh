#!/usr/bin/env bash
# Builds promtool (Prometheus's rule checker and rule unit-test runner) from the Go module proxy
# into a cache outside the repository, keyed by the pinned version and a hash of this script.
# scripts/test uses it to check and unit-test the chart's alert rules.
#
# Idempotent: a warm cache costs well under a second; a missing entry is rebuilt. Concurrent
# callers serialise on a lock file. Progress goes to stderr; the bin directory is the last line
# of stdout.
#
# github.com/prometheus/prometheus is published on the module proxy as v0.3xx.y (Prometheus
# 3.x.y); its go.mod has no replace or exclude directives, so `go install …@version` builds
# cmd/promtool with exactly the dependency versions of that release's go.sum.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROM_MODULE_VERSION=v0.316.0
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}
sum=$(sha256sum < "$here/build.sh" | cut -c1-12)
out="$cache_root/promtool/$PROM_MODULE_VERSION-$sum"
bin="$out/bin"

log() { printf '[promtool-build] %s\n' "$*" >&2; }

if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found; install Go >= 1.26 (the polyglot machine has it)"; exit 1; }
mkdir -p "$cache_root/promtool"
exec 9>"$cache_root/promtool/.lock"
flock 9
if [ -f "$out/.complete" ]; then # another caller built it while we waited
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
start=$(date +%s)

export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod}
export GOCACHE=${GOCACHE:-$cache_root/go/build}
# The release's go.mod says "go 1.26.7": the installed go1.26.8 builds it.
export CGO_ENABLED=0 GOFLAGS="-trimpath" GOTOOLCHAIN=local
unset GOOS GOARCH

log "building promtool (github.com/prometheus/prometheus/cmd/promtool@$PROM_MODULE_VERSION) ..."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && GOBIN="$tmp" go install -ldflags "-s -w" \
  "github.com/prometheus/prometheus/cmd/promtool@$PROM_MODULE_VERSION") || {
  log "error: go install promtool@$PROM_MODULE_VERSION failed; check access to the Go module proxy ('go env GOPROXY')"
  exit 1
}
mv "$tmp/promtool" "$bin/promtool"
"$bin/promtool" --help >/dev/null || { log "error: $bin/promtool does not run"; exit 1; }
touch "$out/.complete"
log "promtool ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
