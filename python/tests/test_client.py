"""Unit tests of the Python SDK against an in-test HTTP server that plays the API."""

import json
import os
import socket
import sys
import tempfile
import threading
import time
import unittest
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import signal_sdk  # noqa: E402
from signal_sdk import (  # noqa: E402
    ConflictError,
    ForbiddenError,
    InsufficientBalanceError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    ResponseTooLargeError,
    SignalClient,
    SignalConnectionError,
    SignalError,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
    UnknownModelError,
    datum_from_tokens,
)

KEY = "sk-test-123"


class FakeAPI:
    """A threaded HTTP server; ``handler(req)`` returns (status, headers, body)."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        self.lock = threading.Lock()
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                req = {
                    "method": self.command,
                    "path": self.path,
                    "auth": self.headers.get("Authorization"),
                    "idem": self.headers.get("Idempotency-Key"),
                    "body": json.loads(raw) if raw else None,
                    "raw": raw,
                }
                with fake.lock:
                    fake.requests.append(req)
                status, headers, body = fake.handler(req)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def err(status, code, message, headers=None):
    return status, headers or {}, {"error": {"code": code, "message": message}}


class Base(unittest.TestCase):
    def serve(self, handler):
        api = FakeAPI(handler)
        self.addCleanup(api.close)
        return api

    def client(self, api, **kw):
        c = SignalClient(KEY, api.url, **kw)
        self.waits = []
        c._sleep = self.waits.append
        return c


class TestConstruction(unittest.TestCase):
    def test_bad_arguments(self):
        cases = [
            (dict(api_key="k", base_url=""), "SIGNAL_URL"),
            (dict(api_key="k", base_url="127.0.0.1:8080"), "want http"),
            (dict(api_key="k\nX: 1", base_url="http://h"), "line break"),
            (dict(api_key="k", base_url="http://h", max_retries=-1), "retries"),
            (dict(api_key="k", base_url="http://h", min_backoff=2, max_backoff=1), "backoff"),
            (dict(api_key="k", base_url="http://h", max_response_bytes=0), "max_response_bytes"),
        ]
        env = os.environ.pop("SIGNAL_URL", None)
        try:
            for kwargs, want in cases:
                with self.subTest(kwargs=kwargs):
                    with self.assertRaisesRegex(ValueError, want):
                        SignalClient(**kwargs)
        finally:
            if env is not None:
                os.environ["SIGNAL_URL"] = env

    def test_env_and_v1_suffix(self):
        old = {k: os.environ.get(k) for k in ("SIGNAL_URL", "SIGNAL_API_KEY")}
        os.environ["SIGNAL_URL"] = "http://127.0.0.1:9/v1/"
        os.environ["SIGNAL_API_KEY"] = "sk-env"
        try:
            c = SignalClient()
            self.assertEqual(c.base_url, "http://127.0.0.1:9")
            self.assertEqual(c.api_key, "sk-env")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def test_from_testnet(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "testnet.json")
            with open(p, "w") as f:
                json.dump({"coordinators": ["http://127.0.0.1:7001", "http://127.0.0.1:7002"], "api_key": "sk-tn"}, f)
            c = SignalClient.from_testnet(p)
            self.assertEqual((c.base_url, c.api_key), ("http://127.0.0.1:7001", "sk-tn"))
            with open(p, "w") as f:
                json.dump({"coordinators": []}, f)
            with self.assertRaisesRegex(ValueError, "coordinators"):
                SignalClient.from_testnet(p)


class TestErrorStatuses(Base):
    """Every status of API.md raises its typed exception with the server's message."""

    CASES = [
        (400, "invalid_request", "lora_rank 0 out of range [1, 256]", None, InvalidRequestError),
        (400, "unknown_model", 'unknown base_model "gpt-9"; supported: signal-tiny', None, UnknownModelError),
        (401, "unauthorized", "unknown API key", None, UnauthorizedError),
        (402, "insufficient_balance", "balance 10 below estimated cost 500", None, InsufficientBalanceError),
        (403, "forbidden", "run r-1 belongs to another account", None, ForbiddenError),
        (404, "not_found", "run r-404 not found", None, NotFoundError),
        (409, "conflict", "run r-1 is moving", None, ConflictError),
        (413, "too_large", "body over 32 MiB", None, TooLargeError),
        (429, "rate_limited", "slow down", "7", RateLimitedError),
        (503, "unavailable", "no node can take model signal-tiny", "3", UnavailableError),
        (500, "internal", "internal error, request id req-42", None, InternalError),
    ]
    ALL = {InvalidRequestError, UnknownModelError, UnauthorizedError, InsufficientBalanceError, ForbiddenError,
           NotFoundError, ConflictError, TooLargeError, RateLimitedError, UnavailableError, InternalError}

    def test_statuses(self):
        for status, code, msg, retry_after, cls in self.CASES:
            with self.subTest(status=status, code=code):
                headers = {"Retry-After": retry_after} if retry_after else {}
                api = self.serve(lambda req, a=(status, code, msg, headers): err(*a))
                c = self.client(api, max_retries=0)
                with self.assertRaises(cls) as cm:
                    c.create_run("signal-tiny")
                e = cm.exception
                self.assertIsInstance(e, SignalError)
                self.assertEqual((e.status, e.code, e.message), (status, code, msg))
                for other in self.ALL:
                    # UnknownModelError is also an InvalidRequestError, nothing else overlaps.
                    expect = issubclass(cls, other)
                    self.assertEqual(isinstance(e, other), expect, "%s isinstance %s" % (cls.__name__, other.__name__))
                for part in ("POST /v1/runs", str(status), code, msg):
                    self.assertIn(part, str(e))
                if retry_after:
                    self.assertEqual(e.retry_after, float(retry_after))
                    self.assertTrue(e.temporary)
                else:
                    self.assertFalse(e.temporary)
                if status == 500:
                    self.assertEqual(e.request_id, "req-42")
                self.assertEqual(len(api.requests), 1)

    def test_not_api_shaped(self):
        api = self.serve(lambda req: (502, {"X-Request-Id": "hdr-7"}, b"<html>bad gateway</html>"))
        c = self.client(api)
        with self.assertRaises(InternalError) as cm:
            c.account()
        e = cm.exception
        self.assertEqual((e.status, e.message, e.request_id), (502, "<html>bad gateway</html>", "hdr-7"))
        self.assertIn("request id hdr-7", str(e))
        self.assertEqual(len(api.requests), 1, "502 is not retried")


class TestRetries(Base):
    def test_retry_after_and_same_key(self):
        answers = [
            err(429, "rate_limited", "slow down", {"Retry-After": "2"}),
            err(503, "unavailable", "run is moving", {"Retry-After": "5"}),
            (200, {}, {"step": 3, "learning_rate": 1e-4, "grad_norm": 0.5, "cost": {"credits": 4}, "balance": 96}),
        ]
        api = self.serve(lambda req: answers[min(len(api.requests), 3) - 1])
        c = self.client(api)
        run = c.run("r-1")
        out = run.optim_step(learning_rate=1e-4)
        self.assertEqual(out["step"], 3)
        self.assertEqual(run.step, 3)
        self.assertEqual(run.info["spent"], 4)
        self.assertEqual(self.waits, [2.0, 5.0])
        keys = {r["idem"] for r in api.requests}
        self.assertEqual(len(api.requests), 3)
        self.assertEqual(len(keys), 1, "every retry reuses the call's idempotency key")
        key = keys.pop()
        self.assertEqual(len(key), 32)
        self.assertEqual({r["raw"] for r in api.requests}, {api.requests[0]["raw"]})
        self.assertEqual(api.requests[0]["body"], {"adam_params": {"learning_rate": 1e-4}})
        run.optim_step()
        self.assertNotEqual(api.requests[-1]["idem"], key, "a new logical call gets a new key")
        self.assertEqual(api.requests[-1]["body"], {})

    def test_backoff_without_retry_after_and_cap(self):
        api = self.serve(
            lambda req: err(503, "unavailable", "no leader", {"Retry-After": "3600"} if "models" in req["path"] else {})
        )
        c = self.client(api, max_retries=4, min_backoff=0.1, max_backoff=1.0)
        with self.assertRaises(UnavailableError) as cm:
            c.account()
        self.assertEqual(cm.exception.attempts, 5)
        self.assertIn("after 5 attempts", str(cm.exception))
        self.assertEqual(len(self.waits), 4)
        for i, w in enumerate(self.waits):
            self.assertGreaterEqual(w, 0.1)
            self.assertLessEqual(w, min(0.1 * 2 ** i, 1.0))
        self.waits.clear()
        with self.assertRaises(UnavailableError):
            c.models()
        self.assertEqual(self.waits, [1.0] * 4, "Retry-After 3600 is capped by max_backoff")

    def test_no_retry_on_final_errors(self):
        api = self.serve(lambda req: err(402, "insufficient_balance", "balance 1 below 9"))
        c = self.client(api)
        with self.assertRaises(InsufficientBalanceError):
            c.run("r-1").forward_backward(["hello"])
        self.assertEqual((len(api.requests), self.waits), (1, []))

    def test_real_sleep(self):
        answers = [err(429, "rate_limited", "slow", {"Retry-After": "0.2"}), (200, {}, {"status": "ok"})]
        api = self.serve(lambda req: answers[min(len(api.requests), 2) - 1])
        c = SignalClient(KEY, api.url)
        start = time.monotonic()
        self.assertEqual(c.health()["status"], "ok")
        # time.sleep never returns early, so this lower bound is exact.
        self.assertGreaterEqual(time.monotonic() - start, 0.2)

    def test_refused_connection_retried(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        c = SignalClient(KEY, "http://127.0.0.1:%d" % port, max_retries=2)
        waits = []
        c._sleep = waits.append
        with self.assertRaises(SignalConnectionError) as cm:
            c.nodes()
        self.assertEqual(len(waits), 2)
        self.assertEqual(cm.exception.attempts, 3)
        self.assertIn("cannot reach", str(cm.exception))


def dead_url():
    """A loopback address nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return "http://127.0.0.1:%d" % port


class DyingServer:
    """Accepts each connection, reads the request and closes without answering, as a coordinator killed mid-call."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.seen = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.seen.append(conn.recv(65536))
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


class TestFailover(Base):
    def test_fails_over_across_coordinators(self):
        good = self.serve(lambda req: (200, {}, {"step": 1, "learning_rate": 1e-3, "grad_norm": 1.0}))
        busy = self.serve(lambda req: err(503, "unavailable", "the coordinators have no raft leader yet; retry in a moment"))
        dying = DyingServer()
        self.addCleanup(dying.close)
        for first in (dead_url(), busy.url, dying.url):
            with self.subTest(first=first):
                c = SignalClient(KEY, [first, good.url])
                waits = []
                c._sleep = waits.append
                n = len(good.requests)
                self.assertEqual(c.run("run-1").optim_step()["step"], 1)
                self.assertEqual(waits, [], "the next coordinator is tried at once")
                self.assertEqual(c.base_url, good.url)
                self.assertEqual(len(good.requests), n + 1)
                if first == busy.url:
                    self.assertEqual(busy.requests[-1]["idem"], good.requests[-1]["idem"], "one key per logical call")
                # Later calls stay on the coordinator that answered.
                c.run("run-1").optim_step()
                self.assertEqual(len(good.requests), n + 2)
        # The dying server got the same idempotency key as the one that answered.
        c = SignalClient(KEY, ",".join([dying.url, good.url]))
        c._sleep = lambda s: None
        c.run("run-1").optim_step()
        sent = dying.seen[-1].decode("latin-1")
        self.assertIn("Idempotency-Key: " + good.requests[-1]["idem"], sent)

    def test_single_coordinator_does_not_resend_a_cut_off_call(self):
        dying = DyingServer()
        self.addCleanup(dying.close)
        c = SignalClient(KEY, dying.url)
        c._sleep = lambda s: None
        with self.assertRaises(SignalConnectionError):
            c.run("run-1").optim_step()
        self.assertEqual(len(dying.seen), 1)

    def test_from_testnet_dir_uses_every_coordinator(self):
        d = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(d))
        with open(os.path.join(d, "testnet.json"), "w") as f:
            json.dump({"coordinators": ["http://127.0.0.1:7001", "http://127.0.0.1:7002"], "api_key": "sk"}, f)
        for path in (d, os.path.join(d, "testnet.json")):
            c = SignalClient.from_testnet(path)
            self.assertEqual(c.base_urls, ["http://127.0.0.1:7001", "http://127.0.0.1:7002"])
        os.environ["SIGNAL_TESTNET"] = d
        try:
            self.assertEqual(SignalClient.from_testnet().api_key, "sk")
        finally:
            del os.environ["SIGNAL_TESTNET"]


class TestCalls(Base):
    def test_run_flow(self):
        run = {"id": "run-7", "base_model": "signal-tiny", "lora_rank": 8, "status": "ready", "step": 0}
        ckpt = {"id": "ck-1", "run_id": "run-7", "step": 1, "mode": "adapter", "uri": "file:///tmp/ck-1",
                "files": [{"name": "adapter_model.safetensors", "cid": "bafy", "size": 12, "uri": "file:///tmp/ck-1/a"}]}
        # An older server's names: the SDK fills in the new ones.
        billed = {"cost": {"credits": 100}, "balance": 900}
        toks = {"Q:": [11, 12], " A": [13]}

        def handler(req):
            m, p, b = req["method"], req["path"], req["body"]
            want_auth = "Bearer admin-x" if p.startswith("/v1/admin") else "Bearer " + KEY
            self.assertEqual(req["auth"], want_auth, p)
            self.assertEqual(req["idem"] is None, m == "GET", "idempotency key on mutating calls only")
            routes = {
                ("POST", "/v1/runs"): lambda: (201, {}, run),
                ("GET", "/v1/runs"): lambda: (200, {}, {"runs": [run]}),
                ("GET", "/v1/runs/run-7"): lambda: (200, {}, run),
                ("POST", "/v1/runs/run-7/forward_backward"): lambda: (200, {}, dict(
                    loss_sum=6.0, loss_mean=2.0, tokens=3, grad_norm=1.5, logprobs=[[-1, -2, -3]], **billed)),
                ("POST", "/v1/runs/run-7/forward"): lambda: (200, {}, dict(
                    loss_sum=6.0, loss_mean=2.0, tokens=3, logprobs=[[-1, -2, -3]], **billed)),
                ("POST", "/v1/runs/run-7/optim_step"): lambda: (200, {}, dict(step=1, learning_rate=1e-3, grad_norm=1.5, **billed)),
                ("POST", "/v1/runs/run-7/sample"): lambda: (200, {}, dict(samples=[[{
                    "tokens": [5, 6], "text": " upon", "logprobs": [-0.5, -0.7], "stop_reason": "length"}]], **billed)),
                ("POST", "/v1/runs/run-7/save_state"): lambda: (200, {}, dict(checkpoint=ckpt, **billed)),
                ("POST", "/v1/runs/run-7/load_state"): lambda: (200, {}, dict(run, step=1)),
                ("GET", "/v1/runs/run-7/metrics"): lambda: (200, {}, {"metrics": [{"step": 1, "loss_mean": 2.0, "time": "t"}]}),
                ("DELETE", "/v1/runs/run-7"): lambda: (200, {}, dict(run, status="ended")),
                ("POST", "/v1/tokenize"): lambda: (200, {}, {
                    "tokens": ([1] if b.get("add_special_tokens") else []) + toks[b["text"]]}),
                ("GET", "/v1/account"): lambda: (200, {}, {"account": "a", "balance": 900, "spent": 100, "charges": []}),
                ("GET", "/v1/models"): lambda: (200, {}, {"models": [{"name": "signal-tiny", "context_length": 512}]}),
                ("GET", "/v1/nodes"): lambda: (200, {}, {"nodes": [{"peer_id": "12D3"}]}),
                ("POST", "/v1/admin/keys"): lambda: (200, {}, {"api_key": "sk-new", "account": "acct-%d" % b["micro_credits"]}),
                ("POST", "/v1/admin/credit"): lambda: (200, {}, {"account": b["account"], "balance_micro_credits": b["micro_credits"],
                                                                 "balance": b["micro_credits"]}),
                ("GET", "/v1/admin/keys?account=acct%205"): lambda: (200, {}, {"keys": [{"id": "key_1", "account": "acct 5"}]}),
                ("DELETE", "/v1/admin/keys/key_1"): lambda: (200, {}, {"id": "key_1", "account": "acct 5"}),
                ("POST", "/v1/admin/join_tokens"): lambda: (200, {}, {"join_token": "jt", "operator_account": b.get("operator_account", "")}),
            }
            f = routes.get((m, p))
            if f is None:
                return err(404, "not_found", "no route %s %s" % (m, p))
            return f()

        api = self.serve(handler)
        c = self.client(api)
        r = c.create_run("signal-tiny", lora_rank=8, seed=3)
        self.assertEqual(api.requests[-1]["body"], {"base_model": "signal-tiny", "lora_rank": 8, "seed": 3})
        self.assertEqual((r.id, r.base_model, r.step), ("run-7", "signal-tiny", 0))

        fb = r.forward_backward([("Q:", " A"), "plain text", {"text": "dict text"}])
        self.assertEqual(api.requests[-1]["body"], {"examples": [
            {"prompt": "Q:", "completion": " A"}, {"text": "plain text"}, {"text": "dict text"}]})
        self.assertEqual((fb["loss_mean"], fb["grad_norm"], fb["cost"]["micro_credits"], fb["balance_micro_credits"]), (2.0, 1.5, 100, 900))

        d = r.datum_from_text("Q:", " A")
        self.assertEqual(d, {"model_input": {"tokens": [1, 11, 12]},
                             "loss_fn_inputs": {"target_tokens": [11, 12, 13], "weights": [0.0, 0.0, 1.0]}})
        fw = r.forward([d], loss_fn="cross_entropy")
        self.assertEqual(api.requests[-1]["body"], {"data": [d], "loss_fn": "cross_entropy"})
        self.assertEqual(len(fw["logprobs"][0]), 3)

        st = r.optim_step(learning_rate=1e-3, grad_clip_norm=1.0)
        self.assertEqual(api.requests[-1]["body"], {"adam_params": {"learning_rate": 1e-3, "grad_clip_norm": 1.0}})
        self.assertEqual((st["step"], r.step, r.info["spent_micro_credits"]), (1, 1, 300))

        sm = r.sample("Once", max_tokens=8, temperature=0.7, seed=1)
        self.assertEqual(api.requests[-1]["body"], {"prompts": [{"text": "Once"}],
                                                     "sampling_params": {"max_tokens": 8, "temperature": 0.7, "seed": 1}})
        self.assertEqual(sm["samples"][0][0]["text"], " upon")
        r.sample([[1, 2, 3], "Twice"], max_tokens=4, num_samples=2)
        self.assertEqual(api.requests[-1]["body"], {"prompts": [{"tokens": [1, 2, 3]}, {"text": "Twice"}],
                                                     "num_samples": 2, "sampling_params": {"max_tokens": 4}})
        r.sample([5, 6], max_tokens=4)
        self.assertEqual(api.requests[-1]["body"]["prompts"], [{"tokens": [5, 6]}])

        sv = r.save_state()
        self.assertEqual(api.requests[-1]["body"], {"mode": "adapter"})
        self.assertEqual((sv["checkpoint"]["uri"], sv["checkpoint"]["files"][0]["cid"]), ("file:///tmp/ck-1", "bafy"))
        self.assertEqual(r.load_state("ck-1")["step"], 1)
        self.assertEqual(api.requests[-1]["body"], {"checkpoint": "ck-1"})
        self.assertEqual(r.metrics()[0]["loss_mean"], 2.0)
        self.assertEqual(r.refresh()["step"], 0)

        self.assertEqual([x["id"] for x in c.list_runs()], ["run-7"])
        self.assertEqual(c.get_run("run-7").base_model, "signal-tiny")
        self.assertEqual(c.account()["balance_micro_credits"], 900)
        self.assertEqual(c.models()[0]["name"], "signal-tiny")
        self.assertEqual(c.nodes()[0]["peer_id"], "12D3")
        # --credits' unit: a number of credits, or the API's micro-credits.
        self.assertEqual(c.create_key("admin-x", 5)["account"], "acct-5000000")
        self.assertEqual(c.create_key("admin-x", micro_credits=5)["account"], "acct-5")
        self.assertEqual(c.credit("admin-x", "a", 0.5)["balance_micro_credits"], 500_000)
        self.assertEqual(c.credit("admin-x", "a", micro_credits=7)["balance_micro_credits"], 7)
        self.assertEqual(c.create_join_token("admin-x", "op")["operator_account"], "op")
        self.assertEqual(c.list_keys("admin-x", "acct 5")[0]["id"], "key_1")
        self.assertEqual(c.revoke_key("admin-x", "key_1")["account"], "acct 5")
        self.assertEqual(r.close()["status"], "ended")
        self.assertEqual(r.info["status"], "ended")

    def test_money_helpers(self):
        from signal_sdk import format_credits, micro_credits
        for given, want in [(1, 1_000_000), (0.5, 500_000), ("1000.000001", 1_000_000_001), (0.1, 100_000), (0, 0)]:
            self.assertEqual(micro_credits(given), want, given)
        for bad in [-1, "1.0000001", "ten", float("nan"), True, 2 ** 53]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                micro_credits(bad)
        self.assertEqual((format_credits(12_500_000), format_credits(-1)), ("12.500000", "-0.000001"))
        api = self.serve(lambda req: self.fail("unexpected request"))
        with self.assertRaisesRegex(ValueError, "one of them"):
            self.client(api).create_key("adm", 1, micro_credits=1)

    def test_with_block_ends_the_run(self):
        deletes = []
        fail_delete = []

        def handler(req):
            if req["method"] == "POST" and req["path"] == "/v1/runs":
                return 201, {}, {"id": "run-%d" % len(deletes), "base_model": "signal-tiny", "status": "ready", "step": 0}
            if req["method"] == "DELETE":
                deletes.append(req["path"])
                if fail_delete:
                    return err(409, "conflict", "cannot end")
                return 200, {}, {"id": req["path"].rsplit("/", 1)[1], "status": "ended"}
            return err(404, "not_found", "no route")

        c = self.client(self.serve(handler))
        with c.create_run("signal-tiny", lora_rank=8) as run:
            self.assertEqual(run.id, "run-0")
        self.assertEqual(deletes, ["/v1/runs/run-0"])
        self.assertEqual(run.info["status"], "ended")
        # The block's own failure is what the caller sees; the run still ends.
        fail_delete.append(True)
        with self.assertRaisesRegex(ValueError, "training went wrong"):
            with c.create_run("signal-tiny", lora_rank=8):
                raise ValueError("training went wrong")
        self.assertEqual(deletes[-1], "/v1/runs/run-1")
        # After a clean block, a failure to end the run is raised.
        with self.assertRaises(ConflictError):
            with c.create_run("signal-tiny", lora_rank=8):
                pass
        # An ended run is not ended twice.
        fail_delete.clear()
        with c.create_run("signal-tiny", lora_rank=8) as run:
            run.close()
        self.assertEqual(deletes.count("/v1/runs/run-3"), 1)

    def test_client_side_validation(self):
        api = self.serve(lambda req: self.fail("unexpected request %s" % req["path"]))
        c = self.client(api)
        r = c.run("r-1")
        checks = {
            "empty batch": lambda: r.forward_backward([]),
            "mixed batch": lambda: r.forward([{"model_input": {"tokens": [1]}}, "text"]),
            "bad item": lambda: r.forward_backward([3.5]),
            "no prompts": lambda: r.sample([]),
            "bad prompt": lambda: r.sample([None]),
            "no checkpoint": lambda: r.load_state(""),
            "no model": lambda: c.create_run(""),
            "no admin token": lambda: c.create_key("", 1),
            "slash in id": lambda: c.get_run("a/b"),
            "empty id": lambda: c.delete_run(""),
        }
        for name, f in checks.items():
            with self.subTest(name):
                self.assertRaises(ValueError, f)
        self.assertEqual(api.requests, [])

    def test_response_too_large_and_bad_json(self):
        api = self.serve(lambda req: (200, {}, {"models": [{"name": "x" * 500}]}) if "models" in req["path"]
                         else (200, {}, b"{not json"))
        c = self.client(api, max_response_bytes=100)
        with self.assertRaises(ResponseTooLargeError):
            c.models()
        with self.assertRaisesRegex(SignalError, "decode response"):
            c.account()

    def test_concurrent_use(self):
        api = self.serve(lambda req: (200, {}, {"step": 1, "cost": {"credits": 1}}))
        c = self.client(api)
        run = c.run("r-1")
        errors = []

        def work():
            try:
                run.optim_step()
            except Exception as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len({r["idem"] for r in api.requests}), 8)


class TestHelpers(unittest.TestCase):
    def test_datum_from_tokens(self):
        d = datum_from_tokens([1, 10, 11], [20, 21])
        self.assertEqual(d["model_input"]["tokens"], [1, 10, 11, 20])
        self.assertEqual(d["loss_fn_inputs"]["target_tokens"], [10, 11, 20, 21])
        self.assertEqual(d["loss_fn_inputs"]["weights"], [0.0, 0.0, 1.0, 1.0])
        self.assertEqual(datum_from_tokens([], [1, 5, 6])["loss_fn_inputs"]["weights"], [1.0, 1.0])
        for p, c in (([], []), ([1, 2], []), ([], [7])):
            with self.assertRaises(ValueError):
                datum_from_tokens(p, c)

    def test_parse_retry_after(self):
        from signal_sdk.client import _parse_retry_after
        from email.utils import formatdate

        self.assertIsNone(_parse_retry_after(None))
        self.assertIsNone(_parse_retry_after("soon"))
        self.assertIsNone(_parse_retry_after("-3"))
        self.assertIsNone(_parse_retry_after("nan"))
        self.assertEqual(_parse_retry_after(" 3 "), 3.0)
        self.assertEqual(_parse_retry_after("1e300"), 86400.0)
        later = _parse_retry_after(formatdate(time.time() + 30, usegmt=True))
        self.assertTrue(later is not None and 25 < later <= 31, later)
        self.assertIsNone(_parse_retry_after(formatdate(time.time() - 30, usegmt=True)))

    def test_version(self):
        self.assertRegex(signal_sdk.__version__, r"^\d+\.\d+\.\d+$")


if __name__ == "__main__":
    unittest.main()
