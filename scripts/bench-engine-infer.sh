#!/usr/bin/env bash
# Engine inference benchmark (issue 3): prefill and decode tokens/s of the Go
# engine against the PyTorch reference (trainer/reference/llama_ref.py) on the
# same shapes, in the same run, both with 2 threads; the tiny test models and a
# SmolLM-135M-shaped random model (generated once into .cache/bench). Prints
# figures and ratios; no pass/fail. Figures are noisy on a shared machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SIGNAL_PYTHON:-/usr/bin/python3}
BIN=${SIGNAL_BIN:-bin/signal}
THREADS=${BENCH_THREADS:-2}
if [ ! -x "$BIN" ]; then
  mkdir -p bin && go build -o bin/signal ./cmd/signal
  BIN=bin/signal
fi
CACHE=.cache/bench
if [ ! -f "$CACHE/smollm-135m/model.safetensors" ]; then
  mkdir -p "$CACHE"
  "$BIN" model gen-random --shape smollm-135m --seed 1 --out "$CACHE/smollm-135m" >/dev/null
fi

# bench NAME DIR PREFILL DECODE BATCH REPEATS [TORCH_THREADS]
bench() {
  local name=$1 dir=$2 pre=$3 dec=$4 batch=$5 rep=$6 tt=${7:-$THREADS}
  local go py
  go=$("$BIN" model bench-infer --model "$dir" --threads "$THREADS" --prefill-tokens "$pre" \
        --decode-tokens "$dec" --decode-batch "$batch" --repeats "$rep")
  py=$(printf '{"cmd":"bench","model":"%s","threads":%d,"prefill_tokens":%d,"decode_tokens":%d,"decode_batch":%d,"repeats":%d}' \
        "$dir" "$tt" "$pre" "$dec" "$batch" "$rep" | "$PY" trainer/reference/llama_ref.py)
  "$PY" - "$name" "$pre" "$dec" "$batch" "$go" "$py" "$tt" <<'PYEOF'
import json, sys
name, pre, dec, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
g, p = json.loads(sys.argv[5]), json.loads(sys.argv[6])
name += " (torch %s thr)" % sys.argv[7]
print("%-26s prefill %4s tok: go %8.1f tok/s  torch %8.1f tok/s  ratio %5.2fx | go %.1f GFLOP/s = %.0f%% of sgemm %.1f GFLOP/s"
      % (name, pre, g["prefill_tokens_per_s"], p["prefill_tokens_per_s"],
         g["prefill_tokens_per_s"] / p["prefill_tokens_per_s"], g["prefill_gflops"],
         100 * g["prefill_fraction_of_sgemm"], g["sgemm_gflops"]))
print("%-26s decode  %4s tok x batch %s: go %8.1f tok/s  torch %8.1f tok/s  ratio %5.2fx"
      % (name, dec, batch, g["decode_tokens_per_s"], p["decode_tokens_per_s"],
         g["decode_tokens_per_s"] / p["decode_tokens_per_s"]))
PYEOF
}

echo "== engine inference: Go engine vs PyTorch $("$PY" -c 'import torch; print(torch.__version__)'), $THREADS threads each (load: $(cut -d' ' -f1-3 /proc/loadavg))"
bench tiny-sp trainer/testdata/tiny-sp 128 32 1 3
bench tiny-bl trainer/testdata/tiny-bl 128 32 1 3
bench smollm-135m "$CACHE/smollm-135m" 128 16 1 2
bench smollm-135m "$CACHE/smollm-135m" 128 16 4 2
# PyTorch's OpenMP pool suffers most when the machine is oversubscribed; a
# 1-thread PyTorch run gives the conservative ratio.
bench smollm-135m "$CACHE/smollm-135m" 128 16 1 2 1
