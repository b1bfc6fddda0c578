"""Llama-family model on PyTorch: Hugging Face directories in, LoRA applied
unmerged on a frozen base, padded batches for training and a KV cache for
sampling.

The base weights are loaded once per (directory, device, dtype) and shared
read-only by every session of the worker; a session owns only its LoRA
tensors and optimizer moments.
"""

import json
import math
import os
import threading

import torch
import torch.nn.functional as F

from . import safetensors, stopbytes

# The module names LoRA may target, as PEFT spells them, and where each lives.
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTN_MODULES + MLP_MODULES

# scaled_dot_product_attention arrived in torch 2.0; Debian's 1.13 lacks it.
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class ModelError(ValueError):
    """A model directory that cannot be loaded (missing or inconsistent files)."""


def module_path(layer, module):
    """The Hugging Face parameter prefix of one linear module of one layer."""
    group = "self_attn" if module in ATTN_MODULES else "mlp"
    return f"model.layers.{layer}.{group}.{module}"


class Config:
    """The fields of a Llama config.json that the forward pass needs."""

    def __init__(self, d):
        def need(key, kind=int):
            if key not in d:
                raise ModelError(f"config.json: missing {key}")
            v = d[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ModelError(f"config.json: {key} = {v!r} is not a positive number")
            return kind(v)

        self.hidden = need("hidden_size")
        self.intermediate = need("intermediate_size")
        self.layers = need("num_hidden_layers")
        self.heads = need("num_attention_heads")
        self.kv_heads = int(d.get("num_key_value_heads") or self.heads)
        self.head_dim = int(d.get("head_dim") or self.hidden // self.heads)
        self.vocab = need("vocab_size")
        self.max_pos = int(d.get("max_position_embeddings") or 4096)
        # Mistral: serve at most the sliding window, inside which windowed
        # attention is plain causal attention (the native engine's rule).
        window = d.get("sliding_window")
        if d.get("use_sliding_window") is False:
            window = None  # Qwen2 lists a window it does not use
        if isinstance(window, int) and 0 < window < self.max_pos:
            self.max_pos = window
        self.eps = float(d.get("rms_norm_eps") or 1e-5)
        # transformers 5 writes rope_theta and the scaling into one
        # rope_parameters object; older configs keep them apart.
        rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
        self.rope_theta = float(rp.get("rope_theta") or d.get("rope_theta") or 10000.0)
        self.rope_scaling = d.get("rope_scaling") or (rp if (rp.get("rope_type") or "default") != "default" else None)
        self.tied = bool(d.get("tie_word_embeddings", False))
        eos = d.get("eos_token_id")
        self.eos = [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]
        self.bos = d.get("bos_token_id")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"config.json: hidden_act {act!r} is not supported (silu only)")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ModelError("config.json: attention_bias/mlp_bias are not supported")
        if self.heads % self.kv_heads:
            raise ModelError(f"config.json: num_attention_heads {self.heads} is not a multiple "
                             f"of num_key_value_heads {self.kv_heads}")
        self.raw = d

    def module_shape(self, module):
        """[out, in] of a linear module."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (q, self.hidden), "k_proj": (kv, self.hidden), "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q), "gate_proj": (self.intermediate, self.hidden),
            "up_proj": (self.intermediate, self.hidden), "down_proj": (self.hidden, self.intermediate),
        }[module]

    def params_per_token_flops(self):
        """Multiply-adds per token of the base model's linear layers (incl. the LM head)."""
        per_layer = sum(o * i for o, i in (self.module_shape(m) for m in ALL_MODULES))
        return per_layer * self.layers + self.vocab * self.hidden


def rope_inv_freq(cfg):
    """Inverse RoPE frequencies, with Llama 3's rope_scaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "llama3":
        factor = float(rs.get("factor", 8.0))
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old = float(rs.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old / low, old / high
        wl = 2 * math.pi / inv
        out = torch.where(wl > low_wl, inv / factor, inv)
        smooth = (old / wl - low) / (high - low)
        mid = (1 - smooth) * out / factor + smooth * out
        is_mid = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(is_mid, mid, out)
    elif kind not in (None, "default"):
        raise ModelError(f"config.json: rope_scaling type {kind!r} is not supported")
    return inv


def _load_tensors(dir_):
    single = os.path.join(dir_, "model.safetensors")
    index = os.path.join(dir_, "model.safetensors.index.json")
    if os.path.exists(single):
        return safetensors.read(single)
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f).get("weight_map") or {}
        out = {}
        for shard in sorted(set(wm.values())):
            if os.path.basename(shard) != shard:
                raise ModelError(f"{index}: shard name {shard!r} is not a plain file name")
            out.update(safetensors.read(os.path.join(dir_, shard)))
        return out
    raise ModelError(f"model {dir_}: no model.safetensors or model.safetensors.index.json")


class Model:
    """Frozen base weights of a Llama model on one device, shared by sessions."""

    def __init__(self, cfg, weights, device, dtype, name=""):
        self.cfg = cfg
        self.w = weights
        self.device = torch.device(device)
        self.dtype = dtype
        self.name = name
        inv = rope_inv_freq(cfg)
        self.inv_freq = inv.to(torch.float32).to(self.device)

    @classmethod
    def load(cls, dir_, device="cpu", dtype=None):
        """Loads config.json and the safetensors weights of a Hugging Face Llama
        directory. dtype defaults to bf16 on CUDA and f32 elsewhere."""
        dev = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        try:
            with open(os.path.join(dir_, "config.json")) as f:
                cfg = Config(json.load(f))
        except FileNotFoundError as e:
            raise ModelError(f"model {dir_}: no config.json") from e
        except json.JSONDecodeError as e:
            raise ModelError(f"model {dir_}: config.json: {e}") from e
        raw = _load_tensors(dir_)
        w = {}
        for name, t in raw.items():
            w[name] = t.to(device=dev, dtype=dtype)
        m = cls(cfg, w, dev, dtype, name=os.path.basename(os.path.normpath(dir_)))
        m._check()
        m.dir = dir_
        return m

    def token_bytes(self):
        """The tokenizer's per-token bytes for stop strings (stopbytes), read
        once per model on first use; None without a usable tokenizer.json."""
        if not hasattr(self, "_token_bytes"):
            d = getattr(self, "dir", None)
            self._token_bytes = stopbytes.TokenBytes.load(d) if d else None
        return self._token_bytes

    def _check(self):
        c = self.cfg
        need = {"model.embed_tokens.weight": (c.vocab, c.hidden), "model.norm.weight": (c.hidden,)}
        if not c.tied:
            need["lm_head.weight"] = (c.vocab, c.hidden)
        for i in range(c.layers):
            need[f"model.layers.{i}.input_layernorm.weight"] = (c.hidden,)
            need[f"model.layers.{i}.post_attention_layernorm.weight"] = (c.hidden,)
            for m in ALL_MODULES:
                need[module_path(i, m) + ".weight"] = c.module_shape(m)
        for k, shape in need.items():
            if k not in self.w:
                raise ModelError(f"model {self.name}: missing tensor {k}")
            if tuple(self.w[k].shape) != tuple(shape):
                raise ModelError(f"model {self.name}: tensor {k} has shape "
                                 f"{tuple(self.w[k].shape)}, config says {shape}")
        if c.tied or "lm_head.weight" not in self.w:
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]

    def memory_bytes(self):
        seen, total = set(), 0
        for t in self.w.values():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    # ---- building blocks ----

    def _rms(self, x, weight):
        # As Hugging Face: normalise in (at least) f32, scale in the model dtype.
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return weight * xf.to(x.dtype)

    def _rope(self, pos):
        """cos, sin of shape [B, T, head_dim] for integer positions [B, T]."""
        f = pos.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _apply_rope(x, cos, sin):
        # x [B, H, T, D]; rotate-half as Hugging Face does.
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return x * cos[:, None] + rot * sin[:, None]

    def _linear(self, x, layer, module, lora):
        # Qwen2's q/k/v carry biases (frozen, like every base weight); the
        # node's model check admits a bias nowhere else.
        path = module_path(layer, module)
        y = F.linear(x, self.w[path + ".weight"], self.w.get(path + ".bias"))
        if lora is not None:
            ab = lora.get(layer, module)
            if ab is not None:
                a, b = ab
                # The adapter's f32 master weights, cast to the compute dtype: on
                # CUDA the thin rank-r products run in bf16 like the base.
                y = y + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * lora.scale
        return y

    def _attend(self, q, k, v, mask, causal):
        """q [B,H,Tq,D], k/v [B,KV,Tk,D]; mask: bool [B,1,Tq,Tk] (True = attend) or None."""
        rep = self.cfg.heads // self.cfg.kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if HAS_SDPA:
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if scores.dtype != torch.float64:
            scores = scores.float()
        scores = scores / math.sqrt(q.shape[-1])
        if mask is None and causal:
            tq, tk = q.shape[-2], k.shape[-2]
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(p, v)

    def _layer(self, x, i, cos, sin, lora, mask, causal, cache=None, start=0):
        c = self.cfg
        b, t, _ = x.shape
        h = self._rms(x, self.w[f"model.layers.{i}.input_layernorm.weight"])
        q = self._linear(h, i, "q_proj", lora).view(b, t, c.heads, c.head_dim)
        k = self._linear(h, i, "k_proj", lora).view(b, t, c.kv_heads, c.head_dim)
        qn = self.w.get(f"model.layers.{i}.self_attn.q_norm.weight")
        if qn is not None:  # Qwen3: each q and k head RMS-normed before RoPE
            q = self._rms(q, qn)
            k = self._rms(k, self.w[f"model.layers.{i}.self_attn.k_norm.weight"])
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self._linear(h, i, "v_proj", lora).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q = self._apply_rope(q, cos, sin)
        k = self._apply_rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache
            ck[:, :, start:start + t] = k
            cv[:, :, start:start + t] = v
            k, v = ck[:, :, :start + t], cv[:, :, :start + t]
        a = self._attend(q, k, v, mask, causal)
        a = a.transpose(1, 2).reshape(b, t, c.heads * c.head_dim)
        x = x + self._linear(a, i, "o_proj", lora)
        h = self._rms(x, self.w[f"model.layers.{i}.post_attention_layernorm.weight"])
        g = self._linear(h, i, "gate_proj", lora)
        u = self._linear(h, i, "up_proj", lora)
        return x + self._linear(F.silu(g) * u, i, "down_proj", lora)

    def hidden_states(self, tokens, lora=None):
        """Final-norm hidden states [B, T, hidden] of a right-padded batch [B, T]:
        causal attention means padding at the end never reaches real tokens."""
        b, t = tokens.shape
        x = F.embedding(tokens, self.w["model.embed_tokens.weight"])
        pos = torch.arange(t, device=self.device).expand(b, t)
        cos, sin = self._rope(pos)
        for i in range(self.cfg.layers):
            x = self._layer(x, i, cos, sin, lora, None, True)
        return self._rms(x, self.w["model.norm.weight"])

    def logits(self, tokens, lora=None):
        return F.linear(self.hidden_states(tokens, lora), self.w["lm_head.weight"])

    # ---- cached decoding ----

    def new_cache(self, batch, length):
        c = self.cfg
        shape = (batch, c.kv_heads, length, c.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(c.layers)]

    def step(self, tokens, pos, key_valid, cache, start, lora=None):
        """Runs tokens [B, T] at cache slots start..start+T with RoPE positions
        pos [B, T]; key_valid [B, start+T] marks real (non-padding) slots.
        Returns the last position's logits [B, vocab] in f32."""
        b, t = tokens.shape
        total = start + t
        x = F.embedding(tokens, self.w["model.embed_tokens.weight"])
        cos, sin = self._rope(pos)
        causal = torch.ones(t, total, dtype=torch.bool, device=self.device).tril(start)
        mask = causal[None] & key_valid[:, None, :total]
        # A padding query with no valid key would softmax over nothing (NaN):
        # let every query see its own slot; padding outputs are never read.
        diag = torch.zeros(t, total, dtype=torch.bool, device=self.device)
        diag[torch.arange(t), start + torch.arange(t)] = True
        mask = (mask | diag[None])[:, None]
        for i in range(self.cfg.layers):
            x = self._layer(x, i, cos, sin, lora, mask, False, cache=cache[i], start=start)
        x = self._rms(x[:, -1:], self.w["model.norm.weight"])
        return F.linear(x, self.w["lm_head.weight"])[:, 0].float()


class ModelCache:
    """Loads each base model once per worker; sessions share it."""

    def __init__(self, device, dtype=None):
        self.device = device
        self.dtype = dtype
        self._models = {}
        self._refs = {}
        self._lock = threading.Lock()

    def acquire(self, dir_, name=""):
        """Returns (key, model), loading the model on first use. name is the
        base model's name as the node knows it (the directory's name when
        empty); health reports it."""
        key = os.path.realpath(dir_)
        with self._lock:
            m = self._models.get(key)
            if m is None:
                m = Model.load(key, self.device, self.dtype)
                m.name = name or os.path.basename(os.path.normpath(dir_))
                self._models[key] = m
            self._refs[key] = self._refs.get(key, 0) + 1
            return key, m

    def release(self, key):
        """Drops one reference; the model stays loaded for the next session on
        it (placement prefers nodes holding it), so nothing is freed here."""
        with self._lock:
            if key in self._refs:
                self._refs[key] -= 1

    def names(self):
        with self._lock:
            return sorted(m.name for m in self._models.values())

    def memory_bytes(self):
        with self._lock:
            return sum(m.memory_bytes() for m in self._models.values())
