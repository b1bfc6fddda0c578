#!/usr/bin/env bash
# GPU device check for the CUDA engine backend (issue 7).
#
#   scripts/gpu-check.sh build        here: build the Go binaries (CGO, OpenBLAS) into bin/gpu-check/
#   scripts/gpu-check.sh run          on the GPU machine (PyTorch + CUDA, no network), from the repo
#                                     root: NVML fingerprint, worker agreement tests on cuda:0, the
#                                     training/sampling benchmark; results under $OUT
#   scripts/gpu-check.sh --cpu-smoke  here: build, then run every step on the CPU with a tiny shape
#
# The device tool copies the working tree; pass carry=["bin/gpu-check.tgz"] so the prebuilt
# binaries (and the OpenBLAS libraries they link) travel with it (~33 MB compressed). Total run
# time is kept under ~8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/bin/gpu-check
MODE=${1:-run}
OUT=${OUT:-${TMPDIR:-/tmp}/signal-gpu-check}
mkdir -p "$OUT"

log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

build() {
  mkdir -p "$BIN/lib"
  log "building signal and the node/gpu test binary (CGO, OpenBLAS)"
  CGO_ENABLED=1 go build -ldflags "-s -w" -o "$BIN/signal" ./cmd/signal || return 1
  CGO_ENABLED=1 go test -c -ldflags "-s -w" -o "$BIN/gpu.test" ./node/gpu || return 1
  # The GPU machine may lack OpenBLAS: ship the shared libraries the binaries need.
  for l in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    p=$(ldconfig -p | awk -v l="$l" '$1 == l {print $NF; exit}')
    [ -n "$p" ] && cp -L "$p" "$BIN/lib/$l"
  done
  # The device tool carries at most 64 MiB: ship one compressed archive.
  tar czf "$ROOT/bin/gpu-check.tgz" -C "$ROOT/bin" gpu-check
  log "carry bin/gpu-check.tgz: $(du -h "$ROOT/bin/gpu-check.tgz" | cut -f1)"
}

pick_python() {
  if [ -n "${SIGNAL_PYTHON:-}" ]; then echo "$SIGNAL_PYTHON"; return; fi
  for p in python3 /usr/bin/python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null; then command -v "$p"; return; fi
  done
  echo /usr/bin/python3
}

run_checks() {
  local device=$1 bench_args=$2
  local PY; PY=$(pick_python)
  export SIGNAL_PYTHON=$PY
  export LD_LIBRARY_PATH="$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  log "python: $PY  device: $device"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$OUT/summary.txt"
  command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

  # 1. NVML fingerprint (the node helper's `signal node fingerprint`).
  if "$BIN/signal" node fingerprint --help >/dev/null 2>&1; then
    timeout 60 "$BIN/signal" node fingerprint > "$OUT/fingerprint.json" 2>&1
    log "fingerprint rc=$? -> fingerprint.json: $(head -c 400 "$OUT/fingerprint.json" | tr '\n' ' ')"
  else
    log "fingerprint: this build has no 'signal node fingerprint' subcommand yet"
  fi

  # 1b. The worker under the Go supervisor on the device, and the backend a node would advertise.
  SIGNAL_PYTHON=$PY timeout 120 "$BIN/signal" gpu check --device "$device" --timeout 100s > "$OUT/gpu-check.json" 2>&1
  log "signal gpu check rc=$? : $(grep -E '"(backend|nvml_gpus|gpu_name|memory_total)"' "$OUT/gpu-check.json" | tr -s ' \n' ' ')"

  # 2. The worker's own tests on the device (bf16 on cuda against f32 on the CPU, plus
  #    everything else on the CPU).
  (cd node/gpu/worker && SIGNAL_WORKER_DEVICE=$device timeout 180 "$PY" -m unittest discover -s tests -v) \
    > "$OUT/worker-tests.txt" 2>&1
  log "worker unittest (SIGNAL_WORKER_DEVICE=$device) rc=$? : $(tail -1 "$OUT/worker-tests.txt")"
  grep -h "^device " "$OUT/worker-tests.txt" | tee -a "$OUT/summary.txt"

  # 3. Agreement with the native Go engine through the supervisor: the worker on the device in
  #    f32 (strict tolerances), then the session lifecycle in the device's default dtype.
  (cd node/gpu && SIGNAL_GPU_DEVICE=$device SIGNAL_GPU_DTYPE=float32 timeout 240 "$BIN/gpu.test" \
      -test.run 'TestAgreementWithNativeEngine' -test.v -test.count=1) > "$OUT/agreement.txt" 2>&1
  log "native agreement (worker on $device, f32) rc=$? : $(grep -E '^(ok|PASS|FAIL|--- )' "$OUT/agreement.txt" | tr '\n' ' ')"
  grep -h "loss_sum\|grad_norm" "$OUT/agreement.txt" | tee -a "$OUT/summary.txt"
  (cd node/gpu && SIGNAL_GPU_DEVICE=$device timeout 120 "$BIN/gpu.test" \
      -test.run 'TestEngineSessionLifecycle|TestSupervisorRestartsCrashedWorker' -test.v -test.count=1) > "$OUT/engine.txt" 2>&1
  log "engine lifecycle + restart on $device rc=$? : $(grep -E '^(ok|PASS|FAIL|--- )' "$OUT/engine.txt" | tr '\n' ' ')"

  # 4. Benchmark: LoRA training tokens/s (Llama-3.2-1B shape, bf16, rank 16, all linear layers,
  #    8 x 1024) and sampling throughput for 32 prompts, against transformers + PEFT if importable.
  timeout 300 "$PY" node/gpu/worker/bench.py $bench_args --out "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  log "bench rc=$?"
  "$PY" - "$OUT/bench.json" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("bench: no result:", e); sys.exit(0)
st, ss = r["signal_train"], r["signal_sample"]
print(f"signal train: {st['tokens_per_s']:.0f} tok/s, step {st['step_s']*1000:.1f} ms, MFU {st['mfu_vs_790tflops']*100:.1f}% of 790 TFLOP/s, peak mem {st['peak_mem_bytes']/2**30:.1f} GiB")
print(f"signal sample: {ss['tokens_per_s']:.0f} tok/s for {ss['prompts']} prompts")
if "hf_train" in r:
    ht, hs = r["hf_train"], r["hf_sample"]
    print(f"HF+PEFT train: {ht['tokens_per_s']:.0f} tok/s (MFU {ht['mfu_vs_790tflops']*100:.1f}%); ratio signal/HF {r['train_ratio_signal_over_hf']:.2f}x")
    print(f"HF+PEFT sample: {hs['tokens_per_s']:.0f} tok/s; ratio signal/HF {r['sample_ratio_signal_over_hf']:.2f}x  {r.get('hf_versions')}")
    print(f"first-step loss signal {st['loss_first']:.4f} HF {ht['loss_first']:.4f} (same weights and data)")
else:
    print("HF+PEFT:", r.get("hf"))
EOF
}

case "$MODE" in
  build)
    build ;;
  run)
    if [ ! -x "$BIN/gpu.test" ] && [ -f "$ROOT/bin/gpu-check.tgz" ]; then
      tar xzf "$ROOT/bin/gpu-check.tgz" -C "$ROOT/bin"
    fi
    [ -x "$BIN/gpu.test" ] || { command -v go >/dev/null && build; } || { log "no binaries in $BIN and no Go: run 'scripts/gpu-check.sh build' here first and carry bin/gpu-check.tgz"; exit 1; }
    run_checks cuda:0 "--device cuda:0" ;;
  --cpu-smoke)
    build || exit 1
    run_checks cpu "--cpu-smoke" ;;
  *)
    echo "usage: $0 build | run | --cpu-smoke" >&2; exit 2 ;;
esac
log "results in $OUT"
