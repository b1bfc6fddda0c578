#!/usr/bin/env python3
"""Hand-written PyTorch Llama forward pass and KV-cache decode: the
inference benchmark's plain-PyTorch peer.

A benchmark helper, not part of the product (the tests judge the engine with
Hugging Face transformers + PEFT, hf_ref.py). scripts/bench-engine-infer.sh
times it beside the Go engine on $SIGNAL_PYTHON (default /usr/bin/python3,
Debian's python3-torch). It needs torch and numpy only: safetensors are read
by hand.

Usage: llama_ref.py < request.json > answer.json, where request is one of

  {"cmd": "bench", "model": DIR, "threads_list": [1, 2], "prefill_tokens": n,
   "decode_tokens": n, "decode_batch": b, "repeats": r}
      -> {"configs": [{"torch_threads", "openblas_threads", "prefill_tokens_per_s",
          "decode_tokens_per_s"}, ...]}  (medians; OpenBLAS threads from the env)
  {"cmd": "batch", "requests": [request, ...]}
      -> {"answers": [answer, ...]}
"""
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch


def read_safetensors(path):
    """Returns {name: float32 torch tensor}; F32, BF16 and F16 only."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        buf = raw[base + s:base + e]
        dt = info["dtype"]
        if dt == "F32":
            arr = np.frombuffer(buf, dtype="<f4").copy()
        elif dt == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        else:
            raise ValueError("unsupported dtype %s for %s" % (dt, name))
        out[name] = torch.from_numpy(arr.reshape(info["shape"]))
    return out


def load_model(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    w = read_safetensors(os.path.join(d, "model.safetensors"))
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rms_norm_eps", 1e-6)
    if cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    return cfg, w


def load_adapter(d):
    """Returns {(layer, module): (A, B)} and the scale alpha/r."""
    if not d:
        return {}, 0.0
    with open(os.path.join(d, "adapter_config.json")) as f:
        ac = json.load(f)
    t = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    lora = {}
    for name, v in t.items():
        # base_model.model.model.layers.{i}.{self_attn|mlp}.{mod}.lora_{A|B}.weight
        parts = name.split(".")
        layer, mod, ab = int(parts[4]), parts[6], parts[7]
        a, b = lora.get((layer, mod), (None, None))
        lora[(layer, mod)] = (v, b) if ab == "lora_A" else (a, v)
    r = ac["r"]
    scale = ac["lora_alpha"] / (math.sqrt(r) if ac.get("use_rslora") else r)
    return lora, scale


def inv_freq(cfg):
    d = cfg["head_dim"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < high_wl) * ~(wl > low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Llama:
    def __init__(self, model_dir, adapter_dir=None):
        self.cfg, self.w = load_model(model_dir)
        self.lora, self.scale = load_adapter(adapter_dir)
        self.inv = inv_freq(self.cfg)

    def lin(self, x, layer, mod, weight):
        y = x @ weight.t()
        ab = self.lora.get((layer, mod))
        if ab is not None:
            y = y + self.scale * ((x @ ab[0].t()) @ ab[1].t())
        return y

    def norm(self, x, weight):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.cfg["rms_norm_eps"]) * weight

    def forward(self, tokens, cache=None, pos0=0):
        """tokens: [B, T] LongTensor. cache: list per layer of (k, v)
        preallocated [B, kv, maxlen, d] tensors, or None for no cache.
        Returns the final normed hidden states [B, T, hidden]."""
        c, w = self.cfg, self.w
        H, KV, D = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        B, T = tokens.shape
        x = w["model.embed_tokens.weight"][tokens]
        pos = torch.arange(pos0, pos0 + T, dtype=torch.float32)
        freqs = pos[:, None] * self.inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for i in range(c["num_hidden_layers"]):
            p = "model.layers.%d." % i
            h = self.norm(x, w[p + "input_layernorm.weight"])
            q = self.lin(h, i, "q_proj", w[p + "self_attn.q_proj.weight"]).view(B, T, H, D).transpose(1, 2)
            k = self.lin(h, i, "k_proj", w[p + "self_attn.k_proj.weight"]).view(B, T, KV, D).transpose(1, 2)
            v = self.lin(h, i, "v_proj", w[p + "self_attn.v_proj.weight"]).view(B, T, KV, D).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if cache is not None:
                ck, cv = cache[i]
                ck[:, :, pos0:pos0 + T] = k
                cv[:, :, pos0:pos0 + T] = v
                k, v = ck[:, :, :pos0 + T], cv[:, :, :pos0 + T]
            n = k.shape[2]
            if H != KV:
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            if T > 1:
                mask = torch.ones(T, n, dtype=torch.bool).tril(diagonal=n - T)
                s = s.masked_fill(~mask, float("-inf"))
            a = torch.softmax(s, dim=-1) @ v
            a = a.transpose(1, 2).reshape(B, T, H * D)
            x = x + self.lin(a, i, "o_proj", w[p + "self_attn.o_proj.weight"])
            h = self.norm(x, w[p + "post_attention_layernorm.weight"])
            g = self.lin(h, i, "gate_proj", w[p + "mlp.gate_proj.weight"])
            u = self.lin(h, i, "up_proj", w[p + "mlp.up_proj.weight"])
            x = x + self.lin(torch.nn.functional.silu(g) * u, i, "down_proj", w[p + "mlp.down_proj.weight"])
        return self.norm(x, w["model.norm.weight"])

    def head(self, h):
        return h @ self.w["lm_head.weight"].t()


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def cmd_bench(req):
    """Times prefill and decode under torch.inference_mode(). With
    "threads_list", each torch thread count is measured in turn in this one
    process (OpenBLAS's own count comes from OPENBLAS_NUM_THREADS, read when
    torch loads); each figure is the median of "repeats" runs after a warm-up."""
    m = Llama(req["model"])
    c = m.cfg
    vocab = c["vocab_size"]
    n_pre, n_dec, batch = req["prefill_tokens"], req["decode_tokens"], req.get("decode_batch", 1)
    repeats = req.get("repeats", 3)
    configs = []
    for threads in req.get("threads_list", [req.get("threads", 2)]):
        torch.set_num_threads(int(threads))
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, vocab, (1, n_pre), generator=g)
        pre, dec = [], []
        with torch.inference_mode():
            for r in range(repeats + 1):
                t0 = time.perf_counter()
                h = m.forward(prompt)
                m.head(h[:, -1])
                if r > 0:  # the first run warms up allocators and thread pools
                    pre.append(time.perf_counter() - t0)
            # Decode: batch sequences of an 8-token prompt, one token per step
            # against a preallocated KV cache.
            maxlen = 8 + n_dec
            for r in range(repeats + 1):
                cache = [(torch.zeros(batch, c["num_key_value_heads"], maxlen, c["head_dim"]),
                          torch.zeros(batch, c["num_key_value_heads"], maxlen, c["head_dim"]))
                         for _ in range(c["num_hidden_layers"])]
                start = torch.randint(0, vocab, (batch, 8), generator=g)
                h = m.forward(start, cache, 0)
                tok = torch.argmax(m.head(h[:, -1]), dim=-1, keepdim=True)
                t0 = time.perf_counter()
                for i in range(n_dec):
                    h = m.forward(tok, cache, 8 + i)
                    tok = torch.argmax(m.head(h[:, -1]), dim=-1, keepdim=True)
                if r > 0:
                    dec.append(time.perf_counter() - t0)
        configs.append({"torch_threads": torch.get_num_threads(),
                        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", ""),
                        "prefill_tokens_per_s": n_pre / _median(pre),
                        "decode_tokens_per_s": batch * n_dec / _median(dec)})
    out = dict(configs[-1])
    out["configs"] = configs
    out["torch"] = torch.__version__
    return out


def run(req):
    if req.get("cmd") == "batch":
        return {"answers": [run(r) for r in req["requests"]]}
    fn = {"bench": cmd_bench}.get(req.get("cmd"))
    if fn is None:
        sys.exit("unknown cmd %r" % req.get("cmd"))
    return fn(req)


def main():
    json.dump(run(json.load(sys.stdin)), sys.stdout)


if __name__ == "__main__":
    main()
