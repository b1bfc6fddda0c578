"""A small safetensors reader and writer (the format is 8 bytes of little-endian
header length, a JSON header, then the raw tensor bytes), so that the worker
needs nothing beyond torch."""

import ctypes
import json
import mmap
import os
import struct

import torch

# safetensors dtype names → torch dtypes, for the dtypes Llama checkpoints use.
DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4}

# A header larger than this is a corrupt file, not a real checkpoint.
MAX_HEADER_BYTES = 100 << 20


class FormatError(ValueError):
    """A file that is not valid safetensors."""


def _parse_header(buf_len, header_bytes, path):
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"safetensors {path}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FormatError(f"safetensors {path}: header is not an object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise FormatError(f"safetensors {path}: tensor {name}: entry is not an object")
        dt = info.get("dtype")
        if dt not in DTYPES:
            raise FormatError(f"safetensors {path}: tensor {name}: unsupported dtype {dt!r}")
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) for o in offs)):
            raise FormatError(f"safetensors {path}: tensor {name}: bad shape or data_offsets")
        n = 1
        for s in shape:
            n *= s
        begin, end = offs
        if begin < 0 or end < begin or end > buf_len or end - begin != n * _SIZES[dt]:
            raise FormatError(
                f"safetensors {path}: tensor {name}: data_offsets {offs} do not fit "
                f"shape {shape} {dt} in {buf_len} data bytes")
        out[name] = (dt, shape, begin, end)
    return out


def read(path):
    """Returns {name: tensor} for every tensor of the file, on the CPU in the
    file's dtype. The tensors own their memory (the file is closed)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise FormatError(f"safetensors {path}: file is {size} bytes, shorter than its header length")
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise FormatError(f"safetensors {path}: header length {hlen} exceeds the file ({size} bytes)")
        entries = _parse_header(size - 8 - hlen, f.read(hlen), path)
        base = 8 + hlen
        # ACCESS_COPY gives a writable (copy-on-write) view, which frombuffer wants.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        try:
            out = {}
            for name, (dt, shape, begin, end) in entries.items():
                n = (end - begin) // _SIZES[dt]
                if n == 0:
                    out[name] = torch.empty(shape, dtype=DTYPES[dt])
                    continue
                t = torch.frombuffer(mm, dtype=DTYPES[dt], count=n, offset=base + begin)
                out[name] = t.reshape(shape).clone()
            return out
        finally:
            if mm is not None:
                del mm


def write(path, tensors, metadata=None):
    """Writes {name: tensor} as safetensors, tensors sorted by name, header
    padded to 8 bytes as the reference implementation does. Written to a
    temporary name first so a crash never leaves half a file."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"safetensors write {name}: unsupported dtype {t.dtype}")
        # ctypes rather than numpy: numpy is not a dependency (and has no bf16).
        b = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
