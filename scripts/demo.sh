#!/usr/bin/env bash
# Shoal's main job on one machine, with embedded defaults: a local registry with a demo image
# (converted to eStargz with `shoal convert`), a tracker, a seed and two nodes each with its own
# containerd; each node starts the container lazily (`shoal pull` + `ctr run --snapshotter
# shoal`), a third containerd pulls the plain image the usual way, and a report compares start
# times and says where the bytes came from. Tidies up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the demo starts containerd and runs containers" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --locked --release --workspace --bins
SHOAL_BIN="$PWD/target/release/shoal" target/release/shoal-bench demo "$@"
