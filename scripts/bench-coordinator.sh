#!/usr/bin/env bash
# Committed charges per second and p50/p99 latency on a 3-coordinator raft
# cluster over loopback (in-process, fsync'd raft-boltdb logs), with 1 and 64
# concurrent clients, against the issue's anchors. Prints figures, no pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${SIGNAL_BENCH_CHARGES:-20000}
out=$(go test ./coordinator -run '^$' -bench 'BenchmarkCommittedCharges' -benchtime "${N}x" -count 1 2>&1) || { echo "$out"; exit 1; }
echo "$out" | grep -E '^Benchmark' | awk '
{
  clients=$1; sub(/.*clients=/, "", clients); sub(/-.*/, "", clients)
  for (i = 1; i <= NF; i++) {
    if ($(i+1) == "charges/s") cps = $i
    if ($(i+1) == "p50_ms") p50 = $i
    if ($(i+1) == "p99_ms") p99 = $i
  }
  printf "clients=%-3s %9.0f charges/s   p50 %7.2f ms   p99 %7.2f ms\n", clients, cps, p50, p99
  if (clients == 64) {
    printf "  vs Consul 0.7 (3,780 w/s, p99 49 ms): %.2fx throughput, %.2fx p99\n", cps/3780, p99/49
    printf "  vs etcd 3.2 (~44,000 w/s, 1,000 clients): %.2fx throughput\n", cps/44000
    printf "  vs goal (>= 10,000/s, p99 < 20 ms): %.2fx throughput, %.2fx p99\n", cps/10000, p99/20
  }
}'
echo "(machine: $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg); figures from a shared machine are noisy)"
