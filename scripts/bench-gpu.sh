#!/usr/bin/env bash
# CUDA engine backend benchmark (issue 7): LoRA training tokens/s on a random
# Llama-3.2-1B-shaped model (bf16, rank 16 on all linear layers, batch 8 x 1024)
# with MFU against 790 TFLOP/s, and sampling throughput for 32 concurrent
# prompts, each against transformers + PEFT when importable. Needs a CUDA GPU;
# skips with a message otherwise. Prints figures and ratios, no pass/fail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SIGNAL_PYTHON:-/usr/bin/python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench-gpu: skipped: $PY has no CUDA device (torch.cuda.is_available() is false)"
  echo "bench-gpu: the CPU dry run is: $PY node/gpu/worker/bench.py --cpu-smoke"
  exit 0
fi
"$PY" node/gpu/worker/bench.py --device "${SIGNAL_GPU_DEVICE:-cuda:0}" "$@"
