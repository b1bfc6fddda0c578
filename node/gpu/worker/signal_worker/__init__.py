"""Signal's PyTorch engine worker: one process per GPU serving run sessions.

The Go supervisor (package node/gpu) starts ``python -m signal_worker``,
talks to it over a unix socket with length-prefixed JSON frames and restarts
it when it dies. Only the standard library and torch are used, so the worker
runs wherever PyTorch does (CUDA in production, CPU in CI).
"""

__all__ = ["safetensors", "model", "session", "server"]
