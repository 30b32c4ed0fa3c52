#!/usr/bin/env bash
# Builds a loopback tailnet kit from tailscale.com v1.104.7 into a cache outside the repository:
#   tailscaled, tailscale   (tailscale.com/cmd/tailscaled, cmd/tailscale via go.mod `tool`)
#   tailnet-control         (./control: Tailscale's own tstest/integration/testcontrol on
#                            127.0.0.1, empty DERP map, traffic trap; see control/main.go)
# keyed by the version and a hash of go.mod, go.sum, the sources and this script.
#
# Idempotent: a warm cache costs one sha256sum; a missing or stale entry is rebuilt.
# Concurrent callers serialise on a lock file. Progress goes to stderr; the bin directory is
# the last line of stdout.
#
# tailscale.com v1.104.7 declares "go 1.27.4" (GOTOOLCHAIN=go1.27.4, fetched by the go
# command from the module proxy when not installed). The proxy does not serve a few of the
# exact pseudo-versions it pins (403); go.mod replaces them with the nearest served ones.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TS_VERSION=v1.104.7
TOOLCHAIN=go1.27.4
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}

log() { printf '[tailnet-build] %s\n' "$*" >&2; }

inputs=("$here/build.sh" "$here/go.mod" "$here/go.sum" "$here"/control/*.go)
sum=$(cat "${inputs[@]}" | sha256sum | cut -c1-12)
out="$cache_root/tailnet/$TS_VERSION-$sum"
bin="$out/bin"

if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found; install Go >= 1.24 (the polyglot machine has it)"; exit 1; }
mkdir -p "$cache_root/tailnet"
exec 9>"$cache_root/tailnet/.lock"
flock 9
if [ -f "$out/.complete" ]; then # another caller built it while we waited
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
start=$(date +%s)

export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod}
export GOCACHE=${GOCACHE:-$cache_root/go/build}
export GOTOOLCHAIN=$TOOLCHAIN CGO_ENABLED=0 GOFLAGS="-trimpath -mod=readonly"
unset GOOS GOARCH

# gvisor: tailscale.com v1.104.7 pins gvisor 20260915, which the proxy does not serve; the
# newest it serves (20260905, see go.mod) lacks stack.Options.ClockResolution, which
# wgengine/netstack/netstack.go sets on Windows only. The go command refuses overlays of
# module-cache files, so build against a copy of tailscale.com v1.104.7 (in the cache entry,
# not the repository) with that one Windows-only assignment removed: no change on Linux.
# -modfile points at go.mod + `replace tailscale.com => <copy>`; the committed go.mod stays
# the plain v1.104.7 requirement.
ts_src=$(cd "$here" && go mod download -json tailscale.com | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -d "$ts_src" ] || { log "error: cannot locate tailscale.com source in the module cache"; exit 1; }
ts_copy="$out/src/tailscale.com"
rm -rf "$out/src"
mkdir -p "$out/src"
cp -r "$ts_src" "$ts_copy"
chmod -R u+w "$ts_copy"
f="$ts_copy/wgengine/netstack/netstack.go"
sed -i 's|^\(\s*\)opts\.ClockResolution = 500 \* time\.Microsecond$|\1_ = 500 * time.Microsecond // kubederp: field missing in the gvisor the proxy serves|' "$f"
cmp -s "$ts_src/wgengine/netstack/netstack.go" "$f" && {
  log "error: patch did not apply to $f (tailscale.com or gvisor changed? revisit build.sh)"
  exit 1
}
cp "$here/go.mod" "$out/go.mod"
cp "$here/go.sum" "$out/go.sum"
printf '\nreplace tailscale.com => %s\n' "$ts_copy" >>"$out/go.mod"

build() { # name package [go build flags...]
  local name=$1 pkg=$2
  shift 2
  if [ -x "$bin/$name" ]; then return; fi
  log "building $name ($pkg, GOTOOLCHAIN=$TOOLCHAIN) ..."
  local t0; t0=$(date +%s)
  (cd "$here" && go build -modfile "$out/go.mod" -ldflags "-s -w" "$@" -o "$bin/$name.tmp" "$pkg") || {
    log "error: building $name failed; check access to the Go module proxy ('go env GOPROXY') and go.sum in $here"
    exit 1
  }
  mv "$bin/$name.tmp" "$bin/$name"
  log "built $name in $(( $(date +%s) - t0 ))s"
}

# Compiled out, so they cannot reach the internet whatever the control server says:
# captive-portal probes (they fall back to the built-in production DERP map) and the
# client-update check.
build tailscaled tailscale.com/cmd/tailscaled -tags ts_omit_captiveportal,ts_omit_clientupdate
build tailscale tailscale.com/cmd/tailscale
build tailnet-control ./control

got=$("$bin/tailscaled" --version | head -1)
case "$got" in
  "${TS_VERSION#v}"*) ;;
  *) log "error: tailscaled reports version $got, want $TS_VERSION"; exit 1 ;;
esac
touch "$out/.complete"
log "tailnet binaries ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
