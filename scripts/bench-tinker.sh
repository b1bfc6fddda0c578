#!/usr/bin/env bash
# Tinker door figures (issue 19): the step latency (forward_backward +
# optim_step) the tinker SDK sees over a testnet of 3 coordinators and 2
# nodes, pipelined, against Signal's /v1 path from its Python SDK (one
# call after the other, and both in one pipeline round trip) and against
# the in-process engine on the same model and batch; and the memory 1,000
# queued calls hold. Prints figures and ratios; judges
# nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
BIN=${BIN:-bin/signal}
STEPS=${STEPS:-20}
PY=$(scripts/pyenv.sh)
dir=$(mktemp -d)
"$BIN" testnet --in-process --coordinators 3 --nodes 2 --dir "$dir" >/dev/null 2>"$dir/testnet.log" &
net=$!
trap 'kill $net 2>/dev/null; wait $net 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 180); do [ -f "$dir/testnet.json" ] && break; sleep 1; done
[ -f "$dir/testnet.json" ] || { tail -20 "$dir/testnet.log"; exit 1; }

echo "== step latency, 1 × 31 tokens, rank 4, signal-tiny (median of $STEPS; load $(cut -d' ' -f1 /proc/loadavg))"
net_json=$("$PY" -W ignore scripts/tinker_bench.py "$dir/testnet.json" "$STEPS")
local_json=$("$BIN" model bench --model "$dir/models/signal-tiny" --batch 1 --seq 31 --rank 4 --steps "$STEPS" 2>/dev/null)
"$PY" - "$net_json" "$local_json" <<'PYEOF'
import json, sys
n, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
st = sorted(l["train"]["StepSeconds"])
local_ms = 1000 * st[len(st) // 2]
t, v, p = n["tinker_pipelined_ms"], n["v1_sync_ms"], n["v1_pipeline_ms"]
print(f"tinker SDK over /api/v1, pipelined: {t:8.1f} ms/step")
print(f"Signal Python SDK over /v1, sync:   {v:8.1f} ms/step   (tinker/v1 {t / v:.2f}x)")
print(f"Signal Python SDK, train_step:      {p:8.1f} ms/step   (one round trip; v1 sync/pipeline {v / p:.2f}x)")
print(f"in-process engine:                  {local_ms:8.1f} ms/step   (tinker/in-process {t / local_ms:.1f}x)")
PYEOF

echo "== futures memory"
$GO test -run '^$' -bench 'TinkerFutures' -benchtime 1x ./coordinator | grep '^Benchmark' || true
