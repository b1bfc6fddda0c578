#!/usr/bin/env python3
"""Hugging Face transformers + PEFT as the oracle for Signal's engines.

A test helper, not part of the product: the Go tests run it through
$SIGNAL_HF_PYTHON (the pinned environment scripts/pyenv.sh builds: torch 2.x,
transformers, peft) with the same requests as the hand-written references
beside it, so every comparison made against those is made against the model
code users actually run. The model is AutoModelForCausalLM from the
directory; the adapter is loaded with PeftModel.from_pretrained, unchanged.
Only Signal's own losses (importance sampling, PPO) come from train_ref.py:
no library defines them.

Usage:
  hf_ref.py grad|train|bench < request.json > answer.json   (train_ref.py's protocol;
                                                          bench also takes "dtypes")
  hf_ref.py < request.json > answer.json                (llama_ref.py's: logits,
                                                          greedy, bench, batch)
  {"cmd": "peft_init", "model": DIR, "out": DIR, "r": n, "lora_alpha": a,
   "target_modules": [...], "seed": s}
      -> {}: a PEFT adapter with random A and B (init_lora_weights=False),
         saved with save_pretrained into out
"""
import json
import os
import resource
import sys
import time

# Quiet: the weight-loading progress bars and the Hub's notices go to
# stderr, which the Go tests print only when this script fails.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_ref import _median  # noqa: E402
from train_ref import datum_loss, train_loop  # noqa: E402


def load(model_dir, adapter, dtype, trainable=False):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if not adapter:
        return base.eval(), []
    model = PeftModel.from_pretrained(base, adapter, is_trainable=trainable).eval()
    # PEFT's parameter names carry the adapter's name ("default"); its
    # saved files, and Signal's, do not.
    params = [(n.replace(".default", ""), p) for n, p in model.named_parameters() if p.requires_grad]
    return model, params


def logprobs_of(model, tokens, targets):
    logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(targets)[:, None])[:, 0]


def loss_of(model, data, loss_fn, lcfg, dtype):
    total, lps = 0, []
    for d in data:
        lp = logprobs_of(model, d["tokens"], d["target_tokens"])
        lps.append(lp.detach().tolist())
        total = total + datum_loss(lp, d, loss_fn, lcfg, dtype)
    return total, lps


def cmd_grad(req):
    dtype = getattr(torch, req.get("dtype", "float64"))
    model, params = load(req["model"], req["adapter"], dtype, trainable=True)
    loss, lps = loss_of(model, req["data"], req.get("loss_fn", "cross_entropy"), req.get("loss_fn_config") or {}, dtype)
    loss.backward()
    grads = {n: p.grad.reshape(-1).tolist() for n, p in params}
    norm = sum(float((p.grad.double() ** 2).sum()) for _, p in params) ** 0.5
    return {"loss_sum": float(loss), "logprobs": lps, "grad_norm": norm, "grads": grads}


def cmd_train(req):
    dtype = getattr(torch, req.get("dtype", "float32"))
    model, params = load(req["model"], req["adapter"], dtype, trainable=True)
    lf, lcfg = req.get("loss_fn", "cross_entropy"), req.get("loss_fn_config") or {}
    return train_loop(req, [p for p in params], lambda: loss_of(model, req["data"], lf, lcfg, dtype)[0])


def cmd_logits(req):
    model, _ = load(req["model"], req.get("adapter"), torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([req["tokens"]])).logits[0].float()
    logits.numpy().astype("<f4").tofile(req["out"])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"rows": logits.shape[0], "vocab": logits.shape[1], "class": type(base).__name__}


def cmd_greedy(req):
    """Greedy decoding through the model's own KV cache (past_key_values),
    never stopping early; logprobs under log_softmax of the raw logits."""
    model, _ = load(req["model"], req.get("adapter"), torch.float32)
    samples = []
    with torch.no_grad():
        for prompt in req["prompts"]:
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            toks, lps = [], []
            for _ in range(req["max_tokens"]):
                logits = out.logits[0, -1]
                tok = int(torch.argmax(logits))
                toks.append(tok)
                lps.append(float(torch.log_softmax(logits.double(), dim=-1)[tok]))
                out = model(input_ids=torch.tensor([[tok]]), cache=out.cache, use_cache=True)
            samples.append({"tokens": toks, "logprobs": lps})
    return {"samples": samples}


def cmd_peft_init(req):
    torch.manual_seed(req.get("seed", 0))
    base = AutoModelForCausalLM.from_pretrained(req["model"], dtype=torch.float32)
    cfg = LoraConfig(r=req["r"], lora_alpha=req["lora_alpha"], target_modules=req["target_modules"],
                     lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.save_pretrained(req["out"])
    return {}


def cmd_bench(req):
    """The peer users run: a LoRA training step in transformers + PEFT
    (forward over the batch, backward, torch.optim.AdamW) on a random model
    of the given shape and config["model_type"] (default llama), rank r on all seven linear layers, in each thread
    count and dtype (float32; bfloat16, where the CPU's AMX runs the
    products through oneDNN). train_ref.py bench's answer format."""
    from transformers import AutoConfig
    c = dict(req["config"])
    c.setdefault("tie_word_embeddings", True)
    model_type = c.pop("model_type", "llama")
    B, T, r = req["batch"], req["seq"], req["rank"]
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, c["vocab_size"], (B, T + 1), generator=g)
    configs = []
    for dtype_name in req.get("dtypes", ["float32", "bfloat16"]):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **c)).to(dtype)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for threads in req.get("threads_list", [2]):
            torch.set_num_threads(int(threads))
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
            times = []
            for _ in range(req.get("steps", 3) + 1):
                t0 = time.perf_counter()
                opt.zero_grad()
                out = model(input_ids=data[:, :T], labels=data[:, 1:])
                # labels are shifted inside the model; this is its own loss
                out.loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            times = sorted(times[1:])  # the first step warms allocators and threads
            configs.append({"torch_threads": torch.get_num_threads(), "dtype": dtype_name,
                            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
                            "tokens_per_s": B * T / _median(times), "step_s": times})
        del model, opt, params
    out = dict(max(configs, key=lambda x: x["tokens_per_s"]))
    out["configs"] = configs
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def cmd_infer_bench(req):
    """Prefill and decode of AutoModelForCausalLM (with a rank-8 PEFT adapter
    on all seven modules, as a served adapter is), float32 and bfloat16:
    prefill is one forward of the prompt; decode is model.generate, greedy,
    with its own KV cache, from an 8-token prompt, batch sequences at once.
    llama_ref.py bench's answer format, plus "dtype" per config."""
    from transformers import GenerationConfig
    n_pre, n_dec, batch = req["prefill_tokens"], req["decode_tokens"], req.get("decode_batch", 1)
    repeats = req.get("repeats", 3)
    configs = []
    for dtype_name in req.get("dtypes", ["float32", "bfloat16"]):
        base = AutoModelForCausalLM.from_pretrained(req["model"], dtype=getattr(torch, dtype_name))
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])).eval()
        vocab = model.config.vocab_size
        gen = GenerationConfig(max_new_tokens=n_dec, min_new_tokens=n_dec, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        for threads in req.get("threads_list", [2]):
            torch.set_num_threads(int(threads))
            g = torch.Generator().manual_seed(1)
            prompt = torch.randint(0, vocab, (1, n_pre), generator=g)
            pre, dec = [], []
            with torch.inference_mode():
                for r in range(repeats + 1):
                    t0 = time.perf_counter()
                    model(input_ids=prompt, logits_to_keep=1)
                    if r > 0:
                        pre.append(time.perf_counter() - t0)
                for r in range(repeats + 1):
                    start = torch.randint(0, vocab, (batch, 8), generator=g)
                    t0 = time.perf_counter()
                    model.generate(input_ids=start, attention_mask=torch.ones_like(start), generation_config=gen)
                    if r > 0:
                        dec.append(time.perf_counter() - t0)
            configs.append({"torch_threads": torch.get_num_threads(), "dtype": dtype_name,
                            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
                            "prefill_tokens_per_s": n_pre / _median(pre),
                            # generate's time includes its 8-token prefill: a
                            # slight undercount of HF's decode rate.
                            "decode_tokens_per_s": batch * n_dec / _median(dec)})
        del model, base
    out = dict(configs[-1])
    out["configs"] = configs
    out["torch"] = torch.__version__
    return out


def cmd_model_init(req):
    """A random model of a family made and saved by transformers itself
    (its own config.json spelling: rope_parameters, dtype, layer_types):
    {"family": "llama"|"mistral"|"qwen2"|"qwen3", "out": DIR, "config": {...}}."""
    import transformers
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[req["family"]]
    torch.manual_seed(req.get("seed", 0))
    model = model_cls(cfg_cls(**req["config"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):  # q/k/v biases large enough to matter
                p.normal_(0, 0.5)
            if n.endswith("_norm.weight") and "self_attn" in n:  # q/k norms away from 1
                p.uniform_(0.5, 1.5)
    model.to(getattr(torch, req.get("dtype", "float32"))).save_pretrained(req["out"], safe_serialization=True)
    return {}


def run(req):
    fn = {"logits": cmd_logits, "greedy": cmd_greedy, "peft_init": cmd_peft_init, "model_init": cmd_model_init,
          "bench": cmd_infer_bench}.get(req.get("cmd"))
    if req.get("cmd") == "batch":
        return {"answers": [run(r) for r in req["requests"]]}
    if fn is None:
        sys.exit("unknown cmd %r" % req.get("cmd"))
    return fn(req)


def main():
    req = json.load(sys.stdin)
    if sys.argv[1:] != ["bench"] and req.get("cmd") != "bench":
        torch.set_num_threads(req.get("threads", 1))
    if len(sys.argv) > 1:
        out = {"grad": cmd_grad, "train": cmd_train, "bench": cmd_bench}[sys.argv[1]](req)
    else:
        out = run(req)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
