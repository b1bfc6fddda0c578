"""Early stop on stop strings (signal_worker/stopbytes.py): token bytes read
from tokenizer.json must agree with the node's exact decode, checked on the
transformers.js fixture the Go tokenizer is tested against, and sampling
must end a row at the token that completes a stop string."""
import json
import os
import shutil
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_ROOT = os.path.dirname(HERE)
sys.path.insert(0, WORKER_ROOT)
sys.path.insert(0, HERE)  # test_worker's find_model

from signal_worker.stopbytes import TokenBytes  # noqa: E402

REPO = os.path.abspath(os.path.join(WORKER_ROOT, "..", "..", ".."))
TOKDATA = os.path.join(REPO, "trainer", "tokenizer", "testdata")


def fires_at(tb, ids, stop):
    """The index of the token at which a scanner for stop fires, or None."""
    sc = tb.scanner([stop])
    for i, t in enumerate(ids):
        if sc.feed(t):
            return i
    return None


class FixtureTest(unittest.TestCase):
    """Every decode case of the fixture: a stop string taken from the exact
    text fires, and one that is not in the text never does."""

    def check(self, name):
        tb = TokenBytes.load(os.path.join(TOKDATA, name))
        self.assertIsNotNone(tb, name)
        with open(os.path.join(TOKDATA, "fixture.json"), encoding="utf-8") as f:
            cases = json.load(f)["tokenizers"][name]["decode"]
        fired = 0
        for c in cases:
            text, ids = c["text_skip_special"], c["ids"]
            raw = b"".join(tb.table[i] for i in ids)
            if len(text.strip()) < 2 or "\ufffd" in text or b"\xef\xbb\xbf" in raw:
                continue  # where the scanner declines to stop early (see stopbytes)
            # The last two characters: the match must come with the last
            # tokens, after every rule (strip, clean-up) has had its say.
            stop = text[-2:]
            with self.subTest(name=name, text=text[:40]):
                self.assertIsNotNone(fires_at(tb, ids, stop), f"{stop!r} in {text!r} did not fire")
                fired += 1
                # A string the exact text does not contain never fires.
                absent = text[-2:] + "\x07"
                self.assertIsNone(fires_at(tb, ids, absent))
                if " " + text[-1] not in text and text[-1] != " ":
                    self.assertIsNone(fires_at(tb, ids, " " + text[-1]))
        self.assertGreater(fired, 100)
        return cases, tb

    def test_byte_level(self):
        cases, tb = self.check("byte-level-bpe")
        # clean_up_tokenization_spaces: a space the node's decode removes
        # (" !" in "y != 2") must not stop a row.
        cleaned = 0
        for c in cases:
            raw = b"".join(tb.table[i] for i in c["ids"])
            for a in (b" !", b" .", b" ,", b" ?", b" 's", b" n't"):
                if a in raw and a.decode() not in c["text_skip_special"]:
                    with self.subTest(text=c["text_skip_special"][:40], stop=a):
                        self.assertIsNone(fires_at(tb, c["ids"], a.decode()))
                    cleaned += 1
        self.assertGreater(cleaned, 0)

    def test_sentencepiece(self):
        self.check("sentencepiece-bpe")

    def test_cleanup_and_first_space(self):
        tb = TokenBytes.load(os.path.join(TOKDATA, "byte-level-bpe"))
        self.assertTrue(tb.cleanup)
        sp = TokenBytes.load(os.path.join(TOKDATA, "sentencepiece-bpe"))
        self.assertTrue(sp.strip_first_space)
        self.assertFalse(sp.cleanup)

    def test_unusable_tokenizers_give_none(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.assertIsNone(TokenBytes.load(d))  # no tokenizer.json
        for tok in ({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}},
                    {"model": {"type": "BPE", "vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}},
                    {"model": {"type": "BPE", "vocab": {"a": 0}},
                     "decoder": {"type": "Sequence", "decoders": [
                         {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                         {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}}):
            with open(os.path.join(d, "tokenizer.json"), "w") as f:
                json.dump(tok, f)
            self.assertIsNone(TokenBytes.load(d), tok)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write("{not json")
        self.assertIsNone(TokenBytes.load(d))


class SampleStopTest(unittest.TestCase):
    def test_row_ends_at_the_token_completing_a_stop_string(self):
        import torch  # noqa: F401  (the model needs it; the fixture tests do not)
        from signal_worker.model import Model
        from signal_worker.session import Session
        from test_worker import find_model

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        src = find_model("tiny-sp")
        for f in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(src, f), d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(TOKDATA, "sentencepiece-bpe", f), d)
        model = Model.load(d)
        s = Session(model, rank=4, alpha=8)
        prompt = {"tokens": [1, 450, 4996]}
        full, _ = s.sample({"prompts": [prompt], "sampling_params": {"max_tokens": 16, "temperature": 0}}, [])
        g = full["samples"][0][0]["tokens"]
        self.assertEqual(len(g), 16)
        tb = model.token_bytes()
        # A stop string from the bytes of a token in the middle.
        k = next(i for i in range(5, 16) if len(tb.table[g[i]].strip()) >= 2
                 and tb.table[g[i]].strip().decode("utf-8", "replace").isprintable())
        stop = tb.table[g[k]].strip().decode("utf-8")
        want = fires_at(tb, g, stop)
        self.assertIsNotNone(want)
        self.assertLessEqual(want, k)
        body = {"prompts": [prompt], "num_samples": 2,
                "sampling_params": {"max_tokens": 16, "temperature": 0, "stop": [stop, "\x07never"]}}
        out, usage = s.sample(body, [])
        for smp in out["samples"][0]:
            self.assertEqual(smp["tokens"], g[:want + 1])
            self.assertEqual(smp["stop_reason"], "stop")
            self.assertEqual(len(smp["logprobs"]), want + 1)
        self.assertEqual(usage["sampled_tokens"], 2 * (want + 1))
        # Without a tokenizer the worker cannot see stop strings: it runs
        # to max_tokens and leaves the cut to the node.
        model._token_bytes = None
        out, _ = s.sample(body, [])
        self.assertEqual(out["samples"][0][0]["tokens"], g)
        self.assertEqual(out["samples"][0][0]["stop_reason"], "length")

    def test_bad_stop_strings_are_rejected(self):
        from signal_worker.model import Model
        from signal_worker.session import InvalidInput, Session
        from test_worker import find_model

        s = Session(Model.load(find_model("tiny-sp")), rank=4, alpha=8)
        for stop in ([""], [3], {"a": 1}):
            body = {"prompts": [{"tokens": [1]}], "sampling_params": {"max_tokens": 2, "stop": stop}}
            with self.subTest(stop=stop):
                with self.assertRaises(InvalidInput):
                    s.sample(body, [])


if __name__ == "__main__":
    unittest.main()
