"""Stop strings during generation, without a tokenizer library.

The node owns tokenization and cuts every sample at its first stop string on
exactly decoded text (node/gpu/engine.go). Without help the worker would
generate all max_tokens first and the cut would throw the rest away; on a
GPU that is most of a call's time when stop strings end samples early. So
the worker reads each token's bytes from the model directory's
tokenizer.json (the two families the engine supports: byte-level BPE, and
SentencePiece-style BPE with byte fallback) and ends a row as soon as its
bytes contain a stop string. The node's exact cut stays the answer; this only
stops the loop at the same token.

Byte concatenation equals the node's decode (special tokens skipped) for
both families given three rules the node's tokenizer also applies: a
SentencePiece Strip (after Fuse) or Metaspace decoder drops the text's first
space; tokenizer_config.json's clean_up_tokenization_spaces (on unless set
false) removes the space before punctuation; and decoding turns invalid
UTF-8 into U+FFFD and drops a byte-order mark at the start of a byte run.
The scanner reproduces the first two and, where the third could matter (a
byte-order mark or an invalid sequence in view), does not stop early: an
early stop must never cut where the node would not. Any other decoder
yields None: no early stop, slower but never wrong.
"""

import json
import os

# transformers' clean_up_tokenization, in its order (as the node's tokenizer).
_CLEANUP = [(b" .", b"."), (b" ?", b"?"), (b" !", b"!"), (b" ,", b","), (b" ' ", b"'"),
            (b" n't", b"n't"), (b" 'm", b"'m"), (b" 's", b"'s"), (b" 've", b"'ve"), (b" 're", b"'re")]


def _byte_level_map():
    """GPT-2's byte <-> printable-character table, character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoders(d):
    if not isinstance(d, dict):
        return []
    if d.get("type") == "Sequence":
        out = []
        for x in d.get("decoders") or []:
            out += _decoders(x)
        return out
    return [d]


def _byte_token(piece):
    """<0xNN> byte-fallback pieces -> the byte, else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    return None


class TokenBytes:
    """Each token id's bytes, and whether the text's first space is dropped."""

    def __init__(self, table, strip_first_space, cleanup):
        self.table = table
        self.strip_first_space = strip_first_space
        self.cleanup = cleanup

    @classmethod
    def load(cls, model_dir):
        """The table for model_dir's tokenizer.json, or None when there is none
        or its decoder is not one this module reproduces exactly."""
        path = os.path.join(model_dir, "tokenizer.json")
        try:
            with open(path, encoding="utf-8") as f:
                tok = json.load(f)
        except (OSError, ValueError):
            return None
        model = tok.get("model") or {}
        vocab = model.get("vocab")
        if model.get("type") != "BPE" or not isinstance(vocab, dict):
            return None
        decs = _decoders(tok.get("decoder"))
        types = [d.get("type") for d in decs]
        strip = False
        if "ByteLevel" in types:
            bmap = _byte_level_map()

            def conv(piece):
                return bytes(bmap[c] if c in bmap else 0 for c in piece) \
                    if all(c in bmap for c in piece) else piece.encode("utf-8")
        elif "Metaspace" in types or any(
                d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581" for d in decs):
            fallback = "ByteFallback" in types
            for k, d in enumerate(decs):
                if d.get("type") == "Strip":
                    # After Fuse it strips the whole text; before, every
                    # token, which this module does not reproduce.
                    if d.get("content") != " " or d.get("stop", 0) or "Fuse" not in types[:k]:
                        return None
                    strip = d.get("start", 0) >= 1
                if d.get("type") == "Metaspace" and (d.get("prepend_scheme") in ("always", "first")
                                                     or d.get("add_prefix_space")):
                    strip = True

            def conv(piece):
                if fallback:
                    b = _byte_token(piece)
                    if b is not None:
                        return b
                return piece.replace("\u2581", " ").encode("utf-8")
        else:
            return None
        size = max(list(vocab.values()) + [a.get("id", -1) for a in tok.get("added_tokens") or []]) + 1
        table = [b""] * size
        for piece, i in vocab.items():
            if isinstance(i, int) and 0 <= i < size:
                table[i] = conv(piece)
        # Added tokens decode as their content; special ones are skipped.
        for a in tok.get("added_tokens") or []:
            i = a.get("id")
            if isinstance(i, int) and 0 <= i < size:
                table[i] = b"" if a.get("special") else (a.get("content") or "").encode("utf-8")
        cleanup = True
        try:
            with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
                cleanup = json.load(f).get("clean_up_tokenization_spaces", True) is not False
        except (OSError, ValueError, AttributeError):
            pass
        return cls(table, strip, cleanup)

    def scanner(self, stops):
        return StopScanner(self, stops)


class StopScanner:
    """One row's generated bytes; feed() says when a stop string appeared."""

    def __init__(self, tb, stops):
        self.tb = tb
        self.stops = [s.encode("utf-8") for s in stops]
        # Bytes before the new token that a new match (or a clean-up rule
        # reaching into it) can span.
        self.context = 2 * max(len(s) for s in self.stops) + 8
        self.buf = bytearray()
        self.first = True

    def feed(self, token):
        b = self.tb.table[token] if 0 <= token < len(self.tb.table) else b""
        if not b:
            return False  # special tokens decode to nothing
        if self.first:
            self.first = False
            if self.tb.strip_first_space and b.startswith(b" "):
                b = b[1:]
        if len(self.buf) > 4 * self.context:
            del self.buf[:-self.context]  # only the tail can take part in a match
        start = max(0, len(self.buf) - self.context)
        self.buf += b
        view = bytes(self.buf[start:])
        while view and 0x80 <= view[0] < 0xC0:
            view = view[1:]  # the window began inside a character
        if b"\xef\xbb\xbf" in view:
            return False
        try:
            view.decode("utf-8")
        except UnicodeDecodeError as e:
            # Only a character still being completed at the end is fine.
            if e.end < len(view) or e.reason != "unexpected end of data":
                return False
        if self.tb.cleanup:
            for a, r in _CLEANUP:
                view = view.replace(a, r)
        return any(s in view for s in self.stops)
