#!/usr/bin/env bash
# Installs what Shoal's demo, tests and benchmarks need on Debian/Ubuntu (as root).
# Idempotent: packages already present are skipped.
set -euo pipefail

packages=(containerd runc docker-registry fuse3 protobuf-compiler skopeo umoci busybox-static
          iproute2 aria2 opentracker mktorrent fio curl ca-certificates gcc)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
