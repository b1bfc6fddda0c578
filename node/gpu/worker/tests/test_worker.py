"""Tests of the PyTorch worker on its own: numerics against an independent
float64 reference and finite differences, AdamW against torch.optim.AdamW,
state round trips, sampling, bad input, and the socket server.

Run: cd node/gpu/worker && $SIGNAL_PYTHON -m unittest discover -s tests -v
SIGNAL_WORKER_DEVICE=cuda:0 also runs the device-agreement test (bf16 on the
GPU against f32 on the CPU).
"""

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_ROOT = os.path.dirname(HERE)
sys.path.insert(0, WORKER_ROOT)

from signal_worker import gumbel, safetensors  # noqa: E402
from signal_worker.model import ALL_MODULES, Model, module_path  # noqa: E402
from signal_worker.session import InvalidInput, Session, peft_name  # noqa: E402

REPO = os.path.abspath(os.path.join(WORKER_ROOT, "..", "..", ".."))


def find_model(name):
    """The tiny reference models: the package's testdata, the trainer's copy,
    or the shared folder beside the clone."""
    for d in (os.path.join(REPO, "node", "gpu", "testdata", name),
              os.path.join(REPO, "trainer", "testdata", name),
              os.path.join(REPO, "trainer", "testdata", "models", name),
              os.path.join(REPO, "..", "shared", "testdata", "models", name),
              os.path.join("/work/shared/testdata/models", name)):
        if os.path.exists(os.path.join(d, "config.json")):
            return d
    raise unittest.SkipTest(f"tiny model {name} not found")


def datum(tokens, targets, weights=None, logprobs=None, advantages=None):
    lfi = {"target_tokens": targets}
    if weights is not None:
        lfi["weights"] = weights
    if logprobs is not None:
        lfi["logprobs"] = logprobs
    if advantages is not None:
        lfi["advantages"] = advantages
    return {"model_input": {"tokens": tokens}, "loss_fn_inputs": lfi}


def text_data():
    # Two sequences of different lengths (padding is exercised), a masked prompt.
    a = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]
    b = [1, 3118, 2501, 263, 931]
    return [datum(a[:-1], a[1:], [0, 0] + [1] * (len(a) - 3)),
            datum(b[:-1], b[1:], [1] * (len(b) - 1))]


def reference_logits(dir_, adapter_dir, tokens):
    """An independent float64 Llama forward with the adapter MERGED into the
    weights (W + (alpha/r)·B·A), written head by head."""
    with open(os.path.join(dir_, "config.json")) as f:
        c = json.load(f)
    w = {k: v.double() for k, v in safetensors.read(os.path.join(dir_, "model.safetensors")).items()}
    if adapter_dir:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            ac = json.load(f)
        ad = safetensors.read(os.path.join(adapter_dir, "adapter_model.safetensors"))
        s = ac["lora_alpha"] / ac["r"]
        for i in range(c["num_hidden_layers"]):
            for m in ac["target_modules"]:
                a = ad[peft_name(i, m, "A")].double()
                b = ad[peft_name(i, m, "B")].double()
                w[module_path(i, m) + ".weight"] = w[module_path(i, m) + ".weight"] + s * b @ a
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim") or c["hidden_size"] // H
    eps = c["rms_norm_eps"]
    T = len(tokens)

    def rms(x, g):
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(x):  # x [T, D], rotate-half pairs (j, j + D/2)
        x1, x2 = x[:, :D // 2], x[:, D // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = h @ w[p + "self_attn.q_proj.weight"].T
        k = h @ w[p + "self_attn.k_proj.weight"].T
        v = h @ w[p + "self_attn.v_proj.weight"].T
        out = torch.zeros(T, H * D, dtype=torch.float64)
        for hd in range(H):
            kv = hd // (H // KV)
            qh = rope(q[:, hd * D:(hd + 1) * D])
            kh = rope(k[:, kv * D:(kv + 1) * D])
            vh = v[:, kv * D:(kv + 1) * D]
            sc = qh @ kh.T / math.sqrt(D)
            sc = sc.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[:, hd * D:(hd + 1) * D] = torch.softmax(sc, -1) @ vh
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    if c.get("tie_word_embeddings"):
        head = w["model.embed_tokens.weight"]
    return x @ head.T


class SafetensorsTest(unittest.TestCase):
    def test_round_trip_dtypes(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        g = torch.Generator().manual_seed(0)
        ts = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
              "c": torch.randn(2, 2, 2, generator=g).half(), "empty": torch.zeros(0, 4)}
        p = os.path.join(d, "x.safetensors")
        safetensors.write(p, ts, metadata={"step": 3})
        back = safetensors.read(p)
        self.assertEqual(sorted(back), sorted(ts))
        for k in ts:
            self.assertEqual(back[k].dtype, ts[k].dtype, k)
            self.assertTrue(torch.equal(back[k], ts[k]), k)
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.assertEqual(n % 8, 0)
            self.assertEqual(json.loads(f.read(n))["__metadata__"], {"step": "3"})

    def test_rejects_corrupt_files(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        p = os.path.join(d, "bad.safetensors")
        good = os.path.join(d, "good.safetensors")
        safetensors.write(good, {"w": torch.ones(4, 4)})
        with open(good, "rb") as f:
            raw = f.read()
        cases = {
            "short": b"\x01\x02",
            "header past end": struct.pack("<Q", 1 << 20) + b"{}",
            "not json": struct.pack("<Q", 4) + b"{{{{",
            "truncated data": raw[:-8],
            "bad dtype": (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 4)(
                json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}).encode()),
        }
        for name, data in cases.items():
            with self.subTest(name):
                with open(p, "wb") as f:
                    f.write(data)
                with self.assertRaises(safetensors.FormatError):
                    safetensors.read(p)


    def test_mutated_files_fail_cleanly(self):
        # A small fuzz: flipped and truncated bytes of a valid file either
        # read or raise FormatError; never another exception.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        good = os.path.join(d, "good.safetensors")
        safetensors.write(good, {"a": torch.ones(3, 2), "b": torch.zeros(5).bfloat16()})
        with open(good, "rb") as f:
            raw = bytearray(f.read())
        g = torch.Generator().manual_seed(0)
        p = os.path.join(d, "m.safetensors")
        for i in range(300):
            b = bytearray(raw)
            for _ in range(1 + i % 4):
                j = int(torch.randint(0, len(b), (1,), generator=g))
                b[j] = int(torch.randint(0, 256, (1,), generator=g))
            if i % 5 == 0:
                b = b[:int(torch.randint(0, len(b), (1,), generator=g))]
            with open(p, "wb") as f:
                f.write(b)
            try:
                safetensors.read(p)
            except safetensors.FormatError:
                pass


class ModelTest(unittest.TestCase):
    def test_logits_match_independent_reference_with_adapter(self):
        for name in ("tiny-sp", "tiny-bl"):
            with self.subTest(name):
                d = find_model(name)
                m = Model.load(d, "cpu", torch.float64)
                s = Session(m, rank=4, alpha=8, targets=["q_proj"], seed=0)
                s.load_state({"dir": os.path.join(d, "adapter")})
                toks = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
                got = m.logits(torch.tensor([toks]), s.lora)[0]
                want = reference_logits(d, os.path.join(d, "adapter"), toks)
                # Both float64 (the adapter's f32 values are exact in f64), except
                # that the worker computes RoPE angles in f32 as Hugging Face
                # does: ~1e-7 relative; a wrong layout or scale would be O(1).
                err = (got - want).abs().max().item() / want.abs().max().item()
                self.assertLess(err, 2e-6)
                # The adapter must change the output, or this test shows nothing.
                base = reference_logits(d, None, toks)
                self.assertGreater((base - want).abs().max().item(), 1e-3)

    def test_padding_does_not_change_logprobs(self):
        m = Model.load(find_model("tiny-sp"))
        s = Session(m, rank=4, alpha=8, seed=3)
        data = text_data()
        both = s.forward({"data": data})["logprobs"]
        for i, d in enumerate(data):
            alone = s.forward({"data": [d]})["logprobs"][0]
            for a, b in zip(alone, both[i]):
                self.assertAlmostEqual(a, b, places=4)

    def test_top_k_logprobs(self):
        # forward's top_k: each position's most likely next tokens, most
        # likely first, the target's own logprob among them when it ranks.
        m = Model.load(find_model("tiny-sp"))
        s = Session(m, rank=4, alpha=8, seed=3)
        data = text_data()
        out = s.forward({"data": data, "top_k": 4})
        for i, d in enumerate(data):
            n = len(d["model_input"]["tokens"])
            ids, lps = out["top_ids"][i], out["top_logprobs"][i]
            self.assertEqual((len(ids), len(lps)), (4 * n, 4 * n))
            for p in range(n):
                row = lps[4 * p:4 * p + 4]
                self.assertEqual(row, sorted(row, reverse=True))
                self.assertGreaterEqual(row[0], out["logprobs"][i][p] - 1e-5)
                tgt = d["loss_fn_inputs"]["target_tokens"][p]
                if tgt in ids[4 * p:4 * p + 4]:
                    self.assertAlmostEqual(lps[4 * p + ids[4 * p:4 * p + 4].index(tgt)], out["logprobs"][i][p], places=4)
        with self.assertRaises(Exception):
            s.forward({"data": data, "top_k": 21})


class TrainingTest(unittest.TestCase):
    def setUp(self):
        self.dir = find_model("tiny-sp")

    def session(self, dtype=torch.float32, **kw):
        m = Model.load(self.dir, "cpu", dtype)
        kw.setdefault("rank", 4)
        kw.setdefault("alpha", 8)
        kw.setdefault("targets", ["q_proj", "k_proj", "v_proj", "o_proj"])
        s = Session(m, **kw)
        s.load_state({"dir": os.path.join(self.dir, "adapter")})
        return s

    def test_gradient_matches_finite_differences(self):
        s = self.session(torch.float64)
        data = text_data()
        s.forward_backward({"data": data})
        grads = s.grads
        params = s.lora.params()
        g = torch.Generator().manual_seed(1)
        for pi in (0, 1, 5, len(params) - 1):
            p = params[pi]
            idx = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in p.shape)
            old = p[idx].item()
            h = 1e-5  # float64 throughout: truncation ~h², rounding ~1e-16/h
            p[idx] = old + h
            up = s.forward({"data": data})["loss_sum"]
            p[idx] = old - h
            dn = s.forward({"data": data})["loss_sum"]
            p[idx] = old
            fd = (up - dn) / (2 * h)
            self.assertAlmostEqual(grads[pi][idx].item(), fd, delta=1e-6 * max(1.0, abs(fd)),
                                   msg=f"param {pi} {idx}")

    def test_loss_functions(self):
        s = self.session()
        data = text_data()
        ce = s.forward({"data": data, "loss_fn": "cross_entropy"})
        lp = ce["logprobs"]
        wsum = sum(sum(d["loss_fn_inputs"]["weights"]) for d in data)
        want = -sum(w * l for d, row in zip(data, lp) for w, l in zip(d["loss_fn_inputs"]["weights"], row))
        self.assertAlmostEqual(ce["loss_sum"], want, places=3)
        self.assertAlmostEqual(ce["loss_mean"], want / wsum, places=4)
        self.assertEqual(ce["tokens"], sum(len(d["model_input"]["tokens"]) for d in data))
        g = torch.Generator().manual_seed(2)
        rl = []
        for d, row in zip(data, lp):
            old = [x + float(torch.randn(1, generator=g)) * 0.3 for x in row]
            adv = [float(torch.randn(1, generator=g)) for _ in row]
            rl.append(datum(d["model_input"]["tokens"], d["loss_fn_inputs"]["target_tokens"],
                            logprobs=old, advantages=adv))
        for fn in ("importance_sampling", "ppo"):
            with self.subTest(fn):
                out = s.forward({"data": rl, "loss_fn": fn})
                want = 0.0
                for d, row in zip(rl, lp):
                    for l, o, a in zip(row, d["loss_fn_inputs"]["logprobs"], d["loss_fn_inputs"]["advantages"]):
                        r = math.exp(l - o)
                        want += -r * a if fn == "importance_sampling" else -min(r * a, min(max(r, 0.8), 1.2) * a)
                self.assertAlmostEqual(out["loss_sum"], want, delta=1e-4 * max(1, abs(want)))
        # A tighter clip band changes the ppo loss (the config is honoured).
        a = s.forward({"data": rl, "loss_fn": "ppo"})["loss_sum"]
        b = s.forward({"data": rl, "loss_fn": "ppo", "loss_fn_config": {"clip_low_threshold": 0.99,
                                                                       "clip_high_threshold": 1.01}})["loss_sum"]
        self.assertNotAlmostEqual(a, b, places=4)

    def test_accumulation_equals_one_call(self):
        data = text_data()
        s1, s2 = self.session(), self.session()
        s1.forward_backward({"data": data[:1]})
        s1.forward_backward({"data": data[1:]})
        s2.forward_backward({"data": data})
        # f32 sums in a different order (padding, batch shape): 1e-5 of the scale.
        for g1, g2 in zip(s1.grads, s2.grads):
            self.assertTrue(torch.allclose(g1, g2, rtol=1e-4, atol=1e-5 * g2.abs().max().item()))
        r1 = s1.optim_step({"adam_params": {"learning_rate": 1e-3}})
        r2 = s2.optim_step({"adam_params": {"learning_rate": 1e-3}})
        self.assertAlmostEqual(r1["grad_norm"], r2["grad_norm"], delta=1e-4 * r2["grad_norm"])

    def test_adamw_matches_torch(self):
        s = self.session()
        params = [p.clone().requires_grad_(True) for p in s.lora.params()]
        opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.1)
        data = text_data()
        for step in range(3):
            s.forward_backward({"data": data})
            for p, g in zip(params, s.grads):
                p.grad = g.clone()
            before = [p.detach().clone() for p in s.lora.params()]
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            res = s.optim_step({"adam_params": {"learning_rate": 2e-3, "weight_decay": 0.1,
                                                "grad_clip_norm": 5.0}})
            self.assertEqual(res["step"], step + 1)
            for p, q, b in zip(s.lora.params(), params, before):
                self.assertFalse(torch.equal(p, b))
                self.assertTrue(torch.allclose(p, q.detach(), rtol=1e-5, atol=1e-7))

    def test_optim_step_without_gradients_is_an_error(self):
        s = self.session()
        with self.assertRaisesRegex(InvalidInput, "no accumulated gradients"):
            s.optim_step({})

    def test_full_state_resumes_bit_for_bit(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        data = text_data()
        a = self.session(seed=5)
        for _ in range(2):
            a.forward_backward({"data": data})
            a.optim_step({"adam_params": {"learning_rate": 1e-2}})
        a.forward_backward({"data": data[:1]})  # pending gradients travel too
        files = a.save_state({"dir": d, "mode": "full"})["files"]
        self.assertEqual(files, ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                                 "trainer_state.json"])
        b = self.session(seed=99)
        self.assertEqual(b.load_state({"dir": d})["step"], 2)
        for s in (a, b):
            s.forward_backward({"data": data[1:]})
            s.optim_step({"adam_params": {"learning_rate": 1e-2}})
        for p, q in zip(a.lora.params(), b.lora.params()):
            self.assertTrue(torch.equal(p, q))
        self.assertEqual(a.step, b.step)

    def test_adapter_files_are_peft(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        s = self.session()
        s.save_state({"dir": d})
        with open(os.path.join(d, "adapter_config.json")) as f:
            cfg = json.load(f)
        self.assertEqual((cfg["peft_type"], cfg["r"], cfg["lora_alpha"]), ("LORA", 4, 8.0))
        got = safetensors.read(os.path.join(d, "adapter_model.safetensors"))
        want = safetensors.read(os.path.join(self.dir, "adapter", "adapter_model.safetensors"))
        self.assertEqual(sorted(got), sorted(want))
        for k in want:
            self.assertTrue(torch.equal(got[k], want[k].float()), k)

    def test_new_adapter_is_peft_init(self):
        m = Model.load(self.dir)
        s = Session(m, rank=8, alpha=16, seed=7)
        self.assertEqual(s.lora.targets, list(ALL_MODULES))
        for (i, mod) in s.lora.keys():
            a, b = s.lora.ab[(i, mod)]
            bound = 1 / math.sqrt(a.shape[1])
            self.assertTrue(torch.all(b == 0))
            self.assertLessEqual(a.abs().max().item(), bound)
            self.assertGreater(a.abs().max().item(), 0.5 * bound)
        t = Session(m, rank=8, alpha=16, seed=7)
        self.assertTrue(all(torch.equal(x, y) for x, y in zip(s.lora.params(), t.lora.params())))

    def test_rejected_calls_leave_session_unchanged(self):
        s = self.session()
        s.forward_backward({"data": text_data()})
        before = [p.clone() for p in s.lora.params()]
        grads = [g.clone() for g in s.grads]
        bad = [
            ("forward_backward", {"data": []}, "data"),
            ("forward_backward", {"data": [datum([1, 2], [2])]}, "target_tokens"),
            ("forward_backward", {"data": [datum([1, 99999], [2, 3], [1, 1])]}, r"tokens\[1\]"),
            ("forward_backward", {"data": [datum([1, 2], [2, 3], [1, float("nan")])]}, r"weights\[1\]"),
            ("forward_backward", {"data": [datum([1, 2], [2, 3])]}, "weights"),
            ("forward_backward", {"data": [datum([1, 2], [2, 3], [1, 1])], "loss_fn": "mse"}, "loss_fn"),
            ("forward_backward", {"data": [datum([1, 2], [2, 3], [1, 1])], "loss_fn": "ppo"}, "logprobs"),
            ("forward_backward", {"data": [datum([1] * 600, [1] * 600, [1] * 600)]}, "context"),
            ("optim_step", {"adam_params": {"beta1": 1.0}}, "beta1"),
            ("optim_step", {"adam_params": {"learning_rate": -1}}, "learning_rate"),
            ("sample", {"prompts": [{"tokens": [1]}], "sampling_params": {"max_tokens": 0}}, "max_tokens"),
            ("sample", {"prompts": [{"tokens": [1]}], "sampling_params": {"max_tokens": 2, "top_p": 0}}, "top_p"),
            ("sample", {"prompts": [{"text": "hi"}], "sampling_params": {"max_tokens": 2}}, "tokens"),
            ("load_state", {"dir": "/nonexistent"}, "adapter_config"),
        ]
        for call, body, field in bad:
            with self.subTest(call=call, field=field):
                with self.assertRaisesRegex(InvalidInput, field):
                    getattr(s, call)(body)
        for p, q in zip(before, s.lora.params()):
            self.assertTrue(torch.equal(p, q))
        for g, h in zip(grads, s.grads):
            self.assertTrue(torch.equal(g, h))
        self.assertEqual(s.step, 0)


class SampleTest(unittest.TestCase):
    def setUp(self):
        d = find_model("tiny-sp")
        self.model = Model.load(d)
        self.s = Session(self.model, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        self.s.load_state({"dir": os.path.join(d, "adapter")})

    def test_greedy_matches_recompute_and_logprobs(self):
        prompts = [[1, 450, 4996], [1, 3118, 2501, 263, 931, 17354]]
        out, usage = self.s.sample({"prompts": [{"tokens": p} for p in prompts], "num_samples": 2,
                                    "sampling_params": {"max_tokens": 5, "temperature": 0}}, [])
        self.assertEqual(usage, {"prefill_tokens": 18, "sampled_tokens": 20})
        for p, samples in zip(prompts, out["samples"]):
            self.assertEqual(len(samples), 2)
            toks = list(p)
            want_lp = []
            for _ in range(5):
                lg = self.model.logits(torch.tensor([toks]), self.s.lora)[0, -1]
                t = int(lg.argmax())
                want_lp.append(torch.log_softmax(lg.double(), -1)[t].item())
                toks.append(t)
            for smp in samples:
                self.assertEqual(smp["tokens"], toks[len(p):])
                self.assertEqual(smp["stop_reason"], "length")
                for a, b in zip(smp["logprobs"], want_lp):
                    self.assertAlmostEqual(a, b, places=4)

    def test_seed_stop_and_top_k(self):
        body = {"prompts": [{"tokens": [1, 450]}], "num_samples": 3,
                "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 42, "top_p": 0.9}}
        a, _ = self.s.sample(body, [])
        b, _ = self.s.sample(body, [])
        self.assertEqual(a, b)
        body["sampling_params"]["seed"] = 43
        c, _ = self.s.sample(body, [])
        self.assertNotEqual(a, c)
        greedy, _ = self.s.sample({"prompts": [{"tokens": [1, 450]}],
                                   "sampling_params": {"max_tokens": 6, "temperature": 0}}, [])
        g = greedy["samples"][0][0]["tokens"]
        k1, _ = self.s.sample({"prompts": [{"tokens": [1, 450]}],
                               "sampling_params": {"max_tokens": 6, "top_k": 1, "seed": 1}}, [])
        self.assertEqual(k1["samples"][0][0]["tokens"], g)
        stopped, _ = self.s.sample({"prompts": [{"tokens": [1, 450]}], "stop_tokens": [g[2]],
                                    "sampling_params": {"max_tokens": 6, "temperature": 0}}, [])
        smp = stopped["samples"][0][0]
        self.assertEqual(smp["tokens"], g[:3])
        self.assertEqual(smp["stop_reason"], "stop")

    def test_seeded_draw_is_the_gumbel_argmax(self):
        # A seeded warm sample's tokens are, position by position, the
        # argmax of logit/T + gumbel.noise over the top-k set: what the
        # native engine draws and the auditor checks.
        k, temp = 5, 0.7
        body = {"prompts": [{"tokens": [1, 450]}, {"tokens": [1, 3118, 2501]}], "num_samples": 2,
                "sampling_params": {"max_tokens": 4, "temperature": temp, "top_k": k, "seed": -5}}
        out, _ = self.s.sample(body, [])
        for pi, (prompt, samples) in enumerate(zip(body["prompts"], out["samples"])):
            for si, smp in enumerate(samples):
                toks = list(prompt["tokens"])
                for pos, got in enumerate(smp["tokens"]):
                    lg = self.model.logits(torch.tensor([toks]), self.s.lora)[0, -1].float() / temp
                    kth = torch.topk(lg, k).values[-1]
                    z = lg.masked_fill(lg < kth, float("-inf")).double()
                    g = gumbel.noise([gumbel.key(-5, pi, si, pos)], z.shape[-1])[0]
                    self.assertEqual(got, int((z + g).argmax()))
                    toks.append(got)


class GumbelTest(unittest.TestCase):
    def test_vectors(self):
        # trainer/gumbel's TestVectors: the same values from the same keys.
        for seed, p, s, pos, tok, want in [(0, 0, 0, 0, 0, 0.28498416329078768),
                                           (7, 1, 2, 3, 4, 0.77861045331700374),
                                           (-5, 0, 1, 15, 151935, -0.023006976529502583)]:
            got = gumbel.noise([gumbel.key(seed, p, s, pos)], tok + 1)[0, tok].item()
            self.assertAlmostEqual(got, want, delta=1e-15)


def _call(sock, obj):
    data = json.dumps(obj).encode()
    sock.sendall(b"SG\x01\x01" + struct.pack(">I", len(data)) + data)
    head = _recv(sock, 8)
    assert head[:4] == b"SG\x01\x02", head
    n = struct.unpack(">I", head[4:])[0]
    return json.loads(_recv(sock, n))


def _recv(sock, n):
    buf = b""
    while len(buf) < n:
        c = sock.recv(n - len(buf))
        if not c:
            raise EOFError
        buf += c
    return buf


class ServerTest(unittest.TestCase):
    def test_process_serves_sessions_and_shuts_down(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "w.sock")
        proc = subprocess.Popen([sys.executable, "-m", "signal_worker", "--socket", path, "--threads", "1"],
                                cwd=WORKER_ROOT, stdout=subprocess.PIPE)
        self.addCleanup(proc.kill)
        line = json.loads(proc.stdout.readline())
        proc.stdout.close()
        self.assertEqual(line["event"], "listening")
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        self.addCleanup(sock.close)
        h = _call(sock, {"request_id": "h", "call": "health"})
        self.assertEqual((h["body"]["status"], h["body"]["backend"]), ("ok", "cpu-torch"))
        # A foreign or oversized frame gets an error answer and that
        # connection is dropped; the worker keeps serving the others.
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b"SG\x01\x01\xff\xff\xff\xff", b"SG\x09\x01\x00\x00\x00\x00"):
            bad = socket.socket(socket.AF_UNIX)
            bad.connect(path)
            bad.sendall(junk)
            head = _recv(bad, 8)
            err = json.loads(_recv(bad, struct.unpack(">I", head[4:])[0]))
            self.assertEqual(err["error"]["code"], "invalid_request", junk)
            try:  # closed (or reset, when junk was left unread)
                self.assertEqual(bad.recv(1), b"")
            except ConnectionResetError:
                pass
            bad.close()
        model = find_model("tiny-sp")
        for run in ("r1", "r2"):
            r = _call(sock, {"request_id": "i" + run, "run_id": run, "call": "init",
                             "body": {"model_dir": model, "lora_rank": 4, "seed": 1}})
            self.assertEqual(r["body"]["step"], 0, r)
        h = _call(sock, {"request_id": "h2", "call": "health"})["body"]
        self.assertEqual((h["sessions"], h["models"]), (2, ["tiny-sp"]))  # one shared base
        fb = _call(sock, {"request_id": "f", "run_id": "r1", "call": "forward_backward",
                          "body": {"data": text_data()}})
        self.assertEqual(fb["usage"], {"train_tokens": 14})
        self.assertGreater(fb["body"]["grad_norm"], 0)
        bad = _call(sock, {"request_id": "b", "run_id": "r1", "call": "optim_step",
                           "body": {"adam_params": {"eps": -1}}})
        self.assertEqual(bad["error"]["code"], "invalid_request")
        self.assertIn("eps", bad["error"]["message"])
        nf = _call(sock, {"request_id": "n", "run_id": "nope", "call": "forward", "body": {}})
        self.assertEqual(nf["error"]["code"], "not_found")
        st = _call(sock, {"request_id": "o", "run_id": "r1", "call": "optim_step", "body": {}})
        self.assertEqual((st["body"]["step"], st["body"]["learning_rate"]), (1, 1e-4))
        cl = _call(sock, {"request_id": "c", "run_id": "r1", "call": "close"})
        self.assertEqual(cl["body"]["step"], 1)
        self.assertEqual(_call(sock, {"request_id": "s", "call": "shutdown"})["body"]["status"], "stopping")
        self.assertEqual(proc.wait(timeout=30), 0)
        self.assertFalse(os.path.exists(path))


@unittest.skipUnless(os.environ.get("SIGNAL_WORKER_DEVICE", "cpu") != "cpu",
                     "set SIGNAL_WORKER_DEVICE=cuda:0 to check a device against the CPU")
class DeviceAgreementTest(unittest.TestCase):
    """bf16 on the device against f32 on the CPU, same adapter and data."""

    def test_device_agrees_with_cpu(self):
        dev = os.environ["SIGNAL_WORKER_DEVICE"]
        d = find_model("tiny-sp")
        out = {}
        for where in ("cpu", dev):
            m = Model.load(d, where)
            s = Session(m, rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
            s.load_state({"dir": os.path.join(d, "adapter")})
            fb = s.forward_backward({"data": text_data()})
            smp, _ = s.sample({"prompts": [{"tokens": [1, 450, 4996]}],
                               "sampling_params": {"max_tokens": 4, "temperature": 0}}, [])
            out[where] = (fb, smp)
        (a, sa), (b, sb) = out["cpu"], out[dev]
        # bf16 weights are exact; bf16 activations carry ~3 significant digits.
        self.assertAlmostEqual(a["loss_mean"], b["loss_mean"], delta=0.02 * abs(a["loss_mean"]))
        self.assertAlmostEqual(a["grad_norm"], b["grad_norm"], delta=0.05 * a["grad_norm"])
        for ra, rb in zip(a["logprobs"], b["logprobs"]):
            for x, y in zip(ra, rb):
                self.assertAlmostEqual(x, y, delta=0.1 + 0.02 * abs(x))
        print(f"device {dev}: loss_mean cpu {a['loss_mean']:.6f} dev {b['loss_mean']:.6f}; "
              f"grad_norm cpu {a['grad_norm']:.6f} dev {b['grad_norm']:.6f}; greedy cpu "
              f"{sa['samples'][0][0]['tokens']} dev {sb['samples'][0][0]['tokens']}")


if __name__ == "__main__":
    unittest.main()
