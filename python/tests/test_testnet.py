"""The Python SDK against a real testnet: the signal binary's in-process
network (1 coordinator, 1 node, the embedded signal-tiny model).

Needs $SIGNAL_BIN (make test-python sets it to bin/signal). Without it the
tests skip, except under CI=true, where they fail.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from signal_sdk import (  # noqa: E402
    ConflictError,
    InsufficientBalanceError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    SignalClient,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnknownModelError,
    raw_cid,
)

BIN = os.environ.get("SIGNAL_BIN", "")
MODEL = "signal-tiny"


def setUpModule():
    global NET, TMP, LOG
    if not BIN or not os.access(BIN, os.X_OK):
        msg = "SIGNAL_BIN is not an executable signal binary (make test-python sets it)"
        if os.environ.get("CI") == "true":
            raise RuntimeError(msg)
        raise unittest.SkipTest(msg)
    TMP = tempfile.mkdtemp(prefix="signal-pytest-")
    LOG = log = open(os.path.join(TMP, "testnet.log"), "wb")
    NET = subprocess.Popen(
        # --rate/--burst: low enough that test_rate_limited_then_retried
        # can run out its own key's bucket, high enough for the other tests.
        [BIN, "testnet", "--in-process", "--coordinators", "1", "--nodes", "1", "--dir", TMP,
         "--rate", "100", "--burst", "200"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    path = os.path.join(TMP, "testnet.json")
    deadline = time.time() + 180
    while not os.path.exists(path):
        if NET.poll() is not None or time.time() > deadline:
            tearDownModule()
            with open(os.path.join(TMP, "testnet.log"), errors="replace") as f:
                raise RuntimeError("testnet did not start:\n" + f.read()[-2000:])
        time.sleep(0.2)


def tearDownModule():
    NET.terminate()
    try:
        NET.wait(timeout=60)
    except subprocess.TimeoutExpired:
        NET.kill()
        NET.wait()
    LOG.close()
    shutil.rmtree(TMP, ignore_errors=True)


def testnet():
    with open(os.path.join(TMP, "testnet.json")) as f:
        return json.load(f)


class TestRealTestnet(unittest.TestCase):
    def setUp(self):
        self.client = SignalClient.from_testnet(os.path.join(TMP, "testnet.json"), max_retries=10)

    def test_train_sample_save_load(self):
        run = self.client.create_run(MODEL, lora_rank=8, seed=1)
        self.addCleanup(run.close)
        batch = ["The cat sat on the mat.", ("Question: What color is the sky?\nAnswer:", " The sky is blue.")]
        losses = []
        for _ in range(8):
            fb = run.forward_backward(batch)
            self.assertGreater(fb["tokens"], 0)
            self.assertGreater(fb["cost"]["micro_credits"], 0)
            losses.append(fb["loss_mean"])
            st = run.optim_step(learning_rate=5e-3)
        self.assertEqual(st["step"], 8)
        self.assertLess(losses[-1], losses[0] / 2, "loss did not fall: %r" % losses)
        out = run.sample("The cat sat", max_tokens=8, temperature=0.0)
        sample = out["samples"][0][0]
        self.assertEqual(len(sample["tokens"]), len(sample["logprobs"]))
        self.assertIn(sample["stop_reason"], ("length", "stop"))
        saved = run.save_state(mode="full")["checkpoint"]
        self.assertEqual(saved["step"], 8)
        self.assertEqual(sorted(f["name"] for f in saved["files"])[:2], ["adapter_config.json", "adapter_model.safetensors"])
        # Train on, then go back to the checkpoint: the loss is the saved one again.
        fb_saved = run.forward(batch)["loss_mean"]
        run.forward_backward(batch)
        run.optim_step(learning_rate=5e-3)
        run.load_state(saved["id"])
        self.assertAlmostEqual(run.forward(batch)["loss_mean"], fb_saved, places=4)
        metrics = run.metrics()
        self.assertGreaterEqual(len(metrics), 8)

    def test_futures_pipeline_download_sampler(self):
        run = self.client.create_run(MODEL, lora_rank=4, seed=2)
        self.addCleanup(run.close)
        batch = ["The cat sat on the mat."]
        # Five steps submitted at once run in order, one round trip each.
        futs = [run.train_step_async(batch, learning_rate=5e-3) for _ in range(5)]
        steps = [f.result(timeout=300) for f in futs]
        self.assertEqual([o["step"] for _, o in steps], [1, 2, 3, 4, 5])
        self.assertLess(steps[-1][0]["loss_mean"], steps[0][0]["loss_mean"])
        # A forward_backward and an optim_step in flight together.
        fb, op = run.forward_backward_async(batch), run.optim_step_async(learning_rate=5e-3)
        self.assertEqual(op.result(timeout=300)["step"], 6)
        self.assertGreater(fb.result(timeout=300)["tokens"], 0)
        # The first failing call of a pipeline is named; the ones before it ran.
        with self.assertRaises(InvalidRequestError) as cm:
            run.pipeline([("forward", {"examples": [{"text": "The cat"}]}), ("optim_step", {"adam_params": {"learning_rate": -1}})])
        self.assertTrue(cm.exception.message.startswith("calls[1] (optim_step):"), cm.exception.message)
        saved = run.save_state(mode="adapter")["checkpoint"]
        self.assertIn(saved["id"], [cp["id"] for cp in self.client.list_checkpoints(run.id)])
        out = tempfile.mkdtemp(prefix="signal-download-")
        self.addCleanup(shutil.rmtree, out, True)
        files = self.client.download_checkpoint(saved["id"], out)
        self.assertEqual(sorted(f["name"] for f in files), sorted(f["name"] for f in saved["files"]))
        for f in saved["files"]:
            with open(os.path.join(out, f["name"]), "rb") as fh:
                self.assertEqual(raw_cid(hashlib.sha256(fh.read()).digest()), f["cid"])
        want = run.sample("The cat", max_tokens=6, temperature=0.0)["samples"][0][0]["tokens"]
        with self.client.sampling_client(checkpoint=saved["id"]) as s:
            self.assertEqual(s.sample("The cat", max_tokens=6, temperature=0.0)["samples"][0][0]["tokens"], want)
        with self.client.sampling_client(base_model=MODEL) as b:
            n = len(b.sample("The cat", max_tokens=6, temperature=0.0)["samples"][0][0]["tokens"])
            self.assertTrue(1 <= n <= 6, n)

    def test_tokenize(self):
        ids = self.client.tokenize(MODEL, "Hello world")
        self.assertTrue(ids and all(isinstance(i, int) for i in ids))

    def test_unauthorized(self):
        bad = SignalClient("sk-not-a-key", testnet()["coordinators"][0])
        with self.assertRaises(UnauthorizedError) as cm:
            bad.account()
        self.assertEqual(cm.exception.status, 401)

    def test_unknown_model_lists_supported(self):
        with self.assertRaises(UnknownModelError) as cm:
            self.client.create_run("no-such-model", lora_rank=8)
        self.assertEqual(cm.exception.status, 400)
        self.assertIn(MODEL, cm.exception.message)

    def test_invalid_token_ids_name_the_field(self):
        run = self.client.create_run(MODEL, lora_rank=8)
        self.addCleanup(run.close)
        datum = {"model_input": {"tokens": [1, 10**9]},
                 "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [1.0, 1.0]}}
        with self.assertRaises(InvalidRequestError) as cm:
            run.forward_backward([datum])
        self.assertEqual(cm.exception.status, 400)
        self.assertIn("tokens", cm.exception.message)
        # The rejected call changed nothing: there are no gradients to step on.
        with self.assertRaises(InvalidRequestError):
            run.optim_step(learning_rate=1e-3)

    def test_not_found(self):
        with self.assertRaises(NotFoundError) as cm:
            self.client.get_run("run_does_not_exist")
        self.assertEqual(cm.exception.status, 404)

    def test_ended_run_conflicts(self):
        run = self.client.create_run(MODEL, lora_rank=8)
        run.close()
        with self.assertRaises(ConflictError) as cm:
            run.forward_backward(["The cat sat on the mat."])
        self.assertEqual(cm.exception.status, 409)

    def test_insufficient_balance(self):
        tn = testnet()
        key = self.client.create_key(tn["admin_token"], micro_credits=1)
        poor = SignalClient(key["api_key"], tn["coordinators"][0])
        with self.assertRaises(InsufficientBalanceError) as cm:
            run = poor.create_run(MODEL, lora_rank=8)
            self.addCleanup(run.close)
            run.forward_backward(["The cat sat on the mat. " * 20])
        self.assertEqual(cm.exception.status, 402)
        self.assertIn("balance", cm.exception.message)

    def test_rate_limited_then_retried(self):
        # This testnet's bucket (setUpModule): 200 calls of burst per key,
        # 100 per second after. 1000 calls in a row cannot all fit (even at
        # 4 ms each they take 4 s: 200 + 400 tokens), so a client that does
        # not retry meets the 429 with the Retry-After the server sent.
        tn = testnet()
        key = self.client.create_key(tn["admin_token"], micro_credits=1000)["api_key"]
        eager = SignalClient(key, tn["coordinators"][0], max_retries=0)
        with self.assertRaises(RateLimitedError) as cm:
            for _ in range(1000):
                eager.account()
        self.assertEqual(cm.exception.status, 429)
        self.assertIsNotNone(cm.exception.retry_after)
        self.assertGreater(cm.exception.retry_after, 0)
        # With retries the SDK waits as told and the same calls go through.
        patient = SignalClient(key, tn["coordinators"][0], max_retries=10)
        for _ in range(20):
            self.assertEqual(patient.account()["balance_micro_credits"], 1000)

    def test_full_network_is_unavailable(self):
        # One node with 8 session slots (the testnet's default): the ninth
        # open run finds no node, a 503 with Retry-After; closing one frees
        # its slot.
        eager = SignalClient.from_testnet(os.path.join(TMP, "testnet.json"), max_retries=0)
        runs = []
        try:
            with self.assertRaises(UnavailableError) as cm:
                for _ in range(9):
                    runs.append(eager.create_run(MODEL, lora_rank=8))
            self.assertEqual(cm.exception.status, 503)
            self.assertEqual(len(runs), 8)
            self.assertIsNotNone(cm.exception.retry_after)
            runs.pop().close()
            runs.append(eager.create_run(MODEL, lora_rank=8))
        finally:
            for r in runs:
                r.close()

    def test_body_too_large(self):
        run = self.client.create_run(MODEL, lora_rank=8)
        self.addCleanup(run.close)
        # The SDK refuses a body over the coordinator's limit before sending
        # it: a server answers 413 mid-upload and closes the connection,
        # which urllib would report as a broken pipe.
        with self.assertRaises(TooLargeError) as cm:
            run.forward_backward(["x" * (40 << 20)])
        self.assertEqual(cm.exception.status, 413)
        self.assertIn("over the limit of %d bytes" % (32 << 20), cm.exception.message)
        # Under the SDK's limit but over a server's: the server's own 413.
        small = SignalClient.from_testnet(os.path.join(TMP, "testnet.json"), max_request_bytes=64 << 20)
        with self.assertRaises(TooLargeError) as cm:
            small.run(run.id).forward_backward(["x" * ((32 << 20) + 100)])
        self.assertEqual(cm.exception.status, 413)


class TestFailoverRealTestnet(unittest.TestCase):
    """A process testnet of 3 coordinators: the SDK goes on when the one it calls dies."""

    def test_coordinator_dies(self):
        tmp = tempfile.mkdtemp(prefix="signal-pyfailover-")
        self.addCleanup(shutil.rmtree, tmp, True)
        log = open(os.path.join(tmp, "testnet.log"), "wb")
        self.addCleanup(log.close)
        net = subprocess.Popen([BIN, "testnet", "--coordinators", "3", "--nodes", "1", "--dir", tmp],
                               stdout=subprocess.DEVNULL, stderr=log)

        def stop():
            net.terminate()
            try:
                net.wait(timeout=90)
            except subprocess.TimeoutExpired:
                net.kill()
                net.wait()
        self.addCleanup(stop)
        path = os.path.join(tmp, "testnet.json")
        deadline = time.time() + 240
        while not os.path.exists(path):
            if net.poll() is not None or time.time() > deadline:
                with open(os.path.join(tmp, "testnet.log"), errors="replace") as f:
                    self.fail("testnet did not start:\n" + f.read()[-2000:])
            time.sleep(0.2)
        with open(path) as f:
            tn = json.load(f)
        client = SignalClient.from_testnet(tmp, max_retries=20, max_backoff=2.0)
        self.assertEqual(client.base_urls, tn["coordinators"])
        with client.create_run(MODEL, lora_rank=8) as run:
            run.forward_backward(["The cat sat on the mat."])
            os.kill(tn["pids"][0], 9)  # c1, the coordinator the client calls
            before = client.account()["balance_micro_credits"]
            self.assertNotEqual(client.base_url, tn["coordinators"][0])
            fb = run.forward_backward(["The cat sat on the mat."])
            after = client.account()["balance_micro_credits"]
            self.assertEqual(after, before - fb["cost"]["micro_credits"], "the call is charged once")


if __name__ == "__main__":
    unittest.main()
