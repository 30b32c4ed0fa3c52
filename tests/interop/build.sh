#!/usr/bin/env bash
# Builds the Go interop binaries into a cache outside the repository:
#   derpinterop-v1.82.5, derpinterop-v1.104.7  (tests/interop/src against each tailscale.com)
#   derper-v1.82.5, derper-v1.104.7            (upstream tailscale.com/cmd/derper)
# keyed by the versions and a hash of every go.mod/go.sum/source file and this script.
#
# Idempotent: a warm cache costs well under a second (one sha256sum); a missing or stale
# entry is rebuilt. Concurrent callers serialise on a lock file. Progress goes to stderr;
# the bin directory is the last line of stdout.
#
# Toolchains (fetched by the go command from the Go module proxy when not installed):
#   v1.82.5 sources build with go1.26.8; tailscale.com v1.104.7 declares "go 1.27.4", so
#   everything built against it uses GOTOOLCHAIN=go1.27.4.
# Upstream derper v1.104.7 cannot be built with a bare `go install ...@v1.104.7` here: its
# go.mod pins github.com/tailscale/setec v0.0.0-20260824224040-f8d7a936837c, which the
# module proxy does not serve (403). derper-latest/go.mod builds the same main package with
# setec replaced by the newest version the proxy has (only used for -secrets-url).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TS_OLD=v1.82.5
TS_NEW=v1.104.7
export GOTOOLCHAIN_OLD=go1.26.8
export GOTOOLCHAIN_NEW=go1.27.4
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}

log() { printf '[interop-build] %s\n' "$*" >&2; }

inputs=(
  "$here/build.sh"
  "$here"/src/*.go
  "$here/v1.82.5/go.mod" "$here/v1.82.5/go.sum" "$here/v1.82.5/compat.go"
  "$here/latest/go.mod" "$here/latest/go.sum" "$here/latest/compat.go"
  "$here/derper-latest/go.mod" "$here/derper-latest/go.sum"
)
sum=$(cat "${inputs[@]}" | sha256sum | cut -c1-12)
out="$cache_root/interop/$TS_OLD-$TS_NEW-$sum"
bin="$out/bin"

if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found; install Go >= 1.24 (the polyglot machine has it)"; exit 1; }
mkdir -p "$cache_root/interop"
exec 9>"$cache_root/interop/.lock"
flock 9
if [ -f "$out/.complete" ]; then # another caller built it while we waited
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
start=$(date +%s)

export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod}
export GOCACHE=${GOCACHE:-$cache_root/go/build}
export CGO_ENABLED=0 GOFLAGS="-trimpath -mod=readonly"
unset GOOS GOARCH

build() { # name toolchain dir ldflags go-build-args...
  local name=$1 tc=$2 dir=$3
  shift 3
  if [ -x "$bin/$name" ]; then return; fi
  log "building $name (GOTOOLCHAIN=$tc) ..."
  local t0; t0=$(date +%s)
  (cd "$dir" && GOTOOLCHAIN=$tc go build -ldflags "-s -w" -o "$bin/$name.tmp" "$@") || {
    log "error: building $name failed; check access to the Go module proxy ('go env GOPROXY') and the go.sum in $dir"
    exit 1
  }
  mv "$bin/$name.tmp" "$bin/$name"
  log "built $name in $(( $(date +%s) - t0 ))s"
}

# ts_debug_websockets compiles derphttp's WebSocket dialer into the client (see
# src/exchange.go for how each transport is selected).
build "derpinterop-$TS_OLD" "$GOTOOLCHAIN_OLD" "$here/v1.82.5" -tags ts_debug_websockets .
build "derpinterop-$TS_NEW" "$GOTOOLCHAIN_NEW" "$here/latest" -tags ts_debug_websockets .
build "derper-$TS_NEW" "$GOTOOLCHAIN_NEW" "$here/derper-latest" tailscale.com/cmd/derper

if [ ! -x "$bin/derper-$TS_OLD" ]; then
  log "building derper-$TS_OLD (go install tailscale.com/cmd/derper@$TS_OLD) ..."
  t0=$(date +%s)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && GOFLAGS=-trimpath GOBIN="$tmp" GOTOOLCHAIN=$GOTOOLCHAIN_OLD \
    go install -ldflags "-s -w" "tailscale.com/cmd/derper@$TS_OLD") || {
    log "error: go install tailscale.com/cmd/derper@$TS_OLD failed; check access to the Go module proxy"
    exit 1
  }
  mv "$tmp/derper" "$bin/derper-$TS_OLD"
  log "built derper-$TS_OLD in $(( $(date +%s) - t0 ))s"
fi

for v in "$TS_OLD" "$TS_NEW"; do
  [ -x "$bin/derper-$v" ] || { log "error: $bin/derper-$v missing after build"; exit 1; }
  got=$("$bin/derpinterop-$v" version | sed -n 's/.*"tailscale_version": "\(.*\)".*/\1/p')
  [ "$got" = "$v" ] || { log "error: derpinterop-$v reports tailscale.com $got"; exit 1; }
done
touch "$out/.complete"
log "interop binaries ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
