#!/usr/bin/env bash
# Runs Shoal's whole test suite on this machine (as root): unit tests, in-process gRPC and swarm
# tests, and end-to-end tests with real containerd, docker-registry, FUSE and network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run as root: the end-to-end tests start containerd and mount filesystems" >&2
  exit 1
fi
scripts/install-deps.sh
cargo build --locked --workspace --bins
cargo nextest run --locked --workspace --no-fail-fast "$@"
