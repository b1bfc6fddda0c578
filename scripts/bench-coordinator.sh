#!/usr/bin/env bash
# Committed charges per second and p50/p99 latency on a 3-coordinator raft
# cluster over loopback (in-process, fsync'd logs, production raft timing),
# with 1 and 64 concurrent clients, for both raft log stores (raft-wal, the
# default for fresh data dirs, and raft-boltdb), against the issue's anchors;
# then one member's FSM cost per charge, and the whole billed HTTP path of a
# realistic forward_backward (calls/s, p99, raft log and snapshot bytes per
# call, with and without an Idempotency-Key). Prints figures, no pass/fail.
#   SIGNAL_BENCH_BILLED     billed calls per run (default 2000)
#   SIGNAL_BENCH_CHARGES    charges per 64-client run (default 20000)
#   SIGNAL_BENCH_CHARGES_1  charges per 1-client run (default 2000)
#   SIGNAL_BENCH_INFLIGHT   raft entries the leader keeps committing at once
set -euo pipefail
cd "$(dirname "$0")/.."
N=${SIGNAL_BENCH_CHARGES:-20000}
N1=${SIGNAL_BENCH_CHARGES_1:-2000}
run() { local o; o=$(go test ./coordinator -run '^$' -bench "$1" -benchtime "$2" -count 1 2>&1) || { echo "$o" >&2; exit 1; }; echo "$o"; }
out=$(run 'BenchmarkCommittedCharges/log=.*/clients=64$' "${N}x")
out1=$(run 'BenchmarkCommittedCharges/log=.*/clients=1$' "${N1}x")
fsm=$(run 'BenchmarkApplyChargeBatch$' 2000x)
billed=$(run 'BenchmarkBilledCalls' "${SIGNAL_BENCH_BILLED:-2000}x")
printf '%s\n%s\n' "$out1" "$out" | grep -E '^Benchmark' | awk '
{
  name=$1; store=name; sub(/.*log=/, "", store); sub(/\/.*/, "", store)
  clients=name; sub(/.*clients=/, "", clients); sub(/-.*/, "", clients)
  for (i = 1; i <= NF; i++) {
    if ($(i+1) == "charges/s") cps = $i
    if ($(i+1) == "p50_ms") p50 = $i
    if ($(i+1) == "p99_ms") p99 = $i
    if ($(i+1) == "max_ms") mx = $i
  }
  printf "log=%-4s clients=%-3s %9.0f charges/s   p50 %7.2f ms   p99 %7.2f ms   max %7.2f ms\n", store, clients, cps, p50, p99, mx
  if (clients == 64) {
    c64[store] = cps
    printf "  vs Consul 0.7 (3,780 w/s, p99 49 ms): %.2fx throughput, %.2fx p99\n", cps/3780, p99/49
    printf "  vs etcd 3.2 (~44,000 w/s, 1,000 clients): %.2fx throughput\n", cps/44000
    printf "  vs goal (>= 10,000/s, p99 < 20 ms): %.2fx throughput, %.2fx p99\n", cps/10000, p99/20
  }
}
END { if (c64["bolt"] > 0) printf "64 clients, raft-wal vs raft-boltdb log: %.2fx throughput\n", c64["wal"]/c64["bolt"] }'
echo "$fsm" | awk '/^BenchmarkApplyChargeBatch/ { for (i = 1; i <= NF; i++) { if ($(i+1) == "ns/charge") ns = $i; if ($(i+1) == "B/op") bop = $i }
  printf "FSM apply (one member, 64-charge batches): %.0f ns/charge, %.0f B/charge\n", ns, bop/64 }'
echo "$billed" | awk '/^BenchmarkBilledCalls/ { name=$1; sub(/.*idempotency_key=/, "", name); sub(/-.*/, "", name)
  for (i = 1; i <= NF; i++) { if ($(i+1) == "calls/s") cps = $i; if ($(i+1) == "p99_ms") p99 = $i; if ($(i+1) == "log_B/call") lb = $i; if ($(i+1) == "snap_B/call") sb = $i; if ($(i+1) == "answer_B") ab = $i }
  printf "billed forward_backward (4x256, %d-byte node answer), Idempotency-Key %-5s: %6.0f calls/s  p99 %6.2f ms  raft log %6.0f B/call  snapshot %6.0f B/call\n", ab, name, cps, p99, lb, sb }'
echo "(machine: $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg); figures from a shared machine are noisy: the disk's fsync tail and CPU contention from other work move p99 most)"
