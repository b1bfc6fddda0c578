"""The worker's unix-socket server.

Frames are the node protocol's binary frame (protocol/wire.go): "SG", wire
version 1, message type (1 SessionRequest, 2 SessionResponse), a big-endian
uint32 payload length, then the payload as JSON. A request is a
protocol.SessionRequest ({"request_id", "run_id", "call", "body"}); the
answer is a protocol.SessionResponse ({"request_id", "body" | "error",
"usage"}). Besides the session calls the worker answers "health" and
"shutdown". Each connection has its own thread; the device runs one call at
a time (a lock), which is what one GPU can do anyway.
"""

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import torch

from .model import ModelCache, ModelError
from .session import InvalidInput, Session

# protocol.MaxFrameBytes: the Go side refuses larger frames too.
MAX_FRAME_BYTES = 64 << 20
WIRE_MAGIC = b"SG"
WIRE_VERSION = 1
MSG_SESSION_REQUEST = 1
MSG_SESSION_RESPONSE = 2


class FrameError(Exception):
    """A frame that cannot be read (closed socket, foreign bytes, oversize, not JSON)."""


def read_frame(sock, want_type=MSG_SESSION_REQUEST):
    """Reads one frame; None when the peer closed the socket between frames."""
    head = _recv_exact(sock, 8)
    if head is None:
        return None
    if head[:2] != WIRE_MAGIC:
        raise FrameError(f"not a signal frame (magic {head[:2]!r})")
    if head[2] != WIRE_VERSION:
        raise FrameError(f"unsupported wire version {head[2]} (this worker speaks {WIRE_VERSION})")
    if head[3] != want_type:
        raise FrameError(f"unexpected message type {head[3]}, want {want_type}")
    (n,) = struct.unpack(">I", head[4:])
    if n > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {n} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    data = _recv_exact(sock, n) if n else b""
    if data is None:
        raise FrameError("connection closed inside a frame")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FrameError(f"frame is not JSON: {e}") from e


def write_frame(sock, obj, msg_type=MSG_SESSION_RESPONSE):
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_FRAME_BYTES:
        data = json.dumps(_error(obj.get("request_id", ""), "too_large",
                                 f"response of {len(data)} bytes exceeds the frame limit")).encode()
    sock.sendall(WIRE_MAGIC + bytes([WIRE_VERSION, msg_type]) + struct.pack(">I", len(data)) + data)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise FrameError("connection closed inside a frame")
            return None
        buf.extend(chunk)
    return bytes(buf)


class Worker:
    """Sessions of one device. Safe for concurrent callers."""

    def __init__(self, device="cpu", dtype=None):
        self.device = torch.device(device)
        self.models = ModelCache(self.device, dtype)
        self.sessions = {}  # run_id -> (Session, model key, stop tokens)
        self.lock = threading.Lock()
        self.started = time.time()
        self.stopping = threading.Event()

    def backend(self):
        return "cuda" if self.device.type == "cuda" else "cpu-torch"

    def handle(self, req):
        """Answers one request dict with a response dict; never raises."""
        rid = req.get("request_id", "") if isinstance(req, dict) else ""
        try:
            if not isinstance(req, dict):
                raise InvalidInput("request: want an object")
            body = req.get("body") or {}
            if not isinstance(body, dict):
                raise InvalidInput("body: want an object")
            call = req.get("call")
            usage = {}
            if call == "health":
                out = self.health()
            elif call == "shutdown":
                self.stopping.set()
                out = {"status": "stopping"}
            else:
                with self.lock:
                    out, usage = self._session_call(call, req.get("run_id") or "", body)
            return {"request_id": rid, "body": out, "usage": usage}
        except InvalidInput as e:
            return _error(rid, "invalid_request", str(e))
        except ModelError as e:
            return _error(rid, "invalid_request", str(e))
        except KeyError as e:
            return _error(rid, "not_found", str(e.args[0]) if e.args else "not found")
        except torch.cuda.OutOfMemoryError if hasattr(torch.cuda, "OutOfMemoryError") else MemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return _error(rid, "out_of_memory", f"out of device memory: {e}")
        except Exception as e:  # a bug: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            return _error(rid, "internal", f"{type(e).__name__}: {e}")

    def _session_call(self, call, run_id, body):
        if not run_id:
            raise InvalidInput("run_id: required")
        if call == "init":
            if run_id in self.sessions:
                raise InvalidInput(f"run {run_id}: session already open")
            model_dir = body.get("model_dir")
            if not isinstance(model_dir, str) or not model_dir:
                raise InvalidInput("model_dir: the node must name the base model's directory")
            key, model = self.models.acquire(model_dir, body.get("base_model") or "")
            try:
                s = Session(model, rank=body.get("lora_rank") or 32, alpha=body.get("lora_alpha"),
                            targets=body.get("target_modules"), seed=body.get("seed") or 0,
                            schedule=body.get("lr_schedule"))
            except Exception:
                self.models.release(key)
                raise
            stops = sorted(set(model.cfg.eos))
            self.sessions[run_id] = (s, key, stops)
            return {"run_id": run_id, "step": s.step, "lora_rank": s.lora.rank,
                    "lora_alpha": s.lora.alpha, "target_modules": s.lora.targets}, {}
        if run_id not in self.sessions:
            raise KeyError(f"run {run_id}: no open session on this worker")
        s, key, stops = self.sessions[run_id]
        if call == "forward_backward":
            out = s.forward_backward(body)
            return out, {"train_tokens": out["tokens"]}
        if call == "forward":
            out = s.forward(body)
            return out, {"prefill_tokens": out["tokens"]}
        if call == "optim_step":
            return s.optim_step(body), {}
        if call == "sample":
            return s.sample(body, stops)
        if call == "save_state":
            return s.save_state(body), {}
        if call == "load_state":
            return s.load_state(body), {}
        if call == "close":
            del self.sessions[run_id]
            self.models.release(key)
            return {"run_id": run_id, "step": s.step}, {}
        raise InvalidInput(f"call {call!r} is not a session call")

    def health(self):
        h = {"status": "ok", "backend": self.backend(), "device": str(self.device),
             "torch": torch.__version__, "sessions": len(self.sessions),
             "models": self.models.names(), "model_bytes": self.models.memory_bytes(),
             "uptime_s": round(time.time() - self.started, 3), "pid": os.getpid()}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            h.update({"gpu_name": torch.cuda.get_device_name(self.device),
                      "memory_total": total, "memory_free": free})
        return h


def _error(rid, code, msg):
    return {"request_id": rid, "error": {"code": code, "message": msg}, "usage": {}}


def serve(path, worker):
    """Serves connections on the unix socket at path until a shutdown call or
    SIGTERM; then stops accepting and returns (the process exits)."""
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(64)
    srv.settimeout(0.2)
    threads = []

    def conn_loop(c):
        with c:
            while not worker.stopping.is_set():
                try:
                    req = read_frame(c)
                except (FrameError, OSError) as e:
                    try:
                        write_frame(c, _error("", "invalid_request", f"bad frame: {e}"))
                    except OSError:
                        pass
                    return
                if req is None:
                    return
                resp = worker.handle(req)
                try:
                    write_frame(c, resp)
                except (OSError, ValueError):
                    return

    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set())
    print(json.dumps({"event": "listening", "socket": path, "backend": worker.backend(),
                      "device": str(worker.device), "pid": os.getpid()}), flush=True)
    try:
        while not worker.stopping.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            c.settimeout(None)
            t = threading.Thread(target=conn_loop, args=(c,), daemon=True)
            t.start()
            threads = [x for x in threads if x.is_alive()] + [t]
    finally:
        srv.close()
        try:
            os.unlink(path)
        except OSError:
            pass
    # Let in-flight calls finish writing their answers (bounded).
    deadline = time.time() + 5
    for t in threads:
        t.join(max(0.0, deadline - time.time()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="signal_worker", description=__doc__)
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--dtype", default="", help="float32, bfloat16 or float16 (default: bf16 on cuda, f32 on cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"event": "error", "message": "CUDA is not available to torch"}), flush=True)
        return 3
    dtype = {"": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(args.dtype)
    if dtype is None and args.dtype:
        print(f"--dtype {args.dtype!r}: want float32, bfloat16 or float16", file=sys.stderr)
        return 2
    serve(args.socket, Worker(dev, dtype))
    return 0
