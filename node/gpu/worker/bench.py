"""Benchmark of the PyTorch worker: LoRA training tokens/s and sampling
throughput on a random Llama-3.2-1B-shaped model, against Hugging Face
transformers + PEFT on the same device in the same run when they are
importable. Prints one JSON object (and writes it to --out).

  python bench.py --device cuda:0 --out result.json
  python bench.py --cpu-smoke            # tiny shape on the CPU: checks the script runs
"""

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from signal_worker.model import ALL_MODULES, Config, Model  # noqa: E402
from signal_worker.session import Session  # noqa: E402

# Llama-3.2-1B's shape (tied embeddings, llama3 RoPE scaling).
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
}
TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024)

PEAK_BF16_FLOPS = 790e12  # H200 dense bf16, the reference


def random_weights(cfg, device, dtype, seed):
    # Drawn on the device itself: 1.2 B normals on the CPU would take longer
    # than the benchmark.
    g = torch.Generator(device=device).manual_seed(seed)
    w = {}

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    w["model.embed_tokens.weight"] = rnd(cfg.vocab, cfg.hidden)
    w["model.norm.weight"] = torch.ones(cfg.hidden, device=device, dtype=dtype)
    for i in range(cfg.layers):
        w[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(cfg.hidden, device=device, dtype=dtype)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(cfg.hidden, device=device, dtype=dtype)
        for m in ALL_MODULES:
            grp = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            w[f"model.layers.{i}.{grp}.{m}.weight"] = rnd(*cfg.module_shape(m))
    return w


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def train_flops_per_token(cfg, seq):
    """LoRA on a frozen base: forward 2·P plus backward input-gradients 2·P
    for the linear layers (no weight gradients), attention (causal) forward
    once and backward twice. The rank-r products are left out (< 1%)."""
    p = cfg.params_per_token_flops()
    attn_fwd = 2 * 2 * seq * cfg.heads * cfg.head_dim * cfg.layers * 0.5
    return 4 * p + 3 * attn_fwd


def batch(cfg, b, t, seed):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab, (b, t + 1), generator=g)
    data = []
    for row in toks.tolist():
        data.append({"model_input": {"tokens": row[:-1]},
                     "loss_fn_inputs": {"target_tokens": row[1:], "weights": [1.0] * t}})
    return toks, data


def bench_ours_train(model, cfg, b, t, steps, warmup, rank):
    s = Session(model, rank=rank, alpha=2 * rank, seed=0)
    _, data = batch(cfg, b, t, 1)
    body = {"data": data}
    dev = model.device
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        r = s.forward_backward(body)
        s.optim_step({"adam_params": {"learning_rate": 1e-4}})
        losses.append(r["loss_mean"])
    sync(dev)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return {"tokens_per_s": b * t * steps / dt, "step_s": dt / steps, "loss_first": losses[0],
            "loss_last": losses[-1], "peak_mem_bytes": peak}


def bench_ours_sample(model, cfg, prompts, prompt_len, new_tokens, rank):
    s = Session(model, rank=rank, alpha=2 * rank, seed=0)
    model.cfg.eos = []  # random weights: never stop early, count full lengths
    g = torch.Generator().manual_seed(3)
    ps = [{"tokens": torch.randint(0, cfg.vocab, (prompt_len,), generator=g).tolist()} for _ in range(prompts)]
    body = {"prompts": ps, "sampling_params": {"max_tokens": new_tokens, "temperature": 1.0, "seed": 1}}
    s.sample(dict(body, sampling_params={"max_tokens": 4, "seed": 0}))  # warm-up
    sync(model.device)
    t0 = time.perf_counter()
    out, usage = s.sample(body)
    sync(model.device)
    dt = time.perf_counter() - t0
    return {"sampled_tokens": usage["sampled_tokens"], "seconds": dt,
            "tokens_per_s": usage["sampled_tokens"] / dt}


def hf_model(raw_cfg, weights, device, dtype, rank):
    import transformers  # noqa: F401
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in raw_cfg.items()})
    with torch.device(device) if hasattr(torch, "device") and device.type == "cuda" else _null():
        m = LlamaForCausalLM(cfg)
    m = m.to(device=device, dtype=dtype)
    missing, unexpected = m.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"HF model: unexpected weights {unexpected[:3]}")
    m.config.use_cache = False
    lc = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(ALL_MODULES),
                    task_type="CAUSAL_LM")
    return get_peft_model(m, lc), transformers.__version__


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def bench_hf_train(pm, cfg, b, t, steps, warmup, device):
    toks, _ = batch(cfg, b, t, 1)
    inp = toks[:, :-1].to(device)
    lab = toks[:, 1:].to(device)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    pm.train()
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        logits = pm(input_ids=inp).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                                 reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss) / (b * t))
    sync(device)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": b * t * steps / dt, "step_s": dt / steps, "loss_first": losses[0],
            "loss_last": losses[-1]}


def bench_hf_sample(pm, cfg, prompts, prompt_len, new_tokens, device):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab, (prompts, prompt_len), generator=g).to(device)
    pm.eval()
    pm.config.use_cache = True
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, **kw)
        sync(device)
        t0 = time.perf_counter()
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, **kw)
        sync(device)
    dt = time.perf_counter() - t0
    n = (out.shape[1] - prompt_len) * prompts
    return {"sampled_tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU (checks the script)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers + PEFT comparison")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    raw = LLAMA_1B
    if a.cpu_smoke:
        a.device, raw = "cpu", TINY
        a.batch, a.seq, a.steps, a.warmup = 2, 32, 2, 1
        a.prompts, a.prompt_len, a.new_tokens = 4, 8, 8
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = Config(raw)
    res = {"device": str(dev), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
           "shape": {k: raw[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
           "batch": a.batch, "seq": a.seq, "rank": a.rank, "targets": list(ALL_MODULES),
           "sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention")}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    weights = random_weights(cfg, dev, dtype, 0)
    model = Model(cfg, weights, dev, dtype, name="llama-1b-random")
    model._check()
    fpt = train_flops_per_token(cfg, a.seq)
    res["train_flops_per_token"] = fpt
    ours = bench_ours_train(model, cfg, a.batch, a.seq, a.steps, a.warmup, a.rank)
    ours["mfu_vs_790tflops"] = ours["tokens_per_s"] * fpt / PEAK_BF16_FLOPS
    res["signal_train"] = ours
    res["signal_sample"] = bench_ours_sample(model, cfg, a.prompts, a.prompt_len, a.new_tokens, a.rank)
    res["signal_sample"]["prompts"] = a.prompts
    if a.no_hf:
        res["hf"] = "skipped (--no-hf)"
    else:
        try:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            hfw = {k: v for k, v in weights.items()}
            pm, ver = hf_model(raw, hfw, dev, dtype, a.rank)
            res["hf_versions"] = {"transformers": ver}
            try:
                import peft
                res["hf_versions"]["peft"] = peft.__version__
            except ImportError:
                pass
            hf = bench_hf_train(pm, cfg, a.batch, a.seq, a.steps, a.warmup, dev)
            hf["mfu_vs_790tflops"] = hf["tokens_per_s"] * fpt / PEAK_BF16_FLOPS
            res["hf_train"] = hf
            res["train_ratio_signal_over_hf"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            res["hf_sample"] = bench_hf_sample(pm, cfg, a.prompts, a.prompt_len, a.new_tokens, dev)
            res["sample_ratio_signal_over_hf"] = res["signal_sample"]["tokens_per_s"] / res["hf_sample"]["tokens_per_s"]
        except ImportError as e:
            res["hf"] = f"not importable here: {e}"
        except Exception as e:  # report, keep our figures
            res["hf"] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
    out = json.dumps(res, indent=2)
    print(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(out + "\n")
    if not math.isfinite(ours["loss_last"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
