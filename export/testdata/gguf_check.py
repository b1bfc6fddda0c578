#!/usr/bin/env python3
"""ggml's gguf Python package as a judge of the GGUF files export writes.

A test helper: export/gguf_py_test.go runs it on $SIGNAL_HF_PYTHON with
PYTHONPATH=$SIGNAL_LLAMACPP/python (scripts/llamacpp.sh installs the
package there), a request as JSON on stdin:

  {"files": {label: F, ...}, "q8_0": [F32, Q8]}
      -> {"read": {label: {"kv": {key: value}, "tensors": [{"name", "shape",
         "type"}]}}, "q8_0": {"checked": n, "differ": [names]}}
read is GGUFReader's view of each file; an array of more than 8 values is
given as {"len": n, "head": [its first 8]}. q8_0 checks that every Q8_0
tensor of Q8 is, byte for byte, gguf.quants.quantize(Q8_0) of the same
tensor in F32 (the F32 export of the same model): llama.cpp's converter's
--outtype q8_0 and, its docstring says, ggml's reference quantizer. Each
file is parsed once: GGUFReader takes seconds over a 150,000-token
vocabulary.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, quants


def plain(v):
    return v.item() if isinstance(v, (np.floating, np.integer)) else v


def value(field):
    if field.types[0] == GGUFValueType.ARRAY and len(field.data) > 8:
        return {"len": len(field.data), "head": [plain(field.contents(i)) for i in range(8)]}
    v = field.contents()
    return [plain(x) for x in v] if isinstance(v, list) else plain(v)


def view(r):
    kv = {name: value(f) for name, f in r.fields.items() if not name.startswith("GGUF.")}
    tensors = [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name} for t in r.tensors]
    return {"kv": kv, "tensors": tensors}


def q8_0(f32_reader, q8_reader):
    f32 = {t.name: t for t in f32_reader.tensors}
    checked, differ = 0, []
    for t in q8_reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q8_0:
            continue
        src = f32[t.name]
        rows = np.asarray(src.data, dtype=np.float32).reshape(-1, int(src.shape[0]))
        want = quants.quantize(rows, GGMLQuantizationType.Q8_0)
        if want.tobytes() != np.asarray(t.data).tobytes():
            differ.append(t.name)
        checked += 1
    return {"checked": checked, "differ": differ}


def main():
    req = json.load(sys.stdin)
    readers = {label: GGUFReader(path) for label, path in req["files"].items()}
    out = {"read": {label: view(r) for label, r in readers.items()}}
    if "q8_0" in req:
        out["q8_0"] = q8_0(*(readers[label] for label in req["q8_0"]))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
