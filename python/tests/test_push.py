"""The Python SDK's pushes to the Hugging Face Hub, against test_client's fake API."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_client import KEY, FakeAPI  # noqa: E402

from signal_sdk import SignalClient, UnavailableError  # noqa: E402

CHECKPOINT = {"id": "ck-1", "run_id": "run-1", "step": 20, "mode": "adapter", "uri": "file:///ck/ck-1", "files": []}


class PushTest(unittest.TestCase):
    def setUp(self):
        self.failures = 0
        os.environ.pop("HF_TOKEN", None)

        def handler(req):
            if req["method"] == "POST" and req["path"] == "/v1/runs/run-1/save_state":
                return 200, None, {"checkpoint": CHECKPOINT, "cost": {"micro_credits": 5}, "balance_micro_credits": 10}
            if req["method"] == "POST" and req["path"] == "/v1/checkpoints/ck-1/push":
                if self.failures > 0:
                    self.failures -= 1
                    return 503, {"Retry-After": "0"}, {"error": {"code": "unavailable", "message": "the push failed at the Hub: push again"}}
                b = req["body"]
                return 200, None, {"checkpoint": "ck-1", "repo": b["repo"], "url": "https://hub/" + b["repo"],
                                   "commit_url": "https://hub/c/abc", "commit_oid": "abc", "files": []}
            return 404, None, {"error": {"code": "not_found", "message": "no route"}}

        self.api = FakeAPI(handler)
        self.client = SignalClient(KEY, self.api.url, min_backoff=0.001, max_backoff=0.01)

    def tearDown(self):
        self.api.close()

    def pushes(self):
        return [r for r in self.api.requests if r["path"].endswith("/push")]

    def test_push_checkpoint(self):
        out = self.client.push_checkpoint("ck-1", "alice/lora", token="hf_x", commit_message="v1")
        self.assertEqual(out["commit_oid"], "abc")
        (req,) = self.pushes()
        self.assertEqual(req["body"], {"repo": "alice/lora", "private": True, "token": "hf_x", "commit_message": "v1"})
        self.assertEqual(req["auth"], "Bearer " + KEY)

    def test_token_from_env_and_retried_503(self):
        os.environ["HF_TOKEN"] = "hf_env"
        self.addCleanup(os.environ.pop, "HF_TOKEN", None)
        self.failures = 1
        out = self.client.push_checkpoint("ck-1", "alice/lora", private=False)
        self.assertEqual(out["repo"], "alice/lora")
        reqs = self.pushes()
        self.assertEqual(len(reqs), 2)
        self.assertEqual(reqs[1]["body"]["token"], "hf_env")
        self.assertFalse(reqs[1]["body"]["private"])

    def test_save_state_push_to_hub(self):
        run = self.client.run("run-1")
        out = run.save_state(push_to_hub={"repo": "alice/lora", "private": True, "token": "hf_x"})
        self.assertEqual(out["checkpoint"]["id"], "ck-1")
        self.assertEqual(out["push"]["commit_oid"], "abc")
        self.assertEqual(self.pushes()[0]["body"]["token"], "hf_x")

    def test_refusals(self):
        run = self.client.run("run-1")
        with self.assertRaises(ValueError):  # no token anywhere: refused before the save
            run.save_state(push_to_hub={"repo": "alice/lora"})
        with self.assertRaises(ValueError):
            run.save_state(push_to_hub={"repo": "alice/lora", "tokne": "x"})
        self.assertEqual([r for r in self.api.requests if r["path"].endswith("/save_state")], [])
        with self.assertRaises(ValueError):
            self.client.push_checkpoint("a/b", "alice/lora", token="x")
        with self.assertRaises(ValueError):
            self.client.push_checkpoint("ck-1", "", token="x")
        self.failures = 100
        with self.assertRaises(UnavailableError):
            self.client.push_checkpoint("ck-1", "alice/lora", token="x")


if __name__ == "__main__":
    unittest.main()
