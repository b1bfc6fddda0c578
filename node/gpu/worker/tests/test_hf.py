"""The PyTorch worker judged by Hugging Face transformers + PEFT directly:
loss, per-token logprobs and every LoRA gradient of a forward_backward, and
the worker's saved adapter loaded with PeftModel.from_pretrained unchanged
(and a PEFT-made adapter loaded by the worker), on the tiny test models.

Runs where transformers and peft import (the pinned environment
scripts/pyenv.sh builds, which `make test` hands the Go tests); skipped on
Debian's torch 1.13, which has neither.
"""

import os
import sys
import tempfile
import unittest

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
except ImportError:  # pragma: no cover - the 1.13 environment
    PeftModel = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from signal_worker.model import ALL_MODULES, Model  # noqa: E402
from signal_worker.session import Session  # noqa: E402
from test_worker import datum, find_model  # noqa: E402


@unittest.skipIf(PeftModel is None, "transformers + peft not installed (the pinned environment has them)")
class TestAgainstTransformers(unittest.TestCase):
    # float32 both sides on BF16-exact weights, different summation orders:
    # logprobs agree to ~1e-5, gradients to ~1e-5 of each tensor's largest
    # entry (the native engine's figures against the same oracle); 10x that.
    LP_TOL, GRAD_TOL = 1e-4, 1e-3

    def setUp(self):
        torch.manual_seed(0)
        self.tmp = tempfile.mkdtemp()

    def data(self, vocab):
        g = torch.Generator().manual_seed(5)
        out = []
        for n in (9, 14):
            toks = torch.randint(0, vocab, (n + 1,), generator=g).tolist()
            w = [0.0] * 3 + [1.0] * (n - 3)  # a masked prompt
            out.append(datum(toks[:-1], toks[1:], weights=w))
        return out

    def hf_model(self, model_dir, adapter_dir, trainable=False):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()

    def hf_loss(self, model, data):
        total, lps = 0, []
        for d in data:
            toks = torch.tensor([d["model_input"]["tokens"]])
            tgt = torch.tensor(d["loss_fn_inputs"]["target_tokens"])
            w = torch.tensor(d["loss_fn_inputs"]["weights"])
            lp = torch.log_softmax(model(input_ids=toks).logits[0], -1).gather(1, tgt[:, None])[:, 0]
            lps.append(lp.detach())
            total = total + (-(w * lp)).sum()
        return total, lps

    def test_forward_backward_and_adapter_in_peft(self):
        for name in ("tiny-sp", "tiny-bl"):
            with self.subTest(model=name):
                d = find_model(name)
                model = Model.load(d, "cpu", torch.float32)
                s = Session(model, rank=4, alpha=8, targets=list(ALL_MODULES), seed=3)
                g = torch.Generator().manual_seed(7)
                for _, b in s.lora.ab.items():  # B != 0, so every gradient is live
                    b[1].copy_(torch.randn(b[1].shape, generator=g) * 0.05)
                data = self.data(model.cfg.vocab)
                res = s.forward_backward({"data": data})
                out = os.path.join(self.tmp, name)
                s.save_state({"dir": out, "mode": "adapter"})

                hf = self.hf_model(d, out, trainable=True)
                loss, lps = self.hf_loss(hf, data)
                loss.backward()
                lv = loss.item()
                self.assertAlmostEqual(res["loss_sum"], lv, delta=1e-4 * max(1.0, abs(lv)))
                worst = max(float((torch.tensor(a) - b).abs().max()) for a, b in zip(res["logprobs"], lps))
                self.assertLess(worst, self.LP_TOL, "logprobs differ from transformers + PEFT")
                hf_grads = {n.replace(".default", ""): p.grad for n, p in hf.named_parameters() if p.requires_grad}
                mine = dict(zip(s.lora.named().keys(), s.grads))
                self.assertEqual(set(mine), set(hf_grads), "adapter tensor names differ from PEFT's")
                for k, want in hf_grads.items():
                    rel = float((mine[k] - want).abs().max() / want.abs().max().clamp_min(1e-12))
                    self.assertLess(rel, self.GRAD_TOL, f"{k}: gradient off by {rel:.2g} of its largest entry")

    def family_dir(self, family):
        """A random model of a family, made and saved by transformers itself."""
        import transformers
        cfg_cls, model_cls = {
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        }[family]
        extra = {"head_dim": 24} if family == "qwen3" else {}  # head_dim != hidden / heads
        cfg = cfg_cls(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=1e6, tie_word_embeddings=(family != "mistral"), **extra)
        torch.manual_seed(11)
        model = model_cls(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):  # Qwen2's q/k/v biases: large enough to matter
                    p.normal_(0, 0.5)
                if n.endswith("_norm.weight") and "self_attn" in n:  # Qwen3's q/k norms: away from 1
                    p.uniform_(0.5, 1.5)
        out = os.path.join(self.tmp, family)
        model.save_pretrained(out, safe_serialization=True)
        return out

    def test_families_against_transformers(self):
        """Mistral, Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms, its
        own head_dim) in the worker: the same logprobs and LoRA gradients as
        transformers + PEFT."""
        for family in ("mistral", "qwen2", "qwen3"):
            with self.subTest(family=family):
                d = self.family_dir(family)
                model = Model.load(d, "cpu", torch.float32)
                s = Session(model, rank=4, alpha=8, targets=list(ALL_MODULES), seed=3)
                g = torch.Generator().manual_seed(7)
                for _, b in s.lora.ab.items():
                    b[1].copy_(torch.randn(b[1].shape, generator=g) * 0.05)
                data = self.data(model.cfg.vocab)
                res = s.forward_backward({"data": data})
                out = os.path.join(self.tmp, family + "-adapter")
                s.save_state({"dir": out, "mode": "adapter"})
                hf = self.hf_model(d, out, trainable=True)
                loss, lps = self.hf_loss(hf, data)
                loss.backward()
                worst = max(float((torch.tensor(a) - b).abs().max()) for a, b in zip(res["logprobs"], lps))
                self.assertLess(worst, self.LP_TOL, f"{family}: logprobs differ from transformers + PEFT")
                mine = dict(zip(s.lora.named().keys(), s.grads))
                for k, p in hf.named_parameters():
                    if p.requires_grad:
                        want = p.grad
                        got = mine[k.replace(".default", "")]
                        rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
                        self.assertLess(rel, self.GRAD_TOL, f"{family} {k}: gradient off by {rel:.2g}")

    def test_peft_adapter_in_the_worker(self):
        d = find_model("tiny-sp")
        base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=3, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                                               lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM"))
        out = os.path.join(self.tmp, "peft")
        peft.save_pretrained(out)
        model = Model.load(d, "cpu", torch.float32)
        s = Session(model, rank=8, alpha=16, seed=1)
        s.load_state({"dir": out})
        self.assertEqual((s.lora.rank, s.lora.alpha), (3, 12.0))
        data = self.data(model.cfg.vocab)
        res = s.forward({"data": data})
        with torch.no_grad():
            _, lps = self.hf_loss(peft.eval(), data)
        worst = max(float((torch.tensor(a) - b).abs().max()) for a, b in zip(res["logprobs"], lps))
        self.assertLess(worst, self.LP_TOL, "a PEFT adapter in the worker differs from PEFT")


if __name__ == "__main__":
    unittest.main()
