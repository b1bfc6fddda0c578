#!/usr/bin/env python3
"""Hand-written PyTorch LoRA training: the benchmarks' plain-PyTorch peer
(bench), and Signal's own losses for the tests' oracle.

A test and benchmark helper, not part of the product. The tests judge the
engines with Hugging Face transformers + PEFT (hf_ref.py), which imports
datum_loss and train_loop from here: importance sampling and PPO are
Signal's (Tinker's) definitions, which no library has. bench runs on
$SIGNAL_PYTHON (default /usr/bin/python3, Debian's python3-torch 1.13).

Usage: train_ref.py bench < request.json > answer.json

  bench: {"config": {hidden_size, ...}, "batch", "seq", "rank", "steps", "threads_list": [1, 2]}
         -> {"configs": [{"torch_threads", "openblas_threads", "tokens_per_s", "step_s"}],
             "peak_rss_bytes"}  (tokens/s from the median step; OpenBLAS threads from the env)
"""
import json
import math
import os
import resource
import sys
import time

import torch

# The inference reference beside this file (its directory is sys.path[0]
# when run as a script) rotates halves the same way.
from llama_ref import rotate_half

MODULES_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MODULES_MLP = ("gate_proj", "up_proj", "down_proj")


def rope_tables(cfg, n, dtype):
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.get("rope_scaling")
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wl >= hi_wl) & (wl <= lo_wl)
        inv = torch.where(is_mid, mid, scaled)
    # Hugging Face computes the angles in float32.
    inv = inv.to(torch.float32)
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Llama:
    """Hugging Face LlamaForCausalLM's math on plain tensors, with unmerged LoRA."""

    def __init__(self, cfg, weights, dtype):
        self.cfg = cfg
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        self.dtype = dtype
        self.lora = {}  # (layer, module) -> (A, B) leaf tensors with grad
        self.scale = 1.0

    def layer_weight(self, i, m):
        part = "self_attn" if m in MODULES_ATTN else "mlp"
        return self.w["model.layers.%d.%s.%s.weight" % (i, part, m)]

    def linear(self, x, i, m):
        y = x @ self.layer_weight(i, m).t()
        ab = self.lora.get((i, m))
        if ab is not None:
            a, b = ab
            y = y + self.scale * ((x @ a.t()) @ b.t())
        return y

    def rms(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.cfg["rms_norm_eps"]))

    def logits(self, tokens):
        """tokens: 1-D LongTensor of one sequence -> [n, vocab]."""
        cfg = self.cfg
        n = tokens.shape[0]
        nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        d = cfg.get("head_dim") or cfg["hidden_size"] // nh
        cos, sin = rope_tables(cfg, n, self.dtype)
        mask = torch.full((n, n), float("-inf"), dtype=self.dtype).triu(1)
        x = self.w["model.embed_tokens.weight"][tokens]
        for i in range(cfg["num_hidden_layers"]):
            h = self.rms(x, self.w["model.layers.%d.input_layernorm.weight" % i])
            q = self.linear(h, i, "q_proj").view(n, nh, d).transpose(0, 1)
            k = self.linear(h, i, "k_proj").view(n, nkv, d).transpose(0, 1)
            v = self.linear(h, i, "v_proj").view(n, nkv, d).transpose(0, 1)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            rep = nh // nkv
            k = k.repeat_interleave(rep, dim=0)
            v = v.repeat_interleave(rep, dim=0)
            s = (q @ k.transpose(1, 2)) / math.sqrt(d) + mask
            o = (torch.softmax(s, dim=-1) @ v).transpose(0, 1).reshape(n, nh * d)
            x = x + self.linear(o, i, "o_proj")
            h = self.rms(x, self.w["model.layers.%d.post_attention_layernorm.weight" % i])
            g = self.linear(h, i, "gate_proj")
            u = self.linear(h, i, "up_proj")
            x = x + self.linear(torch.nn.functional.silu(g) * u, i, "down_proj")
        x = self.rms(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight")
        if head is None or cfg.get("tie_word_embeddings"):
            head = self.w["model.embed_tokens.weight"]
        return x @ head.t()


def datum_loss(lp, d, loss_fn, lcfg, dtype):
    """Signal's (Tinker's) loss of one Datum from its per-token logprobs:
    the part of the engine no model library defines, shared with hf_ref.py."""
    if loss_fn == "cross_entropy":
        w = torch.tensor(d["weights"], dtype=dtype)
        return (-(w * lp)).sum()
    old = torch.tensor(d["logprobs"], dtype=dtype)
    adv = torch.tensor(d["advantages"], dtype=dtype)
    ratio = torch.exp(lp - old)
    if loss_fn == "importance_sampling":
        return (-(ratio * adv)).sum()
    if loss_fn == "dro":
        beta = lcfg.get("beta", 0.05)
        return (-(lp * adv - 0.5 * beta * (lp - old) ** 2)).sum()
    lo = lcfg.get("clip_low_threshold", 0.8)
    hi = lcfg.get("clip_high_threshold", 1.2)
    clipped = torch.clamp(ratio, lo, hi)
    if loss_fn == "cispo":
        return (-(clipped.detach() * adv * lp)).sum()
    return (-torch.min(ratio * adv, clipped * adv)).sum()


def train_loop(req, params, loss_fn):
    """torch.optim.AdamW over params for req["steps"] steps of loss_fn()."""
    ap = req["adam"]
    opt = torch.optim.AdamW([p for _, p in params], lr=ap["learning_rate"],
                            betas=(ap.get("beta1", 0.9), ap.get("beta2", 0.95)),
                            eps=ap.get("eps", 1e-12), weight_decay=ap.get("weight_decay", 0.0))
    losses, norms = [], []
    for _ in range(req["steps"]):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        clip = ap.get("grad_clip_norm", 0.0)
        ps = [p for _, p in params]
        if clip > 0:
            n = torch.nn.utils.clip_grad_norm_(ps, clip)
        else:
            n = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ps))
        opt.step()
        losses.append(float(loss))
        norms.append(float(n))
    return {"losses": losses, "grad_norms": norms}


def cmd_bench(req):
    """LoRA training steps (forward, backward, AdamW) on a random model of the
    given shape, batch × seq tokens, rank r on all seven linear layers."""
    torch.set_num_threads(req.get("threads", 2))
    torch.manual_seed(0)
    c = req["config"]
    H, L, nh, nkv, I, V = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                           c["num_key_value_heads"], c["intermediate_size"], c["vocab_size"])
    d = c.get("head_dim") or H // nh
    B, T, r = req["batch"], req["seq"], req["rank"]
    s = 0.02
    w = {"model.embed_tokens.weight": torch.randn(V, H) * s, "model.norm.weight": torch.ones(H)}
    shapes = {"q_proj": (nh * d, H), "k_proj": (nkv * d, H), "v_proj": (nkv * d, H), "o_proj": (H, nh * d),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    model = Llama(dict(c, tie_word_embeddings=True), {}, torch.float32)
    for i in range(L):
        for m, sh in shapes.items():
            part = "self_attn" if m in MODULES_ATTN else "mlp"
            w["model.layers.%d.%s.%s.weight" % (i, part, m)] = torch.randn(*sh) * s
        w["model.layers.%d.input_layernorm.weight" % i] = torch.ones(H)
        w["model.layers.%d.post_attention_layernorm.weight" % i] = torch.ones(H)
    model.w = w
    model.scale = 2.0
    params = []
    for i in range(L):
        for m, (o, inn) in shapes.items():
            a = (torch.rand(r, inn) * 2 - 1).mul_(1 / math.sqrt(inn)).requires_grad_(True)
            b = torch.zeros(o, r).requires_grad_(True)
            model.lora[(i, m)] = (a, b)
            params += [a, b]
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (B, T + 1), generator=g)
    configs = []
    for threads in req.get("threads_list", [req.get("threads", 2)]):
        torch.set_num_threads(int(threads))
        for p in params:  # every configuration starts from the same adapter
            p.grad = None
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        times = []
        for _ in range(req.get("steps", 3) + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = 0
            for b in range(B):
                logits = model.logits(data[b, :T])
                loss = loss + torch.nn.functional.cross_entropy(logits, data[b, 1:], reduction="sum")
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        times = sorted(times[1:])  # the first step warms up allocators and threads
        med = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
        configs.append({"torch_threads": torch.get_num_threads(),
                        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
                        "tokens_per_s": B * T / med, "step_s": times})
    out = dict(configs[-1])
    out["configs"] = configs
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main():
    cmd = sys.argv[1]
    req = json.load(sys.stdin)
    out = {"bench": cmd_bench}[cmd](req)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
