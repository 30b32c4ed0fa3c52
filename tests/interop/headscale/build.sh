#!/usr/bin/env bash
# Builds headscale (github.com/juanfont/headscale ./cmd/headscale) at a pinned version into a
# cache outside the repository, keyed by the version and a hash of this script.
#
# The Go module proxy serves exactly this version and refuses to list versions, so
# `go install …@vX` cannot resolve it; instead download that exact module, copy it to a
# writable directory in the cache entry and build ./cmd/headscale with the module's own
# go.mod/go.sum (-mod=readonly: nothing is re-resolved).
#
# Idempotent: a warm cache costs one sha256sum; a missing entry is rebuilt. Concurrent callers
# serialise on a lock file. Progress goes to stderr; the bin directory is the last line of
# stdout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HS_MODULE=github.com/juanfont/headscale
HS_VERSION=v0.29.2
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}

log() { printf '[headscale-build] %s\n' "$*" >&2; }

sum=$(sha256sum <"$here/build.sh" | cut -c1-12)
out="$cache_root/headscale/$HS_VERSION-$sum"
bin="$out/bin"

if [ -f "$out/.complete" ]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { log "error: 'go' not found; install Go >= 1.26"; exit 1; }
mkdir -p "$cache_root/headscale"
exec 9>"$cache_root/headscale/.lock"
flock 9
if [ -f "$out/.complete" ]; then # another caller built it while we waited
  echo "$bin"
  exit 0
fi
start=$(date +%s)

export GOMODCACHE=${GOMODCACHE:-$cache_root/go/mod}
export GOCACHE=${GOCACHE:-$cache_root/go/build}
export CGO_ENABLED=0 GOFLAGS="-trimpath -mod=readonly"
# headscale v0.29.2's go.mod says "go 1.26.4": the installed Go (1.26.8 here) builds it.
export GOTOOLCHAIN=local
unset GOOS GOARCH

log "downloading $HS_MODULE@$HS_VERSION ..."
# Run outside any module so the download does not touch a go.mod.
src=$(cd "$cache_root/headscale" && GOFLAGS=-mod=mod go mod download -json "$HS_MODULE@$HS_VERSION" |
  sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || {
  log "error: cannot download $HS_MODULE@$HS_VERSION; check access to the Go module proxy ('go env GOPROXY')"
  exit 1
}
rm -rf "$out"
mkdir -p "$out/src" "$bin"
# The module is ~370 MB, almost all of it policy test data: copy it without testdata/.
(cd "$src" && tar --exclude=testdata -cf - .) | (cd "$out/src" && tar -xf -)
chmod -R u+w "$out/src"

log "building headscale $HS_VERSION (go $(go env GOVERSION)) ..."
(cd "$out/src" && go build -ldflags "-s -w" -o "$bin/headscale.tmp" ./cmd/headscale) || {
  log "error: building headscale failed; check access to the Go module proxy ('go env GOPROXY')"
  exit 1
}
mv "$bin/headscale.tmp" "$bin/headscale"
rm -rf "$out/src" # the module cache keeps the source; the entry keeps only the binary

# Built from a copy, the binary reports version "(devel)": check that it runs at all.
"$bin/headscale" version >/dev/null 2>&1 || { log "error: $bin/headscale does not run"; exit 1; }
touch "$out/.complete"
log "headscale ready in $bin ($(( $(date +%s) - start ))s)"
echo "$bin"
