#!/usr/bin/env bash
# Builds the real-node tier's pause image: pause.c compiled with `gcc -static` into a FROM
# scratch OCI archive (buildah, vfs storage in a temp dir), cached in $KUBEDERP_CACHE/pause/
# keyed by the source hash. Prints the archive path on its last stdout line.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${KUBEDERP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubederp}
REF=localhost/kubederp/pause:1
sum=$(cat "$here/pause.c" "$here/pause.sh" | sha256sum | cut -c1-12)
out="$cache_root/pause/$sum"
archive="$out/pause.oci.tar"
if [ -f "$archive" ]; then echo "$archive"; exit 0; fi
command -v gcc >/dev/null || { echo "pause: gcc not found (apt-get install gcc libc6-dev)" >&2; exit 1; }
command -v buildah >/dev/null || { echo "pause: buildah not found (apt-get install buildah)" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/rootfs"
gcc -static -Os -s -o "$tmp/rootfs/pause" "$here/pause.c"
bh=(buildah --storage-driver vfs --root "$tmp/root" --runroot "$tmp/run")
ctr=$("${bh[@]}" from --format oci scratch)
"${bh[@]}" copy --chown 0:0 "$ctr" "$tmp/rootfs/pause" /pause >/dev/null
"${bh[@]}" config --entrypoint '["/pause"]' --cmd '' --user 65535:65535 --os linux --arch amd64 "$ctr"
"${bh[@]}" commit --quiet --format oci --rm "$ctr" "oci-archive:$archive.tmp:$REF" >/dev/null
mv "$archive.tmp" "$archive"
echo "pause: $REF -> $archive ($(stat -c %s "$archive") bytes)" >&2
echo "$archive"
