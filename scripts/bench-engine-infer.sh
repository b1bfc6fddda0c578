#!/usr/bin/env bash
# Engine inference benchmark (issue 3): prefill and decode tokens/s of the Go
# engine against the PyTorch reference (trainer/reference/llama_ref.py, under
# torch.inference_mode) on the same shapes, in the same run: the tiny test
# models and a SmolLM-135M-shaped random model (generated once into
# .cache/bench). Prints figures and ratios; no pass/fail.
#
# Each side is measured in every thread configuration, and the ratio is taken
# between the FASTEST configuration of each (medians):
#   Go:      GOMAXPROCS 2 (GEMMs split over goroutines) and 1
#   PyTorch: torch.set_num_threads 1 and 2 x OPENBLAS_NUM_THREADS 1 and 2
#            (Debian's torch does its GEMMs in OpenBLAS; its OpenMP threads and
#            OpenBLAS's fight when both are 2)
#   HF+PEFT: the peer users run (trainer/reference/hf_ref.py in the pinned
#            environment, scripts/pyenv.sh): AutoModelForCausalLM with a rank-8
#            PEFT adapter on all seven modules, float32 and bfloat16, 1 and 2
#            threads; prefill one forward, decode model.generate (greedy, its
#            own KV cache)
#   llama.cpp: the CPU inference peer (scripts/llamacpp-bench.mjs through
#            node-llama-cpp 3.22.1's prebuilt CPU build, scripts/llamacpp.sh):
#            the same SmolLM-shaped model as GGUF (signal model export-gguf,
#            with a 32,000-token SentencePiece vocabulary padded to the
#            model's; the tokenizer does not enter the timing) in F32 and in
#            BF16, 1 and 2 threads, prefill and decode measured as
#            bench-infer measures them. The engine keeps a BF16 file in BF16
#            (bf16 products) and an F32 one in f32; the goal is >= 1.5x
#            llama.cpp at each precision.
# Runs are interleaved (Go, torch, Go, torch, ...) REPS times so that load from
# other processes hits both sides alike; each process reports the median of
# its repeats, and the table shows the median over REPS. The machine's sgemm
# rate (OpenBLAS, its own threads, 512^3, best of ten) is measured in each Go
# run. Figures are noisy on a shared machine: the load average is printed.
# Env: SIGNAL_PYTHON (default /usr/bin/python3), REPS (1; 3 for medians), SIGNAL_BIN;
# every round also runs the Go engine with SIGNAL_ENGINE_PRECISION=f32 ("go-f32":
# the BF16 file widened to f32, packed f32 products, as before the BF16
# engine) for what BF16 weights gain, and with
# --all-rows ("go-allrows": the prefill's last block on every row, the work
# PyTorch's forward does; sampling needs only the last row's);
# BEFORE_BIN=path/to/older/signal adds that build ("go-before", GOMAXPROCS
# 2) to every round, for before/after figures under the same load;
# ONLY=regex runs just the rows whose "name prefill" matches.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SIGNAL_PYTHON:-/usr/bin/python3}
BIN=${SIGNAL_BIN:-bin/signal}
REPS=${REPS:-1}
if [ ! -x "$BIN" ]; then
  mkdir -p bin && go build -o bin/signal ./cmd/signal
  BIN=bin/signal
fi
CACHE=.cache/bench
for shape in smollm-135m qwen3-0.6b; do
  if [ ! -f "$CACHE/$shape/model.safetensors" ]; then
    mkdir -p "$CACHE"
    "$BIN" model gen-random --shape "$shape" --seed 1 --out "$CACHE/$shape" >/dev/null
  fi
done
have_torch=1
"$PY" -c 'import torch, numpy' 2>/dev/null || have_torch=0
HF_PY=${SIGNAL_HF_PYTHON:-$(scripts/pyenv.sh 2>/dev/null || true)}
LLAMACPP=${SIGNAL_LLAMACPP:-$(scripts/llamacpp.sh 2>/dev/null || true)}
have_llama=0
if [ -n "$LLAMACPP" ] && command -v node >/dev/null && [ -z "${NO_LLAMACPP:-}" ]; then
  have_llama=1
  # The bench model with a vocabulary for GGUF (the weights are the same
  # files, hard-linked), exported once per precision.
  g="$CACHE/smollm-135m-gguf"
  if [ ! -f "$CACHE/smollm-135m-bf16.gguf" ] || [ ! -f "$CACHE/smollm-135m-f32.gguf" ]; then
    mkdir -p "$g"
    ln -f "$CACHE/smollm-135m/config.json" "$CACHE/smollm-135m/model.safetensors" "$g/"
    cp trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer.json trainer/tokenizer/testdata/sentencepiece-bpe/tokenizer_config.json "$g/"
    for dt in f32 bf16; do
      "$BIN" model export-gguf --model "$g" --out "$CACHE/smollm-135m-$dt.gguf" --dtype "$dt" >/dev/null
    done
  fi
fi
have_hf=1
[ -n "$HF_PY" ] && "$HF_PY" -c 'import transformers, peft' 2>/dev/null || have_hf=0
load() { cut -d' ' -f1-3 /proc/loadavg; }

# bench NAME DIR PREFILL DECODE BATCH REPEATS
bench() {
  local name=$1 dir=$2 pre=$3 dec=$4 batch=$5 rep=$6
  [[ "$name $pre" =~ ${ONLY:-.} ]] || return 0
  local results="" r gp ob req
  req=$(printf '{"cmd":"bench","model":"%s","threads_list":[1,2],"prefill_tokens":%d,"decode_tokens":%d,"decode_batch":%d,"repeats":%d}' \
        "$dir" "$pre" "$dec" "$batch" "$rep")
  for r in $(seq "$REPS"); do
    for i in 0 1; do
      gp=$((2 - i)) ob=$((1 + i))
      results+="go $gp $(GOMAXPROCS=$gp "$BIN" model bench-infer --model "$dir" --threads 2 --prefill-tokens "$pre" \
        --decode-tokens "$dec" --decode-batch "$batch" --repeats "$rep")"$'\n'
      if [ "$have_torch" = 1 ] && [ -z "${NO_TORCH:-}" ]; then
        results+="torch $ob $(echo "$req" | OPENBLAS_NUM_THREADS=$ob "$PY" trainer/reference/llama_ref.py)"$'\n'
      fi
      if [ "$have_hf" = 1 ] && [ "$i" = 0 ]; then
        results+="hf - $(echo "$req" | "$HF_PY" trainer/reference/hf_ref.py 2>/dev/null)"$'\n'
      fi
      if [ "$have_llama" = 1 ] && [ "$name" = smollm-135m ]; then
        dt=$([ "$i" = 0 ] && echo f32 || echo bf16)
        results+="llama.cpp-$dt - $(echo "$req" | sed "s|\"model\":\"[^\"]*\"|\"model\":\"$CACHE/smollm-135m-$dt.gguf\"|" |
          SIGNAL_LLAMACPP="$LLAMACPP" node scripts/llamacpp-bench.mjs)"$'\n'
      fi
    done
    # The same build with the BF16 file widened to f32 (packed f32 products,
    # the engine before it kept BF16): what the half engine gains.
    results+="go-f32 2 $(SIGNAL_ENGINE_PRECISION=f32 GOMAXPROCS=2 "$BIN" model bench-infer --model "$dir" --threads 2 --prefill-tokens "$pre" \
      --decode-tokens "$dec" --decode-batch "$batch" --repeats "$rep")"$'\n'
    # The same build with the prefill's last block on every row, as
    # PyTorch's forward does: the figure without sampling's LastRows saving.
    results+="go-allrows 2 $(GOMAXPROCS=2 "$BIN" model bench-infer --model "$dir" --threads 2 --prefill-tokens "$pre" \
      --decode-tokens "$dec" --decode-batch "$batch" --repeats "$rep" --all-rows)"$'\n'
    if [ -n "${BEFORE_BIN:-}" ]; then
      results+="go-before 2 $("$BEFORE_BIN" model bench-infer --model "$dir" --threads 2 --prefill-tokens "$pre" \
        --decode-tokens "$dec" --decode-batch "$batch" --repeats "$rep")"$'\n'
    fi
  done
  RESULTS=$results NAME=$name PRE=$pre DEC=$dec BATCH=$batch LOAD="$(load)" "$PY" - <<'PYEOF'
import json, os, statistics as st
name, pre, dec, batch = os.environ["NAME"], os.environ["PRE"], os.environ["DEC"], os.environ["BATCH"]
runs = {}  # config -> list of (prefill, decode)
sgemm, flops, wbytes = [], None, 0
for line in os.environ["RESULTS"].splitlines():
    side, thr, js = line.split(" ", 2)
    j = json.loads(js)
    if side in ("go-before", "go-f32", "go-allrows"):
        runs.setdefault("%s GOMAXPROCS=%s" % (side, thr), []).append((j["prefill_tokens_per_s"], j["decode_tokens_per_s"]))
    elif side == "go":
        runs.setdefault("go GOMAXPROCS=%s" % thr, []).append((j["prefill_tokens_per_s"], j["decode_tokens_per_s"]))
        sgemm.append(j["sgemm_gflops"])
        flops = j["prefill_flops"]
        wbytes = j["weights"]["bytes"]
    elif side.startswith("llama.cpp-"):
        for c in j["configs"]:
            key = "%s threads=%d" % (side.replace("-", " "), c["threads"])
            runs.setdefault(key, []).append((c["prefill_tokens_per_s"], c["decode_tokens_per_s"]))
    else:
        for c in j["configs"]:
            if side == "hf":
                key = "hf+peft threads=%d %s" % (c["torch_threads"], c["dtype"])
            else:
                key = "torch threads=%d OPENBLAS=%s" % (c["torch_threads"], c["openblas_threads"])
            runs.setdefault(key, []).append((c["prefill_tokens_per_s"], c["decode_tokens_per_s"]))
med = {k: (st.median(p for p, _ in v), st.median(d for _, d in v)) for k, v in runs.items()}
sg = st.median(sgemm)
gf = lambda tps: flops * tps / int(pre) / 1e9
print("-- %s: prefill %s tokens, decode %s tokens x batch %s (load at end %s; sgemm %.0f GFLOP/s, median of %d)"
      % (name, pre, dec, batch, os.environ["LOAD"], sg, len(sgemm)))
for k, (p, d) in med.items():
    print("   %-30s prefill %7.1f tok/s (%5.1f GFLOP/s, %3.0f%% of sgemm)  decode %6.1f tok/s   runs %s"
          % (k, p, gf(p), 100 * gf(p) / sg, d, " ".join("%.0f/%.1f" % x for x in runs[k])))
def best(side, i):
    ks = [k for k in med if k.startswith(side + " ")]
    return max(((med[k][i], k) for k in ks), default=(None, None))
for i, what in ((0, "prefill"), (1, "decode ")):
    g, gk = best("go", i)
    t, tk = best("torch", i)
    u, uk = best("go-f32", i)
    if u:
        print("   %s go with the file's BF16 / widened to f32: %.1f / %.1f = %.2fx" % (what, g, u, g / u))
    a, ak = best("go-allrows", i)
    if a and t and i == 0:
        print("   %s go with the last block on every row (as torch): %.1f / best torch %.1f = %.2fx" % (what, a, t, a / t))
    b, bk = best("go-before", i)
    if b:
        print("   %s go after/before: %.1f / %.1f = %.2fx" % (what, g, b, g / b))
    h, hk = best("hf+peft", i)
    if t:
        print("   %s best go %.1f (%s) / best torch %.1f (%s) = %.2fx" % (what, g, gk, t, tk, g / t))
    if h:
        print("   %s best go %.1f (%s) / best hf+peft %.1f (%s) = %.2fx  (goal >= 1.5x on the 135M shape)" % (what, g, gk, h, hk, g / h))
    if i == 1 and g:
        # A decode step reads every weight once for the batch: the read
        # bandwidth the best run reaches bounds what any engine can do.
        print("   %s best go reads its %.0f MB of weights at %.1f GB/s (batch %s)" % (what, wbytes / 1e6, wbytes * g / int(batch) / 1e9, batch))
    # At equal precision: the BF16 file kept in BF16 against llama.cpp's
    # BF16 GGUF, the engine widened to f32 against its F32 GGUF.
    for dt, (e, ek) in (("f32", (u, uk)), ("bf16", (g, gk))):
        l, lk = best("llama.cpp " + dt, i)
        if l and e:
            print("   %s best go %s %.1f (%s) / best llama.cpp %s %.1f (%s) = %.2fx  (goal >= 1.5x)" % (what, dt.upper(), e, ek, dt.upper(), l, lk, e / l))
    if not t and not h:
        print("   %s best go %.1f (%s); no PyTorch peer available" % (what, g, gk))
PYEOF
}

echo "== engine inference: Go engine vs PyTorch $([ "$have_torch" = 1 ] && "$PY" -c 'import torch; print(torch.__version__)' || echo '(missing)'), $REPS interleaved rounds (load: $(load))"
echo "   columns: median tokens/s; runs = each round's prefill/decode"
bench tiny-sp trainer/testdata/tiny-sp 128 32 1 3
bench tiny-bl trainer/testdata/tiny-bl 128 32 1 3
bench smollm-135m "$CACHE/smollm-135m" 128 16 1 3
bench smollm-135m "$CACHE/smollm-135m" 512 16 4 3
# Qwen3-0.6B: the hand-written torch peer is a Llama (no q/k norms), so
# this shape compares with HF+PEFT's Qwen3 only.
NO_TORCH=1 bench qwen3-0.6b "$CACHE/qwen3-0.6b" 128 16 1 3
