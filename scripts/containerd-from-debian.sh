#!/bin/sh
# Unpacks the containerd of a Debian suite (trixie: 1.7, sid: 2.x) into DIR, to run Shoal's
# containerd tests and benchmarks against it without installing it:
#
#   scripts/containerd-from-debian.sh sid /opt/containerd-sid
#   PATH=/opt/containerd-sid/usr/bin:$PATH cargo nextest run -p shoal-integration
#
# The test harness uses the `containerd`, `ctr` and shim found first in PATH and writes a
# config that version understands. The binaries are static Go programs; runc stays Debian 12's.
set -eu
suite=${1:?usage: $0 SUITE DIR (SUITE: trixie, sid, ...)}
dir=${2:?usage: $0 SUITE DIR}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
arch=$(dpkg --print-architecture)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fsS "$mirror/dists/$suite/main/binary-$arch/Packages.xz" | xz -d >"$tmp/Packages"
file=$(awk '/^Package: /{p = ($2 == "containerd")} p && /^Filename: /{print $2; exit}' "$tmp/Packages")
[ -n "$file" ] || { echo "no containerd package in $suite" >&2; exit 1; }
sha=$(awk '/^Package: /{p = ($2 == "containerd")} p && /^SHA256: /{print $2; exit}' "$tmp/Packages")
curl -fsS -o "$tmp/containerd.deb" "$mirror/$file"
echo "$sha  $tmp/containerd.deb" | sha256sum -c --quiet
mkdir -p "$dir"
dpkg-deb -x "$tmp/containerd.deb" "$dir"
"$dir/usr/bin/containerd" --version
