#!/usr/bin/env bash
# Node and p2p figures (issue 6): session round trip over libp2p vs an
# in-process call; the whole network path (client → coordinator HTTP →
# node libp2p → back) vs the in-process call; node start → listed by the
# coordinator; node death → the run serving again on a testnet with the
# default timing; checkpoint upload to a real MinIO vs a raw PutObject of
# the same bytes. Prints figures and ratios; judges nothing. Needs
# $SIGNAL_MINIO_BIN (make minio) for the upload figures.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "== node / p2p benchmarks (loopback; noisy on a shared machine)"
$GO test -run '^$' -bench 'SessionInProcess|SessionOverLibp2p' -benchtime 3000x ./coordinator/p2p | tee -a "$out" | grep '^Benchmark' || true
$GO test -run '^$' -bench 'NodeStartToAdvert' -benchtime 5x ./coordinator/p2p | tee -a "$out" | grep '^Benchmark' || true
$GO test -run '^$' -bench 'CheckpointUploadMinIO|RawPutMinIO' -benchtime 3x ./coordinator/p2p | tee -a "$out" | grep '^Benchmark' || true
$GO test -run '^$' -bench 'NetworkPath' -benchtime 2000x ./testnet | tee -a "$out" | grep '^Benchmark' || true
$GO test -run '^$' -bench 'NodeDeathToServing' -benchtime 3x ./testnet | tee -a "$out" | grep '^Benchmark' || true

metric() { # benchmark-name unit → value
  awk -v b="$1" -v u="$2" 'index($1, b) == 1 && substr($1, length(b) + 1) ~ /^(-[0-9]+)?$/ { for (i = 2; i < NF; i++) if ($(i+1) == u) print $i }' "$out" | tail -1
}
inp50=$(metric BenchmarkSessionInProcess p50-µs); inp99=$(metric BenchmarkSessionInProcess p99-µs)
p2p50=$(metric BenchmarkSessionOverLibp2p p50-µs); p2p99=$(metric BenchmarkSessionOverLibp2p p99-µs)
listed=$(metric BenchmarkNodeStartToAdvert ms-to-listed)
up=$(metric BenchmarkCheckpointUploadMinIO MB/s); raw=$(metric BenchmarkRawPutMinIO MB/s)

echo
echo "== summary"
if [[ -n "$inp50" && -n "$p2p50" ]]; then
  awk -v a="$inp50" -v b="$p2p50" -v c="$inp99" -v d="$p2p99" 'BEGIN {
    printf "session call (no-op forward_backward): in-process p50 %.0f µs p99 %.0f µs; over libp2p p50 %.0f µs p99 %.0f µs\n", a, c, b, d
    printf "  added by the network path: p50 %.2f ms (goal < 2 ms, coordinator HTTP hop not included)\n", (b - a) / 1000 }'
fi
[[ -n "$listed" ]] && echo "node start → listed by the coordinator: ${listed} ms"
if [[ -n "$up" && -n "$raw" ]]; then
  awk -v u="$up" -v r="$raw" 'BEGIN { printf "checkpoint upload to MinIO %.1f MB/s vs raw PutObject %.1f MB/s: %.0f%% (goal >= 80%%)\n", u, r, 100 * u / r }'
else
  echo "checkpoint upload: skipped (no MinIO binary; make minio)"
fi
for n in 1 3; do
  b="BenchmarkNetworkPath/coordinators=$n"
  a=$(metric "$b" added-p50-ms)
  [[ -n "$a" ]] && echo "forward_backward client → coordinator (HTTP, $n member(s), charge committed) → node (libp2p) → back: p50 $(metric "$b" net-p50-µs) µs p99 $(metric "$b" net-p99-µs) µs; in-process p50 $(metric "$b" inproc-p50-µs) µs; added p50 ${a} ms (goal < 2 ms)"
done
for v in calling idle; do
  b="BenchmarkNodeDeathToServing/$v"
  s=$(metric "$b" s-to-serving)
  [[ -n "$s" ]] && awk -v v="$v" -v m="$(metric "$b" s-to-moved)" -v s="$s" 'BEGIN {
    printf "node killed (%s), default timing: run moved after %.2f s, serving again after %.2f s (goal < 10 s: %.0f%% of it)\n", v, m, s, 10 * s }'
done
echo "  (a node that dies silently, sockets left open, is unlisted after NodeTTL 6 s and moved NodeLostAfter 2 s later: ≤ 8 s + the move)"
