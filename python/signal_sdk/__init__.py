"""Signal's Python SDK: fine-tune language models on Signal's peer-to-peer network.

Standard library only (Python >= 3.9)::

    from signal_sdk import SignalClient
    client = SignalClient(api_key, "http://127.0.0.1:8080")
    with client.create_run("signal-tiny", lora_rank=8) as run:   # ends the run with the block
        fb = run.forward_backward(["The quick brown fox jumps over the lazy dog."])
        run.optim_step(learning_rate=1e-3)
        print(run.sample("The quick", max_tokens=16)["samples"][0][0]["text"])
        print(run.save_state()["checkpoint"]["uri"])
"""

__version__ = "0.1.0"

from . import errors as _errors  # noqa: E402
from .errors import *  # noqa: E402,F401,F403  (every exception, listed in errors.__all__)
from .client import SignalClient, SignalRun, datum_from_tokens, format_credits, micro_credits, raw_cid  # noqa: E402

__all__ = ["SignalClient", "SignalRun", "datum_from_tokens", "micro_credits", "format_credits", "raw_cid"] + [
    name for name in _errors.__all__ if name != "error_from_response"
]
