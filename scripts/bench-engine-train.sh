#!/usr/bin/env bash
# LoRA training step (forward_backward + optim_step) of the native Go engine
# against the PyTorch autograd reference (trainer/reference/train_ref.py), same
# shapes, same threads, rank 8 on all seven linear layers, in one run:
#   tiny-sp at 8 x 128; the SmolLM-135M shape at 1 x 256 and 4 x 256.
# Also: the machine's sgemm rate, model FLOP utilisation, peak memory, and the
# heap of 1 vs 8 sessions sharing one base model. Prints figures and ratios.
# Env: SIGNAL_PYTHON (default /usr/bin/python3), THREADS (2), STEPS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SIGNAL_PYTHON:-/usr/bin/python3}
THREADS=${THREADS:-2}
STEPS=${STEPS:-2}
BIN=bin/signal
if [ ! -x "$BIN" ]; then
  BIN=$(mktemp -d)/signal
  go build -o "$BIN" ./cmd/signal
fi
export OPENBLAS_NUM_THREADS=$THREADS
have_torch=1
"$PY" -c 'import torch, numpy' 2>/dev/null || have_torch=0

SMOL='{"hidden_size":576,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536,"vocab_size":49152,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":10000}'
TINY=$("$PY" -c 'import json;print(json.dumps(json.load(open("trainer/testdata/tiny-sp/config.json"))))')

# row NAME GO_ARGS... -- PY_CONFIG BATCH SEQ
row() {
  local name=$1 cfg=$2 batch=$3 seq=$4; shift 4
  local go_json py_json=""
  go_json=$("$BIN" model bench "$@" --batch "$batch" --seq "$seq" --rank 8 --steps "$STEPS" --threads "$THREADS")
  if [ "$have_torch" = 1 ]; then
    py_json=$(echo "{\"config\":$cfg,\"batch\":$batch,\"seq\":$seq,\"rank\":8,\"steps\":$STEPS,\"threads\":$THREADS}" |
      "$PY" trainer/reference/train_ref.py bench)
  fi
  GO_JSON=$go_json PY_JSON=$py_json NAME=$name "$PY" - <<'PYEOF'
import json, os
g = json.loads(os.environ["GO_JSON"]); t = g["train"]
name = os.environ["NAME"]
print(f"{name:<22} go      {t['TokensPerSec']:9.1f} tokens/s  {t['GFLOPS']:6.1f} GFLOP/s  "
      f"MFU {100*g['mfu']:4.1f}% of sgemm {g['sgemm_gflops']:.0f} GFLOP/s  "
      f"peak RSS {t['PeakRSSBytes']/2**20:7.0f} MiB  arena {t['ArenaBytes']/2**20:6.0f} MiB")
if os.environ.get("PY_JSON"):
    p = json.loads(os.environ["PY_JSON"])
    print(f"{'':<22} pytorch {p['tokens_per_s']:9.1f} tokens/s  {t['GFLOPPerStep']*p['tokens_per_s']/(t['Batch']*t['Seq']):6.1f} GFLOP/s  "
          f"peak RSS {p['peak_rss_bytes']/2**20:7.0f} MiB")
    print(f"{'':<22} ratio go/pytorch {t['TokensPerSec']/p['tokens_per_s']:.2f}x  (goal >= 1.5x on the 135M shape)")
else:
    print(f"{'':<22} pytorch: not available ({os.environ.get('SIGNAL_PYTHON','/usr/bin/python3')} lacks torch)")
PYEOF
}

echo "engine-train: LoRA training step, rank 8 all linear layers, $THREADS threads, best of $STEPS steps"
row "tiny-sp 8x128" "$TINY" 8 128 --model trainer/testdata/tiny-sp
row "smollm-135m 1x256" "$SMOL" 1 256 --shape smollm-135m
row "smollm-135m 4x256" "$SMOL" 4 256 --shape smollm-135m

mem=$("$BIN" model bench --shape smollm-135m --sessions 8 --rank 8 --seq 256 --threads "$THREADS")
MEM=$mem "$PY" - <<'PYEOF'
import json, os
s = json.loads(os.environ["MEM"])["sessions"]
mb = lambda b: b / 2**20
print(f"sessions (smollm-135m, rank 8): base model {mb(s['ModelBytes']):.0f} MiB loaded once; Go heap "
      f"{mb(s['HeapBase']):.0f} MiB with 0 sessions, {mb(s['HeapOne']):.0f} MiB with 1, {mb(s['HeapN']):.0f} MiB with {s['N']}; "
      f"{mb(s['PerSessionBytes']):.1f} MiB per extra session ({s['AdapterParams']} adapter params x 4 buffers); "
      f"activation arena {mb(s['ArenaBytes']):.0f} MiB per call in flight, shared")
PYEOF
