"""A run's session on the worker: a LoRA adapter over a shared frozen base,
gradient accumulation, the loss functions, AdamW, sampling and PEFT state.

Semantics follow the native Go engine (package trainer) so that a run can
move between backends: losses are sums over tokens, forward_backward adds
d(loss_sum) to the accumulated gradient, optim_step applies AdamW as PyTorch
does and clears it; a rejected call leaves the session unchanged.
"""

import json
import math
import os
import secrets

import torch
import torch.nn.functional as F

from . import gumbel, safetensors
from .model import ALL_MODULES, module_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
# The native engine's full-checkpoint format (trainer/state.go): optimizer
# moments as <peft prefix>.lora_{A,B}.{exp_avg,exp_avg_sq[,grad]} and
# trainer_state.json with the step; a checkpoint moves between backends.
STATE_FORMAT = "signal-trainer-state/1"

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
DEFAULT_LR = 1e-4


class InvalidInput(ValueError):
    """A request the caller got wrong: answered as invalid_request (HTTP 400)."""


def peft_name(layer, module, which):
    """PEFT's tensor name for lora_A / lora_B of one module."""
    return f"base_model.model.{module_path(layer, module)}.lora_{which}.weight"


def _finite_list(v, name, i, n):
    if not isinstance(v, list) or len(v) != n:
        raise InvalidInput(f"data[{i}].loss_fn_inputs.{name}: want {n} numbers (one per token), "
                           f"got {len(v) if isinstance(v, list) else type(v).__name__}")
    for j, x in enumerate(v):
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            raise InvalidInput(f"data[{i}].loss_fn_inputs.{name}[{j}] = {x!r} is not a finite number")
    return v


class LoRA:
    """Adapter weights: per (layer, module) an A [r, in] and a B [out, r] in
    f32 (master weights; the forward casts them to the compute dtype)."""

    def __init__(self, cfg, rank, alpha, targets, device, dtype=torch.float32):
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.targets = list(targets)
        self.layers = cfg.layers
        self.ab = {}
        for i in range(cfg.layers):
            for m in self.targets:
                out, inp = cfg.module_shape(m)
                self.ab[(i, m)] = (torch.zeros(rank, inp, device=device, dtype=dtype),
                                   torch.zeros(out, rank, device=device, dtype=dtype))

    def get(self, layer, module):
        return self.ab.get((layer, module))

    def init_peft(self, seed):
        """PEFT's init: A kaiming-uniform(a=√5), i.e. U(±1/√in); B zero.
        Drawn on the CPU in a fixed order so a seed gives the same adapter on
        every device."""
        g = torch.Generator().manual_seed(int(seed))
        for key in self.keys():
            a, b = self.ab[key]
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound))
            b.zero_()

    def keys(self):
        """(layer, module) in a fixed order: layers, then ALL_MODULES order."""
        return [(i, m) for i in range(self.layers) for m in ALL_MODULES if (i, m) in self.ab]

    def params(self):
        out = []
        for k in self.keys():
            out.extend(self.ab[k])
        return out

    def named(self):
        out = {}
        for (i, m) in self.keys():
            a, b = self.ab[(i, m)]
            out[peft_name(i, m, "A")] = a
            out[peft_name(i, m, "B")] = b
        return out


def lr_at(schedule, step):
    """Learning rate of optimizer step `step` (counted from 1, so warmup never
    applies a zero rate) under an LRSchedule dict, or None when there is none.
    Same formulas as the native engine's LRSchedule.At."""
    if not schedule:
        return None
    step = max(step, 1)
    peak = float(schedule.get("peak_lr", 0))
    warm = int(schedule.get("warmup_steps") or 0)
    total = int(schedule.get("total_steps") or 0)
    final = float(schedule.get("final_fraction") or 0)
    kind = schedule.get("kind") or "constant"
    if warm > 0 and step <= warm:
        return peak * step / warm
    if kind == "constant":
        return peak
    frac = min(max((step - warm) / (total - warm), 0.0), 1.0)
    if kind == "linear":
        return peak * (1 - (1 - final) * frac)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac)))


def check_schedule(s):
    if s is None:
        return None
    if not isinstance(s, dict):
        raise InvalidInput("lr_schedule: want an object")
    kind = s.get("kind")
    if kind not in ("constant", "linear", "cosine"):
        raise InvalidInput(f"lr_schedule.kind {kind!r}: want constant, linear or cosine")
    peak = s.get("peak_lr")
    if not _num(peak) or peak <= 0:
        raise InvalidInput(f"lr_schedule.peak_lr {peak!r}: want a finite value > 0")
    for k in ("warmup_steps", "total_steps"):
        v = s.get(k) or 0
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidInput(f"lr_schedule.{k} {v!r}: want an integer >= 0")
    if kind != "constant":
        warm, total = s.get("warmup_steps") or 0, s.get("total_steps") or 0
        if total <= warm:
            raise InvalidInput(f"lr_schedule.total_steps {total}: want > warmup_steps ({warm})")
        ff = s.get("final_fraction") or 0
        if not _num(ff) or not 0 <= ff <= 1:
            raise InvalidInput(f"lr_schedule.final_fraction {ff!r}: want within [0, 1]")
    return s


def _master_dtype(model):
    """Adapter master weights are f32 (over a bf16 or f32 base); a float64
    base (tests) gets float64 adapters so finite differences are exact."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Session:
    """One run's adapter and optimizer over a shared Model."""

    def __init__(self, model, rank=32, alpha=None, targets=None, seed=0, schedule=None):
        cfg = model.cfg
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 1024:
            raise InvalidInput(f"lora_rank = {rank!r}: want an integer in 1..1024")
        alpha = float(rank if alpha in (None, 0) else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise InvalidInput(f"lora_alpha = {alpha!r}: want a positive number")
        targets = list(targets or ALL_MODULES)
        for t in targets:
            if t not in ALL_MODULES:
                raise InvalidInput(f"target_modules: {t!r} is not one of {', '.join(ALL_MODULES)}")
        targets = [m for m in ALL_MODULES if m in targets]
        self.model = model
        self.schedule = check_schedule(schedule)
        self.lora = LoRA(cfg, rank, alpha, targets, model.device, _master_dtype(model))
        self.lora.init_peft(seed)
        self.step = 0
        self._reset_optimizer()
        self.grads = None

    def _reset_optimizer(self):
        self.m = [torch.zeros_like(p) for p in self.lora.params()]
        self.v = [torch.zeros_like(p) for p in self.lora.params()]

    # ---- data ----

    def _check_data(self, data, rl=False):
        if not isinstance(data, list) or not data:
            raise InvalidInput("data: want a non-empty list of Datum")
        cfg = self.model.cfg
        out = []
        for i, d in enumerate(data):
            if not isinstance(d, dict):
                raise InvalidInput(f"data[{i}]: want an object")
            toks = (d.get("model_input") or {}).get("tokens")
            inp = d.get("loss_fn_inputs") or {}
            tgt = inp.get("target_tokens")
            if not isinstance(toks, list) or not toks:
                raise InvalidInput(f"data[{i}].model_input.tokens: want a non-empty list of token ids")
            n = len(toks)
            if n > cfg.max_pos:
                raise InvalidInput(f"data[{i}].model_input.tokens: {n} tokens exceed the context "
                                   f"length {cfg.max_pos}")
            if not isinstance(tgt, list) or len(tgt) != n:
                raise InvalidInput(f"data[{i}].loss_fn_inputs.target_tokens: want {n} ids "
                                   f"(one per input token)")
            for field, ids in (("model_input.tokens", toks), ("loss_fn_inputs.target_tokens", tgt)):
                for j, t in enumerate(ids):
                    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab:
                        raise InvalidInput(f"data[{i}].{field}[{j}] = {t!r}: want a token id in "
                                           f"0..{cfg.vocab - 1}")
            w = inp.get("weights")
            if w is None and rl:
                w = [1.0] * n
            elif w is None:
                raise InvalidInput(f"data[{i}].loss_fn_inputs.weights: required by cross_entropy "
                                   f"(one per token)")
            else:
                w = _finite_list(w, "weights", i, n)
            lp = inp.get("logprobs")
            adv = inp.get("advantages")
            lp = None if lp is None else _finite_list(lp, "logprobs", i, n)
            adv = None if adv is None else _finite_list(adv, "advantages", i, n)
            out.append((toks, tgt, w, lp, adv))
        return out

    def _loss(self, data, loss_fn, loss_cfg, grad, top_k=0):
        if loss_fn in (None, ""):
            loss_fn = "cross_entropy"
        if loss_fn not in LOSS_FNS:
            raise InvalidInput(f"loss_fn = {loss_fn!r}: want one of {', '.join(LOSS_FNS)}")
        loss_cfg = loss_cfg or {}
        if not isinstance(loss_cfg, dict):
            raise InvalidInput("loss_fn_config: want an object")
        lo, hi, beta = 0.8, 1.2, 0.05
        settings = {"ppo": ("clip_low_threshold", "clip_high_threshold"),
                    "cispo": ("clip_low_threshold", "clip_high_threshold"), "dro": ("beta",)}
        for k in sorted(loss_cfg):
            v = loss_cfg[k]
            if k not in settings.get(loss_fn, ()):
                raise InvalidInput(f"loss_fn_config.{k}: not a setting of loss_fn {loss_fn!r}")
            if not _num(v) or v < 0:
                raise InvalidInput(f"loss_fn_config.{k} {v!r}: want a finite value >= 0")
            if k == "clip_low_threshold":
                lo = float(v)
            elif k == "clip_high_threshold":
                hi = float(v)
            else:
                beta = float(v)
        if lo > hi:
            raise InvalidInput(f"loss_fn_config.clip_low_threshold {lo} above clip_high_threshold {hi}")
        rows = self._check_data(data, loss_fn != "cross_entropy")
        if loss_fn != "cross_entropy":
            for i, r in enumerate(rows):
                if r[3] is None or r[4] is None:
                    raise InvalidInput(f"data[{i}].loss_fn_inputs: {loss_fn} needs logprobs and advantages")
        dev = self.model.device
        b, t = len(rows), max(len(r[0]) for r in rows)
        tokens = torch.zeros(b, t, dtype=torch.long)
        targets = torch.zeros(b, t, dtype=torch.long)
        weights = torch.zeros(b, t, dtype=torch.float64)
        old = torch.zeros(b, t, dtype=torch.float64)
        adv = torch.zeros(b, t, dtype=torch.float64)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for i, (tk, tg, w, lp, ad) in enumerate(rows):
            n = len(tk)
            tokens[i, :n] = torch.tensor(tk)
            targets[i, :n] = torch.tensor(tg)
            weights[i, :n] = torch.tensor(w, dtype=torch.float64)
            valid[i, :n] = True
            if lp is not None:
                old[i, :n] = torch.tensor(lp, dtype=torch.float64)
                adv[i, :n] = torch.tensor(ad, dtype=torch.float64)
        tokens, targets, weights, old, adv, valid = (x.to(dev) for x in
                                                     (tokens, targets, weights, old, adv, valid))
        params = self.lora.params()
        with torch.set_grad_enabled(grad):
            for p in params:
                p.requires_grad_(grad)
            try:
                logits = self.model.logits(tokens, self.lora)
                # f32 log-softmax of every position (fused inside cross_entropy).
                if logits.dtype != torch.float64:
                    logits = logits.float()
                logp = -F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(-1),
                                        reduction="none").reshape(b, t)
                logp = logp * valid
                if loss_fn == "cross_entropy":
                    per = -weights * logp
                else:
                    ratio = torch.exp(logp - old) * valid
                    if loss_fn == "importance_sampling":
                        per = -ratio * adv
                    elif loss_fn == "cispo":
                        # The clipped ratio weighs the gradient and carries none.
                        per = -(ratio.clamp(lo, hi).detach() * adv * logp)
                    elif loss_fn == "dro":
                        d = (logp - old) * valid
                        per = -(adv * logp - 0.5 * beta * d * d)
                    else:
                        # -min(ratio·A, clip(ratio)·A); the clipped branch is
                        # constant in logp, so no gradient flows through it.
                        unclipped = ratio * adv
                        clipped = (ratio.clamp(lo, hi) * adv).detach()
                        per = -torch.where(unclipped <= clipped, unclipped, clipped)
                loss = per.sum()
                grads = torch.autograd.grad(loss, params) if grad else None
            finally:
                for p in params:
                    p.requires_grad_(False)
        lp_out = [logp[i, :len(r[0])].detach().float().cpu().tolist() for i, r in enumerate(rows)]
        top = None
        if top_k:
            # Each position's top_k next tokens, most likely first, from the
            # same log-softmax (ties: the lower id first, as the native engine).
            with torch.no_grad():
                ls = torch.log_softmax(logits.float(), dim=-1)
                vals, ids = torch.topk(ls, top_k, dim=-1, sorted=True)
            top = ([ids[i, :len(r[0])].reshape(-1).cpu().tolist() for i, r in enumerate(rows)],
                   [vals[i, :len(r[0])].reshape(-1).cpu().tolist() for i, r in enumerate(rows)])
        ntok = sum(len(r[0]) for r in rows)
        wsum = float(sum(sum(r[2]) for r in rows))
        loss_sum = float(loss.detach())
        denom = wsum  # Σ weights, 1 per position where a datum has none (as native)
        res = {"loss_sum": loss_sum, "loss_mean": loss_sum / denom if denom > 0 else 0.0,
               "weight_sum": wsum, "tokens": ntok, "logprobs": lp_out}
        if top is not None:
            res["top_ids"], res["top_logprobs"] = top
        if grad:
            # One device→host sync for the norm, not one per tensor.
            gn = float(torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt())
            res["grad_norm"] = gn
            if not math.isfinite(gn):
                raise InvalidInput("forward_backward: the gradient is not finite (check logprobs/advantages)")
            if self.grads is None:
                self.grads = [g.detach().clone() for g in grads]
            else:
                for acc, g in zip(self.grads, grads):
                    acc.add_(g)
        return res

    def forward_backward(self, body):
        return self._loss(body.get("data"), body.get("loss_fn"), body.get("loss_fn_config"), True)

    def forward(self, body):
        top_k = body.get("top_k") or 0
        if not isinstance(top_k, int) or top_k < 0 or top_k > 20:
            raise InvalidInput(f"top_k {top_k!r}: want 0..20")
        with torch.no_grad():
            return self._loss(body.get("data"), body.get("loss_fn"), body.get("loss_fn_config"), False, top_k)

    # ---- optimizer ----

    def optim_step(self, body):
        ap = body.get("adam_params") or {}
        if not isinstance(ap, dict):
            raise InvalidInput("adam_params: want an object")

        def get(k, dflt, lo=None, hi=None, hi_open=False):
            v = ap.get(k)
            if v is None:
                return dflt
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
                raise InvalidInput(f"adam_params.{k} = {v!r}: want a finite number in "
                                   f"[{lo}, {hi}{')' if hi_open else ']'}")
            return float(v)

        # learning_rate 0 or absent: the schedule's rate, else the default.
        lr = get("learning_rate", 0.0, 0.0)
        if lr == 0:
            sched = lr_at(self.schedule, self.step + 1)
            lr = DEFAULT_LR if sched is None else sched
        b1 = get("beta1", 0.9, 0.0, 1.0, True)
        b2 = get("beta2", 0.95, 0.0, 1.0, True)
        eps = get("eps", 1e-12, 0.0)
        wd = get("weight_decay", 0.0, 0.0)
        clip = get("grad_clip_norm", 0.0, 0.0)
        if self.grads is None:
            raise InvalidInput("optim_step: no accumulated gradients (call forward_backward first)")
        gn = float(torch.stack([g.double().pow(2).sum() for g in self.grads]).sum().sqrt())
        # clip_grad_norm_'s factor: min(1, max/(norm + 1e-6)).
        coef = clip / (gn + 1e-6) if clip > 0 else 1.0
        coef = min(coef, 1.0)
        t = self.step + 1
        bc1 = 1 - b1 ** t
        bc2_sqrt = math.sqrt(1 - b2 ** t)
        with torch.no_grad():
            for p, g, m, v in zip(self.lora.params(), self.grads, self.m, self.v):
                if coef != 1.0:
                    g = g * coef
                # torch.optim.AdamW: decoupled decay, bias-corrected moments,
                # eps added to sqrt(v̂).
                p.mul_(1 - lr * wd)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)
        self.step = t
        self.grads = None
        return {"step": self.step, "learning_rate": lr, "grad_norm": gn}

    # ---- sampling ----

    def sample(self, body, default_stop_tokens=()):
        cfg = self.model.cfg
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise InvalidInput("prompts: want a non-empty list of {\"tokens\": [...]}")
        ptoks = []
        for i, p in enumerate(prompts):
            toks = p.get("tokens") if isinstance(p, dict) else None
            if not isinstance(toks, list) or not toks:
                raise InvalidInput(f"prompts[{i}].tokens: want a non-empty list of token ids "
                                   f"(text prompts are tokenized by the node)")
            for j, t in enumerate(toks):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab:
                    raise InvalidInput(f"prompts[{i}].tokens[{j}] = {t!r}: want a token id in 0..{cfg.vocab - 1}")
            ptoks.append(toks)
        n = body.get("num_samples")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise InvalidInput(f"num_samples = {n!r}: want an integer in 1..128")
        sp = body.get("sampling_params") or {}
        mx = sp.get("max_tokens")
        if not isinstance(mx, int) or isinstance(mx, bool) or mx < 1:
            raise InvalidInput(f"sampling_params.max_tokens = {mx!r}: want an integer >= 1")
        longest = max(len(p) for p in ptoks)
        if longest + mx > cfg.max_pos:
            raise InvalidInput(f"sampling_params.max_tokens = {mx}: prompt ({longest} tokens) + "
                               f"max_tokens exceed the context length {cfg.max_pos}")
        temp = sp.get("temperature")
        temp = 1.0 if temp is None else temp
        if not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp < 0:
            raise InvalidInput(f"sampling_params.temperature = {temp!r}: want a number >= 0")
        top_k = sp.get("top_k")
        top_k = -1 if top_k is None else top_k
        if not isinstance(top_k, int) or (top_k < 1 and top_k not in (-1, 0)):
            raise InvalidInput(f"sampling_params.top_k = {top_k!r}: want -1 (off) or an integer >= 1")
        top_p = sp.get("top_p")
        top_p = 1.0 if top_p is None else top_p
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise InvalidInput(f"sampling_params.top_p = {top_p!r}: want a number in (0, 1]")
        # The model's EOS ids always stop; the node adds the tokenizer's.
        stop_tokens = body.get("stop_tokens") or []
        if not isinstance(stop_tokens, list) or not all(isinstance(t, int) for t in stop_tokens):
            raise InvalidInput("stop_tokens: want a list of token ids")
        stop_tokens = list(default_stop_tokens) + stop_tokens
        # Stop strings: the node cuts the text exactly; the worker ends rows
        # early when the tokenizer lets it see them (stopbytes).
        stop = sp.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise InvalidInput(f"sampling_params.stop = {stop!r}: want a list of non-empty strings")
        seed = sp.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidInput(f"sampling_params.seed = {seed!r}: want an integer")
        with torch.no_grad():
            rows = self._generate([p for p in ptoks for _ in range(n)], mx, float(temp), top_k,
                                  float(top_p), set(stop_tokens), seed, stop, num_samples=n)
        samples = [rows[i * n:(i + 1) * n] for i in range(len(ptoks))]
        usage = {"prefill_tokens": sum(len(p) for p in ptoks) * n,
                 "sampled_tokens": sum(len(r["tokens"]) for r in rows)}
        return {"samples": samples}, usage

    def _generate(self, prompts, max_tokens, temp, top_k, top_p, stops, seed, stop_strings=(), num_samples=1):
        model = self.model
        dev = model.device
        r = len(prompts)
        tb = model.token_bytes() if stop_strings else None
        scan = [tb.scanner(stop_strings) for _ in range(r)] if tb else None
        plen = max(len(p) for p in prompts)
        # Left-pad so every row's next token lands in the same cache slot.
        pad = torch.tensor([plen - len(p) for p in prompts], device=dev)
        tokens = torch.zeros(r, plen, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, plen - len(p):] = torch.tensor(p)
        tokens = tokens.to(dev)
        total = plen + max_tokens
        slots = torch.arange(total, device=dev)
        key_valid = slots[None, :] >= pad[:, None]
        pos = (torch.arange(plen, device=dev)[None, :] - pad[:, None]).clamp_(min=0)
        cache = model.new_cache(r, total)
        # Seeded draws are the native engine's (gumbel.py): row i is sample
        # i % num_samples of prompt i // num_samples.
        if seed is None:
            seed = secrets.randbits(63)
        logits = model.step(tokens, pos, key_valid, cache, 0, self.lora)
        out = [[] for _ in range(r)]
        lps = [[] for _ in range(r)]
        reason = ["length"] * r
        done = [False] * r
        next_pos = plen - pad
        for s in range(max_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if temp == 0:
                tok = logits.argmax(dim=-1)
            else:
                z = logits / temp
                if top_k > 0 and top_k < z.shape[-1]:
                    kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
                    z = z.masked_fill(z < kth, float("-inf"))
                if top_p < 1.0:
                    sz, si = torch.sort(z, dim=-1, descending=True)
                    cp = torch.softmax(sz, dim=-1).cumsum(dim=-1)
                    # Keep the smallest prefix whose mass reaches top_p (the
                    # first token always stays).
                    drop = (cp - torch.softmax(sz, dim=-1)) >= top_p
                    sz = sz.masked_fill(drop, float("-inf"))
                    z = torch.full_like(z, float("-inf")).scatter(-1, si, sz)
                keys = [gumbel.key(seed, i // num_samples, i % num_samples, s) for i in range(r)]
                g = gumbel.noise(keys, z.shape[-1], device=z.device)
                tok = (z.to(torch.float64) + g).argmax(dim=-1)
            chosen_lp = logp.gather(-1, tok[:, None])[:, 0]
            tl, ll = tok.tolist(), chosen_lp.tolist()
            for i in range(r):
                if done[i]:
                    continue
                out[i].append(tl[i])
                lps[i].append(ll[i])
                if tl[i] in stops or (scan and scan[i].feed(tl[i])):
                    done[i] = True
                    reason[i] = "stop"
            if all(done) or s == max_tokens - 1:
                break
            logits = model.step(tok[:, None], (next_pos + s)[:, None], key_valid, cache, plen + s, self.lora)
        return [{"tokens": out[i], "text": "", "logprobs": lps[i], "stop_reason": reason[i]}
                for i in range(r)]

    # ---- state ----

    def save_state(self, body):
        dir_ = body.get("dir")
        mode = body.get("mode") or "adapter"
        if mode not in ("adapter", "full"):
            raise InvalidInput(f"mode = {mode!r}: want adapter or full")
        if not isinstance(dir_, str) or not dir_:
            raise InvalidInput("dir: want the directory to write the state files to")
        os.makedirs(dir_, exist_ok=True)
        l = self.lora
        cfg = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": l.rank, "lora_alpha": l.alpha,
            "lora_dropout": 0.0, "target_modules": l.targets, "bias": "none",
            "fan_in_fan_out": False, "base_model_name_or_path": self.model.name,
            "inference_mode": False,
        }
        tmp = os.path.join(dir_, ADAPTER_CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, os.path.join(dir_, ADAPTER_CONFIG))
        safetensors.write(os.path.join(dir_, ADAPTER_WEIGHTS), l.named(),
                          metadata={"format": "pt"})
        files = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
        if mode == "full":
            t = {}
            sets = [("exp_avg", self.m), ("exp_avg_sq", self.v)]
            if self.grads is not None:
                sets.append(("grad", self.grads))
            names = list(l.named().keys())
            for suffix, vals in sets:
                for name, x in zip(names, vals):
                    t[name[:-len("weight")] + suffix] = x.float()
            safetensors.write(os.path.join(dir_, OPTIMIZER_STATE), t, metadata={"format": STATE_FORMAT})
            st = {"format": STATE_FORMAT, "step": self.step, "has_grad": self.grads is not None}
            if self.schedule:
                st["lr_schedule"] = {"Kind": self.schedule.get("kind"), "PeakLR": self.schedule.get("peak_lr"),
                                     "WarmupSteps": self.schedule.get("warmup_steps") or 0,
                                     "TotalSteps": self.schedule.get("total_steps") or 0,
                                     "FinalFraction": self.schedule.get("final_fraction") or 0}
            tmp = os.path.join(dir_, TRAINER_STATE + ".tmp")
            with open(tmp, "w") as f:
                json.dump(st, f, indent=2)
            os.replace(tmp, os.path.join(dir_, TRAINER_STATE))
            files += [OPTIMIZER_STATE, TRAINER_STATE]
        return {"files": files, "step": self.step, "mode": mode}

    def load_state(self, body):
        """Replaces the adapter (and, when the directory has optimizer state,
        the moments and step) with the files in body["dir"]. Everything is read
        and checked before anything changes."""
        dir_ = body.get("dir")
        if not isinstance(dir_, str) or not dir_:
            raise InvalidInput("dir: want the directory holding the state files")
        cfg = self.model.cfg
        try:
            with open(os.path.join(dir_, ADAPTER_CONFIG)) as f:
                ac = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidInput(f"load_state: {ADAPTER_CONFIG}: {e}") from e
        rank, alpha = ac.get("r"), ac.get("lora_alpha")
        targets = ac.get("target_modules")
        if isinstance(targets, str):
            raise InvalidInput(f"load_state: target_modules {targets!r}: want a list")
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise InvalidInput(f"load_state: {ADAPTER_CONFIG}: r {rank!r} / lora_alpha {alpha!r} invalid")
        for t in targets or []:
            if t not in ALL_MODULES:
                raise InvalidInput(f"load_state: target module {t!r} is not supported")
        lora = LoRA(cfg, rank, alpha, [m for m in ALL_MODULES if m in targets], self.model.device,
                    _master_dtype(self.model))
        try:
            tensors = safetensors.read(os.path.join(dir_, ADAPTER_WEIGHTS))
        except (OSError, ValueError) as e:
            raise InvalidInput(f"load_state: {e}") from e
        named = lora.named()
        for name, dst in named.items():
            src = tensors.get(name)
            if src is None:
                # PEFT also writes names with the adapter name ("default").
                src = tensors.get(name.replace(".weight", ".default.weight"))
            if src is None:
                raise InvalidInput(f"load_state: {ADAPTER_WEIGHTS} lacks {name}")
            if tuple(src.shape) != tuple(dst.shape):
                raise InvalidInput(f"load_state: {name} has shape {tuple(src.shape)}, want {tuple(dst.shape)}")
            dst.copy_(src)
        # Adapter-only checkpoints restart the optimizer at step 0 (as native).
        step, m, v, grads, schedule = 0, None, None, None, None
        ts_path = os.path.join(dir_, TRAINER_STATE)
        if os.path.exists(ts_path):
            try:
                with open(ts_path) as f:
                    st = json.load(f)
                ot = safetensors.read(os.path.join(dir_, OPTIMIZER_STATE))
            except (OSError, ValueError) as e:
                raise InvalidInput(f"load_state: {e}") from e
            if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
                raise InvalidInput(f"load_state: {TRAINER_STATE}: format {st.get('format') if isinstance(st, dict) else st!r}, "
                                   f"want {STATE_FORMAT!r}")
            step = st.get("step")
            if not isinstance(step, int) or step < 0:
                raise InvalidInput(f"load_state: {TRAINER_STATE}: step {step!r}")
            has_grad = bool(st.get("has_grad"))
            ls = st.get("lr_schedule")
            if isinstance(ls, dict):
                schedule = check_schedule({"kind": ls.get("Kind", ls.get("kind")),
                                           "peak_lr": ls.get("PeakLR", ls.get("peak_lr")),
                                           "warmup_steps": ls.get("WarmupSteps", ls.get("warmup_steps")) or 0,
                                           "total_steps": ls.get("TotalSteps", ls.get("total_steps")) or 0,
                                           "final_fraction": ls.get("FinalFraction", ls.get("final_fraction")) or 0})
            suffixes = ["exp_avg", "exp_avg_sq"] + (["grad"] if has_grad else [])
            out = {k: [] for k in suffixes}
            for suffix in suffixes:
                for name, p in named.items():
                    key = name[:-len("weight")] + suffix
                    x = ot.get(key)
                    if x is None or tuple(x.shape) != tuple(p.shape):
                        raise InvalidInput(f"load_state: {OPTIMIZER_STATE}: tensor {key} missing or misshapen")
                    out[suffix].append(x.to(device=p.device, dtype=p.dtype))
            if len(ot) != len(suffixes) * len(named):
                raise InvalidInput(f"load_state: {OPTIMIZER_STATE}: {len(ot)} tensors, want {len(suffixes) * len(named)}")
            m, v = out["exp_avg"], out["exp_avg_sq"]
            grads = out.get("grad")
        self.lora = lora
        self.grads = grads
        self.step = step
        if m is None:
            self._reset_optimizer()
        else:
            self.m, self.v = m, v
        if self.schedule is None and schedule is not None:
            self.schedule = schedule
        return {"step": self.step}
