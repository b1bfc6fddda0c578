#!/usr/bin/env bash
# LoRA training step (forward_backward + optim_step) of the native Go engine
# against the PyTorch autograd reference (trainer/reference/train_ref.py), same
# shapes, rank 8 on all seven linear layers, in one run:
#   tiny-sp at 8 x 128; the SmolLM-135M shape at 1 x 256 and 4 x 256.
# Each side runs in every thread configuration and the ratio is taken between
# the FASTEST of each (median step):
#   Go:      GOMAXPROCS 2 (the team's two threads) and 1, with the base
#            matrices in BF16 (bf16 products through oneDNN where the CPU has
#            AVX512-BF16 or AMX: the engine's default for BF16 files) and in
#            f32 (--dtype f32), side by side
#   PyTorch: torch.set_num_threads 1 and 2 x OPENBLAS_NUM_THREADS 1 and 2
#            (an eager loop: forward per sequence, one backward, AdamW)
#   HF+PEFT: the peer users run (trainer/reference/hf_ref.py bench, in the
#            pinned environment scripts/pyenv.sh builds): LlamaForCausalLM +
#            PEFT LoRA, torch AdamW, float32 and bfloat16 (AMX through
#            oneDNN where the CPU has it), 1 and 2 threads
# Runs are interleaved (Go, torch, Go, torch) REPS times so that load from
# other processes hits both alike; the table shows medians over REPS.
# Also: the machine's sgemm rate, model FLOP utilisation, peak memory, and the
# heap of 1 vs 8 sessions sharing one base model. Figures are noisy on a
# shared machine: the load average is printed.
# Env: SIGNAL_PYTHON (default /usr/bin/python3), STEPS (3), REPS (1; 3 for medians),
# SIGNAL_BIN; BEFORE_BIN=path/to/older/signal adds that build ("go-before",
# GOMAXPROCS 2) to every round, for before/after figures under the same load;
# ONLY=regex runs just the rows whose name matches (and skips the memory row).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SIGNAL_PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-3}
REPS=${REPS:-1}
BIN=${SIGNAL_BIN:-bin/signal}
if [ ! -x "$BIN" ]; then
  BIN=$(mktemp -d)/signal
  go build -o "$BIN" ./cmd/signal
fi
have_torch=1
"$PY" -c 'import torch, numpy' 2>/dev/null || have_torch=0
HF_PY=${SIGNAL_HF_PYTHON:-$(scripts/pyenv.sh 2>/dev/null || true)}
have_hf=1
[ -n "$HF_PY" ] && "$HF_PY" -c 'import transformers, peft' 2>/dev/null || have_hf=0
load() { cut -d' ' -f1-3 /proc/loadavg; }

# Qwen3-0.6B: q/k norms and head_dim 128; the hand-written torch peer is a
# Llama, so that row compares with HF+PEFT's Qwen3 only (NO_TORCH).
QWEN3='{"model_type":"qwen3","hidden_size":1024,"num_hidden_layers":28,"num_attention_heads":16,"num_key_value_heads":8,"intermediate_size":3072,"vocab_size":151936,"head_dim":128,"rms_norm_eps":1e-6,"rope_theta":1000000}'
SMOL='{"hidden_size":576,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"intermediate_size":1536,"vocab_size":49152,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":10000}'
LLAMA1B='{"hidden_size":2048,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":8192,"vocab_size":128256,"head_dim":64,"rms_norm_eps":1e-5,"rope_theta":500000,"tie_word_embeddings":true}'
TINY=$("$PY" -c 'import json;print(json.dumps(json.load(open("trainer/testdata/tiny-sp/config.json"))))')

# row NAME PY_CONFIG BATCH SEQ GO_ARGS...
row() {
  local name=$1 cfg=$2 batch=$3 seq=$4; shift 4
  [[ "$name" =~ ${ONLY:-.} ]] || return 0
  local results="" r i gp ob req
  req="{\"config\":$cfg,\"batch\":$batch,\"seq\":$seq,\"rank\":8,\"steps\":$STEPS,\"threads_list\":[1,2]}"
  for r in $(seq "$REPS"); do
    for i in 0 1; do
      gp=$((2 - i)) ob=$((1 + i))
      for dt in bf16 f32; do
        results+="go-$dt $gp $(GOMAXPROCS=$gp "$BIN" model bench "$@" --dtype $dt --batch "$batch" --seq "$seq" --rank 8 --steps "$STEPS" --threads 2)"$'\n'
      done
      if [ "$have_torch" = 1 ] && [ -z "${NO_TORCH:-}" ]; then
        results+="torch $ob $(echo "$req" | OPENBLAS_NUM_THREADS=$ob "$PY" trainer/reference/train_ref.py bench)"$'\n'
      fi
      if [ "$have_hf" = 1 ] && [ "$i" = 0 ]; then
        results+="hf - $(echo "$req" | "$HF_PY" trainer/reference/hf_ref.py bench 2>/dev/null)"$'\n'
      fi
    done
    if [ -n "${BEFORE_BIN:-}" ]; then
      results+="go-before 2 $("$BEFORE_BIN" model bench "$@" --batch "$batch" --seq "$seq" --rank 8 --steps "$STEPS" --threads 2)"$'\n'
    fi
  done
  RESULTS=$results NAME=$name LOAD="$(load)" "$PY" - <<'PYEOF'
import json, os, statistics as st
runs, sgemm, meta = {}, [], {}
for line in os.environ["RESULTS"].splitlines():
    side, thr, js = line.split(" ", 2)
    j = json.loads(js)
    if side == "go-before":
        runs.setdefault("go-before GOMAXPROCS=%s" % thr, []).append(j["train"]["TokensPerSec"])
    elif side.startswith("go-"):
        t = j["train"]
        dt = side[3:]
        runs.setdefault("go %s GOMAXPROCS=%s" % (dt, thr), []).append(t["TokensPerSec"])
        sgemm.append(j["sgemm_gflops"])
        if "bf16_gemm_gflops" in j:
            meta.setdefault("bf16_gemm", []).append(j["bf16_gemm_gflops"])
        meta["go"] = t
        meta["engine"] = j.get("engine", {})
        meta.setdefault("rss", {})[dt] = max(meta.get("rss", {}).get(dt, 0), t["PeakRSSBytes"])
    elif side == "hf":
        for c in j["configs"]:
            runs.setdefault("hf+peft threads=%d %s" % (c["torch_threads"], c["dtype"]), []).append(c["tokens_per_s"])
        meta["hf_rss"] = max(meta.get("hf_rss", 0), j["peak_rss_bytes"])
    else:
        for c in j["configs"]:
            runs.setdefault("torch threads=%d OPENBLAS=%s" % (c["torch_threads"], c["openblas_threads"]), []).append(c["tokens_per_s"])
        meta["torch_rss"] = max(meta.get("torch_rss", 0), j["peak_rss_bytes"])
t = meta["go"]
sg = st.median(sgemm)
gflops = lambda tps: t["GFLOPPerStep"] * tps / (t["Batch"] * t["Seq"])
bg = st.median(meta["bf16_gemm"]) if meta.get("bf16_gemm") else None
e = meta.get("engine", {})
print("-- %s (load at end %s; sgemm %.0f GFLOP/s, bf16 GEMM %s, median of %d; %.1f model GFLOP per step)"
      % (os.environ["NAME"], os.environ["LOAD"], sg, "%.0f GFLOP/s" % bg if bg else "n/a", len(sgemm), t["GFLOPPerStep"]))
print("   cpu: %s; go bf16 path %s, f32 path %s" % (e.get("cpu_features", "?"), e.get("bf16_path", "?"), e.get("f32_path", "?")))
med = {k: st.median(v) for k, v in runs.items()}
for k, v in med.items():
    of_bf16 = "  %4.1f%% of bf16 GEMM" % (100 * gflops(v) / bg) if bg and "bf16" in k else ""
    print("   %-34s %8.1f tokens/s  %6.1f GFLOP/s  MFU %4.1f%% of sgemm%s   runs %s"
          % (k, v, gflops(v), 100 * gflops(v) / sg, of_bf16, " ".join("%.0f" % x for x in runs[k])))
print("   peak RSS: go bf16 %.0f MiB, go f32 %.0f MiB (arena %.0f MiB), torch %s, hf+peft %s"
      % (meta["rss"].get("bf16", 0) / 2**20, meta["rss"].get("f32", 0) / 2**20, t["ArenaBytes"] / 2**20,
         "%.0f MiB" % (meta["torch_rss"] / 2**20) if "torch_rss" in meta else "n/a",
         "%.0f MiB" % (meta["hf_rss"] / 2**20) if "hf_rss" in meta else "n/a"))
g = max((v, k) for k, v in med.items() if k.startswith("go "))
tb = max(((v, k) for k, v in med.items() if k.startswith("torch ")), default=None)
bb = max(((v, k) for k, v in med.items() if k.startswith("go-before ")), default=None)
if bb:
    print("   go after/before: %.1f / %.1f = %.2fx" % (g[0], bb[0], g[0] / bb[0]))
hb = max(((v, k) for k, v in med.items() if k.startswith("hf+peft ")), default=None)
if tb:
    print("   best go %.1f (%s) / best torch %.1f (%s) = %.2fx"
          % (g[0], g[1], tb[0], tb[1], g[0] / tb[0]))
if hb:
    print("   best go %.1f (%s) / best hf+peft %.1f (%s) = %.2fx  (goal >= 1.5x; on AMX CPUs against HF+PEFT in bf16)"
          % (g[0], g[1], hb[0], hb[1], g[0] / hb[0]))
    for dt, hdt in (("bf16", "bfloat16"), ("f32", "float32")):
        gd = max(((v, k) for k, v in med.items() if k.startswith("go %s " % dt)), default=None)
        hd = max(((v, k) for k, v in med.items() if k.startswith("hf+peft ") and k.endswith(hdt)), default=None)
        if gd and hd:
            print("   go %s %.1f / hf+peft %s %.1f = %.2fx" % (dt, gd[0], hdt, hd[0], gd[0] / hd[0]))
if not tb and not hb:
    print("   best go %.1f (%s); no PyTorch peer available" % g)
PYEOF
}

echo "== engine-train: LoRA training step, rank 8 all linear layers, median of $STEPS steps, $REPS interleaved rounds (load: $(load))"
row "tiny-sp 8x128" "$TINY" 8 128 --model trainer/testdata/tiny-sp
row "smollm-135m 1x256" "$SMOL" 1 256 --shape smollm-135m
row "smollm-135m 4x256" "$SMOL" 4 256 --shape smollm-135m
NO_TORCH=1 row "qwen3-0.6b 1x256" "$QWEN3" 1 256 --shape qwen3-0.6b
NO_TORCH=1 row "llama-3.2-1b 1x256" "$LLAMA1B" 1 256 --shape llama-3.2-1b

[ -z "${ONLY:-}" ] || exit 0
mem=$("$BIN" model bench --shape smollm-135m --sessions 8 --rank 8 --seq 256 --threads 2)
MEM=$mem "$PY" - <<'PYEOF'
import json, os
s = json.loads(os.environ["MEM"])["sessions"]
mb = lambda b: b / 2**20
print(f"sessions (smollm-135m, rank 8): base model {mb(s['ModelBytes']):.0f} MiB loaded once; Go heap "
      f"{mb(s['HeapBase']):.0f} MiB with 0 sessions, {mb(s['HeapOne']):.0f} MiB with 1, {mb(s['HeapN']):.0f} MiB with {s['N']}; "
      f"{mb(s['PerSessionBytes']):.1f} MiB per extra session ({s['AdapterParams']} adapter params x 4 buffers); "
      f"activation arena {mb(s['ArenaBytes']):.0f} MiB per call in flight, shared")
PYEOF

# The seed's model: a Llama-3.2-3B-shaped random model, BF16, trains (1 x 128,
# rank 16) and samples (prefill 128, decode 16) on one node; peak RSS of each
# process, which must fit a 24 GB node. And a Llama-3.2-1B shape holding four
# sessions on one loaded base.
mem3b=$( { /usr/bin/time -f '%M' "$BIN" model bench --shape llama-3.2-3b --batch 1 --seq 128 --rank 16 --steps 1 --threads 2; } 2>&1 )
inf3b=$( { /usr/bin/time -f '%M' "$BIN" model bench-infer --shape llama-3.2-3b --prefill-tokens 128 --decode-tokens 16 --repeats 1; } 2>&1 )
mem1b=$("$BIN" model bench --shape llama-3.2-1b --sessions 4 --rank 16 --seq 128 --threads 2)
M3=$mem3b I3=$inf3b M1=$mem1b "$PY" - <<'PYEOF'
import json, os
def split(v):
    lines = v.strip().splitlines()
    return json.loads("\n".join(lines[:-1])), int(lines[-1]) * 1024
t, rss_t = split(os.environ["M3"])
i, rss_i = split(os.environ["I3"])
gb = lambda b: b / 1e9
print("seed's model (llama-3.2-3b shape, %s, %s): weights %.2f GB; LoRA step 1x128 %.1f tokens/s, peak RSS %.2f GB; "
      "prefill 128 %.1f tokens/s, decode %.2f tokens/s, peak RSS %.2f GB (cpu: %s)"
      % (t["weights"]["dtype"], t["weights"]["path"], gb(t["weights"]["bytes"]), t["train"]["TokensPerSec"], gb(rss_t),
         i["prefill_tokens_per_s"], i["decode_tokens_per_s"], gb(rss_i), t["engine"]["cpu_features"]))
s = json.loads(os.environ["M1"])["sessions"]
print("llama-3.2-1b shape, 4 sessions on one base: model %.2f GB, %.0f MiB per extra session (rank 16), arena %.0f MiB"
      % (gb(s["ModelBytes"]), s["PerSessionBytes"] / 2**20, s["ArenaBytes"] / 2**20))
PYEOF
