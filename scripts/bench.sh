#!/usr/bin/env bash
# make bench: runs every scripts/bench-*.sh in turn; each prints its own figures and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
found=0
for s in scripts/bench-*.sh; do
  found=1
  echo "=== $s"
  bash "$s"
done
[ "$found" = 1 ] || echo "no benchmarks yet"
