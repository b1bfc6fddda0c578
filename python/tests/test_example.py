"""Runs examples/simple_example.py against an in-test fake API.

The fake's loss falls with each optim_step, so this checks the example's
flow, arguments and summary, not training (the testnet tests do that).
"""

import contextlib
import importlib.util
import io
import json
import os
import threading
import unittest

from test_client import FakeAPI, err

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "..", "examples", "simple_example.py")


def load_example():
    spec = importlib.util.spec_from_file_location("simple_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeTrainer:
    """Plays a run whose loss halves at every optim step."""

    def __init__(self):
        self.step = 0
        self.lock = threading.Lock()
        self.calls = []

    def __call__(self, req):
        m, p, b = req["method"], req["path"], req["body"]
        with self.lock:
            self.calls.append((m, p, b))
            billed = {"cost": {"micro_credits": 10, "credits": 10}, "balance_micro_credits": 1_000_000 - 10 * len(self.calls)}
            if (m, p) == ("POST", "/v1/runs"):
                return 201, {}, {"id": "run-1", "base_model": b["base_model"], "status": "ready", "step": 0, "node": "n1"}
            if p == "/v1/tokenize":
                toks = [ord(c) for c in b["text"]]
                return 200, {}, {"tokens": ([1] if b.get("add_special_tokens") else []) + toks}
            if p.endswith("/forward_backward"):
                return 200, {}, dict(loss_sum=1.0, loss_mean=4.0 / (2 ** self.step), tokens=50, grad_norm=1.0,
                                     logprobs=[], **billed)
            if p.endswith("/optim_step"):
                self.step += 1
                return 200, {}, dict(step=self.step, learning_rate=b["adam_params"]["learning_rate"], grad_norm=1.0, **billed)
            if p.endswith("/sample"):
                return 200, {}, dict(samples=[[{"tokens": [5], "text": " on the mat", "logprobs": [-1],
                                                "stop_reason": "length"}] for _ in b["prompts"]], **billed)
            if p.endswith("/save_state"):
                return 200, {}, dict(checkpoint={"id": "ck-1", "run_id": "run-1", "step": self.step, "mode": "adapter",
                                                 "uri": "file:///data/ck-1", "created_at": "t",
                                                 "files": [{"name": "adapter_model.safetensors", "cid": "bafy", "size": 9,
                                                            "uri": "file:///data/ck-1/a"}]}, **billed)
            if m == "DELETE":
                return 200, {}, {"id": "run-1", "status": "ended", "step": self.step}
            return err(404, "not_found", "no route %s %s" % (m, p))


class TestSimpleExample(unittest.TestCase):
    def run_example(self, *extra):
        trainer = FakeTrainer()
        api = FakeAPI(trainer)
        self.addCleanup(api.close)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = load_example().main(["--url", api.url, "--api-key", "sk", *extra])
        self.assertEqual(rc, 0)
        lines = out.getvalue().splitlines()
        summary = json.loads(lines[-1][len("SUMMARY "):])
        return trainer, out.getvalue(), summary

    def test_text_examples(self):
        trainer, out, summary = self.run_example("--steps", "20")
        self.assertEqual(len(summary["losses"]), 20)
        self.assertLess(summary["losses"][-1], summary["losses"][0])
        self.assertEqual(summary["checkpoint_uri"], "file:///data/ck-1")
        self.assertIn("falling", out)
        fb = [b for m, p, b in trainer.calls if p.endswith("/forward_backward")]
        self.assertEqual(len(fb), 20)
        self.assertIn("examples", fb[0])
        self.assertEqual(fb[0]["examples"][0], {"text": "The cat sat on the mat."})
        self.assertEqual(sum(1 for _, p, _ in trainer.calls if p.endswith("/sample")), 4)  # steps 0, 5, 10, 15
        self.assertEqual(trainer.calls[-1][0], "DELETE")
        self.assertGreater(summary["cost_micro_credits"], 0)

    def test_token_datum(self):
        trainer, _, summary = self.run_example("--steps", "3", "--tokens", "--keep-run")
        fb = [b for m, p, b in trainer.calls if p.endswith("/forward_backward")]
        self.assertIn("data", fb[0])
        d = fb[0]["data"][0]
        self.assertEqual(len(d["model_input"]["tokens"]), len(d["loss_fn_inputs"]["target_tokens"]))
        self.assertNotEqual(trainer.calls[-1][0], "DELETE")
        self.assertEqual(len(summary["losses"]), 3)


class TestSimpleExampleFailure(unittest.TestCase):
    def test_ends_run_on_failure(self):
        trainer = FakeTrainer()

        def handler(req):
            if req["path"].endswith("/optim_step"):
                return err(402, "insufficient_balance", "balance 1 below 9")
            return trainer(req)

        api = FakeAPI(handler)
        self.addCleanup(api.close)
        from signal_sdk import InsufficientBalanceError

        with contextlib.redirect_stdout(io.StringIO()):
            with self.assertRaises(InsufficientBalanceError):
                load_example().main(["--url", api.url, "--api-key", "sk"])
        self.assertEqual(trainer.calls[-1][0], "DELETE", "the run is ended after the failure")


if __name__ == "__main__":
    unittest.main()
